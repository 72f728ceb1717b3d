#!/usr/bin/env bats
# The D-Bus control API, driven by Debian's own unmodified mandos-ctl and
# mandos-monitor (package mandos 1.8.16) on a private "system" bus that each
# test starts for itself (start_private_dbus).  The server runs as in
# start_server, but with D-Bus on.  Every wait is bounded; everything started
# here is started with spawn, so the teardown stops its whole process group.

load lib

PW_ALPHA='alpha over D-Bus'
PW_BETA='beta over D-Bus'

setup() {
	need_client
	need_server_bin
	need_ours "tests the D-Bus build of mandos.c"
	command -v mandos-ctl >/dev/null || skip "mandos-ctl not installed (package mandos)"
	command -v dbus-daemon >/dev/null || skip "dbus-daemon not installed"
	"$MANDOS_BIN" --version | grep -q 'D-Bus: sd-bus' ||
		skip "server built without D-Bus (DBUS=0)"
	CONF=$(make_confdir)
	# checkers run unprivileged with cwd /: they write here
	SCRATCH=$(mktemp -d /tmp/mandos-dbus-test.XXXXXX)
	chmod 777 "$SCRATCH"
	TMUX_PID=
	start_private_dbus
}

teardown() {
	if [[ -n ${TMUX_PID:-} ]]; then stop_pid "$TMUX_PID" 5; fi
	mandos_teardown
	if [[ -n ${SCRATCH:-} && -d $SCRATCH ]]; then rm -rf "$SCRATCH"; fi
}

# ctl ARG...: mandos-ctl on the private bus, bounded in time.
ctl() {
	timeout -k 2 20 mandos-ctl "$@"
}

# start_dbus_server CONFDIR [ARG...]: like start_server, without --no-dbus;
# returns once the port listens and (unless NO_BUS_WAIT=1) mandos-ctl
# reaches the server.  STATE_DIR overrides the state directory.
start_dbus_server() {
	local confdir=$1 i
	shift
	[[ -n ${PORT:-} ]] || PORT=$(free_port) || return 1
	SERVER_LOG="$BATS_TEST_TMPDIR/server.log"
	spawn "$MANDOS_BIN" --foreground --debug --no-zeroconf \
		--configdir "$confdir" --statedir "${STATE_DIR:-$BATS_TEST_TMPDIR/state}" \
		--address ::1 --port "$PORT" "$@" \
		>>"$SERVER_LOG" 2>&1 </dev/null
	SERVER_PID=$BG_PID
	for ((i = 0; i < 100; i++)); do
		if ! pid_running "$SERVER_PID"; then
			echo "server exited early; log tail:" >&2
			tail -n 40 "$SERVER_LOG" >&2
			SERVER_PID=
			return 1
		fi
		if port_listening "$PORT"; then
			[[ ${NO_BUS_WAIT:-0} == 1 ]] && return 0
			ctl >/dev/null 2>&1 && return 0
		fi
		sleep 0.1
	done
	echo "server not reachable (port $PORT, D-Bus) in time; log tail:" >&2
	tail -n 40 "$SERVER_LOG" >&2
	return 1
}

# prop CLIENT PROPERTY: one property from mandos-ctl --dump-json, as JSON.
prop() {
	ctl --dump-json "$1" | "$PYTHON" -c '
import json, sys
print(json.dumps(json.load(sys.stdin)[sys.argv[1]][sys.argv[2]]))' "$1" "$2"
}

# wait_for SECONDS COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
	local secs=$1 i
	shift
	for ((i = 0; i < secs * 5; i++)); do
		"$@" && return 0
		sleep 0.2
	done
	echo "timed out after ${secs}s waiting for: $*" >&2
	return 1
}

# client_in_background NAME SECONDS: run the real client in the background
# (spawn: in its own process group); its output goes to
# $BATS_TEST_TMPDIR/bg-NAME.out, its exit status to bg-NAME.rc when it
# ends.  CLIENT_PID is the group's ID.
client_in_background() {
	local name=$1 secs=$2 out="$BATS_TEST_TMPDIR/bg-$1"
	rm -f "$out.out" "$out.rc"
	spawn client_with_status "$name" "$secs" "$out"
	CLIENT_PID=$BG_PID
}

client_with_status() {
	local rc=0
	run_client "$1" "$2" >"$3.out" || rc=$?
	echo "$rc" >"$3.rc"
}

approval_pending() {
	[[ $(prop "$1" ApprovalPending) == true ]]
}

file_has() {
	grep -q -- "$2" "$1" 2>/dev/null
}

# start_monitor FILE: dbus-monitor on the private bus, everything the server
# sends, into FILE; returns once it listens.
start_monitor() {
	local file=$1
	spawn timeout -k 2 120 dbus-monitor --system "sender='se.recompile.Mandos'" \
		>"$file" 2>&1 </dev/null
	MONITOR_PID=$BG_PID
	wait_for 10 file_has "$file" 'member=NameLost'
}

# ------------------------------------------------------------------ listing

@test "dbus: mandos-ctl lists the clients; -v and --dump-json show every property" {
	command -v busctl >/dev/null || missing "busctl not installed (package systemd)"
	{
		client_section alpha "$PW_ALPHA" "checker = true" "interval = PT1S" |
			sed 's/^host = .*/host = alpha.example/'
		echo
		client_section beta "$PW_BETA" "enabled = false" "timeout = PT7M" "approval_delay = PT3S"
	} >"$CONF/clients.conf"
	start_dbus_server "$CONF"
	run ctl
	[ "$status" -eq 0 ]
	echo "$output"
	[[ ${lines[0]} == *Name*Enabled*Timeout* ]]
	[[ $output =~ alpha\ +Yes\ +00:05:00 ]]
	[[ $output =~ beta\ +No\ +00:07:00 ]]
	# wait for a checker, so that LastCheckedOK has a value too
	wait_for 15 eval '[[ $(prop alpha LastCheckedOK) != \"\" ]]'
	local key
	key=$(sed -n 's/^key_id = //p' "$CONF/clients.conf" | head -n 1)
	ctl --dump-json >"$BATS_TEST_TMPDIR/all.json"
	"$PYTHON" - "$BATS_TEST_TMPDIR/all.json" "$key" <<-'EOF'
	import datetime, json, re, sys
	data = json.load(open(sys.argv[1]))
	key = sys.argv[2].upper()
	props = ("ApprovalDelay ApprovalDuration ApprovalPending ApprovedByDefault "
	         "Checker CheckerRunning Created Enabled Expires ExtendedTimeout "
	         "Fingerprint Host Interval KeyID LastApprovalRequest LastCheckedOK "
	         "LastCheckerStatus LastEnabled Name Timeout").split()
	assert sorted(data) == ["alpha", "beta"], data.keys()
	now = datetime.datetime.utcnow()
	def when(text):
	    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in text else "%Y-%m-%dT%H:%M:%S"
	    return datetime.datetime.strptime(text, fmt)
	def recent(text):
	    return abs((now - when(text)).total_seconds()) < 120
	for name, p in data.items():
	    missing = set(props) - set(p)
	    assert not missing, (name, missing)
	    assert p["Name"] == name
	    assert recent(p["Created"]), p["Created"]
	    assert p["ExtendedTimeout"] == 900000 and p["ApprovalDuration"] == 1000
	    assert p["LastApprovalRequest"] == "" and p["ApprovalPending"] is False
	a, b = data["alpha"], data["beta"]
	assert a["KeyID"] == key and re.fullmatch("[0-9A-F]{64}", key), a["KeyID"]
	assert re.fullmatch("[0-9A-F]{40}", a["Fingerprint"]), a["Fingerprint"]
	assert a["Enabled"] is True and b["Enabled"] is False
	assert a["Host"] == "alpha.example" and a["Checker"] == "true"
	assert a["Interval"] == 1000 and b["Interval"] == 120000
	assert a["Timeout"] == 300000 and b["Timeout"] == 420000
	assert a["ApprovalDelay"] == 0 and b["ApprovalDelay"] == 3000
	assert a["ApprovedByDefault"] is True
	assert recent(a["LastEnabled"]) and b["LastEnabled"] == ""
	assert recent(a["LastCheckedOK"]) and b["LastCheckedOK"] == ""
	assert a["LastCheckerStatus"] == 0 and b["LastCheckerStatus"] == -2
	left = (when(a["Expires"]) - now).total_seconds()
	assert 200 < left < 310, a["Expires"]
	assert b["Expires"] == "" and b["CheckerRunning"] is False
	print("all properties plausible")
	EOF
	run ctl -v alpha
	[ "$status" -eq 0 ]
	echo "$output"
	for col in "Key ID" Fingerprint "Last Enabled" "Approval Delay" Checker Expires \
		"Last Checker Status" "Extended Timeout"; do
		[[ ${lines[0]} == *"$col"* ]]
	done
	[[ ${lines[1]} == *"${key^^}"* ]]
	# Secret is write-only: not listed, not readable; the property exists
	run ! grep -q Secret "$BATS_TEST_TMPDIR/all.json"
	run timeout 10 busctl --system get-property se.recompile.Mandos /clients/alpha \
		se.recompile.Mandos.Client Secret
	echo "busctl get-property Secret: $status $output"
	[ "$status" -ne 0 ]
	[[ $output == *"write-only"* || $output == *"ermission"* || $output == *"denied"* ]]
	run timeout 10 busctl --system introspect se.recompile.Mandos /clients/alpha \
		se.recompile.Mandos.Client
	[ "$status" -eq 0 ]
	[[ $output == *".Secret "*"property"* ]]
	# an unknown client name is an error
	run ctl nosuch
	[ "$status" -eq 1 ]
}

# ------------------------------------------------------------------ enabling

@test "dbus: --disable keeps the real client out, --enable lets it in; --is-enabled exit codes" {
	client_section alpha "$PW_ALPHA" >"$CONF/clients.conf"
	start_dbus_server "$CONF"
	run ctl --is-enabled alpha
	[ "$status" -eq 0 ]
	ctl --disable alpha
	run ctl --is-enabled alpha
	[ "$status" -eq 1 ]
	local rc=0
	run_client alpha 5 >"$BATS_TEST_TMPDIR/disabled.out" || rc=$?
	[ "$rc" -ne 0 ]
	[ ! -s "$BATS_TEST_TMPDIR/disabled.out" ]
	grep -q "Client alpha is disabled" "$SERVER_LOG"
	ctl --enable alpha
	run ctl --is-enabled alpha
	[ "$status" -eq 0 ]
	client_gets alpha "$PW_ALPHA"
	# the change was saved: after a restart alpha is still enabled, and a
	# disable survives a restart too
	ctl --disable alpha
	stop_server
	start_dbus_server "$CONF"
	run ctl --is-enabled alpha
	[ "$status" -eq 1 ]
}

# ------------------------------------------------------------------ approval

@test "dbus: approval_delay = PT30S, approved_by_default = false: --approve releases, --deny refuses" {
	client_section alpha "$PW_ALPHA" "approval_delay = PT30S" "approved_by_default = False" \
		>"$CONF/clients.conf"
	start_dbus_server "$CONF"
	client_in_background alpha 60
	wait_for 20 approval_pending alpha
	# the client is held while nobody decides
	sleep 1
	[ ! -e "$BATS_TEST_TMPDIR/bg-alpha.rc" ]
	ctl --approve alpha
	wait_for 15 test -e "$BATS_TEST_TMPDIR/bg-alpha.rc"
	[ "$(cat "$BATS_TEST_TMPDIR/bg-alpha.rc")" -eq 0 ]
	printf '%s' "$PW_ALPHA" | cmp - "$BATS_TEST_TMPDIR/bg-alpha.out"
	# server side: from the approval to the secret within a second
	"$PYTHON" - "$SERVER_LOG" <<-'EOF'
	import datetime, re, sys
	def stamp(line):
	    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
	lines = open(sys.argv[1], errors="replace").read().splitlines()
	approved = next(stamp(l) for l in lines if "Client alpha approved" in l)
	sent = next(stamp(l) for l in lines if "Sending secret to alpha" in l)
	delay = (sent - approved).total_seconds()
	print("approval to secret: %.3f s" % delay)
	assert 0 <= delay < 1, delay
	EOF
	[[ $(prop alpha ApprovalPending) == false ]]
	[[ $(prop alpha LastApprovalRequest) == *T* ]]
	# an approval counts for approval_duration (1 s) only
	sleep 2
	client_in_background alpha 60
	wait_for 20 approval_pending alpha
	ctl --deny alpha
	wait_for 10 file_has "$SERVER_LOG" "Client alpha was not approved"
	stop_group "$CLIENT_PID" 5
	[ ! -s "$BATS_TEST_TMPDIR/bg-alpha.out" ]
	refute_secrets "$CONF/clients.conf" "$SERVER_LOG"
}

@test "dbus: a reload that replaces a waiting client's key drops ApprovalPending" {
	# a reload reads clients.conf as the unprivileged user
	CONF=$(make_confdir "$SCRATCH/conf")
	client_section alpha "$PW_ALPHA" "approval_delay = PT30S" "approved_by_default = False" \
		>"$CONF/clients.conf"
	start_dbus_server "$CONF"
	client_in_background alpha 60
	wait_for 20 approval_pending alpha
	# alpha's section now carries beta's key: alpha's connection is revoked
	client_section beta "$PW_ALPHA" "approval_delay = PT30S" "approved_by_default = False" |
		sed 's/^\[beta\]/[alpha]/' >"$CONF/clients.conf"
	kill -HUP "$SERVER_PID"
	wait_for 10 file_has "$SERVER_LOG" "Reloaded: 1 clients"
	wait_for 10 eval '! approval_pending alpha' ||
		{ ctl -v alpha >&2; tail -n 20 "$SERVER_LOG" >&2; false; }
	# and stays down once the real client has given up on the old key
	stop_group "$CLIENT_PID" 5
	sleep 1
	[[ $(prop alpha ApprovalPending) == false ]]
}

# ------------------------------------------------------------------ settings

@test "dbus: a host with a newline or an ESC set over D-Bus logs as one escaped line" {
	client_section alpha "$PW_ALPHA" "checker = true %%(host)s" "interval = PT1S" \
		>"$CONF/clients.conf"
	start_dbus_server "$CONF"
	ctl --host $'evil\nFORGED: INFO: a line from D-Bus' alpha
	wait_for 15 file_has "$SERVER_LOG" 'evil\\x0AFORGED'
	ctl --host $'esc\e[31m' alpha
	wait_for 15 file_has "$SERVER_LOG" 'esc\\x1B\[31m'
	run ! grep -n '^FORGED' "$SERVER_LOG"
	run ! grep -n $'\e' "$SERVER_LOG"
}

@test "dbus: a CheckedOK loop saves the state at most every 100 ms; a disable is on disk at once" {
	command -v strace >/dev/null || missing "strace not installed"
	client_section alpha "$PW_ALPHA" "checker = true" "interval = PT1H" >"$CONF/clients.conf"
	start_dbus_server "$CONF"
	local trace="$BATS_TEST_TMPDIR/strace.out" calls renames i t0 ms
	spawn strace -f -qq -e trace=rename,renameat,renameat2 -o "$trace" -p "$SERVER_PID"
	local strace_pid=$BG_PID
	sleep 1
	# CheckedOK as fast as one caller can, for 2 s
	calls=$("$PYTHON" -c '
import dbus, time
c = dbus.SystemBus().get_object("se.recompile.Mandos", "/clients/alpha")
n, end = 0, time.monotonic() + 2
while time.monotonic() < end:
    c.CheckedOK(dbus_interface="se.recompile.Mandos.Client")
    n += 1
print(n)')
	sleep 0.5
	stop_group "$strace_pid"
	renames=$(grep -c 'clients.state' "$trace" || true)
	echo "CheckedOK calls in 2 s: $calls; state files renamed: $renames"
	((calls >= 100))
	((renames <= 40))
	ctl --disable alpha
	t0=$(date +%s%N)
	for ((i = 0; i < 200; i++)); do
		grep -qx 'cur.enabled 0' "$BATS_TEST_TMPDIR/state/clients.state" && break
		sleep 0.01
	done
	ms=$((($(date +%s%N) - t0) / 1000000))
	echo "the disable was on disk $ms ms after mandos-ctl returned"
	grep -qx 'cur.enabled 0' "$BATS_TEST_TMPDIR/state/clients.state"
	((ms < 1000))
}

@test "dbus: --checker and --host change the next checker run" {
	client_section alpha "$PW_ALPHA" "checker = true" "interval = PT1S" |
		sed 's/^host = .*/host = old.example/' >"$CONF/clients.conf"
	start_dbus_server "$CONF"
	ctl --host new.example alpha
	ctl --checker "echo %(host)s >> $SCRATCH/seen" alpha
	[[ $(prop alpha Host) == '"new.example"' ]]
	wait_for 15 file_has "$SCRATCH/seen" new.example
	run ! grep -q old.example "$SCRATCH/seen"
	# a checker that cannot be expanded is refused, the old one stays
	run ctl --checker "echo %(nosuch)s" alpha
	[[ $(prop alpha Checker) == *"$SCRATCH/seen"* ]]
	# CheckerCompleted/LastCheckerStatus follow the new command
	ctl --checker "false" alpha
	wait_for 15 eval '[[ $(prop alpha LastCheckerStatus) == 1 ]]'
}

@test "dbus: --timeout and --bump-timeout move the expiry; a past expiry disables" {
	client_section alpha "$PW_ALPHA" "checker = false" "timeout = PT1H" "interval = PT1H" \
		>"$CONF/clients.conf"
	start_dbus_server "$CONF"
	local before after
	before=$(prop alpha Expires)
	[[ $(prop alpha LastCheckedOK) == '""' ]]
	ctl --timeout PT10M alpha
	after=$(prop alpha Expires)
	[[ $(prop alpha Timeout) == 600000 ]]
	# the running expiry moved 50 minutes earlier
	"$PYTHON" -c '
import datetime, json, sys
def when(t):
    t = json.loads(t)
    return datetime.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%f" if "." in t else "%Y-%m-%dT%H:%M:%S")
moved = (when(sys.argv[1]) - when(sys.argv[2])).total_seconds()
print("moved by", moved)
assert abs(moved - 3000) < 5, moved' "$before" "$after"
	ctl --bump-timeout alpha
	[[ $(prop alpha LastCheckedOK) == *T* ]]
	"$PYTHON" -c '
import datetime, json, sys
t = json.loads(sys.argv[1])
when = datetime.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%f" if "." in t else "%Y-%m-%dT%H:%M:%S")
left = (when - datetime.datetime.utcnow()).total_seconds()
print("left", left)
assert 560 < left <= 601, left' "$(prop alpha Expires)"
	run ctl --is-enabled alpha
	[ "$status" -eq 0 ]
	# 10 minutes ahead minus 9 min 59 s: about a second left, then disabled
	ctl --timeout PT1S alpha
	wait_for 15 eval '! ctl --is-enabled alpha'
	grep -q "Disabling client alpha: timed out" "$SERVER_LOG"
	local rc=0
	run_client alpha 4 >"$BATS_TEST_TMPDIR/expired.out" || rc=$?
	[ "$rc" -ne 0 ]
	[ ! -s "$BATS_TEST_TMPDIR/expired.out" ]
}

@test "dbus: --secret replaces the secret until the next restart" {
	client_section alpha "$PW_ALPHA" >"$CONF/clients.conf"
	# the same key set, another password: its secret as raw bytes
	client_section alpha "replaced secret" | "$PYTHON" -c '
import base64, re, sys
text = sys.stdin.read()
b64 = re.search(r"^secret =(.*?)(?=^\S|\Z)", text, re.M | re.S).group(1)
sys.stdout.buffer.write(base64.b64decode("".join(b64.split())))' >"$BATS_TEST_TMPDIR/new-secret"
	[ -s "$BATS_TEST_TMPDIR/new-secret" ]
	start_dbus_server "$CONF"
	ctl --secret "$BATS_TEST_TMPDIR/new-secret" alpha
	client_gets alpha "replaced secret"
	# not saved: after a restart the configured secret is back
	stop_server
	start_dbus_server "$CONF"
	client_gets alpha "$PW_ALPHA"
}

# ------------------------------------------------------------------ removal

@test "dbus: --remove takes a client away; its key then gets nothing" {
	{
		client_section alpha "$PW_ALPHA"
		echo
		client_section beta "$PW_BETA"
	} >"$CONF/clients.conf"
	start_dbus_server "$CONF"
	ctl --remove beta
	run ctl
	echo "$output"
	[[ $output == *alpha* ]]
	[[ $output != *beta* ]]
	run ctl beta
	[ "$status" -eq 1 ]
	local rc=0
	run_client beta 5 >"$BATS_TEST_TMPDIR/removed.out" || rc=$?
	[ "$rc" -ne 0 ]
	[ ! -s "$BATS_TEST_TMPDIR/removed.out" ]
	grep -q "Client not found for key ID" "$SERVER_LOG"
	client_gets alpha "$PW_ALPHA"
}

# ------------------------------------------------------------------ signals

@test "dbus: dbus-monitor sees GotSecret, ClientNotFound, CheckerCompleted, PropertiesChanged" {
	keys_for stranger >/dev/null
	client_section alpha "$PW_ALPHA" "checker = true" "interval = PT1S" >"$CONF/clients.conf"
	start_dbus_server "$CONF"
	local mon="$BATS_TEST_TMPDIR/monitor.log"
	start_monitor "$mon"
	client_gets alpha "$PW_ALPHA"
	run_client stranger 3 >/dev/null || true
	wait_for 10 file_has "$mon" "member=GotSecret"
	wait_for 10 file_has "$mon" "member=ClientNotFound"
	wait_for 10 file_has "$mon" "member=CheckerCompleted"
	grep -q "path=/clients/alpha; interface=se.recompile.Mandos.Client; member=GotSecret" "$mon"
	# ClientNotFound(key ID, address)
	grep -A2 "member=ClientNotFound" "$mon" | grep -Eq 'string "[0-9A-F]{64}"'
	grep -A2 "member=ClientNotFound" "$mon" | grep -q 'string "::1"'
	grep -A1 "member=CheckerStarted" "$mon" | grep -q 'string "true"'
	grep -A40 "member=PropertiesChanged" "$mon" | grep -q 'string "LastCheckedOK"'
	# disabling is announced as a property change (and not before it)
	if grep -A1 'string "Enabled"' "$mon" | grep -q 'boolean false'; then
		echo "Enabled = false announced before the client was disabled" >&2
		false
	fi
	ctl --disable alpha
	wait_for 10 eval "grep -A1 'string \"Enabled\"' '$mon' | grep -q 'boolean false'"
}

@test "dbus: SIGHUP reload and shutdown announce InterfacesAdded and InterfacesRemoved" {
	# a reload reads clients.conf as the unprivileged user
	CONF=$(make_confdir "$SCRATCH/conf")
	{
		client_section alpha "$PW_ALPHA"
		echo
		client_section beta "$PW_BETA"
	} >"$CONF/clients.conf"
	start_dbus_server "$CONF"
	local mon="$BATS_TEST_TMPDIR/monitor.log"
	start_monitor "$mon"
	# beta leaves, gamma (no key) arrives
	{
		client_section alpha "$PW_ALPHA"
		echo
		printf '[gamma]\nsecret = aGVsbG8=\n'
	} >"$CONF/clients.conf"
	kill -HUP "$SERVER_PID"
	wait_for 10 eval '[[ $(ctl | sed 1d | cut -d" " -f1 | sort | xargs) == "alpha gamma" ]]' ||
		{ ctl >&2; tail -n 20 "$SERVER_LOG" >&2; false; }
	wait_for 10 file_has "$mon" 'object path "/clients/gamma"'
	grep -A1 "member=InterfacesRemoved" "$mon" | grep -q '"/clients/beta"'
	grep -A1 "member=InterfacesAdded" "$mon" | grep -q '"/clients/gamma"'
	client_gets alpha "$PW_ALPHA"
	stop_server
	wait_for 10 eval "grep -A1 'member=InterfacesRemoved' '$mon' | grep -q '\"/clients/alpha\"'"
}

# ------------------------------------------------------------------ monitor

@test "dbus: mandos-monitor (in tmux) shows the clients and follows changes" {
	command -v tmux >/dev/null || skip "tmux not installed"
	{
		client_section alpha "$PW_ALPHA" "checker = true" "interval = PT1S"
		echo
		client_section beta "$PW_BETA" "checker = true" "interval = PT1S"
	} >"$CONF/clients.conf"
	start_dbus_server "$CONF"
	local sock="$BATS_TEST_TMPDIR/tmux.sock"
	tmux -S "$sock" new-session -d -x 120 -y 30 \
		"env DBUS_SYSTEM_BUS_ADDRESS='$DBUS_SYSTEM_BUS_ADDRESS' TERM=xterm mandos-monitor" 3>&-
	TMUX_PID=$(tmux -S "$sock" display-message -p '#{pid}')
	screen() { tmux -S "$sock" capture-pane -p; }
	# a client whose checker has not run yet shows "A checker has failed!"
	wait_for 20 eval 'screen | grep -q "^alpha: " && screen | grep -q "^beta: "' ||
		{ screen >&2; false; }
	ctl --disable beta
	wait_for 10 eval 'screen | grep -q "beta: DISABLED"'
	client_gets alpha "$PW_ALPHA"
	wait_for 10 eval 'screen | grep -q "Client alpha received its secret"'
	screen
}

# ------------------------------------------------------------------ policy

# start_policy_dbus: replace the test bus by one with the stock system bus
# policy (/usr/share/dbus-1/system.conf: method calls refused unless
# allowed) plus only our etc/mandos-dbus.conf.
start_policy_dbus() {
	local d conf=/usr/share/dbus-1/system.conf i
	[[ -r $conf ]] || skip "no $conf to build a stock-policy bus from"
	stop_private_dbus
	d=$(mktemp -d /tmp/mandos-test-dbus.XXXXXX) || return 1
	chmod 755 "$d"
	sed -e '/<user>/d' -e '/<pidfile>/d' -e '/<syslog\/>/d' \
		-e '/<standard_system_servicedirs\/>/d' -e '/<include/d' \
		-e "s|<listen>.*</listen>|<listen>unix:path=$d/bus</listen>|" \
		-e "s|</busconfig>|<include>$BATS_TEST_DIRNAME/../etc/mandos-dbus.conf</include></busconfig>|" \
		"$conf" >"$d/bus.conf"
	spawn dbus-daemon --config-file="$d/bus.conf" --nofork --nopidfile \
		>"$d/dbus.log" 2>&1 </dev/null
	DBUS_PID=$BG_PID
	DBUS_DIR=$d
	for ((i = 0; i < 100; i++)); do
		[[ -S $d/bus ]] && break
		sleep 0.05
	done
	[[ -S $d/bus ]] || { cat "$d/dbus.log" >&2; return 1; }
	chmod 777 "$d/bus"
	export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$d/bus"
}

@test "dbus: etc/mandos-dbus.conf lets the server (as _mandos) own the name and root call it, not others" {
	getent group _mandos >/dev/null || skip "no _mandos group on this machine"
	command -v runuser >/dev/null || skip "runuser not installed"
	client_section alpha "$PW_ALPHA" >"$CONF/clients.conf"
	start_policy_dbus
	start_dbus_server "$CONF"
	[[ $(ps -o user= -p "$SERVER_PID") == _mandos ]]
	run ctl --is-enabled alpha
	[ "$status" -eq 0 ]
	run timeout -k 2 20 runuser -u nobody -- mandos-ctl --disable alpha
	echo "$output"
	[ "$status" -ne 0 ]
	[[ $output == *"Rejected send message"* ]]
	run ctl --is-enabled alpha
	[ "$status" -eq 0 ]
}

# ------------------------------------------------------------------ no bus

@test "dbus: --no-dbus, a missing bus, a taken name, a lost bus: the server still serves" {
	client_section alpha "$PW_ALPHA" >"$CONF/clients.conf"
	NO_BUS_WAIT=1 start_dbus_server "$CONF" --no-dbus
	run ctl
	[ "$status" -ne 0 ]
	client_gets alpha "$PW_ALPHA"
	run ! grep -q "D-Bus" "$SERVER_LOG"
	stop_server
	# no bus at the address given
	DBUS_SYSTEM_BUS_ADDRESS="unix:path=$BATS_TEST_TMPDIR/no-bus" NO_BUS_WAIT=1 \
		start_dbus_server "$CONF"
	wait_for 10 file_has "$SERVER_LOG" "D-Bus: could not connect to the system bus.*running without D-Bus"
	client_gets alpha "$PW_ALPHA"
	stop_server
	# a second server finds the name taken and serves anyway
	start_dbus_server "$CONF"
	local first_pid=$SERVER_PID first_port=$PORT
	track_pid "$first_pid"
	PORT=$(free_port)
	STATE_DIR="$BATS_TEST_TMPDIR/state2" NO_BUS_WAIT=1 start_dbus_server "$CONF"
	wait_for 10 file_has "$SERVER_LOG" "another process owns it; running without D-Bus"
	client_gets alpha "$PW_ALPHA"
	stop_server
	SERVER_PID=$first_pid PORT=$first_port
	# the bus goes away under the running server
	stop_private_dbus
	wait_for 10 file_has "$SERVER_LOG" "D-Bus: connection lost"
	assert_server_alive
	client_gets alpha "$PW_ALPHA"
}

@test "dbus: a DBUS=0 build serves without a bus and says why" {
	local bin="$BATS_TEST_DIRNAME/../mandos-nodbus"
	[[ -x $bin ]] || skip "DBUS=0 build not made: $bin (make mandos-nodbus)"
	"$bin" --version | grep -q 'D-Bus: none'
	client_section alpha "$PW_ALPHA" >"$CONF/clients.conf"
	MANDOS_BIN=$bin NO_BUS_WAIT=1 start_dbus_server "$CONF"
	wait_for 10 file_has "$SERVER_LOG" "built without D-Bus support"
	run ctl
	[ "$status" -ne 0 ]
	client_gets alpha "$PW_ALPHA"
}
