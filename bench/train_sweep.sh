#!/usr/bin/env bash
# Synchronous data parallel vs DiLoCo at equal tokens (`plexus bench train`): H in
# {10, 30, 100, 500} with f32, H=100 int8, H=30 and H=100 sparse + error feedback, over SEEDS.
# One `plexus bench train --runs ...` per seed: the synchronous run once, then every DiLoCo
# setting against it in the same process, one JSON object per setting (sync and DiLoCo side by
# side). All go to OUT (the progress log to OUT with .log), then bench/train_table.py prints
# the Markdown table and writes the SVG plot.
#
# Environment (defaults in brackets):
#   PLEXUS  [target/debug/plexus]
#   SEEDS   [0 1 2]
#   STEPS   [1000]  inner steps per worker (= sync steps) per run, a multiple of every H
#   ARGS    []      extra flags for every run (e.g. "--task addition --size 3" or
#                   "--data text:corpus.txt")
#   OUT     [bench/results/train_sweep.jsonl]
#   RUNS    ["10:f32 30:f32 100:f32 500:f32 100:int8 30:sparse 100:sparse"]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PLEXUS="${PLEXUS:-target/debug/plexus}"
SEEDS="${SEEDS:-0 1 2}"
STEPS="${STEPS:-1000}"
ARGS="${ARGS:-}"
OUT="${OUT:-bench/results/train_sweep.jsonl}"
RUNS="${RUNS:-10:f32 30:f32 100:f32 500:f32 100:int8 30:sparse 100:sparse}"
LOG="${OUT%.jsonl}.log"
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
: > "$LOG"
for seed in $SEEDS; do
  echo "seed $seed: $RUNS, $STEPS steps" >&2
  # shellcheck disable=SC2086
  "$PLEXUS" bench train --workers 4 --runs "$RUNS" --total-steps "$STEPS" --seed "$seed" \
    $ARGS --json 2>> "$LOG" >> "$OUT"
done
python3 bench/train_table.py "$OUT"
