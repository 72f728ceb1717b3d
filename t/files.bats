#!/usr/bin/env bats
# Odd files where the server expects its own (issue 12, findings 2, 3 and
# the state-directory part of 8): a FIFO or a /dev/zero link as
# clients.conf, a secfile or the state file; empty, cut-short and hostile
# state files; two servers on one state directory.  Every start is bounded
# in time and, for a build without sanitizer, in memory, so that a server
# that hangs or reads without end fails the test instead of the machine.

load lib

PW='files pässword'

setup() {
	need_server_bin
	need_ours "tests mandos.c's own file handling and state format"
	CONF=$(make_confdir)
	STATE="$BATS_TEST_TMPDIR/state"
	RUN_USER=$(id -un _mandos 2>/dev/null || echo nobody)
}

teardown() {
	mandos_teardown
}

# state_dir: the state directory as the server would make it (its user's).
state_dir() {
	mkdir -p "$STATE"
	chown "$RUN_USER:" "$STATE"
	chmod 700 "$STATE"
}

# one_client: clients.conf with one client served by a base64 secret.
one_client() {
	client_section alpha "$PW" 'checker = true' >"$CONF/clients.conf"
}

# start_bounded [ARG...]: run the server in the foreground as `run` does,
# killed after 15 s (124) and, unless sanitized, limited to 1 GB of memory.
start_bounded() {
	local limit=()
	grep -qa __asan_init "$MANDOS_BIN" || limit=(prlimit --as=1000000000)
	run --separate-stderr timeout -k 2 15 "${limit[@]}" "$MANDOS_BIN" --foreground \
		--no-zeroconf --no-dbus --configdir "$CONF" --statedir "$STATE" \
		--address ::1 --port "$(free_port)" "$@"
	echo "status $status; stderr: $stderr"
}

# ------------------------------------------------------------ not a file

@test "files: a FIFO as clients.conf at SIGHUP is refused; the old clients serve, SIGTERM works" {
	need_client
	one_client
	start_server "$CONF"
	mv "$CONF/clients.conf" "$CONF/clients.conf.real"
	mkfifo "$CONF/clients.conf"
	kill -HUP "$SERVER_PID"
	wait_for_log 'Reload refused' 5
	grep 'clients.conf.*not a regular file' "$SERVER_LOG"
	client_gets alpha "$PW"
	kill -TERM "$SERVER_PID"
	local i
	for ((i = 0; i < 60; i++)); do pid_running "$SERVER_PID" || break; sleep 0.05; done
	run ! pid_running "$SERVER_PID"
	SERVER_PID=
}

@test "files: a FIFO as secfile stops start-up with a clear error, without hanging" {
	mkfifo "$CONF/alpha.secret"
	printf '[alpha]\nkey_id = %064d\nsecfile = alpha.secret\n' 1 >"$CONF/clients.conf"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'[alpha] secfile "'*'/alpha.secret": not a regular file'* ]]
}

@test "files: /dev/zero linked as secfile stops start-up with a clear error, no memory blow-up" {
	ln -s /dev/zero "$CONF/alpha.secret"
	printf '[alpha]\nkey_id = %064d\nsecfile = alpha.secret\n' 1 >"$CONF/clients.conf"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'alpha.secret": not a regular file'* ]]
}

@test "files: a FIFO as the state file stops start-up with a clear error, without hanging" {
	one_client
	state_dir
	mkfifo "$STATE/clients.state"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'clients.state: cannot read saved state: not a regular file'* ]]
	[[ $stderr == *--no-restore* ]]
}

@test "files: /dev/zero linked as the state file is refused: no symlink is followed" {
	one_client
	state_dir
	ln -s /dev/zero "$STATE/clients.state"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'clients.state: cannot read saved state: a symbolic link'* ]]
}

@test "files: the state file is read with the server user's rights, and must be its own or root's" {
	one_client
	state_dir
	# a root-only file linked in: root could read it, the server user not
	printf 'root only\n' >"$BATS_TEST_TMPDIR/root-only"
	chmod 600 "$BATS_TEST_TMPDIR/root-only"
	ln "$BATS_TEST_TMPDIR/root-only" "$STATE/clients.state"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'clients.state: cannot read saved state: Permission denied'* ]]
	rm "$STATE/clients.state"
	printf 'mandos-c-state 1\ntotal 0\n' >"$STATE/clients.state"
	chown 4242 "$STATE/clients.state"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'clients.state: cannot read saved state: owned by uid 4242'* ]]
}

@test "files: a symbolic link as the state directory is refused" {
	one_client
	state_dir
	mv "$STATE" "$STATE.real"
	ln -s "$STATE.real" "$STATE"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *"cannot open state directory $STATE"* ]]
	# a trailing slash makes O_NOFOLLOW follow the last link: stripped
	run --separate-stderr timeout -k 2 15 "$MANDOS_BIN" --foreground --no-zeroconf \
		--no-dbus --configdir "$CONF" --statedir "$STATE/" --address ::1 --port "$(free_port)"
	echo "status $status; stderr: $stderr"
	[[ $status -eq 1 && $stderr == *"cannot open state directory $STATE"* ]]
	[[ ! -e $STATE.real/mandos.lock ]]
}

@test "files: the lock file must be a regular file of its own: a hard link is refused, its target untouched" {
	one_client
	state_dir
	echo "root's own data" >"$BATS_TEST_TMPDIR/target"
	ln "$BATS_TEST_TMPDIR/target" "$STATE/mandos.lock"
	start_bounded
	[[ $status -eq 1 && $stderr == *"mandos.lock: not a regular file with one link"* ]]
	[[ $(cat "$BATS_TEST_TMPDIR/target") == "root's own data" ]]
}

@test "files: a clients.conf over the 256 MiB cap is refused before it is read" {
	truncate -s 300M "$CONF/clients.conf"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'clients.conf'*'larger than 256 MiB'* ]]
}

# ------------------------------------------------------------ the marker

@test "files: a 0-byte state file is corrupt: the server refuses to start, naming --no-restore" {
	one_client
	state_dir
	: >"$STATE/clients.state"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'clients.state'*'empty'* ]]
	[[ $stderr == *'--no-restore'* ]]
	# the way out that the message names
	start_server "$CONF" --no-restore
}

@test "files: a state file cut short or with the wrong count is corrupt" {
	one_client
	start_server "$CONF"
	stop_server
	local whole="$BATS_TEST_TMPDIR/whole.state" n
	cp "$STATE/clients.state" "$whole"
	n=$(wc -l <"$whole")
	# after the header; in the middle of the record; without the marker
	for keep in 1 5 $((n - 1)); do
		head -n "$keep" "$whole" >"$STATE/clients.state"
		start_bounded
		[[ $status -eq 1 ]]
		[[ $stderr == *'the saved state is corrupt'*'--no-restore'* ]]
	done
	[[ $stderr == *'no "total" line'* ]]
	# the marker counts the clients
	[[ $(tail -n 1 "$whole") == 'total 1' ]]
	sed 's/^total 1$/total 2/' "$whole" >"$STATE/clients.state"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'clients.state:'*'total 2'*'1 client'* ]]
	# the whole file still starts
	cp "$whole" "$STATE/clients.state"
	start_server "$CONF"
}

@test "files: restored milliseconds out of range are corrupt, not added to the clock" {
	one_client
	start_server "$CONF"
	stop_server
	sed -i 's/^cur.interval .*/cur.interval 9223372036854775807/' "$STATE/clients.state"
	grep -x 'cur.interval 9223372036854775807' "$STATE/clients.state"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *'clients.state:'*'cur.interval'* ]]
	[[ $stderr == *'--no-restore'* ]]
}

# ------------------------------------------------------------ the lock

@test "files: a second server on the same state directory names the first's PID and exits 1" {
	one_client
	start_server "$CONF"
	start_bounded
	[[ $status -eq 1 ]]
	[[ $stderr == *"state directory $STATE"*"PID $SERVER_PID"* ]]
	# --test-config is not blocked by the lock
	start_bounded --test-config
	[[ $status -eq 0 ]]
	assert_server_alive
	# the first one's state survives untouched, and so does its lock
	stop_server
	start_server "$CONF"
}
