#!/usr/bin/env bats
# Taking over from the reference server (issue 14): its clients.pickle,
# imported by etc/mandos-import-pickle, keeps a disabled client disabled;
# without the import ours refuses to start; a pickle that would run code is
# refused without running it.

load lib

IMPORT="$BATS_TEST_DIRNAME/../etc/mandos-import-pickle"
REF_BIN=${REF_BIN:-/usr/sbin/mandos}
OURS_BIN=$MANDOS_BIN

setup() {
	CONF=$(make_confdir)
	# the server's user owns the state directory, as Debian's package has it;
	# ours reads clients.state with that user's rights
	REF_STATE_DIR=$(mktemp -d /tmp/mandos-test-state.XXXXXX)
	chown "$(id -un _mandos 2>/dev/null || echo nobody):" "$REF_STATE_DIR"
}

teardown() {
	mandos_teardown
}

# reference_until TEXT [SECONDS]: run the reference server until its log
# says TEXT, SECONDS more (default 0), then SIGTERM it; it leaves
# clients.pickle in $REF_STATE_DIR.  Its save races with gpg-agent now and
# then: try again.
reference_until() {
	local try
	[[ -x $REF_BIN ]] || missing "reference server not installed: $REF_BIN"
	for try in 1 2 3; do
		MANDOS_BIN=$REF_BIN start_server "$CONF" || return 1
		wait_for_log "$1" 20 || return 1
		sleep "${2:-0}"
		stop_server
		[[ -s $REF_STATE_DIR/clients.pickle ]] && return 0
		echo "# try $try: the reference saved no clients.pickle; again" >&2
		mv "$SERVER_LOG" "$SERVER_LOG.$try"
	done
	return 1
}

@test "migrate: a client the reference disabled stays disabled under ours" {
	need_client
	client_section alpha 'alpha pw' 'checker = false' 'timeout = PT2S' 'interval = PT1S' \
		>"$CONF/clients.conf"
	# the reference disables a timed-out client without a log line
	reference_until "Checker for alpha failed" 4
	# a checker that succeeds: only the imported state can keep alpha disabled
	sed -i 's/^checker = false$/checker = true/' "$CONF/clients.conf"
	# before the import, ours refuses the reference's real pickle
	run timeout 20 "$OURS_BIN" --foreground --no-zeroconf --no-dbus --configdir "$CONF" \
		--statedir "$REF_STATE_DIR" --address ::1 --port "$(free_port)"
	echo "$output"
	[[ $status -eq 1 && $output == *"$REF_STATE_DIR/clients.pickle"* ]]
	[[ $output == *mandos-import-pickle* && ! -e $REF_STATE_DIR/clients.state ]]
	run "$IMPORT" --configdir "$CONF" --statedir "$REF_STATE_DIR"
	echo "$output"
	[[ $status -eq 0 && $output == "imported 1 clients from "* ]]
	grep -qx "cur.enabled 0" "$REF_STATE_DIR/clients.state"
	[[ $(tail -n 1 "$REF_STATE_DIR/clients.state") == "total 1" ]]
	[[ $(stat -c %a "$REF_STATE_DIR/clients.state") == 600 ]]
	[[ -s $REF_STATE_DIR/clients.pickle ]]      # left in place
	MANDOS_BIN=$OURS_BIN start_server "$CONF" --statedir "$REF_STATE_DIR"
	local rc=0
	run_client alpha 5 >"$BATS_TEST_TMPDIR/got" || rc=$?
	[[ $rc -ne 0 && ! -s $BATS_TEST_TMPDIR/got ]]
	grep -q "Client alpha is disabled" "$SERVER_LOG"
}

@test "migrate: a client the reference kept enabled is served after the import" {
	need_client
	client_section alpha 'alpha pw' 'checker = true' 'interval = PT1S' >"$CONF/clients.conf"
	reference_until "Checker for alpha succeeded"
	run "$IMPORT" --configdir "$CONF" --statedir "$REF_STATE_DIR"
	[[ $status -eq 0 ]]
	grep -qx "cur.enabled 1" "$REF_STATE_DIR/clients.state"
	grep -Eq "^last_checked_ok [1-9][0-9]+$" "$REF_STATE_DIR/clients.state"
	MANDOS_BIN=$OURS_BIN start_server "$CONF" --statedir "$REF_STATE_DIR"
	client_gets alpha 'alpha pw'
}

@test "migrate: with clients.pickle and no clients.state ours refuses to start" {
	need_ours "the refusal is ours"
	need_server_bin
	local state=$BATS_TEST_TMPDIR/state
	mkdir -p "$state"
	chmod 777 "$state"          # ours runs unprivileged once started
	echo 'not really a pickle' >"$state/clients.pickle"
	run "$MANDOS_BIN" --foreground --no-zeroconf --no-dbus --configdir "$CONF" \
		--statedir "$state" --address ::1 --port "$(free_port)"
	echo "$output"
	[[ $status -eq 1 ]]
	[[ $output == *"$state/clients.pickle"* ]]
	[[ $output == *mandos-import-pickle* && $output == *--no-restore* ]]
	[[ ! -e $state/clients.state ]]
	# --no-restore starts anyway
	start_server "$CONF" --no-restore
	assert_server_alive
}

@test "migrate: a crafted pickle is refused without running its code" {
	local state=$BATS_TEST_TMPDIR/crafted marker=$BATS_TEST_TMPDIR/ran
	mkdir -p "$state"
	"$PYTHON" - "$state/clients.pickle" "$marker" <<-'EOF'
	import os, pickle, sys
	class Evil:
	    def __reduce__(self):
	        return (os.system, ("touch " + sys.argv[2],))
	with open(sys.argv[1], "wb") as f:
	    pickle.dump(({"alpha": {"enabled": Evil()}}, {}), f, protocol=2)
	EOF
	run "$IMPORT" --configdir "$CONF" --statedir "$state"
	echo "$output"
	[[ $status -eq 1 ]]
	[[ $output == *"refusing to load posix.system"* ]]
	[[ ! -e $marker && ! -e $state/clients.state ]]
}

@test "migrate: the import does nothing without a pickle, and never overwrites clients.state" {
	local state=$BATS_TEST_TMPDIR/state
	mkdir -p "$state"
	run "$IMPORT" --configdir "$CONF" --statedir "$state"
	[[ $status -eq 0 && -z $output && ! -e $state/clients.state ]]
	echo 'not really a pickle' >"$state/clients.pickle"
	echo 'ours' >"$state/clients.state"
	run "$IMPORT" --configdir "$CONF" --statedir "$state"
	[[ $status -eq 0 && $output == *"already exists"* ]]
	[[ $(cat "$state/clients.state") == ours ]]
}
