/*
 * wstool: a tiny web tool for DIT4C's end-to-end tests.
 *
 * An HTTP/1.1 server on 0.0.0.0:<port> (argv[1]; 0 picks a free port),
 * one forked process per connection, no dependency beyond libc:
 *
 *   GET /     (any path but /ws)  a page greeting the X-DIT4C-User header
 *             and a WebSocket echo client (ids: greeting, status, message,
 *             send, echoes);
 *   GET /ws   a WebSocket (RFC 6455) echo endpoint: text and binary messages
 *             (fragmented or not, up to 1 MiB) come back as they were sent,
 *             ping gets pong, close gets close.
 *
 * Plain responses close the connection (no keep-alive). A malformed request
 * or frame closes that connection only. `wstool --self-test` checks the
 * SHA-1 and base64 below against known answers.
 *
 * Build: gcc -O2 -static -Wall -o wstool wstool.c
 *
 * Written for DIT4C's tests; the SHA-1 and base64 here are written from
 * FIPS 180-4 and RFC 4648 and, like the rest, may be used by anyone for
 * anything (public domain).
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_HEAD 16384            /* request line and headers */
#define MAX_MESSAGE (1024 * 1024) /* a (reassembled) WebSocket message */
#define HEAD_TIMEOUT 20           /* seconds to send a request */
#define LINGER_TIMEOUT 2          /* seconds to wait for the peer to close */
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11" /* RFC 6455, section 1.3 */

/* ---- SHA-1 (FIPS 180-4) ------------------------------------------------ */

typedef struct {
    uint32_t h[5];
    uint64_t length; /* bytes hashed so far */
    uint8_t block[64];
    size_t used;
} sha1_ctx;

static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(sha1_ctx *c, const uint8_t *p) {
    uint32_t w[80], a, b, d, e, f, k, t, g;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (i = 16; i < 80; i++)
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    a = c->h[0], b = c->h[1], g = c->h[2], d = c->h[3], e = c->h[4];
    for (i = 0; i < 80; i++) {
        if (i < 20)
            f = (b & g) | (~b & d), k = 0x5A827999;
        else if (i < 40)
            f = b ^ g ^ d, k = 0x6ED9EBA1;
        else if (i < 60)
            f = (b & g) | (b & d) | (g & d), k = 0x8F1BBCDC;
        else
            f = b ^ g ^ d, k = 0xCA62C1D6;
        t = rol32(a, 5) + f + e + k + w[i];
        e = d, d = g, g = rol32(b, 30), b = a, a = t;
    }
    c->h[0] += a, c->h[1] += b, c->h[2] += g, c->h[3] += d, c->h[4] += e;
}

static void sha1_init(sha1_ctx *c) {
    static const uint32_t h0[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    memcpy(c->h, h0, sizeof h0);
    c->length = 0;
    c->used = 0;
}

static void sha1_update(sha1_ctx *c, const void *data, size_t n) {
    const uint8_t *p = data;
    c->length += n;
    while (n > 0) {
        size_t take = 64 - c->used;
        if (take > n)
            take = n;
        memcpy(c->block + c->used, p, take);
        c->used += take, p += take, n -= take;
        if (c->used == 64) {
            sha1_block(c, c->block);
            c->used = 0;
        }
    }
}

static void sha1_final(sha1_ctx *c, uint8_t out[20]) {
    uint64_t bits = c->length * 8;
    uint8_t one = 0x80, zero = 0, length[8];
    int i;
    sha1_update(c, &one, 1);
    while (c->used != 56)
        sha1_update(c, &zero, 1);
    for (i = 0; i < 8; i++)
        length[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(c, length, 8);
    for (i = 0; i < 20; i++)
        out[i] = (uint8_t)(c->h[i / 4] >> (24 - 8 * (i % 4)));
}

/* ---- base64 (RFC 4648), encoding only ------------------------------------ */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Writes 4 * ceil(n / 3) characters and a NUL to out. */
static void base64(const uint8_t *in, size_t n, char *out) {
    size_t i, o = 0;
    for (i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = B64[v >> 18 & 63];
        out[o++] = B64[v >> 12 & 63];
        out[o++] = i + 1 < n ? B64[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? B64[v & 63] : '=';
    }
    out[o] = '\0';
}

/* Sec-WebSocket-Accept for a key: base64(SHA1(key + GUID)); out holds 29 bytes. */
static void websocket_accept(const char *key, char out[29]) {
    sha1_ctx c;
    uint8_t digest[20];
    sha1_init(&c);
    sha1_update(&c, key, strlen(key));
    sha1_update(&c, WS_GUID, strlen(WS_GUID));
    sha1_final(&c, digest);
    base64(digest, 20, out);
}

static int self_test(void) {
    static const struct {
        const char *in;
        const char *sha1_b64;
    } sha1_cases[] = {
        {"", "2jmj7l5rSw0yVb/vlWAYkK/YBwk="},
        {"abc", "qZk+NkcGgWq6PiVxeFDCbJzQ2J0="},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", "hJg+RBw70m66rkqh+VEp5eVGcPE="},
    };
    static const struct {
        const char *in, *out;
    } b64_cases[] = {{"", ""}, {"f", "Zg=="}, {"fo", "Zm8="}, {"foo", "Zm9v"}, {"foob", "Zm9vYg=="}, {"fooba", "Zm9vYmE="}};
    char out[64];
    uint8_t digest[20];
    sha1_ctx c;
    size_t i;
    int failures = 0;
    for (i = 0; i < sizeof sha1_cases / sizeof sha1_cases[0]; i++) {
        sha1_init(&c);
        sha1_update(&c, sha1_cases[i].in, strlen(sha1_cases[i].in));
        sha1_final(&c, digest);
        base64(digest, 20, out);
        if (strcmp(out, sha1_cases[i].sha1_b64) != 0)
            failures++, fprintf(stderr, "sha1(%s) = %s\n", sha1_cases[i].in, out);
    }
    for (i = 0; i < sizeof b64_cases / sizeof b64_cases[0]; i++) {
        base64((const uint8_t *)b64_cases[i].in, strlen(b64_cases[i].in), out);
        if (strcmp(out, b64_cases[i].out) != 0)
            failures++, fprintf(stderr, "base64(%s) = %s\n", b64_cases[i].in, out);
    }
    /* RFC 6455, section 1.3 */
    websocket_accept("dGhlIHNhbXBsZSBub25jZQ==", out);
    if (strcmp(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") != 0)
        failures++, fprintf(stderr, "accept = %s\n", out);
    printf("%s\n", failures ? "self-test FAILED" : "self-test ok");
    return failures ? 1 : 0;
}

/* ---- connection I/O -------------------------------------------------------- */

typedef struct {
    int fd;
    uint8_t buf[MAX_HEAD];
    size_t start, end; /* unread bytes are buf[start..end) */
} conn;

static int write_all(int fd, const void *data, size_t n) {
    const uint8_t *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w, n -= (size_t)w;
    }
    return 0;
}

/* Reads more into buf; returns the count read, 0 at EOF, -1 on error. */
static ssize_t fill(conn *c) {
    ssize_t r;
    if (c->start == c->end)
        c->start = c->end = 0;
    if (c->end == sizeof c->buf)
        return -1;
    do
        r = read(c->fd, c->buf + c->end, sizeof c->buf - c->end);
    while (r < 0 && errno == EINTR);
    if (r > 0)
        c->end += (size_t)r;
    return r;
}

static int read_exact(conn *c, void *dst, size_t n) {
    uint8_t *d = dst;
    while (n > 0) {
        size_t take;
        if (c->start == c->end && fill(c) <= 0)
            return -1;
        take = c->end - c->start;
        if (take > n)
            take = n;
        memcpy(d, c->buf + c->start, take);
        c->start += take, d += take, n -= take;
    }
    return 0;
}

/* Ends a connection gracefully: no more to send, wait (briefly) for the peer's EOF. */
static void finish(conn *c) {
    uint8_t sink[4096];
    ssize_t r;
    shutdown(c->fd, SHUT_WR);
    alarm(LINGER_TIMEOUT);
    do
        r = read(c->fd, sink, sizeof sink);
    while (r > 0 || (r < 0 && errno == EINTR));
    close(c->fd);
}

/* ---- HTTP ---------------------------------------------------------------- */

typedef struct {
    char *method, *target, *version;
    char *upgrade, *connection, *key, *ws_version, *user;
} request;

static void respond(conn *c, const char *status, const char *extra_headers, const char *type,
                    const char *body, size_t length, int head_only) {
    char head[512];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\n%sConnection: close\r\n\r\n",
                     status, type, length, extra_headers);
    if (n > 0 && (size_t)n < sizeof head && write_all(c->fd, head, (size_t)n) == 0 && !head_only)
        write_all(c->fd, body, length);
}

static void refuse(conn *c, const char *status, const char *extra_headers) {
    char body[128];
    int n = snprintf(body, sizeof body, "%s\n", status);
    respond(c, status, extra_headers, "text/plain; charset=utf-8", body, (size_t)n, 0);
    finish(c);
}

static const char PAGE_START[] =
    "<!DOCTYPE html>\n"
    "<html lang=\"en\">\n"
    "<head>\n"
    "<meta charset=\"utf-8\">\n"
    "<title>WS tool</title>\n"
    "</head>\n"
    "<body>\n"
    "<h1>WS tool</h1>\n"
    "<p id=\"greeting\">";

static const char PAGE_END[] =
    "</p>\n"
    "<p id=\"status\">connecting</p>\n"
    "<input id=\"message\" type=\"text\" autocomplete=\"off\">\n"
    "<button id=\"send\" type=\"button\">Send</button>\n"
    "<ul id=\"echoes\"></ul>\n"
    "<script>\n"
    "(function () {\n"
    "  var status = document.getElementById(\"status\");\n"
    "  var scheme = location.protocol === \"https:\" ? \"wss://\" : \"ws://\";\n"
    "  var ws = new WebSocket(scheme + location.host + \"/ws\");\n"
    "  window.wstool = ws;\n"
    "  ws.binaryType = \"arraybuffer\";\n"
    "  ws.onopen = function () { status.textContent = \"connected\"; };\n"
    "  ws.onerror = function () { status.textContent = \"error\"; };\n"
    "  ws.onclose = function (e) { status.textContent = \"closed (\" + e.code + \")\"; };\n"
    "  ws.onmessage = function (e) {\n"
    "    var li = document.createElement(\"li\");\n"
    "    li.textContent = typeof e.data === \"string\" ? e.data\n"
    "      : \"(binary, \" + e.data.byteLength + \" bytes)\";\n"
    "    document.getElementById(\"echoes\").appendChild(li);\n"
    "  };\n"
    "  document.getElementById(\"send\").addEventListener(\"click\", function () {\n"
    "    ws.send(document.getElementById(\"message\").value);\n"
    "  });\n"
    "})();\n"
    "</script>\n"
    "</body>\n"
    "</html>\n";

/* HTML-escapes s (control characters become '?'); the caller frees the result. */
static char *html_escape(const char *s) {
    size_t n = strlen(s), o = 0;
    char *out = malloc(6 * n + 1);
    if (out == NULL)
        return NULL;
    for (; *s; s++) {
        const char *r = NULL;
        switch (*s) {
        case '&': r = "&amp;"; break;
        case '<': r = "&lt;"; break;
        case '>': r = "&gt;"; break;
        case '"': r = "&quot;"; break;
        case '\'': r = "&#39;"; break;
        default: break;
        }
        if (r != NULL) {
            memcpy(out + o, r, strlen(r));
            o += strlen(r);
        } else {
            unsigned char ch = (unsigned char)*s;
            out[o++] = (ch < 0x20 || ch == 0x7f) ? '?' : *s;
        }
    }
    out[o] = '\0';
    return out;
}

static void page(conn *c, const request *r) {
    const char *prefix = "Hello, ", *suffix = ".";
    char *name = html_escape(r->user != NULL && r->user[0] != '\0' ? r->user : "stranger");
    char *body;
    size_t length, at = 0;
    if (name == NULL) {
        refuse(c, "500 Internal Server Error", "");
        return;
    }
    length = strlen(PAGE_START) + strlen(prefix) + strlen(name) + strlen(suffix) + strlen(PAGE_END);
    body = malloc(length + 1);
    if (body == NULL) {
        free(name);
        refuse(c, "500 Internal Server Error", "");
        return;
    }
#define APPEND(s) (memcpy(body + at, (s), strlen(s)), at += strlen(s))
    APPEND(PAGE_START);
    APPEND(prefix);
    APPEND(name);
    APPEND(suffix);
    APPEND(PAGE_END);
#undef APPEND
    respond(c, "200 OK", "", "text/html; charset=utf-8", body, length, strcmp(r->method, "HEAD") == 0);
    free(body);
    free(name);
    finish(c);
}

/* Whether a comma-separated header value holds this token (case-insensitively). */
static int has_token(const char *value, const char *token) {
    size_t n = strlen(token);
    const char *p = value;
    if (value == NULL)
        return 0;
    while (*p) {
        const char *end;
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        end = p;
        while (*end && *end != ',')
            end++;
        {
            const char *last = end;
            while (last > p && (last[-1] == ' ' || last[-1] == '\t'))
                last--;
            if ((size_t)(last - p) == n && strncasecmp(p, token, n) == 0)
                return 1;
        }
        p = end;
    }
    return 0;
}

/* Splits the head (NUL-terminated, CRLF lines) into r; 0 if well-formed. */
static int parse(char *head, request *r) {
    char *line = head, *next, *sp;
    int first = 1;
    memset(r, 0, sizeof *r);
    for (; *line; line = next) {
        char *end = strstr(line, "\r\n");
        if (end == NULL)
            return -1;
        *end = '\0';
        next = end + 2;
        if (first) {
            first = 0;
            r->method = line;
            if ((sp = strchr(line, ' ')) == NULL)
                return -1;
            *sp = '\0';
            r->target = sp + 1;
            if ((sp = strchr(r->target, ' ')) == NULL)
                return -1;
            *sp = '\0';
            r->version = sp + 1;
            if (r->method[0] == '\0' || r->target[0] != '/' || strncmp(r->version, "HTTP/1.", 7) != 0 ||
                strlen(r->version) != 8)
                return -1;
        } else {
            char *colon = strchr(line, ':'), *value, *tail;
            /* a name, without white space (so no obsolete line folding either) */
            if (colon == NULL || colon == line || strcspn(line, " \t") < (size_t)(colon - line))
                return -1;
            *colon = '\0';
            value = colon + 1;
            while (*value == ' ' || *value == '\t')
                value++;
            tail = value + strlen(value);
            while (tail > value && (tail[-1] == ' ' || tail[-1] == '\t'))
                *--tail = '\0';
            if (strcasecmp(line, "Upgrade") == 0)
                r->upgrade = value;
            else if (strcasecmp(line, "Connection") == 0)
                r->connection = value;
            else if (strcasecmp(line, "Sec-WebSocket-Key") == 0)
                r->key = value;
            else if (strcasecmp(line, "Sec-WebSocket-Version") == 0)
                r->ws_version = value;
            else if (strcasecmp(line, "X-DIT4C-User") == 0)
                r->user = value;
        }
    }
    return first ? -1 : 0;
}

/* Whether the key is 16 bytes in base64 (24 characters, ending "=="). */
static int valid_key(const char *key) {
    size_t i;
    if (key == NULL || strlen(key) != 24 || key[22] != '=' || key[23] != '=')
        return 0;
    for (i = 0; i < 22; i++)
        if (key[i] == '\0' || strchr(B64, key[i]) == NULL)
            return 0;
    return 1;
}

/* ---- WebSocket (RFC 6455) ------------------------------------------------ */

static int send_frame(int fd, int opcode, const uint8_t *payload, size_t n) {
    uint8_t head[10];
    size_t h = 0;
    struct iovec parts[2];
    head[h++] = (uint8_t)(0x80 | opcode);
    if (n < 126) {
        head[h++] = (uint8_t)n;
    } else if (n <= 0xFFFF) {
        head[h++] = 126;
        head[h++] = (uint8_t)(n >> 8);
        head[h++] = (uint8_t)n;
    } else {
        int i;
        head[h++] = 127;
        for (i = 7; i >= 0; i--)
            head[h++] = (uint8_t)((uint64_t)n >> (8 * i));
    }
    parts[0].iov_base = head, parts[0].iov_len = h;
    parts[1].iov_base = (void *)payload, parts[1].iov_len = n;
    for (;;) {
        ssize_t w = writev(fd, parts, n > 0 ? 2 : 1);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        if ((size_t)w < h && write_all(fd, head + w, h - (size_t)w) < 0)
            return -1;
        if ((size_t)w <= h)
            return n > 0 ? write_all(fd, payload, n) : 0;
        return write_all(fd, payload + ((size_t)w - h), n - ((size_t)w - h));
    }
}

static void send_close(int fd, unsigned code) {
    uint8_t payload[2] = {(uint8_t)(code >> 8), (uint8_t)code};
    send_frame(fd, 0x8, payload, code ? 2 : 0);
}

/* Strict UTF-8: no overlong forms, surrogates or code points above U+10FFFF. */
static int utf8_valid(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t ch = s[i];
        size_t k, j;
        uint32_t cp, min;
        if (ch < 0x80) {
            i++;
            continue;
        }
        if ((ch & 0xE0) == 0xC0)
            k = 1, cp = ch & 0x1F, min = 0x80;
        else if ((ch & 0xF0) == 0xE0)
            k = 2, cp = ch & 0x0F, min = 0x800;
        else if ((ch & 0xF8) == 0xF0)
            k = 3, cp = ch & 0x07, min = 0x10000;
        else
            return 0;
        if (n - i <= k)
            return 0;
        for (j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += k + 1;
    }
    return 1;
}

static int valid_close_code(unsigned code) {
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1011) || (code >= 3000 && code <= 4999);
}

static void unmask(uint8_t *p, size_t n, const uint8_t key[4]) {
    size_t i;
    for (i = 0; i < n; i++)
        p[i] ^= key[i & 3];
}

/* Echoes messages until the peer closes, errs, or breaks the protocol. */
static void websocket(conn *c) {
    uint8_t *message = NULL;
    size_t length = 0, capacity = 0;
    int opcode = 0; /* of the message being reassembled, 0 if none */
    unsigned failure = 0;
    for (;;) {
        uint8_t h[2], ext[8], key[4], control[125];
        uint64_t n;
        int fin, op;
        if (read_exact(c, h, 2) < 0)
            break;
        fin = h[0] & 0x80, op = h[0] & 0x0F;
        n = h[1] & 0x7F;
        if (n == 126) {
            if (read_exact(c, ext, 2) < 0)
                break;
            n = (uint64_t)ext[0] << 8 | ext[1];
        } else if (n == 127) {
            int i;
            if (read_exact(c, ext, 8) < 0)
                break;
            if (ext[0] & 0x80) {
                failure = 1002;
                break;
            }
            for (n = 0, i = 0; i < 8; i++)
                n = n << 8 | ext[i];
        }
        if ((h[0] & 0x70) || !(h[1] & 0x80)) { /* reserved bits, or a client frame not masked */
            failure = 1002;
            break;
        }
        if (read_exact(c, key, 4) < 0)
            break;
        if (op >= 0x8) { /* control frames */
            if (!fin || n > 125) {
                failure = 1002;
                break;
            }
            if (read_exact(c, control, (size_t)n) < 0)
                break;
            unmask(control, (size_t)n, key);
            if (op == 0x9) {
                if (send_frame(c->fd, 0xA, control, (size_t)n) < 0)
                    break;
                continue;
            }
            if (op == 0xA)
                continue;
            if (op != 0x8) {
                failure = 1002;
                break;
            }
            if (n == 0) {
                send_close(c->fd, 0);
            } else {
                unsigned code = (unsigned)control[0] << 8 | control[1];
                if (n == 1 || !valid_close_code(code))
                    send_close(c->fd, 1002);
                else if (!utf8_valid(control + 2, (size_t)n - 2))
                    send_close(c->fd, 1007);
                else
                    send_close(c->fd, code);
            }
            break;
        }
        if (op == 0x0) {
            if (opcode == 0) {
                failure = 1002;
                break;
            }
        } else if (op == 0x1 || op == 0x2) {
            if (opcode != 0) {
                failure = 1002;
                break;
            }
            opcode = op;
            length = 0;
        } else {
            failure = 1002;
            break;
        }
        if (n > (uint64_t)(MAX_MESSAGE - length)) {
            failure = 1009;
            break;
        }
        if (length + (size_t)n > capacity) {
            size_t want = length + (size_t)n;
            uint8_t *grown;
            if (want < 4096)
                want = 4096;
            if (want < 2 * capacity)
                want = 2 * capacity < MAX_MESSAGE ? 2 * capacity : MAX_MESSAGE;
            if ((grown = realloc(message, want)) == NULL) {
                failure = 1011;
                break;
            }
            message = grown, capacity = want;
        }
        if (read_exact(c, message + length, (size_t)n) < 0)
            break;
        unmask(message + length, (size_t)n, key);
        length += (size_t)n;
        if (fin) {
            if (opcode == 0x1 && !utf8_valid(message, length)) {
                failure = 1007;
                break;
            }
            if (send_frame(c->fd, opcode, message, length) < 0)
                break;
            opcode = 0;
        }
    }
    if (failure)
        send_close(c->fd, failure);
    free(message);
    finish(c);
}

static void handshake(conn *c, const request *r) {
    char accept[29], response[256];
    int n;
    if (strcmp(r->method, "GET") != 0) {
        refuse(c, "405 Method Not Allowed", "Allow: GET\r\n");
        return;
    }
    if (strcmp(r->version, "HTTP/1.1") != 0 || !has_token(r->upgrade, "websocket") ||
        !has_token(r->connection, "upgrade") || !valid_key(r->key)) {
        refuse(c, "400 Bad Request", "");
        return;
    }
    if (r->ws_version == NULL || strcmp(r->ws_version, "13") != 0) {
        refuse(c, "426 Upgrade Required", "Sec-WebSocket-Version: 13\r\n");
        return;
    }
    websocket_accept(r->key, accept);
    n = snprintf(response, sizeof response,
                 "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Accept: %s\r\n\r\n",
                 accept);
    if (write_all(c->fd, response, (size_t)n) < 0)
        return;
    alarm(0); /* a WebSocket may idle as long as its peer likes */
    websocket(c);
}

static void serve(int fd) {
    static conn c; /* one per (forked) process */
    static char head[MAX_HEAD + 1];
    request r;
    uint8_t *terminator = NULL;
    size_t length, path_length;
    int one = 1;
    c.fd = fd;
    c.start = c.end = 0;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    alarm(HEAD_TIMEOUT); /* SIGALRM ends this process, and so the connection */
    for (;;) {
        size_t from = c.end >= 3 ? c.end - 3 : 0;
        ssize_t got;
        if (c.end == sizeof c.buf) {
            refuse(&c, "431 Request Header Fields Too Large", "");
            return;
        }
        got = fill(&c);
        if (got <= 0) {
            close(fd);
            return;
        }
        for (; from + 4 <= c.end; from++)
            if (memcmp(c.buf + from, "\r\n\r\n", 4) == 0) {
                terminator = c.buf + from;
                break;
            }
        if (terminator != NULL)
            break;
    }
    length = (size_t)(terminator - c.buf) + 2; /* keep the last line's CRLF */
    memcpy(head, c.buf, length);
    head[length] = '\0';
    c.start = length + 2; /* the rest (if any) is the first of the WebSocket's frames */
    if (memchr(head, '\0', length) != NULL || parse(head, &r) != 0) {
        refuse(&c, "400 Bad Request", "");
        return;
    }
    path_length = strcspn(r.target, "?");
    if (path_length == 3 && strncmp(r.target, "/ws", 3) == 0) {
        handshake(&c, &r);
    } else if (strcmp(r.method, "GET") == 0 || strcmp(r.method, "HEAD") == 0) {
        page(&c, &r);
    } else {
        refuse(&c, "405 Method Not Allowed", "Allow: GET, HEAD\r\n");
    }
}

/* ---- the listening process ---------------------------------------------- */

static void on_terminate(int signal_number) {
    (void)signal_number;
    _exit(0);
}

int main(int argc, char **argv) {
    struct sigaction action;
    struct sockaddr_in address;
    socklen_t address_length = sizeof address;
    char *end;
    long port;
    int listener, one = 1;

    if (argc == 2 && strcmp(argv[1], "--self-test") == 0)
        return self_test();
    errno = 0;
    port = argc == 2 ? strtol(argv[1], &end, 10) : -1;
    if (argc != 2 || errno != 0 || end == argv[1] || *end != '\0' || port < 0 || port > 65535) {
        fprintf(stderr, "usage: %s PORT | --self-test\n", argv[0]);
        return 2;
    }

    memset(&action, 0, sizeof action);
    sigemptyset(&action.sa_mask);
    action.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &action, NULL);
    action.sa_flags = SA_NOCLDWAIT; /* children are reaped by the kernel */
    sigaction(SIGCHLD, &action, NULL);
    action.sa_flags = 0;
    action.sa_handler = on_terminate; /* as PID 1 of a container, the default would be to ignore */
    sigaction(SIGTERM, &action, NULL);
    sigaction(SIGINT, &action, NULL);

    listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) {
        perror("socket");
        return 1;
    }
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    address.sin_port = htons((uint16_t)port);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) < 0 || listen(listener, 128) < 0) {
        perror("listening");
        return 1;
    }
    getsockname(listener, (struct sockaddr *)&address, &address_length);
    printf("wstool listening on 0.0.0.0:%u\n", (unsigned)ntohs(address.sin_port));
    fflush(stdout);

    for (;;) {
        pid_t child;
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) {
            if (errno != EINTR && errno != ECONNABORTED) {
                perror("accept");
                sleep(1); /* e.g. out of file descriptors: let some connections end */
            }
            continue;
        }
        child = fork();
        if (child == 0) {
            close(listener);
            serve(fd);
            _exit(0);
        }
        if (child < 0)
            perror("fork");
        close(fd);
    }
}
