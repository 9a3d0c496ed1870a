/* loadgen.c: the bench's load generator. One process, epoll, non-blocking sockets,
 * loopback only (every connection goes to 127.0.0.1).
 *
 *   loadgen -m cycles   -p PROXY -o ORIGIN -c CLIENTS -d SECONDS
 *       CLIENTS concurrent clients, each repeating for SECONDS: connect, CONNECT
 *       127.0.0.1:ORIGIN, read the 200, GET / through the tunnel, read the whole answer,
 *       close. With PROXY 0 there is no proxy: connect to ORIGIN and GET / directly.
 *       Each cycle's time, connect() to the answer's last byte, goes into a histogram of
 *       1 us buckets up to 1 s (slower cycles count in the last one): p50 and p99 from it.
 *   loadgen -m download -p PROXY -o ORIGIN -u PATH -d SECONDS
 *       one cycle that GETs PATH and reads its body to nowhere (SECONDS bounds it).
 *   loadgen -m hold     -p PROXY -o ORIGIN -n MAX -c OPENING -d SECONDS
 *       idle tunnels, opened in steps: each line "N" on stdin opens tunnels until N are
 *       open (at most MAX, at most OPENING being opened at once, SECONDS per step) and
 *       prints a line; at the end of stdin it closes them all, prints a last line, exits.
 *       The whole run is bounded by an alarm of 3 x SECONDS + 60 s.
 *
 * Every result is one JSON line on stdout, with the CPU seconds the generator itself used
 * ("cpu_s"). Every loop is bounded by a deadline.
 */
#define _GNU_SOURCE
#define PROG "loadgen"
#include "loadcommon.h"
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 512
#define TICK_MS 50

enum state { IDLE, CONNECTING, TUNNEL_REPLY, RESPONSE, HELD };

struct conn {
    int fd;
    enum state state;
    double started;
    size_t len;     /* bytes of the current answer received so far */
    size_t need;    /* total bytes of the answer (head + body); 0 until the head is parsed */
    char head[HEAD_MAX];
};

struct options {
    const char *mode;
    int proxy_port;   /* 0: no proxy */
    int origin_port;
    int clients;
    int count;
    double seconds;
    const char *path;
};


static struct options opt = {"cycles", 0, 0, 50, 1000, 10.0, "/"};
static int epfd;

static int send_all(int fd, const char *buf, size_t len) {
    /* A fresh loopback socket's send buffer always takes a request this small at once. */
    ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
    return n == (ssize_t)len ? 0 : -1;
}

static void close_conn(struct conn *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = IDLE;
}

static int start_conn(struct conn *c) {
    c->started = now();
    c->len = c->need = 0;
    c->state = CONNECTING;
    c->fd = open_loopback(epfd, opt.proxy_port ? opt.proxy_port : opt.origin_port, c);
    if (c->fd < 0) {
        c->state = IDLE;
        return -1;
    }
    return 0;
}

static int send_get(struct conn *c) {
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n",
                     opt.path, opt.origin_port);
    c->len = c->need = 0;
    c->state = RESPONSE;
    return send_all(c->fd, req, n);
}

/* The end of the head in c->head, or NULL while it is incomplete. */
static char *head_end(struct conn *c) {
    return memmem(c->head, c->len, "\r\n\r\n", 4);
}

static int status_is_200(struct conn *c) {
    int ok = c->len >= 12 && memcmp(c->head, "HTTP/1.", 7) == 0 && memcmp(c->head + 8, " 200", 4) == 0;
    if (!ok) {
        char *eol = memchr(c->head, '\r', c->len);
        int n = eol ? (int)(eol - c->head) : (int)(c->len < 60 ? c->len : 60);
        note_error("answer was: %.*s", n, c->head);
    }
    return ok;
}

/* Read what is there. Returns 1 when the current step is complete, 0 to wait, -1 on error. */
static int read_step(struct conn *c) {
    for (;;) {
        int in_head = c->need == 0;
        char *dst = in_head ? c->head + c->len : scratch;
        size_t room = in_head ? HEAD_MAX - 1 - c->len : SCRATCH_SIZE;
        if (room == 0) {
            note_error("answer head over %d bytes", HEAD_MAX);
            return -1;
        }
        ssize_t n = recv(c->fd, dst, room, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            note_error("recv: %s", strerror(errno));
            return -1;
        }
        if (n == 0) {
            note_error("closed by peer after %zu bytes of the answer", c->len);
            return -1;
        }
        c->len += n;
        if (in_head) {
            c->head[c->len] = '\0';
            char *end = head_end(c);
            if (!end) continue;
            if (!status_is_200(c)) return -1;
            size_t head_len = end + 4 - c->head;
            if (c->state == TUNNEL_REPLY) {
                if (c->len != head_len) {
                    note_error("bytes after the CONNECT answer");
                    return -1;
                }
                return 1;
            }
            long body = content_length(c->head, end);
            if (body < 0) {
                note_error("answer without Content-Length");
                return -1;
            }
            c->need = head_len + body;
        }
        if (c->need && c->len >= c->need) {
            if (c->len > c->need) {
                note_error("more bytes than Content-Length");
                return -1;
            }
            st.answer_bytes += c->need;
            return 1;
        }
    }
}

/* Handle one event. Returns 1 when the cycle is done, 0 to wait, -1 on error. */
static int on_event(struct conn *c, uint32_t events) {
    if (c->state == CONNECTING) {
        if (events & (EPOLLERR | EPOLLHUP)) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            note_error("connect: %s", strerror(err ? err : ECONNRESET));
            return -1;
        }
        if (!(events & EPOLLOUT)) return 0;
        char req[256];
        int n;
        if (opt.proxy_port) {
            n = snprintf(req, sizeof req, "CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n",
                         opt.origin_port, opt.origin_port);
            c->state = TUNNEL_REPLY;
            if (send_all(c->fd, req, n) < 0) goto send_failed;
        } else if (send_get(c) < 0) {
            goto send_failed;
        }
        return 0;
    }
    if (c->state == HELD) {
        if (!(events & ~(uint32_t)EPOLLOUT)) return 0;  /* only room to write: still idle */
        note_error("held tunnel closed or spoke");
        return -1;
    }
    if (!(events & ~(uint32_t)EPOLLOUT)) return 0;  /* nothing to read yet */
    int r = read_step(c);
    if (r <= 0) return r;
    if (c->state == TUNNEL_REPLY) {
        if (!strcmp(opt.mode, "hold")) {
            c->state = HELD;
            return 1;
        }
        /* Its answer comes with a new edge: nothing to read before it. */
        return send_get(c) < 0 ? (note_error("send: %s", strerror(errno)), -1) : 0;
    }
    return 1;
send_failed:
    note_error("send: %s", strerror(errno));
    return -1;
}

static int wait_events(struct epoll_event *evs) {
    int n = epoll_wait(epfd, evs, MAX_EVENTS, TICK_MS);
    if (n < 0 && errno != EINTR) die("epoll_wait");
    return n < 0 ? 0 : n;
}

static void run_cycles(int clients, long limit) {
    struct conn *conns = calloc(clients, sizeof *conns);
    struct epoll_event evs[MAX_EVENTS];
    if (!conns) die("calloc");
    double begin = now(), deadline = begin + opt.seconds;
    for (int i = 0; i < clients; i++) conns[i].fd = -1;
    long unfinished = 0;
    long begun = 0;
    while (now() < deadline && st.done + st.errors < limit) {
        for (int i = 0; i < clients && begun < limit; i++)
            if (conns[i].state == IDLE && start_conn(&conns[i]) == 0) begun++;
        int n = wait_events(evs);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            int r = on_event(c, evs[i].events);
            if (r == 0) continue;
            if (r > 0) {
                st.done++;
                record_latency(now() - c->started);
            }
            close_conn(c);
        }
    }
    double elapsed = now() - begin;
    for (int i = 0; i < clients; i++) {
        if (conns[i].state != IDLE) unfinished++;
        close_conn(&conns[i]);
    }
    printf("{\"cycles\": %ld, \"errors\": %ld, \"unfinished\": %ld, \"seconds\": %.6f, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"answer_bytes\": %llu, \"cpu_s\": %.3f, "
           "\"first_error\": \"%s\"}\n",
           st.done, st.errors, unfinished, elapsed, percentile_ms(50), percentile_ms(99),
           st.answer_bytes, cpu_seconds(), st.first_error);
}

/* Start tunnels from conns[*started] on until `target` were started and each is open or has
 * failed, or SECONDS pass. Held tunnels that close or speak meanwhile are counted in
 * *closed. Returns the number held. */
static long open_until(struct conn *conns, int *started, int target, long held, long *closed) {
    struct epoll_event evs[MAX_EVENTS];
    double deadline = now() + opt.seconds;
    int opening = 0;
    while ((*started < target || opening > 0) && now() < deadline) {
        while (opening < opt.clients && *started < target)
            if (start_conn(&conns[(*started)++]) == 0) opening++;
        int n = wait_events(evs);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            int was_held = c->state == HELD;
            int r = on_event(c, evs[i].events);
            if (r == 0) continue;
            if (!was_held) opening--;
            if (r > 0) {
                held++;
                continue;
            }
            if (was_held) {
                held--;
                (*closed)++;
            }
            close_conn(c);
        }
    }
    return held;
}

/* Held tunnels that closed or spoke since the last look (each is closed and counted). */
static long sweep_held(void) {
    struct epoll_event evs[MAX_EVENTS];
    long closed = 0;
    for (int round = 0; round < 1000; round++) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, 0);
        if (n <= 0) break;
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!(evs[i].events & ~(uint32_t)EPOLLOUT)) continue;  /* still idle */
            if (c->state == HELD) closed++;
            close_conn(c);
        }
    }
    return closed;
}

static void run_hold(void) {
    struct conn *conns = calloc(opt.count, sizeof *conns);
    if (!conns) die("calloc");
    for (int i = 0; i < opt.count; i++) conns[i].fd = -1;
    alarm((unsigned)(3 * opt.seconds) + 60);  /* the whole run's bound, whatever stdin does */
    long held = 0, closed = 0;
    int started = 0;
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        int target = atoi(line);
        if (target > opt.count) target = opt.count;
        double begin = now();
        long gone = sweep_held();
        held -= gone;
        closed += gone;
        held = open_until(conns, &started, target, held, &closed);
        printf("{\"open\": %ld, \"errors\": %ld, \"closed_while_held\": %ld, \"seconds\": %.3f, "
               "\"cpu_s\": %.3f, \"first_error\": \"%s\"}\n",
               held, st.errors, closed, now() - begin, cpu_seconds(), st.first_error);
        fflush(stdout);
    }
    closed += sweep_held();
    printf("{\"closed_while_held\": %ld, \"released\": true}\n", closed);
    for (int i = 0; i < opt.count; i++) close_conn(&conns[i]);
}

int main(int argc, char **argv) {
    int ch;
    while ((ch = getopt(argc, argv, "m:p:o:c:n:d:u:")) != -1) {
        switch (ch) {
            case 'm': opt.mode = optarg; break;
            case 'p': opt.proxy_port = atoi(optarg); break;
            case 'o': opt.origin_port = atoi(optarg); break;
            case 'c': opt.clients = atoi(optarg); break;
            case 'n': opt.count = atoi(optarg); break;
            case 'd': opt.seconds = atof(optarg); break;
            case 'u': opt.path = optarg; break;
            default: fprintf(stderr, "usage: see the comment at the top of loadgen.c\n"); return 2;
        }
    }
    if (opt.origin_port <= 0 || opt.clients <= 0 || opt.count <= 0 || opt.seconds <= 0) {
        fprintf(stderr, "loadgen: -o ORIGIN is required; -c, -n and -d must be positive\n");
        return 2;
    }
    raise_nofile();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    if (!strcmp(opt.mode, "cycles")) {
        run_cycles(opt.clients, LONG_MAX);
    } else if (!strcmp(opt.mode, "download")) {
        run_cycles(1, 1);
    } else if (!strcmp(opt.mode, "hold")) {
        if (!opt.proxy_port) {
            fprintf(stderr, "loadgen: hold needs -p PROXY\n");
            return 2;
        }
        run_hold();
    } else {
        fprintf(stderr, "loadgen: unknown mode %s\n", opt.mode);
        return 2;
    }
    return 0;
}
