#!/usr/bin/env bats
# An administrator's checks (issue 14): -t/--test-config reads mandos.conf
# and clients.conf as start-up and a reload would, reports every problem as
# FILE:LINE:, ends with "N clients, N errors", and binds, writes and changes
# nothing, also beside a running server; the unit runs it before a reload;
# an unwritable state directory stops a daemon before it detaches.

load lib

setup() {
	need_ours "--test-config is ours"
	need_server_bin
	CONF=$(make_confdir)
	STATE="$BATS_TEST_TMPDIR/state"
}

teardown() {
	mandos_teardown
}

# test_config ARG...: run --test-config on $CONF and $STATE.
test_config() {
	run --separate-stderr timeout 20 "$MANDOS_BIN" --test-config --configdir "$CONF" \
		--statedir "$STATE" "$@"
	echo "status=$status"
	echo "stdout=[$output]"
	echo "stderr=[$stderr]"
}

@test "test-config: a good configuration: exit 0, the count, nothing bound or written" {
	need_client
	client_section alpha 'alpha pw' 'checker = true' >"$CONF/clients.conf"
	client_section beta 'beta pw' >>"$CONF/clients.conf"
	chgrp _mandos "$CONF/clients.conf"
	chmod 640 "$CONF/clients.conf"
	# the port is taken: --test-config must not try to bind it
	PORT=$(free_port)
	"$PYTHON" -c 'import socket,sys,time
s = socket.socket(socket.AF_INET6); s.bind(("::1", int(sys.argv[1]))); s.listen()
time.sleep(30)' "$PORT" &
	track_pid $!
	local i
	for ((i = 0; i < 100; i++)); do port_listening "$PORT" && break; sleep 0.05; done
	test_config --port "$PORT" --address ::1
	[[ $status -eq 0 ]]
	[[ ${lines[-1]} == "2 clients, 0 errors" ]]
	[[ -z $stderr ]]
	# the state directory is neither made nor touched
	[[ ! -e $STATE ]]
}

@test "test-config: every bad line is reported as FILE:LINE, exit 1" {
	cat >"$CONF/mandos.conf" <<-'EOF'
	[DEFAULT]
	port = http
	EOF
	cat >"$CONF/clients.conf" <<-'EOF'
	[alpha]
	key_id = 0123
	secret = aGVsbG8=
	timeout = soon
	[beta]
	key_id = 1b3bd554d4f6a23dbd201a82a23d33e4a417c956c7583ef1475b0b248009f9f0
	approved_by_default = maybe
	EOF
	chmod 644 "$CONF/clients.conf"
	test_config
	[[ $status -eq 1 ]]
	[[ $stderr == *"$CONF/mandos.conf:2: port"* ]]
	[[ $stderr == *"$CONF/clients.conf:2: [alpha] key_id"* ]]
	[[ $stderr == *"$CONF/clients.conf:4: [alpha] timeout"* ]]
	[[ $stderr == *"$CONF/clients.conf:7: [beta] approved_by_default"* ]]
	[[ $stderr == *"[beta] has neither secret nor secfile"* ]]
	[[ ${lines[-1]} == "2 clients, 5 errors" ]]
}

@test "test-config: a priority string start-up refuses is an error, with GnuTLS's reason" {
	printf '[a]\nsecret = aGVsbG8=\n' >"$CONF/clients.conf"
	test_config --priority ''
	[[ $status -eq 1 ]]
	[[ $stderr == *'bad priority string "": empty'* ]]
	[[ ${lines[-1]} == "1 clients, 1 errors" ]]
	test_config --priority 'NORMAL:+NONSENSE'
	[[ $status -eq 1 ]]
	[[ $stderr == *'bad priority string "NORMAL:+NONSENSE": '*' at +NONSENSE'* ]]
}

@test "test-config: a file the server user cannot read at reload is an error" {
	need_root "reads as the server's unprivileged user"
	printf '[alpha]\nsecret = aGVsbG8=\n' >"$CONF/clients.conf"
	chown root:root "$CONF/clients.conf"
	chmod 600 "$CONF/clients.conf"
	test_config
	[[ $status -eq 1 ]]
	[[ $stderr == *"$CONF/clients.conf"*"Permission denied"* ]]
	[[ ${lines[-1]} == *" 1 errors" ]]
	chgrp _mandos "$CONF/clients.conf"
	chmod 640 "$CONF/clients.conf"
	# a secfile only root may read
	printf '[alpha]\nsecfile = secret.bin\n' >"$CONF/clients.conf"
	printf 'x' >"$CONF/secret.bin"
	chmod 600 "$CONF/secret.bin"
	test_config
	[[ $status -eq 1 ]]
	[[ $stderr == *"$CONF/clients.conf:2: [alpha] secfile"*"Permission denied"* ]]
}

@test "test-config: beside a running server on the same directories" {
	need_client
	client_section alpha 'alpha pw' 'checker = true' >"$CONF/clients.conf"
	chgrp _mandos "$CONF/clients.conf"
	chmod 640 "$CONF/clients.conf"
	start_server "$CONF"
	local before
	before=$(ls -l --time-style=full-iso "$BATS_TEST_TMPDIR/state")
	STATE=$BATS_TEST_TMPDIR/state
	test_config --port "$PORT" --address ::1
	[[ $status -eq 0 && ${lines[-1]} == "1 clients, 0 errors" ]]
	[[ $(ls -l --time-style=full-iso "$BATS_TEST_TMPDIR/state") == "$before" ]]
	assert_server_alive
	client_gets alpha 'alpha pw'
}

@test "test-config: the unit runs it before it signals a reload" {
	local unit="$BATS_TEST_DIRNAME/../etc/mandos.service" first cmd
	first=$(grep -m1 '^ExecReload=' "$unit")
	[[ $first == "ExecReload=/usr/sbin/mandos --test-config \$DAEMON_ARGS" ]]
	grep -A1 '^ExecReload=/usr/sbin/mandos --test-config' "$unit" |
		grep -qx 'ExecReload=/bin/kill -HUP $MAINPID'
	# run what it names, with this test's files as DAEMON_ARGS
	cmd=${first#ExecReload=/usr/sbin/mandos }
	DAEMON_ARGS="--configdir $CONF --statedir $STATE"
	printf '[alpha]\nsecret = aGVsbG8=\nkey_id = nonsense\n' >"$CONF/clients.conf"
	chmod 644 "$CONF/clients.conf"
	run "$MANDOS_BIN" ${cmd//\$DAEMON_ARGS/$DAEMON_ARGS}
	[[ $status -eq 1 && $output == *"[alpha] key_id"* ]]
	sed -i '/^key_id/d' "$CONF/clients.conf"
	run "$MANDOS_BIN" ${cmd//\$DAEMON_ARGS/$DAEMON_ARGS}
	echo "$output"
	[[ $status -eq 0 && ${lines[-1]} == "1 clients, 0 errors" ]]
}

@test "daemon: an unwritable state directory stops start-up before detaching, exit 1" {
	need_root "the state directory must belong to someone else than the server user"
	mkdir -p "$STATE"
	chmod 700 "$STATE"         # root's, and the server will run as _mandos
	printf '[alpha]\nsecret = aGVsbG8=\n' >"$CONF/clients.conf"
	chmod 644 "$CONF/clients.conf"
	# not --foreground: the launcher itself must say so and fail
	run --separate-stderr timeout 20 "$MANDOS_BIN" --no-zeroconf --no-dbus --configdir "$CONF" \
		--statedir "$STATE" --address ::1 --port "$(free_port)"
	echo "status=$status stderr=[$stderr]"
	if [[ $status -eq 0 ]]; then     # detached by mistake: stop it
		kill "$(cat /run/mandos.pid)" 2>/dev/null
		false
	fi
	[[ $status -eq 1 ]]
	[[ $stderr == *"state directory $STATE is not writable"* ]]
}
