#!/bin/bash
# t/bench/run.sh -- benchmark our mandos against the reference, in one run.
#
# Starts our server (MANDOS_BIN, default ../../mandos from here) and, when
# installed, the reference (/usr/sbin/mandos, with a private system D-Bus)
# on ::1 with the same configuration, one after the other, and prints a
# table of medians with ratios ours/reference:
#   start-to-listen; idle RSS and PSS of the process tree; server CPU per
#   1,000 requests; requests/s and latency p50/p99 at several concurrency
#   levels; the same start/memory/CPU with 1,000 and 10,000 configured
#   clients; and the in-process floor (t/bench/floor).
#
# About 7 minutes on 2 cores, most of it the reference: it times out at
# concurrency 64 and up (30 s a try, so those levels run once), needs
# 100-160 s to start with 10,000 clients and 1-15 s of CPU per request with
# many clients (so it gets one start and 1-3 requests there).  Progress goes
# to stderr, the table to stdout.
#
# Environment:
#   MANDOS_BIN      our server (default: ../../mandos relative to this script)
#   REF_BIN         reference server (default /usr/sbin/mandos; "" to skip)
#   BENCH_REPS      repetitions, medians taken (default 3)
#   BENCH_QUICK=1   a ~1-minute smoke run (1 repetition, small counts)
#   BENCH_LEVELS    concurrency levels (default "1 16 64 256 1024")
#   BENCH_MANY      client counts for the many-client runs ("1000 10000")
#   BENCH_REF_HEAVY_REPS  repetitions of the reference at concurrency >= 64
#                   (default 1: it times out there, 30 s a try)
#   BENCH_REF_MANY=0      skip the reference with many clients (slow start)
#   BENCH_KEEP=1    keep the work directory (logs, configs, raw results)
#   BENCH_OUT=FILE  also write the table to FILE
#
# Everything listens and connects on ::1 only.  Every process started here
# is stopped by PID at the end (SIGTERM, then SIGKILL for it and the
# descendants it had).  Every wait is bounded.

set -u
export LC_ALL=C

HERE=$(cd "$(dirname "$0")" && pwd)
MANDOS_BIN=${MANDOS_BIN:-$HERE/../../mandos}
REF_BIN=${REF_BIN-/usr/sbin/mandos}
REPS=${BENCH_REPS:-3}
QUICK=${BENCH_QUICK:-0}
LEVELS=${BENCH_LEVELS:-1 16 64 256 1024}
REF_HEAVY_REPS=${BENCH_REF_HEAVY_REPS:-1}
REF_MANY=${BENCH_REF_MANY:-1}
SETTLE=1			# seconds between listening and the idle sample
START_TIMEOUT=300		# the reference needs 100-160 s with 10,000 clients

if [ "$QUICK" = 1 ]; then
	REPS=${BENCH_REPS:-1}
	MANY=${BENCH_MANY:-1000}
	REF_MANY=${BENCH_REF_MANY:-1}
	REF_LEVELS_MAX=16
else
	MANY=${BENCH_MANY:-1000 10000}
	REF_LEVELS_MAX=1000000
fi

# Requests per level (bounded so that the default run stays < 10 min).
ours_requests() {
	if [ "$QUICK" = 1 ]; then
		case $1 in 1) echo 50 ;; 16) echo 200 ;; *) echo $(($1 > 256 ? $1 : 256)) ;; esac
	else
		case $1 in 1) echo 300 ;; 16) echo 1000 ;; 64) echo 2000 ;; *) echo $(($1 * 4 > 2000 ? $1 * 4 : 2000)) ;; esac
	fi
}
ref_requests() {
	if [ "$QUICK" = 1 ]; then
		case $1 in 1) echo 8 ;; *) echo $(($1 * 2)) ;; esac
	else
		case $1 in 1) echo 30 ;; 16) echo 64 ;; 64) echo 128 ;; *) echo "$1" ;; esac
	fi
}
OURS_TIMEOUT=30
REF_TIMEOUT=30
LEVEL_MAX_TIME=60		# no request starts later than this in a level
MANY_CONC=16

LOADGEN=$HERE/loadgen
MKKEYS=$HERE/mkkeys
FLOOR=$HERE/floor
T0=$(date +%s)

say() { printf '[%4ds] %s\n' $(($(date +%s) - T0)) "$*" >&2; }
die() { say "error: $*"; exit 1; }

# ------------------------------------------------------------- set-up

make -s -C "$HERE" all >&2 || die "cannot build the instruments"
[ -x "$MANDOS_BIN" ] || die "no server at $MANDOS_BIN (set MANDOS_BIN)"
MANDOS_BIN=$(cd "$(dirname "$MANDOS_BIN")" && pwd)/$(basename "$MANDOS_BIN")
HAVE_REF=0
if [ -n "$REF_BIN" ] && [ -x "$REF_BIN" ]; then
	HAVE_REF=1
fi

W=$(mktemp -d /tmp/mandos-bench.XXXXXX) || die "mktemp"
chmod 0755 "$W"
SERVER_PIDS=""
DBUS_PID=""

# Process helpers, all by PID.
alive() {
	local st
	st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
	[ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
descendants() {
	local f line st pp rest
	for f in /proc/[0-9]*/stat; do
		{ read -r line <"$f"; } 2>/dev/null || continue
		read -r st pp rest <<<"${line##*) }"
		echo "${line%% (*} $pp"
	done | awk -v root="$1" '
		{ kids[$2] = kids[$2] " " $1 }
		END {
			q[1] = root; n = 1
			for (i = 1; i <= n; i++) {
				m = split(kids[q[i]], a, " ")
				for (j = 1; j <= m; j++) { q[++n] = a[j]; print a[j] }
			}
		}'
}
ours_process() {		# started by this run: its command line names $W
	tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF "$W"
}
stop_server() {
	local pid=$1 kids p
	kids=$(descendants "$pid")
	kill -TERM "$pid" 2>/dev/null
	for _ in $(seq 50); do
		alive "$pid" || break
		sleep 0.1
	done
	{			# stderr off: hides the shell's "Killed" notices
		alive "$pid" && kill -KILL "$pid"
		for p in $kids; do
			alive "$p" && ours_process "$p" && kill -KILL "$p"
		done
		wait "$pid"
	} 2>/dev/null
	SERVER_PIDS=$(echo "$SERVER_PIDS" | tr ' ' '\n' | grep -vx "$pid" | tr '\n' ' ')
}
cleanup() {
	local p
	for p in $SERVER_PIDS; do
		stop_server "$p"
	done
	if [ -n "$DBUS_PID" ]; then
		kill -TERM "$DBUS_PID" 2>/dev/null
		wait "$DBUS_PID" 2>/dev/null
	fi
	if [ "${BENCH_KEEP:-0}" = 1 ]; then
		say "kept $W"
	else
		rm -rf "$W"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_used() {
	grep -q ":$(printf '%04X' "$1") " /proc/net/tcp6 /proc/net/tcp 2>/dev/null
}
free_port() {
	local p
	for _ in $(seq 200); do
		p=$((20000 + RANDOM % 20000))
		port_used "$p" || { echo "$p"; return 0; }
	done
	return 1
}

# A private system bus: the reference connects to one even with --no-dbus.
start_dbus() {
	mkdir -p "$W/dbus"
	cat >"$W/dbus/system.conf" <<-EOF
	<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
	 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
	<busconfig>
	  <type>system</type>
	  <listen>unix:path=$W/dbus/socket</listen>
	  <auth>EXTERNAL</auth>
	  <policy context="default">
	    <allow user="*"/>
	    <allow own="*"/>
	    <allow send_destination="*"/>
	    <allow receive_sender="*"/>
	  </policy>
	</busconfig>
	EOF
	dbus-daemon --config-file="$W/dbus/system.conf" --nofork --nopidfile \
	    >"$W/dbus/log" 2>&1 &
	DBUS_PID=$!
	for _ in $(seq 50); do
		[ -S "$W/dbus/socket" ] && break
		sleep 0.1
	done
	[ -S "$W/dbus/socket" ] || return 1
	export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$W/dbus/socket
}

# Key sets and configurations: $W/cfg.N holds clients.conf, mandos.conf,
# keys/ and keydirs.txt.
make_config() {
	local n=$1 dir=$W/cfg.$1
	"$MKKEYS" --count "$n" --out "$dir" --quiet || die "mkkeys $n"
	printf '[DEFAULT]\n' >"$dir/mandos.conf"
	chmod 0755 "$dir"
	chmod 0644 "$dir/clients.conf" "$dir/mandos.conf"
}

# start_server BIN CFGDIR TAG: sets SPID, PORT, LISTEN_MS.
start_server() {
	local bin=$1 cfg=$2 tag=$3 st=$W/state.$3 rep=$W/listen.$3
	PORT=$(free_port) || die "no free port"
	mkdir -p "$st"
	chmod 0777 "$st"
	"$LOADGEN" --exec-listen --port "$PORT" --report "$rep" \
	    --timeout "$START_TIMEOUT" -- "$bin" --foreground --no-zeroconf \
	    --no-dbus --no-restore --configdir "$cfg" --statedir "$st" \
	    --address ::1 --port "$PORT" >"$W/log.$tag" 2>&1 &
	SPID=$!
	SERVER_PIDS="$SERVER_PIDS $SPID"
	for _ in $(seq $((START_TIMEOUT * 10 + 50))); do
		[ -s "$rep" ] && break
		sleep 0.1
	done
	LISTEN_MS=$(sed -n 's/^listen_ms=//p' "$rep" 2>/dev/null)
	case $LISTEN_MS in
	'' | *[!0-9.]*)
		say "$tag: server did not listen (${LISTEN_MS:-no report}); log:"
		tail -5 "$W/log.$tag" >&2
		stop_server "$SPID"
		return 1
		;;
	esac
	return 0
}

# Raw results: one "name value" line per sample in $W/samples.
record() { echo "$1 $2" >>"$W/samples"; }
kv() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

idle_sample() {			# tag who key
	local line
	sleep "$SETTLE"
	line=$("$LOADGEN" --tree-stats "$SPID") || return
	record "$2.$3.rss" "$(kv "$line" rss_kb)"
	record "$2.$3.pss" "$(kv "$line" pss_kb)"
	record "$2.$3.nproc" "$(kv "$line" nproc)"
}

# load who slot conc requests timeout keylist: records $who.$slot.rps etc.
load() {
	local who=$1 key=$2 c=$3 n=$4 to=$5 list=$6 res out=$W/load.$1.$2.$RANDOM
	timeout -s KILL $((LEVEL_MAX_TIME + to * 2 + 30)) \
	    "$LOADGEN" --port "$PORT" --keydir-list "$list" --requests "$n" \
	    --concurrency "$c" --timeout "$to" --max-time "$LEVEL_MAX_TIME" \
	    --server-pid "$SPID" >"$out" 2>&1
	res=$(grep '^RESULT' "$out" | tail -1)
	if [ -z "$res" ]; then
		say "$who $key c=$c: no result"
		tail -3 "$out" >&2
		return
	fi
	record "$who.$key.rps" "$(kv "$res" rps)"
	record "$who.$key.p50" "$(kv "$res" p50_ms)"
	record "$who.$key.p99" "$(kv "$res" p99_ms)"
	record "$who.$key.ok" "$(kv "$res" ok)"
	record "$who.$key.fail" "$(($(kv "$res" fail) + $(kv "$res" skipped)))"
	[ -n "$(kv "$res" cpu_per_1k_ms)" ] &&
	    record "$who.$key.cpu1k" "$(kv "$res" cpu_per_1k_ms)"
	say "$who $key c=$c: $(kv "$res" ok)/$n ok, $(kv "$res" rps) req/s," \
	    "p50 $(kv "$res" p50_ms) ms, p99 $(kv "$res" p99_ms) ms," \
	    "CPU/1k $(kv "$res" cpu_per_1k_ms) ms"
}

# ------------------------------------------------------------- the runs

# One-client configuration: start, idle memory, the concurrency sweep.
sweep() {			# who bin rep
	local who=$1 bin=$2 rep=$3 c n to
	start_server "$bin" "$W/cfg.1" "$who.1.$rep" || return
	record "$who.1.listen" "$LISTEN_MS"
	say "$who (1 client) rep $rep: listening after $LISTEN_MS ms"
	idle_sample "$who.1.$rep" "$who" 1
	for c in $LEVELS; do
		if [ "$who" = ref ]; then
			[ "$c" -gt "$REF_LEVELS_MAX" ] && continue
			[ "$c" -ge 64 ] && [ "$rep" -gt "$REF_HEAVY_REPS" ] && continue
			n=$(ref_requests "$c")
			to=$REF_TIMEOUT
		else
			n=$(ours_requests "$c")
			to=$OURS_TIMEOUT
		fi
		load "$who" "1.c$c" "$c" "$n" "$to" "$W/cfg.1/keydirs.txt"
	done
	stop_server "$SPID"
}

# Many-client configuration: start, idle memory, CPU per request.
many() {			# who bin n rep
	local who=$1 bin=$2 n=$3 rep=$4 req to c
	start_server "$bin" "$W/cfg.$n" "$who.$n.$rep" || return
	record "$who.$n.listen" "$LISTEN_MS"
	say "$who ($n clients) rep $rep: listening after $LISTEN_MS ms"
	idle_sample "$who.$n.$rep" "$who" "$n"
	if [ "$who" = ref ]; then
		# About 1.5 s of CPU per request at 1,000 clients and 10 s or
		# more at 10,000: a few sequential requests only.
		c=1
		req=$((n >= 10000 ? 1 : 3))
		to=$((n >= 10000 ? 120 : 60))
	else
		c=$MANY_CONC
		req=$([ "$QUICK" = 1 ] && echo 300 || echo 2000)
		to=$OURS_TIMEOUT
	fi
	load "$who" "$n.load" "$c" "$req" "$to" "$W/cfg.$n/keydirs.txt"
	stop_server "$SPID"
}

say "work directory $W; ours: $MANDOS_BIN; reference: $([ $HAVE_REF = 1 ] && echo "$REF_BIN" || echo none)"
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
if [ $HAVE_REF = 1 ]; then
	start_dbus || { say "no private D-Bus; skipping the reference"; HAVE_REF=0; }
fi
make_config 1
for n in $MANY; do
	make_config "$n"
done
say "key sets made"

for rep in $(seq "$REPS"); do
	sweep ours "$MANDOS_BIN" "$rep"
	[ $HAVE_REF = 1 ] && sweep ref "$REF_BIN" "$rep"
done
for n in $MANY; do
	for rep in $(seq "$REPS"); do
		many ours "$MANDOS_BIN" "$n" "$rep"
		[ $HAVE_REF = 1 ] && [ "$REF_MANY" = 1 ] && [ "$rep" = 1 ] &&
		    many ref "$REF_BIN" "$n" "$rep"
	done
done
for rep in $(seq "$REPS"); do
	line=$("$FLOOR" --count "$([ "$QUICK" = 1 ] && echo 300 || echo 2000)" \
	    --keys "$W/cfg.1/keys/000000" | grep '^FLOOR')
	record floor.cpu "$(kv "$line" server_cpu_us)"
	record floor.client "$(kv "$line" client_cpu_us)"
	record floor.wall "$(kv "$line" wall_us)"
	say "floor rep $rep: server CPU $(kv "$line" server_cpu_us) us per exchange"
done

# ------------------------------------------------------------- the table

# The rows, one a line: "row|label|key|scale|decimals" (median of ours and
# of the reference, and their ratio), "fail|label|key" (failed/total over
# all repetitions), "one|label|key|decimals" (a single column).
table_spec() {
	local c n
	echo "row|start-to-listen, 1 client (ms)|1.listen|1|1"
	echo "row|idle RSS, 1 client (MiB)|1.rss|1024|1"
	echo "row|idle PSS, 1 client (MiB)|1.pss|1024|1"
	echo "row|idle processes, 1 client|1.nproc|1|0"
	for c in $LEVELS; do
		echo "row|c=$c requests/s|1.c$c.rps|1|1"
		echo "row|c=$c latency p50 (ms)|1.c$c.p50|1|1"
		echo "row|c=$c latency p99 (ms)|1.c$c.p99|1|1"
		echo "row|c=$c server CPU per 1000 req (ms)|1.c$c.cpu1k|1|0"
		echo "fail|c=$c failed/total (all reps)|1.c$c"
	done
	for n in $MANY; do
		echo "row|$n clients: start-to-listen (ms)|$n.listen|1|1"
		echo "row|$n clients: idle RSS (MiB)|$n.rss|1024|1"
		echo "row|$n clients: idle PSS (MiB)|$n.pss|1024|1"
		echo "row|$n clients: server CPU per 1000 req (ms)|$n.load.cpu1k|1|0"
		echo "row|$n clients: requests/s (*)|$n.load.rps|1|1"
		echo "row|$n clients: latency p50 (ms) (*)|$n.load.p50|1|1"
		echo "fail|$n clients: failed/total|$n.load"
	done
	echo "one|floor (in-process): server CPU per 1000 (ms)|floor.cpu|1"
	echo "one|floor (in-process): client CPU per 1000 (ms)|floor.client|1"
	echo "vsfloor|ours c=16 CPU per request / floor|ours.1.c16.cpu1k|floor.cpu"
}

table() {
	echo "mandos benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs," \
	    "load average now $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "ours: $MANDOS_BIN"
	echo "reference: $([ $HAVE_REF = 1 ] && echo "$REF_BIN" || echo none);" \
	    "medians of $REPS (reference: $REF_HEAVY_REPS at c>=64, 1 with many clients)"
	touch "$W/samples"
	table_spec | awk -F'|' '
		NR == FNR {		# the samples: "name value"
			split($0, f, " ")
			n[f[1]]++
			v[f[1], n[f[1]]] = f[2] + 0
			sum[f[1]] += f[2]
			next
		}
		function median(k,   m, i, j, t, a) {
			m = n[k]
			if (m == 0) return "-"
			for (i = 1; i <= m; i++) a[i] = v[k, i]
			for (i = 2; i <= m; i++)	# insertion sort, m is small
				for (j = i; j > 1 && a[j - 1] > a[j]; j--) {
					t = a[j]; a[j] = a[j - 1]; a[j - 1] = t
				}
			return m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
		}
		function fmt(x, s, d) { return x == "-" ? "-" : sprintf("%.*f", d, x / s) }
		function ratio(a, b,   r) {
			if (a == "-" || b == "-" || b == 0) return "-"
			r = a / b
			return sprintf(r >= 100 ? "%.0f" : r >= 0.01 ? "%.3f" : "%.2g", r)
		}
		function failed(k) {
			if (n[k ".fail"] == 0 && n[k ".ok"] == 0) return "-"
			return sum[k ".fail"] + 0 "/" sum[k ".fail"] + sum[k ".ok"]
		}
		FNR == 1 {
			printf "%-42s %12s %12s %9s\n", "metric", "ours", "reference", "ours/ref"
		}
		$1 == "row" {
			o = median("ours." $3); r = median("ref." $3)
			if (o == "-" && r == "-") next
			printf "%-42s %12s %12s %9s\n", $2, fmt(o, $4, $5), fmt(r, $4, $5), ratio(o, r)
		}
		$1 == "fail" {
			o = failed("ours." $3); r = failed("ref." $3)
			if (o == "-" && r == "-") next
			printf "%-42s %12s %12s\n", $2, o, r
		}
		$1 == "one" { printf "%-42s %12s\n", $2, fmt(median($3), 1, $4) }
		$1 == "vsfloor" { printf "%-42s %12s\n", $2, ratio(median($3), median($4)) }
	' "$W/samples" -
	[ -n "$MANY" ] && echo "(*) with many clients ours runs $MANY_CONC at a time," \
	    "each request a different key; the reference one at a time, 3 requests" \
	    "(1,000 clients) or 1 (10,000)."
}

say "done; load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
table | tee ${BENCH_OUT:+"$BENCH_OUT"}
