# t/lib.bash: shared helpers for the mandos.c Bats tests.
#
# Every .bats file does `load lib`.  The helpers start the server under test
# on [::1]:PORT, make key sets with mandos-keygen (cached across runs), drive
# the real mandos-client, and play hostile peers with small Python snippets.
# Everything started in the background here is started with spawn, in a
# process group of its own, and stopped with its whole group by the default
# teardown (mandos_teardown), as are the network namespaces given to
# track_netns; every wait is bounded.
#
# Works with ./mandos (default) or, for cross-checking, with the reference
# server: MANDOS_BIN=/usr/sbin/mandos bats t/.  The reference needs a system
# D-Bus even with --no-dbus, so a private dbus-daemon is started for it.

# `run !` and `run --separate-stderr` need bats 1.5
bats_require_minimum_version 1.5.0

MANDOS_BIN=${MANDOS_BIN:-"$BATS_TEST_DIRNAME/../mandos"}
REAL_CLIENT=${REAL_CLIENT:-$("${BASH_SOURCE[0]%/*}/real-client-path.sh")}
MANDOS_TEST_CACHE=${MANDOS_TEST_CACHE:-/tmp/mandos-c-test-cache}
if [[ -x /usr/bin/python3 ]]; then PYTHON=${PYTHON:-/usr/bin/python3}; else PYTHON=${PYTHON:-python3}; fi

SERVER_PID=
SERVER_LOG=
DBUS_PID=
MANDOS_BG_PIDS=()
MANDOS_BG_PGIDS=()
MANDOS_NETNS=()

# ---------------------------------------------------------------- skips

# missing REASON: skip this test, but fail it in CI (CI=true): there a
# missing tool or privilege is a broken machine, not a reason to test less.
missing() {
	if [[ ${CI:-} == true ]]; then
		echo "CI=true: a test that cannot run fails: $1" >&2
		return 1
	fi
	skip "$1"
}

need_root() {
	[[ $(id -u) -eq 0 ]] || missing "needs root: ${1:-runs the real mandos-client}"
}

need_client() {
	need_root "the real mandos-client needs root"
	[[ -x $REAL_CLIENT ]] || missing "real client not installed: $REAL_CLIENT"
	command -v mandos-keygen >/dev/null || missing "mandos-keygen not installed"
}

# True when MANDOS_BIN is the Python reference server (a script), not ours.
is_reference() {
	local first
	first=$(head -c 2 "$MANDOS_BIN" 2>/dev/null) || return 1
	[[ $first == '#!' ]]
}

# Skip a test of our own decided interface when running the reference.
need_ours() {
	if is_reference; then skip "reference server differs: ${1:-mandos.c interface}"; fi
}

need_server_bin() {
	[[ -x $MANDOS_BIN ]] || missing "server binary not built: $MANDOS_BIN"
}

# ---------------------------------------------------------------- keys

# keys_for NAME: echo a directory holding a key set for NAME, creating it once
# (cached across test files and runs; flock guards concurrent creation).
keys_for() {
	local name=$1 base="$MANDOS_TEST_CACHE/keys" dir tmp
	dir="$base/$name"
	if [[ ! -e $dir/.done ]]; then
		mkdir -p "$base" || return 1
		(
			flock -w 120 9 || { echo "keys_for: lock timeout" >&2; exit 1; }
			if [[ ! -e $dir/.done ]]; then
				tmp=$(mktemp -d "$base/.new-$name.XXXXXX") || exit 1
				if ! mandos-keygen --dir "$tmp" --name "$name" --force >"$tmp/.keygen.log" 2>&1 </dev/null; then
					cat "$tmp/.keygen.log" >&2
					rm -rf "$tmp"
					exit 1
				fi
				touch "$tmp/.done"
				rm -rf "$dir"
				mv "$tmp" "$dir"
			fi
		) 9>"$base/.lock" || return 1
	fi
	echo "$dir"
}

# client_section NAME PASSWORD [LINE...]: print a clients.conf section for the
# key set NAME whose secret decrypts to PASSWORD (bytes as given, no newline
# added), then the extra "key = value" LINEs.
client_section() {
	local name=$1 password=$2 dir passfile
	shift 2
	dir=$(keys_for "$name") || return 1
	passfile=$(mktemp "${BATS_TEST_TMPDIR:-/tmp}/pass.XXXXXX") || return 1
	printf '%s' "$password" >"$passfile"
	if ! mandos-keygen --password --passfile "$passfile" --dir "$dir" --name "$name" --no-ssh </dev/null; then
		rm -f "$passfile"
		return 1
	fi
	rm -f "$passfile"
	local line
	for line in "$@"; do printf '%s\n' "$line"; done
}

# make_confdir [DIR]: create (default "$BATS_TEST_TMPDIR/conf") an empty
# config directory with an empty clients.conf; echo it.
make_confdir() {
	local d=${1:-"$BATS_TEST_TMPDIR/conf"}
	mkdir -p "$d" && : >>"$d/clients.conf" && chmod 755 "$d" && echo "$d"
}

# ---------------------------------------------------------------- ports

# free_port: print a TCP port that is currently free on ::1.
free_port() {
	"$PYTHON" -c '
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.bind(("::1", 0))
print(s.getsockname()[1])
s.close()'
}

# port_listening PORT: true if something listens on ::1 (or ::) port PORT.
port_listening() {
	local out
	out=$(ss -Hltn "sport = :$1" 2>/dev/null) || return 1
	[[ -n $out ]]
}

# ---------------------------------------------------------------- D-Bus

# start_private_dbus: a private "system" bus for the reference server; sets
# and exports DBUS_SYSTEM_BUS_ADDRESS.  The directory is world-readable since
# the reference drops privileges before it connects.
start_private_dbus() {
	local d i
	d=$(mktemp -d /tmp/mandos-test-dbus.XXXXXX) || return 1
	chmod 755 "$d"
	cat >"$d/bus.conf" <<-EOF
	<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
	 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
	<busconfig>
	  <type>system</type>
	  <listen>unix:path=$d/bus</listen>
	  <auth>EXTERNAL</auth>
	  <policy context="default">
	    <allow user="*"/>
	    <allow own="*"/>
	    <allow send_destination="*"/>
	    <allow receive_sender="*"/>
	  </policy>
	</busconfig>
	EOF
	spawn dbus-daemon --config-file="$d/bus.conf" --nofork --nopidfile \
		>"$d/dbus.log" 2>&1 </dev/null
	DBUS_PID=$BG_PID
	DBUS_DIR=$d
	for ((i = 0; i < 200; i++)); do
		[[ -S $d/bus ]] && break
		pid_running "$DBUS_PID" || break
		sleep 0.05
	done
	if [[ ! -S $d/bus ]]; then
		echo "private dbus-daemon did not start:" >&2
		cat "$d/dbus.log" >&2
		return 1
	fi
	chmod 777 "$d/bus" 2>/dev/null
	export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$d/bus"
}

stop_private_dbus() {
	if [[ -n $DBUS_PID ]]; then
		stop_pid "$DBUS_PID"
		DBUS_PID=
	fi
	if [[ -n ${DBUS_DIR:-} && -d $DBUS_DIR ]]; then rm -rf "$DBUS_DIR"; fi
	DBUS_DIR=
}

# ---------------------------------------------------------------- processes

# pid_running PID: the process exists and is not a zombie (kill -0 alone
# also succeeds on an exited child that has not been reaped yet).
pid_running() {
	local stat
	[[ -n $1 ]] || return 1
	stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
	stat=${stat##*) }
	[[ ${stat%% *} != Z ]]
}

# stop_pid PID [SECONDS]: SIGTERM, wait (bounded), SIGKILL; reap if our
# child, leaving its exit status in STOP_STATUS (127 if not our child).
stop_pid() {
	local pid=$1 secs=${2:-10} i
	[[ -n $pid ]] || return 0
	STOP_STATUS=0
	kill -TERM "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || STOP_STATUS=$?; return 0; }
	for ((i = 0; i < secs * 20; i++)); do
		pid_running "$pid" || break
		sleep 0.05
	done
	if pid_running "$pid"; then
		echo "# pid $pid ignored SIGTERM for ${secs}s, sending SIGKILL" >&2
		kill -KILL "$pid" 2>/dev/null
	fi
	STOP_STATUS=0
	wait "$pid" 2>/dev/null || STOP_STATUS=$?
	return 0
}

# track_pid PID: have mandos_teardown stop this background process.
track_pid() {
	MANDOS_BG_PIDS+=("$1")
}

# track_netns NAME: have mandos_teardown delete this network namespace.
track_netns() {
	MANDOS_NETNS+=("$1")
}

# spawn CMD...: start CMD (a program or a shell function) in the background
# in a process group of its own, so that mandos_teardown stops it together
# with everything it started, also when the test fails half-way.  BG_PID is
# its PID and the group's ID.  Redirections given to spawn apply to CMD.
spawn() {
	set -m
	"$@" 3>&- &
	BG_PID=$!
	set +m
	MANDOS_BG_PGIDS+=("$BG_PID")
}

# group_alive PGID: some process of the group runs (zombies do not count).
group_alive() {
	local p
	for p in $(pgrep -g "$1"); do
		pid_running "$p" && return 0
	done
	return 1
}

# stop_group PGID [SECONDS]: SIGTERM the whole group, wait (bounded),
# SIGKILL what is left; reap the leader if it is our child.
stop_group() {
	local pg=$1 secs=${2:-5} i
	[[ -n $pg ]] || return 0
	if kill -TERM -- "-$pg" 2>/dev/null; then
		for ((i = 0; i < secs * 20; i++)); do
			group_alive "$pg" || break
			sleep 0.05
		done
		if group_alive "$pg"; then
			echo "# process group $pg ignored SIGTERM for ${secs}s, sending SIGKILL" >&2
			kill -KILL -- "-$pg" 2>/dev/null
		fi
	fi
	wait "$pg" 2>/dev/null || true
}

# ---------------------------------------------------------------- server

# start_server CONFDIR [ARG...]: start the server in the foreground with
# --debug on [::1]:$PORT (PORT chosen by free_port unless set), log in
# $BATS_TEST_TMPDIR/server.log ($SERVER_LOG), PID in $SERVER_PID; return once
# the port listens (at most ~10 s), fail with the log if the server dies.
start_server() {
	local confdir=$1 i state="$BATS_TEST_TMPDIR/state"
	shift
	need_server_bin
	[[ -n ${PORT:-} ]] || PORT=$(free_port) || return 1
	if is_reference; then
		# The reference drops privileges before it touches the state
		# directory and the bus; the Bats temp tree is private (0700).
		[[ -n ${REF_STATE_DIR:-} ]] || REF_STATE_DIR=$(mktemp -d /tmp/mandos-test-state.XXXXXX) || return 1
		chmod 777 "$REF_STATE_DIR"
		state=$REF_STATE_DIR
		[[ -n $DBUS_PID ]] || start_private_dbus || return 1
	fi
	# ours creates the state directory itself and gives it to the user it
	# runs as; a directory made here would belong to root
	is_reference && mkdir -p "$state"
	SERVER_LOG="$BATS_TEST_TMPDIR/server.log"
	# SERVER_NO_DEBUG=1: log to syslog only (--debuglevel is a no-op stand-in)
	local debug=--debug
	[[ -z ${SERVER_NO_DEBUG:-} ]] || debug=--debuglevel=WARNING
	spawn "$MANDOS_BIN" --foreground "$debug" --no-zeroconf --no-dbus \
		--configdir "$confdir" --statedir "$state" \
		--address ::1 --port "$PORT" "$@" \
		>"$SERVER_LOG" 2>&1 </dev/null
	SERVER_PID=$BG_PID
	for ((i = 0; i < 200; i++)); do
		if ! pid_running "$SERVER_PID"; then
			local st=0
			wait "$SERVER_PID" || st=$?
			echo "server exited with status $st before listening; log tail:" >&2
			tail -n 60 "$SERVER_LOG" >&2
			SERVER_PID=
			return 1
		fi
		port_listening "$PORT" && return 0
		sleep 0.05
	done
	echo "server did not listen on port $PORT within 10 s; log tail:" >&2
	tail -n 60 "$SERVER_LOG" >&2
	return 1
}

# stop_server: SIGTERM the server (SIGKILL after 10 s); its exit status is
# left in SERVER_STATUS (0 = orderly, 143/137 = killed by the signal).
stop_server() {
	if [[ -n $SERVER_PID ]]; then
		stop_pid "$SERVER_PID" 10
		# shellcheck disable=SC2034  # read by the tests
		SERVER_STATUS=$STOP_STATUS
		SERVER_PID=
	fi
}

# server_alive: the server process still exists (not a zombie we reaped).
server_alive() {
	pid_running "$SERVER_PID"
}

# wait_for_log TEXT [SECONDS]: until the server log contains TEXT.
wait_for_log() {
	local i
	for ((i = 0; i < ${2:-15} * 20; i++)); do
		grep -qF -- "$1" "$SERVER_LOG" && return 0
		sleep 0.05
	done
	echo "not in the server log within ${2:-15}s: $1" >&2
	tail -n 30 "$SERVER_LOG" >&2
	return 1
}

# assert_server_alive: fail with the log tail when the server is gone.
assert_server_alive() {
	if ! server_alive; then
		echo "server (pid ${SERVER_PID:-none}) is not running; log tail:" >&2
		tail -n 40 "$SERVER_LOG" >&2
		return 1
	fi
}

# ---------------------------------------------------------------- client

# run_client NAME [TIMEOUT]: run the real client against [::1]:$PORT with the
# key set NAME; its stdout (the password, no newline) is ours, its stderr goes
# to $BATS_TEST_TMPDIR/client-NAME.err.  Returns the client's (or timeout's)
# exit status.  timeout runs in the caller's process group (--foreground),
# so that a client started with spawn is stopped with its group.
run_client() {
	local name=$1 secs=${2:-30} keys hooks
	keys=$(keys_for "$name") || return 1
	hooks="$BATS_TEST_TMPDIR/no-hooks"
	mkdir -p "$hooks"
	timeout --foreground -k 5 "$secs" "$REAL_CLIENT" \
		--connect="[::1]:$PORT" --interface=none \
		--network-hook-dir="$hooks" --retry=1 \
		--pubkey="$keys/pubkey.txt" --seckey="$keys/seckey.txt" \
		--tls-pubkey="$keys/tls-pubkey.pem" \
		--tls-privkey="$keys/tls-privkey.pem" \
		2>"$BATS_TEST_TMPDIR/client-$name.err" </dev/null 3>&-
}

# client_gets NAME PASSWORD [TIMEOUT]: run the client, compare its output
# with PASSWORD byte for byte; explain on failure.
client_gets() {
	local name=$1 want=$2 secs=${3:-30} out="$BATS_TEST_TMPDIR/got-$1" rc=0
	run_client "$name" "$secs" >"$out" || rc=$?
	if [[ $rc -ne 0 ]] || ! printf '%s' "$want" | cmp -s - "$out"; then
		echo "client $name: exit $rc, got $(od -An -c "$out" | head -c 300)" >&2
		echo "--- client stderr (tail):" >&2
		tail -n 15 "$BATS_TEST_TMPDIR/client-$name.err" >&2
		echo "--- server log (tail):" >&2
		tail -n 30 "$SERVER_LOG" >&2
		return 1
	fi
}

# ---------------------------------------------------------------- peers

# peer ACTION...: one scripted TCP peer against [::1]:$PORT (Python).
# Actions, done in order:
#   send:TEXT    send TEXT (backslash escapes as in Python bytes: \r \n \x00)
#   rand:N       send N random bytes
#   sleep:SECS   pause
#   read:SECS    read whatever arrives within SECS (stop early at EOF)
#   recv:N:SECS  read until N more bytes arrived, EOF, or SECS passed
#   wait_eof:SECS  read until the server closes, at most SECS (= read)
#   shut         half-close (shutdown write side)
# Prints one summary line "received=N first=XX eof=yes|no" (first byte hex
# or "-") and exits 0; exit 3 if the connection could not be made.
peer() {
	"$PYTHON" - "$PORT" "$@" <<-'EOF'
	import os, socket, sys, time
	port = int(sys.argv[1])
	try:
	    s = socket.create_connection(("::1", port), timeout=10)
	except OSError as e:
	    print("connect failed:", e)
	    sys.exit(3)
	got = b""
	eof = False
	def read_for(secs, want=None):
	    global got, eof
	    end = time.monotonic() + secs
	    while not eof and (want is None or len(got) < want):
	        left = end - time.monotonic()
	        if left <= 0:
	            return
	        s.settimeout(left)
	        try:
	            b = s.recv(65536)
	        except socket.timeout:
	            return
	        except OSError:
	            eof = True
	            return
	        if not b:
	            eof = True
	            return
	        got += b
	for act in sys.argv[2:]:
	    kind, _, arg = act.partition(":")
	    try:
	        if kind == "send":
	            s.sendall(arg.encode("utf-8").decode("unicode_escape").encode("latin-1"))
	        elif kind == "rand":
	            s.sendall(os.urandom(int(arg)))
	        elif kind == "sleep":
	            time.sleep(float(arg))
	        elif kind in ("read", "wait_eof"):
	            read_for(float(arg))
	        elif kind == "recv":
	            n, _, secs = arg.partition(":")
	            read_for(float(secs), len(got) + int(n))
	        elif kind == "shut":
	            s.shutdown(socket.SHUT_WR)
	        else:
	            print("bad action", act)
	            sys.exit(2)
	    except (BrokenPipeError, ConnectionResetError):
	        eof = True
	s.close()
	print("received=%d first=%s eof=%s" % (len(got), "%02x" % got[0] if got else "-",
	                                       "yes" if eof else "no"))
	EOF
}

# tls_probe: send a valid version line; print the first byte the server
# sends back as hex ("16" = a TLS handshake record, i.e. a ClientHello).
tls_probe() {
	local out
	out=$(peer 'send:1\r\n' recv:1:8) || return 1
	out=${out#*first=}
	echo "${out%% *}"
}

# hold_silent_peers N [SECONDS]: open N connections that never send a byte,
# in the background (tracked), for at most SECONDS (default 120); return once
# all are connected.  HOLD_PID is the holder's PID.
hold_silent_peers() {
	local n=$1 secs=${2:-120} ready="$BATS_TEST_TMPDIR/hold.ready.$RANDOM" i
	spawn "$PYTHON" - "$PORT" "$n" "$secs" "$ready" >"$ready.log" 2>&1 <<-'EOF'
	import socket, sys, time
	port, n, secs, ready = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
	socks = [socket.create_connection(("::1", port), timeout=10) for _ in range(n)]
	open(ready, "w").close()
	time.sleep(secs)
	EOF
	HOLD_PID=$BG_PID
	for ((i = 0; i < 400; i++)); do
		[[ -e $ready ]] && return 0
		pid_running "$HOLD_PID" || break
		sleep 0.05
	done
	echo "could not open $n silent connections:" >&2
	cat "$ready.log" >&2
	return 1
}

# ---------------------------------------------------------------- asserts

# refute_in_file STRING FILE: fail (showing the hit) if FILE contains STRING,
# and also when FILE cannot be read: a missing file proves nothing.
refute_in_file() {
	local rc=0
	if [[ ! -f $2 || ! -r $2 ]]; then
		echo "refute_in_file: no readable file $2" >&2
		return 1
	fi
	grep -anF -- "$1" "$2" >&2 || rc=$?
	if [[ $rc -eq 0 ]]; then
		echo "unexpected: '$1' found in $2" >&2
		return 1
	fi
	[[ $rc -eq 1 ]]
}

# refute_secrets CLIENTS_CONF FILE...: no FILE holds any client secret of
# CLIENTS_CONF in a form the server has it in: the raw bytes it decoded,
# their hex (either case) or base64, whole or as any 16-byte piece.
refute_secrets() {
	"$PYTHON" - "$@" <<-'EOF'
	import base64, re, sys
	conf = open(sys.argv[1]).read()
	blocks = re.findall(r"^secret\s*[=:](.*?)(?=^\S|\Z)", conf, re.M | re.S)
	secrets = [base64.b64decode("".join(b.split())) for b in blocks]
	secrets = [s for s in secrets if len(s) >= 16]
	if not secrets:
	    sys.exit("refute_secrets: no secret of 16 bytes or more in " + sys.argv[1])
	needles = []
	for s in secrets:
	    b64 = base64.b64encode(s)
	    needles += [b64[i:i + 40] for i in range(0, len(b64) - 40, 16)]
	    for i in range(0, len(s) - 15, 8):
	        piece = s[i:i + 16]
	        needles += [piece, piece.hex().encode(), piece.hex().upper().encode()]
	bad = 0
	for path in sys.argv[2:]:
	    data = open(path, "rb").read()
	    for n in needles:
	        at = data.find(n)
	        if at >= 0:
	            line = data.count(b"\n", 0, at) + 1
	            print("%s:%d: holds a piece of a secret: %r" % (path, line, n[:24]), file=sys.stderr)
	            bad = 1
	            break
	print("refute_secrets: %d pieces of %d secrets looked for in %d files"
	      % (len(needles), len(secrets), len(sys.argv) - 2))
	sys.exit(bad)
	EOF
}

# ---------------------------------------------------------------- timing

# proc_cpu_ms PID: the CPU time (user + system) the process used, in ms.
proc_cpu_ms() {
	local stat hz
	stat=$(cat "/proc/$1/stat") || return 1
	stat=${stat##*) }
	hz=$(getconf CLK_TCK)
	# shellcheck disable=SC2086  # split the fields after "(comm) "
	set -- $stat
	# utime and stime are fields 14 and 15 of stat, 12 and 13 from "state"
	echo $(((${12} + ${13}) * 1000 / hz))
}

# log_gap_ms FILE FIRST SECOND: the milliseconds, by the server's own log
# timestamps, from the first line holding FIRST to the next one holding
# SECOND; fails if either is missing.
log_gap_ms() {
	awk -v a="$2" -v b="$3" '
	function ms(   t) {
		split($2, t, /[:,]/)
		return ((t[1] * 60 + t[2]) * 60 + t[3]) * 1000 + t[4]
	}
	start == "" && index($0, a) { start = ms(); next }
	start != "" && index($0, b) { d = ms() - start; if (d < 0) d += 86400000; print d; found = 1; exit }
	END { if (!found) exit 1 }' "$1" || {
		echo "log_gap_ms: no '$2' followed by '$3' in $1" >&2
		return 1
	}
}

# conn_timeouts_ms FILE: for each connection the server logged as timed out,
# the milliseconds from its accept to the time-out, by the log timestamps.
conn_timeouts_ms() {
	awk '
	function ms(   t) {
		split($2, t, /[:,]/)
		return ((t[1] * 60 + t[2]) * 60 + t[3]) * 1000 + t[4]
	}
	/ TCP connection from: / { at[$NF] = ms(); next }
	/: timed out while / {
		peer = $6
		sub(/:$/, "", peer)
		if (peer in at) { d = ms() - at[peer]; if (d < 0) d += 86400000; print d }
	}' "$1"
}

# ---------------------------------------------------------------- teardown

mandos_teardown() {
	local pid
	for pid in "${MANDOS_BG_PIDS[@]}"; do stop_pid "$pid" 5; done
	MANDOS_BG_PIDS=()
	stop_server
	for pid in "${MANDOS_BG_PGIDS[@]}"; do stop_group "$pid" 5; done
	MANDOS_BG_PGIDS=()
	for pid in "${MANDOS_NETNS[@]}"; do ip netns del "$pid" 2>/dev/null || true; done
	MANDOS_NETNS=()
	stop_private_dbus
	if [[ -n ${REF_STATE_DIR:-} && -d $REF_STATE_DIR ]]; then rm -rf "$REF_STATE_DIR"; fi
	REF_STATE_DIR=
}

teardown() {
	mandos_teardown
}
