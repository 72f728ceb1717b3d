#!/bin/bash
# t/bench/real-client.sh [RUNS]: time the real mandos-client fetching its
# password from ./mandos and from the reference /usr/sbin/mandos, in one
# run, same clients.conf, on ::1.  Prints each time and the median.
# Needs root (the real client's directory is root-only).
set -u
cd "$(dirname "$0")/../.."
runs=${1:-7}
client=${REAL_CLIENT:-$(t/real-client-path.sh)}
[ "$(id -u)" -eq 0 ] || { echo "needs root" >&2; exit 1; }
d=$(mktemp -d /tmp/mandos-realclient.XXXXXX)
chmod 755 "$d"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    rm -rf "$d"
}
trap cleanup EXIT
mkdir -p "$d/keys" "$d/conf" "$d/hooks" "$d/ref-state"
chmod 777 "$d/ref-state"        # the reference drops privileges first
mandos-keygen --dir "$d/keys" --name bench --force >/dev/null 2>&1 || exit 1
printf 'bench password' >"$d/pw"
mandos-keygen --password --passfile "$d/pw" --dir "$d/keys" --name bench --no-ssh \
    >"$d/conf/clients.conf" 2>/dev/null || exit 1
echo "checker = true" >>"$d/conf/clients.conf"
# the reference needs a system bus even with --no-dbus: a private one
cat >"$d/bus.conf" <<B
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path=$d/bus</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/>
<allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>
B
dbus-daemon --config-file="$d/bus.conf" --nofork --nopidfile 3>&- &
pids+=($!)
for _ in $(seq 100); do [ -S "$d/bus" ] && break; sleep 0.05; done
chmod 777 "$d/bus"
export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$d/bus"

measure() {   # NAME BINARY STATEDIR
    local port
    port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET6); s.bind(("::1",0)); print(s.getsockname()[1])')
    "$2" --foreground --no-zeroconf --no-dbus --no-restore --configdir "$d/conf" \
        --statedir "$3" --address ::1 --port "$port" >"$d/$1.log" 2>&1 3>&- &
    local pid=$! times=() t0 _
    pids+=("$pid")
    for _ in $(seq 400); do ss -Hltn "sport = :$port" | grep -q . && break; sleep 0.05; done
    for _ in $(seq "$runs"); do
        t0=$(date +%s%N)
        timeout 30 "$client" --connect="[::1]:$port" --interface=none \
            --network-hook-dir="$d/hooks" --pubkey="$d/keys/pubkey.txt" \
            --seckey="$d/keys/seckey.txt" --tls-pubkey="$d/keys/tls-pubkey.pem" \
            --tls-privkey="$d/keys/tls-privkey.pem" >/dev/null 2>&1 || echo "$1: a retrieval failed" >&2
        times+=($(( ($(date +%s%N) - t0) / 1000000 )))
    done
    kill "$pid"; wait "$pid" 2>/dev/null
    echo "$1: ${times[*]} ms; median $(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p") ms"
}
measure ours ./mandos "$d/state"
[ -x /usr/sbin/mandos ] && measure reference /usr/sbin/mandos "$d/ref-state"
