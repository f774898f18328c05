#!/usr/bin/env bash
# Peak resident memory and wall time of two `plexus train --distributed` workers fine-tuning
# the real model (SmolLM2-135M-Instruct, GGUF Q4_1, read as f32) on loopback: the spec of
# `fine_tuning_the_real_model_on_a_text_lowers_its_held_out_loss` (crates/plexus/tests/train_net.rs)
# with the codec and round count chosen here, the test's text of random words. Each worker runs
# under `/usr/bin/time`; the script prints one line per worker: its peak resident KiB, its wall
# seconds and its final line (both workers must end on the same held-out loss and state).
# The figures in BENCHMARKS.md used the dev profile's binary (target/debug: our crates at -O1,
# the engine and dependencies at -O3), as the project's other training figures do.
#
# Environment (defaults in brackets):
#   PLEXUS  [target/debug/plexus]
#   MODEL   [../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf]
#   CODEC   [f16]
#   ROUNDS  [3]
#   AUDIT_RATE [0]  the share of contributions re-executed by the other worker (and by their
#           own worker, as a check of this build's determinism): 1 audits every one
#   OUT     [a fresh temporary directory]   the spec and the workers' logs (their data
#           directories, 3 GiB each at 135M with the per-round checkpoint, and 3.2 GB more
#           while running with AUDIT_RATE > 0, are removed at the end unless KEEP=1)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PLEXUS="$(realpath "${PLEXUS:-target/debug/plexus}")"
MODEL="$(realpath "${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}")"
CODEC="${CODEC:-f16}"
ROUNDS="${ROUNDS:-3}"
AUDIT_RATE="${AUDIT_RATE:-0}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
OUT="$(realpath "$OUT")"
cd "$OUT"

python3 "$REPO_ROOT/bench/words_text.py" words.txt

"$PLEXUS" train spec --out spec.json --data-dir creator --checkpoint "$MODEL" --text words.txt \
  --seq-len 16 --rounds "$ROUNDS" --workers-min 2 --inner-steps 3 --batch-size 2 --lr 3e-4 \
  --warmup 1 --codec "$CODEC" --audit-rate "$AUDIT_RATE" --score-examples 4 --eval-examples 32 \
  --deadline-initial-ms 600000 --outer-momentum 0.5 > spec.log

worker() { # NAME [--peer ADDR]
  local name=$1
  shift
  /usr/bin/time -f "%M KiB %e s" -o "$name.time" "$PLEXUS" train --distributed spec.json \
    --data-dir "$OUT/$name" --listen /ip4/127.0.0.1/tcp/0 --text words.txt --checkpoint "$MODEL" \
    --threads 1 "$@" > "$name.log" 2>&1
}

worker w1 &
first=$!
# On any failure: stop the first worker and drop the data directories.
trap 'pkill -f -- "--data-dir $OUT/w" 2>/dev/null || true; [ "${KEEP:-0}" = 1 ] || rm -rf w1 w2 creator' EXIT
addr=""
for _ in $(seq 1 240); do
  addr="$(grep -o '/ip4/127.0.0.1/tcp/[0-9]*/p2p/[A-Za-z0-9]*' w1.log | head -1 || true)"
  [ -n "$addr" ] && break
  sleep 0.5
done
[ -n "$addr" ] || { echo "the first worker printed no address" >&2; cat w1.log >&2; exit 1; }
worker w2 --peer "$addr"
wait "$first"
for w in w1 w2; do
  echo "$w: $(cat "$w.time") | $(grep '^final' "$w.log" || echo "no final line")"
done
echo "logs: $OUT"
