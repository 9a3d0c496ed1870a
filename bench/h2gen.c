/* h2gen.c: the bench's HTTP/2 client: many CONNECT tunnels as streams of one TLS connection
 * (RFC 9113 section 8.5), loopback only. Just enough HTTP/2 for that: no priorities, no
 * push, HPACK literals without indexing for the two fields a CONNECT needs, and of an answer
 * only whether its :status is 200 (every encoder sends that as static index 8).
 *
 *   h2gen -p TLSPORT -o ORIGIN -a CAFILE -n MAX -c OPENING -d SECONDS
 *       one connection to TLSPORT (TLS, the certificate checked against CAFILE, ALPN h2).
 *       Commands on stdin, one JSON line on stdout for each, as tlsgen's hold mode:
 *         N            open streams until N tunnels are open (at most MAX, OPENING being
 *                      opened at once, SECONDS at most). Each tunnel: HEADERS :method
 *                      CONNECT :authority 127.0.0.1:ORIGIN, the 200, then in DATA frames
 *                      GET / HTTP/1.1 and its whole answer; then it stays open, idle.
 *         get PATH K   on K of the open tunnels at once, GET PATH and read its answer
 *       At the end of stdin it closes the connection, prints a last line and exits. The
 *       whole run is bounded by an alarm of 3 x SECONDS + 60 s.
 *
 * Flow control: each stream's receive window is STREAM_WINDOW and is given back once half
 * of it was read, the connection's is 1 GiB; DATA is sent within the proxy's windows.
 */
#define PROG "h2gen"
#include "tlsload.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define FRAME_HEADER 9
#define MAX_FRAME 16384               /* SETTINGS_MAX_FRAME_SIZE: the default, not raised */
#define IN_SIZE (256 * 1024)
#define STREAM_WINDOW (1 << 20)
#define CONN_WINDOW (1 << 30)
#define TICK_MS 50

enum frame { DATA = 0, HEADERS = 1, RST_STREAM = 3, SETTINGS = 4, PING = 6, GOAWAY = 7,
             WINDOW_UPDATE = 8, CONTINUATION = 9 };
enum { END_STREAM = 0x1, ACK = 0x1, END_HEADERS = 0x4, PADDED = 0x8, PRIORITY = 0x20 };
enum sstate { S_FREE, S_OPENING, S_EXCHANGE, S_HELD, S_GETTING, S_DEAD };

struct stream {
    uint32_t id;
    enum sstate state;
    int want_send;           /* a request waits for room in the proxy's windows */
    const char *path;        /* what that request GETs */
    long send_window;
    long unacked;            /* DATA received and not yet given back */
    struct answer ans;
};

struct options {
    int tls_port;
    int origin_port;
    const char *cafile;
    int count;
    int opening;
    double seconds;
};

static struct options opt = {0, 0, NULL, 1000, 100, 30.0};
static struct stream *streams;
static int fd = -1;
static SSL *ssl;
static char *out;
static size_t out_len, out_cap;
static unsigned char in[IN_SIZE];
static size_t in_len;
static long conn_send_window = 65535, conn_unacked;
static long peer_initial_window = 65535;
static long peer_max_streams = 1L << 30;
static int goaway, conn_closed;
static long held, closed_while_held;
static char session[96];

/* --- output -------------------------------------------------------------------------- */

static void put(const void *data, size_t n) {
    if (out_len + n > out_cap) {
        out_cap = (out_len + n) * 2;
        out = realloc(out, out_cap);
        if (!out) die("realloc");
    }
    memcpy(out + out_len, data, n);
    out_len += n;
}

static void put_frame_header(size_t length, int type, int flags, uint32_t id) {
    unsigned char h[FRAME_HEADER] = {length >> 16, length >> 8, length, type, flags,
                                     (id >> 24) & 0x7f, id >> 16, id >> 8, id};
    put(h, sizeof h);
}

static void put_u32(uint32_t v) {
    unsigned char b[4] = {v >> 24, v >> 16, v >> 8, v};
    put(b, 4);
}

static void window_update(uint32_t id, uint32_t increment) {
    put_frame_header(4, WINDOW_UPDATE, 0, id);
    put_u32(increment);
}

/* Send what is queued as far as the socket takes it. -1 when the connection failed. */
static int flush_out(void) {
    size_t sent = 0;
    while (sent < out_len) {
        ERR_clear_error();
        int r = SSL_write(ssl, out + sent, (int)(out_len - sent));
        if (r <= 0) {
            int err = SSL_get_error(ssl, r);
            if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) break;
            note_error("send: %s", ssl_reason());
            conn_closed = 1;
            return -1;
        }
        sent += r;
    }
    memmove(out, out + sent, out_len - sent);
    out_len -= sent;
    return 0;
}

/* --- streams ------------------------------------------------------------------------- */

static struct stream *stream_of(uint32_t id) {
    if (id == 0 || !(id & 1)) return NULL;
    uint32_t index = (id - 1) / 2;
    return index < (uint32_t)opt.count && streams[index].state != S_FREE ? &streams[index] : NULL;
}

static void open_stream(struct stream *s, uint32_t id) {
    char authority[32];
    int alen = snprintf(authority, sizeof authority, "127.0.0.1:%d", opt.origin_port);
    unsigned char block[64];
    size_t n = 0;
    /* Literal header fields without indexing, names from the static table: 2 :method, 1
     * :authority; strings without Huffman coding. */
    block[n++] = 0x02;
    block[n++] = 7;
    memcpy(block + n, "CONNECT", 7);
    n += 7;
    block[n++] = 0x01;
    block[n++] = (unsigned char)alen;
    memcpy(block + n, authority, alen);
    n += alen;
    put_frame_header(n, HEADERS, END_HEADERS, id);
    put(block, n);
    s->id = id;
    s->state = S_OPENING;
    s->want_send = 0;
    s->send_window = peer_initial_window;
    s->unacked = 0;
}

/* Send the stream's GET in one DATA frame, if the proxy's windows have room for it. */
static void try_request(struct stream *s) {
    char req[300];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n", s->path,
                     opt.origin_port);
    if (n > s->send_window || n > conn_send_window) return;  /* a WINDOW_UPDATE will come */
    put_frame_header(n, DATA, 0, s->id);
    put(req, n);
    s->send_window -= n;
    conn_send_window -= n;
    s->want_send = 0;
}

static void request(struct stream *s, const char *path, enum sstate state) {
    s->path = path;
    s->state = state;
    s->want_send = 1;
    answer_reset(&s->ans, 0);
    try_request(s);
}

static void send_waiting(void) {
    for (int i = 0; i < opt.count; i++)
        if (streams[i].want_send && (streams[i].state == S_EXCHANGE || streams[i].state == S_GETTING))
            try_request(&streams[i]);
}

/* The stream ended or failed: a held one counts as closed while held. */
static void stream_dead(struct stream *s, const char *why, long code) {
    if (s->state == S_DEAD) return;
    if (s->state == S_HELD) {
        held--;
        closed_while_held++;
    }
    note_error("stream %u: %s %ld", s->id, why, code);
    s->state = S_DEAD;
}

/* The :status of a HEADERS block: 200, another static one, or -1 for a literal. */
static int block_status(const unsigned char *b, size_t n) {
    static const int statuses[] = {200, 204, 206, 304, 400, 404, 500};  /* static 8 to 14 */
    size_t i = 0;
    while (i < n && (b[i] & 0xe0) == 0x20) {  /* dynamic table size updates */
        if ((b[i++] & 0x1f) == 0x1f)
            while (i < n && (b[i++] & 0x80)) {}
    }
    if (i < n && b[i] >= 0x88 && b[i] <= 0x8e) return statuses[b[i] - 0x88];
    return -1;
}

static void on_headers(struct stream *s, int flags, const unsigned char *p, size_t n) {
    if (flags & PADDED) {
        if (n < 1 || p[0] >= n) return stream_dead(s, "bad padding", 0);
        n -= 1 + p[0];
        p += 1;
    }
    if (flags & PRIORITY) {
        if (n < 5) return stream_dead(s, "bad priority", 0);
        p += 5;
        n -= 5;
    }
    if (!(flags & END_HEADERS)) return stream_dead(s, "CONTINUATION not supported", 0);
    if (s->state != S_OPENING) return;  /* trailers: nothing asked for them */
    int status = block_status(p, n);
    if (status != 200) return stream_dead(s, "CONNECT answered with status", status);
    if (flags & END_STREAM) return stream_dead(s, "200 ended the stream", 0);
    request(s, "/", S_EXCHANGE);
}

/* DATA: the tunnel's bytes, an answer to the stream's GET. Returns 1 when it is complete. */
static int on_data(struct stream *s, int flags, const unsigned char *p, size_t n) {
    size_t counted = n;
    if (flags & PADDED) {
        if (n < 1 || p[0] >= n) {
            stream_dead(s, "bad padding", 0);
            return 0;
        }
        n -= 1 + p[0];
        p += 1;
    }
    conn_unacked += counted;
    s->unacked += counted;
    if (s->unacked >= STREAM_WINDOW / 2 && !(flags & END_STREAM)) {
        window_update(s->id, (uint32_t)s->unacked);
        s->unacked = 0;
    }
    if (conn_unacked >= CONN_WINDOW / 4) {
        window_update(0, (uint32_t)conn_unacked);
        conn_unacked = 0;
    }
    if (s->state == S_HELD) {
        stream_dead(s, n ? "held tunnel spoke" : "held tunnel ended", 0);
        return 0;
    }
    if (s->state != S_EXCHANGE && s->state != S_GETTING) return 0;
    int done = n ? answer_feed(&s->ans, (const char *)p, n) : 0;
    if (done < 0) {
        s->state = S_DEAD;
        return 0;
    }
    if (done == 0 && (flags & END_STREAM)) {
        stream_dead(s, "ended before its answer", 0);
        return 0;
    }
    if (done == 0) return 0;
    if (flags & END_STREAM) {
        stream_dead(s, "tunnel ended after its answer", 0);
        return 0;
    }
    s->state = S_HELD;
    held++;
    return 1;
}

static void on_settings(int flags, const unsigned char *p, size_t n) {
    if (flags & ACK) return;
    for (size_t i = 0; i + 6 <= n; i += 6) {
        unsigned id = p[i] << 8 | p[i + 1];
        long value = (long)((uint32_t)p[i + 2] << 24 | p[i + 3] << 16 | p[i + 4] << 8 | p[i + 5]);
        if (id == 0x3) peer_max_streams = value;
        if (id == 0x4) {
            for (int k = 0; k < opt.count; k++)
                if (streams[k].state != S_FREE) streams[k].send_window += value - peer_initial_window;
            peer_initial_window = value;
        }
    }
    put_frame_header(0, SETTINGS, ACK, 0);
}

/* One whole frame. Returns the answers it completed (0 or 1). */
static int on_frame(int type, int flags, uint32_t id, const unsigned char *p, size_t n) {
    struct stream *s = stream_of(id);
    switch (type) {
    case SETTINGS: on_settings(flags, p, n); return 0;
    case PING:
        if (!(flags & ACK) && n == 8) {
            put_frame_header(8, PING, ACK, 0);
            put(p, 8);
        }
        return 0;
    case GOAWAY:
        goaway = 1;
        note_error("GOAWAY, error %ld", n >= 8 ? (long)((uint32_t)p[4] << 24 | p[5] << 16 | p[6] << 8 | p[7]) : -1L);
        return 0;
    case WINDOW_UPDATE:
        if (n != 4) return 0;
        long increment = (long)(((uint32_t)p[0] & 0x7f) << 24 | p[1] << 16 | p[2] << 8 | p[3]);
        if (id == 0) conn_send_window += increment;
        else if (s) s->send_window += increment;
        return 0;
    case RST_STREAM:
        if (s) stream_dead(s, "reset, error", n >= 4 ? (long)((uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]) : -1L);
        return 0;
    case HEADERS:
        if (s) on_headers(s, flags, p, n);
        return 0;
    case DATA:
        if (s) return on_data(s, flags, p, n);
        conn_unacked += n;
        return 0;
    default:
        return 0;  /* PRIORITY, PUSH_PROMISE (push is off), unknown: nothing to do */
    }
}

/* Read what the socket has and handle each whole frame. Returns the answers completed. */
static int read_frames(void) {
    int completed = 0;
    for (;;) {
        ERR_clear_error();
        int r = SSL_read(ssl, in + in_len, (int)(IN_SIZE - in_len));
        if (r <= 0) {
            int err = SSL_get_error(ssl, r);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) break;
            if (!conn_closed) note_error("connection: %s", err == SSL_ERROR_ZERO_RETURN ? "closed by the proxy" : ssl_reason());
            conn_closed = 1;
            break;
        }
        in_len += r;
        size_t at = 0;
        while (in_len - at >= FRAME_HEADER) {
            const unsigned char *h = in + at;
            size_t length = (size_t)h[0] << 16 | h[1] << 8 | h[2];
            if (length > MAX_FRAME) {
                note_error("frame of %zu bytes, over SETTINGS_MAX_FRAME_SIZE", length);
                conn_closed = 1;
                return completed;
            }
            if (in_len - at < FRAME_HEADER + length) break;
            uint32_t id = ((uint32_t)h[5] & 0x7f) << 24 | h[6] << 16 | h[7] << 8 | h[8];
            completed += on_frame(h[3], h[4], id, h + FRAME_HEADER, length);
            at += FRAME_HEADER + length;
        }
        memmove(in, in + at, in_len - at);
        in_len -= at;
    }
    return completed;
}

/* One turn: send what is queued, wait up to TICK_MS, read. Returns the answers completed. */
static int turn(void) {
    send_waiting();
    if (flush_out() < 0 || conn_closed) return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN | (out_len ? POLLOUT : 0)};
    if (poll(&p, 1, TICK_MS) < 0 && errno != EINTR) die("poll");
    return read_frames();
}

/* --- commands ------------------------------------------------------------------------ */

static long in_state(enum sstate state) {
    long n = 0;
    for (int i = 0; i < opt.count; i++) n += streams[i].state == state;
    return n;
}

static int opened;  /* streams started so far: ids 1, 3, 5, ... */

static void open_until(int target) {
    double deadline = now() + opt.seconds;
    long active = 0;
    for (;;) {
        long busy = in_state(S_OPENING) + in_state(S_EXCHANGE);
        active = busy + held;
        while (opened < target && busy < opt.opening && active < peer_max_streams && !goaway) {
            open_stream(&streams[opened], 2 * (uint32_t)opened + 1);
            opened++;
            busy++;
            active++;
        }
        if ((opened >= target || goaway || active >= peer_max_streams) && busy == 0) break;
        if (conn_closed || now() >= deadline) break;
        turn();
    }
    if (opened < target && !goaway && !conn_closed && active >= peer_max_streams)
        note_error("the proxy allows %ld streams at once", peer_max_streams);
}

static long get_on_held(const char *path, long count) {
    double deadline = now() + opt.seconds;
    long asked = 0, done = 0;
    for (int i = 0; i < opt.count && asked < count; i++) {
        if (streams[i].state != S_HELD) continue;
        held--;
        request(&streams[i], path, S_GETTING);
        asked++;
    }
    while (in_state(S_GETTING) > 0 && !conn_closed && now() < deadline) done += turn();
    return done;
}

static void connect_tls(void) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    addr.sin_port = htons(opt.tls_port);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = 10};  /* bounds the blocking connect and handshake */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("h2gen: connect");
    static const unsigned char alpn[] = {2, 'h', '2'};
    SSL_CTX *ctx = client_context(opt.cafile, alpn, sizeof alpn);
    ssl = SSL_new(ctx);
    if (!ssl || SSL_set_fd(ssl, fd) != 1) die("SSL_new");
    if (SSL_connect(ssl) != 1) {
        fprintf(stderr, "h2gen: handshake: %s\n", ssl_reason());
        exit(2);
    }
    const unsigned char *proto;
    unsigned proto_len;
    SSL_get0_alpn_selected(ssl, &proto, &proto_len);
    if (proto_len != 2 || memcmp(proto, "h2", 2) != 0) {
        fprintf(stderr, "h2gen: the server did not agree to h2 (is http2 on?)\n");
        exit(2);
    }
    describe_session(ssl, session, sizeof session);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    put("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24);
    put_frame_header(12, SETTINGS, 0, 0);
    unsigned char settings[12] = {0, 0x2, 0, 0, 0, 0,                       /* ENABLE_PUSH 0 */
                                  0, 0x4, STREAM_WINDOW >> 24, (STREAM_WINDOW >> 16) & 0xff,
                                  (STREAM_WINDOW >> 8) & 0xff, STREAM_WINDOW & 0xff};
    put(settings, sizeof settings);
    window_update(0, CONN_WINDOW - 65535);
}

static void run(void) {
    streams = calloc(opt.count, sizeof *streams);
    if (!streams) die("calloc");
    alarm((unsigned)(3 * opt.seconds) + 60);  /* the whole run's bound, whatever stdin does */
    connect_tls();
    char line[256], path[200];
    long count;
    while (fgets(line, sizeof line, stdin)) {
        double begin = now();
        unsigned long long bytes_before = st.answer_bytes;
        read_frames();  /* what came while idle: a tunnel that closed, a GOAWAY */
        if (sscanf(line, "get %199s %ld", path, &count) == 2) {
            long done = get_on_held(path, count);
            printf("{\"done\": %ld, \"bytes\": %llu, \"open\": %ld, \"errors\": %ld, "
                   "\"seconds\": %.3f, \"cpu_s\": %.3f, \"first_error\": \"%s\"}\n",
                   done, st.answer_bytes - bytes_before, held, st.errors, now() - begin,
                   cpu_seconds(), st.first_error);
        } else {
            int target = atoi(line);
            open_until(target > opt.count ? opt.count : target);
            flush_out();
            printf("{\"open\": %ld, \"errors\": %ld, \"closed_while_held\": %ld, "
                   "\"seconds\": %.3f, \"cpu_s\": %.3f, \"tls\": \"%s\", \"max_streams\": %ld, "
                   "\"first_error\": \"%s\"}\n",
                   held, st.errors, closed_while_held, now() - begin, cpu_seconds(), session,
                   peer_max_streams < (1L << 30) ? peer_max_streams : -1L, st.first_error);
        }
        fflush(stdout);
    }
    read_frames();
    printf("{\"closed_while_held\": %ld, \"released\": true}\n", closed_while_held);
    SSL_shutdown(ssl);
    close(fd);
}

int main(int argc, char **argv) {
    int ch;
    while ((ch = getopt(argc, argv, "p:o:a:n:c:d:")) != -1) {
        switch (ch) {
            case 'p': opt.tls_port = atoi(optarg); break;
            case 'o': opt.origin_port = atoi(optarg); break;
            case 'a': opt.cafile = optarg; break;
            case 'n': opt.count = atoi(optarg); break;
            case 'c': opt.opening = atoi(optarg); break;
            case 'd': opt.seconds = atof(optarg); break;
            default: fprintf(stderr, "usage: see the comment at the top of h2gen.c\n"); return 2;
        }
    }
    if (opt.tls_port <= 0 || opt.origin_port <= 0 || !opt.cafile || opt.count <= 0 ||
        opt.opening <= 0 || opt.seconds <= 0) {
        fprintf(stderr, "h2gen: -p TLSPORT, -o ORIGIN and -a CAFILE are required; -n, -c and -d "
                        "must be positive\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);  /* a proxy that closed first: an error to count, not a death */
    run();
    return 0;
}
