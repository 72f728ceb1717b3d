#!/usr/bin/env bats
# Manual pages: they must render cleanly, and they must agree with the
# program (options printed by --help) and with the parser's key tables
# in mandos.c.
#
# Markup conventions the checks rely on (see the comment at the top of
# each .xml file):
#   mandos.8.xml       <option>--NAME</option> and <option>-X</option> only
#                      for this program's own options; each option has an
#                      entry <term><option>--NAME</option> in OPTIONS, and
#                      appears in the SYNOPSIS.
#   mandos.conf.5.xml  each key has one entry <term><option>KEY</option>.
#   clients.conf.5.xml the same.
# mandos.conf keys are those --help lists as "  KEY = DEFAULT" after its
# line "Settings also come from"; clients.conf keys are the lines
# `{ "KEY",`, `SETTING(KEY,` or `FIELD(KEY,` of
# `static const struct client_field client_fields[] = {` whose first line
# has the flag F_CONF.
#
# Environment: MANDOS_BIN (default ../mandos), MANDOS_SRC (../mandos.c),
# DOCBOOK_XSL (the manpages stylesheet of docbook-xsl).

setup() {
    MAIN="$BATS_TEST_DIRNAME/.."
    MANDOS_BIN="${MANDOS_BIN:-$MAIN/mandos}"
    MANDOS_SRC="${MANDOS_SRC:-$MAIN/mandos.c}"
    XSL="${DOCBOOK_XSL:-/usr/share/xml/docbook/stylesheet/docbook-xsl/manpages/docbook.xsl}"
}

# ---- helpers -------------------------------------------------------------

need_xsltproc() {
    command -v xsltproc >/dev/null || skip "xsltproc not installed"
    [ -r "$XSL" ] || skip "DocBook XSL stylesheet missing: $XSL"
}

need_bin() {
    [ -x "$MANDOS_BIN" ] || skip "no mandos binary at $MANDOS_BIN (build it first)"
}

need_src() {
    [ -r "$MANDOS_SRC" ] || skip "no source at $MANDOS_SRC"
}

# render XML PAGE: xsltproc XML into $BATS_TEST_TMPDIR, expect file PAGE,
# then let man(1) format it and require that it prints no warnings.
render() {
    local xml="$MAIN/$1" page="$2" out="$BATS_TEST_TMPDIR/render"
    need_xsltproc
    mkdir -p "$out"
    run bash -c 'cd "$1" && xsltproc --nonet "$2" "$3" 2>&1' _ "$out" "$XSL" "$xml"
    echo "xsltproc: $output"
    [ "$status" -eq 0 ]
    # xsltproc prints "Note: Writing ..."; anything worse is a defect.
    if grep -Eiq '^(warn|error)|error:|warning:' <<<"$output"; then
        echo "xsltproc warned or failed" >&2
        return 1
    fi
    [ -s "$out/$page" ]

    command -v man >/dev/null || skip "man not installed"
    run bash -c 'LC_ALL=C.UTF-8 MANROFFSEQ="" MANWIDTH=80 man --warnings -E UTF-8 -l -Tutf8 -Z "$1" 2>&1 >/dev/null' _ "$out/$page"
    echo "man: $output"
    [ "$status" -eq 0 ]
    [ -z "$output" ]
}

# validate XML: well-formed and valid DocBook 4.5 (DTD from the catalogue).
validate() {
    command -v xmllint >/dev/null || skip "xmllint not installed"
    if command -v xmlcatalog >/dev/null; then
        xmlcatalog "${XML_CATALOG_FILES:-/etc/xml/catalog}" \
            "-//OASIS//DTD DocBook XML V4.5//EN" >/dev/null 2>&1 ||
            skip "DocBook XML 4.5 DTD not in the XML catalogue"
    fi
    run xmllint --valid --nonet --noout "$MAIN/$1"
    echo "$output"
    [ "$status" -eq 0 ]
    [ -z "$output" ]
}

# same_sets LABEL_A FILE_A LABEL_B FILE_B: both sorted files hold the
# same lines; otherwise show what is missing on which side.
same_sets() {
    local diff
    diff=$(comm -3 "$2" "$4")
    if [ -n "$diff" ]; then
        echo "lines only in $1 (left column) or only in $3 (indented):"
        echo "$diff"
        return 1
    fi
}

# Long options mentioned anywhere in mandos.8.xml.
man_long_opts() {
    grep -oE '<option>--[a-z][a-z0-9-]*</option>' "$MAIN/mandos.8.xml" |
        sed 's/<option>//; s/<\/option>//' | sort -u
}

# Long options that have their own entry in OPTIONS.
man_term_opts() {
    grep -oE '<term><option>--[a-z][a-z0-9-]*</option>' "$MAIN/mandos.8.xml" |
        sed 's/.*<option>//; s/<\/option>//' | sort -u
}

# Options (long and short) in the SYNOPSIS.
man_synopsis_opts() {
    sed -n '/<refsynopsisdiv>/,/<\/refsynopsisdiv>/p' "$MAIN/mandos.8.xml" |
        grep -oE '<option>--?[a-zA-Z][a-z0-9-]*</option>' |
        sed 's/<option>//; s/<\/option>//' | sort -u
}

man_short_opts() {
    grep -oE '<option>-[a-zA-Z]</option>' "$MAIN/mandos.8.xml" |
        sed 's/<option>//; s/<\/option>//' | sort -u
}

help_long_opts() {
    grep -oE -- '--[a-z][a-z0-9-]*' "$BATS_TEST_TMPDIR/help" | sort -u
}

help_short_opts() {
    grep -oE -- '(^|[][[:space:],(|])-[a-zA-Z]([][[:space:],=|)]|$)' \
        "$BATS_TEST_TMPDIR/help" | grep -oE -- '-[a-zA-Z]' | sort -u
}

get_help() {
    need_bin
    run "$MANDOS_BIN" --help
    [ "$status" -eq 0 ]
    printf '%s\n' "$output" >"$BATS_TEST_TMPDIR/help"
    [ -s "$BATS_TEST_TMPDIR/help" ]
}

# src_keys TABLE [FLAG]: keys of `TABLE[] = {` rows (with FLAG on their first line).
src_keys() {
    awk -v head=" $1[] = {" -v want="${2:-}" '
        index($0, head) { inside = 1; next }
        inside && /};/   { exit }
        inside && (want == "" || index($0, want)) { print }' "$MANDOS_SRC" |
        sed -n -e 's/^[[:space:]]*{[[:space:]]*"\([^"]*\)"[[:space:]]*,.*/\1/p' \
               -e 's/^[[:space:]]*SETTING(\([a-z_0-9]*\),.*/\1/p' \
               -e 's/^[[:space:]]*FIELD(\([a-z_0-9]*\),.*/\1/p' |
        sort -u
}

# doc_keys FILE: keys with an entry <term><option>KEY</option>.
doc_keys() {
    grep -oE '<term><option>[a-z_][a-z0-9_]*</option>' "$MAIN/$1" |
        sed 's/.*<option>//; s/<\/option>//' | sort
}

# help_keys: the mandos.conf keys that --help lists.
help_keys() {
    sed -n '/^Settings also come from/,$p' "$BATS_TEST_TMPDIR/help" |
        sed -n 's/^  \([a-z_][a-z0-9_]*\) = .*/\1/p' | sort -u
}

# check_keys KEYFILE XMLFILE: the keys in KEYFILE (one a line, sorted)
# are those XMLFILE documents, each once.
check_keys() {
    if [ ! -s "$1" ]; then
        echo "no keys found for $2"
        return 1
    fi
    doc_keys "$2" >"$BATS_TEST_TMPDIR/doc.all"
    # Each key is documented exactly once.
    [ -z "$(uniq -d "$BATS_TEST_TMPDIR/doc.all")" ] || {
        echo "documented twice in $2:"; uniq -d "$BATS_TEST_TMPDIR/doc.all"
        return 1
    }
    same_sets "$1" "$1" "$2" "$BATS_TEST_TMPDIR/doc.all"
}

# ---- (a) rendering -------------------------------------------------------

@test "man: mandos.8.xml is valid DocBook 4.5" {
    validate mandos.8.xml
}

@test "man: mandos.conf.5.xml is valid DocBook 4.5" {
    validate mandos.conf.5.xml
}

@test "man: clients.conf.5.xml is valid DocBook 4.5" {
    validate clients.conf.5.xml
}

@test "man: mandos.8.xml renders to mandos.8 without warnings" {
    render mandos.8.xml mandos.8
}

@test "man: mandos.conf.5.xml renders to mandos.conf.5 without warnings" {
    render mandos.conf.5.xml mandos.conf.5
}

@test "man: clients.conf.5.xml renders to mandos-clients.conf.5 without warnings" {
    render clients.conf.5.xml mandos-clients.conf.5
}

# ---- (b) consistency -----------------------------------------------------

@test "man: every option with an entry in mandos.8 OPTIONS is in the SYNOPSIS" {
    man_term_opts >"$BATS_TEST_TMPDIR/terms"
    man_synopsis_opts | grep -- '^--' >"$BATS_TEST_TMPDIR/syn"
    [ -s "$BATS_TEST_TMPDIR/terms" ]
    same_sets OPTIONS "$BATS_TEST_TMPDIR/terms" SYNOPSIS "$BATS_TEST_TMPDIR/syn"
}

@test "man: every option mentioned in mandos.8 has an entry in OPTIONS" {
    man_long_opts >"$BATS_TEST_TMPDIR/all"
    man_term_opts >"$BATS_TEST_TMPDIR/terms"
    same_sets "mentioned" "$BATS_TEST_TMPDIR/all" OPTIONS "$BATS_TEST_TMPDIR/terms"
}

@test "man: long options of --help and mandos.8 agree" {
    get_help
    help_long_opts >"$BATS_TEST_TMPDIR/help.long"
    man_long_opts >"$BATS_TEST_TMPDIR/man.long"
    [ -s "$BATS_TEST_TMPDIR/help.long" ]
    same_sets "--help" "$BATS_TEST_TMPDIR/help.long" \
              mandos.8.xml "$BATS_TEST_TMPDIR/man.long"
}

@test "man: short options of --help and mandos.8 agree" {
    get_help
    help_short_opts >"$BATS_TEST_TMPDIR/help.short"
    man_short_opts >"$BATS_TEST_TMPDIR/man.short"
    same_sets "--help" "$BATS_TEST_TMPDIR/help.short" \
              mandos.8.xml "$BATS_TEST_TMPDIR/man.short"
}

@test "man: mandos.conf keys of --help and mandos.conf.5 agree" {
    get_help
    help_keys >"$BATS_TEST_TMPDIR/help.keys"
    check_keys "$BATS_TEST_TMPDIR/help.keys" mandos.conf.5.xml
}

@test "man: clients.conf keys of the parser and mandos-clients.conf.5 agree" {
    need_src
    src_keys client_fields F_CONF >"$BATS_TEST_TMPDIR/src.keys"
    check_keys "$BATS_TEST_TMPDIR/src.keys" clients.conf.5.xml
}
