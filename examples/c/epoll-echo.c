/*
 * epoll-echo: a plain C echo server for the shmrelay wire protocol, in one process and one
 * thread (the baseline the relay is measured against in tools/bench/compare.sh).
 *
 * Same semantics as the relay with its echo worker and as tokio-echo: each frame is a 4-byte
 * big-endian length and that many payload bytes; every frame is sent back byte for byte (so a
 * length-0 heartbeat is answered with a length-0 frame); a length above --max-frame closes
 * that connection after the whole frames before it were answered.
 *
 * Efficiency, as a careful hand-written server would do it: level-triggered epoll, one read
 * per wake-up into the connection's buffer, the whole run of complete frames written back
 * with one write straight from that buffer (no copy, no system call per frame), the partial
 * frame at the end moved to the front of the buffer. What the socket does not take waits in
 * the buffer, and the connection is not read again until it is out (TCP pushes back).
 *
 * Build: cc -O2 -o epoll-echo examples/c/epoll-echo.c
 * Usage: epoll-echo [--listen IP:PORT] [--max-frame BYTES] [--backlog N] [--procs N]
 *                   [--touch-pages K]
 * Prints "epoll-echo: listening on IP:PORT" (the real port when 0 was asked) once ready.
 * --procs N: N copies of the server in N processes, each with its own SO_REUSEPORT listening
 * socket on the same port (the kernel spreads connections over them), so the open-files limit
 * of one process does not cap it: the floor for a million held connections
 * (tools/bench/million_floor.sh). The copies die with the first process.
 * --touch-pages K: a probe, not a server feature: after every wake-up each process visits one
 * line in each of K private pages of its own, as if its loop used K more pages of memory per
 * wake (issue 15: what pages touched per wake cost when dozens of processes share two cores).
 * The visits are a chain (each line holds the next page's offset, in shuffled order), so the
 * misses come one after another, as a program's pointer-following does, not overlapped.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

/* Smallest buffer of a connection; it grows to hold the largest frame seen (and batches). */
#define MIN_BUF (8 * 1024)
#define BATCH_BUF (256 * 1024)

struct conn {
    int fd;
    unsigned char *buf;
    size_t cap;
    /* Bytes in buf: [0, out_end) are whole frames still to write (from out_pos), then
     * [out_end, len) the input not yet answered. */
    size_t len;
    size_t out_pos;
    size_t out_end;
    /* A frame over max_frame follows the frames being written: close once they are out. */
    int bad;
};

static uint32_t max_frame = 1u << 20;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void conn_close(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->buf);
    free(c);
}

static int watch(int ep, struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    return epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Writes buf[out_pos, out_end). Returns 1 when all is out, 0 when the socket is full, -1 on
 * error. */
static int flush(struct conn *c) {
    while (c->out_pos < c->out_end) {
        ssize_t n = write(c->fd, c->buf + c->out_pos, c->out_end - c->out_pos);
        if (n > 0) {
            c->out_pos += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return -1;
        }
    }
    /* Everything written: the unanswered rest moves to the front of the buffer. */
    size_t rest = c->len - c->out_end;
    if (rest > 0 && c->out_end > 0) memmove(c->buf, c->buf + c->out_end, rest);
    c->len = rest;
    c->out_pos = c->out_end = 0;
    return 1;
}

/* Marks the whole frames at the start of the unanswered input for writing. Returns -1 for a
 * frame over max_frame (after the frames before it), else the room the next frame needs. */
static long frames(struct conn *c, size_t *need) {
    size_t at = c->out_end;
    int bad = 0;
    while (c->len - at >= 4) {
        uint32_t n;
        memcpy(&n, c->buf + at, 4);
        n = ntohl(n);
        if (n > max_frame) {
            bad = 1;
            break;
        }
        if (c->len - at - 4 < n) {
            *need = 4 + (size_t)n;
            break;
        }
        at += 4 + (size_t)n;
    }
    c->out_end = at;
    return bad ? -1 : 0;
}

static void on_readable(int ep, struct conn *c) {
    if (c->out_pos < c->out_end) return; /* still writing: read once it is out */
    size_t need = 4;
    if (c->len == c->cap) {
        /* Full of a partial frame: grow to hold it (bounded by max_frame). */
        frames(c, &need);
        size_t cap = c->cap * 2 > need ? c->cap * 2 : need;
        unsigned char *b = realloc(c->buf, cap);
        if (!b) {
            conn_close(ep, c);
            return;
        }
        c->buf = b;
        c->cap = cap;
    }
    ssize_t n = read(c->fd, c->buf + c->len, c->cap - c->len);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        conn_close(ep, c);
        return;
    }
    if (n < 0) return;
    int grow = (size_t)n == c->cap - c->len && c->cap < BATCH_BUF;
    c->len += (size_t)n;
    int bad = frames(c, &need) < 0;
    int r = flush(c);
    if (r < 0 || (bad && r == 1)) {
        conn_close(ep, c);
        return;
    }
    if (r == 0) {
        /* The socket is full: wait for room (and stop reading). A bad frame closes once the
         * frames before it are out. */
        c->bad = bad;
        if (watch(ep, c, EPOLLOUT) < 0) conn_close(ep, c);
        return;
    }
    if (grow) {
        /* Reads keep filling the buffer: batch more per system call. */
        unsigned char *b = realloc(c->buf, c->cap * 2);
        if (b) {
            c->buf = b;
            c->cap *= 2;
        }
    }
}

static void on_writable(int ep, struct conn *c) {
    int r = flush(c);
    if (r < 0) {
        conn_close(ep, c);
        return;
    }
    if (r == 1) {
        if (c->bad) {
            conn_close(ep, c);
            return;
        }
        if (watch(ep, c, EPOLLIN | EPOLLRDHUP) < 0) conn_close(ep, c);
    }
}

static int reuseport;

static int listen_on(const char *spec, int backlog, int quiet) {
    char host[64];
    const char *colon = strrchr(spec, ':');
    if (!colon || (size_t)(colon - spec) >= sizeof host) {
        fprintf(stderr, "epoll-echo: --listen wants IP:PORT, got %s\n", spec);
        exit(2);
    }
    memcpy(host, spec, (size_t)(colon - spec));
    host[colon - spec] = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "epoll-echo: not an IPv4 address: %s\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
        die("SO_REUSEPORT");
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, backlog) < 0) die("listen");
    socklen_t alen = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &alen);
    if (quiet) return fd;
    printf("epoll-echo: listening on %s:%u (max frame %u bytes)\n", host, ntohs(a.sin_port),
           max_frame);
    fflush(stdout);
    return fd;
}

int main(int argc, char **argv) {
    const char *spec = "127.0.0.1:7880";
    int backlog = 4096;
    int procs = 1;
    int touch_pages = 0;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "--listen") == 0) {
            spec = argv[++i];
        } else if (i + 1 < argc && strcmp(argv[i], "--max-frame") == 0) {
            max_frame = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (i + 1 < argc && strcmp(argv[i], "--backlog") == 0) {
            backlog = atoi(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--procs") == 0) {
            procs = atoi(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--touch-pages") == 0) {
            touch_pages = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: epoll-echo [--listen IP:PORT] [--max-frame BYTES] [--backlog N] [--procs N] "
                            "[--touch-pages K]\n");
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    reuseport = procs > 1;
    int lfd = listen_on(spec, backlog, 0);
    if (procs > 1) {
        /* The copies bind the port the first socket got (port 0 picks one). */
        struct sockaddr_in a;
        socklen_t alen = sizeof a;
        getsockname(lfd, (struct sockaddr *)&a, &alen);
        char port_spec[80];
        snprintf(port_spec, sizeof port_spec, "%s:%u", inet_ntoa(a.sin_addr), ntohs(a.sin_port));
        pid_t parent = getpid();
        for (int p = 1; p < procs; p++) {
            pid_t pid = fork();
            if (pid < 0) die("fork");
            if (pid == 0) {
                prctl(PR_SET_PDEATHSIG, SIGTERM);
                if (getppid() != parent) _exit(0);
                close(lfd);
                lfd = listen_on(port_spec, backlog, 1);
                break;
            }
        }
    }
    /* Allocated after the fork: every process has pages of its own. A shuffled cycle through
     * them, line k % 64 of page k (so the K lines do not compete for one cache set) holding
     * the next one's offset. */
    volatile unsigned char *pages = NULL;
    if (touch_pages > 0) {
        pages = calloc((size_t)touch_pages, 4096);
        if (!pages) die("calloc");
        size_t *order = malloc((size_t)touch_pages * sizeof *order);
        if (!order) die("malloc");
        for (int k = 0; k < touch_pages; k++) order[k] = (size_t)k;
        srand((unsigned)getpid());
        for (int k = touch_pages - 1; k > 0; k--) {
            int j = rand() % (k + 1);
            size_t t = order[k];
            order[k] = order[j];
            order[j] = t;
        }
        for (int k = 0; k < touch_pages; k++) {
            size_t at = order[k] * 4096 + (order[k] % 64) * 64;
            size_t next = order[(k + 1) % touch_pages];
            *(volatile size_t *)(pages + at) = next * 4096 + (next % 64) * 64;
        }
        free(order);
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl");
    struct epoll_event evs[1024];
    for (;;) {
        int n = epoll_wait(ep, evs, 1024, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        size_t at = 0;
        for (int k = 0; k < touch_pages; k++) {
            at = *(volatile size_t *)(pages + at); /* the next page, known only now */
            pages[at + 8]++;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break; /* EAGAIN, or out of fds: the next event retries */
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (c) c->buf = malloc(MIN_BUF);
                    if (!c || !c->buf) {
                        if (c) free(c);
                        close(fd);
                        continue;
                    }
                    c->fd = fd;
                    c->cap = MIN_BUF;
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev) < 0) {
                        close(fd);
                        free(c->buf);
                        free(c);
                    }
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                on_writable(ep, c);
            } else if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                on_readable(ep, c);
            }
        }
    }
}
