#!/usr/bin/env bash
# Slow links: every node in its own network namespace behind a veth pair rate-limited with
# `tc tbf` (RATE, default 100mbit each way) and a delaying TCP relay (DELAY_MS each way,
# default 20; this kernel has no netem). Runs 1-, 2- and 3-stage chains through
# `plexus gateway --bootstrap <relay>/p2p/<peer>` and prints the measured per-token latency
# against stages x RTT + compute + transfer. Needs root. Namespaces, rules and processes are
# removed on exit, also on failure (bench/netbench.py, `slow`).
#
#   cargo build --release --workspace
#   sudo PLEXUS=target/release/plexus bench/slow_link.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PLEXUS=${PLEXUS:-$here/../target/release/plexus}
MODEL=${MODEL:-$here/../../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
check=$(bash "$here/netns.sh" check) || { echo "cannot emulate links here: $check" >&2; exit 1; }
trap 'bash "$here/netns.sh" down plxbn 212 3' EXIT
echo "# $(date -u +%FT%TZ) $(uname -n) $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg), delay ${DELAY_MS:-20} ms each way, rate ${RATE:-100mbit}" >&2
python3 "$here/netbench.py" slow --plexus "$PLEXUS" --model "$MODEL" \
    --delay-ms "${DELAY_MS:-20}" --rate "${RATE:-100mbit}" --tokens "${TOKENS:-32}" \
    --wire "${WIRE:-f16}" --subnet 212
