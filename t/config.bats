#!/usr/bin/env bats
# Configuration details beyond the parser: secfile, priority strings,
# connection limits, scoped addresses.

load lib

setup() {
	CONF=$(make_confdir)
}

# run_server_once ARG...: start the server and expect it to stop at once.
run_server_once() {
	need_server_bin
	run timeout 10 "$MANDOS_BIN" --foreground --no-zeroconf --no-dbus --configdir "$CONF" \
		--statedir "$BATS_TEST_TMPDIR/state" --address ::1 --port "$(free_port)" "$@"
}

# secret_section NAME LINE...: a client section made from key set NAME with
# the given secret/secfile lines instead of mandos-keygen's secret.
secret_section() {
	local name=$1 dir id
	shift
	dir=$(keys_for "$name") || return 1
	id=$(certtool --key-id --hash=sha256 --load-pubkey "$dir/tls-pubkey.pem" 2>/dev/null ||
		openssl pkey -pubin -in "$dir/tls-pubkey.pem" -outform der | sha256sum | cut -d' ' -f1)
	printf '[%s]\nkey_id = %s\nchecker = true\n' "$name" "$id"
	printf '%s\n' "$@"
}

@test "secfile: a relative path is read from the config directory, raw" {
	need_client
	local sec="$BATS_TEST_TMPDIR/sec.conf"
	client_section alpha 'from a secfile' >"$sec"
	# the OpenPGP message from mandos-keygen's section, as raw bytes
	awk '/^secret =/ { on = 1; next } on && /^[ \t]/ { print; next } { on = 0 }' "$sec" |
		tr -d ' \t' | base64 -d >"$CONF/alpha.secret"
	{ grep -v '^ \|^secret' "$sec"; echo 'secfile = alpha.secret'; echo 'checker = true'; } \
		>"$CONF/clients.conf"
	start_server "$CONF"
	client_gets alpha 'from a secfile'
}

@test "secfile: \$VAR and ~ are expanded; a missing file is an error naming it" {
	need_server_bin
	printf '[a]\nsecfile = $MANDOS_TEST_DIR/nope\n[b]\nsecfile = ~/nope-%s\n' "$$" \
		>"$CONF/clients.conf"
	MANDOS_TEST_DIR=/nonexistent-dir HOME=/nonexistent-home run_server_once
	[[ $status -eq 1 ]]
	[[ $output == *"clients.conf:2:"*"/nonexistent-dir/nope"* ]]
	[[ $output == *"clients.conf:4:"*"/nonexistent-home/nope-"* ]]
}

@test "config: a client without secret or secfile is an error" {
	printf '[a]\nhost = x\n' >"$CONF/clients.conf"
	run_server_once
	[[ $status -eq 1 ]]
	[[ $output == *"[a] has neither secret nor secfile"* ]]
}

@test "config: two clients with one key_id are an error naming both" {
	local id=16fadc8e51108e940e1afaf22b2154f651d203f2a10d991a7f71960adaccc4d9
	printf '[a]\nsecret=\nkey_id = %s\n[b]\nsecret=\nkey_id = %s\n' "$id" "${id^^}" \
		>"$CONF/clients.conf"
	run_server_once
	[[ $status -eq 1 ]]
	[[ $output == *"[a] and [b] have the same key_id"* ]]
}

@test "config: negative durations and a zero interval are refused" {
	printf '[a]\nsecret=\ntimeout = -5m\ninterval = PT0S\n' >"$CONF/clients.conf"
	run_server_once
	[[ $status -eq 1 ]]
	[[ $output == *"clients.conf:3:"*"negative"* ]]
	[[ $output == *"clients.conf:4:"*"interval must be longer than zero"* ]]
}

@test "config: a missing fingerprint is fine" {
	need_client
	client_section alpha 'no fingerprint' 'checker = true' | grep -v '^fingerprint' \
		>"$CONF/clients.conf"
	start_server "$CONF"
	client_gets alpha 'no fingerprint'
}

@test "priority: a bad priority string is fatal at start-up with GnuTLS's reason" {
	printf '[a]\nsecret=\n' >"$CONF/clients.conf"
	run_server_once --priority 'NORMAL:+NONSENSE'
	[[ $status -eq 1 ]]
	[[ $output == *"bad priority string"*"NONSENSE"* ]]
	run_server_once --priority ''
	[[ $status -eq 1 ]]
	[[ $output == *"bad priority string"* ]]
}

@test "priority: asking for OpenPGP certificates gets a clear warning" {
	need_server_bin
	printf '[a]\nsecret=\n' >"$CONF/clients.conf"
	PORT=$(free_port)
	start_server "$CONF" --priority 'SECURE256:!CTYPE-X.509:+CTYPE-OPENPGP'
	grep -q "asks for OpenPGP certificates" "$SERVER_LOG"
}

@test "limits: with max_connections full of silent peers, the real client is still served" {
	need_client
	client_section alpha 'crowded' 'checker = true' >"$CONF/clients.conf"
	printf '[DEFAULT]\nmax_connections = 8\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	hold_silent_peers 20 60
	client_gets alpha 'crowded' 20
	grep -q "dropped to make room" "$SERVER_LOG"
}

@test "limits: a silent peer is dropped at connection_timeout" {
	need_server_bin
	printf '[a]\nsecret=\n' >"$CONF/clients.conf"
	printf '[DEFAULT]\nconnection_timeout = PT1S\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	run peer wait_eof:3
	echo "peer: $output"
	[[ $output == *"eof=yes"* ]]
	grep -q "timed out while reading the protocol version" "$SERVER_LOG"
	# close to the setting (the default is 10 s): 0.5 s to 2 s, by the log
	local ms
	ms=$(conn_timeouts_ms "$SERVER_LOG" | head -n 1)
	echo "dropped $ms ms after the accept"
	[[ -n $ms ]] && ((ms >= 500 && ms <= 2000))
}

@test "mandos.conf: an unknown key is warned about, with its line" {
	need_server_bin
	printf '[a]\nsecret=\n' >"$CONF/clients.conf"
	printf '[DEFAULT]\n# comment\ntimout = PT5M\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	grep -q 'mandos.conf:3: unknown key "timout" ignored' "$SERVER_LOG"
}

@test "address: a scoped link-local address fe80::...%IF is accepted" {
	need_root "creates a dummy interface in a network namespace"
	command -v ip >/dev/null || skip "ip not installed"
	need_server_bin
	local ns="mcs-cfg-$$-$RANDOM"
	ip netns add "$ns"
	track_netns "$ns"
	ip -n "$ns" link add d0 type veth peer name d1
	ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0
	ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.accept_dad=0
	ip netns exec "$ns" sysctl -qw net.ipv6.conf.d0.accept_dad=0
	ip -n "$ns" link set d1 up
	ip -n "$ns" addr add fe80::1234/64 dev d0
	ip -n "$ns" link set d0 up
	ip -n "$ns" link set lo up
	printf '[a]\nsecret=\n' >"$CONF/clients.conf"
	local port log="$BATS_TEST_TMPDIR/ll.log"
	port=$(free_port)
	spawn ip netns exec "$ns" "$MANDOS_BIN" --foreground --debug --no-zeroconf --no-dbus \
		--configdir "$CONF" --statedir "$BATS_TEST_TMPDIR/state" \
		--address 'fe80::1234%d0' --port "$port" >"$log" 2>&1
	local pid=$BG_PID i ok=1
	for ((i = 0; i < 100; i++)); do
		grep -q "Now listening on address 'fe80::1234'" "$log" && { ok=0; break; }
		pid_running "$pid" || break
		sleep 0.05
	done
	stop_pid "$pid" 5
	ip netns del "$ns"
	cat "$log" | grep -v GnuTLS | tail -5
	[[ $ok -eq 0 ]]
}
