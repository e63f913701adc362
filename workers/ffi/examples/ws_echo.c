/* ws_echo: for a websocket listener (codec = "websocket"), each message back with its kind
 * (text as text, binary as binary). Each client is greeted with what its handshake carried
 * (shmrelay_upgrade_info in on_open). The text message "close CODE REASON" closes the
 * connection with that close code and reason; a code an endpoint may not send is refused with
 * a text message saying why, and the connection goes on. "upgrade?" answers "None": the
 * handshake fields exist only in on_open. The same worker as workers/python/examples/ws_echo.py.
 *   shmrelay --set codec=websocket --workers 1 --worker-cmd "/path/to/ws_echo" */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shmrelay_worker.h"

static void send_text(shmrelay_out *out, shmrelay_conn conn, const char *text) {
    shmrelay_send_kind(out, conn, SHMRELAY_MESSAGE_KIND_TEXT, (const uint8_t *)text,
                       strlen(text));
}

static void on_open(void *user, shmrelay_conn conn, const char *peer, size_t peer_len,
                    shmrelay_out *out) {
    (void)user;
    (void)peer;
    (void)peer_len;
    shmrelay_upgrade u;
    /* Borrowed like a frame: valid until this callback returns. This is where a worker would
     * refuse a client: shmrelay_close_with(out, conn, 4003, (const uint8_t *)"forbidden", 9). */
    if (shmrelay_upgrade_info(out, &u) != SHMRELAY_STATUS_OK) return; /* not a websocket */
    const char *fmt = "hello path=%.*s subprotocol=%.*s authorization=%.*s cookie=%.*s";
    size_t cap = strlen(fmt) + u.path_len + u.subprotocol_len + u.authorization_len +
                 u.cookie_len + 1;
    char *greeting = malloc(cap);
    if (!greeting) return;
    snprintf(greeting, cap, fmt, (int)u.path_len, (const char *)u.path, (int)u.subprotocol_len,
             (const char *)u.subprotocol, (int)u.authorization_len,
             (const char *)u.authorization, (int)u.cookie_len, (const char *)u.cookie);
    send_text(out, conn, greeting);
    free(greeting);
}

/* "close CODE REASON": closes with CODE and REASON, or answers why it cannot. */
static void close_command(shmrelay_out *out, shmrelay_conn conn, const uint8_t *arg,
                          size_t len) {
    unsigned long code = 0;
    size_t i = 0;
    for (; i < len && arg[i] >= '0' && arg[i] <= '9' && code <= 65535; i++)
        code = code * 10 + (arg[i] - '0');
    if (i == 0 || code > 65535 || (i < len && arg[i] != ' ')) {
        send_text(out, conn, "close refused: not a close code");
        return;
    }
    size_t skip = i < len ? i + 1 : i; /* the space before the reason */
    if (shmrelay_close_with(out, conn, (uint16_t)code, arg + skip, len - skip) !=
        SHMRELAY_STATUS_OK) {
        char why[512];
        snprintf(why, sizeof why, "close refused: %s", shmrelay_last_error());
        send_text(out, conn, why);
    }
}

static void on_frame(void *user, shmrelay_conn conn, const uint8_t *frame, size_t len,
                     bool redelivered, shmrelay_out *out) {
    (void)user;
    (void)redelivered;
    if (shmrelay_frame_kind(out) == SHMRELAY_MESSAGE_KIND_BINARY) {
        shmrelay_send_kind(out, conn, SHMRELAY_MESSAGE_KIND_BINARY, frame, len);
    } else if (len >= 6 && memcmp(frame, "close ", 6) == 0) {
        close_command(out, conn, frame + 6, len - 6);
    } else if (len == 8 && memcmp(frame, "upgrade?", 8) == 0) {
        shmrelay_upgrade u;
        send_text(out, conn, shmrelay_upgrade_info(out, &u) == SHMRELAY_STATUS_OK ? "Some" : "None");
    } else {
        /* Text was checked to be UTF-8 by the relay: the frame goes back as it is. */
        shmrelay_send_kind(out, conn, SHMRELAY_MESSAGE_KIND_TEXT, frame, len);
    }
}

int main(void) {
    shmrelay_worker *w;
    if (shmrelay_worker_from_env(&w) != SHMRELAY_STATUS_OK) {
        fprintf(stderr, "ws_echo: %s\n", shmrelay_last_error());
        return 2;
    }
    if (shmrelay_worker_codec(w) != SHMRELAY_CODEC_WEB_SOCKET)
        fprintf(stderr, "ws_echo: not a websocket listener: every message is binary\n");
    shmrelay_callbacks callbacks = {.on_open = on_open, .on_frame = on_frame};
    shmrelay_status s = shmrelay_worker_run(w, &callbacks, NULL);
    if (s != SHMRELAY_STATUS_OK) fprintf(stderr, "ws_echo: %s\n", shmrelay_last_error());
    shmrelay_worker_free(w);
    return s == SHMRELAY_STATUS_OK ? 0 : 1;
}
