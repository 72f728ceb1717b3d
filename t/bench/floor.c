/*
 * floor.c -- the in-process floor: the least CPU a Mandos exchange can cost.
 *
 * Both ends of the Mandos exchange run in one process over one socketpair,
 * each in its own thread with blocking I/O:
 *
 *   server thread (what mandos does, TLS client, no certificate):
 *     read the version line, gnutls_init, handshake, take the peer's raw
 *     public key and compute its SHA-256 key ID, send the secret,
 *     bye (close_notify both ways), deinit;
 *   client thread (what mandos-client does, TLS server, raw public key):
 *     send "1\r\n", handshake, read until close_notify, check the bytes,
 *     send close_notify.
 *
 * Every exchange gets a fresh socketpair (made by the client thread, whose
 * server end is handed over through a pipe and closed by the server), as
 * every connection has its own socket.
 *
 * Each thread's CPU time comes from CLOCK_THREAD_CPUTIME_ID, so the server
 * figure is the TLS work alone: no accept, no poll, no logging.  Threads
 * are used here only; the server itself is single-threaded.
 *
 * Usage: floor [--count N] [--warmup N] [--keys DIR] [--bytes N]
 *              [--priority STR]
 *   DIR holds tls-pubkey.pem, tls-privkey.pem and optionally expected.bin;
 *   without --keys an Ed25519 key pair is made in memory.
 * Output ends with
 *   "FLOOR n=.. server_cpu_us=.. client_cpu_us=.. wall_us=.. server_cpu_total_ms=.."
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

struct shared {
	int ctl[2];			/* pipe: client passes server fds */
	long count, warmup;
	const char *priority;
	gnutls_priority_t prio;		/* parsed once, shared */
	gnutls_certificate_credentials_t client_cred;	/* raw key */
	gnutls_certificate_credentials_t server_cred;	/* empty */
	unsigned char *secret;
	size_t secret_len;
	unsigned char key_id[32];	/* expected key ID of the raw key */
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

/* ------------------------------------------------------------ server side */

static int server_exchange(struct shared *sh, int fd)
{
	gnutls_session_t s;
	const gnutls_datum_t *peers;
	unsigned int npeers = 0;
	gnutls_pubkey_t pub;
	unsigned char id[32];
	size_t idlen = sizeof(id), sent = 0;
	char line[64];
	size_t ll = 0;
	int ret;

	/* Version line, byte by byte so no TLS byte is consumed. */
	for (;;) {
		ssize_t n = read(fd, line + ll, 1);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		if (line[ll] == '\n')
			break;
		if (++ll >= sizeof(line))
			return -1;
	}
	if (ll < 1 || line[0] != '1')
		return -1;

	ret = gnutls_init(&s, GNUTLS_CLIENT | GNUTLS_NO_TICKETS |
	    GNUTLS_ENABLE_RAWPK);
	if (ret < 0)
		return -1;
	if (gnutls_priority_set(s, sh->prio) < 0 ||
	    gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE,
	    sh->server_cred) < 0)
		goto fail;
	gnutls_transport_set_int(s, fd);
	do
		ret = gnutls_handshake(s);
	while (ret == GNUTLS_E_AGAIN || ret == GNUTLS_E_INTERRUPTED);
	if (ret < 0) {
		fprintf(stderr, "floor: server handshake: %s\n",
		    gnutls_strerror(ret));
		goto fail;
	}
	if (gnutls_certificate_type_get2(s, GNUTLS_CTYPE_PEERS) !=
	    GNUTLS_CRT_RAWPK)
		goto fail;
	peers = gnutls_certificate_get_peers(s, &npeers);
	if (peers == NULL || npeers == 0)
		goto fail;
	if (gnutls_pubkey_init(&pub) < 0)
		goto fail;
	ret = gnutls_pubkey_import(pub, &peers[0], GNUTLS_X509_FMT_DER);
	if (ret >= 0)
		ret = gnutls_pubkey_get_key_id(pub, GNUTLS_KEYID_USE_SHA256,
		    id, &idlen);
	gnutls_pubkey_deinit(pub);
	if (ret < 0 || idlen != sizeof(id) ||
	    memcmp(id, sh->key_id, sizeof(id)) != 0)
		goto fail;
	while (sent < sh->secret_len) {
		ssize_t n = gnutls_record_send(s, sh->secret + sent,
		    sh->secret_len - sent);

		if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
			continue;
		if (n < 0)
			goto fail;
		sent += (size_t)n;
	}
	do
		ret = gnutls_bye(s, GNUTLS_SHUT_RDWR);
	while (ret == GNUTLS_E_AGAIN || ret == GNUTLS_E_INTERRUPTED);
	gnutls_deinit(s);
	return ret < 0 ? -1 : 0;
fail:
	gnutls_deinit(s);
	return -1;
}

static void *server_thread(void *arg)
{
	struct shared *sh = arg;
	double t0 = 0;
	long i;

	for (i = 0; i < sh->warmup + sh->count; i++) {
		int fd, ok;

		if (i == sh->warmup)
			t0 = thread_cpu();
		if (read(sh->ctl[0], &fd, sizeof(fd)) != (ssize_t)sizeof(fd)) {
			sh->server_err = 1;
			return NULL;
		}
		ok = server_exchange(sh, fd) == 0;
		close(fd);
		if (!ok) {
			sh->server_err = 1;
			return NULL;
		}
	}
	sh->server_cpu = thread_cpu() - t0;
	return NULL;
}

/* ------------------------------------------------------------ client side */

static int client_exchange(struct shared *sh, int fd, unsigned char *buf,
    size_t cap)
{
	gnutls_session_t s;
	size_t len = 0;
	int ret;

	if (write_all(fd, "1\r\n", 3) != 0)
		return -1;
	ret = gnutls_init(&s, GNUTLS_SERVER | GNUTLS_ENABLE_RAWPK);
	if (ret < 0)
		return -1;
	if (gnutls_priority_set(s, sh->prio) < 0 ||
	    gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE,
	    sh->client_cred) < 0)
		goto fail;
	gnutls_certificate_server_set_request(s, GNUTLS_CERT_IGNORE);
	gnutls_transport_set_int(s, fd);
	do
		ret = gnutls_handshake(s);
	while (ret == GNUTLS_E_AGAIN || ret == GNUTLS_E_INTERRUPTED);
	if (ret < 0) {
		fprintf(stderr, "floor: client handshake: %s\n",
		    gnutls_strerror(ret));
		goto fail;
	}
	for (;;) {
		ssize_t n = gnutls_record_recv(s, buf + len, cap - len);

		if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
			continue;
		if (n < 0)
			goto fail;
		if (n == 0)
			break;
		len += (size_t)n;
		if (len == cap)
			goto fail;
	}
	if (len != sh->secret_len || memcmp(buf, sh->secret, len) != 0) {
		fprintf(stderr, "floor: secret mismatch\n");
		goto fail;
	}
	do
		ret = gnutls_bye(s, GNUTLS_SHUT_WR);
	while (ret == GNUTLS_E_AGAIN || ret == GNUTLS_E_INTERRUPTED);
	gnutls_deinit(s);
	return 0;
fail:
	gnutls_deinit(s);
	return -1;
}

static void *client_thread(void *arg)
{
	struct shared *sh = arg;
	size_t cap = sh->secret_len + 65536;
	unsigned char *buf = malloc(cap);
	double t0 = 0;
	long i;

	if (buf == NULL) {
		sh->client_err = 1;
		return NULL;
	}
	for (i = 0; i < sh->warmup + sh->count; i++) {
		int sp[2], ok;

		if (i == sh->warmup)
			t0 = thread_cpu();
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0 ||
		    write_all(sh->ctl[1], &sp[0], sizeof(sp[0])) != 0) {
			sh->client_err = 1;
			break;
		}
		ok = client_exchange(sh, sp[1], buf, cap) == 0;
		close(sp[1]);
		if (!ok) {
			/* The server end stays with the server thread, which
			 * sees end-of-file now and stops. */
			sh->client_err = 1;
			break;
		}
	}
	close(sh->ctl[1]);
	if (sh->client_err) {
		free(buf);
		return NULL;
	}
	sh->client_cpu = thread_cpu() - t0;
	free(buf);
	return NULL;
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
		gnutls_x509_privkey_t xkey;
		gnutls_privkey_t pkey;
		gnutls_pubkey_t p;

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

int main(int argc, char **argv)
{
	struct shared sh;
	pthread_t ts, tc;
	const char *dir = NULL;
	long bytes = 300;
	double w0, w1, per_s, per_c, per_w;
	int i, ret;

	memset(&sh, 0, sizeof(sh));
	sh.count = 1000;
	sh.warmup = 20;
	sh.priority = DEFAULT_PRIORITY;
	for (i = 1; i < argc; i++) {
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (v == NULL)
			goto usage;
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
			goto usage;
		i++;
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
	if (pipe(sh.ctl) != 0) {
		perror("floor: pipe");
		return 1;
	}

	w0 = wall();
	if (pthread_create(&ts, NULL, server_thread, &sh) != 0 ||
	    pthread_create(&tc, NULL, client_thread, &sh) != 0) {
		fprintf(stderr, "floor: cannot start threads\n");
		return 1;
	}
	pthread_join(ts, NULL);
	pthread_join(tc, NULL);
	w1 = wall();
	if (sh.server_err || sh.client_err) {
		fprintf(stderr, "floor: exchange failed (%s side)\n",
		    sh.server_err ? "server" : "client");
		return 1;
	}
	per_s = sh.server_cpu / (double)sh.count * 1e6;
	per_c = sh.client_cpu / (double)sh.count * 1e6;
	per_w = (w1 - w0) / (double)(sh.count + sh.warmup) * 1e6;
	printf("exchanges          %ld (after %ld warm-up), secret %zu bytes\n",
	    sh.count, sh.warmup, sh.secret_len);
	printf("server (TLS client) CPU  %.1f us per exchange, %.1f ms total\n",
	    per_s, sh.server_cpu * 1e3);
	printf("client (TLS server) CPU  %.1f us per exchange\n", per_c);
	printf("wall                     %.1f us per exchange\n", per_w);
	printf("FLOOR n=%ld server_cpu_us=%.1f client_cpu_us=%.1f wall_us=%.1f "
	    "server_cpu_total_ms=%.1f\n", sh.count, per_s, per_c, per_w,
	    sh.server_cpu * 1e3);
	free(sh.secret);
	gnutls_certificate_free_credentials(sh.client_cred);
	gnutls_certificate_free_credentials(sh.server_cred);
	gnutls_priority_deinit(sh.prio);
	gnutls_global_deinit();
	return 0;
usage:
	fprintf(stderr, "usage: floor [--count N] [--warmup N] [--keys DIR] "
	    "[--bytes N] [--priority STR]\n");
	return 2;
}
