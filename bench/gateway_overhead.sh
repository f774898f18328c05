#!/usr/bin/env bash
# Gateway overhead at 1 and 32 concurrent streams (BENCHMARKS.md, "Gateway overhead"), with
# metering off (`--ledger none`) and on (a SQLite ledger: every request holds escrow, is
# metered and settles, paid by an API key), one gateway per mode, in the same run.
# Starts `plexus gateway --bench-echo-ms PACE` (no model runs; every token is a timestamp taken
# when the backend hands it over) and measures receive time - stamp per chunk.
#   PLEXUS=target/release/plexus bench/gateway_overhead.sh            # MODES="off on"
set -euo pipefail
cd "$(dirname "$0")/.."
PLEXUS="${PLEXUS:-target/release/plexus}"
MODEL="${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
PACE="${PACE:-20}"
MODES="${MODES:-off on}"
LEVELS="${LEVELS:-1 32}"
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$work"' EXIT
for mode in $MODES; do
  out="$work/out-$mode"
  key=
  if [ "$mode" = on ]; then
    ledger="sqlite://$work/ledger-$RANDOM.db"
    key=$("$PLEXUS" keys create --ledger "$ledger" --faucet 1000PLX | sed -n 's/^API key: //p')
    args=(--ledger "$ledger" --price 1)
  else
    args=(--ledger none)
  fi
  "$PLEXUS" gateway "${args[@]}" --data-dir "$work/data" --model "$MODEL" --port 0 \
    --bench-echo-ms "$PACE" --max-concurrent 32 >"$out" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$out" && break; sleep 0.1; done
  url=$(sed -n 's/^listening on //p' "$out")
  echo "metering $mode: gateway $url, one token every $PACE ms per stream, 64 tokens per stream"
  PLEXUS_KEY="$key" python3 bench/gateway_overhead.py "$url" $LEVELS
  kill $pid; wait $pid 2>/dev/null || true; pid=
done
