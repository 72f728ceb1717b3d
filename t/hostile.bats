#!/usr/bin/env bats
# Hostile and broken peers: bad version lines, early EOF, garbage where TLS
# should be, silent connections.  The server must close a broken connection
# at once and without spinning, drop a silent one at connection_timeout,
# and afterwards still be running and still serve: a valid version line
# gets a TLS ClientHello back (first byte 0x16) and the real client (so
# root) gets its password.

load lib

PW='hostile pässword ✓'

setup() {
	need_server_bin
	need_client
	CONF=$(make_confdir)
	client_section alpha "$PW" >"$CONF/clients.conf"
}

# still_serves: alive, answers a version line with TLS, and the real client
# gets its password.
still_serves() {
	assert_server_alive
	local first
	first=$(tls_probe)
	if [[ $first != 16 ]]; then
		echo "no TLS ClientHello after a valid version line (first byte: $first)" >&2
		tail -n 30 "$SERVER_LOG" >&2
		return 1
	fi
	client_gets alpha "$PW" 30
	assert_server_alive
}

# closes_quietly ACTION...: after the peer's ACTIONs the server closes the
# connection within 3 s (the default connection_timeout is 10 s), and uses
# less than 250 ms of CPU from the first byte until a second after the
# close: a broken connection left in poll() spins a core meanwhile.
closes_quietly() {
	local cpu0 cpu1 t0 ms
	cpu0=$(proc_cpu_ms "$SERVER_PID")
	t0=$(date +%s%N)
	run peer "$@" wait_eof:3
	ms=$((($(date +%s%N) - t0) / 1000000))
	echo "peer: $output (after $ms ms)"
	[ "$status" -eq 0 ]
	if [[ $output != *"eof=yes" ]]; then
		echo "the server left the connection open for 3 s" >&2
		tail -n 20 "$SERVER_LOG" >&2
		return 1
	fi
	sleep 1
	cpu1=$(proc_cpu_ms "$SERVER_PID")
	echo "server CPU meanwhile: $((cpu1 - cpu0)) ms"
	if ((cpu1 - cpu0 >= 250)); then
		echo "the server used $((cpu1 - cpu0)) ms of CPU in $((ms + 1000)) ms" >&2
		return 1
	fi
}

# dropped_near MS STATE: the server's log shows the (first) connection
# timed out while STATE between MS/2 and 2*MS after it was accepted.
dropped_near() {
	local want=$1 got
	grep -q ": timed out while $2\$" "$SERVER_LOG" || {
		echo "no connection timed out while $2" >&2
		tail -n 20 "$SERVER_LOG" >&2
		return 1
	}
	got=$(conn_timeouts_ms "$SERVER_LOG" | head -n 1)
	echo "dropped $got ms after the accept (connection_timeout: $want ms)"
	[[ -n $got ]] && ((got >= want / 2 && got <= want * 2))
}

# refused_without_tls ACTION...: the peer's bytes make the server close the
# connection at once (closes_quietly) without sending anything.
refused_without_tls() {
	closes_quietly "$@"
	[ "$output" = "received=0 first=- eof=yes" ]
}

@test "hostile: version line '2' is refused without TLS" {
	start_server "$CONF"
	refused_without_tls 'send:2\r\n'
	still_serves
}

@test "hostile: version line 'abc' is refused without TLS" {
	start_server "$CONF"
	refused_without_tls 'send:abc\r\n'
	still_serves
}

@test "hostile: empty version line is refused without TLS" {
	start_server "$CONF"
	refused_without_tls 'send:\r\n'
	refused_without_tls 'send:\n'
	still_serves
}

@test "hostile: 100 bytes without a newline: closed at once" {
	start_server "$CONF"
	closes_quietly "send:$(printf 'x%.0s' {1..100})"
	[ "$output" = "received=0 first=- eof=yes" ]
	still_serves
}

@test "hostile: 100 random bytes: closed at once" {
	start_server "$CONF"
	closes_quietly rand:100
	still_serves
}

@test "hostile: EOF right after connect" {
	start_server "$CONF"
	run peer
	[ "$status" -eq 0 ]
	closes_quietly shut
	[ "$output" = "received=0 first=- eof=yes" ]
	still_serves
}

@test "hostile: EOF right after the version line" {
	start_server "$CONF"
	run peer 'send:1\r\n'
	[ "$status" -eq 0 ]
	closes_quietly 'send:1\r\n' shut
	still_serves
}

@test "hostile: EOF after receiving the ClientHello" {
	start_server "$CONF"
	closes_quietly 'send:1\r\n' recv:5:8 shut
	[[ $output == *"first=16 "* ]]
	still_serves
}

@test "hostile: garbage mid-handshake (after the ClientHello)" {
	start_server "$CONF"
	closes_quietly 'send:1\r\n' recv:5:8 'send:\xff\xff\xff\x00\x10' rand:59
	[[ $output == *"first=16 "* ]]
	still_serves
}

@test "hostile: garbage instead of TLS (plain text after the version line)" {
	start_server "$CONF"
	closes_quietly 'send:1\r\n' recv:5:8 'send:GET / HTTP/1.0\r\n\r\n'
	[[ $output == *"first=16 "* ]]
	still_serves
}

@test "hostile: garbage in the same packet as the version line fails the handshake (mandos.c)" {
	# The reference's buffered line reader swallows bytes that follow the
	# version line, then waits forever for a ServerHello; bytes after the
	# newline belong to TLS, so garbage there must end the handshake.
	need_ours "the reference swallows bytes after the version line"
	start_server "$CONF"
	closes_quietly 'send:1\r\nGET / HTTP/1.0\r\n\r\n'
	still_serves
}

@test "hostile: truncated TLS record header claiming 16 KiB, then EOF" {
	start_server "$CONF"
	closes_quietly 'send:1\r\n' recv:5:8 'send:\x16\x03\x03\x40\x00' rand:10 shut
	[[ $output == *"first=16 "* ]]
	still_serves
}

@test "hostile: 30 peers sending random junk of random length" {
	start_server "$CONF"
	local i
	for ((i = 0; i < 30; i++)); do
		run peer "rand:$((RANDOM % 300))" read:0.2
		[ "$status" -eq 0 ]
		run peer 'send:1\r\n' "rand:$((RANDOM % 300))" read:0.2
		[ "$status" -eq 0 ]
	done
	still_serves
}

@test "hostile: a silent peer does not block others" {
	start_server "$CONF"
	hold_silent_peers 1 120
	still_serves
	stop_pid "$HOLD_PID" 5
	still_serves
}

@test "hostile: peer stalled after the version line does not block others" {
	start_server "$CONF"
	# Sends the version line, never answers the ClientHello; held open.
	spawn "$PYTHON" - "$PORT" <<-'EOF'
	import socket, sys, time
	s = socket.create_connection(("::1", int(sys.argv[1])), timeout=10)
	s.sendall(b"1\r\n")
	time.sleep(60)
	EOF
	sleep 0.5
	still_serves
}

@test "hostile: 50 silent peers held open, the real client is still served quickly" {
	start_server "$CONF"
	hold_silent_peers 50 120
	assert_server_alive
	[ "$(tls_probe)" = 16 ]
	local t0 ms
	t0=$(date +%s%N)
	client_gets alpha "$PW" 30
	ms=$((($(date +%s%N) - t0) / 1000000))
	echo "client took $ms ms with 50 silent peers"
	((ms <= 15000))
	stop_pid "$HOLD_PID" 5
	still_serves
}

@test "hostile: silent peer is dropped after connection_timeout (mandos.c)" {
	need_ours "the reference has no connection timeout"
	printf '[DEFAULT]\nconnection_timeout = PT2S\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	run peer wait_eof:5
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[ "$output" = "received=0 first=- eof=yes" ]
	dropped_near 2000 "reading the protocol version"
	still_serves
}

@test "hostile: peer stalled in the handshake is dropped after connection_timeout (mandos.c)" {
	need_ours "the reference has no connection timeout"
	printf '[DEFAULT]\nconnection_timeout = PT2S\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	run peer 'send:1\r\n' wait_eof:5
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[[ $output == *"first=16 "* ]]
	[[ $output == *"eof=yes" ]]
	dropped_near 2000 "TLS handshake"
	still_serves
}

@test "hostile: SIGTERM exits promptly even with silent peers connected (mandos.c)" {
	need_ours "the reference waits for open connections at exit"
	start_server "$CONF"
	hold_silent_peers 5 120
	run peer 'send:1\r\n' read:2
	kill -TERM "$SERVER_PID"
	local i
	for ((i = 0; i < 100; i++)); do
		server_alive || break
		sleep 0.05
	done
	if server_alive; then
		echo "server still running 5 s after SIGTERM" >&2
		false
	fi
	local st=0
	wait "$SERVER_PID" || st=$?
	SERVER_PID=
	[ "$st" -eq 0 ]
}

# GnuTLS's level 9 and up print the traffic keys and IVs ("INT: CLIENT WRITE
# KEY [32]: <hex>"), and 10 and up every read and write; --debug asks for
# the handshake and record lines only (mandos.c; the reference uses 11).
@test "hostile: --debug logs the TLS handshake but no key material (mandos.c)" {
	need_ours "the reference sets GnuTLS's log level to 11, which prints the keys"
	start_server "$CONF"
	client_gets alpha "$PW" 30
	stop_server
	grep -q 'GnuTLS: HSK\[' "$SERVER_LOG"
	grep -q 'GnuTLS: REC\[' "$SERVER_LOG"
	echo "GnuTLS lines: $(grep -c 'GnuTLS: ' "$SERVER_LOG")"
	local s
	for s in 'GnuTLS: INT: ' 'WRITE KEY' 'WRITE IV' 'MASTER SECRET' 'PREMASTER' \
		'CLIENT_RANDOM' 'CLIENT RANDOM' 'TRAFFIC_SECRET' 'GnuTLS: READ: ' 'GnuTLS: WRITE: '; do
		refute_in_file "$s" "$SERVER_LOG"
	done
	# nor anything that looks like a key: a long run of hex digits
	run -1 grep -E 'GnuTLS: .*[0-9A-Fa-f]{20}' "$SERVER_LOG"
}

# GNUTLS_DEBUG_LEVEL (read by GnuTLS itself) installs GnuTLS's own logger,
# which prints every line, the traffic keys too, as "gnutls[9]: INT: ..."
# on stderr, unless the program has a logger of its own.
@test "hostile: GNUTLS_DEBUG_LEVEL=9 without --debug prints no key material (mandos.c)" {
	need_ours "the reference installs its GnuTLS logger only with --debug"
	SERVER_NO_DEBUG=1 GNUTLS_DEBUG_LEVEL=9 start_server "$CONF"
	client_gets alpha "$PW" 30
	stop_server
	# GnuTLS's logger ran at its start-up, before ours took over: the
	# variable was in effect
	grep -q 'gnutls\[2\]: Enabled GnuTLS .* logging' "$SERVER_LOG"
	local s
	for s in 'INT: ' 'WRITE KEY' 'WRITE IV' 'HSK[' 'REC['; do
		refute_in_file "$s" "$SERVER_LOG"
	done
}
