#!/bin/bash
# t/fuzz/run.sh TARGET...: run each built fuzz target (t/fuzz/fuzz-TARGET)
# for FUZZ_SECONDS (default 60), starting from its seed corpus
# t/fuzz/corpus/TARGET.  `make fuzz` and `make fuzz-smoke` build the
# targets and call this.  One "ok"/"FAIL" line per target, then
# "N passed, N failed"; exit 1 if any target found something.
#
# New interesting inputs collect in t/fuzz/work/TARGET (kept between local
# runs, not committed); a crashing input is saved as
# t/fuzz/crashes/TARGET-crash-<sha1> and the line says how to replay it.
set -u
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-60}
case $secs in '' | *[!0-9]*) echo "run.sh: FUZZ_SECONDS must be a number" >&2; exit 2 ;; esac
[ $# -gt 0 ] || set -- ini duration base64 version state
mkdir -p work crashes
passed=0 failed=0
for t in "$@"; do
    bin=./fuzz-$t
    if [ ! -x "$bin" ] || [ ! -d "corpus/$t" ]; then
        echo "FAIL fuzz $t: $bin or corpus/$t missing (make fuzz builds them)"
        failed=$((failed + 1))
        continue
    fi
    mkdir -p "work/$t"
    log="work/$t.log"
    start=$(date +%s)
    # libFuzzer stops itself after -max_total_time; the outer timeout only
    # guards against a harness that never returns.  -timeout turns a single
    # slow input into a finding.
    timeout -k 10 $((secs + 120)) "$bin" -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
        -artifact_prefix="crashes/$t-" "work/$t" "corpus/$t" >"$log" 2>&1 </dev/null
    rc=$?
    took=$(($(date +%s) - start))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [ $rc -eq 0 ]; then
        echo "ok   fuzz $t: ${runs:-?} inputs in ${took}s, $(find "work/$t" -type f | wc -l) in its corpus"
        passed=$((passed + 1))
    else
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        echo "FAIL fuzz $t: exit $rc after ${took}s${artifact:+; input saved as t/fuzz/$artifact}"
        [ -n "$artifact" ] && echo "     replay: t/fuzz/fuzz-$t t/fuzz/$artifact"
        grep -m 12 -E 'ERROR|runtime error|property failed|SUMMARY|#[0-9]+ 0x' "$log" | sed 's/^/     /'
        failed=$((failed + 1))
    fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
