/* echo: every frame back to its sender, read in place from shared memory.
 * Start it through the relay: shmrelay --worker-cmd "/path/to/echo" */
#include <stdio.h>

#include "shmrelay_worker.h"

static void on_frame(void *user, shmrelay_conn conn, const uint8_t *frame, size_t len,
                     bool redelivered, shmrelay_out *out) {
    (void)user;
    (void)redelivered;
    /* `frame` is valid until this returns; send copies it into the reply ring. If the send
     * fails, the library answers the frame with the codec's error reply itself. */
    shmrelay_send(out, conn, frame, len);
}

int main(void) {
    shmrelay_worker *w;
    if (shmrelay_worker_from_env(&w) != SHMRELAY_STATUS_OK) {
        fprintf(stderr, "echo: %s\n", shmrelay_last_error());
        return 2;
    }
    shmrelay_callbacks callbacks = {.on_frame = on_frame};
    /* Serves until SIGTERM or SIGINT. */
    shmrelay_status s = shmrelay_worker_run(w, &callbacks, NULL);
    if (s != SHMRELAY_STATUS_OK) fprintf(stderr, "echo: %s\n", shmrelay_last_error());
    shmrelay_worker_free(w);
    return s == SHMRELAY_STATUS_OK ? 0 : 1;
}
