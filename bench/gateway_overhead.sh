#!/usr/bin/env bash
# Gateway overhead at 1 and 32 concurrent streams (BENCHMARKS.md, "Gateway overhead").
# Starts `plexus gateway --bench-echo-ms PACE` (no model runs; every token is a timestamp taken
# when the backend hands it over) and measures receive time - stamp per chunk.
#   PLEXUS=target/release/plexus bench/gateway_overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PLEXUS="${PLEXUS:-target/release/plexus}"
MODEL="${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
PACE="${PACE:-20}"
out=$(mktemp)
"$PLEXUS" gateway --ledger none --model "$MODEL" --port 0 --bench-echo-ms "$PACE" --max-concurrent 32 >"$out" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$out" && break; sleep 0.1; done
url=$(sed -n 's/^listening on //p' "$out")
echo "gateway $url, one token every $PACE ms per stream, 64 tokens per stream"
python3 bench/gateway_overhead.py "$url" 1 32
