#!/bin/bash
# make demo: run ./mandos in the foreground on a throw-away example set-up
# and show the real mandos-client retrieving its password from it.
# The server keeps running until Ctrl-C (DEMO_ONCE=1: stop after the demo).
set -u
cd "$(dirname "$0")/.."
client=${REAL_CLIENT:-$(t/real-client-path.sh)}
if [ "$(id -u)" -ne 0 ]; then
    echo "make demo runs the real mandos-client, whose directory is root-only:" >&2
    echo "  sudo make demo" >&2
    exit 1
fi
dir=$(mktemp -d /tmp/mandos-demo.XXXXXX)
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid"
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

echo "== Making a client key set with mandos-keygen (a few seconds) ..."
mkdir -p "$dir/keys" "$dir/conf" "$dir/hooks"
mandos-keygen --dir "$dir/keys" --name demo --force >/dev/null 2>&1 || exit 1
printf 'correct horse battery staple' >"$dir/pass"
mandos-keygen --password --passfile "$dir/pass" --dir "$dir/keys" --name demo --no-ssh \
    >"$dir/conf/clients.conf" 2>/dev/null || exit 1
echo "checker = true" >>"$dir/conf/clients.conf"
chmod 600 "$dir/conf/clients.conf"
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET6); s.bind(("::1",0)); print(s.getsockname()[1])')
echo "== clients.conf (the secret is OpenPGP data only the client can decrypt):"
sed 's/^\(    .\{20\}\).*/\1.../' "$dir/conf/clients.conf"
echo "== Starting: ./mandos --debug --no-zeroconf --address ::1 --port $port (GnuTLS lines hidden)"
./mandos --debug --no-zeroconf --no-dbus --configdir "$dir/conf" \
    --statedir "$dir/state" --address ::1 --port "$port" 3>&- \
    2> >(grep --line-buffered -v 'GnuTLS: ' >&2) &
server_pid=$!
for _ in $(seq 100); do
    ss -Hltn "sport = :$port" | grep -q . && break
    sleep 0.05
done
echo "== Running the real mandos-client against [::1]:$port ..."
start=$(date +%s%N)
got=$(timeout 30 "$client" --connect="[::1]:$port" --interface=none \
    --network-hook-dir="$dir/hooks" --pubkey="$dir/keys/pubkey.txt" \
    --seckey="$dir/keys/seckey.txt" --tls-pubkey="$dir/keys/tls-pubkey.pem" \
    --tls-privkey="$dir/keys/tls-privkey.pem" 2>/dev/null)
rc=$?
ms=$(( ($(date +%s%N) - start) / 1000000 ))
if [ $rc -eq 0 ]; then
    echo "== mandos-client printed the password in $ms ms: \"$got\""
else
    echo "== mandos-client failed (exit $rc)"
    exit 1
fi
[ "${DEMO_ONCE:-0}" = 1 ] && exit 0
echo "== The server keeps running; press Ctrl-C to stop it."
wait "$server_pid"
