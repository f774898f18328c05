#!/usr/bin/env bash
# The serving table of BENCHMARKS.md ("Serving many users"): streamed chat completions of 64
# tokens, distinct prompts, N at once, against llama-server -np 8 -t 2 (when LLAMA_SERVER
# points at its binary), `plexus gateway --model` (one process, batching engine) and
# `plexus up` (3 nodes), one after another in the same run, same prompts (bench/serving.py).
#   PLEXUS=target/release/plexus LLAMA_SERVER=~/.cache/anchors/.../llama-server bench/serving.sh
# LEVELS [1 4 8 16 32] picks the stream counts; GATEWAY=0 skips the one-process gateway;
# UP_ARGS adds flags to `plexus up` (e.g. "--ledger none", "--threads 1").
set -euo pipefail
cd "$(dirname "$0")/.."
PLEXUS="${PLEXUS:-target/release/plexus}"
MODEL="${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
LEVELS="${LEVELS:-1 4 8 16 32}"
ID=SmolLM2-135M-Instruct
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

wait_url() { # file -> prints the first http:// URL the process printed
  for _ in $(seq 600); do
    u=$(grep -o 'http://[0-9.:]*' "$1" | head -1 || true)
    [ -n "$u" ] && { echo "$u"; return; }
    sleep 0.2
  done
  echo "no URL in $1" >&2; cat "$1" >&2; exit 1
}

run() { # name url
  echo "== $1 ($2), uptime: $(uptime)"
  python3 bench/serving.py "$2" "$ID" $LEVELS | sed "s/^/$1 /"
}

uptime
if [ -n "${LLAMA_SERVER:-}" ]; then
  log=$(mktemp)
  "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port 18081 -np 8 -t 2 -c 16384 --alias "$ID" >"$log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do curl -sf http://127.0.0.1:18081/health >/dev/null && break; sleep 0.2; done
  run llama-server http://127.0.0.1:18081
  kill "${pids[-1]}"
fi

if [ "${GATEWAY:-1}" != 0 ]; then
log=$(mktemp)
# No ledger: llama-server has no accounts either (`plexus up` below meters and charges).
"$PLEXUS" gateway --model "$MODEL" --port 0 --max-concurrent 64 --ledger none >"$log" 2>/dev/null &
pids+=($!)
run gateway "$(wait_url "$log")"
kill "${pids[-1]}"
fi

log=$(mktemp)
# shellcheck disable=SC2086
"$PLEXUS" up --model "$MODEL" --port 18090 ${UP_ARGS:-} >"$log" 2>/dev/null &
pids+=($!)
url=$(wait_url "$log")
# Without a ledger there are no accounts and no key to wait for.
case " ${UP_ARGS:-} " in
  *" --ledger none "*) ;;
  *) for _ in $(seq 300); do grep -q 'API key: ' "$log" && break; sleep 0.2; done ;;
esac
API_KEY=$(grep -o 'API key: [^ ]*' "$log" | head -1 | cut -d' ' -f3 || true)
export API_KEY
run up "$url"
