/*
 * t/fuzz/fuzz.c - libFuzzer targets for the parsers in mandos.c.
 *
 * The targets run mandos.c's own functions: this file includes mandos.c
 * (its main() renamed) so that every static function is in reach and no
 * code is copied.  One binary per target, chosen at build time:
 *
 *   clang -DFUZZ_TARGET=FUZZ_INI -fsanitize=fuzzer,address,undefined ...
 *
 *   FUZZ_INI       clients.conf and mandos.conf from the same bytes
 *                  (clients_from_buffer, settings_from_conf), then the
 *                  run-time checker expansion of every client read
 *   FUZZ_DURATION  duration_parse and duration_render
 *   FUZZ_BASE64    base64_decode_lenient on raw bytes
 *   FUZZ_VERSION   version_line_accepted, then the byte-wise reader
 *                  conn_do_version fed over a socketpair in chunks
 *   FUZZ_STATE     state_parse; a file that parses is applied to a fixed
 *                  clients.conf and the result written and read back
 *
 * Besides crashes and sanitizer reports, each target checks a property
 * the server relies on (see fuzz_assert) and aborts when it does not hold.
 * t/fuzz/run.sh builds and runs them; see `make fuzz`.
 */

#define _GNU_SOURCE 1
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>

/* No target may read files: a fuzzed clients.conf could name any path in
 * `secfile` (/dev/zero would never end).  Every openat() in mandos.c
 * comes here and fails as if the file did not exist. */
static int fuzz_openat(int dirfd, const char *path, int flags, ...)
{
    (void)dirfd;
    (void)path;
    (void)flags;
    errno = ENOENT;
    return -1;
}
#define openat fuzz_openat

#define main mandos_main
#include "../../mandos.c"
#undef main
#undef openat

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_INI 1
#define FUZZ_DURATION 2
#define FUZZ_BASE64 3
#define FUZZ_VERSION 4
#define FUZZ_STATE 5

#ifndef FUZZ_TARGET
#error "build with -DFUZZ_TARGET=FUZZ_INI (or _DURATION, _BASE64, _VERSION, _STATE)"
#endif

/* A broken property is a finding like a crash: say which, then abort so
 * libFuzzer saves the input. */
#define fuzz_assert(cond) \
    do { \
        if (!(cond)) { \
            fprintf(stderr, "fuzz: property failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            abort(); \
        } \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    log_cfg.threshold = -1;      /* mandos.c logs nothing to stderr */
    return 0;
}

#if FUZZ_TARGET == FUZZ_INI

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct buf errs = { 0 };
    struct diag d = { .file = "clients.conf", .capture = &errs };
    struct client_table t = { 0 };
    clients_from_buffer((const char *)data, size, "/nonexistent", -1, &d, &t);
    for (size_t i = 0; i < t.n; i++) {
        struct buf cmd = { 0 };
        checker_expand(t.v[i], &cmd);
        buf_free(&cmd);
    }
    /* every error names a line of this file */
    fuzz_assert(d.count == 0 || (errs.data && strncmp(errs.data, "clients.conf:", 13) == 0));
    client_table_clear(&t);

    struct settings set;
    settings_defaults(&set);
    struct diag d2 = { .file = "mandos.conf", .capture = &errs };
    settings_from_conf(&set, (const char *)data, size, &d2);
    fuzz_assert(set.max_connections >= 1 && set.connection_timeout > 0);
    fuzz_assert(set.port >= -1 && set.port <= 65535);
    settings_clear(&set);
    buf_free(&errs);
    return 0;
}

#elif FUZZ_TARGET == FUZZ_DURATION

/* The input as a C string (parsers that take one stop at a NUL anyway). */
static char *fuzz_cstring(const uint8_t *data, size_t size)
{
    char *s = xcalloc(1, size + 1);
    memcpy(s, data, size);
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = fuzz_cstring(data, size);
    int64_t ms = -1;
    const char *why = NULL;
    if (duration_parse(s, &ms, &why) == 0) {
        fuzz_assert(ms >= 0 && ms <= DURATION_MAX_MS);
        struct buf out = { 0 };
        duration_render(ms, &out);
        fuzz_assert(out.data && out.len > 0);
        buf_free(&out);
    } else {
        fuzz_assert(why != NULL);
    }
    free(s);
    return 0;
}

#elif FUZZ_TARGET == FUZZ_BASE64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct buf out = { 0 };
    const char *why = NULL;
    if (base64_decode_lenient((const char *)data, size, &out, &why) == 0)
        fuzz_assert(out.len <= size / 4 * 3);    /* whole groups only */
    else
        fuzz_assert(why != NULL);
    buf_free(&out);
    return 0;
}

#elif FUZZ_TARGET == FUZZ_VERSION

static struct server fuzz_srv;   /* only its TLS priority and credentials */

/* Feed the version reader over a socketpair, `chunk` bytes at a time, the
 * way a slow peer would.  When the line is accepted, whatever followed the
 * newline must still be in the socket, untouched, for the TLS handshake. */
static void fuzz_version_reader(const uint8_t *data, size_t size, size_t chunk)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return;
    if (cloexec(sv[0], true) < 0 || cloexec(sv[1], true) < 0) {
        close(sv[0]);
        close(sv[1]);
        return;
    }
    struct conn cn;
    memset(&cn, 0, sizeof cn);
    cn.fd = sv[0];
    cn.state = CONN_VERSION;
    snprintf(cn.peer, sizeof cn.peer, "[fuzz]:0");
    fuzz_srv.nconns = 1;
    size_t sent = 0;
    bool shut = false;
    enum step r = STEP_WAIT;
    /* each turn sends a chunk or half-closes: at most size + 1 turns */
    while (r == STEP_WAIT && !shut) {
        if (sent < size) {
            size_t n = size - sent < chunk ? size - sent : chunk;
            ssize_t w = send(sv[1], data + sent, n, MSG_NOSIGNAL);
            if (w <= 0)
                break;
            sent += (size_t)w;
        } else {
            shutdown(sv[1], SHUT_WR);
            shut = true;
        }
        r = conn_do_version(&fuzz_srv, &cn);
    }
    /* the line ends at the first "\n", "\r\n" or lone "\r" */
    size_t end = 0;
    while (end < sent && data[end] != '\n' && data[end] != '\r')
        end++;
    size_t used = end + 1 + (end + 1 < sent && data[end] == '\r' && data[end + 1] == '\n');
    if (r == STEP_NEXT) {
        fuzz_assert(cn.state == CONN_HANDSHAKE && cn.tls != NULL);
        fuzz_assert(end < sent && end < VERSION_LINE_MAX);
        size_t rest = sent - used;
        uint8_t *got = xcalloc(1, rest + 1);
        ssize_t n = rest ? recv(sv[0], got, rest + 1, 0) : 0;
        fuzz_assert(n == (ssize_t)rest && memcmp(got, data + used, rest) == 0);
        free(got);
    } else if (r == STEP_WAIT) {
        /* only if a send failed: after the half-close, EOF must end it */
        fuzz_assert(!shut);
    }
    conn_close(&fuzz_srv, &cn);
    close(sv[1]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fuzz_srv.priority) {
        const char *prio = NULL;    /* the built-in default, from the option table */
        for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++)
            if (opts[i].key && !strcmp(opts[i].key, "priority"))
                prio = opts[i].builtin;
        if (!prio || gnutls_priority_init(&fuzz_srv.priority, prio, NULL) != GNUTLS_E_SUCCESS
            || gnutls_certificate_allocate_credentials(&fuzz_srv.cred) != GNUTLS_E_SUCCESS)
            abort();
    }
    if (size == 0)
        return 0;
    /* the rule on the bytes as they are (NULs and all) */
    char why[80];
    version_line_accepted((const char *)data + 1, size - 1, why, sizeof why);
    /* the first byte sets the chunk size; keep the stream within what a
     * socket buffer takes without blocking */
    size_t chunk = (size_t)data[0] % 16 + 1;
    fuzz_version_reader(data + 1, size - 1 < 4096 ? size - 1 : 4096, chunk);
    return 0;
}

#elif FUZZ_TARGET == FUZZ_STATE

/* The configuration the state files of the seed corpus were saved from
 * (t/fuzz/corpus/state/valid-*), so that restoring reconciles real fields. */
static const char fuzz_state_clients[] =
    "[DEFAULT]\nchecker = true %%(created)s %%(last_enabled)s %%(last_checked_ok)s\n"
    "interval = PT1M\n"
    "[alpha]\nsecret = aGVsbG8=\nhost = alpha.example.org\ntimeout = PT5M\n"
    "[beta]\nsecret = d29ybGQ=\nenabled = false\napproval_delay = PT30S\n"
    "[gamma delta]\nsecret = eA==\nhost = a\\b\tc\napproved_by_default = no\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct buf errs = { 0 };
    struct diag d = { .file = "clients.state", .capture = &errs };
    struct client_table saved = { 0 };
    if (state_parse((const char *)data, size, &d, &saved) > 0) {
        fuzz_assert(errs.data && strncmp(errs.data, "clients.state:", 14) == 0);
        client_table_clear(&saved);
        buf_free(&errs);
        return 0;
    }
    /* restore, as start-up does, then save and read back: the server must
     * always be able to read what it wrote */
    struct client_table clients = { 0 };
    struct diag dc = { .file = "clients.conf", .capture = &errs };
    clients_from_buffer(fuzz_state_clients, sizeof fuzz_state_clients - 1, "/nonexistent",
                        -1, &dc, &clients);
    fuzz_assert(dc.count == 0 && clients.n == 3);
    state_apply(&clients, &saved);
    for (size_t i = 0; i < clients.n; i++) {
        struct buf cmd = { 0 };
        checker_expand(clients.v[i], &cmd);    /* renders restored times */
        buf_free(&cmd);
    }
    struct buf out = { 0 };
    state_serialise(&clients, mono_ms(), wall_us(), &out);
    struct client_table back = { 0 };
    struct diag d2 = { .file = "clients.state", .capture = &errs };
    int bad = state_parse(out.data, out.len, &d2, &back);
    if (bad)
        fprintf(stderr, "fuzz: re-reading our own state failed:\n%s\n", errs.data);
    fuzz_assert(bad == 0 && back.n == clients.n);
    for (size_t i = 0; i < back.n; i++) {
        fuzz_assert(streq(back.v[i]->name, clients.v[i]->name));
        fuzz_assert(back.v[i]->cur.enabled == clients.v[i]->cur.enabled);
        fuzz_assert(streq(back.v[i]->cur.host, clients.v[i]->cur.host));
        fuzz_assert(streq(back.v[i]->cur.checker, clients.v[i]->cur.checker));
    }
    client_table_clear(&back);
    client_table_clear(&clients);
    buf_free(&out);
    buf_free(&errs);
    return 0;
}

#else
#error "unknown FUZZ_TARGET"
#endif
