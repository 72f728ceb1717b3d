# mandos.c - build, test, install.  See README.md.
#   make                      build ./mandos (Zeroconf back end detected)
#   make ZEROCONF=avahi|dnssd|none
#   make DBUS=1|0             D-Bus control API (default: 1 if libsystemd is found)
#   make check [SANITIZE=1]   self-tests and the Bats suite (also runs what follows)
#   make mandos-portable      a build that pretends the Linux extras are missing
#   make compilers            gcc, clang and tcc builds, a syntax check against musl
#   make mutate               break mandos.c on purpose (t/mutations); the tests must notice
#   make demo                 run the server on an example set-up
#   make man | install | uninstall | bench | fuzz | clean

CC ?= cc
CFLAGS ?= -O2 -g
WARNINGS = -std=c99 -Wall -Wextra -Wpedantic -Wundef -Wimplicit-fallthrough
PREFIX ?= /usr/local
DESTDIR ?=
SBINDIR = $(PREFIX)/sbin
MANDIR = $(PREFIX)/share/man
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
# dbus-daemon reads policies from /usr/share and /etc only: /usr/share is
# the distribution's, so any other PREFIX puts it in /etc.
DBUSPOLICYDIR ?= $(if $(filter /usr,$(PREFIX)),/usr/share,$(SYSCONFDIR))/dbus-1/system.d

# A fresh machine: t/deps.sh installs the libraries before the back ends
# are detected below, since make reads this file again after remaking an
# included file.  (Not for clean and uninstall, which need nothing.)
ifneq ($(filter-out clean uninstall,$(or $(MAKECMDGOALS),all)),)
-include .deps-installed
endif
.deps-installed: t/deps.sh
	@t/deps.sh build && touch $@

# Zeroconf: avahi when pkg-config finds avahi-client, else none.
ZEROCONF ?= $(shell pkg-config --exists avahi-client 2>/dev/null && echo avahi || echo none)
ifeq ($(ZEROCONF),avahi)
ZC_CFLAGS = -DHAVE_AVAHI=1 -DHAVE_DNS_SD=0 $(shell pkg-config --cflags avahi-client)
ZC_LIBS = $(shell pkg-config --libs avahi-client)
else ifeq ($(ZEROCONF),dnssd)
ZC_CFLAGS = -DHAVE_AVAHI=0 -DHAVE_DNS_SD=1 $(shell pkg-config --cflags avahi-compat-libdns_sd 2>/dev/null)
ZC_LIBS = $(shell pkg-config --libs avahi-compat-libdns_sd 2>/dev/null || echo -ldns_sd)
else ifeq ($(ZEROCONF),none)
ZC_CFLAGS = -DHAVE_AVAHI=0 -DHAVE_DNS_SD=0
ZC_LIBS =
else
$(error ZEROCONF must be avahi, dnssd or none)
endif

ifeq ($(SANITIZE),1)
CFLAGS += -O1 -fno-omit-frame-pointer -fsanitize=address,undefined
LDFLAGS += -fsanitize=address,undefined
endif

TLS_CFLAGS = $(shell pkg-config --cflags gnutls)
TLS_LIBS = $(shell pkg-config --libs gnutls)

# D-Bus (what mandos-ctl and mandos-monitor talk to): sd-bus from libsystemd
# 240 or later, on when pkg-config finds it.  DBUS=0 builds without.
DBUS ?= $(shell pkg-config --atleast-version=240 libsystemd 2>/dev/null && echo 1 || echo 0)
ifeq ($(DBUS),1)
DBUS_CFLAGS = -DHAVE_DBUS=1 $(shell pkg-config --cflags libsystemd)
DBUS_LIBS = $(shell pkg-config --libs libsystemd)
else ifeq ($(DBUS),0)
DBUS_CFLAGS = -DHAVE_DBUS=0
DBUS_LIBS =
else
$(error DBUS must be 1 or 0)
endif

all: mandos

# .build-config remembers how ./mandos was built (back end, compiler,
# flags, SANITIZE), so that changing any of them rebuilds it instead of
# saying "up to date".
BUILD_CONFIG = ZEROCONF=$(ZEROCONF) DBUS=$(DBUS) CC=$(CC) CFLAGS=$(CFLAGS) LDFLAGS=$(LDFLAGS)
mandos: mandos.c Makefile .build-config
	@t/deps.sh build
	$(CC) $(WARNINGS) $(CFLAGS) $(TLS_CFLAGS) $(ZC_CFLAGS) $(DBUS_CFLAGS) -o $@ mandos.c $(LDFLAGS) $(TLS_LIBS) $(ZC_LIBS) $(DBUS_LIBS)
	@echo "built ./mandos: Zeroconf $(ZEROCONF), D-Bus $(if $(filter 1,$(DBUS)),on,off)"

.build-config: FORCE
	@echo '$(BUILD_CONFIG)' | cmp -s - $@ || echo '$(BUILD_CONFIG)' > $@

# Builds of the other back ends, for the Zeroconf tests.
mandos-dnssd: mandos.c Makefile .build-config
	$(MAKE) --no-print-directory ZEROCONF=dnssd mandos-variant VARIANT=$@
mandos-none: mandos.c Makefile .build-config
	$(MAKE) --no-print-directory ZEROCONF=none mandos-variant VARIANT=$@
# VARIANT_SRC: t/mutate.sh builds changed copies of mandos.c this way.
VARIANT_SRC ?= mandos.c
mandos-variant:
	$(CC) $(WARNINGS) $(CFLAGS) $(TLS_CFLAGS) $(ZC_CFLAGS) $(DBUS_CFLAGS) -o $(VARIANT) $(VARIANT_SRC) $(LDFLAGS) $(TLS_LIBS) $(ZC_LIBS) $(DBUS_LIBS)

# Without D-Bus, for the test that this build still serves.
mandos-nodbus: mandos.c Makefile .build-config
	$(MAKE) --no-print-directory DBUS=0 mandos-variant VARIANT=$@

# mandos-portable: MANDOS_PORTABLE (read only in section 1 of mandos.c)
# hides SO_BINDTODEVICE and close_range, so that their fallbacks are
# compiled and tested here.
mandos-portable: mandos.c Makefile .build-config
	$(CC) $(WARNINGS) $(CFLAGS) -DMANDOS_PORTABLE=1 $(TLS_CFLAGS) $(ZC_CFLAGS) $(DBUS_CFLAGS) \
	    -o $@ mandos.c $(LDFLAGS) $(TLS_LIBS) $(ZC_LIBS) $(DBUS_LIBS)
PORTABLE_BATS = t/portable.bats t/cli.bats t/interop.bats t/lifecycle.bats t/hostile.bats

# More than one compiler: gcc, clang and tcc with warnings as errors (tcc
# knows only -Wall and -Wunsupported), each build's --check counted by
# make check; then mandos.c against musl's headers, syntax only, with a
# copy of GnuTLS's headers alone beside them (no glibc header can leak
# in; Zeroconf and D-Bus off, their headers are not in musl's path).
COMPILER_BINS = .compilers/mandos-gcc .compilers/mandos-clang .compilers/mandos-tcc
COMPILER_LINK = $(TLS_CFLAGS) $(ZC_CFLAGS) $(DBUS_CFLAGS) mandos.c $(TLS_LIBS) $(ZC_LIBS) $(DBUS_LIBS)
compilers: $(COMPILER_BINS) .compilers/musl-syntax
	@for b in $(COMPILER_BINS); do \
	    out=$$($$b --check) || { echo "$$out"; exit 1; }; echo "$$out" | sed -n "\$$s|^|$$b: |p"; \
	done
.compilers/mandos-gcc .compilers/mandos-clang: mandos.c Makefile
	@t/deps.sh test
	@mkdir -p .compilers
	$(@:.compilers/mandos-%=%) $(WARNINGS) -Werror -O2 -o $@ $(COMPILER_LINK)
# Never "-o /dev/null" here: tcc run as root replaces /dev/null with a
# regular file, which breaks every later test on the machine.
.compilers/mandos-tcc: mandos.c Makefile
	@t/deps.sh test
	@mkdir -p .compilers
	tcc -std=c99 -Wall -Wunsupported -Werror -O2 -o $@ $(COMPILER_LINK)
	tcc -std=c99 -Wall -Wunsupported -Werror -DMANDOS_PORTABLE=1 -c -o .compilers/portable-tcc.o $(TLS_CFLAGS) $(ZC_CFLAGS) $(DBUS_CFLAGS) mandos.c
.compilers/musl-syntax: mandos.c Makefile
	@t/deps.sh test
	@mkdir -p .compilers
	rm -rf .compilers/musl-include && mkdir .compilers/musl-include
	cp -r $$(pkg-config --variable=includedir gnutls)/gnutls .compilers/musl-include/
	for p in 0 1; do \
	    musl-gcc -fsyntax-only $(WARNINGS) -Werror -I.compilers/musl-include -DMANDOS_PORTABLE=$$p \
	        -DHAVE_AVAHI=0 -DHAVE_DNS_SD=0 -DHAVE_DBUS=0 mandos.c || exit 1; \
	done
	touch $@

# The tests are linted first (t/lint.sh); the self-tests of every build
# count; the Zeroconf tests skip the other back ends unless told where they are.
check: mandos mandos-dnssd mandos-none mandos-nodbus mandos-portable compilers
	@t/deps.sh test
	@t/lint.sh
	@t/mutate.sh --verify
	MANDOS_DNSSD_BIN=$${MANDOS_DNSSD_BIN:-$(CURDIR)/mandos-dnssd} \
	MANDOS_NONE_BIN=$${MANDOS_NONE_BIN:-$(CURDIR)/mandos-none} SANITIZE=$(SANITIZE) \
	MANDOS_CHECK_BINS="$(CURDIR)/mandos-dnssd $(CURDIR)/mandos-none $(CURDIR)/mandos-nodbus \
	    $(COMPILER_BINS:%=$(CURDIR)/%)" \
	MANDOS_PORTABLE_BIN=$(CURDIR)/mandos-portable PORTABLE_BATS_FILES="$(PORTABLE_BATS)" \
	t/run-tests.sh

# Not part of check: each mutation rebuilds and reruns tests (t/mutate.sh).
mutate:
	@t/deps.sh test
	t/mutate.sh

demo: mandos
	@t/deps.sh test
	t/demo.sh

man: mandos.8 mandos.conf.5 mandos-clients.conf.5

DOCBOOK_XSL ?= /usr/share/xml/docbook/stylesheet/docbook-xsl/manpages/docbook.xsl
mandos.8: mandos.8.xml
	xsltproc --nonet --output $@ $(DOCBOOK_XSL) $<
mandos.conf.5: mandos.conf.5.xml
	xsltproc --nonet --output $@ $(DOCBOOK_XSL) $<
mandos-clients.conf.5: clients.conf.5.xml
	xsltproc --nonet --output $@ $(DOCBOOK_XSL) $<

# Over the Debian package's own /usr/sbin/mandos only once it is diverted
# (mandos(8), MIGRATION): dpkg would put its file back at the next upgrade.
install: mandos man
	@if [ -z "$(DESTDIR)" ] && dpkg -S $(SBINDIR)/mandos >/dev/null 2>&1 \
	    && ! dpkg-divert --list $(SBINDIR)/mandos | grep -q .; then \
	    echo "make install: $(SBINDIR)/mandos belongs to a Debian package; install with" \
	         "PREFIX=/usr/local, or first: dpkg-divert --rename $(SBINDIR)/mandos" >&2; exit 1; fi
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man8 $(DESTDIR)$(MANDIR)/man5
	install -m 0755 mandos $(DESTDIR)$(SBINDIR)/mandos
	install -m 0755 etc/mandos-import-pickle $(DESTDIR)$(SBINDIR)/mandos-import-pickle
	install -m 0644 mandos.8 $(DESTDIR)$(MANDIR)/man8/mandos.8
	install -m 0644 mandos.conf.5 mandos-clients.conf.5 $(DESTDIR)$(MANDIR)/man5/
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(SYSCONFDIR)/mandos
	# the installed binaries; BusName= only where D-Bus is built in
	sed -e 's|/usr/sbin/mandos|$(SBINDIR)/mandos|' \
	    $(if $(filter 1,$(DBUS)),-e 's/^Type=notify$$/Type=notify\nBusName=se.recompile.Mandos/') \
	    etc/mandos.service > $(DESTDIR)$(UNITDIR)/mandos.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/mandos.service
	$(if $(filter 1,$(DBUS)),install -d $(DESTDIR)$(DBUSPOLICYDIR) && install -m 0644 etc/mandos-dbus.conf $(DESTDIR)$(DBUSPOLICYDIR)/mandos.conf)
	install -m 0644 etc/sysusers-mandos.conf $(DESTDIR)$(SYSUSERSDIR)/mandos.conf
	[ -e $(DESTDIR)$(SYSCONFDIR)/mandos/mandos.conf ] || install -m 0644 etc/mandos.conf $(DESTDIR)$(SYSCONFDIR)/mandos/mandos.conf
	[ -e $(DESTDIR)$(SYSCONFDIR)/mandos/clients.conf ] || install -m 0600 etc/clients.conf $(DESTDIR)$(SYSCONFDIR)/mandos/clients.conf

uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/mandos $(DESTDIR)$(SBINDIR)/mandos-import-pickle
	rm -f $(DESTDIR)$(MANDIR)/man8/mandos.8
	rm -f $(DESTDIR)$(MANDIR)/man5/mandos.conf.5 $(DESTDIR)$(MANDIR)/man5/mandos-clients.conf.5
	rm -f $(DESTDIR)$(UNITDIR)/mandos.service $(DESTDIR)$(SYSUSERSDIR)/mandos.conf
	rm -f $(DESTDIR)$(DBUSPOLICYDIR)/mandos.conf
	# the example configs go only if nobody edited them
	if cmp -s etc/mandos.conf $(DESTDIR)$(SYSCONFDIR)/mandos/mandos.conf; then rm -f $(DESTDIR)$(SYSCONFDIR)/mandos/mandos.conf; fi
	if cmp -s etc/clients.conf $(DESTDIR)$(SYSCONFDIR)/mandos/clients.conf; then rm -f $(DESTDIR)$(SYSCONFDIR)/mandos/clients.conf; fi
	-rmdir $(DESTDIR)$(SYSCONFDIR)/mandos 2>/dev/null
	# under a DESTDIR, also remove the directories install made, if empty
	if [ -n "$(DESTDIR)" ]; then \
	    for d in $(SBINDIR) $(MANDIR)/man8 $(MANDIR)/man5 $(UNITDIR) $(SYSUSERSDIR) $(DBUSPOLICYDIR) $(SYSCONFDIR); do \
	        d="$(DESTDIR)$$d"; \
	        while [ "$$d" != "$(DESTDIR)" ] && [ "$$d" != / ] && rmdir "$$d" 2>/dev/null; do d=$$(dirname "$$d"); done; \
	    done; \
	fi

# Fuzzing (clang's libFuzzer): one binary per parser, built from mandos.c
# itself by t/fuzz/fuzz.c; each runs FUZZ_SECONDS from its seed corpus.
FUZZ_TARGETS = ini duration base64 version state
FUZZ_SECONDS ?= 60
FUZZ_CC ?= clang
FUZZ_CFLAGS = -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
	-fno-sanitize-recover=undefined -DHAVE_AVAHI=0 -DHAVE_DNS_SD=0
FUZZ_BINS = $(FUZZ_TARGETS:%=t/fuzz/fuzz-%)

t/fuzz/fuzz-%: t/fuzz/fuzz.c mandos.c
	$(FUZZ_CC) $(WARNINGS) $(FUZZ_CFLAGS) -DFUZZ_TARGET=FUZZ_$$(echo $* | tr a-z A-Z) \
	    $(TLS_CFLAGS) -o $@ t/fuzz/fuzz.c $(TLS_LIBS)

fuzz: $(FUZZ_BINS)
	FUZZ_SECONDS=$(FUZZ_SECONDS) t/fuzz/run.sh $(FUZZ_TARGETS)

# CI's short run: 30 s per target.
fuzz-smoke: $(FUZZ_BINS)
	FUZZ_SECONDS=30 t/fuzz/run.sh $(FUZZ_TARGETS)

# Differential test against the reference server /usr/sbin/mandos: N
# generated configurations from SEED (t/difftest/, t/differences).
N ?= 100
SEED ?= 1
difftest: mandos
	@t/deps.sh test
	t/difftest/driver.py random $(N) $(SEED)
.PHONY: difftest

# Side by side with the reference server; prints a table (t/bench/run.sh).
bench: mandos
	$(MAKE) -C t/bench all
	t/bench/run.sh

clean:
	-$(MAKE) -C t/bench clean
	rm -f mandos mandos-dnssd mandos-none mandos-nodbus mandos-portable .build-config .deps-installed .zeroconf mandos.8 mandos.conf.5 mandos-clients.conf.5
	rm -f $(FUZZ_BINS)
	rm -rf .compilers

.PHONY: all check compilers mutate demo man install uninstall clean mandos-variant fuzz fuzz-smoke bench FORCE
