/*
 * mkkeys.c -- make many Mandos client key sets quickly, for benchmarks.
 *
 * mandos-keygen needs about two seconds per client (it makes OpenPGP keys
 * too); a benchmark with 10,000 configured clients needs only the TLS side.
 * This tool makes N Ed25519 raw-public-key pairs in one process and writes
 *
 *   OUT/keys/NNNNN/tls-pubkey.pem    SubjectPublicKeyInfo, PEM
 *   OUT/keys/NNNNN/tls-privkey.pem   PKCS#8 private key, PEM, unencrypted
 *   OUT/keys/NNNNN/expected.bin      the bytes the server must send
 *   OUT/clients.conf                 one section per key
 *   OUT/keydirs.txt                  the key directories, one a line
 *
 * The secret of each client is the base64 of a random payload of 64..400
 * bytes (opaque to the server; the real client would want an OpenPGP
 * message there, which does not matter for load).
 *
 * The default checker interval is long (20 days): the first checker of
 * each client runs at a random time within one interval, and with 10,000
 * clients a short interval means a checker every few seconds, whose forks
 * would be counted as request CPU.  20 days keeps every timer (up to two
 * intervals) below 2^32 ms.
 *
 * Usage: mkkeys --count N --out DIR [--checker CMD] [--interval DUR]
 *               [--timeout DUR] [--min-bytes A] [--max-bytes B] [--quiet]
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

/* ---------------------------------------------------------------- options */

struct opts {
	long count;
	const char *out;
	const char *checker;
	const char *interval;
	const char *timeout;
	long min_bytes;
	long max_bytes;
	int quiet;
};

static void usage(void)
{
	fprintf(stderr,
	    "usage: mkkeys --count N --out DIR [--checker CMD] "
	    "[--interval DUR]\n"
	    "              [--timeout DUR] [--min-bytes A] [--max-bytes B] "
	    "[--quiet]\n");
	exit(2);
}

static long parse_long(const char *s, const char *what, long lo, long hi)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
		fprintf(stderr, "mkkeys: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
	int i;

	o->count = 0;
	o->out = NULL;
	o->checker = "true";
	o->interval = "P20D";
	o->timeout = "P20D";
	o->min_bytes = 64;
	o->max_bytes = 400;
	o->quiet = 0;
	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(a, "--quiet") == 0) {
			o->quiet = 1;
			continue;
		}
		if (v == NULL)
			usage();
		if (strcmp(a, "--count") == 0)
			o->count = parse_long(v, "count", 1, 1000000);
		else if (strcmp(a, "--out") == 0)
			o->out = v;
		else if (strcmp(a, "--checker") == 0)
			o->checker = v;
		else if (strcmp(a, "--interval") == 0)
			o->interval = v;
		else if (strcmp(a, "--timeout") == 0)
			o->timeout = v;
		else if (strcmp(a, "--min-bytes") == 0)
			o->min_bytes = parse_long(v, "min-bytes", 1, 1 << 20);
		else if (strcmp(a, "--max-bytes") == 0)
			o->max_bytes = parse_long(v, "max-bytes", 1, 1 << 20);
		else
			usage();
		i++;
	}
	if (o->count <= 0 || o->out == NULL || o->min_bytes > o->max_bytes)
		usage();
}

/* ---------------------------------------------------------------- helpers */

static void die_tls(const char *what, int ret)
{
	fprintf(stderr, "mkkeys: %s: %s\n", what, gnutls_strerror(ret));
	exit(1);
}

static void die_errno(const char *what, const char *path)
{
	fprintf(stderr, "mkkeys: %s %s: %s\n", what, path, strerror(errno));
	exit(1);
}

/* path = dir + "/" + name; dies when it does not fit. */
static void join_path(char *path, size_t size, const char *dir,
    const char *name)
{
	int n = snprintf(path, size, "%s/%s", dir, name);

	if (n < 0 || (size_t)n >= size) {
		fprintf(stderr, "mkkeys: path too long: %s/%s\n", dir, name);
		exit(1);
	}
}

static void make_dir(const char *path)
{
	if (mkdir(path, 0755) != 0 && errno != EEXIST)
		die_errno("mkdir", path);
}

static void write_file(const char *path, const void *data, size_t len,
    mode_t mode)
{
	const unsigned char *p = data;
	int fd;

	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
	if (fd < 0)
		die_errno("open", path);
	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die_errno("write", path);
		}
		p += n;
		len -= (size_t)n;
	}
	if (close(fd) != 0)
		die_errno("close", path);
}

/* Standard base64 with padding into out (size >= 4 * ceil(len / 3) + 1). */
static void base64(const unsigned char *in, size_t len, char *out)
{
	static const char tab[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	size_t i;

	for (i = 0; i + 2 < len; i += 3) {
		unsigned long v = (unsigned long)in[i] << 16 |
		    (unsigned long)in[i + 1] << 8 | in[i + 2];

		*out++ = tab[v >> 18 & 63];
		*out++ = tab[v >> 12 & 63];
		*out++ = tab[v >> 6 & 63];
		*out++ = tab[v & 63];
	}
	if (len - i == 1) {
		unsigned long v = (unsigned long)in[i] << 16;

		*out++ = tab[v >> 18 & 63];
		*out++ = tab[v >> 12 & 63];
		*out++ = '=';
		*out++ = '=';
	} else if (len - i == 2) {
		unsigned long v = (unsigned long)in[i] << 16 |
		    (unsigned long)in[i + 1] << 8;

		*out++ = tab[v >> 18 & 63];
		*out++ = tab[v >> 12 & 63];
		*out++ = tab[v >> 6 & 63];
		*out++ = '=';
	}
	*out = '\0';
}

/* ------------------------------------------------------------- one key set */

/*
 * Make one key pair in dir, its expected.bin, and append its clients.conf
 * section to conf.
 */
static void make_one(const struct opts *o, long idx, const char *dir,
    FILE *conf)
{
	gnutls_x509_privkey_t xkey;
	gnutls_privkey_t pkey;
	gnutls_pubkey_t pub;
	gnutls_datum_t pem;
	unsigned char id[32];
	size_t idlen = sizeof(id);
	unsigned char payload[1 << 16];
	unsigned char rnd[4];
	char *b64;
	char path[4096];
	size_t plen, i, blen;
	int ret;

	if ((ret = gnutls_x509_privkey_init(&xkey)) < 0)
		die_tls("privkey_init", ret);
	ret = gnutls_x509_privkey_generate(xkey, GNUTLS_PK_EDDSA_ED25519,
	    256, 0);
	if (ret < 0)
		die_tls("generate Ed25519 key", ret);

	ret = gnutls_x509_privkey_export2_pkcs8(xkey, GNUTLS_X509_FMT_PEM,
	    NULL, GNUTLS_PKCS_PLAIN, &pem);
	if (ret < 0)
		die_tls("export private key", ret);
	join_path(path, sizeof(path), dir, "tls-privkey.pem");
	write_file(path, pem.data, pem.size, 0600);
	gnutls_free(pem.data);

	if ((ret = gnutls_privkey_init(&pkey)) < 0)
		die_tls("privkey_init", ret);
	ret = gnutls_privkey_import_x509(pkey, xkey,
	    GNUTLS_PRIVKEY_IMPORT_AUTO_RELEASE);
	if (ret < 0)
		die_tls("privkey_import_x509", ret);
	if ((ret = gnutls_pubkey_init(&pub)) < 0)
		die_tls("pubkey_init", ret);
	if ((ret = gnutls_pubkey_import_privkey(pub, pkey, 0, 0)) < 0)
		die_tls("pubkey_import_privkey", ret);
	if ((ret = gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_PEM, &pem)) < 0)
		die_tls("export public key", ret);
	join_path(path, sizeof(path), dir, "tls-pubkey.pem");
	write_file(path, pem.data, pem.size, 0644);
	gnutls_free(pem.data);

	ret = gnutls_pubkey_get_key_id(pub, GNUTLS_KEYID_USE_SHA256, id,
	    &idlen);
	if (ret < 0 || idlen != sizeof(id))
		die_tls("pubkey_get_key_id", ret < 0 ? ret : GNUTLS_E_INTERNAL_ERROR);
	gnutls_pubkey_deinit(pub);
	gnutls_privkey_deinit(pkey);

	/* Payload of random length in [min, max] and random content. */
	if ((ret = gnutls_rnd(GNUTLS_RND_NONCE, rnd, sizeof(rnd))) < 0)
		die_tls("rnd", ret);
	plen = (size_t)o->min_bytes + ((size_t)rnd[0] << 24 |
	    (size_t)rnd[1] << 16 | (size_t)rnd[2] << 8 | rnd[3]) %
	    (size_t)(o->max_bytes - o->min_bytes + 1);
	if (plen > sizeof(payload))
		plen = sizeof(payload);
	if ((ret = gnutls_rnd(GNUTLS_RND_NONCE, payload, plen)) < 0)
		die_tls("rnd", ret);
	join_path(path, sizeof(path), dir, "expected.bin");
	write_file(path, payload, plen, 0600);

	b64 = malloc(plen / 3 * 4 + 8);
	if (b64 == NULL) {
		fprintf(stderr, "mkkeys: out of memory\n");
		exit(1);
	}
	base64(payload, plen, b64);

	/* The section, laid out the way mandos-keygen prints one. */
	fprintf(conf, "\n[bench%06ld]\nhost = localhost\nkey_id = ", idx);
	for (i = 0; i < sizeof(id); i++)
		fprintf(conf, "%02x", id[i]);
	fprintf(conf, "\nfingerprint =\nsecret =\n");
	blen = strlen(b64);
	for (i = 0; i < blen; i += 64)
		fprintf(conf, "    %.64s\n", b64 + i);
	free(b64);
}

/* -------------------------------------------------------------------- main */

int main(int argc, char **argv)
{
	struct opts o;
	char path[4096], dir[4096];
	FILE *conf, *list;
	struct timespec t0, t1;
	long i;
	int ret;

	parse_opts(argc, argv, &o);
	if ((ret = gnutls_global_init()) < 0)
		die_tls("global_init", ret);
	clock_gettime(CLOCK_MONOTONIC, &t0);

	make_dir(o.out);
	join_path(path, sizeof(path), o.out, "keys");
	make_dir(path);

	join_path(path, sizeof(path), o.out, "clients.conf");
	conf = fopen(path, "w");
	if (conf == NULL)
		die_errno("open", path);
	fprintf(conf,
	    "# Generated by t/bench/mkkeys for load tests: %ld clients.\n"
	    "[DEFAULT]\n"
	    "timeout = %s\n"
	    "interval = %s\n"
	    "checker = %s\n",
	    o.count, o.timeout, o.interval, o.checker);

	join_path(path, sizeof(path), o.out, "keydirs.txt");
	list = fopen(path, "w");
	if (list == NULL)
		die_errno("open", path);

	for (i = 0; i < o.count; i++) {
		char name[32];

		snprintf(name, sizeof(name), "keys/%06ld", i);
		join_path(dir, sizeof(dir), o.out, name);
		make_dir(dir);
		make_one(&o, i, dir, conf);
		fprintf(list, "%s\n", dir);
	}
	if (fclose(conf) != 0 || fclose(list) != 0) {
		fprintf(stderr, "mkkeys: write error: %s\n", strerror(errno));
		return 1;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (!o.quiet)
		printf("mkkeys: %ld key sets in %s (%.2f s)\n", o.count, o.out,
		    (double)(t1.tv_sec - t0.tv_sec) +
		    (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	gnutls_global_deinit();
	return 0;
}
