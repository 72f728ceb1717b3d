#!/bin/bash
# t/lint.sh [FILE...]: reject a bare "! cmd" in a Bats test or a shell
# function anywhere but its last line (default: t/*.bats t/*.bash).
#
# Bats runs a test under `set -e`, and bash never stops for a pipeline
# negated with "!": such a line can fail without failing the test.  Only
# the body's last line counts, as the body's own exit status.  Write
# `run ! cmd` (then its status is checked) or `if cmd; then false; fi`.
# Prints FILE:LINE: for each offender; exits 1 if there is any.
set -u
cd "$(dirname "$0")/.." || exit 2
[ $# -gt 0 ] || set -- t/*.bats t/*.bash
out=$(awk '
	function flush() {
		# the body ends: every bare "!" but one on its last line is an offender
		for (i = 1; i <= nbang; i++)
			if (bang[i] != last)
				printf "%s:%d: a bare \"! cmd\" before the last line of %s is never checked " \
				       "(use \"run ! cmd\" or \"if cmd; then false; fi\")\n", file, bang[i], what
		nbang = 0
		inbody = 0
	}
	FNR == 1 { if (inbody) flush(); heredoc = "" }
	heredoc != "" { if ($0 ~ "^\t*" heredoc "$") heredoc = ""; next }
	!inbody && /^@test .*\{[ \t]*$/ {
		inbody = 1; what = "its test"; prev = ""; file = FILENAME; next
	}
	!inbody && /^(function[ \t]+)?[A-Za-z_][A-Za-z0-9_]*[ \t]*\(\)[ \t]*\{[ \t]*$/ {
		inbody = 1; what = "its function"; prev = ""; file = FILENAME; next
	}
	inbody && /^\}/ { flush(); next }
	inbody {
		line = $0
		if (match(line, /<<-?[ \t]*["\047]?[A-Za-z_]+["\047]?/)) {
			heredoc = substr(line, RSTART, RLENGTH)
			sub(/^<<-?[ \t]*["\047]?/, "", heredoc)
			sub(/["\047]$/, "", heredoc)
		}
		if (line ~ /^[ \t]*(#.*)?$/) next
		last = FNR
		# a "!" continuing a condition ("||", "&&", "|", "\" before) is fine
		if (line ~ /^[ \t]*![ \t]/ && prev !~ /(\|\||&&|\||\\)[ \t]*$/)
			bang[++nbang] = FNR
		prev = line
	}
	END { if (inbody) flush() }
' "$@") || exit 2
[ -z "$out" ] && exit 0
echo "$out" >&2
exit 1
