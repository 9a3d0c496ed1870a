/* origin.c: the built-in origin, used when nginx is not installed. One process, epoll,
 * non-blocking, HTTP/1.1 keep-alive (HTTP/1.0 keep-alive on request), GET only:
 *
 *   origin -p PORT -b BIG_BYTES [-n NAME]
 *       /     a tiny body that names the origin ("hello from the bench origin NAME\n",
 *             NAME "A" by default): the bench's routing check starts two, A and B
 *       /1k   1024 bytes        /1m   1 MiB of zero bytes        /big   BIG_BYTES zero bytes
 *
 * Listens on 127.0.0.1:PORT and runs until it is killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_MAX 8192
#define CHUNK (256 * 1024)
#define MAX_EVENTS 512

static char tiny[80];      /* the body of /, made from the origin's name at start */
static size_t tiny_len;
static char filler[CHUNK]; /* zeros for /big; its first 1024 bytes are /1k */

struct client {
    int fd;
    size_t in_len;
    char in[IN_MAX];
    char head[256];
    size_t head_len, head_sent;
    const char *body;         /* what is left of a small body; NULL: /big, served from filler */
    unsigned long long body_left;
    int busy;                 /* a response is being written */
    int keep_alive;
    int want_out;             /* EPOLLOUT is armed */
};

static int epfd;
static unsigned long long big_bytes;

static void die(const char *what) {
    fprintf(stderr, "origin: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void drop(struct client *c) {
    close(c->fd);
    free(c);
}

/* Wait for room to write while a response is pending, else for the next request. */
static void arm(struct client *c, int out) {
    if (c->want_out == out) return;
    struct epoll_event ev = {.events = out ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
    c->want_out = out;
}

/* Turn the first complete request head in c->in into a pending response. 0: none yet. */
static int take_request(struct client *c) {
    char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head_len = end + 4 - c->in;
    *end = '\0';
    char *path = strchr(c->in, ' ');
    char *proto = path ? strchr(path + 1, ' ') : NULL;
    int http11 = proto && strncmp(proto + 1, "HTTP/1.1", 8) == 0;
    c->keep_alive = http11 ? !strcasestr(c->in, "\r\nconnection: close")
                           : strcasestr(c->in, "\r\nconnection: keep-alive") != NULL;
    const char *status = "200 OK";
    c->body = tiny;
    c->body_left = tiny_len;
    if (!path || !proto || strncmp(c->in, "GET ", 4) != 0) {
        status = "400 Bad Request";
        c->body_left = 0;
        c->keep_alive = 0;
    } else if (proto - path == 4 && strncmp(path, " /1k", 4) == 0) {
        c->body = filler;
        c->body_left = 1024;
    } else if (proto - path == 4 && strncmp(path, " /1m", 4) == 0) {
        c->body = NULL;
        c->body_left = 1 << 20;
    } else if (proto - path == 5 && strncmp(path, " /big", 5) == 0) {
        c->body = NULL;
        c->body_left = big_bytes;
    } else if (proto - path != 2) {
        status = "404 Not Found";
        c->body_left = 0;
    }
    c->head_len = snprintf(c->head, sizeof c->head,
                           "HTTP/1.1 %s\r\nServer: bench-origin\r\nContent-Type: application/octet-stream\r\n"
                           "Content-Length: %llu\r\n%s\r\n",
                           status, c->body_left, c->keep_alive ? "" : "Connection: close\r\n");
    c->head_sent = 0;
    c->busy = 1;
    memmove(c->in, c->in + head_len, c->in_len - head_len);
    c->in_len -= head_len;
    return 1;
}

/* Write what the socket takes. Returns -1 when the client is to be dropped. */
static int pump(struct client *c) {
    while (c->busy) {
        ssize_t n;
        if (c->head_sent < c->head_len) {
            n = send(c->fd, c->head + c->head_sent, c->head_len - c->head_sent, MSG_NOSIGNAL);
            if (n > 0) c->head_sent += n;
        } else if (c->body_left > 0) {
            size_t len = c->body_left < CHUNK ? c->body_left : CHUNK;
            n = send(c->fd, c->body ? c->body : filler, len, MSG_NOSIGNAL);
            if (n > 0) {
                c->body_left -= n;
                if (c->body) c->body += n;
            }
        } else {
            c->busy = 0;
            if (!c->keep_alive) return -1;
            if (!take_request(c)) break;
            continue;
        }
        if (n < 0) {
            if (errno == EAGAIN) {
                arm(c, 1);
                return 0;
            }
            return -1;
        }
    }
    arm(c, 0);
    return 0;
}

static int on_readable(struct client *c) {
    while (!c->busy) {
        if (c->in_len == IN_MAX) return -1; /* a head over IN_MAX */
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_MAX - c->in_len, 0);
        if (n == 0) return -1;
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->in_len += n;
        if (take_request(c) && pump(c) < 0) return -1;
    }
    return 0;
}

static void accept_all(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct client *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }
}

int main(int argc, char **argv) {
    int port = 0, ch;
    const char *name = "A";
    while ((ch = getopt(argc, argv, "p:b:n:")) != -1) {
        if (ch == 'p') port = atoi(optarg);
        else if (ch == 'b') big_bytes = strtoull(optarg, NULL, 10);
        else if (ch == 'n') name = optarg;
        else return 2;
    }
    if (port <= 0) {
        fprintf(stderr, "usage: origin -p PORT -b BIG_BYTES [-n NAME]\n");
        return 2;
    }
    int made = snprintf(tiny, sizeof tiny, "hello from the bench origin %.40s\n", name);
    tiny_len = made < (int)sizeof tiny ? (size_t)made : sizeof tiny - 1;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev) < 0) die("epoll");
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            struct client *c = evs[i].data.ptr;
            if (!c) {
                accept_all(lfd);
                continue;
            }
            int r = 0;
            if (evs[i].events & EPOLLOUT) r = pump(c);
            else r = on_readable(c);
            if (r < 0) drop(c);
        }
    }
}
