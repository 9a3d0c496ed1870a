/* loadgen.c: the bench's load generator. One process, epoll, non-blocking sockets,
 * loopback only (every connection goes to 127.0.0.1).
 *
 *   loadgen -m cycles   -p PROXY -o ORIGIN -c CLIENTS -d SECONDS
 *       CLIENTS concurrent clients, each repeating for SECONDS: connect, CONNECT
 *       127.0.0.1:ORIGIN, read the 200, GET / through the tunnel, read the whole answer,
 *       close. With PROXY 0 there is no proxy: connect to ORIGIN and GET / directly.
 *   loadgen -m download -p PROXY -o ORIGIN -u PATH -d SECONDS
 *       one cycle that GETs PATH and reads its body to nowhere (SECONDS bounds it).
 *   loadgen -m hold     -p PROXY -o ORIGIN -n COUNT -c OPENING -d SECONDS
 *       opens COUNT idle tunnels, at most OPENING being opened at once, prints a line,
 *       holds them until stdin closes (or SECONDS pass), prints a second line, exits.
 *
 * Every result is one JSON line on stdout. Every loop is bounded by a deadline.
 */
#define _GNU_SOURCE
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
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX 8192           /* a response head larger than this is an error */
#define SCRATCH_SIZE (1 << 20)  /* body bytes are read here and dropped */
#define MAX_SAMPLES 20000000    /* latency samples kept; cycles beyond are counted only */
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

struct stats {
    long done;
    long errors;
    char first_error[160];
    double *samples;
    long nsamples;
    long cap;
    unsigned long long answer_bytes;
};

static struct options opt = {"cycles", 0, 0, 50, 1000, 10.0, "/"};
static struct stats st;
static char scratch[SCRATCH_SIZE];
static int epfd;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* Count an error; keep the first one's text, made safe to print inside a JSON string. */
static void note_error(const char *fmt, ...) {
    st.errors++;
    if (st.first_error[0] != '\0') return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st.first_error, sizeof st.first_error, fmt, ap);
    va_end(ap);
    for (char *p = st.first_error; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e) *p = '?';
}

static void record_latency(double seconds) {
    if (st.nsamples == st.cap) {
        if (st.cap >= MAX_SAMPLES) return;
        st.cap = st.cap ? st.cap * 2 : 65536;
        st.samples = realloc(st.samples, st.cap * sizeof *st.samples);
        if (!st.samples) die("realloc");
    }
    st.samples[st.nsamples++] = seconds;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

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
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    addr.sin_port = htons(opt.proxy_port ? opt.proxy_port : opt.origin_port);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        note_error("socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->started = now();
    c->len = c->need = 0;
    c->state = CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        note_error("connect: %s", strerror(errno));
        close_conn(c);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
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

static long content_length(const char *head, const char *end) {
    for (const char *line = strstr(head, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "content-length:", 15) == 0) return strtol(line + 17, NULL, 10);
    }
    return -1;
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
static int on_event(struct conn *c) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            note_error("connect: %s", strerror(err));
            return -1;
        }
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
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
        return 0;
    }
    if (c->state == HELD) {
        note_error("held tunnel closed or spoke");
        return -1;
    }
    int r = read_step(c);
    if (r <= 0) return r;
    if (c->state == TUNNEL_REPLY) {
        if (!strcmp(opt.mode, "hold")) {
            c->state = HELD;
            return 1;
        }
        if (send_get(c) < 0) goto send_failed;
        return read_step(c);
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

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile_ms(double p) {
    if (st.nsamples == 0) return 0.0;
    long rank = (long)(p / 100.0 * st.nsamples + 0.999999);
    if (rank < 1) rank = 1;
    return st.samples[rank - 1] * 1000.0;
}

/* Repeat cycles on CLIENTS connections until SECONDS pass or LIMIT cycles ended. */
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
            int r = on_event(c);
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
    qsort(st.samples, st.nsamples, sizeof *st.samples, cmp_double);
    printf("{\"cycles\": %ld, \"errors\": %ld, \"unfinished\": %ld, \"seconds\": %.6f, "
           "\"p50_ms\": %.4f, \"p99_ms\": %.4f, \"answer_bytes\": %llu, \"first_error\": \"%s\"}\n",
           st.done, st.errors, unfinished, elapsed, percentile_ms(50), percentile_ms(99),
           st.answer_bytes, st.first_error);
}

static void run_hold(void) {
    struct conn *conns = calloc(opt.count, sizeof *conns);
    struct epoll_event evs[MAX_EVENTS];
    if (!conns) die("calloc");
    for (int i = 0; i < opt.count; i++) conns[i].fd = -1;
    double begin = now(), deadline = begin + opt.seconds;
    int started = 0, opening = 0;
    long held = 0;
    while (started < opt.count || opening > 0) {
        if (now() >= deadline) break;
        while (opening < opt.clients && started < opt.count)
            if (start_conn(&conns[started++]) == 0) opening++;
        int n = wait_events(evs);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            int was_held = c->state == HELD;
            int r = on_event(c);
            if (r == 0) continue;
            if (!was_held) opening--;
            if (r > 0) {
                held++;
                continue;
            }
            if (was_held) held--;
            close_conn(c);
        }
    }
    printf("{\"open\": %ld, \"errors\": %ld, \"seconds\": %.6f, \"first_error\": \"%s\"}\n",
           held, st.errors, now() - begin, st.first_error);
    fflush(stdout);

    /* Hold until stdin closes or a line arrives; count tunnels that end meanwhile. */
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0) die("epoll_ctl stdin");
    long closed = 0;
    int released = 0;
    deadline = now() + opt.seconds;
    while (!released && now() < deadline) {
        int n = wait_events(evs);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                released = 1;
                continue;
            }
            if (c->state == HELD) closed++;
            close_conn(c);
        }
    }
    printf("{\"closed_while_held\": %ld, \"released\": %s}\n", closed, released ? "true" : "false");
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
