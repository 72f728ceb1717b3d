#!/usr/bin/env bats
# Process behaviour: daemon mode and its PID file, privileges, systemd
# readiness, socket activation, install/uninstall.

load lib

PIDFILE=/run/mandos.pid

setup() {
	CONF=$(make_confdir)
}

teardown() {
	if [[ -n ${DAEMON_PID:-} ]]; then stop_pid "$DAEMON_PID" 5; fi
	stop_our_daemons
	# the server never removes its PID file: put back what was there
	if [[ -n ${PIDFILE_SAVED:-} ]]; then
		rm -f "$PIDFILE"
		if [[ -e $PIDFILE_SAVED ]]; then mv "$PIDFILE_SAVED" "$PIDFILE"; fi
	fi
	mandos_teardown
}

# stop_our_daemons: a daemon run with our $CONF (it forked away, so no
# process group of ours holds it) is stopped, also when the test failed
# before it learned the daemon's PID.
stop_our_daemons() {
	local pid
	[[ -n ${CONF:-} ]] || return 0
	for pid in $(pgrep -f -- "--configdir $CONF "); do
		tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--configdir $CONF " &&
			stop_pid "$pid" 5
	done
	return 0
}

# own_pidfile: the test may write $PIDFILE; a stale one is kept aside.
own_pidfile() {
	if [[ -s $PIDFILE && $(ps -o comm= -p "$(cat "$PIDFILE")") == mandos ]]; then
		skip "$PIDFILE names a running mandos"
	fi
	PIDFILE_SAVED="$BATS_TEST_TMPDIR/pidfile.saved"
	if [[ -e $PIDFILE ]]; then mv "$PIDFILE" "$PIDFILE_SAVED"; fi
}

@test "daemon: bad config is reported on stderr before forking, exit 1" {
	need_server_bin
	printf '[a]\nsecret = aGVsbG8=\ntimeout = soon\n' >"$CONF/clients.conf"
	run "$MANDOS_BIN" --no-zeroconf --no-dbus --configdir "$CONF" \
		--statedir "$BATS_TEST_TMPDIR/state" --address ::1 --port "$(free_port)"
	[[ $status -eq 1 ]]
	[[ $output == *"clients.conf:3:"* ]]
}

@test "daemon: PID file, unprivileged with no supplementary groups, serves, SIGTERM leaves the PID file" {
	need_client
	own_pidfile
	client_section alpha 'daemon pw' 'checker = true' >"$CONF/clients.conf"
	PORT=$(free_port)
	run "$MANDOS_BIN" --no-zeroconf --no-dbus --configdir "$CONF" \
		--statedir "$BATS_TEST_TMPDIR/state" --address ::1 --port "$PORT" 3>&-
	[[ $status -eq 0 ]]
	local i
	for ((i = 0; i < 100; i++)); do [[ -s $PIDFILE ]] && break; sleep 0.05; done
	DAEMON_PID=$(cat "$PIDFILE")
	# one line: the PID and a newline
	[[ $(wc -l <"$PIDFILE") -eq 1 && $DAEMON_PID =~ ^[0-9]+$ ]]
	pid_running "$DAEMON_PID"
	for ((i = 0; i < 100; i++)); do port_listening "$PORT" && break; sleep 0.05; done
	# the process in the PID file is the daemon itself, not the launcher
	[[ $(ps -o comm= -p "$DAEMON_PID") == mandos ]]
	local user
	user=$(ps -o user= -p "$DAEMON_PID")
	[[ $user == _mandos || $user == mandos || $user == nobody ]]
	[[ $(awk '/^Groups:/ { print NF - 1 }' "/proc/$DAEMON_PID/status") -eq 0 ]]
	[[ $(awk '/^Uid:/ { print $2 $3 $4 $5 }' "/proc/$DAEMON_PID/status") != *0* ]] ||
		[[ $(awk '/^Uid:/ { print ($2 == 0 || $3 == 0 || $4 == 0) }' "/proc/$DAEMON_PID/status") -eq 0 ]]
	SERVER_LOG=/dev/null
	client_gets alpha 'daemon pw'
	kill -TERM "$DAEMON_PID"
	for ((i = 0; i < 100; i++)); do pid_running "$DAEMON_PID" || break; sleep 0.05; done
	if pid_running "$DAEMON_PID"; then false; fi
	# like the reference, the server leaves its PID file behind
	[[ $(cat "$PIDFILE") == "$DAEMON_PID" ]]
	DAEMON_PID=
}

@test "daemon: a start refused for a corrupt state file leaves the PID file as it was" {
	need_server_bin
	need_root "writes $PIDFILE"
	own_pidfile
	printf '[a]\nsecret = aGVsbG8=\n' >"$CONF/clients.conf"
	local state=$BATS_TEST_TMPDIR/state
	mkdir -p "$state"
	chown "$(id -un _mandos 2>/dev/null || echo nobody):" "$state"
	: >"$state/clients.state"               # empty: corrupt
	chown --reference="$state" "$state/clients.state"
	echo 4242 >"$PIDFILE"
	run timeout 15 "$MANDOS_BIN" --no-zeroconf --no-dbus --configdir "$CONF" \
		--statedir "$state" --address ::1 --port "$(free_port)"
	echo "$output"
	[[ $status -eq 1 && $output == *--no-restore* ]]
	[[ $(cat "$PIDFILE") == 4242 ]]
}

# notify_listener SOCKET PORT OUT: record each datagram; on READY=1 note
# whether the port already accepts connections.
notify_listener() {
	spawn "$PYTHON" - "$1" "$2" "$3" <<-'EOF'
	import os, socket, sys, time
	path, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
	s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
	s.bind(path)
	os.chmod(path, 0o777)
	s.settimeout(60)
	with open(out, "a", buffering=1) as f:
	    for _ in range(20):
	        try:
	            msg = s.recv(4096).decode()
	        except socket.timeout:
	            break
	        note = ""
	        if "READY=1" in msg:
	            c = socket.socket(socket.AF_INET6)
	            note = " port-open" if c.connect_ex(("::1", port)) == 0 else " port-closed"
	            c.close()
	        f.write(msg.replace("\n", ",") + note + "\n")
	EOF
}

@test "systemd: READY=1 only once the port accepts; RELOADING=1 then READY=1 on SIGHUP; STOPPING=1" {
	need_server_bin
	printf '[a]\nsecret = aGVsbG8=\nchecker = true\n' >"$CONF/clients.conf"
	local sock="$BATS_TEST_TMPDIR/notify.sock" out="$BATS_TEST_TMPDIR/notify.out" i
	PORT=$(free_port)
	notify_listener "$sock" "$PORT" "$out"
	for ((i = 0; i < 100; i++)); do [[ -S $sock ]] && break; sleep 0.05; done
	NOTIFY_SOCKET=$sock start_server "$CONF"
	for ((i = 0; i < 100; i++)); do grep -q READY=1 "$out" 2>/dev/null && break; sleep 0.05; done
	[[ $(sed -n 1p "$out") == "READY=1 port-open" ]]
	kill -HUP "$SERVER_PID"
	for ((i = 0; i < 100; i++)); do [[ $(grep -c READY=1 "$out") -ge 2 ]] && break; sleep 0.05; done
	[[ $(sed -n 2p "$out") == RELOADING=1* ]]
	[[ $(sed -n 3p "$out") == "READY=1 port-open" ]]
	stop_server
	for ((i = 0; i < 100; i++)); do grep -q STOPPING=1 "$out" && break; sleep 0.05; done
	grep -q STOPPING=1 "$out"
}

@test "systemd: --socket uses an inherited listening socket (fd 3)" {
	need_client
	client_section alpha 'socket pw' 'checker = true' >"$CONF/clients.conf"
	local portfile="$BATS_TEST_TMPDIR/port"
	SERVER_LOG="$BATS_TEST_TMPDIR/server.log"
	spawn "$PYTHON" - "$portfile" "$MANDOS_BIN" "$CONF" "$BATS_TEST_TMPDIR/state" <<-'EOF' >"$SERVER_LOG" 2>&1
	import os, socket, sys
	portfile, binary, conf, state = sys.argv[1:5]
	s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
	s.bind(("::1", 0))
	s.listen(16)
	with open(portfile + ".tmp", "w") as f:
	    f.write(str(s.getsockname()[1]))
	os.rename(portfile + ".tmp", portfile)
	os.dup2(s.fileno(), 3)
	os.set_inheritable(3, True)
	os.execv(binary, [binary, "--foreground", "--debug", "--no-zeroconf", "--no-dbus",
	                  "--configdir", conf, "--statedir", state, "--socket", "3"])
	EOF
	SERVER_PID=$BG_PID
	local i
	for ((i = 0; i < 100; i++)); do [[ -s $portfile ]] && break; sleep 0.05; done
	PORT=$(cat "$portfile")
	for ((i = 0; i < 100; i++)); do grep -q "Now listening" "$SERVER_LOG" && break; sleep 0.05; done
	grep -q "port $PORT" "$SERVER_LOG"
	client_gets alpha 'socket pw'
}

@test "install: make install DESTDIR then make uninstall leaves the tree empty" {
	command -v xsltproc >/dev/null || skip "xsltproc not installed"
	[[ -e /usr/share/xml/docbook/stylesheet/docbook-xsl/manpages/docbook.xsl ]] ||
		skip "docbook-xsl not installed"
	local root="$BATS_TEST_TMPDIR/root" src="$BATS_TEST_DIRNAME/.."
	mkdir -p "$root"
	make -s -C "$src" install DESTDIR="$root" PREFIX=/usr SYSCONFDIR=/etc >/dev/null
	[[ -x $root/usr/sbin/mandos ]]
	[[ -s $root/usr/share/man/man8/mandos.8 ]]
	[[ -s $root/usr/share/man/man5/mandos-clients.conf.5 ]]
	[[ -s $root/usr/lib/systemd/system/mandos.service ]]
	[[ -x $root/usr/sbin/mandos-import-pickle ]]
	grep -qx 'ExecStart=/usr/sbin/mandos --foreground $DAEMON_ARGS' \
		"$root/usr/lib/systemd/system/mandos.service"
	# dbus-daemon reads /usr/share/dbus-1/system.d (the distribution's)
	[[ -s $root/usr/share/dbus-1/system.d/mandos.conf ]]
	[[ $(stat -c %a "$root/etc/mandos/clients.conf") == 600 ]]
	# an existing clients.conf is never overwritten
	echo '# mine' >>"$root/etc/mandos/clients.conf"
	make -s -C "$src" install DESTDIR="$root" PREFIX=/usr SYSCONFDIR=/etc >/dev/null
	grep -q '# mine' "$root/etc/mandos/clients.conf"
	rm "$root/etc/mandos/clients.conf"
	make -s -C "$src" uninstall DESTDIR="$root" PREFIX=/usr SYSCONFDIR=/etc >/dev/null
	run find "$root" -mindepth 1
	[[ -z $output ]]
}

@test "install: PREFIX=/usr/local installs a unit that starts the installed binary" {
	[[ -e /usr/share/xml/docbook/stylesheet/docbook-xsl/manpages/docbook.xsl ]] ||
		missing "docbook-xsl not installed"
	local root="$BATS_TEST_TMPDIR/root" src="$BATS_TEST_DIRNAME/.." unit
	mkdir -p "$root"
	make -s -C "$src" install DESTDIR="$root" PREFIX=/usr/local >/dev/null
	unit=$root/usr/local/lib/systemd/system/mandos.service
	grep -qx 'ExecStart=/usr/local/sbin/mandos --foreground $DAEMON_ARGS' "$unit"
	grep -qx 'ExecStartPre=/usr/local/sbin/mandos-import-pickle' "$unit"
	[[ -x $root/usr/local/sbin/mandos && -x $root/usr/local/sbin/mandos-import-pickle ]]
	# not /usr/local/share/dbus-1, where dbus-daemon does not look
	[[ -s $root/etc/dbus-1/system.d/mandos.conf ]]
	run find "$root/usr/local/share" -path '*dbus*'
	[[ -z $output ]]
	rm "$root/etc/mandos/clients.conf" "$root/etc/mandos/mandos.conf"
	make -s -C "$src" uninstall DESTDIR="$root" PREFIX=/usr/local >/dev/null
	run find "$root" -mindepth 1
	echo "$output"
	[[ -z $output ]]
}

@test "build: the first make on a fresh machine installs the libraries, then picks the back ends" {
	local d="$BATS_TEST_TMPDIR/fresh" bin="$BATS_TEST_TMPDIR/bin"
	mkdir -p "$d/t" "$bin"
	cp "$BATS_TEST_DIRNAME/../Makefile" "$BATS_TEST_DIRNAME/../mandos.c" "$d/"
	# a machine without the Avahi and systemd libraries until t/deps.sh runs
	printf '#!/bin/sh\ntouch "%s/libs-installed"\n' "$d" >"$d/t/deps.sh"
	cat >"$bin/pkg-config" <<-EOF
	#!/bin/sh
	case "\$*" in *avahi*|*libsystemd*) [ -e "$d/libs-installed" ] || exit 1 ;; esac
	exec /usr/bin/pkg-config "\$@"
	EOF
	chmod +x "$d/t/deps.sh" "$bin/pkg-config"
	run env PATH="$bin:$PATH" make -C "$d" mandos
	echo "$output"
	[[ $status -eq 0 ]]
	[[ $output == *"built ./mandos: Zeroconf avahi, D-Bus on"* ]]
}

@test "install: the unit passes systemd-analyze verify (when available)" {
	command -v systemd-analyze >/dev/null || skip "systemd-analyze not installed"
	local d="$BATS_TEST_TMPDIR/unit"
	mkdir -p "$d"
	sed -e "s|/usr/sbin/mandos-import-pickle|$(readlink -f "$BATS_TEST_DIRNAME/../etc")/mandos-import-pickle|" \
		-e "s|/usr/sbin/mandos |$(readlink -f "$MANDOS_BIN") |" \
		"$BATS_TEST_DIRNAME/../etc/mandos.service" >"$d/mandos.service"
	run systemd-analyze verify "$d/mandos.service"
	echo "$output"
	[[ $status -eq 0 ]]
}
