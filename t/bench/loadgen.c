/*
 * loadgen.c -- load generator speaking the client side of the Mandos protocol.
 *
 * Each request does what mandos-client does: connect over TCP, send the
 * version line "1\r\n", run TLS as the TLS *server* presenting a raw public
 * key (RFC 7250), read application data until the peer's close_notify,
 * answer with our own close_notify and close.  The bytes received are
 * compared with the key set's expected.bin.  Many requests run at once
 * over non-blocking sockets and one poll() loop.
 *
 * Sections: options; clock and /proc helpers; key sets; connections (the
 * per-request state machine); the load run; the --exec-listen launcher;
 * main.
 *
 * Modes:
 *   loadgen --port P --keys DIR[,DIR...] | --keydir-list FILE
 *           [--host ::1] [--requests N] [--concurrency C] [--timeout S]
 *           [--expect FILE] [--server-pid PID] [--max-time S] [--nodelay]
 *           [--quiet]
 *     Run the load; print a summary and a final line
 *     "RESULT ok=.. fail=.. ... rps=.. p50_ms=.. p99_ms=.. max_ms=..".
 *     With --server-pid, also the CPU time used meanwhile by that process
 *     and its descendants (utime+stime+cutime+cstime, from /proc).
 *     --max-time bounds the run: no request starts after S seconds (those
 *     not started are reported as skipped); started ones run to their end
 *     or their own --timeout.
 *     --hold plays a hostile peer: after the handshake it never answers
 *     (no close_notify) and waits for the server to close the connection,
 *     which counts as a success (latency: until the server's close).
 *
 *   loadgen --tree-stats PID
 *     Print "TREE pid=.. nproc=.. rss_kb=.. pss_kb=.. cpu_ms=.." for the
 *     process and all its descendants (smaps_rollup, stat).
 *
 *   loadgen --exec-listen --port P [--timeout S] --report FILE -- CMD ARG...
 *     Become CMD (exec; the caller's $! is the server's PID) and leave a
 *     detached watcher that writes "listen_ms=X" to FILE once a socket is
 *     listening on port P (asking the kernel through sock_diag; no probe
 *     connection is made), measured from just before the exec.
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#define DEFAULT_PRIORITY "SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA" \
	":!VERS-ALL:+VERS-TLS1.3:%PROFILE_ULTRA"
#define MAX_CONCURRENCY 65536

/* ---------------------------------------------------------------- options */

struct opts {
	const char *host;
	int port;
	long requests;
	long concurrency;
	double timeout_s;
	double max_time_s;		/* 0: unbounded */
	const char *keys;		/* comma-separated key dirs */
	const char *keydir_list;	/* file, one key dir a line */
	const char *expect;		/* overrides DIR/expected.bin */
	const char *priority;
	long server_pid;
	long tree_pid;
	int nodelay;
	int hold;			/* --hold: never answer after the handshake */
	int quiet;
	int exec_listen;
	const char *report;
	char **cmd;			/* after "--" */
};

static void usage(void)
{
	fprintf(stderr,
	    "usage: loadgen --port P (--keys D1[,D2..] | --keydir-list F)\n"
	    "         [--host ::1] [--requests N] [--concurrency C] "
	    "[--timeout S]\n"
	    "         [--expect FILE] [--server-pid PID] [--max-time S] "
	    "[--priority STR]\n"
	    "         [--nodelay] [--hold] [--quiet]\n"
	    "       loadgen --tree-stats PID\n"
	    "       loadgen --exec-listen --port P --report FILE "
	    "[--timeout S] -- CMD [ARG...]\n");
	exit(2);
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
		fprintf(stderr, "loadgen: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
	int i;

	memset(o, 0, sizeof(*o));
	o->host = "::1";
	o->port = -1;
	o->requests = 100;
	o->concurrency = 1;
	o->timeout_s = 30.0;
	o->priority = DEFAULT_PRIORITY;
	o->server_pid = -1;
	o->tree_pid = -1;
	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(a, "--") == 0) {
			o->cmd = argv + i + 1;
			break;
		}
		if (strcmp(a, "--nodelay") == 0) {
			o->nodelay = 1;
			continue;
		}
		if (strcmp(a, "--hold") == 0) {
			o->hold = 1;
			continue;
		}
		if (strcmp(a, "--quiet") == 0) {
			o->quiet = 1;
			continue;
		}
		if (strcmp(a, "--exec-listen") == 0) {
			o->exec_listen = 1;
			continue;
		}
		if (v == NULL)
			usage();
		if (strcmp(a, "--host") == 0) {
			o->host = v;
		} else if (strcmp(a, "--port") == 0) {
			o->port = (int)parse_long(v, "port", 1, 65535);
		} else if (strcmp(a, "--requests") == 0) {
			o->requests = parse_long(v, "requests", 1, 100000000);
		} else if (strcmp(a, "--concurrency") == 0) {
			o->concurrency = parse_long(v, "concurrency", 1,
			    MAX_CONCURRENCY);
		} else if (strcmp(a, "--timeout") == 0) {
			char *end;

			o->timeout_s = strtod(v, &end);
			if (end == v || *end != '\0' || !(o->timeout_s > 0))
				usage();
		} else if (strcmp(a, "--max-time") == 0) {
			char *end;

			o->max_time_s = strtod(v, &end);
			if (end == v || *end != '\0' || !(o->max_time_s > 0))
				usage();
		} else if (strcmp(a, "--keys") == 0) {
			o->keys = v;
		} else if (strcmp(a, "--keydir-list") == 0) {
			o->keydir_list = v;
		} else if (strcmp(a, "--expect") == 0) {
			o->expect = v;
		} else if (strcmp(a, "--priority") == 0) {
			o->priority = v;
		} else if (strcmp(a, "--server-pid") == 0) {
			o->server_pid = parse_long(v, "pid", 1, 1L << 30);
		} else if (strcmp(a, "--tree-stats") == 0) {
			o->tree_pid = parse_long(v, "pid", 1, 1L << 30);
		} else if (strcmp(a, "--report") == 0) {
			o->report = v;
		} else {
			usage();
		}
		i++;
	}
}

/* ------------------------------------------------- clock and /proc helpers */

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Reads a whole small file (proc files have no size) into a new string. */
static char *slurp(const char *path, size_t *lenp)
{
	char *buf = NULL;
	size_t len = 0, cap = 0;
	int fd = open(path, O_RDONLY);

	if (fd < 0)
		return NULL;
	for (;;) {
		ssize_t n;

		if (cap - len < 4096) {
			char *nb = realloc(buf, cap + 65536);

			if (nb == NULL) {
				free(buf);
				close(fd);
				return NULL;
			}
			buf = nb;
			cap += 65536;
		}
		n = read(fd, buf + len, cap - len - 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	if (buf == NULL)
		return NULL;
	buf[len] = '\0';
	if (lenp != NULL)
		*lenp = len;
	return buf;
}

/*
 * From /proc/PID/stat: parent PID, state, and utime+stime+cutime+cstime in
 * clock ticks.  The command name may hold blanks and parentheses, so the
 * fields are counted from the last ')'.
 */
static int proc_stat(long pid, long *ppid, char *state,
    unsigned long long *ticks)
{
	char path[64], *buf, *p, *tok, *save = NULL;
	unsigned long long sum = 0;
	int field = 2;

	snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
	buf = slurp(path, NULL);
	if (buf == NULL)
		return -1;
	p = strrchr(buf, ')');
	if (p == NULL) {
		free(buf);
		return -1;
	}
	for (tok = strtok_r(p + 1, " \n", &save); tok != NULL;
	    tok = strtok_r(NULL, " \n", &save)) {
		field++;
		if (field == 3 && state != NULL)
			*state = tok[0];
		else if (field == 4 && ppid != NULL)
			*ppid = strtol(tok, NULL, 10);
		else if (field >= 14 && field <= 17)
			sum += strtoull(tok, NULL, 10);
		if (field == 17)
			break;
	}
	free(buf);
	if (ticks != NULL)
		*ticks = sum;
	return field == 17 ? 0 : -1;
}

struct tree_stats {
	long nproc;
	long rss_kb;
	long pss_kb;
	double cpu_ms;
};

static long rollup_field(const char *buf, const char *name)
{
	const char *p = buf;
	size_t n = strlen(name);

	while ((p = strstr(p, name)) != NULL) {
		if ((p == buf || p[-1] == '\n') && p[n] == ':')
			return strtol(p + n + 1, NULL, 10);
		p += n;
	}
	return 0;
}

/*
 * Sums memory and CPU over pid and all its descendants.  CPU includes the
 * children each process has reaped (cutime/cstime), so short-lived
 * per-connection children are counted once they are waited for.
 */
static int tree_stats(long root, struct tree_stats *ts)
{
	long *pids = NULL, *ppids = NULL, *queue = NULL;
	size_t n = 0, cap = 0, qh = 0, qt = 0, i;
	DIR *d;
	struct dirent *e;
	long hz = sysconf(_SC_CLK_TCK);

	memset(ts, 0, sizeof(*ts));
	d = opendir("/proc");
	if (d == NULL)
		return -1;
	while ((e = readdir(d)) != NULL) {
		long pid, ppid = 0;

		if (!isdigit((unsigned char)e->d_name[0]))
			continue;
		pid = strtol(e->d_name, NULL, 10);
		if (proc_stat(pid, &ppid, NULL, NULL) != 0)
			continue;
		if (n == cap) {
			size_t nc = cap ? cap * 2 : 1024;
			long *np = realloc(pids, nc * sizeof(long));
			long *npp;

			if (np == NULL)
				break;
			pids = np;
			npp = realloc(ppids, nc * sizeof(long));
			if (npp == NULL)
				break;
			ppids = npp;
			cap = nc;
		}
		pids[n] = pid;
		ppids[n] = ppid;
		n++;
	}
	closedir(d);
	queue = malloc((n + 1) * sizeof(long));
	if (queue == NULL) {
		free(pids);
		free(ppids);
		return -1;
	}
	queue[qt++] = root;
	while (qh < qt) {
		long pid = queue[qh++];
		unsigned long long ticks = 0;
		char path[64], *buf;
		char state = '?';

		if (proc_stat(pid, NULL, &state, &ticks) != 0) {
			if (pid == root)
				break;
			continue;
		}
		ts->nproc++;
		ts->cpu_ms += (double)ticks * 1000.0 / (double)hz;
		snprintf(path, sizeof(path), "/proc/%ld/smaps_rollup", pid);
		buf = slurp(path, NULL);
		if (buf != NULL) {
			ts->rss_kb += rollup_field(buf, "Rss");
			ts->pss_kb += rollup_field(buf, "Pss");
			free(buf);
		}
		for (i = 0; i < n && qt <= n; i++)
			if (ppids[i] == pid && pids[i] != pid)
				queue[qt++] = pids[i];
	}
	free(queue);
	free(pids);
	free(ppids);
	return ts->nproc > 0 ? 0 : -1;
}

/* --------------------------------------------------------------- key sets */

/*
 * One client identity.  Loading a raw key into a credentials structure is
 * costly, so each set is loaded once, before the clock starts, and its
 * credentials are shared by all requests using it.
 */
struct keyset {
	char *dir;
	gnutls_certificate_credentials_t cred;
	unsigned char *expected;
	size_t explen;
	int loaded;
};

static int keyset_load(struct keyset *k, const char *expect_override)
{
	char pub[4096], priv[4096], exp[4096];
	int ret;

	if (k->loaded)
		return 0;
	snprintf(pub, sizeof(pub), "%.4000s/tls-pubkey.pem", k->dir);
	snprintf(priv, sizeof(priv), "%.4000s/tls-privkey.pem", k->dir);
	if (expect_override != NULL)
		snprintf(exp, sizeof(exp), "%.4000s", expect_override);
	else
		snprintf(exp, sizeof(exp), "%.4000s/expected.bin", k->dir);
	ret = gnutls_certificate_allocate_credentials(&k->cred);
	if (ret < 0) {
		fprintf(stderr, "loadgen: credentials: %s\n",
		    gnutls_strerror(ret));
		return -1;
	}
	ret = gnutls_certificate_set_rawpk_key_file(k->cred, pub, priv,
	    GNUTLS_X509_FMT_PEM, NULL, 0, NULL, 0, 0, 0);
	if (ret < 0) {
		fprintf(stderr, "loadgen: %s, %s: %s\n", pub, priv,
		    gnutls_strerror(ret));
		return -1;
	}
	k->expected = (unsigned char *)slurp(exp, &k->explen);
	if (k->expected == NULL) {
		fprintf(stderr, "loadgen: cannot read %s: %s\n", exp,
		    strerror(errno));
		return -1;
	}
	k->loaded = 1;
	return 0;
}

static void keyset_add(struct keyset **ks, size_t *n, size_t *cap,
    const char *dir, size_t len)
{
	while (len > 0 && isspace((unsigned char)dir[len - 1]))
		len--;
	while (len > 0 && isspace((unsigned char)*dir)) {
		dir++;
		len--;
	}
	if (len == 0 || dir[0] == '#')
		return;
	if (*n == *cap) {
		size_t nc = *cap ? *cap * 2 : 16;
		struct keyset *nk = realloc(*ks, nc * sizeof(**ks));

		if (nk == NULL) {
			fprintf(stderr, "loadgen: out of memory\n");
			exit(1);
		}
		*ks = nk;
		*cap = nc;
	}
	memset(&(*ks)[*n], 0, sizeof(**ks));
	(*ks)[*n].dir = malloc(len + 1);
	if ((*ks)[*n].dir == NULL) {
		fprintf(stderr, "loadgen: out of memory\n");
		exit(1);
	}
	memcpy((*ks)[*n].dir, dir, len);
	(*ks)[*n].dir[len] = '\0';
	(*n)++;
}

static struct keyset *keysets_read(const struct opts *o, size_t *np)
{
	struct keyset *ks = NULL;
	size_t n = 0, cap = 0;

	if (o->keys != NULL) {
		const char *p = o->keys;

		for (;;) {
			const char *c = strchr(p, ',');
			size_t len = c ? (size_t)(c - p) : strlen(p);

			keyset_add(&ks, &n, &cap, p, len);
			if (c == NULL)
				break;
			p = c + 1;
		}
	}
	if (o->keydir_list != NULL) {
		char *buf = slurp(o->keydir_list, NULL), *p;

		if (buf == NULL) {
			fprintf(stderr, "loadgen: cannot read %s: %s\n",
			    o->keydir_list, strerror(errno));
			exit(1);
		}
		for (p = buf; *p != '\0';) {
			char *nl = strchr(p, '\n');
			size_t len = nl ? (size_t)(nl - p) : strlen(p);

			keyset_add(&ks, &n, &cap, p, len);
			p += len + (nl != NULL);
		}
		free(buf);
	}
	*np = n;
	return ks;
}

/* ------------------------------------------------------------ connections */

enum fail_kind {
	FAIL_NONE,
	FAIL_CONNECT,	/* socket/connect failed or refused */
	FAIL_EOF,	/* closed or reset before any TLS byte (version) */
	FAIL_HANDSHAKE,	/* TLS handshake error */
	FAIL_RECV,	/* TLS error or bare TCP close while reading */
	FAIL_MISMATCH,	/* bytes differ from expected.bin */
	FAIL_TIMEOUT,	/* per-request deadline passed */
	FAIL_SETUP,	/* local GnuTLS set-up error */
	FAIL_KINDS
};

static const char *const fail_names[FAIL_KINDS] = {
	"ok", "connect", "eof", "handshake", "recv", "mismatch", "timeout",
	"setup"
};

enum conn_state {
	CONN_FREE,
	CONN_CONNECT,
	CONN_VERSION,
	CONN_HANDSHAKE,
	CONN_RECV,
	CONN_BYE,
	CONN_HOLD
};

static const char *const state_names[] = {
	"free", "connect", "version", "handshake", "recv", "bye", "hold"
};

struct conn {
	enum conn_state state;
	int fd;
	short events;			/* what poll() should wait for */
	gnutls_session_t tls;
	struct keyset *ks;
	double started;
	double deadline;
	size_t version_sent;
	unsigned long rx_bytes;		/* raw bytes read from the server */
	unsigned char *buf;
	size_t len, cap;
};

struct run {
	const struct opts *o;
	struct sockaddr_storage addr;
	socklen_t addrlen;
	gnutls_priority_t prio;
	struct keyset *ks;
	size_t nks;
	long started, finished;
	long total;			/* requests, less those skipped */
	long fails[FAIL_KINDS];
	long timeouts_in[7];		/* timeouts by state */
	double *lat_ms;			/* successes only */
	long nlat;
	const char *first_error;
	char errbuf[256];
};

static ssize_t conn_pull(gnutls_transport_ptr_t p, void *data, size_t size)
{
	struct conn *c = p;
	ssize_t n = recv(c->fd, data, size, 0);

	if (n > 0)
		c->rx_bytes += (unsigned long)n;
	else if (n < 0)
		gnutls_transport_set_errno(c->tls, errno);
	return n;
}

static ssize_t conn_vec_push(gnutls_transport_ptr_t p, const giovec_t *iov,
    int iovcnt)
{
	struct conn *c = p;
	struct msghdr m;
	ssize_t n;

	memset(&m, 0, sizeof(m));
	m.msg_iov = (struct iovec *)iov;
	m.msg_iovlen = (size_t)iovcnt;
	n = sendmsg(c->fd, &m, MSG_NOSIGNAL);
	if (n < 0)
		gnutls_transport_set_errno(c->tls, errno);
	return n;
}

static ssize_t conn_push(gnutls_transport_ptr_t p, const void *data,
    size_t size)
{
	struct conn *c = p;
	ssize_t n = send(c->fd, data, size, MSG_NOSIGNAL);

	if (n < 0)
		gnutls_transport_set_errno(c->tls, errno);
	return n;
}

static void run_note_error(struct run *r, enum fail_kind k, const char *msg)
{
	if (r->first_error == NULL) {
		snprintf(r->errbuf, sizeof(r->errbuf), "%s: %s",
		    fail_names[k], msg);
		r->first_error = r->errbuf;
	}
}

static void conn_finish(struct run *r, struct conn *c, enum fail_kind k)
{
	if (k == FAIL_NONE)
		r->lat_ms[r->nlat++] = (now_s() - c->started) * 1000.0;
	else if (k == FAIL_TIMEOUT)
		r->timeouts_in[c->state]++;
	r->fails[k]++;
	r->finished++;
	if (c->tls != NULL)
		gnutls_deinit(c->tls);
	if (c->fd >= 0)
		close(c->fd);
	c->tls = NULL;
	c->fd = -1;
	c->len = 0;
	c->state = CONN_FREE;
}

static int conn_start(struct run *r, struct conn *c)
{
	int fd, ret, one = 1;

	c->ks = &r->ks[(size_t)r->started % r->nks];
	r->started++;
	c->started = now_s();
	c->deadline = c->started + r->o->timeout_s;
	c->version_sent = 0;
	c->rx_bytes = 0;
	c->len = 0;
	c->tls = NULL;
	c->state = CONN_CONNECT;

	fd = socket(r->addr.ss_family, SOCK_STREAM, 0);
	c->fd = fd;
	if (fd < 0) {
		run_note_error(r, FAIL_CONNECT, strerror(errno));
		conn_finish(r, c, FAIL_CONNECT);
		return -1;
	}
	fcntl(fd, F_SETFD, FD_CLOEXEC);
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	if (r->o->nodelay)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

	ret = gnutls_init(&c->tls, GNUTLS_SERVER | GNUTLS_ENABLE_RAWPK |
	    GNUTLS_NONBLOCK);
	if (ret < 0) {
		c->tls = NULL;
		run_note_error(r, FAIL_SETUP, gnutls_strerror(ret));
		conn_finish(r, c, FAIL_SETUP);
		return -1;
	}
	if ((ret = gnutls_priority_set(c->tls, r->prio)) < 0 ||
	    (ret = gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE,
	    c->ks->cred)) < 0) {
		run_note_error(r, FAIL_SETUP, gnutls_strerror(ret));
		conn_finish(r, c, FAIL_SETUP);
		return -1;
	}
	gnutls_certificate_server_set_request(c->tls, GNUTLS_CERT_IGNORE);
	gnutls_transport_set_ptr(c->tls, c);
	gnutls_transport_set_pull_function(c->tls, conn_pull);
	gnutls_transport_set_push_function(c->tls, conn_push);
	gnutls_transport_set_vec_push_function(c->tls, conn_vec_push);

	ret = connect(fd, (struct sockaddr *)&r->addr, r->addrlen);
	if (ret == 0) {
		c->state = CONN_VERSION;
		c->events = POLLOUT;
	} else if (errno == EINPROGRESS || errno == EINTR) {
		c->events = POLLOUT;
	} else {
		run_note_error(r, FAIL_CONNECT, strerror(errno));
		conn_finish(r, c, FAIL_CONNECT);
		return -1;
	}
	return 0;
}

/* Short description of a GnuTLS failure, with errno for transport errors. */
static const char *tls_error(int ret, char *buf, size_t size)
{
	if (ret == GNUTLS_E_PUSH_ERROR || ret == GNUTLS_E_PULL_ERROR)
		snprintf(buf, size, "%s (%s)", gnutls_strerror(ret),
		    strerror(errno));
	else
		snprintf(buf, size, "%s", gnutls_strerror(ret));
	return buf;
}

/* Advances one connection as far as it goes without blocking. */
static void conn_step(struct run *r, struct conn *c, short revents)
{
	char eb[160];
	int ret;

	for (;;) {
		switch (c->state) {
		case CONN_FREE:
			return;

		case CONN_CONNECT: {
			int err = 0;
			socklen_t len = sizeof(err);

			if (!(revents & (POLLOUT | POLLERR | POLLHUP)))
				return;
			if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err,
			    &len) != 0)
				err = errno;
			if (err != 0) {
				run_note_error(r, FAIL_CONNECT, strerror(err));
				conn_finish(r, c, FAIL_CONNECT);
				return;
			}
			c->state = CONN_VERSION;
			break;
		}

		case CONN_VERSION: {
			static const char line[] = "1\r\n";
			ssize_t n = send(c->fd, line + c->version_sent,
			    sizeof(line) - 1 - c->version_sent, MSG_NOSIGNAL);

			if (n < 0) {
				if (errno == EAGAIN || errno == EWOULDBLOCK ||
				    errno == EINTR) {
					c->events = POLLOUT;
					return;
				}
				run_note_error(r, FAIL_EOF, strerror(errno));
				conn_finish(r, c, FAIL_EOF);
				return;
			}
			c->version_sent += (size_t)n;
			if (c->version_sent == sizeof(line) - 1)
				c->state = CONN_HANDSHAKE;
			break;
		}

		case CONN_HANDSHAKE:
			ret = gnutls_handshake(c->tls);
			if (ret == GNUTLS_E_AGAIN ||
			    ret == GNUTLS_E_INTERRUPTED) {
				c->events = gnutls_record_get_direction(
				    c->tls) ? POLLOUT : POLLIN;
				return;
			}
			if (ret < 0) {
				enum fail_kind k = c->rx_bytes == 0 ?
				    FAIL_EOF : FAIL_HANDSHAKE;

				run_note_error(r, k,
				    tls_error(ret, eb, sizeof(eb)));
				conn_finish(r, c, k);
				return;
			}
			c->state = r->o->hold ? CONN_HOLD : CONN_RECV;
			break;

		case CONN_RECV:
			if (c->cap - c->len < 4096) {
				size_t nc = c->cap ? c->cap * 2 : 8192;
				unsigned char *nb = realloc(c->buf, nc);

				if (nb == NULL) {
					run_note_error(r, FAIL_SETUP,
					    "out of memory");
					conn_finish(r, c, FAIL_SETUP);
					return;
				}
				c->buf = nb;
				c->cap = nc;
			}
			ret = (int)gnutls_record_recv(c->tls, c->buf + c->len,
			    c->cap - c->len);
			if (ret > 0) {
				c->len += (size_t)ret;
				break;
			}
			if (ret == GNUTLS_E_AGAIN ||
			    ret == GNUTLS_E_INTERRUPTED) {
				c->events = POLLIN;
				return;
			}
			if (ret < 0) {
				run_note_error(r, FAIL_RECV,
				    tls_error(ret, eb, sizeof(eb)));
				conn_finish(r, c, FAIL_RECV);
				return;
			}
			/* close_notify: the whole secret is here. */
			if (c->len != c->ks->explen ||
			    memcmp(c->buf, c->ks->expected, c->len) != 0) {
				snprintf(eb, sizeof(eb),
				    "got %zu bytes, expected %zu (%s)",
				    c->len, c->ks->explen,
				    c->len == c->ks->explen ?
				    "content differs" : "length differs");
				run_note_error(r, FAIL_MISMATCH, eb);
				conn_finish(r, c, FAIL_MISMATCH);
				return;
			}
			c->state = CONN_BYE;
			break;

		case CONN_BYE:
			/* Our close_notify; the server waits for it. */
			ret = gnutls_bye(c->tls, GNUTLS_SHUT_WR);
			if (ret == GNUTLS_E_AGAIN ||
			    ret == GNUTLS_E_INTERRUPTED) {
				c->events = POLLOUT;
				return;
			}
			/* The data were verified; a failed bye is the
			 * server's business (the real client ignores it). */
			conn_finish(r, c, FAIL_NONE);
			return;

		case CONN_HOLD: {
			/* --hold: read raw bytes, never answer, until the
			 * server closes the connection. */
			char scratch[4096];
			ssize_t n = recv(c->fd, scratch, sizeof(scratch), 0);

			if (n > 0)
				break;
			if (n < 0 && (errno == EAGAIN ||
			    errno == EWOULDBLOCK || errno == EINTR)) {
				c->events = POLLIN;
				return;
			}
			conn_finish(r, c, FAIL_NONE);
			return;
		}
		}
	}
}

/* ---------------------------------------------------------------- load run */

static int resolve(struct run *r)
{
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&r->addr;
	struct sockaddr_in *s4 = (struct sockaddr_in *)&r->addr;

	memset(&r->addr, 0, sizeof(r->addr));
	if (inet_pton(AF_INET6, r->o->host, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((unsigned short)r->o->port);
		r->addrlen = sizeof(*s6);
		return 0;
	}
	if (inet_pton(AF_INET, r->o->host, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons((unsigned short)r->o->port);
		r->addrlen = sizeof(*s4);
		return 0;
	}
	fprintf(stderr, "loadgen: --host must be an IP literal: %s\n",
	    r->o->host);
	return -1;
}

static void raise_nofile(long want)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		return;
	if ((rlim_t)want > rl.rlim_cur) {
		rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ||
		    (rlim_t)want < rl.rlim_max ? (rlim_t)want : rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array. */
static double percentile(const double *v, long n, double p)
{
	long i;

	if (n <= 0)
		return 0.0;
	i = (long)(p / 100.0 * (double)n + 0.999999) - 1;
	if (i < 0)
		i = 0;
	if (i >= n)
		i = n - 1;
	return v[i];
}

static int load_run(const struct opts *o)
{
	struct run r;
	struct conn *conns;
	struct pollfd *pfds;
	long *map;
	long conc = o->concurrency, i, ok;
	size_t k, used;
	double t0, t1, wall, p50, p99, pmax;
	struct tree_stats ts0, ts1;
	int have_cpu = 0, ret;

	memset(&r, 0, sizeof(r));
	r.o = o;
	if (o->port < 0 || (o->keys == NULL && o->keydir_list == NULL))
		usage();
	if (resolve(&r) != 0)
		return 2;
	r.ks = keysets_read(o, &r.nks);
	if (r.nks == 0) {
		fprintf(stderr, "loadgen: no key sets given\n");
		return 2;
	}
	if (conc > o->requests)
		conc = o->requests;
	raise_nofile(conc + 64);

	if ((ret = gnutls_global_init()) < 0) {
		fprintf(stderr, "loadgen: %s\n", gnutls_strerror(ret));
		return 1;
	}
	ret = gnutls_priority_init(&r.prio, o->priority, NULL);
	if (ret < 0) {
		fprintf(stderr, "loadgen: priority: %s\n",
		    gnutls_strerror(ret));
		return 1;
	}
	/* Load, before the clock starts, every key set the run will use. */
	used = (size_t)o->requests < r.nks ? (size_t)o->requests : r.nks;
	for (k = 0; k < used; k++)
		if (keyset_load(&r.ks[k], o->expect) != 0)
			return 1;

	conns = calloc((size_t)conc, sizeof(*conns));
	pfds = calloc((size_t)conc, sizeof(*pfds));
	map = calloc((size_t)conc, sizeof(*map));
	r.lat_ms = calloc((size_t)o->requests, sizeof(double));
	if (conns == NULL || pfds == NULL || map == NULL || r.lat_ms == NULL) {
		fprintf(stderr, "loadgen: out of memory\n");
		return 1;
	}
	for (i = 0; i < conc; i++) {
		conns[i].fd = -1;
		conns[i].state = CONN_FREE;
	}
	signal(SIGPIPE, SIG_IGN);

	if (o->server_pid > 0)
		have_cpu = tree_stats(o->server_pid, &ts0) == 0;
	t0 = now_s();
	r.total = o->requests;
	while (r.finished < r.total) {
		double now, next;
		int npfd = 0, timeout_ms, n;

		/* Past --max-time, start nothing new. */
		if (o->max_time_s > 0 && r.started < r.total &&
		    now_s() - t0 > o->max_time_s) {
			r.total = r.started;
			continue;
		}
		/* Fill free slots. */
		for (i = 0; i < conc && r.started < r.total; i++) {
			if (conns[i].state != CONN_FREE)
				continue;
			if (conn_start(&r, &conns[i]) == 0)
				conn_step(&r, &conns[i], 0);
		}
		/* Expire, and collect what to wait for. */
		now = now_s();
		next = now + 1.0;
		for (i = 0; i < conc; i++) {
			struct conn *c = &conns[i];

			if (c->state == CONN_FREE)
				continue;
			if (now >= c->deadline) {
				run_note_error(&r, FAIL_TIMEOUT,
				    state_names[c->state]);
				conn_finish(&r, c, FAIL_TIMEOUT);
				continue;
			}
			if (c->deadline < next)
				next = c->deadline;
			pfds[npfd].fd = c->fd;
			pfds[npfd].events = c->events;
			pfds[npfd].revents = 0;
			map[npfd++] = i;
		}
		if (npfd == 0)
			continue;
		timeout_ms = (int)((next - now) * 1000.0) + 1;
		n = poll(pfds, (nfds_t)npfd, timeout_ms);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("loadgen: poll");
			return 1;
		}
		for (i = 0; i < npfd && n > 0; i++) {
			if (pfds[i].revents == 0)
				continue;
			n--;
			conn_step(&r, &conns[map[i]], pfds[i].revents);
		}
	}
	t1 = now_s();
	if (have_cpu)
		have_cpu = tree_stats(o->server_pid, &ts1) == 0;

	wall = t1 - t0;
	ok = r.fails[FAIL_NONE];
	qsort(r.lat_ms, (size_t)r.nlat, sizeof(double), cmp_double);
	p50 = percentile(r.lat_ms, r.nlat, 50.0);
	p99 = percentile(r.lat_ms, r.nlat, 99.0);
	pmax = r.nlat > 0 ? r.lat_ms[r.nlat - 1] : 0.0;

	if (!o->quiet) {
		printf("requests     %ld (concurrency %ld, %zu key set%s, "
		    "timeout %.0f s)\n", o->requests, conc, r.nks,
		    r.nks == 1 ? "" : "s", o->timeout_s);
		printf("successes    %ld\n", ok);
		if (r.total < o->requests)
			printf("skipped      %ld (--max-time %.0f s)\n",
			    o->requests - r.total, o->max_time_s);
		printf("failures     %ld:", r.total - ok);
		for (k = 1; k < FAIL_KINDS; k++)
			printf(" %s=%ld", fail_names[k], r.fails[k]);
		printf("\n");
		if (r.fails[FAIL_TIMEOUT] > 0) {
			printf("timeouts in ");
			for (k = 1; k < 7; k++)
				printf(" %s=%ld", state_names[k],
				    r.timeouts_in[k]);
			printf("\n");
		}
		if (r.first_error != NULL)
			printf("first error  %s\n", r.first_error);
		printf("wall time    %.3f s\n", wall);
		printf("requests/s   %.1f\n", wall > 0 ? (double)ok / wall : 0);
		printf("latency ms   p50 %.2f  p99 %.2f  max %.2f\n", p50, p99,
		    pmax);
		if (have_cpu)
			printf("server CPU   %.0f ms (%.1f ms per 1000 "
			    "requests)\n", ts1.cpu_ms - ts0.cpu_ms,
			    ok > 0 ? (ts1.cpu_ms - ts0.cpu_ms) * 1000.0 /
			    (double)ok : 0.0);
	}
	printf("RESULT ok=%ld fail=%ld skipped=%ld", ok, r.total - ok,
	    o->requests - r.total);
	for (k = 1; k < FAIL_KINDS; k++)
		printf(" %s=%ld", fail_names[k], r.fails[k]);
	printf(" conc=%ld wall_s=%.3f rps=%.1f p50_ms=%.2f p99_ms=%.2f "
	    "max_ms=%.2f", conc, wall, wall > 0 ? (double)ok / wall : 0.0,
	    p50, p99, pmax);
	if (have_cpu)
		printf(" server_cpu_ms=%.0f cpu_per_1k_ms=%.1f",
		    ts1.cpu_ms - ts0.cpu_ms, ok > 0 ?
		    (ts1.cpu_ms - ts0.cpu_ms) * 1000.0 / (double)ok : 0.0);
	printf("\n");
	fflush(stdout);

	for (i = 0; i < conc; i++)
		free(conns[i].buf);
	free(conns);
	free(pfds);
	free(map);
	free(r.lat_ms);
	for (k = 0; k < r.nks; k++) {
		if (r.ks[k].loaded) {
			gnutls_certificate_free_credentials(r.ks[k].cred);
			free(r.ks[k].expected);
		}
		free(r.ks[k].dir);
	}
	free(r.ks);
	gnutls_priority_deinit(r.prio);
	gnutls_global_deinit();
	return ok == o->requests ? 0 : 1;
}

/* ------------------------------------------------ the --exec-listen launcher */

/*
 * Is some TCP socket of this family listening on local port `port`?  The
 * kernel is asked for listening sockets only (sock_diag), so the answer
 * does not slow down when a load run has left thousands of connections in
 * TIME_WAIT, as parsing /proc/net/tcp6 did (the second server measured in
 * a series showed 70-90 ms instead of 15-20).
 */
static int port_listening(int family, int port)
{
	struct {
		struct nlmsghdr nh;
		struct inet_diag_req_v2 req;
	} q;
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	char buf[8192];
	int fd, found = 0, done = 0;

	fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
	if (fd < 0)
		return 0;
	memset(&q, 0, sizeof(q));
	q.nh.nlmsg_len = sizeof(q);
	q.nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
	q.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
	q.req.sdiag_family = (unsigned char)family;
	q.req.sdiag_protocol = IPPROTO_TCP;
	q.req.idiag_states = 1U << 10;		/* TCP_LISTEN */
	if (sendto(fd, &q, sizeof(q), 0, (struct sockaddr *)&kernel,
	    sizeof(kernel)) < 0) {
		close(fd);
		return 0;
	}
	while (!done) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);
		struct nlmsghdr *h = (struct nlmsghdr *)(void *)buf;

		if (n <= 0)
			break;
		for (; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			struct inet_diag_msg *m = NLMSG_DATA(h);

			if (h->nlmsg_type == NLMSG_DONE ||
			    h->nlmsg_type == NLMSG_ERROR) {
				done = 1;
				break;
			}
			if (ntohs(m->id.idiag_sport) == port)
				found = 1;
		}
	}
	close(fd);
	return found;
}

/*
 * The watcher (a detached grandchild): waits until the exec has happened
 * (the close-on-exec pipe reaches end-of-file), then polls the socket
 * tables every millisecond.
 */
static void watcher(int rfd, const struct opts *o)
{
	struct { double t0; long pid; } msg;
	const char *result = NULL;
	char text[64], c;
	double t = 0.0, limit;
	FILE *f;
	ssize_t n;

	if (read(rfd, &msg, sizeof(msg)) != (ssize_t)sizeof(msg))
		_exit(1);
	while ((n = read(rfd, &c, 1)) != 0 && !(n < 0 && errno != EINTR))
		;
	close(rfd);
	limit = msg.t0 + o->timeout_s;
	for (;;) {
		char state = '?';
		struct timespec ms = { 0, 1000000 };

		if (port_listening(AF_INET6, o->port) ||
		    port_listening(AF_INET, o->port)) {
			t = now_s();
			break;
		}
		if (proc_stat(msg.pid, NULL, &state, NULL) != 0 ||
		    state == 'Z' || state == 'X') {
			result = "died";
			break;
		}
		if (now_s() > limit) {
			result = "timeout";
			break;
		}
		nanosleep(&ms, NULL);
	}
	if (result == NULL) {
		snprintf(text, sizeof(text), "%.3f", (t - msg.t0) * 1000.0);
		result = text;
	}
	f = fopen(o->report, "w");
	if (f != NULL) {
		fprintf(f, "listen_ms=%s\n", result);
		fclose(f);
	}
	_exit(0);
}

static int exec_listen(const struct opts *o)
{
	struct { double t0; long pid; } msg;
	int p[2];
	pid_t mid;
	int status;

	if (o->port < 0 || o->report == NULL || o->cmd == NULL ||
	    o->cmd[0] == NULL)
		usage();
	unlink(o->report);
	if (pipe(p) != 0) {
		perror("loadgen: pipe");
		return 1;
	}
	fcntl(p[0], F_SETFD, FD_CLOEXEC);
	fcntl(p[1], F_SETFD, FD_CLOEXEC);
	mid = fork();
	if (mid < 0) {
		perror("loadgen: fork");
		return 1;
	}
	if (mid == 0) {
		pid_t w = fork();

		if (w == 0) {
			int nul = open("/dev/null", O_RDWR);

			if (nul >= 0) {
				dup2(nul, 0);
				dup2(nul, 1);
				dup2(nul, 2);
				if (nul > 2)
					close(nul);
			}
			close(p[1]);
			setsid();
			watcher(p[0], o);
		}
		_exit(w < 0);
	}
	close(p[0]);
	if (waitpid(mid, &status, 0) < 0 || !WIFEXITED(status) ||
	    WEXITSTATUS(status) != 0) {
		fprintf(stderr, "loadgen: could not start the watcher\n");
		return 1;
	}
	msg.pid = (long)getpid();
	msg.t0 = now_s();
	if (write(p[1], &msg, sizeof(msg)) != (ssize_t)sizeof(msg)) {
		perror("loadgen: write");
		return 1;
	}
	execvp(o->cmd[0], o->cmd);
	fprintf(stderr, "loadgen: exec %s: %s\n", o->cmd[0], strerror(errno));
	return 127;
}

/* -------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
	struct opts o;

	parse_opts(argc, argv, &o);
	if (o.tree_pid > 0) {
		struct tree_stats ts;

		if (tree_stats(o.tree_pid, &ts) != 0) {
			fprintf(stderr, "loadgen: no process %ld\n",
			    o.tree_pid);
			return 1;
		}
		printf("TREE pid=%ld nproc=%ld rss_kb=%ld pss_kb=%ld "
		    "cpu_ms=%.0f\n", o.tree_pid, ts.nproc, ts.rss_kb,
		    ts.pss_kb, ts.cpu_ms);
		return 0;
	}
	if (o.exec_listen)
		return exec_listen(&o);
	return load_run(&o);
}
