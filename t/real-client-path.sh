#!/bin/bash
# Print where the real mandos-client is (or would be) on this machine.
# Debian installs it under the multiarch triplet (x86_64-linux-gnu,
# aarch64-linux-gnu, ...); this machine's is asked for only when several
# are installed or none is.
shopt -s nullglob
found=(/usr/lib/*/mandos/plugins.d/mandos-client)
if [ "${#found[@]}" -ne 1 ]; then
    arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null ||
        gcc -print-multiarch 2>/dev/null) || arch=
    found=("/usr/lib/${arch:-unknown-multiarch}/mandos/plugins.d/mandos-client")
fi
echo "${found[0]}"
