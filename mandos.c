/*
 * mandos.c - a small Mandos server in one C99 file.
 *
 * Mandos lets a machine with an encrypted root file system reboot with no one
 * typing the passphrase.  Its initial RAM disk runs mandos-client, which finds
 * this server by Zeroconf (_mandos._tcp), connects, sends "1\r\n" and runs TLS
 * with the roles swapped: this server is the TLS *client*.  The peer's raw
 * public key (RFC 7250) hashes to a key_id; the client of that key_id in
 * clients.conf, if enabled and approved, is sent its stored secret.  A checker
 * command per client confirms that the machine is where it belongs; a client
 * not confirmed within its timeout is disabled.
 *
 * Map of this file, in order:
 *   1. Portability and includes   feature macros, platform shims
 *   2. Small utilities            time, memory, buffers, strings, encodings
 *   3. Logging                    syslog and console, config error reports
 *   4. Config and durations       the INI dialect, value parsers, options
 *   5. Clients                    the client table and life cycle
 *   6. Checkers                   running and reaping checker commands
 *   7. Persistence                the state file
 *   8. Network and TLS            listening socket, connection state machine
 *   9. Zeroconf                   Avahi / dns_sd / no back end
 *  10. D-Bus                      the control API of mandos-ctl (sd-bus)
 *  11. Main and options           command line, start-up, the poll() loop
 *  12. Self-tests                 run by `mandos --check`
 *
 * One process, one poll() loop sleeping until the nearest deadline; sockets
 * are non-blocking, so one slow client cannot stall the others.
 */

/* ===================================================================== */
/* 1. Portability and includes                                           */
/*    The only #if blocks elsewhere: Zeroconf (section 9), D-Bus (10).    */
/* ===================================================================== */

/* POSIX.1-2008 with XSI, plus each system's extras, hidden by a POSIX level. */
#define _POSIX_C_SOURCE 200809L
#define _XOPEN_SOURCE 700
#if defined(__linux__)
#define _GNU_SOURCE 1          /* glibc, musl: setgroups, close_range */
#include <sys/prctl.h>         /* PR_SET_DUMPABLE */
#elif defined(__APPLE__)
#define _DARWIN_C_SOURCE 1     /* IP_BOUND_IF, setgroups */
#elif defined(__sun)
#define __EXTENSIONS__ 1       /* illumos: IP_BOUND_IF, setgroups */
#elif defined(__OpenBSD__)
#define _BSD_SOURCE 1          /* pledge, unveil, setgroups */
#elif defined(__NetBSD__)
#define _NETBSD_SOURCE 1       /* setgroups */
#elif defined(__FreeBSD__) || defined(__DragonFly__)
#define __BSD_VISIBLE 1        /* setgroups, close_range */
#endif

#ifndef HAVE_AVAHI
#define HAVE_AVAHI 0
#endif
#ifndef HAVE_DNS_SD
#define HAVE_DNS_SD 0
#endif
#ifndef HAVE_DBUS
#define HAVE_DBUS 0                  /* 1: the D-Bus API through sd-bus */
#endif

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <limits.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#ifdef __GLIBC__
#include <malloc.h>                /* malloc_trim */
#endif
#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#if HAVE_AVAHI && HAVE_DNS_SD
#error "choose one Zeroconf back end: HAVE_AVAHI or HAVE_DNS_SD"
#elif HAVE_AVAHI
#include <avahi-client/client.h>
#include <avahi-client/publish.h>
#include <avahi-common/alternative.h>
#include <avahi-common/error.h>
#include <avahi-common/malloc.h>
#include <avahi-common/simple-watch.h>
#define ZEROCONF_NAME "avahi"
#elif HAVE_DNS_SD
#include <dns_sd.h>
#define ZEROCONF_NAME "dnssd"
#else
#define ZEROCONF_NAME "none"
#endif
#define ZC_AVAILABLE (HAVE_AVAHI || HAVE_DNS_SD)  /* a plain expression, usable in C code */
#if HAVE_DBUS
#include <systemd/sd-bus.h>
#endif

#if GNUTLS_VERSION_NUMBER < 0x030606
#error "mandos.c needs GnuTLS 3.6.6 or later (raw public key support)"
#endif

#define MANDOS_VERSION "1.8.16"     /* the protocol/manual version we mirror */
#define MANDOS_C_VERSION "0.1"

#if defined(__GNUC__) || defined(__clang__)
#define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))
#define UNUSED __attribute__((unused))   /* a parameter some builds ignore */
#else
#define PRINTF_LIKE(f, a)
#define UNUSED
#endif

/* make mandos-portable: Debian compiles and tests the fallbacks below. */
#if defined(MANDOS_PORTABLE) && MANDOS_PORTABLE
#undef SO_BINDTODEVICE
#undef CLOSE_RANGE_CLOEXEC
#undef PR_SET_DUMPABLE
#endif

/* No descriptor may reach a checker: files are opened with O_CLOEXEC, sockets
 * and pipes marked here (SOCK_CLOEXEC is not everywhere).  -1: caller closes. */
static int cloexec(int fd, bool nonblock)
{
    if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return -1;
    return nonblock && fcntl(fd, F_SETFL, O_NONBLOCK) < 0 ? -1 : 0;
}

/* Inherited descriptors are marked, not closed (syslog, GnuTLS hold some): by
 * close_range, or each number up to the limit (/dev/fd may list only 0-2). */
static void cloexec_inherited(void)
{
#ifdef CLOSE_RANGE_CLOEXEC
    if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) == 0)
        return;
#endif
    long max = sysconf(_SC_OPEN_MAX);
    if (max < 0 || max > 1L << 20)
        max = 1L << 20;
    for (int fd = 3; fd < max; fd++)
        fcntl(fd, F_SETFD, FD_CLOEXEC);     /* EBADF for the unused ones */
}

/* SO_BINDTODEVICE (Linux) or IP_BOUND_IF (macOS, illumos).  -1 with ENODEV
 * if there is no such interface, ENOPROTOOPT if the system cannot bind. */
static int shim_bind_to_device(int fd UNUSED, int family UNUSED, const char *ifname)
{
    unsigned int index = if_nametoindex(ifname);
    errno = ENODEV;
    if (index == 0)
        return -1;
#if defined(SO_BINDTODEVICE)
    return setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, ifname, (socklen_t)strlen(ifname) + 1);
#elif defined(IP_BOUND_IF) && defined(IPV6_BOUND_IF)
    if (family == AF_INET6)
        return setsockopt(fd, IPPROTO_IPV6, IPV6_BOUND_IF, &index, sizeof index);
    return setsockopt(fd, IPPROTO_IP, IP_BOUND_IF, &index, sizeof index);
#else
    errno = ENOPROTOOPT;
    return -1;
#endif
}

/* No core file, which would hold every secret; where the system can, no
 * debugger or /proc reader of our uid either.  Again after a uid change,
 * which resets the flag to fs.suid_dumpable. */
static void shim_no_core_dumps(void)
{
    setrlimit(RLIMIT_CORE, &(struct rlimit){ 0, 0 });
#ifdef PR_SET_DUMPABLE
    prctl(PR_SET_DUMPABLE, 0);
#endif
}

/* Reading clients.conf frees much of what it allocated, scattered between
 * the clients it keeps; glibc leaves those pages resident unless asked. */
static void shim_release_memory(void)
{
#ifdef __GLIBC__
    malloc_trim(0);
#endif
}

/* OpenBSD, once Zeroconf, D-Bus and the password file are open: keep only
 * the paths and calls the running server needs.  Elsewhere: nothing. */
static int sandbox_enter(const char *configdir UNUSED, const char *statedir UNUSED)
{
#ifdef __OpenBSD__
    unveil("/bin/sh", "x");
    unveil("/dev/null", "rw");
    unveil("/var/run/dbus/system_bus_socket", "rw");
    unveil("/var/run/mDNSResponder", "rw");
    unveil(configdir, "r");
    unveil(statedir, "rwc");
    if (unveil(NULL, NULL) != 0)
        return -1;
    return pledge("stdio rpath wpath cpath inet unix dns proc exec", NULL);
#else
    return 0;
#endif
}

/* ===================================================================== */
/* 2. Small utilities                                                    */
/*    Clocks, memory, buffers, strings, hex, a name index, base64, files. */
/* ===================================================================== */

/* Every timer and deadline counts milliseconds on the monotonic clock;
 * timestamps people read are wall-clock microseconds since the epoch. */
static int64_t clock_us(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}
#define mono_ms() (clock_us(CLOCK_MONOTONIC) / 1000)
#define wall_us() clock_us(CLOCK_REALTIME)

/* Out of memory is not worth recovering from in a daemon this small. */
static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) {
        fputs("mandos: out of memory\n", stderr);
        abort();
    }
    return p;
}

static char *xstrndup(const char *s, size_t n)
{
    char *p = xcalloc(1, n + 1);
    memcpy(p, s, n);
    return p;
}

static char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

/* A memset the optimiser may not drop: secrets must really go. */
static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--)
        *v++ = 0;
}

static void free_wiped(char *s)
{
    wipe(s, s ? strlen(s) : 0);
    free(s);
}

/* Grow an array of `size`-byte items to hold `need`.  Not realloc: the old
 * block is wiped, as it may hold a secret. */
static void grow(void **arr, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return;
    size_t ncap = *cap ? *cap * 2 : 8;
    while (ncap < need)
        ncap *= 2;
    void *fresh = xcalloc(ncap, size);
    if (*cap)
        memcpy(fresh, *arr, *cap * size);
    wipe(*arr, *cap * size);
    free(*arr);
    *arr = fresh;
    *cap = ncap;
}

/* A growable byte buffer; once anything is added, NUL-terminated too. */
struct buf {
    char *data;
    size_t len, cap;
};

static void buf_add(struct buf *b, const void *p, size_t n)
{
    grow((void **)&b->data, &b->cap, b->len + n + 1, 1);
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void buf_adds(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

static void buf_addc(struct buf *b, char c)
{
    buf_add(b, &c, 1);
}

/* Formatted straight into the free space; a second pass if it was short. */
PRINTF_LIKE(2, 3)
static void buf_printf(struct buf *b, const char *fmt, ...)
{
    size_t room = 64;
    int n;
    do {
        grow((void **)&b->data, &b->cap, b->len + room, 1);
        va_list ap;
        va_start(ap, fmt);
        n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        room = (size_t)n + 1;
    } while (n >= 0 && (size_t)n >= b->cap - b->len);
    b->len += n > 0 ? (size_t)n : 0;
    b->data[b->len] = '\0';
}

/* Wiped: any buffer may have held a secret. */
static void buf_free(struct buf *b)
{
    wipe(b->data, b->cap);
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* Python's str.isspace() for ASCII: the INI dialect strips these. */
static bool is_blank(int c)
{
    return c && strchr(" \t\n\r\v\f\x1c\x1d\x1e\x1f", c);
}

static void trim_span(const char **s, size_t *n)
{
    for (; *n && is_blank((unsigned char)**s); (*n)--)
        (*s)++;
    while (*n && is_blank((unsigned char)(*s)[*n - 1]))
        (*n)--;
}

#define streq(a, b) (strcmp(a, b) == 0)

static int hex_value(int c)
{
    static const char digits[] = "0123456789abcdef";
    const char *hit = c ? strchr(digits, tolower(c)) : NULL;
    return hit ? (int)(hit - digits) : -1;
}

static void hex_encode_upper(const unsigned char *in, size_t n, char *out)
{
    for (size_t i = 0; i < 2 * n; i++)
        out[i] = "0123456789ABCDEF"[i % 2 ? in[i / 2] & 15 : in[i / 2] >> 4];
    out[2 * n] = '\0';
}

/* Decode exactly 2*n hex digits; -1 on anything else. */
static int hex_decode(const char *s, unsigned char *out, size_t n)
{
    if (strlen(s) != 2 * n)
        return -1;
    for (size_t i = 0; i < 2 * n; i++) {
        int v = hex_value((unsigned char)s[i]);
        if (v < 0)
            return -1;
        out[i / 2] = (unsigned char)(i % 2 ? out[i / 2] << 4 | v : v);
    }
    return 0;
}

/* Open addressing from names to array positions: O(1) with thousands of
 * clients.  A slot keeps the name's pointer: the array may move, its names
 * (each allocated on its own) may not. */
struct name_index {
    struct name_slot {
        const char *name;        /* NULL: empty */
        size_t pos;
    } *slot;
    size_t cap, used;            /* cap: a power of two, over twice `used` */
};

/* The slot holding `name`, or else the empty slot where it would go. */
static struct name_slot *name_index_slot(const struct name_index *ix, const char *name)
{
    uint64_t h = 14695981039346656037ULL;    /* FNV-1a */
    for (const char *s = name; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    size_t i = (size_t)h & (ix->cap - 1);
    while (ix->slot[i].name && !streq(ix->slot[i].name, name))
        i = (i + 1) & (ix->cap - 1);
    return &ix->slot[i];
}

static size_t name_index_find(const struct name_index *ix, const char *name)
{
    struct name_slot *slot = ix->cap ? name_index_slot(ix, name) : NULL;
    return slot && slot->name ? slot->pos : SIZE_MAX;
}

/* A name already in the index keeps its first position. */
static void name_index_add(struct name_index *ix, const char *name, size_t pos)
{
    if ((ix->used + 1) * 2 > ix->cap) {
        struct name_index old = *ix;
        ix->cap = old.cap ? old.cap * 2 : 16;
        ix->slot = xcalloc(ix->cap, sizeof *ix->slot);
        for (size_t i = 0; i < old.cap; i++)
            if (old.slot[i].name)
                *name_index_slot(ix, old.slot[i].name) = old.slot[i];
        free(old.slot);
    }
    struct name_slot *slot = name_index_slot(ix, name);
    if (!slot->name) {
        *slot = (struct name_slot){ name, pos };
        ix->used++;
    }
}

static void name_index_free(struct name_index *ix)
{
    free(ix->slot);
    memset(ix, 0, sizeof *ix);
}

/* Lenient base64, the way the reference decodes `secret`: bytes outside the
 * alphabet are skipped, a '=' that cannot be padding is ignored, padding
 * that completes a group ends the data.  Returns 0, or -1 with *why set. */
static int base64_decode_lenient(const char *in, size_t n, struct buf *out,
                                 const char **why)
{
    static const char alphabet[] =      /* strchr finds no byte >= 0x80 here */
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned bits = 0;           /* the group so far, six bits a character */
    int quad = 0, pads = 0;
    grow((void **)&out->data, &out->cap, out->len + n / 4 * 3 + 4, 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)in[i];
        const char *hit = c ? strchr(alphabet, c) : NULL;
        if (c == '=' && quad >= 2 && quad + ++pads >= 4)
            return 0;            /* completed padding: the rest is ignored */
        if (!hit)
            continue;            /* blanks, newlines, '-', '_', a stray '=' ... */
        pads = 0;
        bits = bits << 6 | (unsigned)(hit - alphabet);
        if (quad > 0)            /* the 2nd, 3rd and 4th character end a byte */
            buf_addc(out, (char)(bits >> (6 - 2 * quad) & 0xff));
        quad = (quad + 1) % 4;
    }
    if (quad == 1)
        *why = "bad base64: one character too many (length is 1 more than a multiple of 4)";
    else if (quad != 0)
        *why = "bad base64: incorrect padding";
    return quad ? -1 : 0;
}

#define FILE_MAX_MIB 256         /* no file we read comes near; /dev/zero would */
#define FILE_MAX ((size_t)FILE_MAX_MIB << 20)

/* What a failed open means; O_NOFOLLOW fails with ELOOP on a symbolic link. */
static const char *open_error(void)
{
    return errno == ELOOP ? "a symbolic link, which is not followed" : strerror(errno);
}

/* The one way every file is read, appended to `out`: opened without
 * blocking (a FIFO would stop the loop), a regular file only, at most
 * FILE_MAX_MIB.  `own` (the state file): no symbolic link, and owned by
 * us or root.  NULL, or why not; errno is ENOENT only for a missing file.
 * Read straight into the buffer, which wipes what it leaves behind. */
static const char *read_file_at(int dirfd, const char *path, bool own, struct buf *out)
{
    static char why[80];
    struct stat st;
    ssize_t r = 1;
    int fd = openat(dirfd, path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | (own ? O_NOFOLLOW : 0));
    if (fd < 0)
        return open_error();
    why[0] = '\0';
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        snprintf(why, sizeof why, "not a regular file");
    else if (own && st.st_uid != geteuid() && st.st_uid != 0)
        snprintf(why, sizeof why, "owned by uid %ld, not by uid %ld or root",
                 (long)st.st_uid, (long)geteuid());
    for (size_t start = out->len; !why[0] && r != 0;) {
        grow((void **)&out->data, &out->cap, out->len + 4096, 1);
        r = read(fd, out->data + out->len, out->cap - out->len - 1);
        out->len += r > 0 ? (size_t)r : 0;
        out->data[out->len] = '\0';
        if (r < 0 && errno != EINTR)
            snprintf(why, sizeof why, "%s", strerror(errno));
        else if (out->len - start > FILE_MAX || (size_t)st.st_size > FILE_MAX)
            snprintf(why, sizeof why, "larger than %d MiB", FILE_MAX_MIB);
    }
    close(fd);
    errno = 0;
    return why[0] ? why : NULL;
}

/* Our PID as the whole content of a PID file or lock file. */
static int pid_write(int fd)
{
    char text[32];
    int n = snprintf(text, sizeof text, "%ld\n", (long)getpid());
    return ftruncate(fd, 0) == 0 && pwrite(fd, text, (size_t)n, 0) == n ? 0 : -1;
}

/* ===================================================================== */
/* 3. Logging                                                            */
/*    Process-wide, like syslog(3).  Secrets never pass through here.     */
/* ===================================================================== */

static struct {
    int threshold;        /* LOG_ERR .. LOG_DEBUG: lines above it are dropped */
    bool console;         /* --debug: also to stderr with a timestamp */
    bool syslog_open;     /* openlog() done */
    const char *progname; /* basename of argv[0], for console lines */
} log_cfg = { LOG_WARNING, false, false, "mandos" };

/* The reference's level names, by syslog level (LOG_EMERG 0 .. LOG_DEBUG 7). */
static const char *const log_level_names[8] = {
    "CRITICAL", "CRITICAL", "CRITICAL", "ERROR", "WARNING", "INFO", "INFO", "DEBUG"
};

static void log_open_syslog(const char *servicename)
{
    static char ident[128];      /* syslog keeps the pointer */
    if (!servicename || streq(servicename, "Mandos"))
        snprintf(ident, sizeof ident, "mandos");
    else
        snprintf(ident, sizeof ident, "mandos (%s)", servicename);
    if (log_cfg.syslog_open)
        closelog();
    openlog(ident, LOG_PID | LOG_NDELAY, LOG_DAEMON);
    log_cfg.syslog_open = true;
}

/* Bytes from outside made safe for one log line: control bytes (newline,
 * ESC, NUL...) become \xHH; `strict` (raw peer bytes) also escapes '\\'
 * and every byte above 0x7E, so that a line of it is plain ASCII. */
static void escape_for_log(const char *in, size_t n, char *out, size_t outlen, bool strict)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < outlen; i++) {
        unsigned char ch = (unsigned char)in[i];
        if (ch >= 0x20 && ch != 0x7f && (!strict || (ch < 0x7f && ch != '\\')))
            out[o++] = (char)ch;
        else
            o += (size_t)snprintf(out + o, outlen - o, "\\x%02X", ch);
    }
    out[o] = '\0';
}

/* Every log line passes here: host names, D-Bus values, checker command
 * lines and the like cannot start a line of their own or reach a terminal
 * as escape sequences. */
static void log_format(char *out, size_t outlen, const char *fmt, va_list ap)
{
    char raw[2048];
    vsnprintf(raw, sizeof raw, fmt, ap);
    escape_for_log(raw, strlen(raw), out, outlen, false);
}

/* To syslog; to stderr with --debug or before syslog is open, as the
 * reference's --debug: "2026-01-31 12:00:00,123 mandos [42]: INFO: msg". */
PRINTF_LIKE(2, 3)
static void log_msg(int level, const char *fmt, ...)
{
    if (level > log_cfg.threshold)
        return;
    char msg[4 * 2048 + 1];
    va_list ap;
    va_start(ap, fmt);
    log_format(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *name = log_level_names[level & 7];
    if (log_cfg.syslog_open)
        syslog(level, "%s: %s", name, msg);
    if (log_cfg.syslog_open && !log_cfg.console)
        return;
    int64_t us = wall_us();
    time_t t = (time_t)(us / 1000000);
    struct tm tm;
    char when[32];
    localtime_r(&t, &tm);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
    fprintf(stderr, "%s,%03d %s [%ld]: %s: %s\n", when, (int)(us / 1000 % 1000),
            log_cfg.progname, (long)getpid(), name, msg);
}

#define log_err(...) log_msg(LOG_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARNING, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)

/* Start-up failures: say why on stderr (and the log) and exit 1. */
PRINTF_LIKE(1, 2)
static void fatal(const char *fmt, ...)
{
    va_list ap;
    char msg[4 * 2048 + 1];
    va_start(ap, fmt);
    log_format(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (log_cfg.syslog_open)
        syslog(LOG_CRIT, "CRITICAL: %s", msg);
    fprintf(stderr, "mandos: %s\n", msg);
    exit(1);
}

/* GnuTLS debug lines, as our debug lines; never its "INT:" key material. */
static void log_gnutls_line(int level UNUSED, const char *text)
{
    size_t n = strlen(text);
    if (strncmp(text, "INT:", 4) != 0)
        log_debug("GnuTLS: %.*s", (int)(n && text[n - 1] == '\n' ? n - 1 : n), text);
}

/* Where config errors go: stderr at start-up, the log on reload, a buffer
 * in the self-tests.  All are counted; past DIAG_SHOWN in a file, one line
 * counts the rest, so that bad lines cannot flood the log at each SIGHUP. */
#define DIAG_SHOWN 20
struct diag {
    const char *file;    /* shown as FILE:LINE: */
    int count, in_file;  /* errors so far, and in this file */
    bool to_log;         /* reload: log instead of stderr */
    struct buf *capture; /* self-tests: collect here */
};

static void diag_put(struct diag *d, const char *msg)
{
    if (d->capture)
        buf_printf(d->capture, "%s\n", msg);
    else if (d->to_log)
        log_err("%s", msg);
    else
        fprintf(stderr, "%s\n", msg);
}

PRINTF_LIKE(3, 4)
static void diag_error(struct diag *d, int line, const char *fmt, ...)
{
    char msg[2048];
    snprintf(msg, sizeof msg / 2, "%s:%d: ", d->file, line);
    size_t n = strlen(msg);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + n, sizeof msg - n, fmt, ap);
    va_end(ap);
    d->count++;
    if (++d->in_file <= DIAG_SHOWN)
        diag_put(d, msg);
}

/* The end of a file: how many of its errors were not shown. */
static void diag_end_file(struct diag *d)
{
    char msg[2048];
    int more = d->in_file - DIAG_SHOWN;
    snprintf(msg, sizeof msg, "%s: and %d more error%s", d->file, more, more == 1 ? "" : "s");
    if (more > 0)
        diag_put(d, msg);
    d->in_file = 0;
    d->file = NULL;
}

/* ===================================================================== */
/* 4. Config and durations                                               */
/*    A hand-written INI parser with the reference's dialect (DEFAULT     */
/*    inheritance, %(name)s, relative-indent continuations); parsers for  */
/*    durations, booleans and integers; the server's option table, which  */
/*    the command line, mandos.conf and --help all read.  Parsing works   */
/*    on a buffer so the self-tests can feed it strings.                  */
/* ===================================================================== */

struct ini_key {
    char *name;                  /* lower-cased */
    struct buf value;            /* raw (not interpolated), continuations joined */
    int line;
};

struct ini_section {
    char *name;                  /* case kept, spaces kept */
    int line;
    struct ini_key *keys;
    size_t nkeys, cap;
    struct name_index index;     /* key name -> position in keys */
};

/* sections[0] is always [DEFAULT]. */
struct ini {
    struct ini_section *sections;
    size_t n, cap;
    struct name_index names;     /* section name -> position */
    int refs_left;               /* of the %(name)s expansion under way */
};

/* Add a section named `name` (which it takes over). */
static struct ini_section *ini_add_section(struct ini *ini, char *name, int line)
{
    grow((void **)&ini->sections, &ini->cap, ini->n + 1, sizeof *ini->sections);
    ini->sections[ini->n] = (struct ini_section){ .name = name, .line = line };
    name_index_add(&ini->names, name, ini->n);
    return &ini->sections[ini->n++];
}

static void ini_free(struct ini *ini)
{
    for (size_t i = 0; i < ini->n; i++) {
        struct ini_section *s = &ini->sections[i];
        for (size_t k = 0; k < s->nkeys; k++) {
            free(s->keys[k].name);
            buf_free(&s->keys[k].value);     /* values may be secrets */
        }
        free(s->keys);
        free(s->name);
        name_index_free(&s->index);
    }
    free(ini->sections);
    name_index_free(&ini->names);
}

static struct ini_section *ini_find_section(struct ini *ini, const char *name)
{
    size_t pos = name_index_find(&ini->names, name);
    return pos == SIZE_MAX ? NULL : &ini->sections[pos];
}

static struct ini_key *ini_find_key(struct ini_section *s, const char *name)
{
    size_t pos = name_index_find(&s->index, name);
    return pos == SIZE_MAX ? NULL : &s->keys[pos];
}

/* A finished value, copied to its size: a value grows by doubling, and
 * thousands of clients should not keep the room it had to grow. */
static void ini_value_fit(struct ini_key *key)
{
    if (!key || key->value.cap == key->value.len + 1)
        return;
    struct buf fit = { xstrndup(key->value.data, key->value.len), key->value.len,
                       key->value.len + 1 };
    buf_free(&key->value);
    key->value = fit;
}

/* A header "[name]": a new section, [DEFAULT] again, or a duplicate,
 * which goes to `dropped` instead. */
static struct ini_section *ini_header(struct ini *ini, struct ini *dropped, const char *s,
                                      size_t n, int lineno, struct diag *diag)
{
    char *name = xstrndup(s, n);
    struct ini_section *old = ini_find_section(ini, name);
    if (old == ini->sections) {
        free(name);
        return old;
    }
    if (old)
        diag_error(diag, lineno, "duplicate section [%s] (first at line %d)", name, old->line);
    return ini_add_section(old ? dropped : ini, name, lineno);
}

/* "key = value" or "key: value" into `sec`: the new key, NULL after a
 * duplicate, or `prev` (which may still continue) after a bad line. */
static struct ini_key *ini_option(struct ini_section *sec, struct ini_key *prev, const char *s,
                                  size_t n, int lineno, struct diag *diag)
{
    size_t d = 0;
    while (d < n && s[d] != '=' && s[d] != ':')
        d++;
    if (d == n) {
        /* the line itself is not shown: it may be part of a secret */
        diag_error(diag, lineno, "not \"key = value\" (a value's continuation "
                   "lines must be indented more than its key)");
        return prev;     /* like the reference, the previous option may continue */
    }
    if (d == 0) {
        diag_error(diag, lineno, "empty key before '%c'", s[d]);
        return prev;
    }
    const char *v = s + d + 1;
    size_t kn = d, vn = n - d - 1;
    trim_span(&s, &kn);
    trim_span(&v, &vn);
    char *name = xstrndup(s, kn);
    for (char *c = name; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    struct ini_key *dup = ini_find_key(sec, name);
    if (dup) {
        diag_error(diag, lineno, "duplicate key \"%s\" in [%s] (first at line %d)",
                   name, sec->name, dup->line);
        free(name);
        return NULL;
    }
    grow((void **)&sec->keys, &sec->cap, sec->nkeys + 1, sizeof *sec->keys);
    struct buf value = { xstrndup(v, vn), vn, vn + 1 };   /* exact: most stay one line */
    sec->keys[sec->nkeys] = (struct ini_key){ name, value, lineno };
    name_index_add(&sec->index, name, sec->nkeys);
    return &sec->keys[sec->nkeys++];
}

/* Well-formed UTF-8, as Python decodes the files: no overlong forms, no
 * surrogates, nothing past U+10FFFF. */
static bool utf8_valid(const unsigned char *s, size_t n)
{
    for (size_t i = 0, len; i < n; i += len) {
        unsigned c = s[i];
        len = c < 0x80 ? 1 : c < 0xc2 ? 0 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf5 ? 4 : 0;
        if (len == 0 || i + len > n)
            return false;
        for (size_t k = 1; k < len; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
        unsigned second = len > 1 ? s[i + 1] : 0x80;
        if ((c == 0xe0 && second < 0xa0) || (c == 0xed && second > 0x9f)
            || (c == 0xf0 && second < 0x90) || (c == 0xf4 && second > 0x8f))
            return false;
    }
    return true;
}

/* Parse a file's bytes into `ini` (free with ini_free); lines end in \n, \r\n or \r. */
static void ini_parse_buffer(struct ini *ini, const char *data, size_t len, struct diag *diag)
{
    struct ini dropped = { .n = 0 };
    struct ini_section *sec = NULL;
    struct ini_key *key = NULL;  /* the option that may continue */
    int lineno = 0, indent = 0;  /* indent: of the last option or header */
    int blanks = 0;              /* blank lines inside the value so far */
    *ini = (struct ini){ .n = 0 };
    ini_add_section(ini, xstrdup("DEFAULT"), 0);
    for (size_t i = 0, start; i < len; i++) {
        for (start = i; i < len && data[i] != '\n' && data[i] != '\r'; i++)
            continue;
        const char *s = data + start;
        size_t n = i - start;
        if (i + 1 < len && data[i] == '\r' && data[i + 1] == '\n')
            i++;
        lineno++;
        /* D-Bus strings must be UTF-8, and a NUL would cut a value short */
        const char *bad = memchr(s, '\0', n) ? "line contains a NUL byte"
            : !utf8_valid((const unsigned char *)s, n) ? "line is not valid UTF-8" : NULL;
        if (bad) {
            diag_error(diag, lineno, "%s", bad);
            continue;
        }
        trim_span(&s, &n);
        int depth = (int)(s - data - start);
        /* Blank lines inside a value are kept if more value follows;
         * comment lines are dropped and do not end the value. */
        if (n == 0 || s[0] == '#' || s[0] == ';') {
            if (n == 0 && key)
                blanks++;
            continue;
        }
        if (key && depth > indent) {
            for (; blanks >= 0; blanks--)
                buf_addc(&key->value, '\n');
            buf_add(&key->value, s, n);
            blanks = 0;
            continue;
        }
        ini_value_fit(key);
        blanks = 0;
        indent = depth;
        /* A header is "[" + at least one character + the last "]" on the
         * line; anything after that "]" is ignored, as the reference does. */
        size_t close = n;
        while (close > 0 && s[close - 1] != ']')
            close--;
        if (s[0] == '[' && close >= 3) {
            sec = ini_header(ini, &dropped, s + 1, close - 2, lineno, diag);
            key = NULL;
        } else if (sec) {
            key = ini_option(sec, key, s, n, lineno, diag);
        } else {
            diag_error(diag, lineno, "a line before any [section] header");
        }
    }
    ini_value_fit(key);
    ini_free(&dropped);
}

/* Built-in defaults visible to interpolation, like the reference's. */
struct ini_default {
    const char *name, *value;
};

/* Look a name up: the section, then [DEFAULT], then the built-ins. */
static const char *ini_lookup(struct ini *ini, struct ini_section *sec, const char *name,
                              const struct ini_default *builtin, int *line)
{
    struct ini_key *k = ini_find_key(sec, name);
    if (!k)
        k = ini_find_key(&ini->sections[0], name);
    if (k && line)
        *line = k->line;
    if (k)
        return k->value.data;
    while (builtin && builtin->name && !streq(builtin->name, name))
        builtin++;
    return builtin && builtin->name ? builtin->value : NULL;
}

#define INI_MAX_DEPTH 10
/* References fanning out (each level naming the next several times) grow
 * exponentially within the depth limit: bound the work and the result. */
#define INI_MAX_REFS 1000
#define INI_MAX_VALUE (1024 * 1024)

/* Expand %(name)s and %% in `raw` onto `out`; `depth` is 1 at the top.
 * Returns 0, or -1 with a message in `why` (the caller adds file and line). */
static int ini_interpolate(struct ini *ini, struct ini_section *sec, const char *raw,
                           const struct ini_default *builtin, int depth, struct buf *out,
                           char *why, size_t whylen)
{
    buf_add(out, "", 0);         /* a string even when nothing is added */
    if (depth == 1)
        ini->refs_left = INI_MAX_REFS;
    if (depth > INI_MAX_DEPTH && strchr(raw, '%')) {   /* Python's rule */
        snprintf(why, whylen, "%%(name)s references nest deeper than %d levels",
                 INI_MAX_DEPTH);
        return -1;
    }
    for (const char *p = raw; *p;) {
        if (out->len > INI_MAX_VALUE) {
            snprintf(why, whylen, "value longer than %d bytes after %%(name)s expansion",
                     INI_MAX_VALUE);
            return -1;
        }
        size_t plain = strcspn(p, "%");
        bool twice = p[plain] && p[plain + 1] == '%';     /* "%%" is one '%' */
        buf_add(out, p, plain + twice);
        p += plain + 2 * twice;
        if (twice || !*p)
            continue;
        const char *close = p[1] == '(' ? strchr(p + 2, ')') : NULL;
        bool bad = true;
        if (p[1] != '(')
            snprintf(why, whylen, "'%%' must be followed by '%%' or '(' "
                     "(write %%%% for a literal %%)");
        else if (!close || close == p + 2 || close[1] != 's')
            snprintf(why, whylen, "bad reference \"%.40s\" (expected %%(name)s)", p);
        else if (--ini->refs_left < 0)
            snprintf(why, whylen, "%%(name)s references expand more than %d times",
                     INI_MAX_REFS);
        else
            bad = false;
        if (bad)
            return -1;
        char *name = xstrndup(p + 2, (size_t)(close - p - 2));
        for (char *c = name; *c; c++)
            *c = (char)tolower((unsigned char)*c);
        const char *val = ini_lookup(ini, sec, name, builtin, NULL);
        if (!val)
            snprintf(why, whylen, "%%(%s)s refers to a key that is not set", name);
        free(name);
        if (!val || ini_interpolate(ini, sec, val, builtin, depth + 1, out, why, whylen) < 0)
            return -1;
        p = close + 2;
    }
    return 0;
}

/* ---- Value parsers ---------------------------------------------------- */

/* Booleans as the reference reads them (case-insensitive). */
static int parse_bool(const char *s, bool *out)
{
    static const char *const words[] = { "0", "no", "false", "off", "1", "yes", "true", "on" };
    for (size_t i = 0; i < 8; i++)
        if (strcasecmp(s, words[i]) == 0) {
            *out = i >= 4;
            return 0;
        }
    return -1;
}

/* Integers as Python's int() reads them: blanks around, a sign, digits
 * with single underscores between them.  Saturates instead of overflowing
 * (*overflow set), so the version-line rule can still compare. */
static int parse_pyint(const char *s, size_t n, long long *out, bool *overflow)
{
    trim_span(&s, &n);
    bool neg = n && *s == '-';
    size_t i = n && (*s == '-' || *s == '+') ? 1 : 0;
    long long v = 0;
    *overflow = false;
    if (i == n || !isdigit((unsigned char)s[i]) || s[n - 1] == '_')
        return -1;
    for (; i < n; i++) {
        int d = s[i] - '0';
        if (s[i] == '_' && s[i + 1] != '_')
            continue;
        if (!isdigit((unsigned char)s[i]))
            return -1;
        *overflow = *overflow || v > (LLONG_MAX - d) / 10;
        v = *overflow ? LLONG_MAX : v * 10 + d;
    }
    *out = neg ? -v : v;
    return 0;
}

#define MS_PER_SECOND 1000LL
#define MS_PER_MINUTE (60 * MS_PER_SECOND)
#define MS_PER_HOUR (60 * MS_PER_MINUTE)
#define MS_PER_DAY (24 * MS_PER_HOUR)
#define MS_PER_WEEK (7 * MS_PER_DAY)
#define DURATION_MAX_MS (1000000000LL * MS_PER_DAY - 1)   /* Python's timedelta.max */
#define NOT_A_DURATION LLONG_MIN

/* The RFC 3339 form after its P, as the reference reads it: nW alone, or units
 * from YMD and then (after D, or at once) T and units from HMS, each run
 * consecutive but starting at any unit.  Upper case, no blanks. */
static long long duration_rfc3339(const char *p)
{
    static const char units[] = "YMDTHMSW";
    static const long long unit_ms[] = {   /* T has no number: its 1 adds 0 */
        364 * MS_PER_DAY, 28 * MS_PER_DAY, MS_PER_DAY, 1,
        MS_PER_HOUR, MS_PER_MINUTE, MS_PER_SECOND, MS_PER_WEEK
    };
    long long total = 0;
    int last = -1;               /* the unit before; 3 is T */
    for (const char *digits = p; *p; digits = ++p) {
        long long n = 0;
        for (; isdigit((unsigned char)*p); p++)
            n = n < DURATION_MAX_MS ? n * 10 + (*p - '0') : n;
        const char *u = *p ? strchr(units + (last < 3 ? 0 : 4), *p) : NULL;
        int i = u ? (int)(u - units) : -1;
        bool next = i == 7 ? last == -1 && !p[1]
            : last == -1 ? i >= 0 && i <= 3 : last == 3 || i == last + 1;
        if (i < 0 || !next || (i == 3) != (p == digits))
            return NOT_A_DURATION;
        /* a count too big for its unit saturates; duration_parse refuses it */
        total += n > DURATION_MAX_MS / unit_ms[i] ? DURATION_MAX_MS + 1 : n * unit_ms[i];
        last = i;
    }
    return last == -1 || last == 3 ? NOT_A_DURATION : total;
}

/* The old form: blank-separated tokens like "5m" or "1_0h", summed. */
static long long duration_old(const char *p)
{
    static const char units[] = "smhdw";
    static const long long unit_ms[] = {
        MS_PER_SECOND, MS_PER_MINUTE, MS_PER_HOUR, MS_PER_DAY, MS_PER_WEEK
    };
    long long total = 0;
    for (size_t n; *p; p += n) {
        while (is_blank((unsigned char)*p))
            p++;
        for (n = 0; p[n] && !is_blank((unsigned char)p[n]); n++)
            continue;
        const char *u = n ? strchr(units, p[n - 1]) : NULL;
        long long v = 0, unit = u ? unit_ms[u - units] : 1;
        bool overflow = false;
        if (n && (!u || parse_pyint(p, n - 1, &v, &overflow) < 0 || overflow
                  || llabs(v) > DURATION_MAX_MS / unit))
            return NOT_A_DURATION;
        total += v * unit;
        if (llabs(total) > DURATION_MAX_MS)
            return NOT_A_DURATION;
    }
    return total;
}

/* A duration in milliseconds: RFC 3339 form first, then the old form.
 * Negative results are refused here (the reference accepts "-5m"). */
static int duration_parse(const char *s, int64_t *ms, const char **why)
{
    long long v = *s == 'P' ? duration_rfc3339(s + 1) : duration_old(s);
    if (v == NOT_A_DURATION)
        *why = "not a duration (examples: PT5M, P1DT2H, or 5m, 1h 30m)";
    else if (v < 0)
        *why = "a duration cannot be negative";
    else if (v > DURATION_MAX_MS)
        *why = "duration too long";
    else
        *ms = v;
    return v >= 0 && v <= DURATION_MAX_MS ? 0 : -1;
}

/* Render like Python's timedelta: "0:05:00", "2 days, 1:02:03". */
static void duration_render(int64_t ms, struct buf *out)
{
    int64_t days = ms / MS_PER_DAY, rest = ms % MS_PER_DAY;
    if (days)
        buf_printf(out, "%" PRId64 " day%s, ", days, days == 1 ? "" : "s");
    buf_printf(out, "%d:%02d:%02d", (int)(rest / MS_PER_HOUR),
               (int)(rest / MS_PER_MINUTE % 60), (int)(rest / MS_PER_SECOND % 60));
    if (rest % 1000)
        buf_printf(out, ".%06d", (int)(rest % 1000) * 1000);
}

/* Render a wall-clock time like Python's str(datetime), UTC:
 * "2023-02-08 12:34:56.789012" (fraction omitted when zero). */
static void timestamp_render(int64_t us, char sep, struct buf *out)
{
    time_t t = (time_t)(us / 1000000);
    struct tm tm;
    gmtime_r(&t, &tm);
    buf_printf(out, "%04d-%02d-%02d%c%02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1,
               tm.tm_mday, sep, tm.tm_hour, tm.tm_min, tm.tm_sec);
    if (us % 1000000)
        buf_printf(out, ".%06d", (int)(us % 1000000));
}

/* ---- Server settings: one table for options, mandos.conf and --help ---- */

/* The server's settings: built-in defaults, then mandos.conf, then the
 * command line.  Set at start-up (here and in section 11), then only read. */
struct settings {
    char *interface, *address, *priority, *servicename, *statedir, *configdir;
    int port;                    /* -1 = unset (the kernel picks) */
    int socket_fd;               /* -1 = unset */
    bool debug, use_dbus, use_ipv6, restore, foreground, zeroconf;
    int debuglevel;              /* syslog level threshold */
    long max_connections;
    int64_t connection_timeout;  /* ms */
};

/* How an option's text becomes a setting (see opt_set). */
enum opt_type {
    OPT_HELP, OPT_VERSION, OPT_TEST, OPT_CHECK,   /* actions, not settings */
    OPT_STRING, OPT_LEVEL,              /* text, log level: no %(name)s expansion */
    OPT_BOOL, OPT_PORT, OPT_FD, OPT_LIMIT, OPT_DURATION
};

struct opt {
    const char *name;            /* --name, or NULL: mandos.conf only */
    char letter;                 /* -x, or 0 */
    const char *arg;             /* the argument's name; NULL: a flag */
    const char *key;             /* the mandos.conf key; NULL: command line only */
    const char *builtin;         /* default, spelled as in mandos.conf */
    enum opt_type type;
    size_t offset;               /* of the setting in struct settings */
    const char *help;
};

#define SET(field) offsetof(struct settings, field)

static const struct opt opts[] = {
    { "help", 'h', NULL, NULL, NULL, OPT_HELP, 0, "show this help and exit" },
    { "version", 'v', NULL, NULL, NULL, OPT_VERSION, 0, "show the version and exit" },
    { "interface", 'i', "IF", "interface", "", OPT_STRING, SET(interface),
      "bind to and announce on this interface only" },
    { "address", 'a', "ADDR", "address", "", OPT_STRING, SET(address),
      "listen on this address (fe80::1%IF allowed)" },
    { "port", 'p', "PORT", "port", "", OPT_PORT, SET(port),
      "listen on this TCP port (default: any free one)" },
    { "check", 0, NULL, NULL, NULL, OPT_CHECK, 0, "run the built-in self-tests and exit" },
    { "test-config", 't', NULL, NULL, NULL, OPT_TEST, 0,
      "check both files as start-up and a reload would, then exit" },
    { "debug", 0, NULL, "debug", "False", OPT_BOOL, SET(debug),
      "stay in the foreground and log everything to stderr" },
    { "debuglevel", 0, "LEVEL", "debuglevel", "", OPT_LEVEL, SET(debuglevel),
      "log threshold: CRITICAL ERROR WARNING INFO DEBUG" },
    { "priority", 0, "STRING", "priority",
      "SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL:+VERS-TLS1.3:%PROFILE_ULTRA",
      OPT_STRING, SET(priority), "GnuTLS priority string" },
    { "servicename", 0, "NAME", "servicename", "Mandos", OPT_STRING, SET(servicename),
      "Zeroconf service name" },
    { "configdir", 0, "DIR", NULL, "/etc/mandos", OPT_STRING, SET(configdir),
      "where mandos.conf and clients.conf are" },
    { "no-dbus", 0, NULL, "use_dbus", "True", OPT_BOOL, SET(use_dbus),
      "no D-Bus control interface" },
    { "no-ipv6", 0, NULL, "use_ipv6", "True", OPT_BOOL, SET(use_ipv6), "use IPv4 only" },
    { "no-restore", 0, NULL, "restore", "True", OPT_BOOL, SET(restore),
      "ignore the saved client state" },
    { "socket", 0, "FD", "socket", "", OPT_FD, SET(socket_fd),
      "use this inherited listening socket" },
    { "statedir", 0, "DIR", "statedir", "/var/lib/mandos", OPT_STRING, SET(statedir),
      "where the client state is kept" },
    { "foreground", 0, NULL, "foreground", "False", OPT_BOOL, SET(foreground),
      "do not become a daemon" },
    { "no-zeroconf", 0, NULL, "zeroconf", "True", OPT_BOOL, SET(zeroconf),
      "do not announce the service with Zeroconf" },
    { NULL, 0, NULL, "max_connections", "1024", OPT_LIMIT, SET(max_connections),
      "connections served at once" },
    { NULL, 0, NULL, "connection_timeout", "PT10S", OPT_DURATION, SET(connection_timeout),
      "time limit of each step of a connection" },
};

#define N_OPTS (sizeof opts / sizeof opts[0])

static void set_string(char **slot, const char *value)
{
    free(*slot);
    *slot = xstrdup(value);
}

static int parse_log_level(const char *s, int *level)
{
    static const struct { const char *name; int level; } levels[] = {
        { "", LOG_WARNING }, { "CRITICAL", LOG_CRIT }, { "FATAL", LOG_CRIT },
        { "ERROR", LOG_ERR }, { "WARNING", LOG_WARNING }, { "WARN", LOG_WARNING },
        { "INFO", LOG_INFO }, { "DEBUG", LOG_DEBUG }, { "NOTSET", LOG_DEBUG },
    };
    for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++)
        if (strcasecmp(s, levels[i].name) == 0) {
            *level = levels[i].level;
            return 0;
        }
    return -1;
}

/* Set one setting from its text.  Returns NULL or what is wrong with it. */
static const char *opt_set(const struct opt *o, struct settings *set, const char *text)
{
    static const struct { long long lo, hi; const char *why; } number[] = {
        [OPT_PORT] = { 0, 65535, "not a port number (0 to 65535)" },
        [OPT_FD] = { 0, INT_MAX, "not a file descriptor number" },
        [OPT_LIMIT] = { 1, 1000000, "not a number from 1 to 1000000" },
    };
    void *slot = (char *)set + o->offset;
    const char *why = NULL;
    long long n = -1;
    bool overflow = false;
    int64_t ms = 0;
    if (o->type == OPT_STRING)
        set_string(slot, text);
    if (o->type == OPT_LEVEL && parse_log_level(text, slot) < 0)
        why = "not a log level (CRITICAL, ERROR, WARNING, INFO or DEBUG)";
    if (o->type == OPT_BOOL && parse_bool(text, slot) < 0)
        why = "not a boolean (use true or false)";
    if (o->type == OPT_DURATION && duration_parse(text, &ms, &why) == 0 && ms <= 0)
        why = "must be longer than zero";
    if (o->type == OPT_DURATION && !why)
        *(int64_t *)slot = ms;
    if (o->type < OPT_PORT || o->type > OPT_LIMIT)
        return why;
    /* a number; a blank port or descriptor is unset (-1) */
    if ((*text || o->type == OPT_LIMIT)
        && (parse_pyint(text, strlen(text), &n, &overflow) < 0 || overflow
            || n < number[o->type].lo || n > number[o->type].hi))
        return number[o->type].why;
    if (o->type == OPT_LIMIT)
        *(long *)slot = (long)n;
    else
        *(int *)slot = (int)n;
    return NULL;
}

static void settings_defaults(struct settings *set)
{
    memset(set, 0, sizeof *set);
    for (size_t i = 0; i < N_OPTS; i++)
        if (opts[i].builtin)
            opt_set(&opts[i], set, opts[i].builtin);
}

static void settings_clear(struct settings *set)
{
    for (size_t i = 0; i < N_OPTS; i++)
        if (opts[i].type == OPT_STRING)
            free(*(char **)(void *)((char *)set + opts[i].offset));
}

/* Apply mandos.conf from a buffer: only its [DEFAULT] section counts.
 * Strings are taken raw, everything else after %(name)s expansion, as
 * the reference does. */
static void settings_from_conf(struct settings *set, const char *data, size_t len,
                               struct diag *diag)
{
    struct ini_default builtins[N_OPTS + 1] = { { NULL, NULL } };
    struct ini ini;
    for (size_t i = 0, n = 0; i < N_OPTS; i++)
        if (opts[i].key)
            builtins[n++] = (struct ini_default){ opts[i].key, opts[i].builtin };
    ini_parse_buffer(&ini, data, len, diag);
    for (size_t k = 0; k < ini.sections[0].nkeys; k++) {
        struct ini_key *key = &ini.sections[0].keys[k];
        const struct opt *o = NULL;
        for (size_t i = 0; i < N_OPTS && !o; i++)
            if (opts[i].key && streq(opts[i].key, key->name))
                o = &opts[i];
        bool raw = o && (o->type == OPT_STRING || o->type == OPT_LEVEL);
        struct buf v = { 0 };
        char why[200];
        const char *problem = NULL;
        if (!o)              /* not interpolated: the reference never reads it */
            log_warn("%s:%d: unknown key \"%s\" ignored", diag->file, key->line, key->name);
        else if (!raw && ini_interpolate(&ini, ini.sections, key->value.data, builtins, 1, &v,
                                         why, sizeof why) < 0)
            diag_error(diag, key->line, "%s: %s", key->name, why);
        else if ((problem = opt_set(o, set, raw ? key->value.data : v.data)) != NULL)
            diag_error(diag, key->line, "%s = \"%s\": %s", key->name, key->value.data,
                       problem);
        buf_free(&v);
    }
    ini_free(&ini);
}

static int settings_conf_load(struct settings *set, struct diag *diag)
{
    struct buf path = { 0 }, data = { 0 };
    buf_printf(&path, "%s/mandos.conf", set->configdir);
    diag->file = path.data;
    const char *why = read_file_at(AT_FDCWD, path.data, false, &data);
    if (!why)
        settings_from_conf(set, data.data, data.len, diag);
    else if (errno != ENOENT)
        diag_error(diag, 0, "cannot read: %s", why);
    buf_free(&data);
    diag_end_file(diag);
    buf_free(&path);
    return diag->count;
}

/* The command line as given: value[i] is the text for opts[i] (a flag's
 * own argument for a flag), or NULL if the option is absent. */
struct cmdline {
    const char *value[N_OPTS];
};

/* Apply the command line: first (keyed false) what mandos.conf cannot set,
 * since --configdir says where it is; after it, the rest, which wins, and
 * then the rules between settings.  -1 with the reason in `err`. */
static int settings_from_cmdline(struct settings *set, const struct cmdline *cl, bool keyed,
                                 char *err, size_t errlen)
{
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &opts[i];
        const char *v = cl->value[i];
        if (!v || o->type <= OPT_CHECK || (o->key != NULL) != keyed)
            continue;
        const char *problem;
        if (!o->arg)
            problem = opt_set(o, set, streq(o->builtin, "True") ? "False" : "True");
        else if (!*v && (o->type == OPT_PORT || o->type == OPT_FD))
            problem = "needs a number";
        else
            problem = opt_set(o, set, v);
        if (problem) {
            snprintf(err, errlen, "--%s \"%s\": %s", o->name, v, problem);
            return -1;
        }
    }
    if (keyed && set->debug) {
        set->foreground = true;
        set->debuglevel = LOG_DEBUG;
    }
    /* A build without Zeroconf cannot be found either: same rule. */
    if (keyed && (!set->zeroconf || !ZC_AVAILABLE) && set->port <= 0 && set->socket_fd < 0) {
        snprintf(err, errlen, "Needs port or socket to work without Zeroconf%s",
                 ZC_AVAILABLE ? "" : " (this build has no Zeroconf support)");
        return -1;
    }
    return 0;
}

/* ===================================================================== */
/* 5. Clients                                                            */
/*    The client-field table (each setting and attribute of a client,     */
/*    once), struct client, its index by name and key_id, its timers and */
/*    life cycle, what a reload does to it; reading clients.conf.         */
/* ===================================================================== */

enum approval { APPROVAL_NONE, APPROVAL_GRANTED, APPROVAL_DENIED };

/* What a control interface may change at run time (clients.conf gives
 * the start values): the first N_RUN client_fields, in this order. */
struct client_settings {
    char *host;
    char *checker;               /* after start-time %(name)s expansion */
    int64_t timeout, extended_timeout, interval;      /* milliseconds */
    int64_t approval_delay, approval_duration;        /* milliseconds */
    bool approved_by_default;
    bool enabled;
};

#define N_RUN 9

struct client {
    char *name;                  /* the section name */
    char *conf_text[N_RUN];      /* each setting's clients.conf text: an edit changes it */
    int config_line;             /* where its section starts */
    char key_id[65];             /* normalised, upper-case hex, or "" */
    bool indexed;                /* key_id usable, so in the key_id index */
    char *fingerprint;           /* kept for display only; never matched */
    unsigned char *secret;       /* the bytes we send */
    size_t secret_len;
    unsigned char secret_hash[32];   /* of the configured secret */
    struct client_settings cur;  /* in effect (clients.conf + run-time changes) */
    int64_t created, last_enabled, last_checked_ok, last_approval_request;  /* wall µs */
    int64_t expires;             /* monotonic ms when it gets disabled; 0 = none */
    int64_t next_checker;        /* monotonic ms of the next checker run; 0 = none */
    int last_checker_status;     /* exit code; -1 signal; -2 none yet */
    int last_checker_signal;
    enum approval approved;      /* set by client_approve(), reset later */
    int64_t approval_reset;      /* monotonic ms to forget `approved`; 0 = none */
    int approvals_pending;       /* connections waiting for approval */
    pid_t checker_pid;           /* running checker's process group, or 0 */
};

/* How a field is stored, and so how it is parsed, saved and shown. */
enum cf_type {
    CF_STR, CF_BOOL, CF_INT,     /* char *, bool, int */
    CF_MS,                       /* int64_t milliseconds (D-Bus: "t", in ms) */
    CF_TIME,                     /* int64_t wall-clock µs, 0 = never */
    CF_EXPIRES,                  /* int64_t monotonic ms, shown as wall-clock */
    CF_KEY_ID, CF_HASH,          /* char[65]; unsigned char[32], saved as hex */
    CF_SECRET,                   /* read by client_read_secret; never shown */
    CF_PATH,                     /* the D-Bus object path, computed */
    CF_COUNT, CF_PID,            /* int, pid_t; D-Bus shows whether above 0, set */
};

/* Where a field appears (flags). */
#define F_CONF 0x01              /* a clients.conf key (clients.conf(5) has it) */
#define F_RUN 0x02               /* in `cur`; its clients.conf text is kept */
#define F_SAVE 0x04              /* in the state file as "name value" */
#define F_HIST 0x08              /* F_SAVE, and carried over by reconciling */
#define F_ATTR 0x10              /* %(name)s in a checker command */
#define F_POSITIVE 0x20          /* a duration that must be above zero */
#define F_COMMAND 0x40           /* a command: %(name)s must be attributes */

/* A D-Bus property's access: READ and WRITE announce changes; WRITE_ONLY
 * only invalidates; DEPRECATED is a constant kept for old tools. */
enum cf_prop {
    PROP_NONE, PROP_CONST, PROP_READ, PROP_WRITE, PROP_WRITE_ONLY, PROP_DEPRECATED
};

struct client_field {
    const char *name;            /* clients.conf key, state key, %(name)s */
    enum cf_type type;
    unsigned flags;
    const char *dflt;            /* clients.conf default (seen by %(name)s) */
    size_t offset;               /* in struct client */
    const char *bus;             /* D-Bus property name, or NULL */
    const char *sig;             /* its D-Bus signature */
    enum cf_prop access;
};

#define CL(member) offsetof(struct client, member)
/* A run-time setting, and a field kept in the struct member of its name. */
#define SETTING(m, type, flags, dflt, bus, sig) \
    { #m, type, flags, dflt, CL(cur.m), bus, sig, PROP_WRITE }
#define FIELD(m, type, flags, bus, sig, access) { #m, type, flags, NULL, CL(m), bus, sig, access }

static const struct client_field client_fields[] = {
    SETTING(host, CF_STR, F_CONF | F_RUN | F_ATTR, "", "Host", "s"),
    SETTING(checker, CF_STR, F_CONF | F_RUN | F_COMMAND, "fping -q -- %%(host)s", "Checker", "s"),
    SETTING(timeout, CF_MS, F_CONF | F_RUN | F_ATTR, "PT5M", "Timeout", "t"),
    SETTING(extended_timeout, CF_MS, F_CONF | F_RUN, "PT15M", "ExtendedTimeout", "t"),
    SETTING(interval, CF_MS, F_CONF | F_RUN | F_ATTR | F_POSITIVE, "PT2M", "Interval", "t"),
    SETTING(approval_delay, CF_MS, F_CONF | F_RUN | F_ATTR, "PT0S", "ApprovalDelay", "t"),
    SETTING(approval_duration, CF_MS, F_CONF | F_RUN | F_ATTR, "PT1S", "ApprovalDuration", "t"),
    SETTING(approved_by_default, CF_BOOL, F_CONF | F_RUN, "True", "ApprovedByDefault", "b"),
    SETTING(enabled, CF_BOOL, F_CONF | F_RUN | F_ATTR, "True", "Enabled", "b"),
    { "key_id", CF_KEY_ID, F_CONF | F_ATTR, "", CL(key_id), "KeyID", "s", PROP_CONST },
    FIELD(fingerprint, CF_STR, F_CONF | F_ATTR, "Fingerprint", "s", PROP_CONST),
    FIELD(secret, CF_SECRET, F_CONF, "Secret", "ay", PROP_WRITE_ONLY),
    { "secfile", CF_SECRET, F_CONF, NULL, CL(secret), NULL, NULL, PROP_NONE },
    FIELD(name, CF_STR, F_ATTR, "Name", "s", PROP_CONST),
    FIELD(created, CF_TIME, F_HIST | F_ATTR, "Created", "s", PROP_CONST),
    FIELD(last_enabled, CF_TIME, F_HIST | F_ATTR, "LastEnabled", "s", PROP_READ),
    FIELD(last_checked_ok, CF_TIME, F_HIST | F_ATTR, "LastCheckedOK", "s", PROP_WRITE),
    FIELD(last_approval_request, CF_TIME, F_HIST | F_ATTR, "LastApprovalRequest", "s",
          PROP_READ),
    FIELD(expires, CF_EXPIRES, F_SAVE | F_ATTR, "Expires", "s", PROP_READ),
    FIELD(last_checker_status, CF_INT, F_HIST, "LastCheckerStatus", "n", PROP_READ),
    FIELD(last_checker_signal, CF_INT, F_HIST, NULL, NULL, PROP_NONE),
    { "secret_sha256", CF_HASH, F_SAVE, NULL, CL(secret_hash), NULL, NULL, PROP_NONE },
    { "dbus_object_path", CF_PATH, F_ATTR, NULL, 0, "ObjectPath", "o", PROP_DEPRECATED },
    { "approval_pending", CF_COUNT, 0, NULL, CL(approvals_pending), "ApprovalPending", "b",
      PROP_READ },
    { "checker_running", CF_PID, 0, NULL, CL(checker_pid), "CheckerRunning", "b", PROP_WRITE },
};

#define N_FIELDS (sizeof client_fields / sizeof client_fields[0])

/* The field of a client that row `f` describes. */
#define CF_AT(c, f, type) ((type *)(void *)((char *)(c) + (f)->offset))

/* All clients, in config order, indexed by name and by key_id. */
struct client_table {
    struct client **v;
    size_t n, cap;
    struct name_index names;     /* client name -> position in v */
    struct name_index keys;      /* key_id -> position in v */
    int64_t next_event;          /* no client timer is earlier; 0 = none at all */
};

struct server {
    struct settings set;
    struct client_table clients;
    struct conn *conns_head, *conns_tail;
    size_t nconns;
    gnutls_priority_t priority;
    gnutls_certificate_credentials_t cred;   /* empty: we present no certificate */
    struct bus *bus;             /* the D-Bus connection (section 10), or NULL */
    int listen_fd;
    int port;                    /* the port actually bound */
    int64_t accept_resume, accept_warned;    /* accept() failure back-off, ms */
    int signal_pipe[2];          /* written by signal handlers, read by the loop */
    int state_dirfd;             /* the state directory, opened before dropping root */
    int lock_fd;                 /* its lock file, flock()ed while we run */
    int config_dirfd;            /* the config directory, likewise (for reloads) */
    bool state_dirty, state_urgent;
    int64_t state_saved_at;      /* monotonic ms */
    bool quitting;
    uid_t run_uid;               /* who we run as after start-up */
    gid_t run_gid;
    int notify_fd;               /* systemd NOTIFY_SOCKET, or -1 */
    struct zc *zc;               /* the Zeroconf back end's own state */
    struct doomed { pid_t pgid; int64_t kill_at; } *doomed;   /* checker groups sent */
    size_t ndoomed, doomed_cap;  /* SIGTERM, SIGKILL at kill_at, in that order (section 6) */
};

#define STATE_SAVE_DELAY_MS 2000 /* routine changes are saved this often at most */
#define STATE_URGENT_MS 100      /* urgent ones too: a loop of D-Bus calls must not
                                  * fsync each time */

/* Real cycles: clients start and stop checkers, whose results come back
 * to the client; disabling or replacing a client reaches its connections. */
static void checker_stop(struct server *srv, struct client *c);
static void checker_start(struct server *srv, struct client *c);
static void conn_approval_wakeup(struct server *srv, struct client *c, int64_t now);
static void conn_client_gone(struct server *srv, struct client *old, struct client *n);
/* What section 10 publishes on D-Bus; no-ops without it. */
static void bus_client_signal(struct server *srv, const struct client *c, const char *member,
                              const char *text, int status);
static void bus_client_not_found(struct server *srv, const char *key_id, const char *peer);

static void state_changed(struct server *srv, bool urgent)
{
    srv->state_dirty = true;
    srv->state_urgent |= urgent;
}

/* When the state must be saved (monotonic ms); 0: it need not be. */
static int64_t state_due(const struct server *srv)
{
    int64_t wait = srv->state_urgent ? STATE_URGENT_MS : STATE_SAVE_DELAY_MS;
    return srv->state_dirty ? srv->state_saved_at + wait : 0;
}

/* ---- fields ------------------------------------------------------------- */

static const struct client_field *client_field(const char *name)
{
    for (size_t i = 0; i < N_FIELDS; i++)
        if (streq(client_fields[i].name, name))
            return &client_fields[i];
    return NULL;
}

/* A number-like field's value (booleans 0 or 1; `expires` in wall µs). */
static int64_t client_number(const struct client *c, const struct client_field *f,
                             int64_t now_mono, int64_t now_wall)
{
    int64_t ahead = c->expires - now_mono;        /* saturates: durations reach 2.7e6 years */
    if (f->type == CF_EXPIRES)
        return !c->expires ? 0 : ahead > (INT64_MAX - now_wall) / 1000 ? INT64_MAX
            : now_wall + ahead * 1000;
    if (f->type == CF_MS || f->type == CF_TIME)
        return *CF_AT(c, f, int64_t);
    if (f->type == CF_BOOL)
        return *CF_AT(c, f, bool);
    if (f->type == CF_INT)
        return *CF_AT(c, f, int);
    if (f->type == CF_COUNT)
        return *CF_AT(c, f, int) > 0;
    return f->type == CF_PID && *CF_AT(c, f, pid_t) != 0;
}

/* Set a number-like field; `expires` takes whatever clock the caller uses. */
static void client_set_number(struct client *c, const struct client_field *f, int64_t v)
{
    if (f->type == CF_MS || f->type == CF_TIME || f->type == CF_EXPIRES)
        *CF_AT(c, f, int64_t) = v;
    else if (f->type == CF_BOOL)
        *CF_AT(c, f, bool) = v != 0;
    else if (f->type == CF_INT)
        *CF_AT(c, f, int) = (int)v;
}

/* "/clients/" and the name with '.' and '-' made '_', as the reference
 * names it, '/' kept.  Where that is no valid path (the reference crashes)
 * every byte but ASCII letters, digits and '_' becomes '_', '/' too. */
static void client_object_path(const struct client *c, struct buf *out)
{
    const char *n = c->name;
    size_t len = strlen(n);
    bool slashes = len && n[0] != '/' && n[len - 1] != '/' && !strstr(n, "//");
    for (const char *p = n; *p && slashes; p++)
        slashes = isalnum((unsigned char)*p) || strchr("_.-/", *p);
    buf_adds(out, "/clients/");
    for (const char *p = n; *p; p++) {
        bool keep = isalnum((unsigned char)*p) || *p == '_' || (slashes && *p == '/');
        buf_addc(out, keep ? *p : '_');
    }
    if (!len)
        buf_addc(out, '_');
}

/* Two clients on one D-Bus object path: an error naming both. */
static void clients_check_paths(const struct client_table *t, struct diag *diag)
{
    char **paths = xcalloc(t->n, sizeof *paths);
    struct name_index seen = { 0 };
    for (size_t i = 0; i < t->n; i++) {
        struct buf b = { 0 };
        client_object_path(t->v[i], &b);
        paths[i] = b.data;
        size_t first = name_index_find(&seen, paths[i]);
        if (first == SIZE_MAX)
            name_index_add(&seen, paths[i], i);
        else
            diag_error(diag, t->v[i]->config_line, "[%s] and [%s] have the same D-Bus "
                       "object path %s", t->v[first]->name, t->v[i]->name, paths[i]);
    }
    for (size_t i = 0; i < t->n; i++)
        free(paths[i]);
    free(paths);
    name_index_free(&seen);
}

/* A field as the reference shows it to a checker (before quoting). */
static void client_render(const struct client *c, const struct client_field *f,
                          struct buf *out)
{
    int64_t v = client_number(c, f, mono_ms(), wall_us());
    if (f->type == CF_STR)
        buf_adds(out, *CF_AT(c, f, char *));
    else if (f->type == CF_KEY_ID)
        buf_adds(out, CF_AT(c, f, char));
    else if (f->type == CF_MS)
        duration_render(v, out);
    else if (f->type == CF_BOOL)
        buf_adds(out, v ? "True" : "False");
    else if ((f->type == CF_TIME || f->type == CF_EXPIRES) && v)
        timestamp_render(v, ' ', out);
    else if (f->type == CF_TIME || f->type == CF_EXPIRES)
        buf_adds(out, "None");
    else if (f->type == CF_PATH)
        client_object_path(c, out);
}

/* Carry a client's run-time values over from `saved` (the state file, or
 * the running client on reload); a setting edited in clients.conf takes
 * the new value. */
static void client_reconcile(struct client *fresh, const struct client *saved)
{
    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct client_field *f = &client_fields[i];
        bool run = f->flags & F_RUN;
        if (run && !streq(fresh->conf_text[i], saved->conf_text[i]))
            continue;           /* edited: the config value stands */
        if (run && f->type == CF_STR) {
            free(*CF_AT(fresh, f, char *));
            *CF_AT(fresh, f, char *) = xstrdup(*CF_AT(saved, f, char *));
        } else if (run || (f->flags & F_HIST))
            client_set_number(fresh, f, client_number(saved, f, 0, 0));
    }
}

static void client_free(struct client *c)
{
    wipe(c->secret, c->secret_len);
    free(c->secret);
    for (size_t i = 0; i < N_FIELDS; i++)
        if (client_fields[i].type == CF_STR)
            free(*CF_AT(c, &client_fields[i], char *));
    for (size_t i = 0; i < N_RUN; i++)
        free(c->conf_text[i]);
    free(c);
}

/* ---- the table and its indexes ------------------------------------------ */

/* Rebuild both indexes after the table changed.  Of two clients with one
 * key_id only the first is found; with `diag`, the second is an error. */
static void client_table_index(struct client_table *t, struct diag *diag)
{
    name_index_free(&t->names);
    name_index_free(&t->keys);
    for (size_t i = 0; i < t->n; i++) {
        struct client *c = t->v[i];
        name_index_add(&t->names, c->name, i);
        size_t first = name_index_find(&t->keys, c->key_id);
        if (c->indexed && first == SIZE_MAX)
            name_index_add(&t->keys, c->key_id, i);
        else if (c->indexed && diag)
            diag_error(diag, c->config_line, "[%s] and [%s] have the same key_id %s",
                       t->v[first]->name, c->name, c->key_id);
    }
}

static struct client *client_find_by_key_id(const struct client_table *t, const char *hex)
{
    size_t pos = name_index_find(&t->keys, hex);
    return pos == SIZE_MAX ? NULL : t->v[pos];
}

static struct client *client_find_by_name(const struct client_table *t, const char *name)
{
    size_t pos = name_index_find(&t->names, name);
    return pos == SIZE_MAX ? NULL : t->v[pos];
}

static void client_table_clear(struct client_table *t)
{
    for (size_t i = 0; i < t->n; i++)
        client_free(t->v[i]);
    free(t->v);
    name_index_free(&t->names);
    name_index_free(&t->keys);
    memset(t, 0, sizeof *t);
}

/* ---- timers ---------------------------------------------------------------
 * The table keeps a lower bound of all client timers, lowered as they are
 * set; the clients are scanned only once it is reached. */

/* The earlier of two deadlines, where 0 is none. */
static int64_t earliest(int64_t a, int64_t b)
{
    return a && (!b || a < b) ? a : b;
}

/* Call after changing any of a client's timers. */
static void client_reschedule(struct client_table *t, const struct client *c)
{
    int64_t next = earliest(earliest(c->expires, c->next_checker), c->approval_reset);
    t->next_event = earliest(next, t->next_event);
}

/* ---- life cycle ---------------------------------------------------------- */

static void client_bump(struct server *srv, struct client *c, int64_t ms, int64_t now)
{
    if (!c->cur.enabled)
        return;
    c->expires = now + ms;
    client_reschedule(&srv->clients, c);
    state_changed(srv, false);
}

/* A checker succeeded (or an administrator said so). */
static void client_checked_ok(struct server *srv, struct client *c, int64_t now)
{
    c->last_checked_ok = wall_us();
    c->last_checker_status = 0;
    client_bump(srv, c, c->cur.timeout, now);
}

/* Waiting connections learn at once, not at their deadline. */
static void client_disable(struct server *srv, struct client *c, const char *why)
{
    if (!c->cur.enabled)
        return;
    log_info("Disabling client %s: %s", c->name, why);
    c->cur.enabled = false;
    c->expires = 0;
    c->next_checker = 0;
    checker_stop(srv, c);
    state_changed(srv, true);
    conn_approval_wakeup(srv, c, mono_ms());
}

static void client_enable(struct server *srv, struct client *c, int64_t now)
{
    if (c->cur.enabled)
        return;
    log_info("Enabling client %s", c->name);
    c->cur.enabled = true;
    c->last_enabled = wall_us();
    c->next_checker = now + c->cur.interval;
    c->expires = now + 2 * c->cur.interval;
    client_reschedule(&srv->clients, c);
    state_changed(srv, true);
    conn_approval_wakeup(srv, c, now);
}

/* Approve or deny a client's pending and imminent requests. */
static void client_approve(struct server *srv, struct client *c, bool approve)
{
    int64_t now = mono_ms();
    log_info("Client %s %s", c->name, approve ? "approved" : "denied");
    c->approved = approve ? APPROVAL_GRANTED : APPROVAL_DENIED;
    c->approval_reset = now + (c->cur.approval_duration > 0 ? c->cur.approval_duration : 1);
    client_reschedule(&srv->clients, c);
    state_changed(srv, true);
    conn_approval_wakeup(srv, c, now);
}

/* Take a client out of the table and free it (a control interface asked);
 * clients.conf brings it back at the next restart or reload. */
static void client_remove(struct server *srv, struct client *c)
{
    struct client_table *t = &srv->clients;
    size_t i = name_index_find(&t->names, c->name);
    log_info("Removing client %s", c->name);
    client_disable(srv, c, "removed");
    checker_stop(srv, c);        /* one started by hand while disabled */
    conn_client_gone(srv, c, NULL);
    memmove(&t->v[i], &t->v[i + 1], (t->n - i - 1) * sizeof *t->v);
    t->n--;
    client_table_index(t, NULL);
    client_free(c);
    state_changed(srv, true);
}

/* The first checker runs at a random point within one interval, so that a
 * thousand clients do not all run theirs in the same second. */
static void client_schedule_first_checker(struct client_table *t, struct client *c, int64_t now)
{
    uint32_t r = 0;
    if (!c->cur.enabled)
        return;
    gnutls_rnd(GNUTLS_RND_NONCE, &r, sizeof r);
    c->next_checker = now + (int64_t)(r % (uint64_t)(c->cur.interval + 1));
    c->expires = c->next_checker + c->cur.interval;
    client_reschedule(t, c);
}

static void client_run_timers(struct server *srv, struct client *c, int64_t now)
{
    if (c->approval_reset && c->approval_reset <= now) {
        c->approval_reset = 0;
        c->approved = APPROVAL_NONE;
    }
    if (c->expires && c->expires <= now) {
        client_disable(srv, c, "timed out");
        return;
    }
    if (c->next_checker && c->next_checker <= now) {
        c->next_checker = now + c->cur.interval;
        if (!c->checker_pid)
            checker_start(srv, c);
    }
}

/* Once the bound is reached: run every due timer, then find the next. */
static void clients_run_timers(struct server *srv, int64_t now)
{
    struct client_table *t = &srv->clients;
    if (!t->next_event || t->next_event > now)
        return;
    t->next_event = 0;
    for (size_t i = 0; i < t->n; i++) {
        client_run_timers(srv, t->v[i], now);
        client_reschedule(t, t->v[i]);
    }
}

/* ---- reload ---------------------------------------------------------------- */

/* Make `n`, read from the edited clients.conf, the successor of the
 * running `old`: it takes over run-time state, checker and connections,
 * and is enabled or disabled if its `enabled` line was edited. */
static void client_succeed(struct server *srv, struct client *n, struct client *old,
                           int64_t now)
{
    /* a key replaced in clients.conf is a key revoked */
    bool same_key = n->indexed && old->indexed && streq(n->key_id, old->key_id);
    conn_client_gone(srv, old, same_key ? n : NULL);
    client_reconcile(n, old);
    bool enable = n->cur.enabled;
    n->cur.enabled = old->cur.enabled;
    n->checker_pid = old->checker_pid;
    old->checker_pid = 0;
    n->approved = old->approved;
    n->approval_reset = old->approval_reset;
    n->approvals_pending = old->approvals_pending;
    n->expires = old->expires;
    n->next_checker = old->next_checker;
    if (memcmp(n->secret_hash, old->secret_hash, 32) == 0) {
        /* config secret unchanged: keep one set at run time, if any */
        unsigned char *s = n->secret;
        size_t sl = n->secret_len;
        n->secret = old->secret;
        n->secret_len = old->secret_len;
        old->secret = s;
        old->secret_len = sl;
    }
    if (enable)
        client_enable(srv, n, now);
    else
        client_disable(srv, n, "disabled in clients.conf");
}

/* Put the clients of a reloaded clients.conf (`fresh`, indexed, taken
 * over) in place of the running ones; removed ones lose their checker. */
static void clients_replace(struct server *srv, struct client_table *fresh)
{
    struct client_table *t = &srv->clients;
    int64_t now = mono_ms();
    for (size_t i = 0; i < fresh->n; i++) {
        struct client *n = fresh->v[i];
        struct client *old = client_find_by_name(t, n->name);
        if (!old) {
            log_info("Adding client %s", n->name);
            client_schedule_first_checker(fresh, n, now);
            continue;
        }
        client_succeed(srv, n, old, now);
        client_reschedule(fresh, n);
    }
    for (size_t i = 0; i < t->n; i++) {
        if (client_find_by_name(fresh, t->v[i]->name))
            continue;
        log_info("Removing client %s", t->v[i]->name);
        checker_stop(srv, t->v[i]);
        conn_client_gone(srv, t->v[i], NULL);
    }
    client_table_clear(t);
    *t = *fresh;
}

/* ---- checker commands: the run-time %(name)s syntax ----------------------- */

/* POSIX shell quoting: bare if only safe characters, else '...'. */
static void shell_quote(const char *s, size_t n, struct buf *out)
{
    bool safe = n > 0;
    for (size_t i = 0; i < n && safe; i++)
        safe = isalnum((unsigned char)s[i]) || strchr("_@%+=:,./-", s[i]);
    buf_adds(out, safe ? "" : "'");
    for (size_t i = 0; i < n; i++)       /* ' as '"'"' */
        buf_add(out, s[i] == '\'' ? "'\"'\"'" : s + i, s[i] == '\'' ? 5 : 1);
    buf_adds(out, safe ? "" : "'");
}

/* The attribute name[0..n); if none, NULL and `why` lists the ones there are. */
static const struct client_field *checker_attribute(const char *name, size_t n, char *why,
                                                    size_t whylen)
{
    for (size_t i = 0; i < N_FIELDS; i++)
        if ((client_fields[i].flags & F_ATTR) && strlen(client_fields[i].name) == n
            && memcmp(client_fields[i].name, name, n) == 0)
            return &client_fields[i];
    int w = snprintf(why, whylen, "unknown attribute %%(%.*s)s (known:",
                     (int)(n > 40 ? 40 : n), name);
    for (size_t i = 0; i < N_FIELDS; i++)
        if ((client_fields[i].flags & F_ATTR) && w > 0 && (size_t)w < whylen)
            w += snprintf(why + w, whylen - (size_t)w, " %s", client_fields[i].name);
    if (w > 0 && (size_t)w + 1 < whylen)
        snprintf(why + w, whylen - (size_t)w, ")");
    return NULL;
}

/* Check a checker command; with `out`, also append it as it runs now for
 * `c`, each %(name)s the client's value, shell-quoted.  Returns -1 with
 * `why` on what we cannot expand, which clients.conf and D-Bus refuse at
 * once rather than stop silently. */
static int checker_walk(const char *cmd, const struct client *c, struct buf *out, char *why,
                        size_t whylen)
{
    const char *p = cmd;
    while (*p) {
        size_t lit = strcspn(p, "%");
        bool escaped = p[lit] == '%' && p[lit + 1] == '%';
        if (out)
            buf_add(out, p, lit + escaped);   /* "%%" is one '%' */
        p += lit + 2 * escaped;
        if (escaped || !*p)
            continue;
        const char *close = p[1] == '(' ? strchr(p + 2, ')') : NULL;
        if (!close || close[1] != 's') {
            snprintf(why, whylen, "cannot expand \"%.30s\" at run time "
                     "(write %%%%(name)s for an attribute, %%%%%%%% for a literal %%)", p);
            return -1;
        }
        const struct client_field *f = checker_attribute(p + 2, (size_t)(close - p - 2), why,
                                                         whylen);
        if (!f)
            return -1;
        if (out) {
            struct buf value = { 0 };
            client_render(c, f, &value);
            shell_quote(value.data, value.len, out);
            buf_free(&value);
        }
        p = close + 2;
    }
    return 0;
}

/* ---- reading clients.conf ------------------------------------------------- */

/* The defaults of client_fields, as the INI parser's built-ins. */
static const struct ini_default *client_builtins(void)
{
    static struct ini_default table[N_FIELDS + 1];
    if (!table[0].name)
        for (size_t i = 0, n = 0; i < N_FIELDS; i++)
            if (client_fields[i].dflt)
                table[n++] = (struct ini_default){ client_fields[i].name, client_fields[i].dflt };
    return table;
}

/* The SHA-256 of nothing, sent by buggy 1.8.0 clients: never a match. */
#define EMPTY_KEY_ID "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"

/* Upper-case and drop ASCII spaces, as the reference normalises IDs. */
static char *key_id_normalise(const char *s)
{
    char *out = xcalloc(1, strlen(s) + 1), *o = out;
    for (; *s; s++)
        if (*s != ' ')
            *o++ = (char)toupper((unsigned char)*s);
    return out;
}

struct client_reader {
    struct ini *ini;
    struct ini_section *sec;
    struct diag *diag;
    const char *configdir;       /* for messages */
    int config_dirfd;            /* relative secfile paths start here */
};

/* An interpolated value of this client's section, or NULL if unset. */
static char *client_value(struct client_reader *r, const char *name, int *line)
{
    *line = r->sec->line;
    const char *raw = ini_lookup(r->ini, r->sec, name, client_builtins(), line);
    struct buf out = { 0 };
    char why[200];
    buf_adds(&out, "");
    if (raw && ini_interpolate(r->ini, r->sec, raw, client_builtins(), 1, &out, why,
                               sizeof why) >= 0)
        return out.data;
    if (raw)
        diag_error(r->diag, *line, "[%s] %s: %s", r->sec->name, name, why);
    buf_free(&out);
    return NULL;
}

/* One run-time setting: its text is kept, its value parsed by type. */
static void client_read_setting(struct client_reader *r, struct client *c, size_t i)
{
    const struct client_field *f = &client_fields[i];
    int line;
    char *set = client_value(r, f->name, &line);
    const char *text = c->conf_text[i] = set ? set : xstrdup("");
    const char *bad = NULL;
    char why[200];
    if (f->type == CF_STR)
        *CF_AT(c, f, char *) = xstrdup(text);
    if ((f->flags & F_COMMAND) && checker_walk(text, NULL, NULL, why, sizeof why) < 0)
        bad = why;
    else if (f->type == CF_MS)
        duration_parse(text, CF_AT(c, f, int64_t), &bad);
    else if (f->type == CF_BOOL && parse_bool(text, CF_AT(c, f, bool)) < 0)
        bad = "not a boolean (use true or false)";
    if (!set)
        return;                  /* its error was reported */
    if (bad && (f->flags & F_COMMAND))
        diag_error(r->diag, line, "[%s] %s: %s", r->sec->name, f->name, bad);
    else if (bad)
        diag_error(r->diag, line, "[%s] %s = \"%s\": %s", r->sec->name, f->name, text, bad);
    else if ((f->flags & F_POSITIVE) && client_number(c, f, 0, 0) == 0)
        diag_error(r->diag, line, "[%s] %s must be longer than zero", r->sec->name, f->name);
}

/* Expand a leading ~ or ~user, then $VAR and ${VAR}, in a secfile path. */
static void path_expand(const char *p, struct buf *out)
{
    if (*p == '~') {
        size_t n = strcspn(p + 1, "/");
        char *user = xstrndup(p + 1, n);
        const char *home = n ? NULL : getenv("HOME");
        struct passwd *pw = home ? NULL : n ? getpwnam(user) : getpwuid(geteuid());
        free(user);
        if (pw)
            home = pw->pw_dir;
        if (home) {
            buf_adds(out, home);
            p += n + 1;
        }
    }
    while (*p) {
        bool brace = p[1] == '{';
        bool var = *p == '$' && (brace || isalpha((unsigned char)p[1]) || p[1] == '_');
        const char *s = p + 1 + brace, *e = s;
        while (var && (isalnum((unsigned char)*e) || *e == '_'))
            e++;
        char *name = var && e > s && (!brace || *e == '}') ? xstrndup(s, (size_t)(e - s)) : NULL;
        const char *val = name ? getenv(name) : NULL;
        free(name);
        if (!val) {              /* not a variable, or an unknown one: as written */
            buf_addc(out, *p++);
            continue;
        }
        buf_adds(out, val);
        p = e + brace;
    }
}

/* The secret: base64 `secret`, else the raw bytes of `secfile`, whose
 * relative path starts at the config directory (not wherever we started). */
static void client_read_secret(struct client_reader *r, struct client *c)
{
    int line, file_line;
    char *b64 = client_value(r, "secret", &line);
    char *file = client_value(r, "secfile", &file_line);
    struct buf secret = { 0 }, path = { 0 };
    const char *why = "empty path";
    if (!b64 && file)
        path_expand(file, &path);
    if (path.len)
        why = read_file_at(r->config_dirfd, path.data, false, &secret);
    bool rel = path.len && path.data[0] != '/';
    if (b64 && base64_decode_lenient(b64, strlen(b64), &secret, &why) < 0)
        diag_error(r->diag, line, "[%s] secret: %s", r->sec->name, why);
    else if (!b64 && file && why)
        diag_error(r->diag, file_line, "[%s] secfile \"%s%s%s\": %s", r->sec->name,
                   rel ? r->configdir : "", rel ? "/" : "", path.len ? path.data : "", why);
    else if (!b64 && !file && !ini_lookup(r->ini, r->sec, "secfile", NULL, NULL))
        diag_error(r->diag, r->sec->line, "[%s] has neither secret nor secfile", r->sec->name);
    free_wiped(b64);
    free(file);
    buf_free(&path);
    buf_adds(&secret, "");
    c->secret = (unsigned char *)secret.data;
    c->secret_len = secret.len;
    gnutls_hash_fast(GNUTLS_DIG_SHA256, c->secret, c->secret_len, c->secret_hash);
}

/* Build one client from its section; errors go to r->diag. */
static struct client *client_from_section(struct client_reader *r)
{
    struct client *c = xcalloc(1, sizeof *c);
    int line;
    unsigned char bin[32];
    c->name = xstrdup(r->sec->name);
    c->config_line = r->sec->line;
    c->last_checker_status = -2;
    for (size_t i = 0; i < N_RUN; i++)
        client_read_setting(r, c, i);
    char *v = client_value(r, "key_id", &line);
    char *id = key_id_normalise(v ? v : "");
    free(v);
    if (!*id)
        log_warn("client %s has no key_id: it can never be identified", c->name);
    else if (hex_decode(id, bin, 32) < 0)
        diag_error(r->diag, line, "[%s] key_id \"%s\": expected 64 hexadecimal digits",
                   r->sec->name, id);
    else if (streq(id, EMPTY_KEY_ID))
        log_warn("client %s has the key_id of an empty key (a buggy 1.8.0 client): "
                 "it will never match", c->name);
    else
        c->indexed = true;
    snprintf(c->key_id, sizeof c->key_id, "%s", strlen(id) <= 64 ? id : "");
    free(id);
    v = client_value(r, "fingerprint", &line);
    c->fingerprint = key_id_normalise(v ? v : "");
    free(v);
    client_read_secret(r, c);
    /* other keys are interpolated too, to report a broken %(name)s anywhere */
    for (size_t k = 0; k < r->sec->nkeys; k++) {
        const struct client_field *f = client_field(r->sec->keys[k].name);
        if (!f || !(f->flags & F_CONF))
            free_wiped(client_value(r, r->sec->keys[k].name, &line));
    }
    /* a client seen for the first time; saved state overrides both */
    c->created = wall_us();
    c->last_enabled = c->cur.enabled ? c->created : 0;
    return c;
}

/* Parse clients.conf bytes into a table of fresh clients. */
static void clients_from_buffer(const char *data, size_t len, const char *configdir,
                                int config_dirfd, struct diag *diag, struct client_table *out)
{
    struct ini ini;
    ini_parse_buffer(&ini, data, len, diag);
    struct client_reader r = { &ini, NULL, diag, configdir, config_dirfd };
    for (size_t i = 1; i < ini.n; i++) {
        r.sec = &ini.sections[i];
        grow((void **)&out->v, &out->cap, out->n + 1, sizeof *out->v);
        out->v[out->n++] = client_from_section(&r);
    }
    /* two clients with one key_id: the reference picks one at random */
    client_table_index(out, diag);
    clients_check_paths(out, diag);
    ini_free(&ini);
}

/* Root at start-up acts as the server user (effective IDs) and back:
 * what a reload reads unprivileged is read so at start-up too.  Once
 * root is given up, or if never root: nothing. */
static void privileges_borrow(const struct server *srv, bool borrow)
{
    if (getuid() == 0 && (borrow ? setgroups(0, NULL) || setegid(srv->run_gid)
                          || seteuid(srv->run_uid) : seteuid(0) || setegid(getgid())))
        fatal("cannot switch effective IDs: %s", strerror(errno));
}

/* Read <configdir>/clients.conf through the directory descriptor opened at start-up (a
 * reload may not traverse the path); at start-up as root, as the reference does, then the
 * secfiles as the server user.  A missing file means no clients.  Returns the errors. */
static int clients_load(const struct server *srv, struct diag *diag, struct client_table *out)
{
    struct buf path = { 0 }, data = { 0 };
    buf_printf(&path, "%s/clients.conf", srv->set.configdir);
    diag->file = path.data;
    const char *why = read_file_at(srv->config_dirfd, "clients.conf", false, &data);
    int err = errno;
    if (why && err != ENOENT)
        diag_error(diag, 0, "cannot read: %s%s", why, err == EACCES && geteuid() != 0
                   ? " (the server runs unprivileged now: let its group read the file)" : "");
    privileges_borrow(srv, true);
    if (!why && faccessat(srv->config_dirfd, "clients.conf", R_OK, AT_EACCESS) != 0)
        log_warn("%s: uid %ld cannot read it, so a reload (SIGHUP) will fail; let group "
                 "%ld read it", path.data, (long)srv->run_uid, (long)srv->run_gid);
    if (!why || err == ENOENT)
        clients_from_buffer(data.data ? data.data : "", data.len, srv->set.configdir,
                            srv->config_dirfd, diag, out);
    privileges_borrow(srv, false);
    buf_free(&data);
    diag_end_file(diag);
    buf_free(&path);
    return diag->count;
}

/* clients.conf holds secrets: only its owner, and the group we run as
 * (so SIGHUP can re-read it), have any business reading it. */
static void clients_conf_check_mode(const struct server *srv)
{
    struct stat st;
    if (fstatat(srv->config_dirfd, "clients.conf", &st, 0) != 0)
        return;
    if ((st.st_mode & S_IROTH) || ((st.st_mode & S_IRGRP) && st.st_gid != srv->run_gid))
        log_warn("%s/clients.conf is readable by others than its owner, but it holds "
                 "secrets (chmod 600 it, or 640 with group of uid %ld)", srv->set.configdir,
                 (long)srv->run_uid);
}

/* ===================================================================== */
/* 6. Checkers                                                           */
/*    Each enabled client's checker command runs every `interval` through */
/*    /bin/sh -c in its own process group.  %(name)s in the command is    */
/*    expanded at each run with the client's attributes, shell-quoted.    */
/* ===================================================================== */

/* The command a checker runs now, %(name)s expanded and quoted. */
static int checker_expand(const struct client *c, struct buf *out)
{
    char why[300];
    buf_adds(out, "");
    return checker_walk(c->cur.checker, c, out, why, sizeof why);
}

/* Into a new process group (spawn-pgroup 0), so that stopping it signals
 * the shell's children too; with default signal handling. */
static void checker_start(struct server *srv, struct client *c)
{
    struct buf cmd = { 0 };
    posix_spawnattr_t attr;
    posix_spawn_file_actions_t fa;
    sigset_t all;
    extern char **environ;
    if (checker_expand(c, &cmd) < 0) {
        /* a command from a hand-edited state file; the others are checked */
        log_err("Could not expand checker \"%s\" for %s", c->cur.checker, c->name);
        buf_free(&cmd);
        return;
    }
    log_info("Starting checker '%s' for %s", cmd.data, c->name);
    sigfillset(&all);
    posix_spawnattr_init(&attr);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF);
    posix_spawnattr_setsigdefault(&attr, &all);
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (!srv->set.debug) {       /* with --debug, its output goes to the console */
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, 1, 2);
    }
    char *argv[] = { "sh", "-c", cmd.data, NULL };
    int rc = posix_spawn(&c->checker_pid, "/bin/sh", &fa, &attr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) {
        c->checker_pid = 0;
        log_err("Could not start checker for %s: %s", c->name, strerror(rc));
    } else {
        bus_client_signal(srv, c, "CheckerStarted", cmd.data, 0);
    }
    buf_free(&cmd);
}

/* SIGTERM to a checker's process group, SIGKILL to what is left of it a
 * second later.  A group keeps its number while it has a member. */
static void checker_group_end(struct server *srv, pid_t pgid)
{
    if (kill(-pgid, SIGTERM) != 0)
        return;                  /* nobody left */
    grow((void **)&srv->doomed, &srv->doomed_cap, srv->ndoomed + 1, sizeof *srv->doomed);
    srv->doomed[srv->ndoomed++] = (struct doomed){ pgid, mono_ms() + 1000 };
}

/* SIGKILL each group whose grace has ended by `now`; forget one that has
 * ended by itself, so that a number reused later is not hit. */
static void checker_groups_kill(struct server *srv, int64_t now)
{
    struct doomed *d = srv->doomed;
    size_t kept = 0;
    for (size_t i = 0; i < srv->ndoomed; i++)
        if (kill(-d[i].pgid, d[i].kill_at > now ? 0 : SIGKILL) == 0 && d[i].kill_at > now)
            d[kept++] = d[i];
    srv->ndoomed = kept;
}

/* The shell's children go too, with its group; the loop reaps the shell. */
static void checker_stop(struct server *srv, struct client *c)
{
    if (!c->checker_pid)
        return;
    log_debug("Stopping checker for %s", c->name);
    checker_group_end(srv, c->checker_pid);
    c->checker_pid = 0;
}

static void checker_finished(struct server *srv, struct client *c, int status)
{
    checker_group_end(srv, c->checker_pid);   /* what it left running */
    c->checker_pid = 0;
    state_changed(srv, false);   /* a failure matters after a restart too */
    c->last_checker_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (WIFSIGNALED(status)) {
        c->last_checker_signal = WTERMSIG(status);
        log_warn("Checker for %s crashed? (signal %d)", c->name, WTERMSIG(status));
    } else if (c->last_checker_status == 0) {
        log_info("Checker for %s succeeded", c->name);
        client_checked_ok(srv, c, mono_ms());
    } else {
        log_info("Checker for %s failed", c->name);
    }
    bus_client_signal(srv, c, "CheckerCompleted", NULL, status);
}

/* Collect every finished child; called when SIGCHLD arrived. */
static void checker_reap(struct server *srv)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
        for (size_t i = 0; i < srv->clients.n; i++)
            if (srv->clients.v[i]->checker_pid == pid)
                checker_finished(srv, srv->clients.v[i], status);
}

/* ===================================================================== */
/* 7. Persistence                                                        */
/*    <statedir>/clients.state: our own line-based text format, written   */
/*    atomically, within 100 ms of a change that matters and 2 s of a     */
/*    routine one, which is what a kill -9 can lose.  Never a secret.     */
/* ===================================================================== */

#define STATE_FILE "clients.state"
#define LOCK_FILE "mandos.lock"  /* in the state directory; holds the PID */
#define STATE_MAGIC "mandos-c-state 1"

/* A value stays on one line: these characters as \\, \n and \t, other
 * control characters as \xHH. */
static const char state_raw[] = "\\\n\t", state_esc[] = "\\nt";

static void state_escape(const char *s, struct buf *out)
{
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        const char *r = strchr(state_raw, ch);
        if (r)
            buf_printf(out, "\\%c", state_esc[r - state_raw]);
        else if (ch < 0x20 || ch == 0x7f)
            buf_printf(out, "\\x%02X", ch);
        else
            buf_addc(out, (char)ch);
    }
}

/* Undo state_escape; an unknown escape, or \x00, is an error. */
static int state_unescape(const char *s, struct buf *out)
{
    out->len = 0;
    buf_adds(out, "");
    for (; *s; s++) {
        const char *e = *s == '\\' && s[1] ? strchr(state_esc, s[1]) : NULL;
        int hi = *s == '\\' && s[1] == 'x' ? hex_value((unsigned char)s[2]) : -1;
        int lo = hi >= 0 ? hex_value((unsigned char)s[3]) : -1;
        if (*s != '\\') {
            buf_addc(out, *s);
        } else if (e) {
            buf_addc(out, state_raw[e - state_esc]);
            s++;
        } else if (lo >= 0 && (hi | lo) != 0) {
            buf_addc(out, (char)(hi << 4 | lo));
            s += 3;
        } else {
            return -1;
        }
    }
    return 0;
}

/* Each client's record: a run-time setting as its clients.conf text
 * ("text.") and its value ("cur."), then the other saved fields. */
static void state_serialise(const struct client_table *t, int64_t now_mono,
                            int64_t now_wall, struct buf *out)
{
    char hash[65];
    buf_adds(out, STATE_MAGIC "\n# Written by mandos.c, which rewrites it as its clients "
             "change.  No secrets here.\n");
    for (size_t k = 0; k < t->n; k++) {
        const struct client *c = t->v[k];
        buf_adds(out, "client ");
        state_escape(c->name, out);
        for (size_t i = 0; i < N_FIELDS; i++) {
            const struct client_field *f = &client_fields[i];
            if (!(f->flags & (F_RUN | F_SAVE | F_HIST)))
                continue;
            if (f->flags & F_RUN) {
                buf_printf(out, "\ntext.%s ", f->name);
                state_escape(c->conf_text[i], out);
            }
            buf_printf(out, "\n%s%s ", f->flags & F_RUN ? "cur." : "", f->name);
            if (f->type == CF_STR) {
                state_escape(*CF_AT(c, f, char *), out);
            } else if (f->type == CF_HASH) {
                hex_encode_upper(CF_AT(c, f, unsigned char), 32, hash);
                buf_adds(out, hash);
            } else {
                buf_printf(out, "%" PRId64, client_number(c, f, now_mono, now_wall));
            }
        }
        buf_adds(out, "\nend\n");
    }
    buf_printf(out, "total %zu\n", t->n);
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Write the state file atomically: temp file, fsync, rename, fsync dir.
 * After a failure, as after a success, the next save waits its turn;
 * but the first one, at start-up, must work: better to refuse to start
 * than to lose state later. */
static void state_save(struct server *srv)
{
    struct buf data = { 0 };
    char tmp[64];
    state_serialise(&srv->clients, mono_ms(), wall_us(), &data);
    snprintf(tmp, sizeof tmp, "%s.tmp-%ld", STATE_FILE, (long)getpid());
    unlinkat(srv->state_dirfd, tmp, 0);         /* left by a crash, or planted */
    int fd = openat(srv->state_dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                    0600);
    bool ok = fd >= 0 && write_all(fd, data.data, data.len) == 0 && fsync(fd) == 0;
    ok = fd >= 0 && close(fd) == 0 && ok
         && renameat(srv->state_dirfd, tmp, srv->state_dirfd, STATE_FILE) == 0;
    int e = errno;
    if (!ok)
        unlinkat(srv->state_dirfd, tmp, 0);
    if (!ok && !srv->state_saved_at)        /* the first save, at start-up */
        fatal("state directory %s is not writable by uid %ld (%s); give it to that "
              "user, e.g. chown _mandos: %s", srv->set.statedir, (long)geteuid(),
              strerror(e), srv->set.statedir);
    if (!ok)
        log_err("Could not save state to %s/%s: %s", srv->set.statedir, STATE_FILE, strerror(e));
    else
        fsync(srv->state_dirfd);
    buf_free(&data);
    srv->state_saved_at = mono_ms();
    srv->state_urgent = false;
    srv->state_dirty = !ok;
}

/* One line of a state file: "client NAME" adds a record to `out`, which
 * `*cur` stands for until its "end" line; the "key value" lines between
 * set its fields (`expires` in wall-clock µs, until applied). */
static int state_line(char *key, struct client **cur, struct client_table *out,
                      struct buf *scratch)
{
    char *sp = strchr(key, ' ');
    const char *val = sp ? sp + 1 : "";
    struct client *c = *cur;
    if (sp)
        *sp = '\0';
    if (!c && (!streq(key, "client") || state_unescape(val, scratch) < 0 || !*scratch->data))
        return -1;
    if (!c) {
        c = *cur = xcalloc(1, sizeof *c);
        c->name = xstrdup(scratch->data);
        for (size_t i = 0; i < N_RUN; i++) {
            c->conf_text[i] = xstrdup("");
            if (client_fields[i].type == CF_STR)
                *CF_AT(c, &client_fields[i], char *) = xstrdup("");
        }
        grow((void **)&out->v, &out->cap, out->n + 1, sizeof *out->v);
        out->v[out->n++] = c;
        return 0;
    }
    if (streq(key, "end")) {
        *cur = NULL;
        return 0;
    }
    bool text = strncmp(key, "text.", 5) == 0;
    bool run = text || strncmp(key, "cur.", 4) == 0;
    const struct client_field *f = client_field(key + (text ? 5 : run ? 4 : 0));
    long long n;
    bool overflow;
    if (!f || run != ((f->flags & F_RUN) != 0) || !(f->flags & (F_RUN | F_SAVE | F_HIST)))
        return -1;
    if (text || f->type == CF_STR) {
        if (state_unescape(val, scratch) < 0)
            return -1;
        char **slot = text ? &c->conf_text[f - client_fields] : CF_AT(c, f, char *);
        free(*slot);
        *slot = xstrdup(scratch->data);
        return 0;
    }
    if (f->type == CF_HASH)
        return hex_decode(val, CF_AT(c, f, unsigned char), 32);
    if (parse_pyint(val, strlen(val), &n, &overflow) < 0 || overflow
        || (run && (n < 0 || n > DURATION_MAX_MS)) || (f->type == CF_BOOL && n != 0 && n != 1))
        return -1;
    client_set_number(c, f, n);
    return 0;
}

/* Parse a state file's bytes into client records (their `expires` is in
 * wall-clock µs).  The last line counts the records: without it the file
 * was cut short.  The first error stops it; returns the error count. */
static int state_parse(const char *data, size_t len, struct diag *diag,
                       struct client_table *out)
{
    struct client *cur = NULL;
    struct buf line = { 0 }, scratch = { 0 };
    int lineno = 0;
    char total[32] = "";         /* the "total N" line, once read */
    for (size_t i = 0; i < len && diag->count == 0; i++) {
        size_t start = i;
        while (i < len && data[i] != '\n')
            i++;
        line.len = 0;
        buf_add(&line, data + start, i - start);
        lineno++;
        if (memchr(line.data, '\0', line.len))
            diag_error(diag, lineno, "NUL byte in state file");
        else if (lineno == 1 && !streq(line.data, STATE_MAGIC))
            diag_error(diag, lineno, "not a mandos.c state file (expected \"%s\")",
                       STATE_MAGIC);
        else if (*total)
            diag_error(diag, lineno, "a line after \"%s\"", total);
        else if (!cur && strncmp(line.data, "total ", 6) == 0) {
            snprintf(total, sizeof total, "total %zu", out->n);
            if (!streq(line.data, total))
                diag_error(diag, lineno, "\"%.40s\", but the file holds %zu clients",
                           line.data, out->n);
        } else if (lineno > 1 && line.len && line.data[0] != '#'
                   && state_line(line.data, &cur, out, &scratch) < 0)
            diag_error(diag, lineno, "unexpected or malformed line \"%.40s\"", line.data);
    }
    if (diag->count == 0 && !*total)
        diag_error(diag, lineno, "%s: no \"total\" line at the end",
                   lineno ? "cut short" : "empty");
    client_table_index(out, NULL);
    buf_free(&line);
    buf_free(&scratch);
    return diag->count;
}

/* Apply saved state to freshly read clients; `saved` is consumed.  An
 * enabled client whose time ran out while we were down stays enabled
 * only if its last checker succeeded. */
static void state_apply(struct client_table *clients, struct client_table *saved)
{
    int64_t now = wall_us();
    for (size_t i = 0; i < clients->n; i++) {
        struct client *c = clients->v[i];
        struct client *s = client_find_by_name(saved, c->name);
        if (!s)
            continue;
        if (memcmp(c->secret_hash, s->secret_hash, 32) != 0)
            log_info("The secret of %s changed in clients.conf since the last run", c->name);
        client_reconcile(c, s);
        if (c->cur.enabled && !s->cur.enabled)
            c->last_enabled = now;      /* re-enabled by an edit */
        if (!c->cur.enabled || !s->cur.enabled || !s->expires || s->expires > now)
            continue;
        if (!c->last_checked_ok)
            log_warn("disabling client %s - Client never performed a successful checker",
                     c->name);
        else if (c->last_checker_status != 0)
            log_warn("disabling client %s - Client last checker failed with error code %d",
                     c->name, c->last_checker_status);
        else
            log_debug("Last checker succeeded, keeping %s enabled", c->name);
        c->cur.enabled = c->last_checked_ok && c->last_checker_status == 0;
    }
    client_table_clear(saved);
}

/* The lock file names the server that holds it: our PID, and again
 * after detaching. */
static void state_lock_note(const struct server *srv)
{
    if (pid_write(srv->lock_fd) < 0)
        log_warn("cannot write our PID to %s/%s: %s", srv->set.statedir, LOCK_FILE,
                 strerror(errno));
}

/* Make and open the state directory as root, following no symbolic link,
 * so that later saves work through the descriptor whatever the path's
 * parents allow; and lock it for our whole life, since two servers would
 * overwrite each other's state. */
static void state_open(struct server *srv)
{
    const char *dir = srv->set.statedir;
    char pid[16] = "";
    for (size_t n = strlen(dir); n > 1 && dir[n - 1] == '/'; n--)
        srv->set.statedir[n - 1] = '\0';      /* "link/" follows the link despite O_NOFOLLOW */
    bool created = mkdir(dir, 0700) == 0;
    srv->state_dirfd = openat(AT_FDCWD, dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (srv->state_dirfd < 0)
        fatal("cannot open state directory %s: %s", dir, open_error());
    if (created && geteuid() == 0 && fchown(srv->state_dirfd, srv->run_uid, srv->run_gid) != 0)
        fatal("cannot hand state directory %s to uid %ld: %s", dir, (long)srv->run_uid,
              strerror(errno));
    srv->lock_fd = openat(srv->state_dirfd, LOCK_FILE,
                          O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644);
    struct stat st;
    if (srv->lock_fd < 0 || fstat(srv->lock_fd, &st) != 0)
        fatal("cannot open %s/%s: %s", dir, LOCK_FILE, open_error());
    if (!S_ISREG(st.st_mode) || st.st_nlink != 1)   /* a hard link would have us write elsewhere */
        fatal("%s/%s: not a regular file with one link; not starting", dir, LOCK_FILE);
    if (flock(srv->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        bool held = errno == EWOULDBLOCK;
        const char *why = held ? "in use by the server with PID " : strerror(errno);
        ssize_t got = held ? pread(srv->lock_fd, pid, sizeof pid - 1, 0) : 0;
        fatal("cannot lock state directory %s: %s%.*s; not starting", dir, why,
              got > 0 ? (int)strspn(pid, "0123456789") : 0, pid);
    }
    state_lock_note(srv);
}

/* Load the saved state, unless told not to, with the rights of the user
 * we run as.  A missing file is fine; a broken one is fatal, because
 * silently re-enabling every client would undo exactly what the state
 * protects. */
static void state_load(struct server *srv)
{
    const char *dir = srv->set.statedir;
    struct buf data = { 0 };
    struct client_table saved = { 0 };
    char path[PATH_MAX];
    if (!srv->set.restore)
        return;
    snprintf(path, sizeof path, "%s/%s", dir, STATE_FILE);
    struct diag diag = { .file = path };
    const char *why = read_file_at(srv->state_dirfd, STATE_FILE, true, &data);
    int e = errno;
    /* The reference's state: starting fresh would re-enable every client
     * it had disabled. */
    if (why && e == ENOENT && faccessat(srv->state_dirfd, "clients.pickle", F_OK, 0) == 0)
        fatal("%s/clients.pickle holds the reference server's state and there is no %s "
              "yet: import it with mandos-import-pickle --statedir %s, or start with "
              "--no-restore to ignore it", dir, STATE_FILE, dir);
    if (why && e == ENOENT) {
        log_info("No saved state in %s; starting fresh", path);
        return;
    }
    /* a directory we may not search: the first save says how to fix it */
    if (why && e == EACCES && faccessat(srv->state_dirfd, ".", X_OK, 0) != 0)
        return;
    if (why)
        fatal("%s: cannot read saved state: %s (start with --no-restore to ignore it)",
              path, why);
    if (state_parse(data.data, data.len, &diag, &saved) > 0)
        fatal("%s: the saved state is corrupt (see above); refusing to start, since "
              "disabled clients would come back enabled.  Move the file away or start "
              "with --no-restore to ignore it", path);
    buf_free(&data);
    log_debug("Restoring state of %zu clients from %s", saved.n, path);
    state_apply(&srv->clients, &saved);
}

/* ===================================================================== */
/* 8. Network and TLS connections                                        */
/*    The listening socket, and one struct conn per peer that conn_step() */
/*    moves through the protocol: version line, TLS handshake (we are the */
/*    TLS client), key lookup, approval, secret, close; each state with a */
/*    deadline.                                                           */
/* ===================================================================== */

#define VERSION_LINE_MAX 64      /* "1\r\n" is all a real client sends */

/* In protocol order; a closed connection is freed at the end of the turn. */
enum conn_state { CONN_VERSION, CONN_HANDSHAKE, CONN_APPROVAL, CONN_SEND, CONN_BYE, CONN_CLOSED };

/* For "timed out while ..." */
static const char *const conn_state_names[] = {
    "reading the protocol version", "TLS handshake", "waiting for approval",
    "sending the secret", "closing TLS", "closed",
};

struct conn {
    int fd;
    enum conn_state state;
    int64_t deadline;            /* monotonic ms: the end of this state */
    gnutls_session_t tls;        /* NULL until the version line is accepted */
    char peer[INET6_ADDRSTRLEN + IF_NAMESIZE + 16];   /* "[addr%if]:port" for log lines */
    char line[VERSION_LINE_MAX]; /* the version line so far */
    size_t line_len;
    struct client *client;       /* once identified */
    bool counted_pending;        /* this conn is in client->approvals_pending */
    struct buf secret;           /* private copy while sending; wiped after */
    size_t secret_sent;
    size_t slot;                 /* its place in this turn's poll array */
    struct conn *prev, *next;    /* oldest first */
};

/* What a state's handler says: wait for the peer, go on, give up, or
 * refuse.  A refused connection can no longer lead to a secret: it gets
 * our close_notify, and no waiting for the peer's, so a peer that never
 * answers holds no slot until connection_timeout. */
enum step { STEP_WAIT, STEP_NEXT, STEP_CLOSE, STEP_REFUSE };

/* Every line about a connection names the peer and, once known, the
 * client.  STEP_CLOSE, for a handler that says why it gives up. */
PRINTF_LIKE(3, 4)
static enum step conn_log(const struct conn *cn, int level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    if (level > log_cfg.threshold)
        return STEP_CLOSE;       /* not even formatted: this is the hot path */
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (cn->client)
        log_msg(level, "%s (%s): %s", cn->peer, cn->client->name, msg);
    else
        log_msg(level, "%s: %s", cn->peer, msg);
    return STEP_CLOSE;
}

/* "addr:port", or "[addr%scope]:port" for IPv6. */
static void format_peer(const struct sockaddr_storage *ss, char *out, size_t n)
{
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2], port[8];
    bool v6 = ss->ss_family == AF_INET6;
    socklen_t len = v6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    int flags = NI_NUMERICHOST | NI_NUMERICSERV;
    if ((v6 || ss->ss_family == AF_INET)
        && getnameinfo((const void *)ss, len, host, sizeof host, port, sizeof port, flags) == 0)
        snprintf(out, n, "%s%s%s:%s", v6 ? "[" : "", host, v6 ? "]" : "", port);
    else
        snprintf(out, n, "?:0");
}

/* Bind to --port and --address, an IP literal; a link-local IPv6 one
 * without its "%scope" takes --interface's. */
static void listen_bind(int fd, const struct settings *set)
{
    bool v6 = set->use_ipv6;
    const char *text = *set->address ? set->address : v6 ? "::" : "0.0.0.0";
    uint16_t port = (uint16_t)(set->port > 0 ? set->port : 0);
    struct sockaddr_in s4 = { .sin_family = AF_INET, .sin_port = htons(port) };
    struct sockaddr_in6 s6 = { .sin6_family = AF_INET6, .sin6_port = htons(port) };
    char addr[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    snprintf(addr, sizeof addr, "%s", text);
    char *scope = v6 ? strchr(addr, '%') : NULL;
    if (scope)
        *scope++ = '\0';
    bool ok = inet_pton(v6 ? AF_INET6 : AF_INET, addr, v6 ? (void *)&s6.sin6_addr
                                                          : (void *)&s4.sin_addr) == 1;
    if (!scope && IN6_IS_ADDR_LINKLOCAL(&s6.sin6_addr) && *set->interface)
        scope = set->interface;
    if (ok && scope)
        ok = (s6.sin6_scope_id = if_nametoindex(scope)) != 0;
    if (!ok)
        fatal("bad address \"%s\" (an IP%s literal%s)", text, v6 ? "v6" : "v4",
              v6 ? ", optionally with %interface" : "");
    if (port)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &(int){ 1 }, sizeof(int));
    struct sockaddr *sa = v6 ? (struct sockaddr *)&s6 : (struct sockaddr *)&s4;
    if (bind(fd, sa, v6 ? sizeof s6 : sizeof s4) < 0)
        fatal("cannot bind to address %s port %d: %s", text, port, strerror(errno));
}

/* Make (or adopt, with --socket) the listening socket, as root; with
 * neither --address nor --port, listen() picks the port. */
static void listen_open(struct server *srv)
{
    const struct settings *set = &srv->set;
    int family = set->use_ipv6 ? AF_INET6 : AF_INET;
    /* an adopted socket moves clear of 0-2, which daemonizing replaces */
    int adopt = set->socket_fd;
    int fd = adopt >= 0 ? fcntl(adopt, F_DUPFD_CLOEXEC, 3) : socket(family, SOCK_STREAM, 0);
    if (fd < 0 && adopt >= 0)
        fatal("--socket %d: %s", adopt, strerror(errno));
    if (fd < 0)
        fatal("cannot create a socket: %s", strerror(errno));
    if (adopt >= 0)
        close(adopt);
    if (cloexec(fd, true) < 0)
        fatal("cannot set up the listening socket: %s", strerror(errno));
    /* as with the reference, a missing interface means every interface;
     * a system that cannot bind to an interface at all refuses to start */
    const char *ifname = set->interface;
    if (*ifname && shim_bind_to_device(fd, family, ifname) < 0) {
        if (errno == EPERM)
            log_err("No permission to bind to interface %s", ifname);
        else if (errno == ENODEV)
            log_err("Interface %s does not exist, cannot bind", ifname);
        else if (errno == ENOPROTOOPT)
            fatal("--interface %s: this system cannot bind a socket to an interface", ifname);
        else
            fatal("cannot bind to interface %s: %s", ifname, strerror(errno));
    }
    if (*set->address || set->port > 0)
        listen_bind(fd, set);
    if (listen(fd, SOMAXCONN) < 0)
        fatal("cannot listen: %s", strerror(errno));
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    char where[INET6_ADDRSTRLEN + IF_NAMESIZE + 2], port[8];
    int flags = NI_NUMERICHOST | NI_NUMERICSERV;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0
        || getnameinfo((struct sockaddr *)&ss, len, where, sizeof where, port, sizeof port, flags))
        fatal("getsockname: %s", strerror(errno));
    where[strcspn(where, "%")] = '\0';   /* the address alone, as the reference shows it */
    srv->port = atoi(port);
    srv->listen_fd = fd;
    log_info("Now listening on address '%s', port %d", where, srv->port);
}

/* What is wrong with the TLS priority (start-up and -t), or NULL. */
static const char *tls_priority_problem(struct server *srv, const char **at)
{
    *at = NULL;
    if (!*srv->set.priority)
        return "empty";
    int rc = gnutls_priority_init(&srv->priority, srv->set.priority, at);
    return rc == GNUTLS_E_SUCCESS ? NULL : gnutls_strerror(rc);
}

/* The TLS priority and our (empty) credentials, checked before we serve. */
static void tls_setup(struct server *srv)
{
    const char *at;
    const char *why = tls_priority_problem(srv, &at);
    if (why)
        fatal("bad priority string \"%s\": %s%s%s", srv->set.priority, why,
              at ? " at " : "", at ? at : "");
    if (strstr(srv->set.priority, "CTYPE-OPENPGP"))
        log_warn("priority \"%s\" asks for OpenPGP certificates, which this GnuTLS (%s) "
                 "does not have: only raw public keys work, old clients will fail",
                 srv->set.priority, gnutls_check_version(NULL));
    if (gnutls_certificate_allocate_credentials(&srv->cred) != GNUTLS_E_SUCCESS)
        fatal("cannot allocate TLS credentials");
}

/* ---- the protocol, one state at a time ----------------------------------- */

static bool tls_again(ssize_t rc)
{
    return rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED;
}

/* Move to a state that the connection timeout bounds. */
static enum step conn_enter(struct server *srv, struct conn *cn, enum conn_state s,
                            int64_t now)
{
    cn->state = s;
    cn->deadline = now + srv->set.connection_timeout;
    return STEP_NEXT;
}

static void conn_leave_approval(struct conn *cn)
{
    if (cn->counted_pending && cn->client)
        cn->client->approvals_pending--;
    cn->counted_pending = false;
}

/* Release everything now; the struct itself is freed by conn_sweep(), so
 * pointers held during a loop turn stay valid. */
static void conn_close(struct server *srv, struct conn *cn)
{
    if (cn->state == CONN_CLOSED)
        return;
    srv->nconns--;
    conn_leave_approval(cn);
    buf_free(&cn->secret);
    if (cn->tls)
        gnutls_deinit(cn->tls);
    close(cn->fd);
    cn->state = CONN_CLOSED;
}

/* The reference's rule: the first word must be an integer <= 1. */
static bool version_line_accepted(const char *line, size_t n, char *why, size_t whylen)
{
    trim_span(&line, &n);
    size_t w = 0;
    while (w < n && !is_blank((unsigned char)line[w]))
        w++;
    char word[4 * 20 + 1];       /* a NUL byte in it must not cut the reason short */
    escape_for_log(line, w > 20 ? 20 : w, word, sizeof word, true);
    long long v;
    bool overflow;
    if (w == 0)
        snprintf(why, whylen, "empty version line");
    else if (parse_pyint(line, w, &v, &overflow) < 0)
        snprintf(why, whylen, "not an integer: \"%s\"", word);
    else if (v > 1)
        snprintf(why, whylen, "version %s is newer than 1", word);
    else
        return true;
    return false;
}

/* Read the version line one byte at a time: whatever follows the newline
 * is the peer's TLS traffic and must stay in the socket.  "\r\n", "\n"
 * and a lone "\r" all end the line (after a "\r" we only peek).
 * STEP_NEXT: the line is in cn->line. */
static enum step conn_read_line(struct conn *cn)
{
    for (;;) {
        bool after_cr = cn->line_len && cn->line[cn->line_len - 1] == '\r';
        char ch;
        ssize_t r = recv(cn->fd, &ch, 1, after_cr ? MSG_PEEK : 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return STEP_WAIT;
        if (r < 0 || (r == 0 && !after_cr))
            return conn_log(cn, LOG_ERR, "Unknown protocol version: %s before a full line",
                            r < 0 ? strerror(errno) : "connection closed");
        if (after_cr && r == 1 && ch == '\n' && recv(cn->fd, &ch, 1, 0) != 1)
            return STEP_CLOSE;
        if (after_cr || ch == '\n') {
            cn->line_len -= after_cr;
            cn->line[cn->line_len] = '\0';
            return STEP_NEXT;
        }
        if (cn->line_len + 1 >= sizeof cn->line)
            return conn_log(cn, LOG_ERR, "Unknown protocol version: line longer than %d bytes",
                            VERSION_LINE_MAX);
        cn->line[cn->line_len++] = ch;
    }
}

/* The version line, then TLS as its client.  The deadline set at accept()
 * covers the line and the handshake together. */
static enum step conn_do_version(struct server *srv, struct conn *cn)
{
    enum step r = conn_read_line(cn);
    if (r != STEP_NEXT)
        return r;
    char shown[4 * VERSION_LINE_MAX + 1], why[128];
    escape_for_log(cn->line, cn->line_len, shown, sizeof shown, true);
    conn_log(cn, LOG_DEBUG, "Protocol version: '%s'", shown);
    if (!version_line_accepted(cn->line, cn->line_len, why, sizeof why))
        return conn_log(cn, LOG_ERR, "Unknown protocol version: %s", why);
    int rc = gnutls_init(&cn->tls, GNUTLS_CLIENT | GNUTLS_NO_TICKETS | GNUTLS_ENABLE_RAWPK
                         | GNUTLS_NONBLOCK);
    if (rc == GNUTLS_E_SUCCESS)
        rc = gnutls_priority_set(cn->tls, srv->priority);
    if (rc == GNUTLS_E_SUCCESS)
        rc = gnutls_credentials_set(cn->tls, GNUTLS_CRD_CERTIFICATE, srv->cred);
    if (rc != GNUTLS_E_SUCCESS)
        return conn_log(cn, LOG_ERR, "cannot set up TLS: %s", gnutls_strerror(rc));
    gnutls_transport_set_int(cn->tls, cn->fd);
    gnutls_handshake_set_timeout(cn->tls, 0);   /* our own deadline bounds it */
    cn->state = CONN_HANDSHAKE;
    return STEP_NEXT;
}

/* A key_id: SHA-256 of a DER SubjectPublicKeyInfo; a GnuTLS error code. */
static int key_id_of_spki(const gnutls_datum_t *spki, unsigned char key_id[32])
{
    gnutls_pubkey_t pk;
    size_t size = 32;
    int rc = gnutls_pubkey_init(&pk);
    if (rc != GNUTLS_E_SUCCESS)
        return rc;
    rc = gnutls_pubkey_import(pk, spki, GNUTLS_X509_FMT_DER);
    if (rc == GNUTLS_E_SUCCESS)
        rc = gnutls_pubkey_get_key_id(pk, GNUTLS_KEYID_USE_SHA256, key_id, &size);
    gnutls_pubkey_deinit(pk);
    if (rc == GNUTLS_E_SUCCESS && size != 32)
        rc = GNUTLS_E_INTERNAL_ERROR;
    return rc;
}

/* The peer's raw public key gives the key_id that names the client. */
static enum step conn_do_handshake(struct server *srv, struct conn *cn, int64_t now)
{
    int rc = gnutls_handshake(cn->tls);
    if (tls_again(rc))
        return STEP_WAIT;
    if (rc < 0)
        return conn_log(cn, LOG_WARNING, "Handshake failed: %s", gnutls_strerror(rc));
    conn_log(cn, LOG_DEBUG, "Handshake succeeded");
    unsigned int n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(cn->tls, &n);
    unsigned char key[32];
    char hex[65];
    const char *bad = NULL;
    if (gnutls_certificate_type_get2(cn->tls, GNUTLS_CTYPE_PEERS) != GNUTLS_CRT_RAWPK)
        bad = "peer did not present a raw public key";
    else if (!certs || n == 0)
        bad = "no public key received";
    else if ((rc = key_id_of_spki(&certs[0], key)) != GNUTLS_E_SUCCESS)
        bad = gnutls_strerror(rc);
    if (bad) {
        conn_log(cn, LOG_WARNING, "Bad certificate: %s", bad);
        return STEP_REFUSE;
    }
    hex_encode_upper(key, 32, hex);
    conn_log(cn, LOG_DEBUG, "Key ID: %s", hex);
    cn->client = client_find_by_key_id(&srv->clients, hex);
    if (cn->client)
        return conn_enter(srv, cn, CONN_APPROVAL, now);
    conn_log(cn, LOG_INFO, "Client not found for key ID: %s", hex);
    bus_client_not_found(srv, hex, cn->peer);
    return STEP_REFUSE;
}

/* Nothing is expected from a peer awaiting approval: read only to notice
 * it hanging up, including a close_notify GnuTLS has buffered. */
static bool conn_peer_gone(struct conn *cn)
{
    char scratch[256];
    ssize_t r;
    int rounds = 0;
    do
        r = gnutls_record_recv(cn->tls, scratch, sizeof scratch);
    while (r > 0 && gnutls_record_check_pending(cn->tls) && ++rounds < 64);
    return r == 0 || (r < 0 && !tls_again(r));
}

/* The approval rules, evaluated on entry and whenever something changes
 * (approve/deny, enable/disable, the deadline, the peer hanging up). */
static enum step conn_do_approval(struct server *srv, struct conn *cn, short revents,
                                  int64_t now)
{
    struct client *c = cn->client;
    if ((revents & (POLLIN | POLLHUP | POLLERR)) && conn_peer_gone(cn))
        return conn_log(cn, LOG_INFO, "peer went away while waiting for approval");
    if (!c->cur.enabled) {
        conn_log(cn, LOG_INFO, "Client %s is disabled", c->name);
        bus_client_signal(srv, c, "Rejected", "Disabled", 0);
        return STEP_REFUSE;
    }
    if (c->approved == APPROVAL_GRANTED || c->cur.approval_delay == 0)
        return conn_enter(srv, cn, CONN_SEND, now);
    if (c->approved == APPROVAL_DENIED) {
        conn_log(cn, LOG_WARNING, "Client %s was not approved", c->name);
        bus_client_signal(srv, c, "Rejected", "Denied", 0);
        return STEP_REFUSE;
    }
    if (!cn->counted_pending) {
        cn->counted_pending = true;
        c->approvals_pending++;
        c->last_approval_request = wall_us();
        cn->deadline = now + c->cur.approval_delay;
        state_changed(srv, false);
        conn_log(cn, LOG_INFO, "Client %s needs approval", c->name);
        bus_client_signal(srv, c, "NeedApproval", NULL, 0);
    }
    if (now < cn->deadline)
        return STEP_WAIT;
    if (c->cur.approved_by_default)
        return conn_enter(srv, cn, CONN_SEND, now);
    conn_log(cn, LOG_WARNING, "Client %s timed out while waiting for approval", c->name);
    bus_client_signal(srv, c, "Rejected", "Approval timed out", 0);
    return STEP_REFUSE;
}

/* The secret goes from a private copy: a reload or a new secret must not
 * change the bytes of a send that is under way. */
static enum step conn_do_send(struct server *srv, struct conn *cn, int64_t now)
{
    struct client *c = cn->client;
    conn_leave_approval(cn);
    if (!cn->secret.data)
        buf_add(&cn->secret, c->secret, c->secret_len);
    while (cn->secret_sent < cn->secret.len) {
        ssize_t r = gnutls_record_send(cn->tls, cn->secret.data + cn->secret_sent,
                                       cn->secret.len - cn->secret_sent);
        if (tls_again(r))
            return STEP_WAIT;
        if (r < 0)
            return conn_log(cn, LOG_WARNING, "gnutls send failed: %s", gnutls_strerror((int)r));
        cn->secret_sent += (size_t)r;
    }
    buf_free(&cn->secret);
    conn_log(cn, LOG_INFO, "Sending secret to %s", c->name);
    bus_client_signal(srv, c, "GotSecret", NULL, 0);
    client_bump(srv, c, c->cur.extended_timeout, now);
    return conn_enter(srv, cn, CONN_BYE, now);
}

static enum step conn_do_bye(struct conn *cn)
{
    int rc = gnutls_bye(cn->tls, GNUTLS_SHUT_RDWR);
    if (tls_again(rc))
        return STEP_WAIT;
    if (rc < 0)
        conn_log(cn, LOG_WARNING, "GnuTLS bye failed: %s", gnutls_strerror(rc));
    return STEP_CLOSE;
}

/* Advance a connection as far as it can go without waiting.  `revents`
 * is what poll() reported; 0 when woken by the deadline, which ends every
 * state but approval (that has its own rules), or by a change. */
static void conn_step(struct server *srv, struct conn *cn, short revents, int64_t now)
{
    enum step r = STEP_NEXT;
    if (!revents && cn->deadline <= now && cn->state != CONN_APPROVAL)
        r = conn_log(cn, LOG_WARNING, "timed out while %s", conn_state_names[cn->state]);
    for (int guard = 0; guard < 16 && r == STEP_NEXT; guard++) {
        switch (cn->state) {
        case CONN_VERSION: r = conn_do_version(srv, cn); break;
        case CONN_HANDSHAKE: r = conn_do_handshake(srv, cn, now); break;
        case CONN_APPROVAL: r = conn_do_approval(srv, cn, revents, now); break;
        case CONN_SEND: r = conn_do_send(srv, cn, now); break;
        case CONN_BYE: r = conn_do_bye(cn); break;
        case CONN_CLOSED: return;
        }
        revents = 0;
    }
    if (r == STEP_REFUSE)
        gnutls_bye(cn->tls, GNUTLS_SHUT_WR);
    if (r >= STEP_CLOSE)
        conn_close(srv, cn);
}

/* What to poll for: the version line and a waiting peer are read; TLS
 * says which way it is blocked. */
static short conn_events(const struct conn *cn)
{
    if (cn->state == CONN_VERSION || cn->state == CONN_APPROVAL)
        return POLLIN;
    return gnutls_record_get_direction(cn->tls) ? POLLOUT : POLLIN;
}

/* ---- the set of connections ------------------------------------------------ */

/* Something changed for client c: let its waiting connections re-decide. */
static void conn_approval_wakeup(struct server *srv, struct client *c, int64_t now)
{
    for (struct conn *cn = srv->conns_head; cn; cn = cn->next)
        if (cn->client == c && cn->state == CONN_APPROVAL)
            conn_step(srv, cn, 0, now);
}

/* Client `old` goes away: a reload that kept its key hands its connections
 * to `n`; otherwise (n NULL: removed, or its key replaced) they close. */
static void conn_client_gone(struct server *srv, struct client *old, struct client *n)
{
    for (struct conn *cn = srv->conns_head; cn; cn = cn->next) {
        if (cn->client != old || cn->state == CONN_CLOSED)
            continue;
        if (!n) {
            conn_log(cn, LOG_INFO, "client removed; closing");
            conn_close(srv, cn);
        }
        cn->client = n;
    }
}

/* The table is full: the connection with the least progress, the oldest
 * of those, makes room.  One waiting for approval or sending a secret
 * (only a known client gets there) never does: if only such are open,
 * the newcomer is turned away. */
static void conn_make_room(struct server *srv)
{
    long max = srv->set.max_connections;
    struct conn *v = NULL;
    if (srv->nconns < (size_t)max)
        return;
    for (struct conn *cn = srv->conns_head; cn; cn = cn->next) {
        bool kept = cn->state == CONN_APPROVAL || cn->state == CONN_SEND;
        if (!kept && cn->state != CONN_CLOSED && (!v || cn->state < v->state))
            v = cn;
    }
    if (!v)
        return;
    conn_log(v, LOG_WARNING, "dropped to make room (%ld connections open)", max);
    conn_close(srv, v);
}

#define ACCEPT_BACKOFF_MS 200

/* Out of descriptors, the listener stays readable: poll() leaves it out
 * for a while, and the warning comes at most once a second. */
static void accept_back_off(struct server *srv, int64_t now)
{
    srv->accept_resume = now + ACCEPT_BACKOFF_MS;
    if (now - srv->accept_warned < 1000)
        return;
    srv->accept_warned = now;
    log_warn("accept: %s; not accepting for %d ms", strerror(errno), ACCEPT_BACKOFF_MS);
}

/* Each new connection joins the tail of the list and reads at once. */
static void conn_accept(struct server *srv, int64_t now)
{
    for (int i = 0; i < 64; i++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        int fd = accept(srv->listen_fd, (struct sockaddr *)&ss, &len);
        if (fd < 0 && (errno == EINTR || errno == ECONNABORTED))
            continue;
        if (fd < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            accept_back_off(srv, now);
        if (fd < 0)
            return;
        conn_make_room(srv);
        struct conn *cn = xcalloc(1, sizeof *cn);
        format_peer(&ss, cn->peer, sizeof cn->peer);
        if (srv->nconns >= (size_t)srv->set.max_connections || cloexec(fd, true) < 0) {
            log_warn("%s: refused: %zu connections open", cn->peer, srv->nconns);
            close(fd);
            free(cn);
            continue;
        }
        /* the secret is one small record: send it now, not after an ACK */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){ 1 }, sizeof(int));
        cn->fd = fd;
        conn_enter(srv, cn, CONN_VERSION, now);
        cn->prev = srv->conns_tail;
        *(cn->prev ? &cn->prev->next : &srv->conns_head) = cn;
        srv->conns_tail = cn;
        srv->nconns++;
        log_info("TCP connection from: %s", cn->peer);
        conn_step(srv, cn, POLLIN, now);
    }
}

/* Free the connections conn_close() finished with during this turn. */
static void conn_sweep(struct server *srv)
{
    struct conn *cn = srv->conns_head;
    while (cn) {
        struct conn *next = cn->next;
        if (cn->state == CONN_CLOSED) {
            *(cn->prev ? &cn->prev->next : &srv->conns_head) = cn->next;
            *(cn->next ? &cn->next->prev : &srv->conns_tail) = cn->prev;
            free(cn);
        }
        cn = next;
    }
}


/* ===================================================================== */
/* 9. Zeroconf                                                           */
/*    Announces _mandos._tcp on the bound port.  The loop sees only file  */
/*    descriptors and a deadline (zc_pollfds, zc_process, zc_deadline).   */
/*    Chosen at build time: avahi, dnssd, or none.                        */
/* ===================================================================== */

#define ZC_MAX_FDS 8             /* poll slots a back end may use */
#define ZC_SERVICE_TYPE "_mandos._tcp"
#define ZC_RETRY_MS 5000         /* wait before asking a missing daemon again */

#if ZC_AVAILABLE

/* The link to the daemon: an Avahi client, or a DNS-SD registration. */
struct zc {
    struct server *srv;
    char *name;                  /* the service name, after any renames */
    long ifindex;                /* where to announce, from --interface */
    bool failed;                 /* drop the link once the library's callback is over */
    bool said_so;                /* a retry was logged: the next at DEBUG, so that a
                                  * daemon away for an hour does not fill the log */
    int64_t retry_at;            /* monotonic ms to make a new link, 0 = none */
    int64_t due;                 /* monotonic ms the library wants a turn, 0 = none */
#if HAVE_AVAHI
    AvahiSimplePoll *poll;       /* Avahi's main loop, stepped by ours */
    struct pollfd *ufds;         /* its poll set, noted by zc_capture; NULL = none */
    unsigned nfds;
    AvahiClient *client;
    AvahiEntryGroup *group;
    long renames;
    bool waiting;                /* the client waits for the daemon to appear */
#else
    DNSServiceRef ref;           /* NULL while not registered */
#endif
};

/* The link failed: zc_process drops it after the callback, and makes a
 * new one `delay` ms later. */
static void zc_fail(struct zc *zc, int64_t delay)
{
    zc->failed = true;
    zc->retry_at = mono_ms() + delay;
}

#if HAVE_AVAHI

/* ---- avahi: the Avahi client library inside our own poll() loop ------------
 * Avahi's own main loop, AvahiSimplePoll, goes in steps: prepare, run (which
 * calls our zc_capture: it only notes the poll set and timeout, for our
 * poll() and deadline), dispatch (which sees what our poll() saw).  With
 * AVAHI_CLIENT_NO_FAIL a daemon not (yet) running only delays the
 * announcement; when a running one goes away we make a new client, which
 * announces again once it returns. */

#define ZC_ANY_IF AVAHI_IF_UNSPEC
#define ZC_MAX_RENAMES 32768     /* the reference gives up after this many */

static int zc_capture(struct pollfd *ufds, unsigned nfds, int timeout, void *userdata)
{
    struct zc *zc = userdata;
    zc->ufds = ufds;
    zc->nfds = nfds;
    zc->due = timeout < 0 ? 0 : mono_ms() + timeout;
    return 0;
}

/* Each call is followed by one zc_process, as prepare and run are by
 * dispatch.  prepare fails only out of memory, a state run accepts. */
static size_t zc_pollfds(struct server *srv, struct pollfd *fds, size_t max)
{
    struct zc *zc = srv->zc;
    size_t n = 0;
    if (!zc)
        return 0;
    avahi_simple_poll_prepare(zc->poll, -1);
    avahi_simple_poll_run(zc->poll);
    for (; n < zc->nfds && n < max; n++)
        fds[n] = (struct pollfd){ zc->ufds[n].fd, zc->ufds[n].events, 0 };
    return n;
}

/* What did not fit in our poll set saw nothing.  One callback per turn:
 * prepare asks for a zero timeout while more are waiting. */
static void zc_dispatch(struct zc *zc, const struct pollfd *fds, size_t n)
{
    if (!zc->ufds)
        return;
    for (unsigned i = 0; i < zc->nfds; i++)
        zc->ufds[i].revents = i < n ? fds[i].revents : 0;
    avahi_simple_poll_dispatch(zc->poll);
    zc->ufds = NULL;
}

/* Take the service off the network; keep the group for the next add. */
static void zc_withdraw(struct zc *zc)
{
    if (zc->group)
        avahi_entry_group_reset(zc->group);
}

/* Someone else has our name: ask Avahi for the next one ("Mandos #2"). */
static int zc_rename(struct zc *zc)
{
    char *alt = zc->renames < ZC_MAX_RENAMES ? avahi_alternative_service_name(zc->name) : NULL;
    if (!alt) {
        log_err("No suitable Zeroconf service name found after %ld retries; "
                "not announcing the service", zc->renames);
        zc->renames = ZC_MAX_RENAMES;
        return -1;
    }
    free(zc->name);
    zc->name = xstrdup(alt);
    avahi_free(alt);
    zc->renames++;
    log_info("Changing Zeroconf service name to '%s' ...", zc->name);
    log_open_syslog(zc->name);   /* the log names the service it announces */
    return 0;
}

static void zc_group_cb(AvahiEntryGroup *g, AvahiEntryGroupState state, void *userdata);

/* Add our one service to the (empty) entry group and commit it.  A local
 * name clash is reported at once by the add; each one costs a rename, so
 * the loop ends after at most ZC_MAX_RENAMES turns. */
static void zc_publish(struct zc *zc)
{
    if (zc->renames >= ZC_MAX_RENAMES)
        return;
    if (!zc->group)
        zc->group = avahi_entry_group_new(zc->client, zc_group_cb, zc);
    if (!zc->group) {
        log_err("Zeroconf: cannot create an Avahi entry group: %s",
                avahi_strerror(avahi_client_errno(zc->client)));
        return;
    }
    AvahiProtocol proto = zc->srv->set.use_ipv6 ? AVAHI_PROTO_INET6 : AVAHI_PROTO_INET;
    int rc;
    log_debug("Adding Zeroconf service '%s' of type '%s' ...", zc->name, ZC_SERVICE_TYPE);
    while ((rc = avahi_entry_group_add_service(zc->group, (AvahiIfIndex)zc->ifindex, proto, 0,
                                               zc->name, ZC_SERVICE_TYPE, NULL, NULL,
                                               (uint16_t)zc->srv->port, NULL))
           == AVAHI_ERR_COLLISION) {
        log_info("Local Zeroconf service name collision.");
        if (zc_rename(zc) < 0)
            return;
    }
    if (rc == AVAHI_OK)
        rc = avahi_entry_group_commit(zc->group);
    if (rc != AVAHI_OK) {
        log_err("Zeroconf: cannot announce '%s': %s", zc->name, avahi_strerror(rc));
        zc_withdraw(zc);
    }
}

static void zc_group_cb(AvahiEntryGroup *g, AvahiEntryGroupState state, void *userdata)
{
    struct zc *zc = userdata;
    if (state == AVAHI_ENTRY_GROUP_ESTABLISHED) {
        log_info("Zeroconf service '%s' successfully established on port %d",
                 zc->name, zc->srv->port);
    } else if (state == AVAHI_ENTRY_GROUP_COLLISION) {
        log_info("Zeroconf service name collision.");
        zc_withdraw(zc);
        if (zc_rename(zc) == 0)
            zc_publish(zc);
    } else if (state == AVAHI_ENTRY_GROUP_FAILURE) {
        log_err("Avahi: error in entry group: %s; trying again in %d s",
                avahi_strerror(avahi_client_errno(avahi_entry_group_get_client(g))),
                ZC_RETRY_MS / 1000);
        zc_fail(zc, ZC_RETRY_MS);    /* a new client, then a new group */
    }
}

static void zc_client_cb(AvahiClient *c, AvahiClientState state, void *userdata)
{
    struct zc *zc = userdata;
    zc->client = c;              /* the first call comes from inside avahi_client_new */
    switch (state) {
    case AVAHI_CLIENT_S_RUNNING:
        if (zc->waiting)
            log_info("Zeroconf: avahi-daemon is running now");
        zc->waiting = false;
        zc_withdraw(zc);         /* (re)announce from an empty group */
        zc_publish(zc);
        break;
    case AVAHI_CLIENT_S_REGISTERING:
        zc_withdraw(zc);         /* the daemon re-announces its host name first */
        break;
    case AVAHI_CLIENT_S_COLLISION:
        log_err("Zeroconf server name collision");
        zc_withdraw(zc);
        break;
    case AVAHI_CLIENT_CONNECTING:
        log_warn("Zeroconf: avahi-daemon is not running; "
                 "the service will be announced when it starts");
        zc->waiting = true;
        break;
    case AVAHI_CLIENT_FAILURE:
        if (avahi_client_errno(c) == AVAHI_ERR_DISCONNECTED) {
            log_warn("Zeroconf: lost avahi-daemon; waiting for it to return");
            zc_fail(zc, 0);
            break;
        }
        log_err("Zeroconf server failure: %s; trying again in %d s",
                avahi_strerror(avahi_client_errno(c)), ZC_RETRY_MS / 1000);
        zc_fail(zc, ZC_RETRY_MS);
        break;
    }
}

/* Freeing the client first disconnects, then frees the group without asking
 * the daemon, which would stall us 25 s if it hangs; it drops our group
 * when it sees our connection go. */
static void zc_close(struct zc *zc)
{
    zc->group = NULL;
    if (zc->client)
        avahi_client_free(zc->client);
    zc->client = NULL;
    zc->failed = false;
}

/* The first call also makes the main loop, whose wakeup pipe Avahi does
 * not mark close-on-exec. */
static void zc_open(struct zc *zc)
{
    int err = 0;
    if (!zc->poll) {
        zc->poll = avahi_simple_poll_new();
        if (!zc->poll)
            fatal("Zeroconf: cannot make Avahi's main loop: %s", strerror(errno));
        avahi_simple_poll_set_func(zc->poll, zc_capture, zc);
        cloexec_inherited();
    }
    zc->retry_at = 0;
    zc->client = avahi_client_new(avahi_simple_poll_get(zc->poll), AVAHI_CLIENT_NO_FAIL,
                                  zc_client_cb, zc, &err);
    zc->failed = false;          /* the client is NULL on failure, whatever the callback saw */
    if (zc->client) {
        zc->said_so = false;
        return;
    }
    /* even NO_FAIL needs the system bus itself */
    log_msg(zc->said_so ? LOG_DEBUG : LOG_ERR, "Zeroconf: cannot reach Avahi: %s; "
            "trying again every %d s", avahi_strerror(err), ZC_RETRY_MS / 1000);
    zc->said_so = true;
    zc->retry_at = mono_ms() + ZC_RETRY_MS;
}

#else /* HAVE_DNS_SD */

/* ---- dnssd: the DNS-SD API (dns_sd.h) -----------------------------------
 * One registration; its socket joins our poll set and DNSServiceProcessResult
 * reads what arrived.  Without kDNSServiceFlagsNoAutoRename the daemon picks
 * a new name on a clash and tells us in the callback.  Any failure (no
 * daemon, a dead connection) drops the registration and tries again every
 * ZC_RETRY_MS.  On Linux this is Avahi's compatibility library, which keeps
 * its own thread and talks to avahi-daemon over D-Bus. */

#define ZC_ANY_IF kDNSServiceInterfaceIndexAny

/* Names for the errors we may meet; Avahi's older dns_sd.h lacks some. */
static const char *zc_dnssd_strerror(DNSServiceErrorType err)
{
    switch (err) {
    case kDNSServiceErr_Unknown: return "unknown error";
    case kDNSServiceErr_NoMemory: return "out of memory";
    case kDNSServiceErr_BadParam: return "bad parameter";
    case kDNSServiceErr_NameConflict: return "name conflict";
    case -65563: return "daemon not running";   /* kDNSServiceErr_ServiceNotRunning */
    default: return "error";
    }
}

static void zc_register_cb(DNSServiceRef ref UNUSED, DNSServiceFlags flags UNUSED,
                           DNSServiceErrorType err, const char *name, const char *type UNUSED,
                           const char *domain, void *context)
{
    struct zc *zc = context;
    if (err != kDNSServiceErr_NoError) {
        log_err("Zeroconf: registration of '%s' failed: %s (%d); trying again every %d s",
                zc->name, zc_dnssd_strerror(err), (int)err, ZC_RETRY_MS / 1000);
        zc->said_so = true;
        zc_fail(zc, ZC_RETRY_MS);
        return;
    }
    zc->said_so = false;
    if (!streq(name, zc->name)) {
        log_info("Changing Zeroconf service name to '%s' ...", name);
        free(zc->name);
        zc->name = xstrdup(name);
        log_open_syslog(zc->name);
    }
    log_info("Zeroconf service '%s' registered in domain %s on port %d",
             zc->name, domain ? domain : "?", zc->srv->port);
}

/* Our own name again: the daemon renames afresh if it still clashes.  The
 * library's socket and pipe are not close-on-exec. */
static void zc_open(struct zc *zc)
{
    const char *want = zc->srv->set.servicename;
    uint16_t port = htons((uint16_t)zc->srv->port);
    setenv("AVAHI_COMPAT_NOWARN", "1", 0);   /* its warning names nothing to act on */
    zc->retry_at = 0;
    DNSServiceErrorType err = DNSServiceRegister(&zc->ref, 0, (uint32_t)zc->ifindex, want,
                                                 ZC_SERVICE_TYPE, NULL, NULL, port, 0, NULL,
                                                 zc_register_cb, zc);
    if (err != kDNSServiceErr_NoError) {
        log_msg(zc->said_so ? LOG_DEBUG : LOG_ERR,
                "Zeroconf: cannot register '%s': %s (%d); trying again every %d s",
                want, zc_dnssd_strerror(err), (int)err, ZC_RETRY_MS / 1000);
        zc->said_so = true;
        zc->ref = NULL;
        zc->retry_at = mono_ms() + ZC_RETRY_MS;
        return;
    }
    cloexec_inherited();
    free(zc->name);
    zc->name = xstrdup(want);
    log_debug("Registering Zeroconf service '%s' of type '%s' ...", want, ZC_SERVICE_TYPE);
}

static void zc_close(struct zc *zc)
{
    if (zc->ref)
        DNSServiceRefDeallocate(zc->ref);
    zc->ref = NULL;
    zc->failed = false;
}

static size_t zc_pollfds(struct server *srv, struct pollfd *fds, size_t max)
{
    struct zc *zc = srv->zc;
    if (!zc || !zc->ref || max < 1)
        return 0;
    fds[0] = (struct pollfd){ DNSServiceRefSockFD(zc->ref), POLLIN, 0 };
    return 1;
}

/* Readable means one reply waits, so ProcessResult does not block; an
 * error or hang-up without data means the daemon is gone. */
static void zc_dispatch(struct zc *zc, const struct pollfd *fds, size_t n)
{
    short r = n >= 1 && zc->ref ? fds[0].revents : 0;
    if (!r)
        return;
    DNSServiceErrorType err = kDNSServiceErr_Unknown;
    if (r & POLLIN)
        err = DNSServiceProcessResult(zc->ref);
    if (err != kDNSServiceErr_NoError) {
        log_err("Zeroconf: lost the DNS-SD daemon: %s (%d); trying again every %d s",
                zc_dnssd_strerror(err), (int)err, ZC_RETRY_MS / 1000);
        zc->said_so = true;
        zc_fail(zc, ZC_RETRY_MS);
    }
}

#endif /* the avahi and dnssd back ends */

/* -- the zc_* functions the loop calls, the same for both back ends -- */

static void zc_start(struct server *srv)
{
    if (!srv->set.zeroconf)
        return;
    const char *ifname = srv->set.interface;
    unsigned idx = *ifname ? if_nametoindex(ifname) : 0;
    if (*ifname && !idx)
        log_warn("Zeroconf: no interface '%s'; announcing on all interfaces", ifname);
    struct zc *zc = xcalloc(1, sizeof *zc);
    srv->zc = zc;
    zc->srv = srv;
    zc->name = xstrdup(srv->set.servicename);
    zc->ifindex = idx ? (long)idx : ZC_ANY_IF;
    zc_open(zc);
}

/* A failed link is freed here, outside the library's callbacks: freeing
 * it inside one would pull the ground from under the library. */
static void zc_process(struct server *srv, const struct pollfd *fds, size_t n, int64_t now)
{
    struct zc *zc = srv->zc;
    if (!zc)
        return;
    zc_dispatch(zc, fds, n);
    if (zc->failed)
        zc_close(zc);
    if (zc->retry_at && zc->retry_at <= now)
        zc_open(zc);
}

static int64_t zc_deadline(const struct server *srv)
{
    const struct zc *zc = srv->zc;
    int64_t next = zc ? zc->due : 0;
    if (zc && zc->retry_at && (!next || zc->retry_at < next))
        next = zc->retry_at;
    return next;
}

static void zc_stop(struct server *srv)
{
    struct zc *zc = srv->zc;
    if (!zc)
        return;
    zc_close(zc);                /* closing the link withdraws the service */
#if HAVE_AVAHI
    avahi_simple_poll_free(zc->poll);
#endif
    free(zc->name);
    free(zc);
    srv->zc = NULL;
}

/* --check: the retry timer, with no daemon involved. */
static const char *zc_self_test(void)
{
    static struct server srv;    /* static: struct server is large */
    static struct zc zc;
    const char *why = NULL;
    srv.zc = &zc;
    zc.srv = &srv;
    zc.retry_at = 5000;
    if (zc_deadline(&srv) != 5000)
        why = "a link that is down must wait for its retry time";
    zc_process(&srv, NULL, 0, 4999);
    if (!why && zc.retry_at != 5000)
        why = "tried to make a link before the retry time";
    zc.due = 4000;
    if (!why && zc_deadline(&srv) != 4000)
        why = "the deadline is not the nearer of the library's and the retry time";
    srv.zc = NULL;
    return why;
}

#else /* ---- none: no Zeroconf --------------------------------------------
       * Nothing is announced; clients must be given the address (--connect),
       * and start-up insists on a port or --socket (settings_from_cmdline). */

static void zc_start(struct server *srv)
{
    if (srv->set.zeroconf)
        log_info("built without Zeroconf support: not announcing the service");
}

static size_t zc_pollfds(struct server *srv UNUSED, struct pollfd *fds UNUSED, size_t max UNUSED)
{
    return 0;
}

static int64_t zc_deadline(const struct server *srv UNUSED)
{
    return 0;
}

static void zc_process(struct server *srv UNUSED, const struct pollfd *fds UNUSED,
                       size_t n UNUSED, int64_t now UNUSED) {}
static void zc_stop(struct server *srv UNUSED) {}

static const char *zc_self_test(void)
{
    return NULL;                 /* nothing to drive */
}

#endif /* Zeroconf back ends */

/* ===================================================================== */
/* 10. D-Bus                                                             */
/*    The reference's control API on the system bus (what mandos-ctl and  */
/*    mandos-monitor use), through sd-bus.  Client properties come from   */
/*    client_fields; the loop sees one fd and a deadline.                 */
/* ===================================================================== */

#define BUS_MAX_FDS 1            /* poll slots the bus uses */

#if HAVE_DBUS

static const char bus_backend[] = "sd-bus";

#define BUS_NAME "se.recompile.Mandos"   /* also the interface of "/" */
#define BUS_CLIENT_IFACE "se.recompile.Mandos.Client"
/* Who may call what is for the bus policy alone (etc/mandos-dbus.conf),
 * as with the reference: the check of sd-bus would shut out non-root
 * members of _mandos.  Left out: the se.bsnet.fukt.Mandos names. */
#define BUS_UNPRIV SD_BUS_VTABLE_UNPRIVILEGED
#define BUS_OLD SD_BUS_VTABLE_DEPRECATED

/* A client object and the values last published for it: changes are found
 * by comparing (bus_publish), not by a call at each place that makes one. */
struct bus_entry {
    char *path;                  /* from client_object_path() */
    char *name;                  /* for ClientRemoved once the client is gone */
    struct client *client;       /* valid until the next bus_sync() */
    struct server *srv;
    char *checker_command;       /* of the running checker, for CheckerCompleted */
    uint64_t seen[N_FIELDS];     /* client_number(), or a string's hash */
};

struct bus {
    sd_bus *bus;
    struct bus_entry *v;         /* in clients.conf order */
    size_t n;
    struct name_index paths;     /* object path -> position in v */
    sd_bus_vtable *client_vtable;   /* built from client_fields */
};

static const struct client_field *bus_field(const char *prop)
{
    for (size_t i = 0; i < N_FIELDS; i++)
        if (client_fields[i].bus && streq(client_fields[i].bus, prop))
            return &client_fields[i];
    return NULL;
}

/* Note a field's value as published; true if it announces changes and
 * changed since.  A string is noted by a 64-bit hash. */
static bool bus_seen_update(struct bus_entry *e, size_t i)
{
    const struct client_field *f = &client_fields[i];
    if (f->access != PROP_READ && f->access != PROP_WRITE)
        return false;
    uint64_t v = (uint64_t)client_number(e->client, f, 0, 0);     /* 0 for a string */
    for (const char *s = f->type == CF_STR ? *CF_AT(e->client, f, char *) : ""; *s; s++)
        v = (v ^ (unsigned char)*s) * 1099511628211ULL;             /* FNV-1a */
    bool changed = v != e->seen[i];
    e->seen[i] = v;
    return changed;
}

static struct bus_entry *bus_lookup(const struct bus *b, const char *path)
{
    size_t i = name_index_find(&b->paths, path);
    return i == SIZE_MAX ? NULL : &b->v[i];
}

/* InterfacesRemoved names our interface, so it works once the client is gone. */
static void bus_announce(struct bus *b, const struct bus_entry *e, bool added)
{
    int r = added ? sd_bus_emit_object_added(b->bus, e->path)
                  : sd_bus_emit_interfaces_removed(b->bus, e->path, BUS_CLIENT_IFACE, NULL);
    if (r >= 0)
        r = sd_bus_emit_signal(b->bus, "/", BUS_NAME, added ? "ClientAdded" : "ClientRemoved",
                               added ? "o" : "os", e->path, e->name);
    if (r < 0)
        log_debug("D-Bus: cannot announce %s: %s", e->path, strerror(-r));
}

static void bus_entries_free(struct bus *b)
{
    for (size_t i = 0; i < b->n; i++) {
        free(b->v[i].path);
        free(b->v[i].name);
        free(b->v[i].checker_command);
    }
    free(b->v);
    name_index_free(&b->paths);
}

/* Objects for the clients as they are now (at start, after a reload or a
 * removal), announcing those that came and went.  What was published is
 * carried over by path, so bus_publish() reports the edits.  No two
 * clients share a path: clients_check_paths() refuses such a clients.conf. */
static void bus_sync(struct server *srv)
{
    struct bus *b = srv->bus;
    if (!b)
        return;
    struct bus old = *b;
    const struct client_table *t = &srv->clients;
    b->v = xcalloc(t->n + 1, sizeof *b->v);
    b->n = 0;
    memset(&b->paths, 0, sizeof b->paths);
    for (size_t i = 0; i < t->n; i++) {
        struct bus_entry *e = &b->v[i];
        struct buf path = { 0 };
        client_object_path(t->v[i], &path);
        *e = (struct bus_entry){ path.data, xstrdup(t->v[i]->name), t->v[i], srv, NULL, { 0 } };
        name_index_add(&b->paths, e->path, b->n++);
        for (size_t f = 0; f < N_FIELDS; f++)
            bus_seen_update(e, f);
        struct bus_entry *o = bus_lookup(&old, e->path);
        if (!o) {
            bus_announce(b, e, true);
            continue;
        }
        memcpy(e->seen, o->seen, sizeof e->seen);
        e->checker_command = o->checker_command;
        o->checker_command = NULL;
    }
    for (size_t i = 0; i < old.n; i++)
        if (!bus_lookup(b, old.v[i].path))
            bus_announce(b, &old.v[i], false);
    bus_entries_free(&old);
}

/* Durations in milliseconds, times in ISO 8601 (UTC, no zone; "" for
 * never).  Secret shows as readwrite (sd-bus has no write-only
 * properties), but reading it is refused. */
static int bus_get(sd_bus *bus UNUSED, const char *path UNUSED, const char *iface UNUSED,
                   const char *prop, sd_bus_message *m, void *userdata, sd_bus_error *err)
{
    const struct bus_entry *e = userdata;
    const struct client_field *f = bus_field(prop);
    int64_t v = client_number(e->client, f, mono_ms(), wall_us());
    if (f->access == PROP_WRITE_ONLY)
        return sd_bus_error_setf(err, SD_BUS_ERROR_ACCESS_DENIED, "%s is write-only", prop);
    if (f->sig[0] == 't')
        return sd_bus_message_append(m, "t", (uint64_t)v);
    if (f->sig[0] == 'n' || f->sig[0] == 'b')
        return sd_bus_message_append(m, f->sig, (int)v);
    struct buf text = { 0 };
    bool time = f->type == CF_TIME || f->type == CF_EXPIRES;
    buf_adds(&text, "");
    if (time && v)
        timestamp_render(v, 'T', &text);
    else if (!time)
        client_render(e->client, f, &text);     /* strings, and the object path */
    int r = sd_bus_message_append(m, f->sig, text.data);
    buf_free(&text);
    return r;
}

/* A property and its value: an a{sv} entry (`dict`), or the arguments of
 * the old PropertyChanged. */
static int bus_append_property(sd_bus_message *m, struct bus_entry *e,
                               const struct client_field *f, bool dict)
{
    int r = dict ? sd_bus_message_open_container(m, 'e', "sv") : 0;
    if (r >= 0)
        r = sd_bus_message_append(m, "s", f->bus);
    if (r >= 0)
        r = sd_bus_message_open_container(m, 'v', f->sig);
    if (r >= 0)
        r = bus_get(NULL, e->path, NULL, f->bus, m, e, NULL);
    if (r >= 0)
        r = sd_bus_message_close_container(m);
    return r >= 0 && dict ? sd_bus_message_close_container(m) : r;
}

/* What writing a property does, with the reference's semantics; settings
 * not named here simply take effect when next used.  A secret set here is
 * not saved (the state file holds none): a restart brings back the
 * configured one, a reload keeps this one while that is unchanged. */
static int bus_apply(struct bus_entry *e, const struct client_field *f, int64_t v,
                     const void *data, size_t len, sd_bus_error *err)
{
    struct server *srv = e->srv;
    struct client *c = e->client;
    int64_t now = mono_ms();
    char why[300];
    if ((f->flags & F_POSITIVE) && v == 0)
        return sd_bus_error_setf(err, SD_BUS_ERROR_INVALID_ARGS, "%s must be positive", f->bus);
    if ((f->flags & F_COMMAND) && checker_walk(data, NULL, NULL, why, sizeof why) < 0)
        return sd_bus_error_setf(err, SD_BUS_ERROR_INVALID_ARGS, "%s: %s", f->bus, why);
    if (f->type == CF_SECRET) {
        wipe(c->secret, c->secret_len);
        free(c->secret);
        c->secret = memcpy(xcalloc(1, len + 1), len ? data : "", len);
        c->secret_len = len;
        wipe((void *)(uintptr_t)data, len);     /* our copy of the message */
        sd_bus_emit_properties_changed(srv->bus->bus, e->path, BUS_CLIENT_IFACE, "Secret", NULL);
    } else if (streq(f->name, "enabled") && v)
        client_enable(srv, c, now);
    else if (streq(f->name, "enabled"))
        client_disable(srv, c, "disabled over D-Bus");
    else if (f->type == CF_PID && !v)
        checker_stop(srv, c);
    else if (f->type == CF_PID && !c->checker_pid)
        checker_start(srv, c);
    else if (streq(f->name, "last_checked_ok"))
        client_checked_ok(srv, c, now);          /* whatever the value */
    else if (streq(f->name, "timeout") && c->cur.enabled && c->expires) {
        c->expires += v - c->cur.timeout;       /* past means expired */
        c->cur.timeout = v;
        if (c->expires <= now)
            client_disable(srv, c, "timed out");
        client_reschedule(&srv->clients, c);
    } else if (streq(f->name, "interval") && c->next_checker) {
        c->cur.interval = v;
        c->next_checker = now + v;              /* a new period, with a checker now */
        client_reschedule(&srv->clients, c);
        if (!c->checker_pid)
            checker_start(srv, c);
    } else if (f->type == CF_STR) {
        free(*CF_AT(c, f, char *));
        *CF_AT(c, f, char *) = xstrdup(data);
    } else if (f->type != CF_PID)
        client_set_number(c, f, v);
    return 0;
}

/* A write of property `f`, `m` on the value of signature `type`.  Durations
 * come as any integer type: dbus-python, so mandos-ctl, sends an int32. */
static int bus_write(struct bus_entry *e, const struct client_field *f, sd_bus_message *m,
                     const char *type, sd_bus_error *err)
{
    union { uint8_t y; int16_t n; uint16_t q; int32_t i; uint32_t u; int64_t x; uint64_t t;
            int b; } n;
    const void *data = NULL;
    size_t len = 0;
    int64_t v = 0;
    bool integer = f->sig[0] == 't' && type[0] && !type[1] && strchr("ynqiuxt", type[0]);
    int r;
    if (!integer && !streq(type, f->sig))
        return sd_bus_error_setf(err, SD_BUS_ERROR_INVALID_ARGS, "%s takes \"%s\", not \"%s\"",
                                 f->bus, f->sig, type);
    if (f->sig[0] == 'a')
        r = sd_bus_message_read_array(m, 'y', &data, &len);
    else if (f->sig[0] == 's')
        r = sd_bus_message_read_basic(m, 's', &data);
    else
        r = sd_bus_message_read_basic(m, type[0], &n);
    switch (r < 0 ? 0 : type[0]) {
    case 'y': v = n.y; break;
    case 'n': v = n.n; break;
    case 'q': v = n.q; break;
    case 'i': v = n.i; break;
    case 'u': v = n.u; break;
    case 'x': v = n.x; break;
    case 't': v = n.t > (uint64_t)DURATION_MAX_MS ? -1 : (int64_t)n.t; break;
    case 'b': v = n.b; break;
    }
    if (r >= 0 && integer && (v < 0 || v > DURATION_MAX_MS))
        r = sd_bus_error_setf(err, SD_BUS_ERROR_INVALID_ARGS,
                              "milliseconds out of range (0 to %lld)", DURATION_MAX_MS);
    if (r >= 0)
        r = bus_apply(e, f, v, data, len, err);
    if (r < 0)
        return r;
    log_info("Client %s: %s set over D-Bus", e->client->name, f->bus);
    state_changed(e->srv, true);
    return 0;
}

/* The setter of sd-bus, for a value of exactly the declared type. */
static int bus_set(sd_bus *bus UNUSED, const char *path UNUSED, const char *iface UNUSED,
                   const char *prop, sd_bus_message *value, void *userdata, sd_bus_error *err)
{
    const struct client_field *f = bus_field(prop);
    return bus_write(userdata, f, value, f->sig, err);
}

/* Properties.Set of a writable client property comes here first: the
 * handler of sd-bus would refuse mandos-ctl's int32 for a uint64. */
static int bus_filter(sd_bus_message *m, void *userdata, sd_bus_error *unused UNUSED)
{
    const char *iface = NULL, *prop = NULL, *type = NULL;
    const struct client_field *f = NULL;
    char kind = 0;
    if (!sd_bus_message_is_method_call(m, "org.freedesktop.DBus.Properties", "Set"))
        return 0;
    struct bus_entry *e = bus_lookup(userdata, sd_bus_message_get_path(m));
    if (e && sd_bus_message_read(m, "ss", &iface, &prop) >= 0 && streq(iface, BUS_CLIENT_IFACE))
        f = bus_field(prop);
    if (!f || (f->access != PROP_WRITE && f->access != PROP_WRITE_ONLY)
        || sd_bus_message_peek_type(m, &kind, &type) <= 0 || kind != 'v' || !type
        || sd_bus_message_enter_container(m, 'v', type) < 0) {
        sd_bus_message_rewind(m, 1);
        return 0;                /* sd-bus answers, with an error if need be */
    }
    sd_bus_error err = SD_BUS_ERROR_NULL;
    int r = bus_write(e, f, m, type, &err);
    if (r < 0)
        sd_bus_reply_method_errno(m, r, &err);
    else
        sd_bus_reply_method_return(m, NULL);
    sd_bus_error_free(&err);
    return 1;
}

/* Approve, CheckedOK, and the deprecated Enable, Disable, StartChecker
 * and StopChecker, which do what writing a property does. */
static int bus_client_method(sd_bus_message *m, void *userdata, sd_bus_error *err)
{
    struct bus_entry *e = userdata;
    const char *member = sd_bus_message_get_member(m);
    int yes = !streq(member, "Disable") && !streq(member, "StopChecker");
    const char *prop = strstr(member, "Checker") ? "CheckerRunning" : "Enabled";
    if (streq(member, "Approve") && sd_bus_message_read(m, "b", &yes) < 0)
        return -EINVAL;
    if (streq(member, "Approve"))
        client_approve(e->srv, e->client, yes);
    else
        bus_apply(e, bus_field(streq(member, "CheckedOK") ? "LastCheckedOK" : prop), yes,
                  NULL, 0, err);
    state_changed(e->srv, true);
    return sd_bus_reply_method_return(m, NULL);
}

/* After the properties (bus_client_vtable), a client's methods and signals. */
static const sd_bus_vtable bus_client_members[] = {
    SD_BUS_METHOD_WITH_NAMES("Approve", "b", SD_BUS_PARAM(approve), "", "",
                             bus_client_method, BUS_UNPRIV),
    SD_BUS_METHOD("CheckedOK", "", "", bus_client_method, BUS_UNPRIV),
    SD_BUS_METHOD("Enable", "", "", bus_client_method, BUS_UNPRIV | BUS_OLD),
    SD_BUS_METHOD("Disable", "", "", bus_client_method, BUS_UNPRIV | BUS_OLD),
    SD_BUS_METHOD("StartChecker", "", "", bus_client_method, BUS_UNPRIV | BUS_OLD),
    SD_BUS_METHOD("StopChecker", "", "", bus_client_method, BUS_UNPRIV | BUS_OLD),
    SD_BUS_SIGNAL_WITH_NAMES("CheckerCompleted", "nxs", SD_BUS_PARAM(exitcode)
                             SD_BUS_PARAM(waitstatus) SD_BUS_PARAM(command), 0),
    SD_BUS_SIGNAL_WITH_NAMES("CheckerStarted", "s", SD_BUS_PARAM(command), 0),
    SD_BUS_SIGNAL("GotSecret", "", 0),
    SD_BUS_SIGNAL_WITH_NAMES("NeedApproval", "tb", SD_BUS_PARAM(timeout)
                             SD_BUS_PARAM(default), 0),
    SD_BUS_SIGNAL_WITH_NAMES("Rejected", "s", SD_BUS_PARAM(reason), 0),
    SD_BUS_SIGNAL_WITH_NAMES("PropertyChanged", "sv", SD_BUS_PARAM(property)
                             SD_BUS_PARAM(value), BUS_OLD),
    SD_BUS_VTABLE_END
};

/* One property per client_fields row with a D-Bus name.  EXPLICIT keeps
 * the write-only Secret out of GetAll and GetManagedObjects. */
static sd_bus_vtable *bus_client_vtable(void)
{
    static const uint64_t flags[] = {
        [PROP_CONST] = SD_BUS_VTABLE_PROPERTY_CONST,
        [PROP_READ] = SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE,
        [PROP_WRITE] = SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE | BUS_UNPRIV,
        [PROP_WRITE_ONLY] = SD_BUS_VTABLE_PROPERTY_EMITS_INVALIDATION
                           | SD_BUS_VTABLE_PROPERTY_EXPLICIT | BUS_UNPRIV,
        [PROP_DEPRECATED] = SD_BUS_VTABLE_PROPERTY_CONST | BUS_OLD,
    };
    sd_bus_vtable *v = xcalloc(1 + N_FIELDS + sizeof bus_client_members / sizeof *v, sizeof *v);
    size_t n = 0;
    v[n++] = (sd_bus_vtable)SD_BUS_VTABLE_START(0);
    for (const struct client_field *f = client_fields; f < client_fields + N_FIELDS; f++) {
        if (f->access == PROP_WRITE || f->access == PROP_WRITE_ONLY)
            v[n++] = (sd_bus_vtable)SD_BUS_WRITABLE_PROPERTY(f->bus, f->sig, bus_get, bus_set,
                                                             0, flags[f->access]);
        else if (f->access != PROP_NONE)
            v[n++] = (sd_bus_vtable)SD_BUS_PROPERTY(f->bus, f->sig, bus_get, 0, flags[f->access]);
    }
    memcpy(v + n, bus_client_members, sizeof bus_client_members);
    return v;
}

/* Which client a path under /clients is ... */
static int bus_find(sd_bus *bus UNUSED, const char *path, const char *iface UNUSED,
                    void *userdata, void **found, sd_bus_error *err UNUSED)
{
    *found = bus_lookup(userdata, path);
    return *found != NULL;
}

/* ... and which paths exist there (introspection, GetManagedObjects). */
static int bus_enumerate(sd_bus *bus UNUSED, const char *prefix UNUSED, void *userdata,
                         char ***nodes, sd_bus_error *err UNUSED)
{
    const struct bus *b = userdata;
    char **v = xcalloc(b->n + 1, sizeof *v);     /* sd-bus frees it with free() */
    for (size_t i = 0; i < b->n; i++)
        v[i] = xstrdup(b->v[i].path);
    *nodes = v;
    return 0;
}

static int bus_remove_client(sd_bus_message *m, void *userdata, sd_bus_error *err)
{
    const char *path = NULL;
    int r = sd_bus_message_read(m, "o", &path);
    if (r < 0)
        return r;
    struct bus_entry *e = bus_lookup(userdata, path);
    if (!e)
        return sd_bus_error_setf(err, SD_BUS_ERROR_INVALID_ARGS, "no client at %s", path);
    struct server *srv = e->srv;
    struct client *c = e->client;
    e->client = NULL;            /* what client_remove() sets off is not announced */
    client_remove(srv, c);
    bus_sync(srv);
    return sd_bus_reply_method_return(m, NULL);
}

/* Deprecated, but mandos-monitor lists the clients with the latter. */
static int bus_get_all_clients(sd_bus_message *m, void *userdata, sd_bus_error *err UNUSED)
{
    struct bus *b = userdata;
    sd_bus_message *reply = NULL;
    bool props = streq(sd_bus_message_get_member(m), "GetAllClientsWithProperties");
    int r = sd_bus_message_new_method_return(m, &reply);
    if (r >= 0)
        r = sd_bus_message_open_container(reply, 'a', props ? "{oa{sv}}" : "o");
    for (size_t i = 0; r >= 0 && i < b->n; i++) {
        if (props)
            r = sd_bus_message_open_container(reply, 'e', "oa{sv}");
        if (r >= 0)
            r = sd_bus_message_append(reply, "o", b->v[i].path);
        if (r >= 0 && props)
            r = sd_bus_message_open_container(reply, 'a', "{sv}");
        for (size_t f = 0; props && f < N_FIELDS; f++)
            if (r >= 0 && client_fields[f].access != PROP_NONE
                && client_fields[f].access != PROP_WRITE_ONLY)
                r = bus_append_property(reply, &b->v[i], &client_fields[f], true);
        for (int k = 0; r >= 0 && props && k < 2; k++)
            r = sd_bus_message_close_container(reply);     /* the a{sv}, the entry */
    }
    if (r >= 0)
        r = sd_bus_message_close_container(reply);
    if (r >= 0)
        r = sd_bus_send(NULL, reply, NULL);
    sd_bus_message_unref(reply);
    return r;
}

static const sd_bus_vtable bus_server_vtable[] = {
    SD_BUS_VTABLE_START(0),
    SD_BUS_METHOD_WITH_NAMES("RemoveClient", "o", SD_BUS_PARAM(object_path), "", "",
                             bus_remove_client, BUS_UNPRIV),
    SD_BUS_METHOD_WITH_NAMES("GetAllClients", "", "", "ao", SD_BUS_PARAM(objpaths),
                             bus_get_all_clients, BUS_UNPRIV | BUS_OLD),
    SD_BUS_METHOD_WITH_NAMES("GetAllClientsWithProperties", "", "", "a{oa{sv}}",
                             SD_BUS_PARAM(objpath_properties),
                             bus_get_all_clients, BUS_UNPRIV | BUS_OLD),
    SD_BUS_SIGNAL_WITH_NAMES("ClientAdded", "o", SD_BUS_PARAM(objpath), 0),
    SD_BUS_SIGNAL_WITH_NAMES("ClientNotFound", "ss", SD_BUS_PARAM(key_id)
                             SD_BUS_PARAM(address), 0),
    SD_BUS_SIGNAL_WITH_NAMES("ClientRemoved", "os", SD_BUS_PARAM(objpath)
                             SD_BUS_PARAM(name), BUS_OLD),
    SD_BUS_VTABLE_END
};

/* Every client object goes away, and queued signals get 20 x 25 ms to
 * leave, unless the connection is lost. */
static void bus_stop(struct server *srv)
{
    struct bus *b = srv->bus;
    uint64_t queued = 1;
    if (!b)
        return;
    bool open = b->bus && sd_bus_is_open(b->bus) > 0;
    for (size_t i = 0; open && i < b->n; i++)
        bus_announce(b, &b->v[i], false);
    for (int i = 0; open && i < 20 && sd_bus_get_n_queued_write(b->bus, &queued) >= 0 && queued;
         i++) {
        struct pollfd p = { sd_bus_get_fd(b->bus), POLLOUT, 0 };
        if ((poll(&p, 1, 25) < 0 && errno != EINTR) || sd_bus_process(b->bus, NULL) < 0)
            break;
    }
    bus_entries_free(b);
    sd_bus_close_unref(b->bus);
    free(b->client_vtable);
    free(b);
    srv->bus = NULL;
}

/* Connect, export "/" and the clients, take the name.  Any failure leaves
 * us running without D-Bus, as the reference does. */
static void bus_start(struct server *srv)
{
    if (!srv->set.use_dbus)
        return;
    struct bus *b = xcalloc(1, sizeof *b);
    srv->bus = b;
    b->client_vtable = bus_client_vtable();
    int r = sd_bus_open_system(&b->bus);
    const char *step = r < 0 ? "connect to the system bus" : "export the objects";
    if (r >= 0)
        r = sd_bus_set_method_call_timeout(b->bus, 5000000);   /* µs, for the name request */
    if (r >= 0)
        r = sd_bus_add_filter(b->bus, NULL, bus_filter, b);
    if (r >= 0)
        r = sd_bus_add_object_vtable(b->bus, NULL, "/", BUS_NAME, bus_server_vtable, b);
    if (r >= 0)
        r = sd_bus_add_fallback_vtable(b->bus, NULL, "/clients", BUS_CLIENT_IFACE,
                                       b->client_vtable, bus_find, b);
    if (r >= 0)
        r = sd_bus_add_node_enumerator(b->bus, NULL, "/clients", bus_enumerate, b);
    if (r >= 0)
        r = sd_bus_add_object_manager(b->bus, NULL, "/");
    if (r >= 0) {
        step = "own the name " BUS_NAME;
        r = sd_bus_request_name(b->bus, BUS_NAME, 0);
    }
    if (r < 0) {
        log_err("D-Bus: could not %s: %s; running without D-Bus", step,
                r == -EEXIST ? "another process owns it"
                : r == -EACCES ? "the bus policy does not allow it (see mandos-dbus.conf)"
                : strerror(-r));
        bus_stop(srv);
        return;
    }
    bus_sync(srv);
    log_debug("D-Bus: %s is ours; %zu client objects", BUS_NAME, b->n);
}

/* Every change of a watched property since the last call: one
 * PropertiesChanged per client, and the old PropertyChanged per value. */
static void bus_publish(struct server *srv)
{
    struct bus *b = srv->bus;
    for (size_t i = 0; b && i < b->n; i++) {
        struct bus_entry *e = &b->v[i];
        char *names[N_FIELDS + 1];
        size_t k = 0;
        for (size_t f = 0; f < N_FIELDS; f++)
            if (bus_seen_update(e, f))
                names[k++] = (char *)client_fields[f].bus;   /* sd-bus takes char ** */
        names[k] = NULL;
        int r = k ? sd_bus_emit_properties_changed_strv(b->bus, e->path, BUS_CLIENT_IFACE,
                                                        names) : 0;
        for (size_t j = 0; r >= 0 && j < k; j++) {
            sd_bus_message *m = NULL;
            r = sd_bus_message_new_signal(b->bus, &m, e->path, BUS_CLIENT_IFACE,
                                          "PropertyChanged");
            if (r >= 0)
                r = bus_append_property(m, e, bus_field(names[j]), false);
            if (r >= 0)
                r = sd_bus_send(b->bus, m, NULL);
            sd_bus_message_unref(m);
        }
        if (r < 0)
            log_debug("D-Bus: cannot announce changes of %s: %s", e->name, strerror(-r));
    }
}

static size_t bus_pollfds(struct server *srv, struct pollfd *fds, size_t max)
{
    int fd = srv->bus && max ? sd_bus_get_fd(srv->bus->bus) : -1;
    int events = fd < 0 ? -1 : sd_bus_get_events(srv->bus->bus);
    if (events < 0)
        return 0;               /* none, or broken: bus_process() notices */
    fds[0] = (struct pollfd){ fd, (short)events, 0 };
    return 1;
}

/* The bus's next deadline on our monotonic clock (as sd-bus's), or 0. */
static int64_t bus_deadline(const struct server *srv)
{
    uint64_t us;
    if (!srv->bus || sd_bus_get_timeout(srv->bus->bus, &us) < 0 || us == UINT64_MAX)
        return 0;
    int64_t ms = (int64_t)((us + 999) / 1000);
    return ms > 0 ? ms : 1;     /* "now": any time already past */
}

/* At most 64 messages per turn; what is left makes bus_deadline() say
 * "now".  A broken connection is dropped and we carry on without D-Bus. */
static void bus_process(struct server *srv, const struct pollfd *fds UNUSED, size_t n UNUSED,
                        int64_t now UNUSED)
{
    struct bus *b = srv->bus;
    int r = 0;
    for (int i = 0; b && i < 64 && (r = sd_bus_process(b->bus, NULL)) > 0; i++)
        continue;
    if (b && (r < 0 || !sd_bus_is_open(b->bus))) {
        log_err("D-Bus: connection lost (%s); running without D-Bus",
                r < 0 ? strerror(-r) : "closed");
        bus_stop(srv);
    }
}

/* GotSecret, Rejected(text), NeedApproval, CheckerStarted(text) or
 * CheckerCompleted(status) with the command it started with.  On a signal
 * the reference sends (-1 << 8) | signal as the wait status; we send the
 * real one, which WIFSIGNALED and WTERMSIG read the same way. */
static void bus_client_signal(struct server *srv, const struct client *c, const char *member,
                              const char *text, int status)
{
    struct buf path = { 0 };
    if (!srv->bus)
        return;
    client_object_path(c, &path);
    struct bus_entry *e = bus_lookup(srv->bus, path.data);
    buf_free(&path);
    if (!e || e->client != c)
        return;                  /* not yet on D-Bus, or being removed */
    sd_bus *bus = srv->bus->bus;
    int r;
    if (streq(member, "NeedApproval"))
        r = sd_bus_emit_signal(bus, e->path, BUS_CLIENT_IFACE, member, "tb",
                               (uint64_t)c->cur.approval_delay, (int)c->cur.approved_by_default);
    else if (streq(member, "CheckerCompleted"))
        r = sd_bus_emit_signal(bus, e->path, BUS_CLIENT_IFACE, member, "nxs",
                               WIFEXITED(status) ? WEXITSTATUS(status) : -1, (int64_t)status,
                               e->checker_command ? e->checker_command : "");
    else
        r = sd_bus_emit_signal(bus, e->path, BUS_CLIENT_IFACE, member, text ? "s" : "", text);
    if (r < 0)
        log_debug("D-Bus: cannot send %s for %s: %s", member, c->name, strerror(-r));
    if (strstr(member, "Checker")) {
        free(e->checker_command);
        e->checker_command = text ? xstrdup(text) : NULL;
    }
}

/* ClientNotFound(key ID, address), the address without brackets and port
 * as the reference sends it. */
static void bus_client_not_found(struct server *srv, const char *key_id, const char *peer)
{
    const char *start = peer + (peer[0] == '[');
    const char *end = peer[0] == '[' ? strchr(start, ']') : strrchr(start, ':');
    char *addr = xstrndup(start, end ? (size_t)(end - start) : strlen(start));
    int r = srv->bus ? sd_bus_emit_signal(srv->bus->bus, "/", BUS_NAME, "ClientNotFound", "ss",
                                          key_id, addr) : 0;
    if (r < 0)
        log_debug("D-Bus: cannot send ClientNotFound: %s", strerror(-r));
    free(addr);
}

#else /* !HAVE_DBUS: nothing to poll, publish or announce */

static const char bus_backend[] = "none";

static void bus_start(struct server *srv)
{
    if (srv->set.use_dbus)
        log_warn("built without D-Bus support: no control interface (use --no-dbus "
                 "or use_dbus = False to silence this)");
}

static size_t bus_pollfds(struct server *srv UNUSED, struct pollfd *fds UNUSED,
                          size_t max UNUSED) { return 0; }
static int64_t bus_deadline(const struct server *srv UNUSED) { return 0; }
static void bus_process(struct server *srv UNUSED, const struct pollfd *fds UNUSED,
                        size_t n UNUSED, int64_t now UNUSED) {}
static void bus_publish(struct server *srv UNUSED) {}
static void bus_sync(struct server *srv UNUSED) {}
static void bus_stop(struct server *srv UNUSED) {}
static void bus_client_signal(struct server *srv UNUSED, const struct client *c UNUSED,
                              const char *member UNUSED, const char *text UNUSED,
                              int status UNUSED) {}
static void bus_client_not_found(struct server *srv UNUSED, const char *key_id UNUSED,
                                 const char *peer UNUSED) {}

#endif /* HAVE_DBUS */

/* ===================================================================== */
/* 11. Main and options                                                  */
/*    The command line, start-up in a fixed order (read and check every-  */
/*    thing, open files and sockets as root, detach, drop privileges),    */
/*    the poll() loop, signals, SIGHUP reload, systemd notification.      */
/* ===================================================================== */

static int run_self_tests(void);

/* ---- the command line ------------------------------------------------------ */

static void usage_print(FILE *f)
{
    fprintf(f, "Usage: mandos [OPTION]...\n"
            "Serve encrypted root file system passwords to Mandos clients.\n\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &opts[i];
        char left[64], letter[8] = "    ";
        if (!o->name)
            continue;
        if (o->letter)
            snprintf(letter, sizeof letter, "-%c, ", o->letter);
        snprintf(left, sizeof left, "%s--%s %s", letter, o->name, o->arg ? o->arg : "");
        fprintf(f, "  %-28s %s", left, o->help);
        if (!o->key && o->builtin)
            fprintf(f, " (default %s)", o->builtin);
        fprintf(f, "\n");
    }
    fprintf(f, "\nSettings also come from CONFIGDIR/mandos.conf, whose [DEFAULT] section\n"
            "knows these keys (shown with their defaults); options given here win:\n");
    for (size_t i = 0; i < N_OPTS; i++) {
        const struct opt *o = &opts[i];
        char left[200];
        if (!o->key)
            continue;
        snprintf(left, sizeof left, "%s = %s", o->key, o->builtin);
        fprintf(f, "  %-28s %s%s\n", left, o->name ? "see --" : "", o->name ? o->name : o->help);
    }
    fprintf(f, "See mandos(8), mandos.conf(5) and mandos-clients.conf(5).\n");
}

/* The option that "--name[=value]" (the name or an unambiguous prefix of
 * it) or "-x[value]" gives; `*value` is what the argument itself carries. */
static int opt_find(const char *a, const char **value, char *err, size_t errlen)
{
    bool dashes = a[1] == '-';
    const char *name = a + 1 + dashes;
    size_t n = dashes ? strcspn(name, "=") : 1;
    int found = -1, matches = 0;
    *value = name[n] ? name + n + dashes : NULL;
    for (size_t i = 0; i < N_OPTS; i++) {
        const char *o = opts[i].name;
        if (dashes ? !o || strncmp(o, name, n) != 0 : opts[i].letter != *name)
            continue;
        if (!dashes || strlen(o) == n)
            return (int)i;
        found = (int)i;
        matches++;
    }
    if (matches == 1)
        return found;
    snprintf(err, errlen, "%s option -%s%.*s", matches ? "ambiguous" : "unrecognized",
             dashes ? "-" : "", (int)n, name);
    return -1;
}

/* Parse argv into `cl`; -1 with a one-line reason in `err`. */
static int cmdline_parse(int argc, char **argv, struct cmdline *cl, char *err, size_t errlen)
{
    memset(cl, 0, sizeof *cl);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *value;
        if (a[0] != '-' || !a[1] || streq(a, "--")) {
            snprintf(err, errlen, "unexpected argument \"%s\"", a);
            return -1;
        }
        int id = opt_find(a, &value, err, errlen);
        if (id < 0)
            return -1;
        const struct opt *o = &opts[id];
        if (o->arg && !value && i + 1 < argc)
            value = argv[++i];
        if (o->arg && !value) {
            snprintf(err, errlen, "option --%s needs an argument (%s)", o->name, o->arg);
            return -1;
        }
        if (!o->arg && value) {
            snprintf(err, errlen, "option --%s takes no argument", o->name);
            return -1;
        }
        cl->value[id] = o->arg ? value : a;
    }
    return 0;
}

/* ---- process set-up ------------------------------------------------------ */

static void privileges_drop(struct server *srv)
{
    if (geteuid() != 0) {
        log_warn("not started as root: running as uid %ld, not dropping privileges",
                 (long)geteuid());
        srv->run_uid = geteuid();
        srv->run_gid = getegid();
        return;
    }
    if (setgroups(0, NULL) != 0)
        fatal("cannot clear supplementary groups: %s", strerror(errno));
    if (setgid(srv->run_gid) != 0 || setuid(srv->run_uid) != 0)   /* as root: all three IDs */
        fatal("cannot switch to uid %ld gid %ld: %s", (long)srv->run_uid,
              (long)srv->run_gid, strerror(errno));
    if (srv->run_uid != 0 && (setuid(0) == 0 || seteuid(0) == 0))
        fatal("dropped privileges but could get root back; refusing to run");
    shim_no_core_dumps();
    log_debug("Did setuid/setgid to %ld:%ld", (long)srv->run_uid, (long)srv->run_gid);
}

/* The PID file is opened while we are still root and gets the daemon's
 * own PID; as with the reference, nothing removes it at exit (we may no
 * longer write in /run). */
static const char *pidfile_path(void)
{
    struct stat st;              /* "/run/." exists only if /run is a directory */
    return stat("/run/.", &st) == 0 ? "/run/mandos.pid" : "/var/run/mandos.pid";
}

static int pidfile_open(void)
{
    int fd = openat(AT_FDCWD, pidfile_path(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        log_err("Could not open file '%s': %s", pidfile_path(), strerror(errno));
    return fd;
}

static void daemonize(int pidfd)
{
    for (int i = 0; i < 2; i++) {       /* twice: no session leader, no terminal */
        pid_t pid = fork();
        if (pid < 0)
            fatal("fork: %s", strerror(errno));
        if (pid > 0)
            _exit(0);
        if (i == 0)
            setsid();
    }
    int null = open("/dev/null", O_RDWR);
    for (int fd = 0; null >= 0 && fd <= 2; fd++)
        dup2(null, fd);
    if (null > 2)
        close(null);
    if (pidfd >= 0 && (pid_write(pidfd) < 0 || close(pidfd) < 0))
        log_err("Could not write to file '%s' with PID %ld", pidfile_path(), (long)getpid());
}

/* systemd's readiness protocol: datagrams to $NOTIFY_SOCKET.  Connected
 * once, as root, so that later messages need no access to its path. */
static void notify_open(struct server *srv)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    size_t n = path ? strlen(path) : 0;
    if (!path || (path[0] != '/' && path[0] != '@') || n >= sizeof sun.sun_path)
        return;
    memcpy(sun.sun_path, path, n);
    if (sun.sun_path[0] == '@')
        sun.sun_path[0] = '\0';            /* abstract namespace */
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    int fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (fd >= 0 && (cloexec(fd, false) < 0 || connect(fd, (struct sockaddr *)&sun, len) < 0)) {
        log_warn("cannot reach NOTIFY_SOCKET %s: %s", path, strerror(errno));
        close(fd);
        fd = -1;
    }
    srv->notify_fd = fd;
}

static void notify_send(struct server *srv, const char *msg)
{
    if (srv->notify_fd >= 0 && send(srv->notify_fd, msg, strlen(msg), 0) < 0)
        log_debug("could not notify systemd: %s", strerror(errno));
}

/* ---- signals and reload ------------------------------------------------------ */

static int signal_pipe_write = -1;
/* The flags are the record of a signal; the pipe byte only wakes poll(),
 * so a full pipe loses nothing. */
static volatile sig_atomic_t got_term;    /* SIGTERM or SIGINT: the signal */
static volatile sig_atomic_t got_hup;
static volatile sig_atomic_t got_chld;

static void signal_to_pipe(int sig)
{
    int saved = errno;
    if (sig == SIGHUP)
        got_hup = 1;
    else if (sig == SIGCHLD)
        got_chld = 1;
    else
        got_term = sig;
    ssize_t ignored = write(signal_pipe_write, "", 1);   /* its value is never read */
    (void)ignored;
    errno = saved;
}

static void signals_install(struct server *srv)
{
    static const int sigs[] = { SIGTERM, SIGHUP, SIGCHLD, SIGINT };
    if (pipe(srv->signal_pipe) < 0 || cloexec(srv->signal_pipe[0], true) < 0
        || cloexec(srv->signal_pipe[1], true) < 0)
        fatal("pipe: %s", strerror(errno));
    signal_pipe_write = srv->signal_pipe[1];
    struct sigaction sa = { .sa_handler = signal_to_pipe, .sa_flags = SA_RESTART }, old;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        /* an inherited "ignore SIGINT" (e.g. from nohup) is kept */
        sigaction(sigs[i], NULL, &old);
        if (sigs[i] != SIGINT || old.sa_handler != SIG_IGN)
            sigaction(sigs[i], &sa, NULL);
    }
    signal(SIGPIPE, SIG_IGN);
}

static void server_reload(struct server *srv)
{
    notify_send(srv, "RELOADING=1");
    log_info("Reloading clients.conf");
    struct client_table fresh = { 0 };
    struct diag diag = { .to_log = true };
    int errors = clients_load(srv, &diag, &fresh);
    if (errors) {
        log_err("Reload refused: %d error%s in %s/clients.conf; the previous configuration "
                "stays in force", errors, errors == 1 ? "" : "s", srv->set.configdir);
        client_table_clear(&fresh);
    } else {
        clients_replace(srv, &fresh);
        state_changed(srv, true);
        bus_sync(srv);
        log_info("Reloaded: %zu clients", srv->clients.n);
    }
    shim_release_memory();
    notify_send(srv, "READY=1");
}

/* A quit wins over pending reloads; SIGHUPs that arrive during a reload
 * raise the flag again, so they cost at most one more reload. */
static void signals_drain(struct server *srv)
{
    unsigned char sigs[64];
    while (read(srv->signal_pipe[0], sigs, sizeof sigs) > 0)
        continue;
    if (got_term) {
        log_debug("Server received %s", got_term == SIGINT ? "SIGINT" : "SIGTERM");
        srv->quitting = true;
        return;
    }
    if (got_chld) {
        got_chld = 0;
        checker_reap(srv);
    }
    if (got_hup) {
        got_hup = 0;
        server_reload(srv);
    }
}

/* ---- the loop ------------------------------------------------------------- */

/* Milliseconds poll() may sleep: until the nearest deadline, at most 60 s. */
static int loop_timeout(const struct server *srv, int64_t now)
{
    int64_t resume = srv->accept_resume > now ? srv->accept_resume : 0;
    int64_t t[7] = { now + 60000, zc_deadline(srv), bus_deadline(srv), srv->clients.next_event,
                     state_due(srv), resume, srv->ndoomed ? srv->doomed[0].kill_at : 0 };
    int64_t next = t[0];
    for (int i = 1; i < 7; i++)
        if (t[i] && t[i] < next)     /* 0: none */
            next = t[i];
    for (const struct conn *cn = srv->conns_head; cn; cn = cn->next)
        if (cn->deadline < next)
            next = cn->deadline;
    return next <= now ? 0 : (int)(next - now);
}

/* Each turn rebuilds the poll array; the list holds no closed connection
 * here, since conn_sweep() ends every turn. */
static void server_loop(struct server *srv)
{
    struct pollfd *fds = NULL;
    size_t cap = 0;
    log_debug("Starting main loop");
    while (!srv->quitting) {
        int64_t now = mono_ms();
        grow((void **)&fds, &cap, 2 + BUS_MAX_FDS + ZC_MAX_FDS + srv->nconns, sizeof *fds);
        size_t n = 0;
        fds[n++] = (struct pollfd){ srv->signal_pipe[0], POLLIN, 0 };
        int lfd = now < srv->accept_resume ? -1 : srv->listen_fd;   /* -1: not polled */
        fds[n++] = (struct pollfd){ lfd, POLLIN, 0 };
        size_t bus_first = n;
        n += bus_pollfds(srv, fds + n, BUS_MAX_FDS);
        size_t zc_first = n;
        n += zc_pollfds(srv, fds + n, ZC_MAX_FDS);
        size_t conn_first = n;
        for (struct conn *cn = srv->conns_head; cn; cn = cn->next) {
            cn->slot = n;
            fds[n++] = (struct pollfd){ cn->fd, conn_events(cn), 0 };
        }
        /* a failed poll() leaves every revents 0: timers still run */
        if (poll(fds, (nfds_t)n, loop_timeout(srv, now)) < 0 && errno != EINTR)
            log_err("poll: %s", strerror(errno));
        now = mono_ms();
        for (struct conn *cn = srv->conns_head; cn; cn = cn->next)
            if (cn->state != CONN_CLOSED && fds[cn->slot].revents)
                conn_step(srv, cn, fds[cn->slot].revents, now);
        zc_process(srv, fds + zc_first, conn_first - zc_first, now);
        if (fds[1].revents)
            conn_accept(srv, now);
        if (fds[0].revents)
            signals_drain(srv);
        bus_process(srv, fds + bus_first, zc_first - bus_first, now);
        for (struct conn *cn = srv->conns_head; cn; cn = cn->next)
            if (cn->state != CONN_CLOSED && cn->deadline <= now)
                conn_step(srv, cn, 0, now);
        clients_run_timers(srv, now);
        checker_groups_kill(srv, now);
        if (srv->state_dirty && now >= state_due(srv))
            state_save(srv);
        bus_publish(srv);       /* after everything that may change a client */
        conn_sweep(srv);
    }
    free(fds);
}

/* Stop serving, save the state, and give back everything, so leak
 * checkers see a clean exit. */
static void server_stop(struct server *srv)
{
    notify_send(srv, "STOPPING=1");
    zc_stop(srv);
    bus_stop(srv);
    for (struct conn *cn = srv->conns_head; cn; cn = cn->next)
        conn_close(srv, cn);
    conn_sweep(srv);
    for (size_t i = 0; i < srv->clients.n; i++)
        checker_stop(srv, srv->clients.v[i]);
    /* a grace of 200 ms at most: a checker must not hold up the exit */
    for (int i = 0; i < 20 && srv->ndoomed; i++) {
        nanosleep(&(struct timespec){ 0, 10000000 }, NULL);
        checker_reap(srv);       /* a zombie still counts in its group */
        checker_groups_kill(srv, 0);
    }
    checker_groups_kill(srv, INT64_MAX);
    free(srv->doomed);
    state_save(srv);
    log_debug("Server exiting");
    client_table_clear(&srv->clients);
    gnutls_priority_deinit(srv->priority);
    gnutls_certificate_free_credentials(srv->cred);
    const int fds[] = { srv->listen_fd, srv->state_dirfd, srv->lock_fd, srv->config_dirfd,
                        srv->notify_fd, srv->signal_pipe[0], srv->signal_pipe[1] };
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    settings_clear(&srv->set);
}

/* ---- start-up --------------------------------------------------------------- */

/* Room for max_connections sockets plus our own few descriptors. */
static void raise_fd_limit(struct server *srv)
{
    struct rlimit rl;
    rlim_t want = (rlim_t)srv->set.max_connections + 64;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= want)
        return;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want ? want : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
    long cur = (long)rl.rlim_cur;
    long fit = cur > 128 ? cur - 64 : cur / 2;      /* a tiny limit: half for our own */
    if (fit < srv->set.max_connections) {
        srv->set.max_connections = fit;
        log_warn("only %ld file descriptors allowed: max_connections lowered to %ld",
                 cur, srv->set.max_connections);
    }
}

static void privileges_choose(struct server *srv)
{
    static const char *const users[] = { "_mandos", "mandos", "nobody" };
    struct passwd *pw = NULL;
    for (size_t i = 0; i < 3 && !pw; i++)
        pw = getpwnam(users[i]);
    srv->run_uid = pw ? pw->pw_uid : 65534;
    srv->run_gid = pw ? pw->pw_gid : 65534;
}

/* Read everything; any error stops us here, before serving or forking. */
static void server_configure(struct server *srv, const struct cmdline *cl)
{
    char err[300];
    settings_defaults(&srv->set);
    settings_from_cmdline(&srv->set, cl, false, err, sizeof err);
    struct diag diag = { .file = NULL };
    if (settings_conf_load(&srv->set, &diag) > 0)
        fatal("%d error%s in %s/mandos.conf; not starting", diag.count,
              diag.count == 1 ? "" : "s", srv->set.configdir);
    if (settings_from_cmdline(&srv->set, cl, true, err, sizeof err) < 0) {
        fprintf(stderr, "mandos: error: %s\n", err);
        exit(2);
    }
    char real[PATH_MAX];
    if (realpath(srv->set.configdir, real))
        set_string(&srv->set.configdir, real);
    log_cfg.threshold = srv->set.debuglevel;
    log_cfg.console = srv->set.debug;
    log_open_syslog(srv->set.servicename);
    /* ours also without --debug: GNUTLS_DEBUG_LEVEL would print keys to stderr */
    gnutls_global_set_log_function(log_gnutls_line);
    if (srv->set.debug)
        gnutls_global_set_log_level(5);     /* 9 and up: key material */
    srv->config_dirfd = openat(AT_FDCWD, srv->set.configdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (srv->config_dirfd < 0)
        fatal("cannot open config directory %s: %s", srv->set.configdir, strerror(errno));
    privileges_choose(srv);
    int errors = clients_load(srv, &diag, &srv->clients);
    if (errors)
        fatal("%d error%s in %s/clients.conf; not starting", errors, errors == 1 ? "" : "s",
              srv->set.configdir);
    if (srv->clients.n == 0)
        log_warn("No clients defined");
    clients_conf_check_mode(srv);
    tls_setup(srv);
}

static void server_start(struct server *srv)
{
    /* before the port opens: a SIGHUP must never find default handling */
    signals_install(srv);
    cloexec_inherited();
    raise_fd_limit(srv);
    state_open(srv);
    listen_open(srv);
    notify_open(srv);
    int pidfd = srv->set.foreground ? -1 : pidfile_open();
    privileges_drop(srv);
    state_load(srv);
    /* the first save is the writability check: before detaching, so
     * that the launcher exits 1 and says why */
    state_save(srv);
    if (!srv->set.foreground)
        daemonize(pidfd);
    state_lock_note(srv);
    if (chdir("/") != 0)
        log_warn("chdir /: %s", strerror(errno));
    int64_t now = mono_ms();
    for (size_t i = 0; i < srv->clients.n; i++)
        client_schedule_first_checker(&srv->clients, srv->clients.v[i], now);
    zc_start(srv);
    bus_start(srv);             /* after dropping privileges, as the bus policy expects */
    if (sandbox_enter(srv->set.configdir, srv->set.statedir) < 0)
        log_err("could not restrict the process: %s", strerror(errno));
    state_changed(srv, true);
    state_save(srv);
    shim_release_memory();
    notify_send(srv, "READY=1");
}

/* -t: the clients.conf half of test_config, as the user a reload runs as
 * (a child process when we are root).  Prints the summary line. */
static int test_config_clients(struct server *srv, int errors)
{
    struct diag diag = { .count = errors };
    struct stat st;
    if (geteuid() == 0)
        privileges_drop(srv);
    if (srv->config_dirfd >= 0)
        clients_load(srv, &diag, &srv->clients);
    diag.file = srv->set.statedir;
    bool have_state = fstatat(AT_FDCWD, srv->set.statedir, &st, 0) == 0;
    if (have_state && access(srv->set.statedir, W_OK | X_OK) != 0)
        diag_error(&diag, 0, "state directory not writable by uid %ld", (long)geteuid());
    int fd = have_state ? openat(AT_FDCWD, srv->set.statedir, O_RDONLY | O_CLOEXEC) : -1;
    if (fd >= 0 && faccessat(fd, "clients.pickle", F_OK, 0) == 0
        && faccessat(fd, STATE_FILE, F_OK, 0) != 0)
        diag_error(&diag, 0, "clients.pickle but no %s: run mandos-import-pickle first",
                   STATE_FILE);
    if (fd >= 0)
        close(fd);
    printf("%zu clients, %d errors\n", srv->clients.n, diag.count);
    return diag.count ? 1 : 0;
}

/* -t, --test-config: read and check both files as start-up and a reload
 * would; bind, write and lock nothing, so it works beside a running
 * server.  Exit 0, or 1 with each problem on stderr as FILE:LINE:. */
static int test_config(const struct cmdline *cl)
{
    struct server srv = { 0 };
    struct diag diag = { .file = NULL };
    char err[300];
    const char *at;
    settings_defaults(&srv.set);
    settings_from_cmdline(&srv.set, cl, false, err, sizeof err);
    settings_conf_load(&srv.set, &diag);
    if (settings_from_cmdline(&srv.set, cl, true, err, sizeof err) < 0) {
        fprintf(stderr, "mandos: error: %s\n", err);
        diag.count++;
    }
    const char *why = tls_priority_problem(&srv, &at);
    if (why) {
        fprintf(stderr, "mandos: bad priority string \"%s\": %s%s%s\n", srv.set.priority,
                why, at ? " at " : "", at ? at : "");
        diag.count++;
    }
    srv.config_dirfd = openat(AT_FDCWD, srv.set.configdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (srv.config_dirfd < 0) {
        fprintf(stderr, "mandos: cannot open config directory %s: %s\n", srv.set.configdir,
                strerror(errno));
        diag.count++;
    }
    privileges_choose(&srv);
    fflush(NULL);
    pid_t pid = geteuid() == 0 ? fork() : 0;
    int status = 1;
    if (pid == 0)                /* the child (or not root): the verdict */
        status = test_config_clients(&srv, diag.count);
    else if (pid < 0 || waitpid(pid, &status, 0) < 0)
        fatal("--test-config: cannot start the unprivileged check: %s", strerror(errno));
    else
        status = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    client_table_clear(&srv.clients);
    settings_clear(&srv.set);
    if (srv.priority)
        gnutls_priority_deinit(srv.priority);
    return status;
}

int main(int argc, char **argv)
{
    const char *slash = strrchr(argv[0], '/');
    log_cfg.progname = slash ? slash + 1 : argv[0];
    shim_no_core_dumps();
    for (int i = 1; i < argc; i++)
        if (streq(argv[i], "--check"))
            return run_self_tests();
    struct cmdline cl;
    char err[300];
    if (cmdline_parse(argc, argv, &cl, err, sizeof err) < 0) {
        fprintf(stderr, "mandos: error: %s (see mandos --help)\n", err);
        return 2;
    }
    for (size_t i = 0; i < N_OPTS; i++) {   /* an action given ends here */
        if (!cl.value[i])
            continue;
        if (opts[i].type == OPT_CHECK)
            return run_self_tests();
        if (opts[i].type == OPT_TEST)
            return test_config(&cl);
        if (opts[i].type == OPT_HELP)
            usage_print(stdout);
        if (opts[i].type == OPT_VERSION)
            printf("mandos %s\nmandos.c %s; GnuTLS %s; Zeroconf: %s; D-Bus: %s\n",
                   MANDOS_VERSION, MANDOS_C_VERSION, gnutls_check_version(NULL),
                   ZEROCONF_NAME, bus_backend);
        if (opts[i].type <= OPT_VERSION)
            return 0;
    }
    struct server srv = { .listen_fd = -1, .notify_fd = -1, .state_dirfd = -1, .lock_fd = -1,
                          .config_dirfd = -1, .signal_pipe = { -1, -1 } };
    server_configure(&srv, &cl);
    server_start(&srv);
    server_loop(&srv);
    server_stop(&srv);
    return 0;
}

/* ===================================================================== */
/* 12. Self-tests                                                        */
/*    `mandos --check` runs this table: the reference's own examples for  */
/*    durations, INI quirks, base64 and key IDs, plus our own rules.      */
/* ===================================================================== */

static int test_failures;        /* failures within the running test */

static void check_str(const char *got, const char *want, const char *what)
{
    if (!got || !streq(got, want)) {
        test_failures++;
        printf("    %s: got \"%s\", want \"%s\"\n", what, got ? got : "(null)", want);
    }
}

#define CHECK(cond) check_str((cond) ? "" : #cond, "", __func__)

/* A case is a row of strings: c[0] the input, c[1] the text its runner
 * must write, c[2] to c[4] more input where the runner needs it. */
#define TEST_COLS 5

/* Parse clients.conf text into `out`; return the error report (caller frees). */
static char *parse_clients(const char *text, struct client_table *out)
{
    struct buf errs = { 0 };
    struct diag d = { .file = "clients.conf", .capture = &errs };
    buf_adds(&errs, "");
    clients_from_buffer(text, strlen(text), "/nonexistent", -1, &d, out);
    return errs.data;
}

/* A server without sockets whose clients come from clients.conf `text`. */
static void test_server(struct server *srv, const char *text)
{
    memset(srv, 0, sizeof *srv);
    srv->state_dirfd = -1;
    free(parse_clients(text, &srv->clients));
}

/* The line numbers of an error report's "FILE:LINE: ..." lines in
 * ascending order, each as often as it is reported; other lines whole. */
static void test_error_lines(const char *errs, struct buf *out)
{
    unsigned char seen[100] = { 0 };
    for (const char *p = errs; p && *p;) {
        size_t n = strcspn(p, "\n");
        int line = 0, used = 0;
        if (sscanf(p, "%*[^:\n]:%d:%n", &line, &used) == 1 && used && line > 0 && line < 100)
            seen[line]++;
        else
            buf_printf(out, "[%.*s] ", (int)n, p);
        p += n + (p[n] == '\n');
    }
    for (int line = 1; line < 100; line++)
        for (int k = 0; k < seen[line]; k++)
            buf_printf(out, out->len ? " %d" : "%d", line);
}

/* Set a field from its state-file text, as a saved value would be. */
static void test_set(struct client *c, const char *name, const char *value)
{
    struct buf scratch = { 0 }, line = { 0 };
    const struct client_field *f = client_field(name);
    buf_printf(&line, "%s%s %s", f && (f->flags & F_RUN) ? "cur." : "", name, value);
    CHECK(state_line(line.data, &c, NULL, &scratch) == 0);
    buf_free(&scratch);
    buf_free(&line);
}

/* A field's value as text: strings as they are, the rest as numbers. */
static void test_get(const struct client *c, const char *name, struct buf *out)
{
    const struct client_field *f = client_field(name);
    if (f->type == CF_STR)
        buf_adds(out, *CF_AT(c, f, char *));
    else
        buf_printf(out, "%" PRId64, client_number(c, f, 0, 0));
}

/* A duration as duration_render() shows it ("!": refused); with c[2],
 * c[0] is milliseconds, or with "T" or " " microseconds of a time stamp. */
static void run_duration(const char *const *c, struct buf *out)
{
    int64_t n = c[2] ? strtoll(c[0], NULL, 10) : 0;
    const char *why;
    if (c[2] && *c[2] != 'm')
        timestamp_render(n, *c[2], out);
    else if (!c[2] && duration_parse(c[0], &n, &why) < 0)
        buf_adds(out, "!");
    else
        duration_render(n, out);
}

/* Parse INI text c[0], then expand key c[3] of section c[2]: the lines
 * with errors, then "=VALUE", "!why" if expansion failed, or "-". */
static void run_ini(const char *const *c, struct buf *out)
{
    static const struct ini_default builtins[] = { { "builtin", "B" }, { NULL, NULL } };
    struct buf errs = { 0 }, value = { 0 };
    struct diag d = { .file = "x", .capture = &errs };
    struct ini ini;
    char why[200];
    ini_parse_buffer(&ini, c[0], strlen(c[0]), &d);
    test_error_lines(errs.data, out);
    buf_adds(out, out->len ? " " : "");
    struct ini_section *s = ini_find_section(&ini, c[2]);
    const char *raw = s ? ini_lookup(&ini, s, c[3], builtins, NULL) : NULL;
    buf_adds(&value, "");
    if (!raw)
        buf_adds(out, "-");
    else if (ini_interpolate(&ini, s, raw, builtins, 1, &value, why, sizeof why) < 0)
        buf_printf(out, "!%s", why);
    else
        buf_printf(out, "=%s", value.data);
    buf_free(&value);
    buf_free(&errs);
    ini_free(&ini);
}

/* References fanning out ran for ever: c[0] levels of eight references
 * each to the next, the last a value of c[2] digits. */
static void run_fan_out(const char *const *c, struct buf *out)
{
    struct buf fan = { 0 };
    int levels = atoi(c[0]);
    buf_adds(&fan, "[a]\n");
    for (int i = 0; i < levels; i++) {
        buf_printf(&fan, "k%d = ", i);
        for (int j = 0; j < 8; j++)
            buf_printf(&fan, "%%(k%d)s", i + 1);
        buf_addc(&fan, '\n');
    }
    buf_printf(&fan, "k%d = %0*d\n", levels, atoi(c[2]), 0);
    const char *const ini[TEST_COLS] = { fan.data, NULL, "a", "k0", NULL };
    run_ini(ini, out);
    buf_free(&fan);
}

/* clients.conf text: the lines with errors, then c[2] if the report says it. */
static void run_clients_conf(const char *const *c, struct buf *out)
{
    struct client_table t = { 0 };
    char *errs = parse_clients(c[0], &t);
    test_error_lines(errs, out);
    if (c[2] && strstr(errs, c[2]))
        buf_printf(out, " %s", c[2]);
    free(errs);
    client_table_clear(&t);
}

/* Decoded bytes as log lines show them. */
static void run_base64(const char *const *c, struct buf *out)
{
    struct buf b = { 0 };
    const char *why = NULL;
    char text[64];
    if (base64_decode_lenient(c[0], strlen(c[0]), &b, &why) < 0) {
        buf_printf(out, "!%s", why);
    } else {
        escape_for_log(b.data ? b.data : "", b.len, text, sizeof text, true);
        buf_adds(out, text);
    }
    buf_free(&b);
}

/* c[0] as c[2] bytes of hex: hex_decode()'s result, and the bytes in hex. */
static void run_hex(const char *const *c, struct buf *out)
{
    unsigned char bin[3];
    char back[7] = "";
    size_t n = (size_t)atoi(c[2]);
    int rc = hex_decode(c[0], bin, n);
    if (rc == 0)
        hex_encode_upper(bin, n, back);
    buf_printf(out, "%d %s", rc, back);
}

/* The name index through growth and collisions: c[0] names, each found;
 * then whether c[2] is ("-": not there). */
static void run_name_index(const char *const *c, struct buf *out)
{
    static char names[300][24];
    struct name_index ix = { 0 };
    size_t n = (size_t)atoi(c[0]);
    for (size_t i = 0; i < n; i++) {
        snprintf(names[i], sizeof names[i], "n%zu", i);
        name_index_add(&ix, names[i], i);
    }
    for (size_t i = 0; i < n; i++)
        CHECK(name_index_find(&ix, names[i]) == i);
    buf_adds(out, name_index_find(&ix, c[2]) == SIZE_MAX ? "-" : "found");
    name_index_free(&ix);
}

/* Without c[2], a key_id as clients.conf gives it; with c[2], the key ID
 * of a base64 SubjectPublicKeyInfo cut short by c[2] bytes ("!": refused). */
static void run_key_id(const char *const *c, struct buf *out)
{
    struct buf der = { 0 };
    const char *why;
    unsigned char id[32];
    char hex[65];
    if (!c[2]) {
        char *n = key_id_normalise(c[0]);
        buf_adds(out, n);
        free(n);
        return;
    }
    CHECK(base64_decode_lenient(c[0], strlen(c[0]), &der, &why) == 0);
    gnutls_datum_t d = { (unsigned char *)der.data, (unsigned)(der.len - (size_t)atoi(c[2])) };
    if (key_id_of_spki(&d, id) == GNUTLS_E_SUCCESS) {   /* as for a peer's key */
        hex_encode_upper(id, 32, hex);
        buf_adds(out, hex);
    } else {
        buf_adds(out, "!");
    }
    buf_free(&der);
}

/* Peer bytes, or a peer at address c[0] (with "%SCOPE" if any), port
 * c[2], as log lines show them; what is no address stays AF_UNIX. */
static void run_log_text(const char *const *c, struct buf *out)
{
    struct sockaddr_storage ss = { .ss_family = AF_UNIX };
    struct addrinfo hints = { .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV };
    struct addrinfo *ai = NULL;
    char text[64];
    if (!c[2])
        escape_for_log(c[0], strlen(c[0]), text, sizeof text, true);
    else if (getaddrinfo(c[0], c[2], &hints, &ai) == 0)
        memcpy(&ss, ai->ai_addr, ai->ai_addrlen);
    if (c[2])
        format_peer(&ss, text, sizeof text);
    if (ai)
        freeaddrinfo(ai);
    buf_adds(out, text);
}

/* A GnuTLS debug line c[0] as --debug logs it, caught on stderr: the
 * message after "DEBUG: ", or nothing when it is dropped. */
static void run_gnutls_line(const char *const *c, struct buf *out)
{
    int fds[2], saved = dup(STDERR_FILENO), threshold = log_cfg.threshold;
    char got[512] = "";
    CHECK(saved >= 0 && pipe(fds) == 0);
    fflush(stderr);
    dup2(fds[1], STDERR_FILENO);
    log_cfg.threshold = LOG_DEBUG;
    log_gnutls_line(9, c[0]);
    log_cfg.threshold = threshold;
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    close(fds[1]);
    ssize_t n = read(fds[0], got, sizeof got - 1);
    close(fds[0]);
    got[n > 0 ? n : 0] = '\0';
    const char *msg = strstr(got, "DEBUG: ");
    buf_add(out, msg ? msg + 7 : "", msg ? strcspn(msg + 7, "\n") : 0);
}

/* A version line: why it is refused after "!", nothing when accepted. */
static void run_version_line(const char *const *c, struct buf *out)
{
    char why[80] = "";
    bool ok = version_line_accepted(c[0], strlen(c[0]), why, sizeof why);
    buf_printf(out, "%s%s", ok ? "" : "!", why);
}

/* The reader takes exactly one line and leaves what follows (TLS) alone:
 * what is still in the socket after a refused line. */
static void run_version_reader(const char *const *c, struct buf *out)
{
    int sv[2];
    struct conn cn = { 0 };
    char rest[4] = "";
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK(cloexec(sv[0], true) == 0);
    CHECK(write(sv[1], c[0], strlen(c[0])) == (ssize_t)strlen(c[0]));
    cn.fd = sv[0];
    CHECK(conn_do_version(NULL, &cn) == STEP_CLOSE);
    CHECK(recv(sv[0], rest, sizeof rest - 1, 0) > 0);
    buf_adds(out, rest);
    close(sv[0]);
    close(sv[1]);
}

/* Start-up reads a command line c[0] and a mandos.conf c[2], then says
 * "errors=N" and each error, or every setting as key=value: the words of
 * c[1] that it says. */
static void run_options(const char *const *c, struct buf *out)
{
    char *args = xstrdup(c[0]), *want = xstrdup(c[1]);
    char *argv[16] = { "mandos" };
    int argc = 1;
    for (char *t = strtok(args, " "); t && argc < 15; t = strtok(NULL, " "))
        argv[argc++] = t;
    struct cmdline cl;
    struct settings set;
    struct buf text = { 0 }, word = { 0 };
    char err[200] = "";
    struct diag d = { .file = "mandos.conf", .capture = &text };
    const char *conf = c[2] ? c[2] : "";
    buf_adds(&text, " ");
    settings_defaults(&set);
    if (cmdline_parse(argc, argv, &cl, err, sizeof err) == 0) {
        settings_from_cmdline(&set, &cl, false, err, sizeof err);
        settings_from_conf(&set, conf, strlen(conf), &d);
        settings_from_cmdline(&set, &cl, true, err, sizeof err);
    }
    buf_printf(&text, " errors=%d %s", d.count + !!*err, err);
    for (size_t i = 0; i < N_OPTS && !d.count && !*err; i++) {
        const struct opt *o = &opts[i];
        const void *slot = (const char *)&set + o->offset;
        const char *name = o->key ? o->key : o->name;
        if (o->type == OPT_STRING)
            buf_printf(&text, " %s=%s", name, *(char *const *)slot);
        else if (o->type == OPT_BOOL)
            buf_printf(&text, " %s=%s", name, *(const bool *)slot ? "True" : "False");
        else if (o->type == OPT_PORT || o->type == OPT_FD || o->type == OPT_LEVEL)
            buf_printf(&text, " %s=%d", name, *(const int *)slot);
        else if (o->type == OPT_LIMIT)
            buf_printf(&text, " %s=%ld", name, *(const long *)slot);
        else if (o->type == OPT_DURATION)
            buf_printf(&text, " %s=%" PRId64, name, *(const int64_t *)slot);
    }
    buf_adds(&text, " ");
    for (char *p = text.data; *p; p++)
        *p = isspace((unsigned char)*p) ? ' ' : *p;
    for (char *w = strtok(want, " "); w; w = strtok(NULL, " ")) {
        word.len = 0;
        buf_printf(&word, " %s ", w);
        if (strstr(text.data, word.data))
            buf_printf(out, out->len ? " %s" : "%s", w);
    }
    settings_clear(&set);
    free(args);
    free(want);
    buf_free(&word);
    buf_free(&text);
}

/* The run-time settings are the first N_RUN rows, in struct order. */
static void run_client_fields(const char *const *c UNUSED, struct buf *out UNUSED)
{
    for (size_t i = 0; i < N_FIELDS; i++) {
        const struct client_field *f = &client_fields[i];
        bool in_cur = f->offset >= offsetof(struct client, cur)
                      && f->offset < offsetof(struct client, cur) + sizeof(struct client_settings);
        CHECK(((f->flags & F_RUN) != 0) == (i < N_RUN) && in_cur == (i < N_RUN));
        CHECK(client_field(f->name) == f);
        CHECK((f->bus == NULL) == (f->access == PROP_NONE) && (f->bus == NULL) == (f->sig == NULL));
    }
}

/* Client "foo.bar" with the clients.conf lines c[0], field c[2] set to
 * c[3] at run time: its checker command, or "!" and a part of the errors. */
static void run_checker(const char *const *c, struct buf *out)
{
    struct client_table t = { 0 };
    struct buf conf = { 0 };
    buf_printf(&conf, "[foo.bar]\nsecret=\n%s\n", c[0]);
    char *errs = parse_clients(conf.data, &t);
    CHECK(t.n == 1);
    if (*errs) {
        buf_adds(out, *c[1] == '!' && strstr(errs, c[1] + 1) ? c[1] : errs);
    } else if (t.n == 1) {
        if (c[2])
            test_set(t.v[0], c[2], c[3]);
        CHECK(checker_expand(t.v[0], out) == 0);
    }
    free(errs);
    buf_free(&conf);
    client_table_clear(&t);
}

static void run_shell_quote(const char *const *c, struct buf *out)
{
    shell_quote(c[0], strlen(c[0]), out);
}

/* Fields set at run time (from their saved text) survive a save and a
 * load, and what is read back is saved the same; no secret is written. */
static void run_state_round_trip(const char *const *c, struct buf *out)
{
    static const char *const fields[][3] = {   /* field, value, saved text */
        { "host", "a\tb\\c\x7F", "a\\tb\\\\c\\x7F" }, { "timeout", "42", "42" },
        { "enabled", "0", "0" }, { "checker", "true %(name)s", "true %(name)s" },
        { "last_checker_status", "3", "3" }, { "last_checker_signal", "9", "9" },
        { "last_checked_ok", "1675859696789012", "1675859696789012" },
        { "approved_by_default", "0", "0" }, { "created", "-1", "-1" },
    };
    struct client_table t = { 0 }, back = { 0 };
    struct buf data = { 0 }, again = { 0 }, derr = { 0 };
    struct diag d = { .file = "clients.state", .capture = &derr };
    free(parse_clients(c[0], &t));
    for (size_t i = 0; i < sizeof fields / sizeof fields[0] && t.n == 1; i++)
        test_set(t.v[0], fields[i][0], fields[i][2]);
    state_serialise(&t, 1000, 2000000, &data);
    CHECK(!strstr(data.data, "aGVsbG8") && !strstr(data.data, "hello"));
    CHECK(state_parse(data.data, data.len, &d, &back) == 0 && back.n == 1);
    for (size_t i = 0; i < sizeof fields / sizeof fields[0] && back.n == 1; i++) {
        out->len = 0;
        test_get(back.v[0], fields[i][0], out);
        check_str(out->data, fields[i][1], fields[i][0]);
    }
    out->len = 0;
    if (back.n == 1 && back.v[0]->conf_text[1])
        buf_adds(out, back.v[0]->conf_text[1]);      /* the checker's text */
    state_serialise(&back, 1000, 2000000, &again);
    check_str(again.data, data.data, "written again");
    buf_free(&data);
    buf_free(&again);
    buf_free(&derr);
    client_table_clear(&back);
    client_table_clear(&t);
}

/* A broken state file: the lines it is refused at. */
static void run_state_corrupt(const char *const *c, struct buf *out)
{
    struct client_table junk = { 0 };
    struct buf text = { 0 }, derr = { 0 };
    struct diag d = { .file = "clients.state", .capture = &derr };
    buf_printf(&text, "%s%s", c[2] ? "" : STATE_MAGIC "\n", c[0]);
    CHECK(state_parse(text.data, text.len, &d, &junk) > 0);
    test_error_lines(derr.data, out);
    buf_free(&text);
    buf_free(&derr);
    client_table_clear(&junk);
}

/* Saved state (clients.conf lines c[0], field c[2] set to c[3]) meets
 * clients.conf lines c[4]: the field's value after state_apply(). */
static void run_reconcile(const char *const *c, struct buf *out)
{
    struct client_table saved = { 0 }, now = { 0 };
    struct buf text = { 0 };
    buf_printf(&text, "[a]\nsecret=\n%s\n[gone]\nsecret=\n", c[0]);
    free(parse_clients(text.data, &saved));
    text.len = 0;
    buf_printf(&text, "[new]\nsecret=\n[a]\nsecret=\n%s\n", c[4]);
    free(parse_clients(text.data, &now));
    test_set(saved.v[0], c[2], c[3]);
    state_apply(&now, &saved);
    CHECK(now.n == 2 && !client_find_by_name(&now, "gone"));
    test_get(client_find_by_name(&now, "a"), c[2], out);
    buf_free(&text);
    client_table_clear(&now);
}

/* What a reload (clients c[0], then c[2]) does to the clients it keeps,
 * adds and removes: the kept "a" has run-time values, "b" was edited. */
static void run_reload(const char *const *c, struct buf *out UNUSED)
{
    struct server srv;
    struct client_table fresh = { 0 };
    test_server(&srv, c[0]);
    free(parse_clients(c[2], &fresh));
    CHECK(srv.clients.n == 3 && fresh.n == 3);
    if (srv.clients.n != 3 || fresh.n != 3)
        return;
    struct client *a = srv.clients.v[0];
    a->checker_pid = 4242;       /* never signalled: a stays enabled */
    a->approved = APPROVAL_GRANTED;
    a->expires = 77;
    set_string(&a->cur.host, "runtime");
    memcpy(a->secret, "A", 1);   /* a secret set at run time */
    clients_replace(&srv, &fresh);
    a = client_find_by_name(&srv.clients, "a");
    struct client *b = client_find_by_name(&srv.clients, "b");
    CHECK(srv.clients.n == 3 && client_find_by_name(&srv.clients, "new"));
    CHECK(!client_find_by_name(&srv.clients, "gone") && a && b);
    CHECK(a && a->checker_pid == 4242 && a->approved == APPROVAL_GRANTED && a->expires == 77);
    CHECK(a && streq(a->cur.host, "runtime") && a->secret[0] == 'A');
    CHECK(b && !b->cur.enabled && b->secret[0] == 'c');   /* edited: disabled, new secret */
    if (a)
        a->checker_pid = 0;
    client_table_clear(&srv.clients);
}

/* The table's bound is never later than a timer; reaching it runs what
 * is due and finds the next: the bound after each step. */
static void run_timers(const char *const *c, struct buf *out)
{
    static const int64_t when[3][2] = { { 50, 0 }, { 0, 10 }, { 40, 20 } };  /* expires, reset */
    struct server srv;
    struct client_table *t = &srv.clients;
    test_server(&srv, c[0]);
    CHECK(t->n == 3);
    for (size_t i = 0; i < 3 && t->n == 3; i++) {
        t->v[i]->expires = when[i][0];
        t->v[i]->approval_reset = when[i][1];
        client_reschedule(t, t->v[i]);
    }
    buf_printf(out, "%" PRId64, t->next_event);
    clients_run_timers(&srv, 5);
    buf_printf(out, " %" PRId64, t->next_event);
    clients_run_timers(&srv, 10);
    CHECK(t->n == 3 && t->v[1]->approval_reset == 0);
    buf_printf(out, " %" PRId64, t->next_event);
    t->v[2]->approval_reset = 0;          /* a later bound stays until reached */
    client_reschedule(t, t->v[2]);
    buf_printf(out, " %" PRId64, t->next_event);
    clients_run_timers(&srv, 20);
    buf_printf(out, " %" PRId64, t->next_event);
    client_table_clear(t);
}

/* The life-cycle entry points a control interface calls. */
static void run_client_lifecycle(const char *const *c, struct buf *out UNUSED)
{
    struct server srv;
    test_server(&srv, c[0]);
    struct client *a = srv.clients.v[0];
    int64_t now = mono_ms();
    client_schedule_first_checker(&srv.clients, a, now);
    CHECK(a->next_checker >= now && a->next_checker <= now + a->cur.interval);
    CHECK(a->expires == a->next_checker + a->cur.interval);
    client_approve(&srv, a, true);
    CHECK(a->approved == APPROVAL_GRANTED && a->approval_reset >= now + 2000);
    a->next_checker = 0;         /* a self-test must not start a real checker */
    client_run_timers(&srv, a, a->approval_reset);
    CHECK(a->approved == APPROVAL_NONE);
    client_disable(&srv, a, "test");
    CHECK(!a->cur.enabled && !a->expires && !a->next_checker && srv.state_urgent);
    client_enable(&srv, a, now);
    CHECK(a->cur.enabled && a->expires == now + 2 * a->cur.interval && a->last_enabled);
    client_checked_ok(&srv, a, now);
    CHECK(a->expires == now + a->cur.timeout && a->last_checker_status == 0);
    client_run_timers(&srv, a, a->expires);       /* nothing checked it since */
    CHECK(!a->cur.enabled);
    client_table_clear(&srv.clients);
}

/* What D-Bus shows and does that lives in the core: the object paths of
 * clients c[0], then which are left after removing the second. */
static void run_client_remove(const char *const *c, struct buf *out)
{
    struct server srv;
    test_server(&srv, c[0]);
    CHECK(srv.clients.n == 3);
    int64_t now = mono_ms();
    for (size_t i = 0; i < srv.clients.n; i++) {
        buf_adds(out, i ? " " : "");
        client_object_path(srv.clients.v[i], out);
        client_schedule_first_checker(&srv.clients, srv.clients.v[i], now);
    }
    if (srv.clients.n == 3)
        client_remove(&srv, srv.clients.v[1]);
    CHECK(srv.clients.n == 2 && srv.state_urgent);
    for (size_t i = 0; i < srv.clients.n; i++)     /* and the index agrees */
        if (client_find_by_name(&srv.clients, srv.clients.v[i]->name) == srv.clients.v[i])
            buf_printf(out, " %s", srv.clients.v[i]->name);
    CHECK(!client_find_by_name(&srv.clients, "x y\xc3\xa9"));
    client_table_clear(&srv.clients);
}

static void run_zeroconf(const char *const *c, struct buf *out)
{
    const char *why = zc_self_test();
    buf_adds(out, why ? why : c[0]);
}

#define KEY_ID "16FADC8E51108E940E1AFAF22B2154F651D203F2A10D991A7F71960ADACCC4D9"
#define SPKI "MCowBQYDK2VwAyEA4a38kO3uIwMf2vUrOz86TIjiaQy9YjQ3EkIPGZQdKAs="
#define B64_ONE "!bad base64: one character too many (length is 1 more than a multiple of 4)"
#define ROWS(...) (const char *const [][TEST_COLS]){ __VA_ARGS__, { NULL } }

/* Each test: its name, its runner, and its cases (a test written as code
 * has one, which gives it its input). */
static const struct {
    const char *name;
    void (*run)(const char *const *c, struct buf *out);
    const char *const (*cases)[TEST_COLS];       /* up to a row of NULL */
} self_tests[] = {
    { "client life cycle: approve, disable, enable, expire", run_client_lifecycle,
      ROWS({ "[a]\nsecret=\napproval_duration = PT2S\n", "" }) },
    { "durations: both syntaxes, the reference's examples", run_duration, ROWS(
      { "PT5M", "0:05:00" }, { "P1DT2H", "1 day, 2:00:00" }, { "5m", "0:05:00" },
      { "P1Y2M3DT4H5M6S", "423 days, 4:05:06" }, { "1h 30m", "1:30:00" }, { "", "0:00:00" },
      { "30s 1h", "1:00:30" }, { "1d 1d", "2 days, 0:00:00" }, { "  ", "0:00:00" },
      { "PT0S", "0:00:00" }, { "P0D", "0:00:00" }, { "P2W", "14 days, 0:00:00" },
      { "PT1H0M1S", "1:00:01" }, { "P1M", "28 days, 0:00:00" }, { "1_0s", "0:00:10" },
      { "PT1S", "0:00:01" }, { "P1Y", "364 days, 0:00:00" },
      { "PT", "!" }, { "P", "!" }, { "P1D2H", "!" }, { "pt5m", "!" }, { "P1Y1D", "!" },
      { "P1WT1H", "!" }, { "1h30m", "!" }, { "5", "!" }, { "5M", "!" }, { "1.5h", "!" },
      { "5 m", "!" }, { "PT1H1S", "!" }, { "P1YT1H", "!" }, { "P1Y2MT1H", "!" }, { "-5m", "!" },
      { "PT5M ", "!" }, { "P1DT", "!" }, { "x", "!" }, { "PT-1S", "!" },
      { "99999999999999999999s", "!" }, { "P999999999999Y", "!" },    /* fuzz: overflowed */
      { "P99999999999999W", "!" }, { "PT99999999999999H", "!" }) },
    { "durations and timestamps: rendering", run_duration, ROWS(
      { "300000", "0:05:00", "ms" }, { "176462000", "2 days, 1:01:02", "ms" },
      { "86400000", "1 day, 0:00:00", "ms" }, { "1500", "0:00:01.500000", "ms" },
      { "0", "0:00:00", "ms" }, { "1675859696789012", "2023-02-08 12:34:56.789012", " " },
      { "1675859696000000", "2023-02-08 12:34:56", " " },
      { "1675859696789012", "2023-02-08T12:34:56.789012", "T" },   /* D-Bus: ISO 8601 */
      { "1675859696000000", "2023-02-08T12:34:56", "T" }) },
    { "INI dialect: interpolation, continuations, headers", run_ini, ROWS(
      /* %% and %(name)s; %%(name)s stays for the checker's run time */
      { "[c]\nhost = h\nchecker = 100%%%% %%(host)s %(host)s\n", "=100%% %(host)s h", "c",
        "checker" },
      { "[c]\nab = v\nk = %(AB)s %(builtin)s\n", "=v B", "c", "k" },
      /* a [DEFAULT] value is expanded late, with the section's keys */
      { "[DEFAULT]\nhost = %(short)s.example.org\n[foo]\nshort = foo\n", "=foo.example.org",
        "foo", "host" },
      { "[DEFAULT]\nk = d\n[c]\n", "=d", "c", "k" },
      { "[DEFAULT]\nk = d\n[c]\nk = c\n", "=c", "c", "k" },
      /* continuations: deeper than its key, blank lines kept inside,
       * comment lines dropped, trailing blank lines dropped */
      { "[c]\nsecret = aGVs\n  bG8=\n  host = x\n", "=aGVs\nbG8=\nhost = x", "c", "secret" },
      { "[c]\nsecret = aGVs\n  bG8=\n  host = x\n", "-", "c", "host" },
      { "[c]\n  secret = aGVs\n   bG8=\n  host = x\n", "=aGVs\nbG8=", "c", "secret" },
      { "[c]\n  secret = aGVs\n   bG8=\n  host = x\n", "=x", "c", "host" },
      { "[c]\n  secret = aGVs\n   bG8=\n  junk\n", "4 =aGVs\nbG8=", "c", "secret" },
      { "[c]\nk = a\n\n  b\n\nx = 1\n", "=a\n\nb", "c", "k" },
      { "[c]\nk = a\n# note\n  b\n;\n", "=a\nb", "c", "k" },
      /* headers: up to the last ']', case kept; keys lower-cased */
      { "[a]b] junk\nk = v\n", "=v", "a]b", "k" }, { "[c]\nKey = v\n", "=v", "c", "key" },
      { "[Foo]\nk=1\n[foo]\nk=2\n", "=1", "Foo", "k" },
      { "[Foo]\nk=1\n[foo]\nk:2\n", "=2", "foo", "k" },
      { "[c]\nk = PT5M # five\n", "=PT5M # five", "c", "k" },
      { "[c]\r\nk = v\r\nj = w\rz = 1\n", "=w", "c", "j" },
      /* errors: each bad line, and what it was given stays first */
      { "[c]\nk = 1\nK = 2\n[c]\nk = 3\n", "3 4 =1", "c", "k" },
      { "k = v\n[c]\n", "1 -", "c", "k" }, { "\xEF\xBB\xBF[c]\nk = v\n", "1 2 -", "c", "k" },
      { "[c]\nno delimiter\n = v\nk\n", "2 3 4 -", "c", "k" },
      { "[c]\nk = 100%\n", "!'%' must be followed by '%' or '(' (write %% for a literal %)",
        "c", "k" },
      { "[c]\nk = %(x)d\n", "!bad reference \"%(x)d\" (expected %(name)s)", "c", "k" },
      { "[c]\nk = %(nope)s\n", "!%(nope)s refers to a key that is not set", "c", "k" },
      { "[c]\nx = %(y)s\ny = %(x)s\n", "!%(name)s references nest deeper than 10 levels",
        "c", "x" }) },
    { "INI errors: every bad line as FILE:LINE", run_clients_conf, ROWS(
      /* 4 a key twice, 5 no inline comments, 6 a bad %, 7 no '=', 8 not a
       * boolean, 9 a section twice, 11 bad padding, 12 zero, 13 no such attribute */
      { "[c]\nsecret = aGVsbG8=\nhost = a\nHOST = b\ntimeout = PT5M # five\nfoo = 100%\n"
        "no delimiter here\nenabled = maybe\n[c]\n[d]\nsecret = aGVsbG8\ninterval = 0s\n"
        "checker = ping %%(nosuch)s\n", "4 5 6 7 8 9 11 12 13" },
      /* a bad line is reported without its text: it may be part of a secret */
      { "[c]\nsecret = aGVs\nU0VDUkVUU0VDUkVU\n", "3", "U0VDUkVU" },
      { "key = before any header\n", "1" },
      { "\xEF\xBB\xBF[DEFAULT]\n", "1" },           /* a BOM is not skipped */
      { "[a]\nsecret=\nkey_id = " KEY_ID "\n[b]\nsecret=\nkey_id = "
        "16fadc8e51108e940e1afaf22b2154f651d203f2a10d991a7f71960adaccc4d9\n",
        "4 [a] and [b] have the same key_id", "[a] and [b] have the same key_id" },
      { "[a]\nkey_id = 1234\nsecret=\n", "2" },
      { "[a]\n", "1 neither secret nor secfile", "neither secret nor secfile" },
      { "[a]\nsecret=\nx = %(y)s\ny = %(x)s\n", "3 4 nest deeper", "nest deeper" }) },
    { "INI: references fanning out are bounded", run_fan_out, ROWS(
      { "9", "!%(name)s references expand more than 1000 times", "1" },
      { "3", "!value longer than 1048576 bytes after %(name)s expansion", "2100" }) },
    { "base64: lenient decoding", run_base64, ROWS(
      { "aGVsbG8=", "hello" }, { "aGVs bG8=", "hello" }, { "aGVsbG8=extra", "hello" },
      { "aGVs=bG8=", "hello" }, { "", "" }, { "a-G_V*s\nbG8=", "hello" },
      { "=aGVsbG8=", "hello" }, { "aGVsbA==", "hell" }, { "/+8A", "\\xFF\\xEF\\x00" },
      { "aGVsbG8", "!bad base64: incorrect padding" }, { "a", B64_ONE }, { "aGVsb", B64_ONE },
      { "aGVsbA=", "!bad base64: incorrect padding" }, { "aGVs\xc3\xa9", "hel" }) },
    { "log lines: escaped peer bytes, peer addresses", run_log_text, ROWS(
      { "1\r\n", "1\\x0D\\x0A" }, { "a\\b", "a\\x5Cb" }, { "\x7f\xff~ ", "\\x7F\\xFF~ " },
      { "192.0.2.1", "192.0.2.1:80", "80" }, { "", "?:0", "0" },
      { "2001:db8::1", "[2001:db8::1]:443", "443" },
      { "fe80::1%999999", "[fe80::1%999999]:1", "1" }) },
    { "GnuTLS debug lines: no key material", run_gnutls_line, ROWS(
      { "INT: CLIENT WRITE KEY [32]: 4133bc4a18589b0b7391999ae4ff0dba\n", "" },
      { "HSK[0x5558]: Selected cipher suite\n", "GnuTLS: HSK[0x5558]: Selected cipher suite" }) },
    { "hex", run_hex, ROWS(
      { "00ff7F", "0 00FF7F", "3" }, { "00ff7", "-1 ", "3" }, { "00ff7g", "-1 ", "3" },
      { "00ff7f00", "-1 ", "3" }, { "", "0 ", "0" }) },
    { "the name index: growth and collisions", run_name_index, ROWS({ "300", "-", "n300" }) },
    { "key_id: normalisation and SHA-256 of the SPKI", run_key_id, ROWS(
      { "f33f cbed 11ED", "F33FCBED11ED" }, { "ab\tcd", "AB\tCD" },
      { SPKI, KEY_ID, "0" },     /* the SPEC's example, an Ed25519 key */
      { SPKI, "!", "1" }) },     /* a truncated key is refused, not hashed */
    { "protocol version line rule", run_version_line, ROWS(
      { "1", "" }, { "0", "" }, { "-7", "" }, { "+1", "" }, { "1 extra words", "" },
      { " 1 ", "" }, { "-99999999999999999999999", "" },
      { "1_0_0", "!version 1_0_0 is newer than 1" }, { "2", "!version 2 is newer than 1" },
      { "abc", "!not an integer: \"abc\"" }, { "", "!empty version line" },
      { "  ", "!empty version line" }, { "1.0", "!not an integer: \"1.0\"" },
      { "99999999999999999999999", "!version 99999999999999999999 is newer than 1" }) },
    { "version line reader leaves the TLS bytes in the socket", run_version_reader, ROWS(
      { "2\r\nX", "X" }, { "2\rX", "X" }, { "2\nX", "X" }) },
    { "options and mandos.conf", run_options, ROWS(
      { "--fore -p1025 --address=::1 --debuglevel info",
        "errors=0 foreground=True port=1025 address=::1 debuglevel=6" },
      { "--deb", "errors=1 ambiguous option --deb" },
      { "stray", "errors=1 unexpected argument \"stray\"" },
      { "--port", "errors=1 needs an argument" }, { "-vx", "errors=1 takes no argument" },
      { "-Z", "errors=1 unrecognized option -Z" },
      { "--bogus", "errors=1 unrecognized option --bogus" },
      { "--max_connections 5", "errors=1 unrecognized" },
      { "--no-z -p 1_025", "errors=0 port=1025 zeroconf=False" },
      { "--no-zeroconf", "errors=1 Needs port" },
      { "", ZC_AVAILABLE ? "errors=0 port=-1 zeroconf=True" : "Needs port" },
      { "--port 0x10", "errors=1 not a port number" }, { "--port=", "errors=1 needs a number" },
      { "-p1 --debug --no-dbus --no-ipv6 --no-restore", "errors=0 debug=True foreground=True "
        "debuglevel=7 use_dbus=False use_ipv6=False restore=False" },
      { "-p1 --socket 3 --statedir /s --configdir /c --priority NORMAL",
        "errors=0 socket=3 statedir=/s configdir=/c priority=NORMAL" },
      { "-p1", "errors=0 interface= address= debug=False debuglevel=4 servicename=Mandos "
        "configdir=/etc/mandos use_dbus=True use_ipv6=True restore=True socket=-1 "
        "statedir=/var/lib/mandos foreground=False zeroconf=True max_connections=1024 "
        "connection_timeout=10000" },
      /* strings raw, everything else interpolated; the command line wins */
      { "-p 2 --servicename S", "errors=0 priority=NORMAL:%COMPAT use_ipv6=False port=2 "
        "servicename=S foreground=True", "[DEFAULT]\npriority = NORMAL:%COMPAT\nx = no\n"
        "use_ipv6 = %(x)s\nport = 1_025\nservicename = %(x)s\nforeground = 1\n" },
      { "", "errors=1 mandos.conf:5: debuglevel", "[DEFAULT]\nport = 1\nmax_connections = 7\n"
        "connection_timeout = 2s\ndebuglevel = %(x)s\n" },
      { "", "errors=4 mandos.conf:3: mandos.conf:4: mandos.conf:5: mandos.conf:6:",
        "[DEFAULT]\nport = 1\nmax_connections = 0\n"
        "connection_timeout = PT0S\ndebug = maybe\nsocket = -1\nfoo = 100%\n[other]\nport = x\n" },
      { "--port 1", "errors=0 max_connections=7 connection_timeout=2000 use_dbus=False "
        "zeroconf=False restore=False debug=True", "[DEFAULT]\nmax_connections = 7\n"
        "connection_timeout = 2s\nuse_dbus = no\nzeroconf = off\nrestore = 0\ndebug = 1\n" }) },
    { "checker expansion", run_checker, ROWS(
      { "host = it's a \"host\"\nchecker = echo %%(host)s 100%%%%",
        "echo 'it'\"'\"'s a \"host\"' 100%" },
      { "checker = x %%(name)s %%(dbus_object_path)s", "x foo.bar /clients/foo_bar" },
      { "checker = x %%(host)s %%(fingerprint)s %%(key_id)s", "x '' '' ''" },
      { "interval = PT90S\nchecker = %%(interval)s %%(timeout)s %%(approval_duration)s",
        "0:01:30 0:05:00 0:00:01" },
      { "checker = %%(enabled)s", "False", "enabled", "0" },
      { "checker = %%(timeout)s", "0:00:01.500000", "timeout", "1500" },
      { "checker = %%(last_checked_ok)s", "'2023-02-08 12:34:56.789012'", "last_checked_ok",
        "1675859696789012" },
      { "checker = %%(last_enabled)s %%(expires)s", "None None", "last_enabled", "0" },
      { "checker = x %%(nosuch)s", "!unknown attribute %(nosuch)s" },
      { "checker = x %%(host)d", "!cannot expand" }, { "checker = 100%%", "!cannot expand" }) },
    { "client fields: the table's own rules", run_client_fields, ROWS({ "", "" }) },
    { "shell quoting", run_shell_quote, ROWS(
      { "", "''" }, { "abc", "abc" }, { "a b", "'a b'" }, { "it's", "'it'\"'\"'s'" },
      { "a/b-c.d:e,f=g+h@i%j_k", "a/b-c.d:e,f=g+h@i%j_k" }, { "$(x)", "'$(x)'" },
      { "a\nb", "'a\nb'" }) },
    { "state file: round trip", run_state_round_trip,
      ROWS({ "[a b]\nsecret = aGVsbG8=\nchecker = a\n\tb\n", "a\nb" }) },
    { "state file: corruption, refused with its line", run_state_corrupt, ROWS(
      { "client x\ncreated notanumber\nend\n", "3" }, { "garbage", "1", "raw" },
      { "client x\ncur.enabled 2\nend\n", "3" }, { "client x\ncur.timeout -1\nend\n", "3" },
      { "client x\ncur.host a\\x00b\nend\n", "3" }, { "client x\ntext.host a\\qb\nend\n", "3" },
      { "client x\nname y\nend\n", "3" }, { "client x\ntimeout 5\nend\n", "3" },
      { "client x\nsecret_sha256 AB\nend\n", "3" }, { "end\n", "2" }, { "client x\n", "2" },
      { "client x\nclient y\n", "3" }) },
    { "state: three-way reconciliation", run_reconcile, ROWS(
      { "host = one", "runtime", "host", "runtime", "host = one" },
      { "host = one", "two", "host", "runtime", "host = two" },
      { "timeout = PT5M", "540000", "timeout", "1", "timeout = PT9M" },
      { "timeout = PT5M", "300000", "timeout", "1", "timeout = 5m" },
      { "", "0", "enabled", "0", "" }, { "enabled = true", "1", "enabled", "0", "enabled = yes" },
      { "", "3", "last_checker_status", "3", "timeout = PT1M" },
      { "checker = a", "b", "checker", "b", "checker = a" }) },
    { "reload: kept, added and removed clients", run_reload, ROWS(
      { "[a]\nsecret = YQ==\nhost = one\n[b]\nsecret = Yg==\nenabled = yes\n[gone]\nsecret=\n",
        "", "[new]\nsecret=\n[b]\nsecret = Yw==\nenabled = no\n"
        "[a]\nsecret = YQ==\nhost = one\n" }) },
    { "client timers: the bound and running what is due", run_timers,
      ROWS({ "[a]\nsecret=\n[b]\nsecret=\n[c]\nsecret=\n", "10 10 20 20 40" }) },
    { "Zeroconf back end (" ZEROCONF_NAME "): its part of the poll loop", run_zeroconf,
      ROWS({ "", "" }) },
    { "client removal and D-Bus object paths", run_client_remove,
      ROWS({ "[a.b-c]\nsecret=\n[x y\xc3\xa9]\nsecret=\n[last]\nsecret=\n",
             "/clients/a_b_c /clients/x_y__ /clients/last a.b-c last" }) },
};

static int run_self_tests(void)
{
    int failed = 0;
    size_t n_tests = sizeof self_tests / sizeof self_tests[0];
    log_cfg.threshold = -1;      /* the tests provoke warnings on purpose */
    for (size_t i = 0; i < n_tests; i++) {
        test_failures = 0;
        for (const char *const (*c)[TEST_COLS] = self_tests[i].cases; (*c)[0]; c++) {
            struct buf out = { 0 };
            buf_adds(&out, "");
            self_tests[i].run(*c, &out);
            check_str(out.data, (*c)[1], (*c)[0]);
            buf_free(&out);
        }
        printf("%s %s\n", test_failures ? "FAIL" : "ok  ", self_tests[i].name);
        failed += test_failures > 0;
    }
    printf("%d passed, %d failed\n", (int)n_tests - failed, failed);
    return failed ? 1 : 0;
}
