#!/usr/bin/env bats
# The process around the server: no core dumps, files read as the server
# user, and checker process groups that end with their checker (issue 12,
# finding 8).  Every wait is bounded; strays are found by a marker argument
# unique to the test and killed by PID.

load lib

setup() {
	need_server_bin
	need_root "switches users"
	CONF=$(make_confdir)
	# checkers run unprivileged with cwd /: they write here
	OUT=$(mktemp -d /tmp/mandos-process.XXXXXX)
	chmod 1777 "$OUT"
	# sleep sums its arguments: 9 and then digits of nobody else's
	MARK="9$(printf '%06d' $((RANDOM * 32 % 1000000)))$$"
}

teardown() {
	mandos_teardown
	local pid
	for pid in $(pgrep -f "^sleep $MARK\$"); do kill -KILL "$pid" 2>/dev/null; done
	rm -rf "$OUT"
}

# strays: how many processes run `sleep $MARK`.
strays() {
	pgrep -fc "^sleep $MARK\$" || true
}

# ------------------------------------------------------------ core dumps

@test "process: no core dumps: core size limit 0, and not dumpable when started unprivileged" {
	need_ours "mandos.c start-up"
	printf '[a]\nsecret = aGVsbG8=\n' >"$CONF/clients.conf"
	start_server "$CONF"
	grep -E '^Max core file size +0 +0 ' "/proc/$SERVER_PID/limits" ||
		{ grep core "/proc/$SERVER_PID/limits" >&2; false; }
	stop_server
	# started as nobody there is no setuid to clear the dumpable flag: only
	# prctl does; the kernel then gives the files in /proc/PID to root
	local conf="$OUT/conf"
	mkdir -m 755 "$conf"
	printf '[a]\nsecret = aGVsbG8=\n' >"$conf/clients.conf"
	PORT=$(free_port)
	SERVER_LOG="$BATS_TEST_TMPDIR/nobody.log"
	spawn setpriv --reuid=nobody --regid=nogroup --clear-groups "$MANDOS_BIN" \
		--foreground --debug --no-zeroconf --no-dbus --configdir "$conf" \
		--statedir "$OUT/state" --address ::1 --port "$PORT" >"$SERVER_LOG" 2>&1 </dev/null
	SERVER_PID=$BG_PID
	local i
	for ((i = 0; i < 200; i++)); do port_listening "$PORT" && break; sleep 0.05; done
	assert_server_alive
	echo "/proc/$SERVER_PID/environ belongs to $(stat -c %U "/proc/$SERVER_PID/environ")" >&2
	[[ $(ps -o user= -p "$SERVER_PID") == nobody ]]
	[[ $(stat -c %U "/proc/$SERVER_PID/environ") == root ]]
	run setpriv --reuid=nobody --regid=nogroup --clear-groups cat "/proc/$SERVER_PID/environ"
	[[ $status -ne 0 ]]
}

# ------------------------------------------------- files as the server user

@test "process: a secfile the server user cannot read is refused at start-up as at reload" {
	need_ours "reloads clients.conf"
	printf 'secret bytes' >"$CONF/secret.bin"
	chmod 644 "$CONF/secret.bin"
	printf '[a]\nsecfile = secret.bin\n' >"$CONF/clients.conf"
	start_server "$CONF"
	chmod 600 "$CONF/secret.bin"
	kill -HUP "$SERVER_PID"
	wait_for_log "Reload refused" 10
	grep -q 'secfile "[^"]*secret.bin": Permission denied' "$SERVER_LOG"
	stop_server
	# the same file at start-up: the same verdict, not a secret read as root
	run timeout -k 2 10 "$MANDOS_BIN" --foreground --no-zeroconf --no-dbus --configdir "$CONF" \
		--statedir "$BATS_TEST_TMPDIR/state" --address ::1 --port "$(free_port)"
	echo "$output" >&2
	[[ $status -eq 1 ]]
	[[ $output == *'secfile "'*'secret.bin": Permission denied'* ]]
}

@test "process: a clients.conf only root can read is read at start-up, with a warning about reloads" {
	need_ours "reloads clients.conf"
	printf '[a]\nsecret = aGVsbG8=\n' >"$CONF/clients.conf"
	chmod 600 "$CONF/clients.conf"
	start_server "$CONF"
	grep -E 'WARNING.*clients.conf.*(reload|SIGHUP)' "$SERVER_LOG"
	kill -HUP "$SERVER_PID"
	wait_for_log "Reload refused" 10
	# readable by the group it runs as: no warning
	stop_server
	chmod 640 "$CONF/clients.conf"
	chgrp "$(id -gn _mandos 2>/dev/null || id -gn nobody)" "$CONF/clients.conf"
	start_server "$CONF"
	run grep -E 'WARNING.*clients.conf.*(reload|SIGHUP)' "$SERVER_LOG"
	[[ $status -eq 1 ]]
}

# ------------------------------------------------------------- checkers

@test "process: a checker's background child ends with it; no process left per interval" {
	need_ours "checker process groups"
	printf '[a]\nsecret = aGVsbG8=\ninterval = 1s\nchecker = sleep %s & true\n' "$MARK" \
		>"$CONF/clients.conf"
	start_server "$CONF"
	wait_for_log "Checker for a succeeded" 10
	sleep 4.5
	local n
	n=$(grep -c "Checker for a succeeded" "$SERVER_LOG")
	echo "checkers run: $n, sleeps left: $(strays)" >&2
	(( n >= 4 ))
	(( $(strays) <= 1 ))
}

@test "process: a stopped checker gets SIGTERM, then SIGKILL if it ignores it" {
	need_ours "checker signals"
	printf '[a]\nsecret = aGVsbG8=\ninterval = 1s\ntimeout = 2s\n%s\n' \
		"checker = trap 'echo term >> $OUT/term' TERM; while :; do sleep $MARK; done" \
		>"$CONF/clients.conf"
	start_server "$CONF"
	local i
	for ((i = 0; i < 100; i++)); do (( $(strays) > 0 )) && break; sleep 0.05; done
	(( $(strays) > 0 ))
	wait_for_log "Disabling client a: timed out" 10
	local t0=$(date +%s%N)
	for ((i = 0; i < 100; i++)); do (( $(strays) == 0 )) && break; sleep 0.05; done
	echo "group gone $(( ($(date +%s%N) - t0) / 1000000 )) ms after the disable" >&2
	(( $(strays) == 0 ))
	# the shell saw the SIGTERM and carried on; only SIGKILL ended it
	for ((i = 0; i < 40; i++)); do [[ -s $OUT/term ]] && break; sleep 0.05; done
	[[ $(cat "$OUT/term") == term* ]]
}

@test "process: SIGTERM with five checkers that ignore SIGTERM still exits within a second" {
	need_ours "checker signals"
	local i
	for i in 1 2 3 4 5; do
		printf '[c%s]\nsecret = aGVsbG8=\ninterval = 1s\nchecker = trap "" TERM; sleep %s\n\n' \
			"$i" "$MARK"
	done >"$CONF/clients.conf"
	start_server "$CONF"
	for ((i = 0; i < 100; i++)); do (( $(strays) >= 5 )) && break; sleep 0.05; done
	(( $(strays) >= 5 ))
	local pid=$SERVER_PID t0 st=0 ms
	t0=$(date +%s%N)
	kill -TERM "$pid"
	wait "$pid" || st=$?
	ms=$(( ($(date +%s%N) - t0) / 1000000 ))
	SERVER_PID=
	echo "exit status $st after $ms ms; sleeps left: $(strays)" >&2
	[[ $st -eq 0 ]]
	(( ms < 3000 ))
	for ((i = 0; i < 20; i++)); do (( $(strays) == 0 )) && break; sleep 0.05; done
	(( $(strays) == 0 ))
}

# ------------------------------------------------------- reload and NSS

@test "process: a reload reads no password or group database (the server user is resolved at start-up)" {
	need_ours "mandos.c reload"
	command -v strace >/dev/null || missing "strace not installed"
	printf '[a]\nsecret = aGVsbG8=\n' >"$CONF/clients.conf"
	start_server "$CONF"
	local trace="$BATS_TEST_TMPDIR/strace.out"
	spawn strace -f -qq -e trace=open,openat,connect -o "$trace" -p "$SERVER_PID"
	local strace_pid=$BG_PID
	sleep 1
	kill -HUP "$SERVER_PID"
	wait_for_log "Reloaded: 1 clients" 10
	sleep 0.5
	stop_group "$strace_pid"
	cat "$trace"
	grep -q 'clients.conf' "$trace"          # strace saw the reload
	run ! grep -E '/etc/(passwd|group|nsswitch)|nscd|sss|systemd/userdb' "$trace"
}
