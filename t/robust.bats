#!/usr/bin/env bats
# Robustness under load: no leaks (valgrind), no growth (RSS and open
# descriptors stay flat over 20,000 requests), and a crowd of silent peers
# neither locks out a real client nor outlives its deadline.
#
# Bulk requests come from t/bench/loadgen (the client side of the protocol
# in C, raw-key TLS) with key sets from t/bench/mkkeys; both are built here
# when missing.  The real mandos-client (so root) adds a handful.

load lib

BENCH="$BATS_TEST_DIRNAME/bench"
PW='robust pässword'

# Build the load generator once per file.
setup_file() {
	if [[ ! -x $BENCH/loadgen || ! -x $BENCH/mkkeys ]]; then
		make -s -C "$BENCH" loadgen mkkeys >&2 || true
	fi
}

need_loadgen() {
	[[ -x $BENCH/loadgen && -x $BENCH/mkkeys ]] ||
		skip "t/bench/loadgen or mkkeys could not be built (make -C t/bench)"
}

# True if MANDOS_BIN was built with AddressSanitizer (make SANITIZE=1).
is_sanitized() {
	grep -qa __asan_init "$MANDOS_BIN" 2>/dev/null
}

# robust_keys: make the key sets in $BATS_TEST_TMPDIR/keys ($KNOWN: 20
# configured clients, $SPECIAL: one needing approval and one disabled,
# $UNKNOWN: 5 keys no section names) and write $CONF/clients.conf, with
# the real client's section (alpha).
robust_keys() {
	local k="$BATS_TEST_TMPDIR/keys"
	KNOWN=$k/known SPECIAL=$k/special UNKNOWN=$k/unknown
	mkdir -p "$k" || return 1
	"$BENCH/mkkeys" --count 20 --out "$KNOWN" --quiet &&
		"$BENCH/mkkeys" --count 2 --out "$SPECIAL" --quiet &&
		"$BENCH/mkkeys" --count 5 --out "$UNKNOWN" --quiet || return 1
	CONF=$(make_confdir)
	{
		cat "$KNOWN/clients.conf"
		# the special sections without their [DEFAULT] (already there)
		awk '/^\[bench/ { n++; p = 1; sub(/^\[bench/, "[special") }
		     p { print }
		     p && /^\[special/ && n == 1 { print "approval_delay = PT1S" }
		     p && /^\[special/ && n == 2 { print "enabled = false" }' "$SPECIAL/clients.conf"
		client_section alpha "$PW"
	} >"$CONF/clients.conf" || return 1
	chmod 600 "$CONF/clients.conf"
	# the loadgen's mix: every configured key, then the unknown ones
	cat "$KNOWN/keydirs.txt" "$UNKNOWN/keydirs.txt" >"$k/mixed.txt"
	MIXED=$k/mixed.txt
}

# robust_start [PREFIX...]: start the server (behind PREFIX, e.g. valgrind)
# without --debug, which would log every GnuTLS record of thousands of
# requests; like start_server otherwise, but waits up to 60 s.
robust_start() {
	local i state="$BATS_TEST_TMPDIR/state"
	need_server_bin
	[[ -n ${PORT:-} ]] || PORT=$(free_port) || return 1
	SERVER_LOG="$BATS_TEST_TMPDIR/server.log"
	spawn "$@" "$MANDOS_BIN" --foreground --no-zeroconf --no-dbus \
		--configdir "$CONF" --statedir "$state" --address ::1 --port "$PORT" \
		>"$SERVER_LOG" 2>&1 </dev/null
	SERVER_PID=$BG_PID
	for ((i = 0; i < 1200; i++)); do
		if ! pid_running "$SERVER_PID"; then
			echo "server exited before listening; log tail:" >&2
			tail -n 40 "$SERVER_LOG" >&2
			SERVER_PID=
			return 1
		fi
		port_listening "$PORT" && return 0
		sleep 0.05
	done
	echo "server did not listen within 60 s" >&2
	return 1
}

# loadgen ARG...: run the load generator against the server; its RESULT
# line is left in LOAD_RESULT.  Its own exit status is ignored (requests
# with unknown keys fail on purpose); callers check the counts.
loadgen() {
	local out
	out=$("$BENCH/loadgen" --port "$PORT" --quiet --timeout 60 "$@" 2>&1) || true
	LOAD_RESULT=$(grep '^RESULT' <<<"$out")
	if [[ -z $LOAD_RESULT ]]; then
		echo "loadgen gave no result:" >&2
		echo "$out" >&2
		return 1
	fi
}

# result_field NAME: a number from LOAD_RESULT ("ok", "fail", "skipped"...).
result_field() {
	local v=${LOAD_RESULT#* $1=}
	echo "${v%% *}"
}

# expect_ok N: LOAD_RESULT reports exactly N successes.
expect_ok() {
	local ok
	ok=$(result_field ok)
	if [[ $ok != "$1" ]]; then
		echo "expected $1 successful requests: $LOAD_RESULT" >&2
		tail -n 30 "$SERVER_LOG" >&2
		return 1
	fi
}

server_fds() {
	local fds=("/proc/$SERVER_PID/fd/"*)
	echo "${#fds[@]}"
}

server_rss_kb() {
	awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status"
}

# settle_fds [SECONDS]: wait (bounded) until the server's descriptor count
# stops changing, i.e. it has finished closing the last connections.
settle_fds() {
	local secs=${1:-10} i prev=-1 cur
	for ((i = 0; i < secs * 5; i++)); do
		cur=$(server_fds)
		[[ $cur == "$prev" ]] && break
		prev=$cur
		sleep 0.2
	done
	server_fds
}

# hostile_round: one of each kind of broken peer (t/lib.bash `peer`).
hostile_round() {
	peer 'send:2\r\n' wait_eof:5
	peer 'send:abc\r\n' wait_eof:5
	peer "send:$(printf '1%.0s' {1..80})" wait_eof:5
	peer 'send:\x00\x00\x00\n' wait_eof:5
	peer 'send:1\r\n' rand:300 wait_eof:5
	peer 'send:1\r\n\x16\x03\x01\x40\x00' shut wait_eof:5
	peer 'send:1\r\n' recv:5:5
	peer 'send:1' shut wait_eof:5
	peer rand:64 wait_eof:5
	peer shut wait_eof:5
}

@test "robust: valgrind finds no leak or memory error over 2,000 mixed requests" {
	need_ours "leak check of mandos.c"
	command -v valgrind >/dev/null || skip "valgrind is not installed"
	if is_sanitized; then skip "valgrind cannot run a sanitized build (ASan checks leaks there)"; fi
	need_loadgen
	need_client
	robust_keys
	robust_start valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect \
		--errors-for-leak-kinds=definite,indirect --error-exitcode=99 --vgdb=no
	local real=3 i
	for i in 1 2 3; do client_gets alpha "$PW" 60; done
	# 1,950 from the loadgen: 20 of every 25 have a configured key
	loadgen --keydir-list "$MIXED" --requests 1950 --concurrency 4
	expect_ok 1560
	# approval granted by default after 1 s, and a disabled client
	loadgen --keys "$SPECIAL/keys/000000" --requests 4 --concurrency 4
	expect_ok 4
	loadgen --keys "$SPECIAL/keys/000001" --requests 4 --concurrency 4
	expect_ok 0
	# broken peers, 10 kinds, 5 rounds; then a few left hanging at exit
	for i in 1 2 3 4 5; do hostile_round >/dev/null; done
	hold_silent_peers 5 60
	spawn peer 'send:1\r\n' sleep:60 >/dev/null
	sleep 0.5
	assert_server_alive
	echo "# requests: $((real + 1950 + 8 + 50 + 6))" >&3
	stop_server
	if [[ $SERVER_STATUS -ne 0 ]]; then
		echo "valgrind/server exit status $SERVER_STATUS (99: valgrind found errors)" >&2
		grep -v '^[0-9-]* [0-9:,]* mandos' "$SERVER_LOG" | tail -n 60 >&2
		return 1
	fi
}

@test "robust: RSS and open descriptors stay flat over 20,000 requests" {
	need_ours "growth of mandos.c"
	if is_sanitized; then skip "a sanitized build keeps freed memory in quarantine: RSS says nothing"; fi
	need_loadgen
	need_client
	robust_keys
	robust_start
	local fd1 rss1 fd2 rss2
	loadgen --keydir-list "$MIXED" --requests 1000 --concurrency 8
	expect_ok 800
	fd1=$(settle_fds 10)
	rss1=$(server_rss_kb)
	loadgen --keydir-list "$MIXED" --requests 19000 --concurrency 8 --max-time 300
	expect_ok 15200     # 19,000 x 20/25
	client_gets alpha "$PW" 30
	fd2=$(settle_fds 10)
	rss2=$(server_rss_kb)
	echo "# after 1,000: $fd1 fds, $rss1 kB; after 20,000: $fd2 fds, $rss2 kB" >&3
	assert_server_alive
	if [[ $fd2 -ne $fd1 ]]; then
		echo "descriptors: $fd1 after the first 1,000 requests, $fd2 after 20,000" >&2
		ls -l "/proc/$SERVER_PID/fd" >&2
		return 1
	fi
	if ((rss2 > rss1 + 2048)); then
		echo "RSS grew from $rss1 kB to $rss2 kB (more than 2 MB)" >&2
		return 1
	fi
	stop_server
	[[ $SERVER_STATUS -eq 0 ]]
}

@test "robust: 1,000 silent peers: the real client is served within 2 s, they time out at 3 s" {
	need_ours "connection_timeout is a mandos.c setting"
	need_client
	CONF=$(make_confdir)
	client_section alpha "$PW" >"$CONF/clients.conf"
	printf '[DEFAULT]\nconnection_timeout = PT3S\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	local fd0 i n start took
	fd0=$(settle_fds 5)
	hold_silent_peers 1000 60
	# all accepted (the server takes up to 64 per loop turn)
	for ((i = 0; i < 100; i++)); do
		(($(server_fds) >= fd0 + 1000)) && break
		sleep 0.1
	done
	n=$(server_fds)
	((n >= fd0 + 1000)) || { echo "only $((n - fd0)) of 1000 accepted" >&2; return 1; }
	start=$(date +%s%N)
	client_gets alpha "$PW" 10
	took=$((($(date +%s%N) - start) / 1000000))
	echo "# the real client took $took ms with 1,000 silent peers" >&3
	if ((took > 2000)); then
		echo "the real client needed $took ms (more than 2 s)" >&2
		return 1
	fi
	# connection_timeout = PT3S: all dropped a few seconds later
	for ((i = 0; i < 150; i++)); do
		(($(server_fds) <= fd0)) && break
		sleep 0.1
	done
	n=$(server_fds)
	if ((n > fd0)); then
		echo "$((n - fd0)) silent peers still open 15 s after they connected" >&2
		return 1
	fi
	n=$(grep -c 'timed out while reading the protocol version' "$SERVER_LOG")
	if ((n < 1000)); then
		echo "the log reports only $n of 1000 silent peers timed out" >&2
		return 1
	fi
	# each one dropped close to its own deadline: 1.5 s to 6 s after its
	# accept, by the server's log
	local min max
	read -r n min max < <(conn_timeouts_ms "$SERVER_LOG" | sort -n |
		awk 'NR == 1 { min = $1 } { max = $1 } END { print NR, min, max }')
	echo "# $n dropped after $min to $max ms (connection_timeout = PT3S)" >&3
	if ((n < 1000 || min < 1500 || max > 6000)); then
		echo "$n timed-out peers, dropped after $min to $max ms, not 1,500 to 6,000" >&2
		return 1
	fi
	assert_server_alive
}
