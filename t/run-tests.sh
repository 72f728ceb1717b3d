#!/bin/bash
# Run the self-tests and the Bats suite; end with "N passed, N failed".
# Environment: BATS_FILES (default: every t/*.bats), MANDOS_BIN.
set -u
cd "$(dirname "$0")/.."
bin=${MANDOS_BIN:-./mandos}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

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
echo "# self-tests: $self_pass passed, $self_fail failed; bats: $bats_pass passed ($bats_skip skipped), $bats_fail failed"
echo "$((self_pass + bats_pass)) passed, $((self_fail + bats_fail)) failed"
[ "$self_fail" -eq 0 ] && [ "$bats_fail" -eq 0 ]
