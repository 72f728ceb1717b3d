#!/usr/bin/env bats
# Command line and configuration errors: --help, --version, usage errors
# (exit 2, "mandos: error: ..."), --check, and config files with bad lines
# (exit 1, every bad line reported as FILE:LINE:, nothing served).

load lib

bats_require_minimum_version 1.5.0

LONG_OPTIONS=(help version interface address port check debug debuglevel
	priority servicename configdir no-dbus no-ipv6 no-restore socket statedir
	foreground no-zeroconf test-config)

setup() {
	need_server_bin
	EMPTY="$BATS_TEST_TMPDIR/empty-conf"
	mkdir -p "$EMPTY"
	PORT=$(free_port)
	# Safe arguments: should an error case be accepted by mistake, the
	# server stays in the foreground on ::1 only and times out.
	SAFE=(--foreground --no-dbus --address ::1 --configdir "$EMPTY"
		--statedir "$BATS_TEST_TMPDIR/st")
}

# usage_error ARG...: the server must exit 2 with a "mandos: error:" line
# (and for mandos.c nothing else) on stderr, nothing on stdout.
usage_error() {
	run --separate-stderr timeout -k 2 10 "$MANDOS_BIN" "$@"
	echo "status=$status stdout=[$output]"
	echo "stderr=[$stderr]"
	[ "$status" -eq 2 ]
	[ -z "$output" ]
	[[ ${stderr_lines[-1]} =~ ^mandos:\ error:\ .+ ]]
	if ! is_reference; then
		[ "${#stderr_lines[@]}" -eq 1 ]
	fi
}

@test "cli: --help exits 0 and lists every long option" {
	run --separate-stderr "$MANDOS_BIN" --help
	[ "$status" -eq 0 ]
	local opt missing=
	for opt in "${LONG_OPTIONS[@]}"; do
		[[ $output == *"--$opt"* ]] || missing+=" --$opt"
	done
	echo "missing:$missing"
	[ -z "$missing" ]
}

@test "cli: -h is --help" {
	run --separate-stderr "$MANDOS_BIN" -h
	[ "$status" -eq 0 ]
	[[ $output == *--no-zeroconf* ]]
}

@test "cli: --version prints 'mandos 1.8.16' first and exits 0" {
	run --separate-stderr "$MANDOS_BIN" --version
	echo "$output"
	[ "$status" -eq 0 ]
	[ "${lines[0]}" = "mandos 1.8.16" ]
}

@test "cli: -v is --version" {
	run --separate-stderr "$MANDOS_BIN" -v
	[ "$status" -eq 0 ]
	[ "${lines[0]}" = "mandos 1.8.16" ]
}

@test "cli: unambiguous prefix --vers means --version" {
	run --separate-stderr "$MANDOS_BIN" --vers
	[ "$status" -eq 0 ]
	[ "${lines[0]}" = "mandos 1.8.16" ]
}

@test "cli: unambiguous prefixes with = and separate values (--no-z --po=N --addr ::1)" {
	run --separate-stderr "$MANDOS_BIN" --vers --no-z --po="$PORT" --addr ::1
	[ "$status" -eq 0 ]
	[ "${lines[0]}" = "mandos 1.8.16" ]
}

@test "cli: usage error: unknown option" {
	usage_error "${SAFE[@]}" --no-zeroconf --port "$PORT" --bogus
}

@test "cli: usage error: unknown short option" {
	usage_error "${SAFE[@]}" --no-zeroconf --port "$PORT" -Z
}

@test "cli: usage error: positional argument" {
	usage_error "${SAFE[@]}" --no-zeroconf --port "$PORT" extra
}

@test "cli: usage error: non-integer --port" {
	usage_error "${SAFE[@]}" --no-zeroconf --port 12ab
}

@test "cli: usage error: non-integer --port=VALUE and -pVALUE" {
	usage_error "${SAFE[@]}" --no-zeroconf --port=abc
	usage_error "${SAFE[@]}" --no-zeroconf -pabc
}

@test "cli: usage error: non-integer --socket" {
	usage_error "${SAFE[@]}" --no-zeroconf --port "$PORT" --socket x
}

@test "cli: usage error: missing argument" {
	usage_error "${SAFE[@]}" --no-zeroconf --port
	usage_error "${SAFE[@]}" --no-zeroconf -p
	usage_error "${SAFE[@]}" --no-zeroconf --port "$PORT" --debuglevel
}

@test "cli: usage error: ambiguous prefix --deb" {
	usage_error "${SAFE[@]}" --no-zeroconf --port "$PORT" --deb
}

@test "cli: usage error: --no-zeroconf without port or socket" {
	usage_error "${SAFE[@]}" --no-zeroconf
	usage_error "${SAFE[@]}" --no-zeroconf --port 0
}

@test "cli: --check exits 0" {
	run timeout 60 "$MANDOS_BIN" --check
	echo "$output" | tail -n 5
	[ "$status" -eq 0 ]
}

@test "cli: --check ends with 'N passed, 0 failed'" {
	need_ours "the reference prints unittest output"
	run timeout 60 "$MANDOS_BIN" --check
	echo "$output" | tail -n 5
	[ "$status" -eq 0 ]
	[[ ${lines[-1]} =~ ^[0-9]+\ passed,\ 0\ failed$ ]]
}

@test "cli: --check ignores every other argument, even invalid ones" {
	run timeout 60 "$MANDOS_BIN" --bogus extra --port abc --check --deb
	echo "$output" | tail -n 5
	[ "$status" -eq 0 ]
}

@test "cli: an unambiguous prefix --che runs the self-tests too" {
	need_ours "the reference's self-test prints unittest output"
	run timeout 60 "$MANDOS_BIN" "${SAFE[@]}" --port "$PORT" --che
	echo "$output" | tail -n 5
	[ "$status" -eq 0 ]
	[[ ${lines[-1]} =~ ^[0-9]+\ passed,\ 0\ failed$ ]]
}

# ---------------------------------------------------------------- config errors

# config_fails FILE LINE...: with the current $CONF, the server exits 1,
# reports exactly the LINEs of FILE as "FILE:LINE:", and never listens.
config_fails() {
	local file=$1 n got want
	shift
	run timeout -k 2 10 "$MANDOS_BIN" --foreground --debug --no-dbus --no-zeroconf \
		--address ::1 --port "$PORT" --configdir "$CONF" \
		--statedir "$BATS_TEST_TMPDIR/st"
	echo "status=$status"
	echo "$output"
	[ "$status" -eq 1 ]
	for n in "$@"; do
		if ! grep -qE "(^|/)$file:$n:" <<<"$output"; then
			echo "line $n of $file not reported"
			return 1
		fi
	done
	got=$(grep -oE "(^|/)$file:[0-9]+:" <<<"$output" | grep -oE '[0-9]+' | sort -nu | tr '\n' ' ')
	want=$(printf '%s\n' "$@" | sort -nu | tr '\n' ' ')
	echo "reported lines: $got; expected: $want"
	[ "$got" = "$want" ]
	[[ $output != *"Now listening"* ]]
	if port_listening "$PORT"; then echo "port $PORT is listening"; return 1; fi
}

@test "config: clients.conf with many bad lines reports every one, exit 1" {
	need_ours "the reference stops at the first error with a traceback"
	CONF=$(make_confdir)
	cat >"$CONF/clients.conf" <<-'EOF'
	# Each marked line is wrong; the rest is fine.
	[DEFAULT]
	checker = true

	[good]
	key_id = 0000000000000000000000000000000000000000000000000000000000000000
	secret = aGVsbG8=

	[baddur]
	key_id = 0000000000000000000000000000000000000000000000000000000000000001
	secret = aGVsbG8=
	timeout = 5 minutes

	[badbool]
	key_id = 0000000000000000000000000000000000000000000000000000000000000002
	secret = aGVsbG8=
	enabled = maybe

	[badb64]
	key_id = 0000000000000000000000000000000000000000000000000000000000000003
	secret = aGVsbG8

	[badinterp]
	key_id = 0000000000000000000000000000000000000000000000000000000000000004
	secret = aGVsbG8=
	note = 100%

	[nodelim]
	key_id = 0000000000000000000000000000000000000000000000000000000000000005
	secret = aGVsbG8=
	this line has no delimiter

	[dupkey]
	key_id = 0000000000000000000000000000000000000000000000000000000000000006
	secret = aGVsbG8=
	host = a
	HOST = b

	[good]
	EOF
	# bad: 12 duration, 17 boolean, 21 base64, 26 interpolation,
	# 31 no delimiter, 37 duplicate key, 39 duplicate section
	config_fails clients.conf 12 17 21 26 31 37 39
}

# one_bad_client FORMAT: $CONF/clients.conf = a good 4-line client, then
# printf FORMAT (so its first line is line 5).
one_bad_client() {
	CONF=$(make_confdir)
	{
		printf '[good]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000000\nsecret = aGVsbG8=\n\n'
		# shellcheck disable=SC2059
		printf "$1"
	} >"$CONF/clients.conf"
}

@test "config: bad duration (clients.conf:LINE:)" {
	need_ours "reference reports config errors as tracebacks"
	one_bad_client '[c]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000001\nsecret = aGVsbG8=\ninterval = PT5\n'
	config_fails clients.conf 8
}

@test "config: bad boolean (clients.conf:LINE:)" {
	need_ours "reference reports config errors as tracebacks"
	one_bad_client '[c]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000001\napproved_by_default = perhaps\nsecret = aGVsbG8=\n'
	config_fails clients.conf 7
}

@test "config: bad base64 aGVsbG8 (clients.conf:LINE:)" {
	need_ours "reference reports config errors as tracebacks"
	one_bad_client '[c]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000001\nsecret = aGVsbG8\n'
	config_fails clients.conf 7
}

@test "config: stray %% in a value (clients.conf:LINE:)" {
	need_ours "reference reports config errors as tracebacks"
	one_bad_client '[c]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000001\nsecret = aGVsbG8=\nfoo = 100%%\n'
	config_fails clients.conf 8
}

@test "config: key line without '=' (clients.conf:LINE:)" {
	need_ours "reference reports config errors as tracebacks"
	one_bad_client '[c]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000001\nnothing here\nsecret = aGVsbG8=\n'
	config_fails clients.conf 7
}

@test "config: duplicate key, differing in case (clients.conf:LINE:)" {
	need_ours "reference reports config errors as tracebacks"
	one_bad_client '[c]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000001\nsecret = aGVsbG8=\nhost = a\nHost = b\n'
	config_fails clients.conf 9
}

@test "config: duplicate section (clients.conf:LINE:)" {
	need_ours "reference reports config errors as tracebacks"
	one_bad_client '[c]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000001\nsecret = aGVsbG8=\n\n[good]\n'
	config_fails clients.conf 9
}

@test "config: bad mandos.conf boolean (mandos.conf:LINE:), exit 1" {
	need_ours "reference reports config errors as tracebacks"
	CONF=$(make_confdir)
	printf '# server settings\n[DEFAULT]\nuse_dbus = maybe\n' >"$CONF/mandos.conf"
	config_fails mandos.conf 3
}

@test "config: bad mandos.conf port (mandos.conf:LINE:), exit 1" {
	need_ours "reference reports config errors as tracebacks"
	CONF=$(make_confdir)
	printf '[DEFAULT]\n\nport = 12ab\n' >"$CONF/mandos.conf"
	run timeout -k 2 10 "$MANDOS_BIN" --foreground --debug --no-dbus --no-zeroconf \
		--address ::1 --configdir "$CONF" --statedir "$BATS_TEST_TMPDIR/st"
	echo "status=$status"
	echo "$output"
	[ "$status" -eq 1 ]
	grep -qE '(^|/)mandos\.conf:3:' <<<"$output"
}

@test "config: a bad clients.conf line exits 1 (either server)" {
	# Cross-check of the exit status only; runs against either server.
	one_bad_client '[c]\nkey_id = 0000000000000000000000000000000000000000000000000000000000000001\nnothing here\nsecret = aGVsbG8=\n'
	run timeout -k 2 10 "$MANDOS_BIN" --foreground --debug --no-dbus --no-zeroconf \
		--address ::1 --port "$PORT" --configdir "$CONF" \
		--statedir "$BATS_TEST_TMPDIR/st"
	echo "status=$status"
	[ "$status" -eq 1 ]
	if port_listening "$PORT"; then echo "port $PORT is listening"; false; fi
}
