#!/usr/bin/env bats
# The differential test against the reference server (issue 13): ./mandos
# and /usr/sbin/mandos on the same files and the same version lines, every
# disagreement classified by t/differences (t/difftest/driver.py).  The list
# itself is checked against the manual.  Disagreements matched by
# t/difftest/known-failing (open items of issue 13) are reported as
# KNOWN-FAILING on the TAP stream; any other undocumented one fails.
#
# DIFFTEST_N (default 30) and DIFFTEST_SEED (default 13) set the random run.

load lib
bats_require_minimum_version 1.5.0

REF_BIN=${REF_BIN:-/usr/sbin/mandos}
DRIVER="$BATS_TEST_DIRNAME/difftest/driver.py"

# need_reference: the tests that run both servers.  Only a missing
# reference is a reason to skip; anything else the test needs must be there.
need_reference() {
	[[ -x $REF_BIN ]] || skip "reference server not installed: $REF_BIN (package mandos)"
	need_server_bin
	need_ours "compares mandos.c with the reference"
	[[ $(id -u) -eq 0 ]] || { echo "the servers switch users: run as root" >&2; return 1; }
	local tool
	for tool in busctl dbus-daemon; do
		command -v "$tool" >/dev/null || { echo "$tool missing: t/deps.sh test" >&2; return 1; }
	done
	"$MANDOS_BIN" --version | grep -q 'D-Bus: sd-bus' ||
		{ echo "$MANDOS_BIN is built without D-Bus: nothing to compare" >&2; return 1; }
}

# show: the driver's report lines that matter, on the TAP stream.
show() {
	local what='KNOWN-FAILING|UNDOCUMENTED|FAILED|looks fixed|configs,|version lines,|of the undoc'
	grep -E "$what" \
		<<<"$output" | sed 's/^/# /' >&3 || true
}

# ids_in_manual: the difference-ID ids (listitem ids and anchors) of the
# DIFFERENCES FROM THE REFERENCE SERVER section of mandos.8.xml.
ids_in_manual() {
	"$PYTHON" - "$BATS_TEST_DIRNAME/../mandos.8.xml" <<-'EOF'
	import re, sys
	text = open(sys.argv[1], encoding="utf-8").read()
	start = text.index('<refsect1 id="differences">')
	section = text[start:text.index("</refsect1>", start)]
	for m in re.finditer(r'<(listitem|anchor) id="difference-([^"]+)"', section):
	    print(m.group(2))
	# every listitem of the section carries an id
	if section.count("<listitem>"):
	    print("a listitem without an id", file=sys.stderr)
	    sys.exit(1)
	EOF
}

@test "difftest: every id of t/differences is in the manual's DIFFERENCES section, and back" {
	run "$PYTHON" "$DRIVER" list-ids
	[ "$status" -eq 0 ] || { echo "$output"; false; }
	local list=$output
	run ids_in_manual
	[ "$status" -eq 0 ] || { echo "$output"; false; }
	local manual=$output
	[ -n "$list" ] && [ -n "$manual" ]
	local missing
	missing=$(comm -3 <(sort <<<"$list") <(sort <<<"$manual"))
	if [[ -n $missing ]]; then
		echo "only in t/differences (left) or only in mandos.8.xml (right):"
		echo "$missing"
		false
	fi
	[ "$(sort <<<"$manual" | uniq -d)" = "" ]
}

@test "difftest: the Bats tests named by t/differences exist" {
	local n=0 file name test
	while IFS= read -r test; do
		[[ $test == none:* ]] && continue
		file=${test%%: *}
		name=${test#*: }
		grep -qF "@test \"$name\"" "$BATS_TEST_DIRNAME/../$file" ||
			{ echo "t/differences names a test that does not exist: $test"; false; }
		n=$((n + 1))
	done < <(sed -n 's/^test: //p' "$BATS_TEST_DIRNAME/differences")
	[ "$n" -ge 10 ]
}

@test "difftest: t/differences refuses catch-all entries" {
	# an entry whose regex matches anything is refused when the list loads
	mkdir -p "$BATS_TEST_TMPDIR/t" "$BATS_TEST_TMPDIR/t/difftest"
	cp "$BATS_TEST_DIRNAME/difftest/"*.py "$BATS_TEST_TMPDIR/t/difftest/"
	cp "$BATS_TEST_DIRNAME/difftest/known-failing" "$BATS_TEST_TMPDIR/t/difftest/"
	printf 'id: anything\nwhat: x\nkind: accept\nrefused-by: ours\nlog: .*\n' \
		>"$BATS_TEST_TMPDIR/t/differences"
	run "$PYTHON" "$BATS_TEST_TMPDIR/t/difftest/driver.py" list-ids
	[ "$status" -ne 0 ]
	[[ $output == *"matches anything"* ]]
	printf 'id: anything\nwhat: x\nkind: property\nproperty: Host\n' \
		>"$BATS_TEST_TMPDIR/t/differences"
	run "$PYTHON" "$BATS_TEST_TMPDIR/t/difftest/driver.py" list-ids
	[ "$status" -ne 0 ]
	[[ $output == *"says neither"* ]]
}

@test "difftest: fixed cases, issue 13 items 1-7 (KNOWN-FAILING ones listed on the TAP stream)" {
	need_reference
	run timeout -k 10 600 "$PYTHON" "$DRIVER" case "$BATS_TEST_DIRNAME"/difftest/cases/*/
	show
	echo "$output"
	[ "$status" -eq 0 ]
	# every case reported, none silently dropped
	local n
	n=$(ls -d "$BATS_TEST_DIRNAME"/difftest/cases/*/ | wc -l)
	[ "$(grep -cE '^case [^ ]+: ok \(' <<<"$output")" -eq "$n" ]
}

@test "difftest: the protocol version line, fed to both servers" {
	need_reference
	run timeout -k 10 300 "$PYTHON" "$DRIVER" version
	show
	echo "$output"
	# 2: only known failures (t/difftest/known-failing)
	[ "$status" -eq 0 ] || [ "$status" -eq 2 ]
	grep -qE '^[0-9]+ version lines, [0-9]+ agree, [0-9]+ documented, [0-9]+ undocumented$' \
		<<<"$output"
	grep -qE '^version 1\\r\\n +both accept$' <<<"$output"
	grep -qE '^version 2\\r\\n +both refuse$' <<<"$output"
}

@test "difftest: random configurations, both servers, every disagreement on the list" {
	need_reference
	local n=${DIFFTEST_N:-30} seed=${DIFFTEST_SEED:-13}
	echo "# $n configurations, seed $seed (DIFFTEST_N, DIFFTEST_SEED)" >&3
	run timeout -k 10 900 "$PYTHON" "$DRIVER" random "$n" "$seed"
	show
	echo "$output"
	[ "$status" -eq 0 ] || [ "$status" -eq 2 ]
	grep -qE "^$n configs, [0-9]+ agree, [0-9]+ documented, [0-9]+ undocumented$" <<<"$output"
	# the generator really varies its input
	local f
	for f in continuation delim-colon comment-hash comment-semicolon key-case duration-old \
		duration-rfc3339 interpolation-chain secfile secret; do
		grep -qE "^  $f +[0-9]+$" <<<"$output" || { echo "feature $f never exercised"; false; }
	done
	# and the servers really agreed on something
	local agree
	agree=$(sed -n "s/^$n configs, \([0-9]*\) agree.*/\1/p" <<<"$output")
	[ "$agree" -ge $((n / 3)) ]
}

@test "difftest: --version: the reference's line, then one line of ours" {
	[[ -x $REF_BIN ]] || skip "reference server not installed: $REF_BIN (package mandos)"
	need_server_bin
	need_ours "compares mandos.c with the reference"
	run --separate-stderr "$REF_BIN" --version
	[ "$status" -eq 0 ]
	local ref=$output
	[ "${#lines[@]}" -eq 1 ]
	run --separate-stderr "$MANDOS_BIN" --version
	[ "$status" -eq 0 ]
	[ "${#lines[@]}" -eq 2 ]
	[ "${lines[0]}" = "$ref" ]
	[[ ${lines[1]} == "mandos.c "* ]]
}

# The syslog test's directories (made outside `run`, whose subshell could
# not hand them back to the teardown).
SYSLOG_DIRS=()

teardown() {
	mandos_teardown
	local d
	for d in "${SYSLOG_DIRS[@]}"; do rm -rf "$d"; done
}

# syslog_dir: a directory for syslog_lines, in SYSLOG_DIRS; the reference
# reads its files as an unprivileged user, so not under the Bats
# temporary tree (0700).
syslog_dir() {
	SYSLOG_DIR=$(mktemp -d /tmp/mandos-difftest-syslog.XXXXXX) || return 1
	SYSLOG_DIRS+=("$SYSLOG_DIR")
}

# syslog_lines DIR BIN: run BIN for 2 s in a mount namespace of its own whose
# /dev is a tmpfs with a /dev/log socket read here (and null, zero, the
# random devices and tty bound from the real /dev); print what arrived.
syslog_lines() {
	local d=$1 bin=$2
	mkdir -p "$d/conf" "$d/state" "$d/olddev"
	chmod 755 "$d" "$d/conf"
	chmod 777 "$d/state"
	: >"$d/conf/clients.conf"
	PORT=$(free_port)
	timeout -k 5 30 unshare -m bash -s "$d" "$bin" "$PORT" "$PYTHON" >"$d/run.log" 2>&1 <<-'EOF'
	set -e
	d=$1 bin=$2 port=$3 python=$4
	mount --rbind /dev "$d/olddev"
	mount -t tmpfs -o mode=755 none /dev
	for n in null zero urandom random full tty; do
	    touch "/dev/$n"
	    mount --bind "$d/olddev/$n" "/dev/$n"
	done
	"$python" -c '
	import os, socket, sys, time
	s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
	s.bind("/dev/log")
	os.chmod("/dev/log", 0o666)
	open(sys.argv[1] + "/ready", "w").close()
	end = time.monotonic() + 6
	with open(sys.argv[1] + "/syslog", "ab") as f:
	    while time.monotonic() < end:
	        s.settimeout(max(0.1, end - time.monotonic()))
	        try:
	            f.write(s.recv(65536).rstrip(b"\0") + b"\n")
	            f.flush()
	        except socket.timeout:
	            pass
	' "$d" &
	listener=$!
	for i in $(seq 100); do [ -e "$d/ready" ] && break; sleep 0.05; done
	"$bin" --foreground --no-zeroconf --no-dbus --configdir "$d/conf" \
	    --statedir "$d/state" --address ::1 --port "$port" </dev/null >"$d/server.log" 2>&1 &
	server=$!
	sleep 2
	kill "$server"
	wait "$server" || true
	kill "$listener"
	wait "$listener" || true
	EOF
	cat "$d/syslog" 2>/dev/null || { cat "$d/run.log" "$d/server.log" >&2; return 1; }
}

@test "difftest: syslog ident: mandos for ours, Mandos for the reference" {
	[[ -x $REF_BIN ]] || skip "reference server not installed: $REF_BIN (package mandos)"
	need_server_bin
	need_ours "compares mandos.c with the reference"
	[[ $(id -u) -eq 0 ]]
	command -v unshare >/dev/null
	syslog_dir
	run syslog_lines "$SYSLOG_DIR" "$MANDOS_BIN"
	echo "ours: $output"
	[ "$status" -eq 0 ]
	grep -qE '^<[0-9]+>.* mandos\[[0-9]+\]: WARNING: No clients defined' <<<"$output"
	start_private_dbus
	syslog_dir
	run syslog_lines "$SYSLOG_DIR" "$REF_BIN"
	echo "reference: $output"
	[ "$status" -eq 0 ]
	grep -qE '^<[0-9]+>Mandos \[[0-9]+\]: WARNING: No clients defined' <<<"$output"
}
