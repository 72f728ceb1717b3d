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

# ---- issue 12, finding 1: peers that cannot get a secret do not hold slots

# crowd N SECONDS: N peers that connect and never send a byte, for SECONDS
# (tracked); each one the server closes connects again 0.1 s later.  The
# last line of $BATS_TEST_TMPDIR/crowd.log counts the comebacks so far.
crowd() {
	spawn "$PYTHON" - "$PORT" "$1" "$2" >"$BATS_TEST_TMPDIR/crowd.log" 2>&1 <<-'EOF'
	import selectors, socket, sys, time
	port, n, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
	sel = selectors.DefaultSelector()
	back = 0
	def join():
	    s = socket.create_connection(("::1", port), timeout=10)
	    s.setblocking(False)
	    sel.register(s, selectors.EVENT_READ)
	for _ in range(n):
	    join()
	end = time.monotonic() + secs
	while time.monotonic() < end:
	    for key, _ in sel.select(timeout=0.5):
	        try:
	            gone = key.fileobj.recv(4096) == b""
	        except OSError:
	            gone = True
	        if gone:
	            sel.unregister(key.fileobj)
	            key.fileobj.close()
	            time.sleep(0.1)
	            join()
	            back += 1
	            print("comebacks=%d" % back, flush=True)
	EOF
	CROWD_PID=$BG_PID
}

@test "robust: hostile peers in every evictable slot (max_connections 8) do not lock out the real client" {
	need_ours "max_connections is a mandos.c setting"
	need_loadgen
	need_client
	robust_keys
	# without the eviction rule, 8 peers that never close hold the table
	# for the whole connection_timeout
	printf '[DEFAULT]\nmax_connections = 8\nconnection_timeout = PT30S\n' >"$CONF/mandos.conf"
	robust_start
	crowd 16 40
	# the hammer: 8 peers at a time with a key no section names, each
	# never answering after the handshake, coming back as soon as closed
	local hammer="$BATS_TEST_TMPDIR/hammer.out" start took rc=0
	spawn "$BENCH/loadgen" --port "$PORT" --keydir-list "$UNKNOWN/keydirs.txt" --hold \
		--requests 100000000 --concurrency 8 --max-time 15 --timeout 40 --quiet >"$hammer" 2>&1
	local hammer_pid=$BG_PID
	sleep 2
	start=$(date +%s%N)
	client_gets alpha "$PW" 12 || rc=$?
	took=$((($(date +%s%N) - start) / 1000000))
	echo "# the real client: exit $rc after $took ms" >&3
	assert_server_alive
	# the hammer stops starting at 15 s; each of its last ones ends when closed
	local i
	for ((i = 0; i < 400; i++)); do
		pid_running "$hammer_pid" || break
		sleep 0.1
	done
	LOAD_RESULT=$(grep '^RESULT' "$hammer" || true)
	stop_pid "$CROWD_PID" 5
	echo "# hammer: $LOAD_RESULT; silent crowd: $(tail -n 1 "$BATS_TEST_TMPDIR/crowd.log")" >&3
	[[ $rc -eq 0 ]]
	# the hostile peers did hammer: at least 100 handshakes in 15 s
	(($(result_field ok) >= 100))
}

# held_closes KEYDIR WHAT: one peer with the key set in KEYDIR completes the
# handshake and never answers; the server closes it at once (within 3 s,
# with connection_timeout 10 s), and its log says WHAT.
held_closes() {
	loadgen --keys "$1" --hold --requests 1 --timeout 8
	echo "# $2: $LOAD_RESULT" >&3
	grep -q "$2" "$SERVER_LOG"
	expect_ok 1
	local ms
	ms=$(result_field max_ms)
	if ((${ms%.*} >= 3000)); then
		echo "closed after $ms ms" >&2
		return 1
	fi
}

@test "robust: a peer refused after the handshake is closed at once, not at connection_timeout" {
	need_ours "the reference waits for the peer's close_notify"
	need_loadgen
	need_client
	robust_keys
	printf '[DEFAULT]\nconnection_timeout = PT10S\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	held_closes "$UNKNOWN/keys/000000" "Client not found for key ID"
	held_closes "$SPECIAL/keys/000001" "is disabled"
	client_gets alpha "$PW" 20
}

@test "robust: a full table drops the connection with the least progress, not the oldest" {
	need_ours "max_connections is a mandos.c setting"
	need_server_bin
	CONF=$(make_confdir)
	printf '[a]\nsecret=\n' >"$CONF/clients.conf"
	printf '[DEFAULT]\nmax_connections = 2\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	local hs="$BATS_TEST_TMPDIR/handshake.out" silent="$BATS_TEST_TMPDIR/silent.out"
	# the oldest: in the TLS handshake (has the ClientHello, never answers)
	spawn peer 'send:1\r\n' recv:5:5 read:4 >"$hs"
	sleep 0.5
	# then one in the version line
	spawn peer wait_eof:4 >"$silent"
	sleep 0.5
	# the table is full: the newcomer drops the silent one
	run peer wait_eof:1
	local i
	for ((i = 0; i < 100; i++)); do
		[[ -s $hs && -s $silent ]] && break
		sleep 0.1
	done
	echo "in the handshake: $(cat "$hs"); in the version line: $(cat "$silent")"
	grep -q "dropped to make room" "$SERVER_LOG"
	[[ $(cat "$hs") == *"first=16 "*"eof=no" ]]
	[[ $(cat "$silent") == *"eof=yes" ]]
}

@test "robust: connections waiting for approval are never dropped to make room" {
	need_ours "max_connections is a mandos.c setting"
	need_loadgen
	local k="$BATS_TEST_TMPDIR/keys"
	"$BENCH/mkkeys" --count 1 --out "$k" --quiet
	CONF=$(make_confdir)
	{ cat "$k/clients.conf"; echo "approval_delay = PT3S"; } >"$CONF/clients.conf"
	printf '[DEFAULT]\nmax_connections = 4\n' >"$CONF/mandos.conf"
	start_server "$CONF"
	local out="$BATS_TEST_TMPDIR/waiters.out" i
	spawn "$BENCH/loadgen" --port "$PORT" --keys "$k/keys/000000" --requests 4 \
		--concurrency 4 --timeout 20 --quiet >"$out" 2>&1
	local waiters=$BG_PID
	for ((i = 0; i < 100; i++)); do
		(($(grep -c 'needs approval' "$SERVER_LOG") >= 4)) && break
		sleep 0.05
	done
	hold_silent_peers 4 10
	for ((i = 0; i < 200; i++)); do
		pid_running "$waiters" || break
		sleep 0.1
	done
	LOAD_RESULT=$(grep '^RESULT' "$out")
	echo "waiters: $LOAD_RESULT"
	grep -q "refused: 4 connections open" "$SERVER_LOG"
	expect_ok 4
}
