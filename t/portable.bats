#!/usr/bin/env bats
# What section 1 (portability) promises, run against every build: ./mandos
# and mandos-portable, which pretends the Linux extras are missing
# (make check sets MANDOS_PORTABLE=1 for that run).

load lib

setup() {
	need_client
	CONF=$(make_confdir)
	# checkers run as the unprivileged user: give them a place to write
	OUT=$(mktemp -d /tmp/mandos-portable.XXXXXX)
	chmod 1777 "$OUT"
}

teardown() {
	mandos_teardown
	rm -rf "$OUT"
}

@test "portable: a checker inherits no descriptor of the server or of whoever started it" {
	local marker="$OUT/inherited-marker"
	: >"$marker"
	client_section alpha 'alpha pw' "checker = ls -l /proc/self/fd/ > $OUT/fds" \
		'interval = 1s' >"$CONF/clients.conf"
	start_server "$CONF" 7<"$marker"
	local i
	for ((i = 0; i < 100; i++)); do [[ -s $OUT/fds ]] && break; sleep 0.05; done
	cat "$OUT/fds" >&2
	# the listing works: it shows its own output file as descriptor 1
	grep -q " 1 -> $OUT/fds\$" "$OUT/fds"
	refute_in_file inherited-marker "$OUT/fds"
	refute_in_file 'socket:' "$OUT/fds"
	refute_in_file "$CONF" "$OUT/fds"
	refute_in_file "$BATS_TEST_TMPDIR/state" "$OUT/fds"
}

@test "portable: --interface naming no interface logs an ERROR, then serves on every interface" {
	client_section alpha 'alpha pw' 'checker = true' >"$CONF/clients.conf"
	start_server "$CONF" --interface nosuchif0
	grep -q 'Interface nosuchif0 does not exist, cannot bind' "$SERVER_LOG"
	client_gets alpha 'alpha pw'
}

# mandos-portable has no way to bind to an interface, as on the BSDs.
@test "portable: --interface lo serves there, or refuses to start where it cannot bind" {
	need_ours "mandos.c refuses --interface on a system without SO_BINDTODEVICE"
	client_section alpha 'alpha pw' 'checker = true' >"$CONF/clients.conf"
	if [[ ${MANDOS_PORTABLE:-0} == 1 ]]; then
		run timeout 10 "$MANDOS_BIN" --foreground --no-zeroconf --no-dbus \
			--configdir "$CONF" --statedir "$BATS_TEST_TMPDIR/state" \
			--address ::1 --port "$(free_port)" --interface lo
		echo "$output" >&2
		[[ $status -ne 0 ]]
		[[ $output == *"--interface lo: this system cannot bind a socket to an interface"* ]]
	else
		start_server "$CONF" --interface lo
		client_gets alpha 'alpha pw'
		refute_in_file 'ERROR' "$SERVER_LOG"
	fi
}

# The binding is real: bound to one interface, the server is not reached
# through another (here lo, inside a private network namespace).
@test "portable: bound to one interface, the server does not answer on another" {
	need_root "creates a dummy interface in a network namespace"
	need_ours "needs SO_BINDTODEVICE"
	[[ ${MANDOS_PORTABLE:-0} != 1 ]] || skip "this build cannot bind to an interface"
	command -v ip >/dev/null || skip "ip not installed"
	local port log="$BATS_TEST_TMPDIR/ns.log" pid i
	NS="mcs-port-$$-$RANDOM"
	ip netns add "$NS"
	track_netns "$NS"    # deleted by mandos_teardown, also when the test fails
	ip -n "$NS" link add d0 type veth peer name d1
	ip -n "$NS" link set d0 up
	ip -n "$NS" link set d1 up
	ip -n "$NS" link set lo up
	printf '[a]\nsecret=\n' >"$CONF/clients.conf"
	port=$(free_port)
	ip netns exec "$NS" "$MANDOS_BIN" --foreground --debug --no-zeroconf --no-dbus \
		--configdir "$CONF" --statedir "$BATS_TEST_TMPDIR/state" \
		--port "$port" --interface d0 >"$log" 2>&1 3>&- &
	pid=$!
	for ((i = 0; i < 100; i++)); do
		grep -q "Now listening" "$log" && break
		sleep 0.05
	done
	local rc=0
	ip netns exec "$NS" "$PYTHON" -c '
import socket, sys
s = socket.create_connection(("::1", int(sys.argv[1])), timeout=3)
' "$port" 2>/dev/null || rc=$?
	stop_pid "$pid" 5
	grep -v GnuTLS "$log" | tail -5 >&2
	grep -q "Now listening" "$log"
	[[ $rc -ne 0 ]]
}
