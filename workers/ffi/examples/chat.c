/* chat: every message goes to every connected client, its sender included (as the receipt),
 * with the worker's own poll() loop instead of shmrelay_worker_run. Commands:
 *   /who          the sender alone gets "N connected"
 *   /upper TEXT   the sender alone gets TEXT in capitals
 *   /quit         the relay closes the sender's connection
 * Run it as the only worker of its listener (each worker knows only its own connections):
 *   shmrelay --workers 1 --worker-cmd "/path/to/chat" */
#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shmrelay_worker.h"

struct room {
    shmrelay_conn *members;
    size_t count, cap;
};

static void on_open(void *user, shmrelay_conn conn, const char *peer, size_t peer_len,
                    shmrelay_out *out) {
    (void)peer;
    (void)peer_len;
    struct room *room = user;
    if (room->count == room->cap) {
        size_t cap = room->cap ? room->cap * 2 : 64;
        shmrelay_conn *m = realloc(room->members, cap * sizeof *m);
        if (!m) {
            shmrelay_close(out, conn); /* no room for one more member */
            return;
        }
        room->members = m;
        room->cap = cap;
    }
    room->members[room->count++] = conn;
}

static void on_close(void *user, shmrelay_conn conn, uint32_t reason, shmrelay_out *out) {
    (void)reason;
    (void)out;
    struct room *room = user;
    for (size_t i = 0; i < room->count; i++) {
        if (room->members[i] == conn) {
            room->members[i] = room->members[--room->count];
            return;
        }
    }
}

/* The fill function of /upper: writes the reply straight into the reply ring. */
static void upper(void *ctx, uint8_t *buf, size_t len) {
    const uint8_t *text = ctx;
    for (size_t i = 0; i < len; i++) buf[i] = (uint8_t)toupper(text[i]);
}

static void on_frame(void *user, shmrelay_conn conn, const uint8_t *frame, size_t len,
                     bool redelivered, shmrelay_out *out) {
    (void)redelivered;
    struct room *room = user;
    if (len == 4 && memcmp(frame, "/who", 4) == 0) {
        /* A reply whose length is known once written: reserve, format, commit. */
        uint8_t *buf;
        if (shmrelay_reserve(out, conn, 32, &buf) == SHMRELAY_STATUS_OK) {
            int n = snprintf((char *)buf, 32, "%zu connected", room->count);
            shmrelay_commit(out, (size_t)n);
        }
        return;
    }
    if (len > 7 && memcmp(frame, "/upper ", 7) == 0) {
        /* A reply whose length is known up front: zero-copy, from the request ring to the
         * reply ring with nothing in between. */
        shmrelay_send_with(out, conn, len - 7, upper, (void *)(frame + 7));
        return;
    }
    if (len == 5 && memcmp(frame, "/quit", 5) == 0) {
        shmrelay_close(out, conn);
        return;
    }
    /* Pushes to other connections: the frame stays in place, each send copies it. */
    for (size_t i = 0; i < room->count; i++) {
        shmrelay_status s = shmrelay_send(out, room->members[i], frame, len);
        if (s != SHMRELAY_STATUS_OK && s != SHMRELAY_STATUS_TOO_LARGE) {
            fprintf(stderr, "chat: push: %s\n", shmrelay_last_error());
        }
    }
}

int main(void) {
    shmrelay_worker *w;
    if (shmrelay_worker_from_env(&w) != SHMRELAY_STATUS_OK) {
        fprintf(stderr, "chat: %s\n", shmrelay_last_error());
        return 2;
    }
    struct room room = {0};
    shmrelay_callbacks callbacks = {.on_open = on_open, .on_frame = on_frame, .on_close = on_close};
    struct pollfd bell = {.fd = shmrelay_worker_fd(w), .events = POLLIN};
    int code = 0;
    while (!shmrelay_stop_requested()) {
        size_t handled = 0;
        if (shmrelay_worker_poll_once(w, &callbacks, &room, &handled) != SHMRELAY_STATUS_OK) {
            fprintf(stderr, "chat: %s\n", shmrelay_last_error());
            code = 1;
            break;
        }
        if (handled > 0) continue;
        /* Idle: tell the fronts we are about to sleep, then wait for the doorbell (the 2 s
         * timeout only bounds how late a stop signal between the check and poll is seen). */
        int may_sleep = 0;
        if (shmrelay_worker_prepare_wait(w, &may_sleep) != SHMRELAY_STATUS_OK) {
            fprintf(stderr, "chat: %s\n", shmrelay_last_error());
            code = 1;
            break;
        }
        if (may_sleep && poll(&bell, 1, 2000) < 0 && errno != EINTR) perror("chat: poll");
        shmrelay_worker_finish_wait(w);
    }
    free(room.members);
    shmrelay_worker_free(w);
    return code;
}
