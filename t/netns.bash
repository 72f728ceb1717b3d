# t/netns.bash -- a small, throw-away network world for Zeroconf tests.
#
# Source it from a bats file (or any bash script running as root).
# It builds two sides, "srv" and "cli", each a network namespace:
#   * the two namespaces are joined by one veth pair, with nothing but
#     IPv6 link-local addresses on it;
#   * each side has its own private D-Bus daemon of type "system" (a
#     socket in its own directory under the temporary directory);
#   * each side has its own avahi-daemon, in its own mount namespace (a
#     private /run/avahi-daemon), on its side's bus, allowed only its
#     side's end of the veth.
# So nothing one side publishes reaches the other except as multicast DNS
# over the veth; and since a namespace sees only its own interfaces, no
# packet ever leaves on one of the machine's real interfaces.
#
# Every background process is started by nsw_spawn in a process group of
# its own and recorded by PID; nsw_down stops each group, then anything
# still inside the namespaces, deletes the namespaces and removes the
# temporary directory.  Every wait is bounded.
#
# Functions (all return non-zero on failure, with a reason on stderr);
# SIDE is "srv" or "cli":
#   nsw_up                 build everything (namespaces, buses, daemons)
#   nsw_down               tear everything down; safe to call twice
#   nsw_make_netns         the two namespaces and the veth pair only
#   nsw_dbus_start SIDE    that side's private bus only
#   nsw_avahi_start [SIDE] start that side's avahi-daemon (default srv)
#   nsw_avahi_stop [SIDE]  stop it (by PID; it says goodbye on the wire)
#   nsw_avahi_restart [SIDE]  stop, then start again
#   nsw_srv CMD...         run CMD in the srv namespace, on the srv bus
#   nsw_cli CMD...         run CMD in the cli namespace, on the cli bus
#   nsw_spawn SIDE LOG CMD...  start CMD in the background on SIDE,
#                          stdout+stderr to LOG, in a new process group;
#                          sets NSW_PID and records it for nsw_down
#   nsw_kill PID           SIGTERM to PID's group, bounded wait, then
#                          SIGKILL; reaps
#   nsw_wait SECS CMD...   poll CMD every 0.2 s until it succeeds or
#                          SECS have passed
#   nsw_now_ms             wall clock in milliseconds
#   nsw_browse [SIDE]      one avahi-browse -rpt _mandos._tcp on SIDE,
#                          through that side's own avahi-daemon
#   nsw_ll_addr NS IF      the link-local address of IF in namespace NS
#   nsw_host SIDE          the host name SIDE's avahi-daemon announces
#
# Variables set by nsw_up / nsw_make_netns:
#   NSW_ID NSW_SRV NSW_CLI (namespace names), NSW_VSRV NSW_VCLI (veth
#   names, server side and client side), NSW_DIR (temp dir),
#   NSW_BUS[SIDE] (bus address), NSW_DBUS_PID[SIDE], NSW_AVAHI_PID[SIDE],
#   NSW_PIDS (all live PIDs we started).

NSW_PIDS=()
declare -gA NSW_BUS=() NSW_DBUS_PID=() NSW_AVAHI_PID=()
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

nsw_group_of() {
    # PID's process group ID (empty when PID is gone).  The command name
    # in field 2 may hold spaces: read the fields after its closing ")".
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    set -- $stat
    echo "$3"
}

nsw_signal() {
    # nsw_signal SIG PID: to PID's whole group when PID leads one (as
    # nsw_spawn arranges), else to PID alone.
    local sig=$1 pid=$2
    if [[ $(nsw_group_of "$pid") == "$pid" ]]; then
        kill "-$sig" -- "-$pid" 2>/dev/null
    else
        kill "-$sig" "$pid" 2>/dev/null
    fi
}

nsw_kill() {
    # Stop one process we started, with its group: TERM, up to 5 s, then
    # KILL.  Group members that outlive their leader get KILL too.
    local pid=$1 i lead
    [[ -n $pid ]] || return 0
    lead=$(nsw_group_of "$pid")
    if ! nsw_gone "$pid"; then
        nsw_signal TERM "$pid"
        for (( i = 0; i < 50; i++ )); do
            nsw_gone "$pid" && break
            sleep 0.1
        done
        if ! nsw_gone "$pid"; then
            echo "netns: PID $pid ignored SIGTERM; sending SIGKILL" >&2
            nsw_signal KILL "$pid"
            for (( i = 0; i < 30; i++ )); do
                nsw_gone "$pid" && break
                sleep 0.1
            done
        fi
    fi
    wait "$pid" 2>/dev/null
    if [[ $lead == "$pid" ]] && kill -0 -- "-$pid" 2>/dev/null; then
        echo "netns: members of process group $pid outlived it; sending SIGKILL" >&2
        kill -KILL -- "-$pid" 2>/dev/null
    fi
    nsw_forget_pid "$pid"
    return 0
}

nsw_ns_name() {
    case $1 in
        srv) echo "$NSW_SRV" ;;
        cli) echo "$NSW_CLI" ;;
        *) echo "netns: unknown side '$1' (want srv or cli)" >&2
           return 1 ;;
    esac
}

nsw_veth() {
    case $1 in
        srv) echo "$NSW_VSRV" ;;
        cli) echo "$NSW_VCLI" ;;
        *) echo "netns: unknown side '$1' (want srv or cli)" >&2
           return 1 ;;
    esac
}

nsw_env() {
    # The environment every process on SIDE gets: that side's bus only.
    echo "DBUS_SYSTEM_BUS_ADDRESS=${NSW_BUS[$1]:-unix:path=/nonexistent}"
}

nsw_in() {
    # nsw_in SIDE CMD...: run CMD in SIDE's namespace on SIDE's bus.
    local ns
    ns=$(nsw_ns_name "$1") || return 1
    ip netns exec "$ns" env "$(nsw_env "$1")" "${@:2}"
}

nsw_srv() { nsw_in srv "$@"; }
nsw_cli() { nsw_in cli "$@"; }

nsw_spawn() {
    # nsw_spawn srv|cli LOGFILE CMD...
    local side=$1 ns log
    ns=$(nsw_ns_name "$side") || return 1
    log=$2; shift 2
    # ip netns exec, env and setsid all exec in place (setsid forks only
    # when its caller already leads a group, and a background job of a
    # shell without job control does not), so $! is CMD's own PID and
    # the leader of a new group.  fd 3 is closed: bats waits for every
    # holder of it.
    ip netns exec "$ns" env "$(nsw_env "$side")" setsid "$@" \
        </dev/null >"$log" 2>&1 3>&- &
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
    env "$(nsw_env "$1")" dbus-send --system --dest=org.freedesktop.DBus \
        --print-reply --reply-timeout=1000 /org/freedesktop/DBus \
        org.freedesktop.DBus.GetId >/dev/null 2>&1
}

nsw_dbus_conf() {
    cat <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <!-- a private "system" bus for one side of one test; anyone may do anything -->
  <type>system</type>
  <listen>unix:path=$1</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
EOF
}

nsw_dbus_spawn() {
    # Start SIDE's bus; nsw_dbus_ready waits for it.
    local side=$1 dir=$NSW_DIR/$1
    mkdir -p "$dir" || return 1
    nsw_dbus_conf "$dir/system_bus_socket" >"$dir/dbus.conf" || return 1
    NSW_BUS[$side]=unix:path=$dir/system_bus_socket
    nsw_spawn "$side" "$dir/dbus.log" dbus-daemon --config-file="$dir/dbus.conf" \
        --nofork --nopidfile || return 1
    NSW_DBUS_PID[$side]=$NSW_PID
}

nsw_dbus_ready() {
    if ! nsw_wait 10 nsw_bus_alive "$1"; then
        echo "netns: the $1 side's private D-Bus did not answer within 10 s" >&2
        cat "$NSW_DIR/$1/dbus.log" >&2
        return 1
    fi
}

nsw_dbus_start() {
    nsw_dbus_spawn "$1" && nsw_dbus_ready "$1"
}

# ---------------------------------------------------------------- avahi

nsw_host() {
    echo "mcs${NSW_ID}$1"
}

nsw_avahi_conf() {
    cat <<EOF
# avahi-daemon for one side of one test: only that side's veth, IPv6 only
[server]
host-name=$(nsw_host "$1")
use-ipv4=no
use-ipv6=yes
allow-interfaces=$(nsw_veth "$1")
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
    # SIDE's avahi-daemon answers on SIDE's bus and is past start-up
    # (GetState: 2 = AVAHI_SERVER_RUNNING).
    local out
    out=$(env "$(nsw_env "$1")" dbus-send --system --dest=org.freedesktop.Avahi \
        --print-reply --reply-timeout=1000 / org.freedesktop.Avahi.Server.GetState \
        2>/dev/null) || return 1
    [[ $out == *"int32 2"* ]]
}

nsw_avahi_spawn() {
    # Start SIDE's avahi-daemon; nsw_avahi_ready waits for it.
    local side=${1:-srv} dir=$NSW_DIR/${1:-srv}
    mkdir -p "$dir" || return 1
    nsw_avahi_conf "$side" >"$dir/avahi-daemon.conf" || return 1
    # avahi-daemon locks /run/avahi-daemon/pid and listens on a socket
    # there; a private mount namespace with a tmpfs on it gives each daemon
    # its own, beside the machine's daemon if any.  The directory is
    # avahi's standard run-time one; create it if this machine never had
    # it (an empty directory, nothing mounted on it).
    [[ -d /run/avahi-daemon ]] || mkdir -p /run/avahi-daemon || return 1
    nsw_spawn "$side" "$dir/avahi.log" \
        unshare -m --propagation private sh -c '
            mount -t tmpfs -o mode=0755,size=1m mcs-avahi /run/avahi-daemon &&
            exec "$@"' avahi-sh \
        avahi-daemon -f "$dir/avahi-daemon.conf" --no-drop-root --no-chroot \
        --no-rlimits --debug || return 1
    NSW_AVAHI_PID[$side]=$NSW_PID
}

nsw_avahi_ready() {
    # Wait until SIDE's avahi-daemon runs; then check that it took only
    # its side's veth for mDNS.
    local side=${1:-srv} log=$NSW_DIR/${1:-srv}/avahi.log want
    if ! nsw_wait 15 nsw_avahi_on_bus "$side"; then
        echo "netns: the $side side's avahi-daemon not running within 15 s" >&2
        tail -n 20 "$log" >&2
        return 1
    fi
    want="New relevant interface $(nsw_veth "$side").IPv6 for mDNS."
    if [[ $(grep -a '^New relevant interface' "$log") != "$want" ]]; then
        echo "netns: the $side side's avahi-daemon should use only its veth:" >&2
        grep -a 'relevant interface' "$log" >&2
        return 1
    fi
}

nsw_avahi_start() {
    nsw_avahi_spawn "$@" && nsw_avahi_ready "$@"
}

nsw_avahi_stop() {
    local side=${1:-srv} dir=$NSW_DIR/${1:-srv}
    [[ -n ${NSW_AVAHI_PID[$side]:-} ]] || return 0
    cat "$dir/avahi.log" >>"$dir/avahi.log.old" 2>/dev/null
    nsw_kill "${NSW_AVAHI_PID[$side]}"
    NSW_AVAHI_PID[$side]=
}

nsw_avahi_restart() {
    nsw_avahi_stop "$@" && nsw_avahi_start "$@"
}

nsw_browse() {
    # One resolved, parsable, terminating browse of _mandos._tcp, asked of
    # SIDE's own avahi-daemon (default srv).
    nsw_in "${1:-srv}" timeout 10 avahi-browse -rpt _mandos._tcp 2>/dev/null
}

# ---------------------------------------------------------------- world

nsw_up() {
    local side
    NSW_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mcs-world.XXXXXX") || return 1
    chmod 0755 "$NSW_DIR"
    nsw_make_netns || return 1
    # both sides start together, then each is waited for
    for side in srv cli; do
        nsw_dbus_spawn "$side" || return 1
    done
    for side in srv cli; do
        nsw_dbus_ready "$side" || return 1
    done
    for side in srv cli; do
        nsw_avahi_spawn "$side" || return 1
    done
    for side in srv cli; do
        nsw_avahi_ready "$side" || return 1
    done
}

nsw_down() {
    local pid i
    # Newest first: clients and servers before avahi, avahi before the bus.
    for (( i = ${#NSW_PIDS[@]} - 1; i >= 0; i-- )); do
        pid=${NSW_PIDS[i]}
        [[ -n $pid ]] && nsw_kill "$pid"
    done
    NSW_PIDS=()
    NSW_AVAHI_PID=()
    NSW_DBUS_PID=()
    NSW_BUS=()
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
