#!/bin/bash
# Run the self-tests and the Bats suite; end with "N passed, N failed".
# Environment: BATS_FILES (default: every t/*.bats), MANDOS_BIN.
set -u
cd "$(dirname "$0")/.."
bin=${MANDOS_BIN:-./mandos}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# A sanitized build (make check SANITIZE=1): stop at the first finding with
# a non-zero exit (no core dump), check for leaks at exit (the server frees
# everything), and write every report into one directory that is checked
# after the run, so a finding fails the run even when the test that caused
# it did not look at the server's exit status.  The directory is writable by
# the unprivileged user the server switches to.
san_dir=
if [ "${SANITIZE:-}" = 1 ] || grep -qa __asan_init "$bin" 2>/dev/null; then
    san_dir=$(mktemp -d /tmp/mandos-sanitizer.XXXXXX) && chmod 1777 "$san_dir" || exit 1
    trap 'rm -f "$log"; rm -rf "$san_dir"' EXIT
    export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:exitcode=86:log_path=$san_dir/report${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
    export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=0:print_stacktrace=1:exitcode=87:log_path=$san_dir/report${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
    echo "# sanitized build: reports collected in $san_dir"
fi

"$bin" --check | tee "$log"
self_pass=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p' "$log")
self_fail=$(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p' "$log")
[ -n "$self_pass" ] || { self_pass=0; self_fail=1; }

# shellcheck disable=SC2086
bats --tap ${BATS_FILES:-t/*.bats} | tee "$log"
bats_pass=$(grep -c '^ok ' "$log")
bats_skip=$(grep -c '^ok .* # skip' "$log")
bats_fail=$(grep -c '^not ok ' "$log")
total=$(grep -m1 '^1\.\.' "$log" | cut -d. -f3)
ran=$((bats_pass + bats_fail))
if [ -n "$total" ] && [ "$ran" -lt "$total" ]; then
    echo "# bats stopped after $ran of $total tests" >&2
    bats_fail=$((bats_fail + total - ran))
fi
san_fail=0
if [ -n "$san_dir" ]; then
    for f in "$san_dir"/*; do
        [ -e "$f" ] || continue
        echo "# sanitizer report $(basename "$f"):" >&2
        sed 's/^/#   /' "$f" >&2
        san_fail=$((san_fail + 1))
    done
    echo "# sanitizer reports: $san_fail"
fi
echo "# self-tests: $self_pass passed, $self_fail failed; bats: $bats_pass passed ($bats_skip skipped), $bats_fail failed"
echo "$((self_pass + bats_pass)) passed, $((self_fail + bats_fail + san_fail)) failed"
[ "$self_fail" -eq 0 ] && [ "$bats_fail" -eq 0 ] && [ "$san_fail" -eq 0 ]
