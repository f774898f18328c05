#!/usr/bin/env bash
# Synchronous data parallel vs DiLoCo at equal tokens (`plexus bench train`): H in
# {10, 30, 100, 500} with f32, H=100 int8, H=30 and H=100 sparse + error feedback, over SEEDS.
# Each run prints one JSON object (sync and DiLoCo side by side); all go to OUT, then
# bench/train_table.py prints the Markdown table and writes the SVG plot.
#
# Environment (defaults in brackets):
#   PLEXUS  [target/release/plexus]
#   SEEDS   [0 1 2]
#   STEPS   [1000]  inner steps per worker (sync steps) per run; H=500 gets STEPS rounded to 1000
#   ARGS    []      extra flags for every run (e.g. "--task addition --size 3")
#   OUT     [bench/results/train_sweep.jsonl]
#   CONFIGS ["10:f32 30:f32 100:f32 500:f32 100:int8 30:sparse 100:sparse"]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PLEXUS="${PLEXUS:-target/release/plexus}"
SEEDS="${SEEDS:-0 1 2}"
STEPS="${STEPS:-1000}"
ARGS="${ARGS:-}"
OUT="${OUT:-bench/results/train_sweep.jsonl}"
CONFIGS="${CONFIGS:-10:f32 30:f32 100:f32 500:f32 100:int8 30:sparse 100:sparse}"
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
for seed in $SEEDS; do
  for c in $CONFIGS; do
    h="${c%%:*}"
    codec="${c##*:}"
    steps=$(( (STEPS + h - 1) / h * h ))
    echo "seed $seed H=$h codec $codec steps $steps" >&2
    # shellcheck disable=SC2086
    "$PLEXUS" bench train --workers 4 --inner-steps "$h" --codec "$codec" \
      --total-steps "$steps" --seed "$seed" $ARGS --json 2>/dev/null >> "$OUT"
  done
done
python3 bench/train_table.py "$OUT"
