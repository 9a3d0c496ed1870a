/* tlsgen.c: the bench's load generator for TLS listeners, HTTP/1.1. One process, epoll,
 * non-blocking sockets, OpenSSL; loopback only (every connection goes to 127.0.0.1).
 *
 *   tlsgen -m cycles   -p TLSPORT -o ORIGIN -a CAFILE -c CLIENTS -d SECONDS
 *       CLIENTS concurrent clients, each repeating for SECONDS: connect to TLSPORT, a full
 *       TLS handshake (the certificate checked against CAFILE), CONNECT 127.0.0.1:ORIGIN,
 *       read the 200, GET / through the tunnel (plain HTTP inside), read the whole answer,
 *       close_notify, close. With ORIGIN 0, TLSPORT is a TLS server that answers GET /
 *       itself (the direct check): connect, handshake, GET /, read, close.
 *       Each cycle's time, connect() to the answer's last byte: p50 and p99 from a histogram
 *       of 1 us buckets up to 1 s.
 *   tlsgen -m download -p TLSPORT -o ORIGIN -a CAFILE -u PATH -d SECONDS
 *       one such cycle that GETs PATH and reads its body to nowhere (SECONDS bounds it).
 *   tlsgen -m hold     -p TLSPORT -o ORIGIN -a CAFILE -n MAX -c OPENING -d SECONDS
 *       tunnels held open, one TLS connection each, each after one small exchange (CONNECT,
 *       200, GET /, its answer). Commands on stdin, one JSON line on stdout for each:
 *         N            open tunnels until N are open (at most MAX, OPENING being opened at
 *                      once, SECONDS at most)
 *         get PATH K   on K of the open tunnels at once, GET PATH and read its answer
 *       At the end of stdin it closes them all, prints a last line and exits. The whole run
 *       is bounded by an alarm of 3 x SECONDS + 60 s.
 *
 * Every result is one JSON line with the CPU seconds the generator itself used ("cpu_s") and
 * what the TLS session agreed on ("tls"). Every loop is bounded by a deadline.
 */
#define PROG "tlsgen"
#include "tlsload.h"

#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 512
#define TICK_MS 50

enum state { IDLE, CONNECTING, HANDSHAKE, SENDING, READING, HELD };

struct conn {
    int fd;
    SSL *ssl;
    enum state state;
    int in_tunnel;      /* the CONNECT was answered: the next answer is the GET's */
    int keep;           /* hold mode: back to HELD after an answer instead of closing */
    double started;
    char out[512];      /* the request being sent */
    size_t out_len, out_sent;
    struct answer ans;
};

struct options {
    const char *mode;
    int tls_port;
    int origin_port;  /* 0: the TLS server answers GET itself */
    const char *cafile;
    int clients;
    int count;
    double seconds;
    const char *path;
};

static struct options opt = {"cycles", 0, 0, NULL, 50, 1000, 10.0, "/"};
static SSL_CTX *ctx;
static int epfd;
static char session[96];  /* what the first session agreed on */

/* Close; `notify`: say close_notify first (without waiting for the server's), as a client
 * that is done does. */
static void close_conn(struct conn *c, int notify) {
    if (c->ssl) {
        if (notify) {
            SSL_shutdown(c->ssl);
            ERR_clear_error();
        }
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = IDLE;
}

static int start_conn(struct conn *c) {
    c->started = now();
    c->in_tunnel = 0;
    c->state = CONNECTING;
    c->fd = open_loopback(epfd, opt.tls_port, c);
    if (c->fd < 0) {
        c->state = IDLE;
        return -1;
    }
    c->ssl = SSL_new(ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) die("SSL_new");
    SSL_set_connect_state(c->ssl);
    return 0;
}

/* Queue the next request: the CONNECT, or a GET of `path` (through the tunnel, or direct). */
static void queue_request(struct conn *c, const char *path) {
    int n;
    if (opt.origin_port && !c->in_tunnel)
        n = snprintf(c->out, sizeof c->out, "CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n",
                     opt.origin_port, opt.origin_port);
    else
        n = snprintf(c->out, sizeof c->out, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n",
                     path, opt.origin_port ? opt.origin_port : opt.tls_port);
    c->out_len = n;
    c->out_sent = 0;
    answer_reset(&c->ans, opt.origin_port && !c->in_tunnel);
    c->state = SENDING;
}

/* An OpenSSL call returned r <= 0: 0 when it waits for the socket, -1 on error (counted). */
static int ssl_wait(struct conn *c, int r, const char *step) {
    int err = SSL_get_error(c->ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return 0;
    if (err == SSL_ERROR_ZERO_RETURN) note_error("%s: closed by the server (close_notify)", step);
    else if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)
        note_error("%s: %s", step, errno ? strerror(errno) : "closed by the server");
    else note_error("%s: %s", step, ssl_reason());
    ERR_clear_error();
    return -1;
}

/* Drive the connection as far as it goes. 1: an answer is complete (the cycle, or in hold
 * mode the exchange), 0: it waits for the socket, -1: error (counted). */
static int advance(struct conn *c) {
    for (;;) {
        switch (c->state) {
        case HANDSHAKE: {
            ERR_clear_error();
            int r = SSL_do_handshake(c->ssl);
            if (r <= 0) return ssl_wait(c, r, "handshake");
            if (!session[0]) describe_session(c->ssl, session, sizeof session);
            queue_request(c, opt.path);
            break;
        }
        case SENDING:
            while (c->out_sent < c->out_len) {
                ERR_clear_error();
                int r = SSL_write(c->ssl, c->out + c->out_sent, (int)(c->out_len - c->out_sent));
                if (r <= 0) return ssl_wait(c, r, "send");
                c->out_sent += r;
            }
            c->state = READING;
            break;
        case READING: {
            ERR_clear_error();
            int r = SSL_read(c->ssl, scratch, SCRATCH_SIZE);
            if (r <= 0) return ssl_wait(c, r, c->ans.connect_reply ? "CONNECT answer" : "answer");
            int done = answer_feed(&c->ans, scratch, r);
            if (done < 0) return -1;
            if (done == 0) break;
            if (c->ans.connect_reply) {
                c->in_tunnel = 1;
                queue_request(c, c->keep ? "/" : opt.path);  /* hold: the small exchange */
                break;
            }
            if (c->keep) c->state = HELD;
            return 1;
        }
        case HELD: {
            /* Nothing is due: a read finds only what TLS itself sends (a session ticket). */
            ERR_clear_error();
            int r = SSL_read(c->ssl, scratch, SCRATCH_SIZE);
            if (r > 0) {
                note_error("held tunnel spoke");
                return -1;
            }
            return ssl_wait(c, r, "held tunnel") < 0 ? -1 : 0;
        }
        default:
            return 0;
        }
    }
}

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
        c->state = HANDSHAKE;
    }
    if (c->state == HELD && !(events & ~(uint32_t)EPOLLOUT)) return 0;  /* only room to write */
    return advance(c);
}

static int wait_events(struct epoll_event *evs) {
    int n = epoll_wait(epfd, evs, MAX_EVENTS, TICK_MS);
    if (n < 0 && errno != EINTR) die("epoll_wait");
    return n < 0 ? 0 : n;
}

/* Repeat cycles on CLIENTS connections until SECONDS pass or LIMIT cycles ended. */
static void run_cycles(int clients, long limit) {
    struct conn *conns = calloc(clients, sizeof *conns);
    struct epoll_event evs[MAX_EVENTS];
    if (!conns) die("calloc");
    double begin = now(), deadline = begin + opt.seconds;
    for (int i = 0; i < clients; i++) conns[i].fd = -1;
    long unfinished = 0, begun = 0;
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
            close_conn(c, r > 0);
        }
    }
    double elapsed = now() - begin;
    for (int i = 0; i < clients; i++) {
        if (conns[i].state != IDLE) unfinished++;
        close_conn(&conns[i], 0);
    }
    printf("{\"cycles\": %ld, \"errors\": %ld, \"unfinished\": %ld, \"seconds\": %.6f, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"answer_bytes\": %llu, \"cpu_s\": %.3f, "
           "\"tls\": \"%s\", \"first_error\": \"%s\"}\n",
           st.done, st.errors, unfinished, elapsed, percentile_ms(50), percentile_ms(99),
           st.answer_bytes, cpu_seconds(), session, st.first_error);
}

/* --- hold: tunnels opened in steps, then asked for a body each ------------------------- */

/* Open tunnels from conns[*started] on until `target` were started and each is held or has
 * failed, or SECONDS pass. Held ones that close meanwhile are counted in *closed. */
static long open_until(struct conn *conns, int *started, int target, long held, long *closed) {
    struct epoll_event evs[MAX_EVENTS];
    double deadline = now() + opt.seconds;
    int opening = 0;
    while ((*started < target || opening > 0) && now() < deadline) {
        while (opening < opt.clients && *started < target) {
            struct conn *c = &conns[(*started)++];
            c->keep = 1;
            if (start_conn(c) == 0) opening++;
        }
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
            close_conn(c, 0);
        }
    }
    return held;
}

/* Count the answers still awaited at the deadline as errors, the first with how far it got:
 * a stall, the proxy's or ours, is then told apart by where the bytes are. */
static void note_stuck(struct conn *conns, int started, long busy) {
    for (int i = 0; i < started; i++) {
        struct conn *c = &conns[i];
        if (c->state != SENDING && c->state != READING) continue;
        int queued = -1;
        ioctl(c->fd, FIONREAD, &queued);
        note_error("%ld answers not done in %.0f s; one has %zu of %zu bytes (0: head not read), "
                   "TLS pending %d (has %d), %d in the socket", busy, opt.seconds, c->ans.len,
                   c->ans.need, SSL_pending(c->ssl), SSL_has_pending(c->ssl), queued);
        st.errors += busy - 1;
        return;
    }
}

/* On `count` held tunnels at once: GET opt.path and read the answer. Returns those done. */
static long get_on_held(struct conn *conns, int started, long count, long *closed) {
    struct epoll_event evs[MAX_EVENTS];
    double deadline = now() + opt.seconds;
    long asked = 0, busy = 0, done = 0;
    for (int i = 0; i < started && asked < count; i++) {
        struct conn *c = &conns[i];
        if (c->state != HELD) continue;
        queue_request(c, opt.path);
        asked++;
        int r = advance(c);  /* a client held up long enough may find the whole answer here */
        if (r == 0) {
            busy++;
        } else if (r > 0) {
            done++;
        } else {
            (*closed)++;
            close_conn(c, 0);
        }
    }
    while (busy > 0 && now() < deadline) {
        int n = wait_events(evs);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            int was_held = c->state == HELD;
            int r = on_event(c, evs[i].events);
            if (r == 0) continue;
            if (!was_held) busy--;
            if (r > 0) {
                done++;
                continue;
            }
            (*closed)++;
            close_conn(c, 0);
        }
    }
    if (busy > 0) note_stuck(conns, started, busy);
    return done;
}

static long count_held(struct conn *conns, int started) {
    long held = 0;
    for (int i = 0; i < started; i++) held += conns[i].state == HELD;
    return held;
}

static void run_hold(void) {
    struct conn *conns = calloc(opt.count, sizeof *conns);
    if (!conns) die("calloc");
    for (int i = 0; i < opt.count; i++) conns[i].fd = -1;
    alarm((unsigned)(3 * opt.seconds) + 60);  /* the whole run's bound, whatever stdin does */
    long closed = 0;
    int started = 0;
    char line[256], path[200];
    long count;
    while (fgets(line, sizeof line, stdin)) {
        double begin = now();
        unsigned long long bytes_before = st.answer_bytes;
        if (sscanf(line, "get %199s %ld", path, &count) == 2) {
            opt.path = path;
            long done = get_on_held(conns, started, count, &closed);
            printf("{\"done\": %ld, \"bytes\": %llu, \"open\": %ld, \"errors\": %ld, "
                   "\"seconds\": %.3f, \"cpu_s\": %.3f, \"first_error\": \"%s\"}\n",
                   done, st.answer_bytes - bytes_before, count_held(conns, started), st.errors,
                   now() - begin, cpu_seconds(), st.first_error);
        } else {
            int target = atoi(line);
            if (target > opt.count) target = opt.count;
            long held = open_until(conns, &started, target, count_held(conns, started), &closed);
            printf("{\"open\": %ld, \"errors\": %ld, \"closed_while_held\": %ld, "
                   "\"seconds\": %.3f, \"cpu_s\": %.3f, \"tls\": \"%s\", \"first_error\": \"%s\"}\n",
                   held, st.errors, closed, now() - begin, cpu_seconds(), session, st.first_error);
        }
        fflush(stdout);
    }
    printf("{\"closed_while_held\": %ld, \"released\": true}\n", closed);
    for (int i = 0; i < opt.count; i++) close_conn(&conns[i], conns[i].state == HELD);
}

int main(int argc, char **argv) {
    int ch;
    while ((ch = getopt(argc, argv, "m:p:o:a:c:n:d:u:")) != -1) {
        switch (ch) {
            case 'm': opt.mode = optarg; break;
            case 'p': opt.tls_port = atoi(optarg); break;
            case 'o': opt.origin_port = atoi(optarg); break;
            case 'a': opt.cafile = optarg; break;
            case 'c': opt.clients = atoi(optarg); break;
            case 'n': opt.count = atoi(optarg); break;
            case 'd': opt.seconds = atof(optarg); break;
            case 'u': opt.path = optarg; break;
            default: fprintf(stderr, "usage: see the comment at the top of tlsgen.c\n"); return 2;
        }
    }
    if (opt.tls_port <= 0 || !opt.cafile || opt.clients <= 0 || opt.count <= 0 || opt.seconds <= 0) {
        fprintf(stderr, "tlsgen: -p TLSPORT and -a CAFILE are required; -c, -n and -d must be positive\n");
        return 2;
    }
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);  /* a server that closed first: an error to count, not a death */
    ctx = client_context(opt.cafile, NULL, 0);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    if (!strcmp(opt.mode, "cycles")) {
        run_cycles(opt.clients, LONG_MAX);
    } else if (!strcmp(opt.mode, "download")) {
        run_cycles(1, 1);
    } else if (!strcmp(opt.mode, "hold")) {
        if (!opt.origin_port) {
            fprintf(stderr, "tlsgen: hold needs -o ORIGIN\n");
            return 2;
        }
        run_hold();
    } else {
        fprintf(stderr, "tlsgen: unknown mode %s\n", opt.mode);
        return 2;
    }
    return 0;
}
