#!/usr/bin/env bash
# Network namespaces joined to the root namespace by rate-limited veth pairs, reachable from
# the root namespace only through sockets that carry a firewall mark (bench/delay_relay.py
# --mark), so a client in the root namespace cannot bypass the delaying relays.
#
#   bench/netns.sh up   NAME B K [RATE]   # namespaces NAME1..NAMEK, subnets 10.B.k.0/30
#   bench/netns.sh down NAME B K
#   bench/netns.sh check                  # exits 0 if root, netns, veth and tbf work
#
# Namespace k: address 10.B.k.2 on veth NAMEnk; root side 10.B.k.1 on veth NAMEhk. `tbf` at
# RATE (default 100mbit) on both ends, so each direction is limited. Policy routing in the root
# namespace: packets to 10.B.0.0/16 with mark B are routed normally, other locally generated
# packets to it are refused (`unreachable`), so a direct dial fails at once.
set -euo pipefail

cmd=${1:?usage: netns.sh up|down|check ...}

tbf() { tc qdisc replace dev "$1" root tbf rate "$2" burst 64kb latency 50ms; }

case $cmd in
check)
    [ "$(id -u)" = 0 ] || { echo "not root"; exit 1; }
    command -v ip >/dev/null && command -v tc >/dev/null || { echo "no ip/tc"; exit 1; }
    n=plxchk$$
    trap 'ip netns del $n 2>/dev/null || true; ip link del ${n}h 2>/dev/null || true' EXIT
    ip netns add "$n" 2>/dev/null || { echo "ip netns add failed"; exit 1; }
    ip link add "${n}h" type veth peer name "${n}n" 2>/dev/null || { echo "veth failed"; exit 1; }
    tbf "${n}h" 100mbit 2>/dev/null || { echo "tc tbf failed"; exit 1; }
    ip rule add pref 29999 to 10.254.0.0/16 iif lo unreachable 2>/dev/null || { echo "ip rule failed"; exit 1; }
    ip rule del pref 29999 to 10.254.0.0/16 iif lo unreachable
    echo ok
    ;;
up)
    name=${2:?name} b=${3:?subnet byte} k=${4:?count} rate=${5:-100mbit}
    ip rule add pref $((20000 + b * 2)) to "10.$b.0.0/16" fwmark "$b" lookup main
    ip rule add pref $((20001 + b * 2)) to "10.$b.0.0/16" iif lo unreachable
    for i in $(seq 1 "$k"); do
        ns=$name$i h=${name}h$i n=${name}n$i
        ip netns add "$ns"
        ip link add "$h" type veth peer name "$n"
        ip link set "$n" netns "$ns"
        ip addr add "10.$b.$i.1/30" dev "$h"
        ip link set "$h" up
        ip -n "$ns" addr add "10.$b.$i.2/30" dev "$n"
        ip -n "$ns" link set "$n" up
        ip -n "$ns" link set lo up
        tbf "$h" "$rate"
        ip netns exec "$ns" tc qdisc replace dev "$n" root tbf rate "$rate" burst 64kb latency 50ms
    done
    ;;
down)
    name=${2:?name} b=${3:?subnet byte} k=${4:?count}
    for i in $(seq 1 "$k"); do
        ip netns pids "$name$i" 2>/dev/null | xargs -r kill 2>/dev/null || true
        ip link del "${name}h$i" 2>/dev/null || true
        ip netns del "$name$i" 2>/dev/null || true
    done
    ip rule del pref $((20000 + b * 2)) 2>/dev/null || true
    ip rule del pref $((20001 + b * 2)) 2>/dev/null || true
    ;;
*)
    echo "usage: netns.sh up NAME B K [RATE] | down NAME B K | check" >&2
    exit 2
    ;;
esac
