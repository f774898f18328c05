#!/usr/bin/env bash
# Constrained decoding overhead, llama-server beside `plexus gateway` in one run: the same
# greedy chat, streamed, with and without a JSON schema (bench/structured_overhead.py), first
# against llama-server, then against Plexus, one server at a time on the same cores.
#
#   LLAMA_SERVER=~/.cache/anchors/llama.cpp/build/bin/llama-server PLEXUS=target/release/plexus \
#     bench/structured_overhead.sh [ROUNDS]
#
# MODEL defaults to ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf, PYTHON to python3 (with
# the `openai` package).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-$here/../../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
ROUNDS=${1:-5}
PY=${PYTHON:-python3}
: "${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}"
: "${PLEXUS:?set PLEXUS to a plexus binary (a release build)}"
logs=$(mktemp -d)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null || true' EXIT

wait_up() { # URL
    for _ in $(seq 1 240); do
        if curl -sf "$1/v1/models" > /dev/null; then return 0; fi
        sleep 0.5
    done
    echo "server at $1 did not come up; logs in $logs" >&2
    exit 1
}

echo "== llama-server ($LLAMA_SERVER), $(date -u +%H:%M) UTC, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port 8391 -t 2 -c 4096 > "$logs/llama.log" 2>&1 &
pid=$!
wait_up http://127.0.0.1:8391
"$PY" "$here/structured_overhead.py" http://127.0.0.1:8391 "$ROUNDS"
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""

echo "== plexus gateway ($PLEXUS), $(date -u +%H:%M) UTC, load $(cut -d' ' -f1-3 /proc/loadavg)"
"$PLEXUS" gateway --model "$MODEL" --port 8392 --ledger none --threads 2 > "$logs/plexus.log" 2>&1 &
pid=$!
wait_up http://127.0.0.1:8392
"$PY" "$here/structured_overhead.py" http://127.0.0.1:8392 "$ROUNDS"
