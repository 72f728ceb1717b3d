#!/bin/sh
# Install what building and testing mandos.c needs on a Debian machine.
# As root this runs apt-get; otherwise it prints the command to run.
# Usage: t/deps.sh build|test|all
set -eu
build="gcc make pkg-config libgnutls28-dev libavahi-client-dev libavahi-compat-libdnssd-dev libsystemd-dev"
test="bats mandos-client mandos gnupg systemd avahi-daemon avahi-utils dbus-daemon dbus-bin iproute2 python3 procps tmux xsltproc docbook-xsl docbook-xml libxml2-utils man-db clang libclang-rt-dev valgrind tcc musl-tools"
case "${1:-all}" in
    build) want="$build" ;;
    test) want="$build $test" ;;
    *) want="$build $test" ;;
esac
missing=""
for p in $want; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "mandos.c needs these packages; please run:" >&2
    echo "  sudo apt-get install$missing" >&2
    exit 1
fi
echo "Installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# The mandos package would start a reference server; keep services down.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends$missing >/dev/null
