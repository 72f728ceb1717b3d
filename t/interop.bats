#!/usr/bin/env bats
# Interoperability with the real mandos-client (Debian 1.8.16): the server
# must hand a configured client its secret byte for byte and give nothing to
# unknown or disabled clients, without dying or leaking the secret.

load lib

PW_ALPHA='pass wörd ✓ x'
PW_BETA='beta  second password, with  double spaces'

setup() {
	need_client
	CONF=$(make_confdir)
}

@test "interop: configured client gets its password byte for byte (spaces, non-ASCII)" {
	client_section alpha "$PW_ALPHA" >"$CONF/clients.conf"
	start_server "$CONF"
	client_gets alpha "$PW_ALPHA"
	assert_server_alive
}

@test "interop: two clients each get their own password" {
	{
		client_section alpha "$PW_ALPHA"
		echo
		client_section beta "$PW_BETA"
	} >"$CONF/clients.conf"
	start_server "$CONF"
	client_gets beta "$PW_BETA"
	client_gets alpha "$PW_ALPHA"
	client_gets beta "$PW_BETA"
}

@test "interop: unknown key gets nothing, server survives and serves a known client" {
	keys_for stranger >/dev/null
	client_section alpha "$PW_ALPHA" >"$CONF/clients.conf"
	start_server "$CONF"
	local rc=0
	run_client stranger 6 >"$BATS_TEST_TMPDIR/stranger.out" || rc=$?
	[ "$rc" -ne 0 ]
	[ ! -s "$BATS_TEST_TMPDIR/stranger.out" ]
	assert_server_alive
	client_gets alpha "$PW_ALPHA"
}

@test "interop: client with enabled = false gets nothing" {
	client_section alpha "$PW_ALPHA" "enabled = false" >"$CONF/clients.conf"
	start_server "$CONF"
	local rc=0
	run_client alpha 6 >"$BATS_TEST_TMPDIR/alpha.out" || rc=$?
	[ "$rc" -ne 0 ]
	[ ! -s "$BATS_TEST_TMPDIR/alpha.out" ]
	assert_server_alive
}

@test "interop: disabled client does not block an enabled one" {
	{
		client_section alpha "$PW_ALPHA" "enabled = no"
		echo
		client_section beta "$PW_BETA"
	} >"$CONF/clients.conf"
	start_server "$CONF"
	local rc=0
	run_client alpha 6 >"$BATS_TEST_TMPDIR/alpha.out" || rc=$?
	[ "$rc" -ne 0 ]
	[ ! -s "$BATS_TEST_TMPDIR/alpha.out" ]
	client_gets beta "$PW_BETA"
}

@test "interop: the server log never holds the secret it sent" {
	# The server never sees the password, only the OpenPGP message that
	# the client decrypts into it: that message is what must not leak, as
	# the raw bytes the server sends, or in hex or base64 (refute_secrets).
	client_section alpha "$PW_ALPHA" >"$CONF/clients.conf"
	start_server "$CONF"
	client_gets alpha "$PW_ALPHA"
	stop_server
	grep -q "Sending secret to alpha" "$SERVER_LOG"
	refute_secrets "$CONF/clients.conf" "$SERVER_LOG"
}
