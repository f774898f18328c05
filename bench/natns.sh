#!/usr/bin/env bash
# Homes behind NAT and a public network, in network namespaces (crates/plexus/tests/nat.rs).
#
#   bench/natns.sh up      NAME B [N] # build it with N homes (2, or 3), tearing down a leftover
#   bench/natns.sh mgmt    NAME K B   # a side link root <-> home K (10.B.200.1 <-> .2) for the
#                                     # test's HTTP client only: nothing else routes over it
#   bench/natns.sh block   NAME K IP  # home K's router drops everything to IP (forced relaying)
#   bench/natns.sh counters NAME K B  # bytes home K sent to the relay, the gateway, elsewhere
#   bench/natns.sh down    NAME B
#   bench/natns.sh check              # exits 0 if root, ip netns, veth and nft masquerade work
#
#   root ns ── NAMEr0 10.B.0.1 ─┐
#                               NAMEpub ("the internet"; ip_forward): 10.B.0.2, and on lo
#                               10.B.100.1 (relay) and 10.B.100.2 (gateway)
#              ┌── 10.B.1.1 ────┴──── 10.B.2.1 ──┐
#   NAMErt1 wan 10.B.1.2               NAMErt2 wan 10.B.2.2     (nft masquerade out of wan;
#           lan 192.168.1.1                    lan 192.168.2.1   only replies come in, the
#                                                                rest is dropped silently)
#   NAMEh1      192.168.1.2            NAMEh2      192.168.2.2   (default route: the router)
#
# A third home (N = 3) is built like the others on 10.B.3.0/30 and 192.168.3.0/24.
# The root namespace reaches 10.B.100.0/24 (the test's HTTP client talks to the gateway);
# nothing outside a home reaches 192.168.K.0/24 except through its router's NAT.
set -euo pipefail

cmd=${1:?usage: natns.sh up|block|counters|down|check ...}

# The router's ruleset: masquerade out of the WAN; drop whatever comes in that is not a reply
# (silently, as home routers do: no RST for a hole-punching SYN that arrives before the
# home's own SYN went out); count what the home sends to the relay and to the gateway (after
# any block rule).
router_rules() {
    local b=$1
    cat <<EOF
table ip plexus {
    counter to_relay {}
    counter to_gateway {}
    counter to_other {}
    chain forward {
        type filter hook forward priority 0; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
        iifname "lan" jump block
        iifname "lan" ip daddr 10.$b.100.1 counter name to_relay accept
        iifname "lan" ip daddr 10.$b.100.2 counter name to_gateway accept
        iifname "lan" counter name to_other accept
    }
    chain block {
    }
    chain input {
        type filter hook input priority 0; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        oifname "wan" masquerade
    }
}
EOF
}

case $cmd in
check)
    [ "$(id -u)" = 0 ] || { echo "not root"; exit 1; }
    command -v ip >/dev/null || { echo "no ip (iproute2)"; exit 1; }
    command -v nft >/dev/null || { echo "no nft (apt-get install -y nftables)"; exit 1; }
    n=plxnck$$
    trap 'ip netns del $n 2>/dev/null || true; ip link del ${n}a 2>/dev/null || true' EXIT
    ip netns add "$n" 2>/dev/null || { echo "ip netns add failed"; exit 1; }
    ip link add "${n}a" type veth peer name "${n}b" 2>/dev/null || { echo "veth failed"; exit 1; }
    ip netns exec "$n" nft -f - <<EOF 2>/dev/null || { echo "nft masquerade failed"; exit 1; }
table ip t {
    chain p {
        type nat hook postrouting priority 100; policy accept;
        oifname "x" masquerade
    }
}
EOF
    echo ok
    ;;
up)
    name=${2:?name} b=${3:?subnet byte} homes=${4:-2}
    "$0" down "$name" "$b" 2>/dev/null || true
    pub=${name}pub
    ip netns add "$pub"
    ip -n "$pub" link set lo up
    ip -n "$pub" addr add "10.$b.100.1/32" dev lo
    ip -n "$pub" addr add "10.$b.100.2/32" dev lo
    ip netns exec "$pub" sysctl -qw net.ipv4.ip_forward=1
    # root <-> public
    ip link add "${name}r0" type veth peer name "${name}p0"
    ip link set "${name}p0" netns "$pub"
    ip addr add "10.$b.0.1/30" dev "${name}r0"
    ip link set "${name}r0" up
    ip -n "$pub" addr add "10.$b.0.2/30" dev "${name}p0"
    ip -n "$pub" link set "${name}p0" up
    ip route add "10.$b.100.0/24" via "10.$b.0.2"
    for k in $(seq 1 "$homes"); do
        rt=${name}rt$k h=${name}h$k
        ip netns add "$rt"
        ip netns add "$h"
        ip -n "$rt" link set lo up
        ip -n "$h" link set lo up
        # public <-> router WAN
        ip link add "${name}p$k" type veth peer name "${name}w$k"
        ip link set "${name}p$k" netns "$pub"
        ip link set "${name}w$k" netns "$rt"
        ip -n "$rt" link set "${name}w$k" name wan
        ip -n "$pub" addr add "10.$b.$k.1/30" dev "${name}p$k"
        ip -n "$pub" link set "${name}p$k" up
        ip -n "$rt" addr add "10.$b.$k.2/30" dev wan
        ip -n "$rt" link set wan up
        ip -n "$rt" route add default via "10.$b.$k.1"
        # router LAN <-> home
        ip link add "${name}l$k" type veth peer name "${name}e$k"
        ip link set "${name}l$k" netns "$rt"
        ip link set "${name}e$k" netns "$h"
        ip -n "$rt" link set "${name}l$k" name lan
        ip -n "$rt" addr add "192.168.$k.1/24" dev lan
        ip -n "$rt" link set lan up
        ip -n "$h" addr add "192.168.$k.2/24" dev "${name}e$k"
        ip -n "$h" link set "${name}e$k" up
        ip -n "$h" route add default via "192.168.$k.1"
        ip netns exec "$rt" sysctl -qw net.ipv4.ip_forward=1
        router_rules "$b" | ip netns exec "$rt" nft -f -
    done
    ;;
mgmt)
    name=${2:?name} k=${3:?home} b=${4:?subnet byte}
    ip link add "${name}m$k" type veth peer name "${name}n$k"
    ip link set "${name}n$k" netns "${name}h$k"
    ip addr add "10.$b.200.1/30" dev "${name}m$k"
    ip link set "${name}m$k" up
    ip -n "${name}h$k" addr add "10.$b.200.2/30" dev "${name}n$k"
    ip -n "${name}h$k" link set "${name}n$k" up
    ;;
block)
    name=${2:?name} k=${3:?home} ip=${4:?address}
    ip netns exec "${name}rt$k" nft add rule ip plexus block ip daddr "$ip" drop
    ;;
counters)
    name=${2:?name} k=${3:?home}
    for c in to_relay to_gateway to_other; do
        bytes=$(ip netns exec "${name}rt$k" nft list counter ip plexus "$c" | sed -n 's/.*bytes \([0-9]*\).*/\1/p')
        printf '%s=%s ' "$c" "${bytes:-0}"
    done
    echo
    ;;
down)
    name=${2:?name} b=${3:?subnet byte}
    all="${name}h1 ${name}h2 ${name}h3 ${name}rt1 ${name}rt2 ${name}rt3 ${name}pub"
    for ns in $all; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    ip route del "10.$b.100.0/24" 2>/dev/null || true
    ip link del "${name}r0" 2>/dev/null || true
    ip link del "${name}m3" 2>/dev/null || true
    for ns in $all; do
        ip netns del "$ns" 2>/dev/null || true
    done
    ;;
*)
    echo "usage: natns.sh up NAME B [N] | mgmt NAME K B | block NAME K IP | counters NAME K | down NAME B | check" >&2
    exit 2
    ;;
esac
