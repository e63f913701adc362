/* kv: an in-memory key-value store, one command per frame (any codec whose frames are text,
 * e.g. a `line` listener, where each line is a command and each reply a line):
 *   SET key value   -> OK            (the value is the rest of the frame, spaces included)
 *   GET key         -> value, or (nil)
 *   DEL key         -> 1 if it existed, else 0
 *   anything else   -> ERR unknown command
 * Keys live in this worker: run one worker per listener (or route by key, as the relay does
 * for `resp`). Example:
 *   [[listener]]
 *   listen = "127.0.0.1:7000"
 *   codec = "line"
 *   worker_cmd = "/path/to/kv" */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shmrelay_worker.h"

struct entry {
    struct entry *next;
    size_t key_len, value_len;
    uint8_t *value;
    uint8_t key[]; /* key_len bytes */
};

#define BUCKETS 4096u

struct store {
    struct entry *buckets[BUCKETS];
};

static uint32_t hash(const uint8_t *key, size_t len) { /* FNV-1a */
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) h = (h ^ key[i]) * 16777619u;
    return h;
}

/* The link that points to the entry for `key` (or the NULL at the end of its bucket). */
static struct entry **find(struct store *s, const uint8_t *key, size_t len) {
    struct entry **e = &s->buckets[hash(key, len) % BUCKETS];
    while (*e && !((*e)->key_len == len && memcmp((*e)->key, key, len) == 0)) e = &(*e)->next;
    return e;
}

static void reply(shmrelay_out *out, shmrelay_conn conn, const char *text) {
    shmrelay_send(out, conn, (const uint8_t *)text, strlen(text));
}

static int set(struct store *s, const uint8_t *key, size_t key_len, const uint8_t *value,
               size_t value_len) {
    uint8_t *copy = malloc(value_len ? value_len : 1);
    if (!copy) return -1;
    memcpy(copy, value, value_len);
    struct entry **e = find(s, key, key_len);
    if (!*e) {
        struct entry *n = malloc(sizeof *n + key_len);
        if (!n) {
            free(copy);
            return -1;
        }
        n->next = NULL;
        n->key_len = key_len;
        n->value = NULL;
        memcpy(n->key, key, key_len);
        *e = n;
    }
    free((*e)->value);
    (*e)->value = copy;
    (*e)->value_len = value_len;
    return 0;
}

static void on_frame(void *user, shmrelay_conn conn, const uint8_t *frame, size_t len,
                     bool redelivered, shmrelay_out *out) {
    /* A redelivered SET or DEL is applied again: both are idempotent. */
    (void)redelivered;
    struct store *s = user;
    /* The frame is read in place: split it without copying. */
    const uint8_t *sp = memchr(frame, ' ', len);
    size_t cmd_len = sp ? (size_t)(sp - frame) : len;
    const uint8_t *key = sp ? sp + 1 : frame + len;
    size_t rest = (size_t)(frame + len - key);
    const uint8_t *sp2 = memchr(key, ' ', rest);
    size_t key_len = sp2 ? (size_t)(sp2 - key) : rest;
    if (cmd_len == 3 && memcmp(frame, "SET", 3) == 0 && sp2) {
        const uint8_t *value = sp2 + 1;
        size_t value_len = (size_t)(frame + len - value);
        reply(out, conn, set(s, key, key_len, value, value_len) == 0 ? "OK" : "ERR out of memory");
    } else if (cmd_len == 3 && memcmp(frame, "GET", 3) == 0 && sp && !sp2) {
        struct entry *e = *find(s, key, key_len);
        if (e) {
            shmrelay_send(out, conn, e->value, e->value_len);
        } else {
            reply(out, conn, "(nil)");
        }
    } else if (cmd_len == 3 && memcmp(frame, "DEL", 3) == 0 && sp && !sp2) {
        struct entry **link = find(s, key, key_len);
        struct entry *e = *link;
        bool existed = e != NULL;
        if (existed) {
            *link = e->next;
            free(e->value);
            free(e);
        }
        reply(out, conn, existed ? "1" : "0");
    } else {
        reply(out, conn, "ERR unknown command");
    }
}

int main(void) {
    shmrelay_worker *w;
    if (shmrelay_worker_from_env(&w) != SHMRELAY_STATUS_OK) {
        fprintf(stderr, "kv: %s\n", shmrelay_last_error());
        return 2;
    }
    static struct store store;
    shmrelay_callbacks callbacks = {.on_frame = on_frame};
    shmrelay_status s = shmrelay_worker_run(w, &callbacks, &store);
    if (s != SHMRELAY_STATUS_OK) fprintf(stderr, "kv: %s\n", shmrelay_last_error());
    shmrelay_worker_free(w);
    return s == SHMRELAY_STATUS_OK ? 0 : 1;
}
