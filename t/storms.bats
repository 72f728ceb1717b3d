#!/usr/bin/env bats
# Signal storms, descriptor exhaustion and forged log lines (issue 12,
# findings 4, 5 and 7): SIGTERM is not queued behind reloads, running out
# of descriptors does not spin, and bytes from outside cannot write a line
# of their own into the log.

load lib

PW='storm pässword'

# many_clients N FILE: append N client sections with distinct key_ids, a
# secret and a checker that never runs during the test.
many_clients() {
	"$PYTHON" - "$1" >>"$2" <<-'EOF'
	import hashlib, sys
	print("[DEFAULT]\ninterval = 1d\nchecker = true")
	for i in range(int(sys.argv[1])):
	    kid = hashlib.sha256(b"storm%d" % i).hexdigest()
	    print("[storm%d]\nkey_id = %s\nsecret = c2VjcmV0\n" % (i, kid))
	EOF
}

# gone_within_ms PID: wait (at most 60 s) for PID to exit; echo the ms waited.
gone_within_ms() {
	local t0 i
	t0=$(date +%s%N)
	for ((i = 0; i < 3000; i++)); do
		pid_running "$1" || break
		sleep 0.02
	done
	echo $((($(date +%s%N) - t0) / 1000000))
}

@test "storm: SIGTERM after 200 SIGHUPs with 10,000 clients exits within 3 s" {
	need_server_bin
	CONF=$(make_confdir)
	many_clients 10000 "$CONF/clients.conf"
	start_server "$CONF"
	local i ms
	for ((i = 0; i < 200; i++)); do kill -HUP "$SERVER_PID"; done
	kill -TERM "$SERVER_PID"
	ms=$(gone_within_ms "$SERVER_PID")
	echo "exited $ms ms after SIGTERM; reloads: $(grep -c 'Reloading clients.conf' "$SERVER_LOG")"
	((ms < 3000))
	SERVER_PID=
}

@test "storm: 200 SIGHUPs during reloads cause a few reloads, not 200" {
	need_server_bin
	CONF=$(make_confdir)
	many_clients 10000 "$CONF/clients.conf"
	start_server "$CONF"
	local i n=-1 last
	for ((i = 0; i < 200; i++)); do kill -HUP "$SERVER_PID"; done
	# wait until the count of reloads stops growing (at most 60 s)
	for ((i = 0; i < 120; i++)); do
		last=$n
		sleep 0.5
		n=$(grep -c 'Reloaded: 10000 clients' "$SERVER_LOG" || true)
		((n > 0 && n == last)) && break
	done
	echo "reloads after 200 SIGHUPs: $n"
	((n >= 1 && n <= 20))
	assert_server_alive
}

@test "storm: out of descriptors (nofile 20), idle peers do not spin; the client is served after" {
	need_client
	command -v prlimit >/dev/null || missing "prlimit not installed"
	CONF=$(make_confdir)
	client_section alpha "$PW" >"$CONF/clients.conf"
	start_server "$CONF"
	stop_server
	PORT=$(free_port)
	# start_server's spawn, behind prlimit
	SERVER_LOG="$BATS_TEST_TMPDIR/server.log"
	spawn prlimit --nofile=20:20 "$MANDOS_BIN" --foreground --debug --no-zeroconf --no-dbus \
		--configdir "$CONF" --statedir "$BATS_TEST_TMPDIR/state" \
		--address ::1 --port "$PORT" >"$SERVER_LOG" 2>&1 </dev/null
	SERVER_PID=$BG_PID
	local i cpu0 cpu1 lines
	for ((i = 0; i < 200; i++)); do
		port_listening "$PORT" && break
		sleep 0.05
	done
	port_listening "$PORT"
	hold_silent_peers 60 8
	cpu0=$(proc_cpu_ms "$SERVER_PID")
	sleep 3
	cpu1=$(proc_cpu_ms "$SERVER_PID")
	lines=$(grep -c 'accept' "$SERVER_LOG" || true)
	echo "server CPU over 3 s with 60 idle peers: $((cpu1 - cpu0)) ms; accept lines: $lines"
	((cpu1 - cpu0 < 600))
	((lines <= 10))
	stop_group "$HOLD_PID"
	client_gets alpha "$PW" 30
}

# forged_line_refuted WHAT: the log holds no line that starts with the
# injected text, and the escaped form appears.
forged_line_refuted() {
	if grep -n '^FORGED' "$SERVER_LOG"; then
		echo "$1 wrote a line of its own into the log" >&2
		return 1
	fi
	if grep -n $'\e' "$SERVER_LOG"; then
		echo "$1 wrote an ESC byte into the log" >&2
		return 1
	fi
	grep -q 'evil\\x0AFORGED' "$SERVER_LOG" || {
		echo "no escaped newline from $1 in the log:" >&2
		tail -n 20 "$SERVER_LOG" >&2
		return 1
	}
	grep -q 'esc\\x1B\[31m' "$SERVER_LOG" || {
		echo "no escaped ESC from $1 in the log" >&2
		return 1
	}
}

@test "forged log lines: a host with a newline or an ESC from clients.conf logs escaped" {
	need_server_bin
	CONF=$(make_confdir)
	printf '%s\n' '[DEFAULT]' 'interval = 1s' \
		'[nl]' "key_id = $(printf 'a%.0s' {1..64})" 'secret = c2VjcmV0' \
		'host = evil' '  FORGED: INFO: line from the host value' \
		'checker = true %%(host)s' \
		'[esc]' "key_id = $(printf 'b%.0s' {1..64})" 'secret = c2VjcmV0' \
		$'host = esc\e[31m' 'checker = true %%(host)s' >"$CONF/clients.conf"
	start_server "$CONF"
	local i
	for ((i = 0; i < 100; i++)); do
		grep -q 'esc\\x1B' "$SERVER_LOG" && grep -q 'evil\\x0A' "$SERVER_LOG" && break
		sleep 0.1
	done
	forged_line_refuted "clients.conf"
}

@test "forged log lines: a NUL byte in the version line appears escaped" {
	need_server_bin
	CONF=$(make_confdir)
	start_server "$CONF"
	run peer 'send:1\x00zz\r\n' wait_eof:3
	echo "$output"
	wait_for_log 'Unknown protocol version' 5
	grep -q 'Unknown protocol version: not an integer: "1\\x00zz"' "$SERVER_LOG"
}
