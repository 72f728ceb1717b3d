#!/usr/bin/env bats
# Hostile and broken peers: bad version lines, early EOF, garbage where TLS
# should be, silent connections.  After each, the server must still be
# running and still serve: a valid version line gets a TLS ClientHello back
# (first byte 0x16), and with root the real client gets its password.

load lib

PW='hostile pässword ✓'

setup() {
	need_server_bin
	CONF=$(make_confdir)
	if can_run_client; then
		client_section alpha "$PW" >"$CONF/clients.conf"
	else
		# Without root only the TLS probe checks that the server serves.
		printf '[dummy]\nkey_id = %064d\nfingerprint =\nsecret = aGVsbG8=\n' 0 >"$CONF/clients.conf"
	fi
}

can_run_client() {
	[[ $(id -u) -eq 0 && -x $REAL_CLIENT ]] && command -v mandos-keygen >/dev/null
}

# still_serves: alive, answers a version line with TLS, and (with root) the
# real client gets its password.
still_serves() {
	assert_server_alive
	local first
	first=$(tls_probe)
	if [[ $first != 16 ]]; then
		echo "no TLS ClientHello after a valid version line (first byte: $first)" >&2
		tail -n 30 "$SERVER_LOG" >&2
		return 1
	fi
	if can_run_client; then
		client_gets alpha "$PW" 30
	fi
	assert_server_alive
}

# refused_without_tls ACTION...: the peer's bytes make the server close the
# connection within 8 s without sending anything.
refused_without_tls() {
	run peer "$@" wait_eof:8
	echo "peer: $output"
	[ "$status" -eq 0 ]
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

@test "hostile: 100 bytes without a newline, then close" {
	start_server "$CONF"
	run peer "send:$(printf 'x%.0s' {1..100})" read:1
	[ "$status" -eq 0 ]
	still_serves
}

@test "hostile: 100 random bytes, then close" {
	start_server "$CONF"
	run peer rand:100 read:1
	[ "$status" -eq 0 ]
	still_serves
}

@test "hostile: EOF right after connect" {
	start_server "$CONF"
	run peer
	[ "$status" -eq 0 ]
	run peer shut wait_eof:8
	[ "$status" -eq 0 ]
	still_serves
}

@test "hostile: EOF right after the version line" {
	start_server "$CONF"
	run peer 'send:1\r\n'
	[ "$status" -eq 0 ]
	run peer 'send:1\r\n' shut wait_eof:8
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[[ $output == *"eof=yes" ]]
	still_serves
}

@test "hostile: EOF after receiving the ClientHello" {
	start_server "$CONF"
	run peer 'send:1\r\n' recv:5:8
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[[ $output == *"first=16 "* ]]
	still_serves
}

@test "hostile: garbage mid-handshake (after the ClientHello)" {
	start_server "$CONF"
	run peer 'send:1\r\n' recv:5:8 'send:\xff\xff\xff\x00\x10' rand:59 wait_eof:8
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[[ $output == *"first=16 "* ]]
	[[ $output == *"eof=yes" ]]
	still_serves
}

@test "hostile: garbage instead of TLS (plain text after the version line)" {
	start_server "$CONF"
	run peer 'send:1\r\n' recv:5:8 'send:GET / HTTP/1.0\r\n\r\n' read:2
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[[ $output == *"first=16 "* ]]
	still_serves
}

@test "hostile: garbage in the same packet as the version line fails the handshake (mandos.c)" {
	# The reference's buffered line reader swallows bytes that follow the
	# version line, then waits forever for a ServerHello; bytes after the
	# newline belong to TLS, so garbage there must end the handshake.
	need_ours "the reference swallows bytes after the version line"
	start_server "$CONF"
	run peer 'send:1\r\nGET / HTTP/1.0\r\n\r\n' wait_eof:8
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[[ $output == *"eof=yes" ]]
	still_serves
}

@test "hostile: truncated TLS record header claiming 16 KiB, then EOF" {
	start_server "$CONF"
	run peer 'send:1\r\n' recv:5:8 'send:\x16\x03\x03\x40\x00' rand:10
	[ "$status" -eq 0 ]
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
	"$PYTHON" - "$PORT" 3>&- <<-'EOF' &
	import socket, sys, time
	s = socket.create_connection(("::1", int(sys.argv[1])), timeout=10)
	s.sendall(b"1\r\n")
	time.sleep(60)
	EOF
	track_pid $!
	sleep 0.5
	still_serves
}

@test "hostile: 50 silent peers held open, the real client is still served quickly" {
	start_server "$CONF"
	hold_silent_peers 50 120
	assert_server_alive
	[ "$(tls_probe)" = 16 ]
	if can_run_client; then
		local t0 t1
		t0=$(date +%s)
		client_gets alpha "$PW" 30
		t1=$(date +%s)
		echo "client took $((t1 - t0)) s with 50 silent peers"
		[ $((t1 - t0)) -le 15 ]
	fi
	stop_pid "$HOLD_PID" 5
	still_serves
}

@test "hostile: silent peer is dropped after connection_timeout (mandos.c)" {
	need_ours "the reference has no connection timeout"
	printf '[DEFAULT]\nconnection_timeout = PT2S\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	run peer wait_eof:30
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[ "$output" = "received=0 first=- eof=yes" ]
	still_serves
}

@test "hostile: peer stalled in the handshake is dropped after connection_timeout (mandos.c)" {
	need_ours "the reference has no connection timeout"
	printf '[DEFAULT]\nconnection_timeout = PT2S\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	run peer 'send:1\r\n' wait_eof:30
	echo "peer: $output"
	[ "$status" -eq 0 ]
	[[ $output == *"first=16 "* ]]
	[[ $output == *"eof=yes" ]]
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
