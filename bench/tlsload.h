/* tlsload.h: what the TLS load generators (tlsgen.c: HTTP/1.1 over TLS, h2gen.c: HTTP/2)
 * share beside loadcommon.h: the client's TLS context (OpenSSL, the
 * proxy's certificate verified against a CA file, as curl --proxy-cacert does), and the
 * reading of one HTTP/1.1 answer fed in pieces, whatever carries it (a TLS record or an
 * HTTP/2 DATA frame).
 *
 * A header of static functions: each generator is built from its one .c file
 * (gcc -O2 FILE.c -lssl -lcrypto), which includes this from the same directory.
 */
#ifndef TLSLOAD_H
#define TLSLOAD_H

#include "loadcommon.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* OpenSSL's reason for the last failure, for note_error. */
static inline const char *ssl_reason(void) {
    unsigned long code = ERR_get_error();
    ERR_clear_error();
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    return reason ? reason : (errno ? strerror(errno) : "closed");
}

/* A client context that verifies the server's certificate against `cafile` and its IP
 * address SAN against 127.0.0.1, offering `alpn` (wire format, NULL for none). Full
 * handshakes only: no session is kept for a later connection, as a client that starts
 * afresh (curl from a shell, a short-lived job) does. Read-ahead with a 64 KiB buffer lets
 * one recv() take several records, as a client built for throughput does. */
static inline SSL_CTX *client_context(const char *cafile, const unsigned char *alpn, unsigned alpn_len) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) die("SSL_CTX_new");
    if (SSL_CTX_load_verify_locations(ctx, cafile, NULL) != 1) {
        fprintf(stderr, "cannot load the CA file %s: %s\n", cafile, ssl_reason());
        exit(2);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(ctx), "127.0.0.1");
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, 64 * 1024);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (alpn && SSL_CTX_set_alpn_protos(ctx, alpn, alpn_len) != 0) die("SSL_CTX_set_alpn_protos");
    return ctx;
}

/* "TLSv1.3 TLS_AES_256_GCM_SHA384 X25519", what a session agreed on, for the report. */
static inline void describe_session(SSL *ssl, char *out, size_t size) {
    int nid = SSL_get_negotiated_group(ssl);
    const char *group = nid > 0 ? OBJ_nid2sn(nid) : "";
    snprintf(out, size, "%s %s %s", SSL_get_version(ssl), SSL_get_cipher_name(ssl),
             group ? group : "");
}

/* One HTTP/1.1 answer read in pieces: its head kept (up to HEAD_MAX), its body counted by
 * Content-Length and dropped. `connect_reply`: the answer to a CONNECT, a head alone. */
struct answer {
    size_t len;     /* bytes of the answer so far */
    size_t need;    /* head + body; 0 until the head is parsed */
    int connect_reply;
    char head[HEAD_MAX];
};

static inline void answer_reset(struct answer *a, int connect_reply) {
    a->len = a->need = 0;
    a->connect_reply = connect_reply;
}

/* The head is complete in a->head (a->len bytes): check it, set a->need. -1 on error. */
static inline int answer_head(struct answer *a, const char *end) {
    int ok = a->len >= 12 && memcmp(a->head, "HTTP/1.", 7) == 0 && memcmp(a->head + 8, " 200", 4) == 0;
    if (!ok) {
        char *eol = memchr(a->head, '\r', a->len);
        int n = eol ? (int)(eol - a->head) : (int)(a->len < 60 ? a->len : 60);
        note_error("answer was: %.*s", n, a->head);
        return -1;
    }
    size_t head_len = end + 4 - a->head;
    if (a->connect_reply) {
        a->need = head_len;
        return 0;
    }
    long body = content_length(a->head, end);
    if (body < 0) {
        note_error("answer without Content-Length");
        return -1;
    }
    a->need = head_len + body;
    return 0;
}

/* Feed n bytes of the answer. 1: the answer is complete, 0: more is to come, -1: error
 * (counted). Bytes beyond the answer are an error: nothing else was asked for. */
static inline int answer_feed(struct answer *a, const char *data, size_t n) {
    if (a->need == 0) {
        size_t room = HEAD_MAX - 1 - a->len;
        size_t take = n < room ? n : room;
        memcpy(a->head + a->len, data, take);
        a->head[a->len + take] = '\0';
        char *end = memmem(a->head, a->len + take, "\r\n\r\n", 4);
        if (!end) {
            if (take < n || a->len + take >= HEAD_MAX - 1) {
                note_error("answer head over %d bytes", HEAD_MAX);
                return -1;
            }
            a->len += take;
            return 0;
        }
        a->len += take;  /* what followed the head in `data` is counted below */
        size_t beyond = a->len - (size_t)(end + 4 - a->head);
        a->len -= beyond;
        if (answer_head(a, end) < 0) return -1;
        data += take - beyond;
        n = n - take + beyond;
    }
    a->len += n;
    if (a->len > a->need) {
        note_error(a->connect_reply ? "bytes after the CONNECT answer" : "more bytes than Content-Length");
        return -1;
    }
    if (a->len < a->need) return 0;
    if (!a->connect_reply) st.answer_bytes += a->need;
    return 1;
}

#endif
