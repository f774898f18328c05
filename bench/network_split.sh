#!/usr/bin/env bash
# Split inference on loopback: the whole model in one process vs chains of 2 and 3 node
# processes (f16 and f32 activations; node processes at --threads 1 and at the default), decode
# per-token latency, tokens/s, added ms per stage boundary and bytes on the wire per token.
# Method: bench/netbench.py's docstring. Results: BENCHMARKS.md, "Network".
#
#   cargo build --release --workspace
#   PLEXUS=target/release/plexus ROUNDS=3 TOKENS=128 bench/network_split.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PLEXUS=${PLEXUS:-$here/../target/release/plexus}
MODEL=${MODEL:-$here/../../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
echo "# $(date -u +%FT%TZ) $(uname -n) $(nproc) cpus, load $(cut -d' ' -f1-3 /proc/loadavg), $PLEXUS" >&2
exec python3 "$here/netbench.py" split --plexus "$PLEXUS" --model "$MODEL" \
    --rounds "${ROUNDS:-3}" --tokens "${TOKENS:-128}" ${JSON:+--json "$JSON"}
