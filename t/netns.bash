# t/netns.bash -- a small, throw-away network world for Zeroconf tests.
#
# Source it from a bats file (or any bash script running as root).
# It builds:
#   * two network namespaces, "server" and "client", joined by one veth
#     pair, with nothing but IPv6 link-local addresses on it;
#   * a private D-Bus daemon of type "system" listening on a socket in
#     a temporary directory (DBUS_SYSTEM_BUS_ADDRESS is exported);
#   * an avahi-daemon inside the server namespace, in its own mount
#     namespace, talking to that private bus and only to the veth.
# Every background process is started by nsw_spawn, which records its
# PID; nsw_down kills each of them by that PID, deletes the namespaces
# and removes the temporary directory.  Every wait is bounded.
#
# Functions (all return non-zero on failure, with a reason on stderr):
#   nsw_up                 build everything (namespaces, bus, avahi)
#   nsw_down               tear everything down; safe to call twice
#   nsw_make_netns         the two namespaces and the veth pair only
#   nsw_dbus_start         the private bus only
#   nsw_avahi_start        avahi-daemon in the server namespace
#   nsw_avahi_stop         kill that avahi-daemon (by PID)
#   nsw_avahi_restart      stop, then start again
#   nsw_srv CMD...         run CMD in the server namespace, with the env
#   nsw_cli CMD...         run CMD in the client namespace, with the env
#   nsw_spawn NS LOG CMD...  start CMD in the background in namespace NS
#                          ("srv" or "cli"), stdout+stderr to LOG; sets
#                          NSW_PID and records it for nsw_down
#   nsw_kill PID           SIGTERM, bounded wait, then SIGKILL; reaps
#   nsw_wait SECS CMD...   poll CMD every 0.2 s until it succeeds or
#                          SECS have passed
#   nsw_now_ms             monotonic-enough wall clock in milliseconds
#   nsw_browse             one avahi-browse -rpt _mandos._tcp in the
#                          server namespace against the private bus
#
# Variables set by nsw_up / nsw_make_netns:
#   NSW_ID NSW_SRV NSW_CLI (namespace names), NSW_VSRV NSW_VCLI (veth
#   names, server side and client side), NSW_DIR (temp dir),
#   NSW_AVAHI_PID, NSW_DBUS_PID, NSW_PIDS (all live PIDs we started).

NSW_PIDS=()
NSW_AVAHI_PID=
NSW_DBUS_PID=
NSW_DIR=

nsw_now_ms() {
    # EPOCHREALTIME is "seconds.microseconds" (bash 5)
    local t=${EPOCHREALTIME/[.,]/}
    echo $(( t / 1000 ))
}

nsw_wait() {
    # nsw_wait SECS CMD... -- bounded both in tries and in time
    local secs=$1; shift
    local deadline=$(( $(nsw_now_ms) + secs * 1000 ))
    local tries=$(( secs * 5 + 1 )) i
    for (( i = 0; i < tries; i++ )); do
        "$@" && return 0
        (( $(nsw_now_ms) >= deadline )) && break
        sleep 0.2
    done
    "$@"
}

# A short id that keeps interface names within IFNAMSIZ (15 chars):
# the shell's PID in hex plus a random byte.
nsw_pick_id() {
    printf '%x%02x' "$BASHPID" $(( RANDOM % 256 ))
}

nsw_forget_pid() {
    local pid=$1 p keep=()
    for p in "${NSW_PIDS[@]}"; do
        [[ $p == "$pid" ]] || keep+=("$p")
    done
    NSW_PIDS=("${keep[@]}")
}

nsw_gone() {
    # True once PID no longer exists or is a zombie (then reap it).
    local pid=$1 state
    [[ -e /proc/$pid ]] || return 0
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 0
    if [[ $state == Z ]]; then
        wait "$pid" 2>/dev/null
        return 0
    fi
    return 1
}

nsw_kill() {
    # Kill one process we started, by PID: TERM, up to 5 s, then KILL.
    local pid=$1 i
    [[ -n $pid ]] || return 0
    if ! nsw_gone "$pid"; then
        kill -TERM "$pid" 2>/dev/null
        for (( i = 0; i < 50; i++ )); do
            nsw_gone "$pid" && break
            sleep 0.1
        done
        if ! nsw_gone "$pid"; then
            echo "netns: PID $pid ignored SIGTERM; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
            for (( i = 0; i < 30; i++ )); do
                nsw_gone "$pid" && break
                sleep 0.1
            done
        fi
    fi
    wait "$pid" 2>/dev/null
    nsw_forget_pid "$pid"
    return 0
}

nsw_ns_name() {
    case $1 in
        srv) echo "$NSW_SRV" ;;
        cli) echo "$NSW_CLI" ;;
        *) echo "netns: unknown namespace '$1' (want srv or cli)" >&2
           return 1 ;;
    esac
}

nsw_env() {
    # The environment every process in the world gets.
    echo "DBUS_SYSTEM_BUS_ADDRESS=$DBUS_SYSTEM_BUS_ADDRESS"
}

nsw_srv() { ip netns exec "$NSW_SRV" env "$(nsw_env)" "$@"; }
nsw_cli() { ip netns exec "$NSW_CLI" env "$(nsw_env)" "$@"; }

nsw_spawn() {
    # nsw_spawn srv|cli LOGFILE CMD...
    local ns log
    ns=$(nsw_ns_name "$1") || return 1
    log=$2; shift 2
    # ip netns exec and env both exec in place, so $! is CMD's own PID.
    # fd 3 is closed: bats waits for every holder of it.
    ip netns exec "$ns" env "$(nsw_env)" "$@" </dev/null >"$log" 2>&1 3>&- &
    NSW_PID=$!
    NSW_PIDS+=("$NSW_PID")
}

# ---------------------------------------------------------------- netns

nsw_link_ready() {
    # True when IF in namespace NS has a usable (non-tentative)
    # link-local address and a carrier.
    local ns=$1 ifc=$2 out
    out=$(ip -n "$ns" -6 addr show dev "$ifc" scope link 2>/dev/null)
    [[ $out == *"inet6 fe80:"* && $out != *tentative* ]] || return 1
    out=$(ip -n "$ns" link show dev "$ifc" 2>/dev/null)
    [[ $out == *LOWER_UP* ]]
}

nsw_tune_ns() {
    # No duplicate-address detection: the address is usable at once.
    local ns=$1 ifc=$2 k
    for k in all default ${ifc:+"$ifc"}; do
        ip netns exec "$ns" sysctl -qw \
            "net.ipv6.conf.$k.disable_ipv6=0" \
            "net.ipv6.conf.$k.accept_dad=0" \
            "net.ipv6.conf.$k.dad_transmits=0" >/dev/null || return 1
    done
}

nsw_make_netns() {
    NSW_ID=${NSW_ID:-$(nsw_pick_id)}
    NSW_SRV=mcs-$NSW_ID-srv
    NSW_CLI=mcs-$NSW_ID-cli
    NSW_VSRV=mcs${NSW_ID}s
    NSW_VCLI=mcs${NSW_ID}c
    ip netns add "$NSW_SRV" || return 1
    ip netns add "$NSW_CLI" || return 1
    nsw_tune_ns "$NSW_SRV" || return 1
    nsw_tune_ns "$NSW_CLI" || return 1
    ip link add "$NSW_VSRV" netns "$NSW_SRV" type veth \
        peer name "$NSW_VCLI" netns "$NSW_CLI" || return 1
    nsw_tune_ns "$NSW_SRV" "$NSW_VSRV" || return 1
    nsw_tune_ns "$NSW_CLI" "$NSW_VCLI" || return 1
    ip -n "$NSW_SRV" link set lo up || return 1
    ip -n "$NSW_CLI" link set lo up || return 1
    ip -n "$NSW_SRV" link set "$NSW_VSRV" up || return 1
    ip -n "$NSW_CLI" link set "$NSW_VCLI" up || return 1
    if ! nsw_wait 10 nsw_link_ready "$NSW_SRV" "$NSW_VSRV" ||
       ! nsw_wait 10 nsw_link_ready "$NSW_CLI" "$NSW_VCLI"; then
        echo "netns: veth link-local addresses not ready within 10 s" >&2
        return 1
    fi
}

# Link-local address of IF in namespace NS ("fe80::...")
nsw_ll_addr() {
    ip -n "$1" -6 addr show dev "$2" scope link |
        awk '$1 == "inet6" { sub("/.*", "", $2); print $2; exit }'
}

# ---------------------------------------------------------------- D-Bus

nsw_bus_alive() {
    dbus-send --system --dest=org.freedesktop.DBus --print-reply \
        --reply-timeout=1000 /org/freedesktop/DBus \
        org.freedesktop.DBus.GetId >/dev/null 2>&1
}

nsw_dbus_start() {
    local conf=$NSW_DIR/dbus.conf sock=$NSW_DIR/system_bus_socket
    cat >"$conf" <<EOF || return 1
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <!-- a private "system" bus for one test run; anyone may do anything -->
  <type>system</type>
  <listen>unix:path=$sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
EOF
    export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$sock
    dbus-daemon --config-file="$conf" --nofork --nopidfile \
        </dev/null >"$NSW_DIR/dbus.log" 2>&1 3>&- &
    NSW_DBUS_PID=$!
    NSW_PIDS+=("$NSW_DBUS_PID")
    if ! nsw_wait 10 nsw_bus_alive; then
        echo "netns: private D-Bus did not answer within 10 s" >&2
        cat "$NSW_DIR/dbus.log" >&2
        return 1
    fi
}

# ---------------------------------------------------------------- avahi

nsw_avahi_conf() {
    cat <<EOF
# avahi-daemon for one test run: only the server-side veth, IPv6 only
[server]
host-name=mcs${NSW_ID}srv
use-ipv4=no
use-ipv6=yes
allow-interfaces=$NSW_VSRV
enable-dbus=yes
disallow-other-stacks=no
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
disable-publishing=no
disable-user-service-publishing=no
publish-addresses=yes
publish-hinfo=no
publish-workstation=no
publish-domain=no

[reflector]
enable-reflector=no

[rlimits]
EOF
}

nsw_avahi_on_bus() {
    # avahi-daemon answers on the private bus and is past start-up
    # (GetState: 2 = AVAHI_SERVER_RUNNING).
    local out
    out=$(dbus-send --system --dest=org.freedesktop.Avahi --print-reply \
        --reply-timeout=1000 / org.freedesktop.Avahi.Server.GetState \
        2>/dev/null) || return 1
    [[ $out == *"int32 2"* ]]
}

nsw_avahi_start() {
    local conf=$NSW_DIR/avahi-daemon.conf
    nsw_avahi_conf >"$conf" || return 1
    # avahi-daemon locks /run/avahi-daemon/pid; a private mount namespace
    # with a tmpfs there lets it live beside the machine's own daemon.
    # The directory is avahi's standard run-time one; create it if this
    # machine never had it (an empty directory, nothing mounted on it).
    [[ -d /run/avahi-daemon ]] || mkdir -p /run/avahi-daemon || return 1
    nsw_spawn srv "$NSW_DIR/avahi.log" \
        unshare -m --propagation private sh -c '
            mount -t tmpfs -o mode=0755,size=1m mcs-avahi /run/avahi-daemon &&
            exec "$@"' avahi-sh \
        avahi-daemon -f "$conf" --no-drop-root --no-chroot --no-rlimits \
        --debug || return 1
    NSW_AVAHI_PID=$NSW_PID
    if ! nsw_wait 15 nsw_avahi_on_bus; then
        echo "netns: avahi-daemon not running on the private bus within 15 s" >&2
        tail -n 20 "$NSW_DIR/avahi.log" >&2
        return 1
    fi
}

nsw_avahi_stop() {
    [[ -n $NSW_AVAHI_PID ]] || return 0
    cat "$NSW_DIR/avahi.log" >>"$NSW_DIR/avahi.log.old" 2>/dev/null
    nsw_kill "$NSW_AVAHI_PID"
    NSW_AVAHI_PID=
}

nsw_avahi_restart() {
    nsw_avahi_stop && nsw_avahi_start
}

nsw_browse() {
    # One resolved, parsable, terminating browse of _mandos._tcp.
    nsw_srv timeout 10 avahi-browse -rpt _mandos._tcp 2>/dev/null
}

# ---------------------------------------------------------------- world

nsw_up() {
    NSW_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mcs-world.XXXXXX") || return 1
    chmod 0755 "$NSW_DIR"
    nsw_make_netns || return 1
    nsw_dbus_start || return 1
    nsw_avahi_start || return 1
}

nsw_down() {
    local pid i
    # Newest first: clients and servers before avahi, avahi before the bus.
    for (( i = ${#NSW_PIDS[@]} - 1; i >= 0; i-- )); do
        pid=${NSW_PIDS[i]}
        [[ -n $pid ]] && nsw_kill "$pid"
    done
    NSW_PIDS=()
    NSW_AVAHI_PID=
    NSW_DBUS_PID=
    # Anything still inside our own namespaces was forked by something we
    # started (say a server's helper child); name it and stop it by PID.
    local ns left
    for ns in ${NSW_SRV:-} ${NSW_CLI:-}; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            left=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)
            echo "netns: leftover PID $pid in $ns: ${left:0:100}" >&2
            nsw_kill "$pid"
        done
    done
    [[ -n ${NSW_SRV:-} ]] && ip netns del "$NSW_SRV" 2>/dev/null
    [[ -n ${NSW_CLI:-} ]] && ip netns del "$NSW_CLI" 2>/dev/null
    NSW_SRV='' NSW_CLI='' NSW_ID=''
    if [[ -n $NSW_DIR && -d $NSW_DIR && ${NSW_KEEP:-} != 1 ]]; then
        rm -rf -- "$NSW_DIR"
    fi
    NSW_DIR=
    return 0
}
