#!/bin/bash
# t/mutate.sh: prove that the tests bite.  For each entry of t/mutations,
# copy mandos.c, change the one line the entry names, build the copy with
# the flags ./mandos is built with, run the entry's tests against it and
# report CAUGHT (a test failed) or SURVIVED (every test passed).
#
#   t/mutate.sh              every mutation; ends "N mutations, N caught, N survived"
#   t/mutate.sh NAME...      only those
#   t/mutate.sh --verify     only check that each entry is well formed and its
#                            find: text is on exactly one line (no build, no tests)
#
# Exit status: 0 only if every mutation was caught.  A mutation that cannot
# be applied, does not build or runs no test at all counts against the run.
# Each Bats run takes /tmp/mandos-bats.lock itself: do not wrap this script
# in that lock.  Environment: MUTATE_KEEP=1 keeps the work directory;
# make variables (CC, CFLAGS, ZEROCONF, DBUS, SANITIZE) reach the builds.
set -u
cd "$(dirname "$0")/.." || exit 2
LIST=t/mutations
SRC=mandos.c
LOCK=/tmp/mandos-bats.lock

M_NAME=() M_WHY=() M_FIND=() M_REPLACE=() M_TESTS=() M_FILTER=() M_AT=()
bad_list=0

list_error() {
	echo "$LIST:$1: $2" >&2
	bad_list=1
}

# end_entry: file the fields read so far (cur_*) as one entry, if any.
end_entry() {
	[[ -n $cur_at ]] || return 0
	local key
	for key in name why find replace tests; do
		[[ -v cur_$key ]] || list_error "$cur_at" "entry has no '$key:'"
	done
	M_NAME+=("${cur_name-}") M_WHY+=("${cur_why-}") M_FIND+=("${cur_find-}")
	M_REPLACE+=("${cur_replace-}") M_TESTS+=("${cur_tests-}")
	M_FILTER+=("${cur_filter-}") M_AT+=("$cur_at")
	unset cur_name cur_why cur_find cur_replace cur_tests cur_filter
	cur_at=
}

parse_list() {
	local line n=0 key value
	cur_at=
	[[ -r $LIST ]] || { echo "mutate: cannot read $LIST" >&2; exit 2; }
	while IFS= read -r line || [[ -n $line ]]; do
		n=$((n + 1))
		if [[ -z ${line//[[:space:]]/} ]]; then
			end_entry
			continue
		fi
		[[ $line == \#* ]] && continue
		if [[ ! $line =~ ^([a-z]+):\ ?(.*)$ ]]; then
			list_error "$n" "not 'key: value'"
			continue
		fi
		key=${BASH_REMATCH[1]}
		value=${BASH_REMATCH[2]}
		case $key in
		name | why | find | replace | tests | filter) ;;
		*) list_error "$n" "unknown key '$key'"; continue ;;
		esac
		[[ -n $cur_at ]] || cur_at=$n
		[[ -v cur_$key ]] && list_error "$n" "'$key:' given twice in one entry"
		printf -v "cur_$key" '%s' "$value"
	done <"$LIST"
	end_entry
}

# check_entry I: the entry is usable: unique name, tests that exist, a
# find: text on exactly one line of mandos.c that replace: changes.
check_entry() {
	local i=$1 at=${M_AT[$1]} j hits t
	[[ ${M_NAME[i]} =~ ^[A-Za-z0-9._-]+$ ]] || list_error "$at" "bad name '${M_NAME[i]}'"
	for ((j = 0; j < i; j++)); do
		[[ ${M_NAME[j]} != "${M_NAME[i]}" ]] || list_error "$at" "name '${M_NAME[i]}' used twice"
	done
	[[ -n ${M_FIND[i]} ]] || list_error "$at" "empty find:"
	[[ ${M_FIND[i]} != "${M_REPLACE[i]}" ]] || list_error "$at" "replace: equals find:"
	hits=$(grep -cF -- "${M_FIND[i]}" "$SRC")
	[[ $hits -eq 1 ]] || list_error "$at" "${M_NAME[i]}: find: is on $hits lines of $SRC, not 1"
	[[ -n ${M_TESTS[i]} ]] || list_error "$at" "empty tests:"
	for t in ${M_TESTS[i]}; do
		[[ $t == --check || -f $t ]] || list_error "$at" "${M_NAME[i]}: no test file '$t'"
	done
}

# apply I DIR: DIR/mandos.c is mandos.c with entry I's change made.
apply() {
	local i=$1 dir=$2
	FIND=${M_FIND[i]} REPL=${M_REPLACE[i]} awk '
		!done && (p = index($0, ENVIRON["FIND"])) {
			$0 = substr($0, 1, p - 1) ENVIRON["REPL"] substr($0, p + length(ENVIRON["FIND"]))
			done = 1
		}
		{ print }' "$SRC" >"$dir/mandos.c" || return 1
	! cmp -s "$SRC" "$dir/mandos.c"
}

# tap_count FILE: set T_PLAN (empty if none), T_PASS, T_SKIP, T_FAIL.
tap_count() {
	T_PLAN=$(sed -n 's/^1\.\.\([0-9][0-9]*\)$/\1/p' "$1" | head -n 1)
	T_FAIL=$(grep -c '^not ok ' "$1")
	T_SKIP=$(grep -cE '^ok [0-9]+ .* # skip( |$)' "$1")
	T_PASS=$(($(grep -c '^ok ' "$1") - T_SKIP))
}

# run_one I: build and test entry I; prints its verdict line and sets VERDICT
# to caught, survived or error.
run_one() {
	local i=$1 name=${M_NAME[$1]} dir="$WORK/${M_NAME[$1]}" rc filter=() files=()
	mkdir -p "$dir" && chmod 755 "$dir"
	VERDICT=error
	if ! apply "$i" "$dir"; then
		echo "ERROR    $name: the change could not be applied"
		return
	fi
	if ! make -s --no-print-directory mandos-variant VARIANT="$dir/mandos" \
		VARIANT_SRC="$dir/mandos.c" >"$dir/build.log" 2>&1; then
		echo "ERROR    $name: the mutant does not build:"
		sed 's/^/#   /' "$dir/build.log" | tail -n 15
		return
	fi
	if [[ ${M_TESTS[i]} == --check ]]; then
		"$dir/mandos" --check >"$dir/test.log" 2>&1
		rc=$?
		if [[ $rc -ne 0 ]]; then
			VERDICT=caught
			echo "CAUGHT   $name: --check exit $rc; $(grep -c '^FAIL ' "$dir/test.log") self-test(s) failed"
			grep '^FAIL ' "$dir/test.log" | sed 's/^/#   /'
		else
			VERDICT=survived
			echo "SURVIVED $name: ${M_WHY[i]} (--check: $(tail -n 1 "$dir/test.log"))"
		fi
		return
	fi
	[[ -n ${M_FILTER[i]} ]] && filter=(-f "${M_FILTER[i]}")
	read -ra files <<<"${M_TESTS[i]}"
	flock -n 9 || echo "# $name: waiting for $LOCK" >&2
	flock 9
	MANDOS_BIN="$dir/mandos" timeout -k 10 1800 bats --tap "${filter[@]}" "${files[@]}" \
		>"$dir/test.log" 2>&1
	rc=$?
	flock -u 9
	tap_count "$dir/test.log"
	if [[ $T_FAIL -gt 0 ]]; then
		VERDICT=caught
		echo "CAUGHT   $name: $T_FAIL of ${T_PLAN:-?} test(s) failed"
		sed -n 's/^not ok [0-9]* /#   /p' "$dir/test.log"
	elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
		VERDICT=caught
		echo "CAUGHT   $name: the tests hung (killed after 30 minutes)"
	elif [[ -z $T_PLAN || $T_PLAN -eq 0 || $rc -ne 0 ]]; then
		echo "ERROR    $name: no test ran (bats exit $rc, plan '${T_PLAN}'):"
		tail -n 10 "$dir/test.log" | sed 's/^/#   /'
	elif [[ $T_PASS -eq 0 ]]; then
		echo "ERROR    $name: every selected test skipped ($T_SKIP)"
	else
		VERDICT=survived
		echo "SURVIVED $name: ${M_WHY[i]} ($T_PASS test(s) passed, $T_SKIP skipped)"
	fi
}

verify=0
want=()
for arg in "$@"; do
	case $arg in
	--verify) verify=1 ;;
	-h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	-*) echo "mutate: unknown option $arg" >&2; exit 2 ;;
	*) want+=("$arg") ;;
	esac
done

parse_list
for i in "${!M_NAME[@]}"; do check_entry "$i"; done
if [[ $verify -eq 1 ]]; then
	[[ $bad_list -eq 0 ]] || exit 1
	echo "$LIST: ${#M_NAME[@]} mutations, each find: on exactly one line of $SRC"
	exit 0
fi
[[ $bad_list -eq 0 ]] || exit 1

chosen=()
if [[ ${#want[@]} -eq 0 ]]; then
	chosen=("${!M_NAME[@]}")
else
	for w in "${want[@]}"; do
		found=
		for i in "${!M_NAME[@]}"; do [[ ${M_NAME[i]} == "$w" ]] && found=$i; done
		[[ -n $found ]] || { echo "mutate: no mutation named '$w' in $LIST" >&2; exit 2; }
		chosen+=("$found")
	done
fi

WORK=$(mktemp -d /tmp/mandos-mutate.XXXXXX) || exit 1
chmod 755 "$WORK"
if [[ ${MUTATE_KEEP:-} == 1 ]]; then
	echo "# work directory kept: $WORK"
else
	trap 'rm -rf "$WORK"' EXIT
fi
exec 9>>"$LOCK"

caught=0 survived=0 errors=0
for i in "${chosen[@]}"; do
	run_one "$i"
	case $VERDICT in
	caught) caught=$((caught + 1)) ;;
	survived) survived=$((survived + 1)) ;;
	*) errors=$((errors + 1)) ;;
	esac
done
[[ $errors -eq 0 ]] || echo "# $errors mutation(s) could not be tested (ERROR above)"
echo "${#chosen[@]} mutations, $caught caught, $survived survived"
[[ $survived -eq 0 && $errors -eq 0 ]]
