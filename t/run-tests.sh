#!/bin/bash
# Run the self-tests and the Bats suite; end with "N passed, N failed, N skipped".
# Environment: BATS_FILES (default: every t/*.bats), MANDOS_BIN,
# MANDOS_CHECK_BINS (more builds whose --check self-tests count too),
# MANDOS_PORTABLE_BIN with PORTABLE_BATS_FILES (a second run, see below).
#
# Every way a run can go wrong counts as a failure: bats missing or exiting
# non-zero, no TAP plan, a plan of zero tests, fewer tests reported than
# the plan declares.  A skipped test ("ok N ... # skip") is not a pass; in
# CI (CI=true) it is a failure unless t/skip-allowlist names it.
set -u
cd "$(dirname "$0")/.." || exit 2
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

# self_check BIN: run BIN --check; add its counts to self_pass/self_fail.
# No summary line, or a non-zero exit with nothing failed, is one failure.
self_pass=0 self_fail=0
self_check() {
    local rc line f
    echo "# $1 --check"
    "$1" --check | tee "$log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
    if [ -z "$line" ]; then
        echo "# $1 --check (exit $rc) printed no 'N passed, N failed' line" >&2
        self_fail=$((self_fail + 1))
        return
    fi
    self_pass=$((self_pass + ${line%% passed*}))
    f=${line#*passed, }
    f=${f%% failed}
    self_fail=$((self_fail + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "# $1 --check exited $rc with nothing failed" >&2
        self_fail=$((self_fail + 1))
    fi
}
for b in "$bin" ${MANDOS_CHECK_BINS:-}; do
    self_check "$b"
done

# shellcheck disable=SC2086
bats --tap ${BATS_FILES:-t/*.bats} | tee "$log"
bats_rc=${PIPESTATUS[0]}
plan=$(sed -n 's/^1\.\.\([0-9][0-9]*\)$/\1/p' "$log" | head -n 1)
bats_skip=$(grep -cE '^ok [0-9]+ .* # skip( |$)' "$log")
bats_pass=$(($(grep -c '^ok ' "$log") - bats_skip))
bats_fail=$(grep -c '^not ok ' "$log")
ran=$((bats_pass + bats_skip + bats_fail))
if [ -z "$plan" ]; then
    echo "# bats (exit $bats_rc) printed no TAP plan: bats missing, or no test file?" >&2
    bats_fail=$((bats_fail + 1))
elif [ "$plan" -eq 0 ]; then
    echo "# the TAP plan declares no test at all: ${BATS_FILES:-t/*.bats}" >&2
    bats_fail=$((bats_fail + 1))
elif [ "$ran" -lt "$plan" ]; then
    echo "# bats reported $ran of the $plan tests its plan declares" >&2
    bats_fail=$((bats_fail + plan - ran))
fi
if [ "$bats_rc" -ne 0 ] && [ "$bats_fail" -eq 0 ]; then
    echo "# bats exited $bats_rc although no test failed" >&2
    bats_fail=1
fi

# skip_allowed NAME: t/skip-allowlist lets test NAME skip in this run.
# ALLOW_TEST, ALLOW_WHEN: the list's entries (read by read_allowlist).
ALLOW_TEST=() ALLOW_WHEN=()
skip_allowed() {
    local i
    for i in "${!ALLOW_TEST[@]}"; do
        [[ $1 =~ ${ALLOW_TEST[i]} ]] || continue
        [ "${ALLOW_WHEN[i]}" = always ] && return 0
        [ "${ALLOW_WHEN[i]}" = sanitized ] && [ -n "$san_dir" ] && return 0
        [ "${ALLOW_WHEN[i]}" = portable ] && [ "${MANDOS_PORTABLE:-}" = 1 ] && return 0
    done
    return 1
}

# read_allowlist FILE: fill ALLOW_*; false if an entry is malformed.
read_allowlist() {
    local line n=0 at=0 test='' when='' why='' bad=0 eof
    while :; do
        line=
        IFS= read -r line
        eof=$?
        n=$((n + 1))
        case $line in
        '#'*) continue ;;
        test:*) test=${line#test:} test=${test# } at=$n ;;
        when:*) when=${line#when:} when=${when# } ;;
        why:*) why=${line#why:} why=${why# } ;;
        *[![:space:]]*) echo "$1:$n: not 'test:', 'when:' or 'why:'" >&2; bad=1 ;;
        *)  # a blank line (or the end) closes an entry
            if [ -n "$test$when$why" ]; then
                if [ -z "$test" ] || [ -z "$why" ] || [[ ! $when =~ ^(always|sanitized|portable)$ ]]; then
                    echo "$1:$at: an entry needs test:, why: and when: always|sanitized|portable" >&2
                    bad=1
                else
                    ALLOW_TEST+=("$test") ALLOW_WHEN+=("$when")
                fi
            fi
            test='' when='' why=''
            ;;
        esac
        [ "$eof" -eq 0 ] || [ -n "$line" ] || break
    done <"$1"
    return "$bad"
}

# In CI (CI=true) a skip fails unless t/skip-allowlist names the test: it
# then counts as failed, not skipped.
if [ "${CI:-}" = true ] && [ "$bats_skip" -gt 0 ]; then
    if ! read_allowlist t/skip-allowlist; then
        bats_fail=$((bats_fail + 1))
    fi
    denied=0
    while IFS= read -r name; do
        skip_allowed "$name" && continue
        echo "# CI=true: this skip is a failure (not in t/skip-allowlist): $name" >&2
        denied=$((denied + 1))
    done < <(sed -nE 's/^ok [0-9]+ (.*) # skip( .*)?$/\1/p' "$log")
    bats_skip=$((bats_skip - denied))
    bats_fail=$((bats_fail + denied))
fi

# MANDOS_PORTABLE_BIN (make check): PORTABLE_BATS_FILES once more against
# that build, whose fallbacks replace the Linux extras; its counts join.
# Before the sanitizer reports are read: the inner run inherits their
# directory (ASAN_OPTIONS' log_path), so its findings are counted here.
port_pass=0 port_fail=0 port_skip=0
if [ -n "${MANDOS_PORTABLE_BIN:-}" ]; then
    echo "# the core files against $MANDOS_PORTABLE_BIN"
    # shellcheck disable=SC2097,SC2098  # the inner run must not recurse
    MANDOS_BIN=$MANDOS_PORTABLE_BIN MANDOS_PORTABLE=1 MANDOS_PORTABLE_BIN='' MANDOS_CHECK_BINS='' \
        BATS_FILES=${PORTABLE_BATS_FILES:-t/portable.bats} "$0" | tee "$log"
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$log" | tail -n 1)
    # shellcheck disable=SC2086  # split the summary line into its words
    set -- $line
    port_pass=${1:-0} port_fail=${3:-1} port_skip=${5:-0}
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

echo "# self-tests: $self_pass passed, $self_fail failed;" \
    "bats: $bats_pass passed, $bats_fail failed, $bats_skip skipped"
bats_pass=$((bats_pass + port_pass)) bats_fail=$((bats_fail + port_fail))
bats_skip=$((bats_skip + port_skip))
echo "$((self_pass + bats_pass)) passed, $((self_fail + bats_fail + san_fail)) failed, $bats_skip skipped"
[ "$self_fail" -eq 0 ] && [ "$bats_fail" -eq 0 ] && [ "$san_fail" -eq 0 ]
