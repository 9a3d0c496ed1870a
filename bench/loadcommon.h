/* loadcommon.h: what every load generator of the bench shares (loadgen.c, and through
 * tlsload.h tlsgen.c and h2gen.c): counters and the first error, the latency histogram and
 * its percentiles, CPU time, the descriptor limit, and the non-blocking loopback connect of
 * loadgen.c and tlsgen.c.
 *
 * A header of static functions: each generator is built from its one .c file
 * (gcc -O2 FILE.c), which defines PROG (its name, for error lines) and includes this from
 * the same directory.
 */
#ifndef LOADCOMMON_H
#define LOADCOMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
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

#ifndef PROG
#define PROG "load"
#endif

#define HEAD_MAX 8192           /* an answer head larger than this is an error */
#define SCRATCH_SIZE (1 << 20)  /* plaintext is read here; body bytes are dropped */
#define HIST_BUCKETS 1000000    /* latency histogram: 1 us buckets, the last one is >= 1 s */

struct stats {
    long done;
    long errors;
    char first_error[160];
    unsigned int *hist;         /* HIST_BUCKETS counts of cycle times in microseconds */
    long nsamples;
    unsigned long long answer_bytes;
};

static struct stats st;
static char scratch[SCRATCH_SIZE] __attribute__((unused));

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void die(const char *what) {
    fprintf(stderr, "%s: %s: %s\n", PROG, what, strerror(errno));
    exit(2);
}

/* Count an error; keep the first one's text, made safe to print inside a JSON string. */
static inline void note_error(const char *fmt, ...) {
    st.errors++;
    if (st.first_error[0] != '\0') return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st.first_error, sizeof st.first_error, fmt, ap);
    va_end(ap);
    for (char *p = st.first_error; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e) *p = '?';
}

static inline void record_latency(double seconds) {
    if (!st.hist) {
        st.hist = calloc(HIST_BUCKETS, sizeof *st.hist);
        if (!st.hist) die("calloc");
    }
    double us = seconds * 1e6;
    long bucket = us < 0 ? 0 : us >= HIST_BUCKETS - 1 ? HIST_BUCKETS - 1 : (long)us;
    st.hist[bucket]++;
    st.nsamples++;
}

/* The p-th percentile of the recorded times, in ms: the upper edge of the bucket holding the
 * sample of that rank (nearest-rank method), so within 1 us above the truth. */
static inline double percentile_ms(double p) {
    if (st.nsamples == 0) return 0.0;
    long rank = (long)(p / 100.0 * st.nsamples + 0.999999);
    if (rank < 1) rank = 1;
    long seen = 0;
    for (long bucket = 0; bucket < HIST_BUCKETS; bucket++) {
        seen += st.hist[bucket];
        if (seen >= rank) return (bucket + 1) / 1000.0;
    }
    return HIST_BUCKETS / 1000.0;
}

/* The CPU time this process used so far, user + system. */
static inline double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static inline void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* A connection to 127.0.0.1:port under way: non-blocking, TCP_NODELAY, added to `epfd`
 * edge-triggered both ways, once, with `ptr` as its data (each event then drives the
 * connection's steps until the socket is wanted again, with no epoll_ctl between them).
 * Its descriptor, or -1 with the error noted. */
static inline int open_loopback(int epfd, int port, void *ptr) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                               .sin_port = htons(port)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        note_error("socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        note_error("connect: %s", strerror(errno));
        close(fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = ptr};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    return fd;
}

/* The Content-Length of an answer head (head .. end), -1 when it has none. */
static inline long content_length(const char *head, const char *end) {
    for (const char *line = strstr(head, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n"))
        if (strncasecmp(line + 2, "content-length:", 15) == 0) return strtol(line + 17, NULL, 10);
    return -1;
}

#endif
