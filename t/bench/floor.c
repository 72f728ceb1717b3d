/*
 * floor.c -- the in-process floor: the least CPU a Mandos exchange can cost.
 *
 * Both ends of the Mandos exchange run in one process, over a fresh
 * socketpair per exchange (every connection has its own socket):
 *
 *   server side (what mandos does; TLS client, no certificate):
 *     read the version line byte by byte, gnutls_init, handshake, take the
 *     peer's raw public key and compute its SHA-256 key ID, send the
 *     secret, bye (close_notify both ways), deinit, close;
 *   client side (what mandos-client does; TLS server, raw public key):
 *     send "1\r\n", handshake, read until close_notify, check the bytes,
 *     send close_notify.
 *
 * Each side is a small state machine (side_step) over a socket.  Two modes:
 *
 *   interleaved (default): one thread, non-blocking sockets, the two sides
 *     stepped in turn; CLOCK_THREAD_CPUTIME_ID is read around every server
 *     step, so the figure is the server's own work and nothing else (no
 *     accept, poll, logging, scheduling).  The lower bound.
 *   --threads: each side in its own thread with blocking sockets, the
 *     server's file descriptors handed over through a pipe; each thread's
 *     CPU time is read at the end.  Includes the cost of sleeping and
 *     waking in the kernel, as a real server has.
 *
 * Threads are used here only; the server itself is single-threaded.
 *
 * Usage: floor [--count N] [--warmup N] [--keys DIR] [--bytes N]
 *              [--priority STR] [--threads]
 *   DIR holds tls-pubkey.pem, tls-privkey.pem and optionally expected.bin;
 *   without --keys an Ed25519 key pair is made in memory.
 * Output ends with
 *   "FLOOR mode=.. n=.. server_cpu_us=.. client_cpu_us=.. wall_us=.."
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#define DEFAULT_PRIORITY "SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA" \
	":!VERS-ALL:+VERS-TLS1.3:%PROFILE_ULTRA"

/* What both sides share: keys, secret, settings, results. */
struct shared {
	int ctl[2];			/* --threads: passes server fds */
	long count, warmup;
	const char *priority;
	gnutls_priority_t prio;		/* parsed once */
	gnutls_certificate_credentials_t client_cred;	/* the raw key */
	gnutls_certificate_credentials_t server_cred;	/* empty */
	unsigned char *secret;
	size_t secret_len;
	unsigned char key_id[32];	/* key ID of the raw key */
	double server_cpu, client_cpu;	/* seconds, measured part only */
	int server_err, client_err;
};

static double thread_cpu(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double wall(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die_tls(const char *what, int ret)
{
	fprintf(stderr, "floor: %s: %s\n", what, gnutls_strerror(ret));
	exit(1);
}

static int write_all(int fd, const void *data, size_t len)
{
	const char *p = data;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* ------------------------------------------------------------ the sides */

enum side_state {
	SIDE_LINE,		/* server: read version / client: send it */
	SIDE_HANDSHAKE,
	SIDE_DATA,		/* server: send secret / client: read it */
	SIDE_BYE,
	SIDE_DONE
};

struct side {
	int is_server;
	int fd;
	enum side_state state;
	gnutls_session_t tls;
	size_t done;			/* bytes of line or secret so far */
	unsigned char *buf;		/* client: received data */
	size_t cap;
};

static int again(int ret)
{
	return ret == GNUTLS_E_AGAIN || ret == GNUTLS_E_INTERRUPTED;
}

static int side_begin(struct shared *sh, struct side *sd)
{
	int ret;

	ret = gnutls_init(&sd->tls, sd->is_server ?
	    GNUTLS_CLIENT | GNUTLS_NO_TICKETS | GNUTLS_ENABLE_RAWPK :
	    GNUTLS_SERVER | GNUTLS_ENABLE_RAWPK);
	if (ret < 0) {
		sd->tls = NULL;
		return -1;
	}
	if (gnutls_priority_set(sd->tls, sh->prio) < 0 ||
	    gnutls_credentials_set(sd->tls, GNUTLS_CRD_CERTIFICATE,
	    sd->is_server ? sh->server_cred : sh->client_cred) < 0)
		return -1;
	if (!sd->is_server)
		gnutls_certificate_server_set_request(sd->tls,
		    GNUTLS_CERT_IGNORE);
	gnutls_transport_set_int(sd->tls, sd->fd);
	return 0;
}

/* The server's check of the peer: raw key, and its SHA-256 key ID. */
static int server_identify(struct shared *sh, struct side *sd)
{
	const gnutls_datum_t *peers;
	unsigned int npeers = 0;
	gnutls_pubkey_t pub;
	unsigned char id[32] = { 0 };
	size_t idlen = sizeof(id);
	int ret;

	if (gnutls_certificate_type_get2(sd->tls, GNUTLS_CTYPE_PEERS) !=
	    GNUTLS_CRT_RAWPK)
		return -1;
	peers = gnutls_certificate_get_peers(sd->tls, &npeers);
	if (peers == NULL || npeers == 0 || gnutls_pubkey_init(&pub) < 0)
		return -1;
	ret = gnutls_pubkey_import(pub, &peers[0], GNUTLS_X509_FMT_DER);
	if (ret >= 0)
		ret = gnutls_pubkey_get_key_id(pub, GNUTLS_KEYID_USE_SHA256,
		    id, &idlen);
	gnutls_pubkey_deinit(pub);
	if (ret < 0 || idlen != sizeof(id) ||
	    memcmp(id, sh->key_id, sizeof(id)) != 0)
		return -1;
	return 0;
}

/*
 * Advances one side as far as its socket allows.  Returns 1 when the
 * exchange is complete, 0 when it would block, -1 on error.  On blocking
 * sockets it returns only 1 or -1.
 */
static int side_step(struct shared *sh, struct side *sd)
{
	int ret;

	for (;;) {
		switch (sd->state) {
		case SIDE_LINE:
			if (sd->is_server) {
				char c;
				ssize_t n = read(sd->fd, &c, 1);

				if (n < 0 && (errno == EAGAIN ||
				    errno == EWOULDBLOCK || errno == EINTR))
					return 0;
				if (n <= 0 || ++sd->done > 64)
					return -1;
				if (c != '\n')
					break;
			} else {
				static const char line[] = "1\r\n";
				ssize_t n = write(sd->fd, line + sd->done,
				    sizeof(line) - 1 - sd->done);

				if (n < 0 && (errno == EAGAIN ||
				    errno == EWOULDBLOCK || errno == EINTR))
					return 0;
				if (n <= 0)
					return -1;
				sd->done += (size_t)n;
				if (sd->done < sizeof(line) - 1)
					break;
			}
			if (side_begin(sh, sd) != 0)
				return -1;
			sd->done = 0;
			sd->state = SIDE_HANDSHAKE;
			break;

		case SIDE_HANDSHAKE:
			ret = gnutls_handshake(sd->tls);
			if (again(ret))
				return 0;
			if (ret < 0) {
				fprintf(stderr, "floor: %s handshake: %s\n",
				    sd->is_server ? "server" : "client",
				    gnutls_strerror(ret));
				return -1;
			}
			if (sd->is_server && server_identify(sh, sd) != 0)
				return -1;
			sd->state = SIDE_DATA;
			break;

		case SIDE_DATA:
			if (sd->is_server) {
				ssize_t n;

				if (sd->done == sh->secret_len) {
					sd->state = SIDE_BYE;
					break;
				}
				n = gnutls_record_send(sd->tls,
				    sh->secret + sd->done,
				    sh->secret_len - sd->done);
				if (again((int)n))
					return 0;
				if (n < 0)
					return -1;
				sd->done += (size_t)n;
			} else {
				ssize_t n = gnutls_record_recv(sd->tls,
				    sd->buf + sd->done, sd->cap - sd->done);

				if (again((int)n))
					return 0;
				if (n < 0 || sd->done == sd->cap)
					return -1;
				sd->done += (size_t)n;
				if (n > 0)
					break;
				if (sd->done != sh->secret_len ||
				    memcmp(sd->buf, sh->secret,
				    sd->done) != 0) {
					fprintf(stderr,
					    "floor: secret mismatch\n");
					return -1;
				}
				sd->state = SIDE_BYE;
			}
			break;

		case SIDE_BYE:
			ret = gnutls_bye(sd->tls, sd->is_server ?
			    GNUTLS_SHUT_RDWR : GNUTLS_SHUT_WR);
			if (again(ret))
				return 0;
			if (ret < 0)
				return -1;
			gnutls_deinit(sd->tls);
			sd->tls = NULL;
			close(sd->fd);
			sd->fd = -1;
			sd->state = SIDE_DONE;
			return 1;

		case SIDE_DONE:
			return 1;
		}
	}
}

static void side_reset(struct side *sd, int is_server, int fd)
{
	sd->is_server = is_server;
	sd->fd = fd;
	sd->state = SIDE_LINE;
	sd->tls = NULL;
	sd->done = 0;
}

static void side_abort(struct side *sd)
{
	if (sd->tls != NULL)
		gnutls_deinit(sd->tls);
	if (sd->fd >= 0)
		close(sd->fd);
	sd->tls = NULL;
	sd->fd = -1;
}

/* ------------------------------------------------------ interleaved mode */

static int run_interleaved(struct shared *sh)
{
	struct side srv, cli;
	double sc0 = 0, cc0 = 0;
	long i;

	memset(&srv, 0, sizeof(srv));
	memset(&cli, 0, sizeof(cli));
	cli.cap = sh->secret_len + 65536;
	cli.buf = malloc(cli.cap);
	if (cli.buf == NULL)
		return -1;
	for (i = 0; i < sh->warmup + sh->count; i++) {
		int sp[2], rs = 0, rc = 0;
		long turns;

		if (i == sh->warmup) {
			sh->server_cpu = 0;
			sh->client_cpu = 0;
		}
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0)
			return -1;
		fcntl(sp[0], F_SETFL, O_NONBLOCK);
		fcntl(sp[1], F_SETFL, O_NONBLOCK);
		side_reset(&srv, 1, sp[0]);
		side_reset(&cli, 0, sp[1]);
		/* A handful of turns suffice; the bound catches a stall. */
		for (turns = 0; turns < 10000 && (rs != 1 || rc != 1);
		    turns++) {
			if (rc != 1) {
				cc0 = thread_cpu();
				rc = side_step(sh, &cli);
				sh->client_cpu += thread_cpu() - cc0;
			}
			if (rs != 1) {
				sc0 = thread_cpu();
				rs = side_step(sh, &srv);
				sh->server_cpu += thread_cpu() - sc0;
			}
			if (rs < 0 || rc < 0)
				break;
		}
		if (rs != 1 || rc != 1) {
			fprintf(stderr, "floor: exchange %ld failed (%s)\n", i,
			    rs < 0 ? "server" : rc < 0 ? "client" : "stalled");
			side_abort(&srv);
			side_abort(&cli);
			free(cli.buf);
			return -1;
		}
	}
	free(cli.buf);
	return 0;
}

/* ---------------------------------------------------------- threads mode */

static void *server_thread(void *arg)
{
	struct shared *sh = arg;
	struct side sd;
	double t0 = thread_cpu();
	long i;

	memset(&sd, 0, sizeof(sd));
	for (i = 0; i < sh->warmup + sh->count; i++) {
		int fd;

		if (i == sh->warmup)
			t0 = thread_cpu();
		if (read(sh->ctl[0], &fd, sizeof(fd)) != (ssize_t)sizeof(fd)) {
			sh->server_err = 1;
			return NULL;
		}
		side_reset(&sd, 1, fd);
		if (side_step(sh, &sd) != 1) {
			side_abort(&sd);
			sh->server_err = 1;
			return NULL;
		}
	}
	sh->server_cpu = thread_cpu() - t0;
	return NULL;
}

static void *client_thread(void *arg)
{
	struct shared *sh = arg;
	struct side sd;
	double t0 = thread_cpu();
	long i;

	memset(&sd, 0, sizeof(sd));
	sd.cap = sh->secret_len + 65536;
	sd.buf = malloc(sd.cap);
	if (sd.buf == NULL)
		sh->client_err = 1;
	for (i = 0; !sh->client_err && i < sh->warmup + sh->count; i++) {
		int sp[2];

		if (i == sh->warmup)
			t0 = thread_cpu();
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0 ||
		    write_all(sh->ctl[1], &sp[0], sizeof(sp[0])) != 0) {
			sh->client_err = 1;
			break;
		}
		side_reset(&sd, 0, sp[1]);
		if (side_step(sh, &sd) != 1) {
			/* Closing our end lets the server thread see
			 * end-of-file and stop. */
			side_abort(&sd);
			sh->client_err = 1;
		}
	}
	close(sh->ctl[1]);
	sh->client_cpu = thread_cpu() - t0;
	free(sd.buf);
	return NULL;
}

static int run_threads(struct shared *sh)
{
	pthread_t ts, tc;

	if (pipe(sh->ctl) != 0) {
		perror("floor: pipe");
		return -1;
	}
	if (pthread_create(&ts, NULL, server_thread, sh) != 0)
		return -1;
	if (pthread_create(&tc, NULL, client_thread, sh) != 0) {
		close(sh->ctl[1]);
		pthread_join(ts, NULL);
		return -1;
	}
	pthread_join(ts, NULL);
	pthread_join(tc, NULL);
	close(sh->ctl[0]);
	if (sh->server_err || sh->client_err) {
		fprintf(stderr, "floor: exchange failed (%s side)\n",
		    sh->server_err ? "server" : "client");
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------ set-up */

static unsigned char *read_file(const char *path, size_t *lenp)
{
	FILE *f = fopen(path, "rb");
	unsigned char *buf = NULL;
	size_t len = 0, cap = 0, n;

	if (f == NULL)
		return NULL;
	do {
		if (cap - len < 4096) {
			unsigned char *nb = realloc(buf, cap + 65536);

			if (nb == NULL) {
				free(buf);
				fclose(f);
				return NULL;
			}
			buf = nb;
			cap += 65536;
		}
		n = fread(buf + len, 1, cap - len, f);
		len += n;
	} while (n > 0);
	fclose(f);
	*lenp = len;
	return buf;
}

/* Loads (or makes) the client's raw key; fills the expected key ID. */
static void setup_keys(struct shared *sh, const char *dir)
{
	gnutls_datum_t pubpem, privpem;
	gnutls_pubkey_t pub;
	size_t idlen = sizeof(sh->key_id);
	int ret;

	if (dir != NULL) {
		char path[4200];
		size_t len;

		snprintf(path, sizeof(path), "%.4000s/tls-pubkey.pem", dir);
		pubpem.data = read_file(path, &len);
		if (pubpem.data == NULL) {
			fprintf(stderr, "floor: cannot read %s\n", path);
			exit(1);
		}
		pubpem.size = (unsigned int)len;
		snprintf(path, sizeof(path), "%.4000s/tls-privkey.pem", dir);
		privpem.data = read_file(path, &len);
		if (privpem.data == NULL) {
			fprintf(stderr, "floor: cannot read %s\n", path);
			exit(1);
		}
		privpem.size = (unsigned int)len;
	} else {
		gnutls_x509_privkey_t xkey = NULL;
		gnutls_privkey_t pkey = NULL;
		gnutls_pubkey_t p = NULL;

		if ((ret = gnutls_x509_privkey_init(&xkey)) < 0 ||
		    (ret = gnutls_x509_privkey_generate(xkey,
		    GNUTLS_PK_EDDSA_ED25519, 256, 0)) < 0 ||
		    (ret = gnutls_x509_privkey_export2_pkcs8(xkey,
		    GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN,
		    &privpem)) < 0 ||
		    (ret = gnutls_privkey_init(&pkey)) < 0 ||
		    (ret = gnutls_privkey_import_x509(pkey, xkey,
		    GNUTLS_PRIVKEY_IMPORT_AUTO_RELEASE)) < 0 ||
		    (ret = gnutls_pubkey_init(&p)) < 0 ||
		    (ret = gnutls_pubkey_import_privkey(p, pkey, 0, 0)) < 0 ||
		    (ret = gnutls_pubkey_export2(p, GNUTLS_X509_FMT_PEM,
		    &pubpem)) < 0)
			die_tls("make key", ret);
		gnutls_pubkey_deinit(p);
		gnutls_privkey_deinit(pkey);
	}
	if ((ret = gnutls_certificate_allocate_credentials(
	    &sh->client_cred)) < 0)
		die_tls("credentials", ret);
	ret = gnutls_certificate_set_rawpk_key_mem(sh->client_cred, &pubpem,
	    &privpem, GNUTLS_X509_FMT_PEM, NULL, 0, NULL, 0, 0);
	if (ret < 0)
		die_tls("load raw key", ret);
	if ((ret = gnutls_pubkey_init(&pub)) < 0 ||
	    (ret = gnutls_pubkey_import(pub, &pubpem,
	    GNUTLS_X509_FMT_PEM)) < 0 ||
	    (ret = gnutls_pubkey_get_key_id(pub, GNUTLS_KEYID_USE_SHA256,
	    sh->key_id, &idlen)) < 0)
		die_tls("key ID", ret);
	gnutls_pubkey_deinit(pub);
	if (dir != NULL) {
		free(pubpem.data);
		free(privpem.data);
	} else {
		gnutls_free(pubpem.data);
		gnutls_free(privpem.data);
	}
	if ((ret = gnutls_certificate_allocate_credentials(
	    &sh->server_cred)) < 0)
		die_tls("credentials", ret);
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
		fprintf(stderr, "floor: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

static void usage(void)
{
	fprintf(stderr, "usage: floor [--count N] [--warmup N] [--keys DIR] "
	    "[--bytes N] [--priority STR]\n"
	    "             [--threads]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct shared sh;
	const char *dir = NULL;
	long bytes = 300;
	int threads = 0, i, ret;
	double w0, w1, per_s, per_c, per_w;

	memset(&sh, 0, sizeof(sh));
	sh.count = 1000;
	sh.warmup = 20;
	sh.priority = DEFAULT_PRIORITY;
	for (i = 1; i < argc; i += 2) {
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(argv[i], "--threads") == 0) {
			threads = 1;
			i--;		/* takes no value */
			continue;
		}
		if (v == NULL)
			usage();
		if (strcmp(argv[i], "--count") == 0)
			sh.count = parse_long(v, "count", 1, 10000000);
		else if (strcmp(argv[i], "--warmup") == 0)
			sh.warmup = parse_long(v, "warmup", 0, 1000000);
		else if (strcmp(argv[i], "--keys") == 0)
			dir = v;
		else if (strcmp(argv[i], "--bytes") == 0)
			bytes = parse_long(v, "bytes", 1, 1 << 20);
		else if (strcmp(argv[i], "--priority") == 0)
			sh.priority = v;
		else
			usage();
	}

	if ((ret = gnutls_global_init()) < 0)
		die_tls("global_init", ret);
	setup_keys(&sh, dir);
	if ((ret = gnutls_priority_init(&sh.prio, sh.priority, NULL)) < 0)
		die_tls("priority", ret);
	if (dir != NULL) {
		char path[4200];

		snprintf(path, sizeof(path), "%.4000s/expected.bin", dir);
		sh.secret = read_file(path, &sh.secret_len);
	}
	if (sh.secret == NULL) {
		sh.secret_len = (size_t)bytes;
		sh.secret = malloc(sh.secret_len);
		if (sh.secret == NULL ||
		    gnutls_rnd(GNUTLS_RND_NONCE, sh.secret, sh.secret_len) < 0)
			die_tls("secret", GNUTLS_E_MEMORY_ERROR);
	}

	w0 = wall();
	if ((threads ? run_threads(&sh) : run_interleaved(&sh)) != 0)
		return 1;
	w1 = wall();

	per_s = sh.server_cpu / (double)sh.count * 1e6;
	per_c = sh.client_cpu / (double)sh.count * 1e6;
	per_w = (w1 - w0) / (double)(sh.count + sh.warmup) * 1e6;
	printf("mode                      %s\n", threads ? "threads" :
	    "interleaved");
	printf("exchanges                 %ld (after %ld warm-up), "
	    "secret %zu bytes\n", sh.count, sh.warmup, sh.secret_len);
	printf("server (TLS client) CPU   %.1f us per exchange\n", per_s);
	printf("client (TLS server) CPU   %.1f us per exchange\n", per_c);
	printf("wall                      %.1f us per exchange\n", per_w);
	printf("FLOOR mode=%s n=%ld server_cpu_us=%.1f client_cpu_us=%.1f "
	    "wall_us=%.1f\n", threads ? "threads" : "interleaved", sh.count,
	    per_s, per_c, per_w);
	free(sh.secret);
	gnutls_certificate_free_credentials(sh.client_cred);
	gnutls_certificate_free_credentials(sh.server_cred);
	gnutls_priority_deinit(sh.prio);
	gnutls_global_deinit();
	return 0;
}
