#!/usr/bin/env bash
# Synchronous data parallel vs DiLoCo, each at its own best inner learning rate: one
# `plexus bench train --runs ...` per (seed, learning rate) over a grid, so every setting and
# the synchronous run are measured at every learning rate; bench/train_tuned_table.py then
# picks each setting's learning rate by its mean held-out loss over the seeds and compares it
# with the synchronous run at the synchronous run's own best learning rate. A sweep at one
# learning rate (bench/train_sweep.sh) compares both sides at settings that may suit one of
# them far better than the other.
#
# Environment (defaults in brackets):
#   PLEXUS  [target/debug/plexus]
#   SEEDS   [0 1 2]
#   LRS     [3e-4 1e-3 3e-3 1e-2]   peak inner learning rates
#   STEPS   [1500]  inner steps per worker (= sync steps) per run, a multiple of every H
#   ARGS    []      the data and model flags for every run (e.g. "--task addition --size 2")
#   OUT     [bench/results/train_tuned.jsonl]
#   RUNS    ["100:f32 100:int8ans/4096 10:sparse 30:sparse 100:sparse"]
#   OUTER   []      the outer step as LR:MOMENTUM (e.g. "1.0:0" for plain averaging); empty:
#                   each codec's published default (Nesterov 0.7/0.9; sparse SGD 1.0)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PLEXUS="${PLEXUS:-target/debug/plexus}"
SEEDS="${SEEDS:-0 1 2}"
LRS="${LRS:-3e-4 1e-3 3e-3 1e-2}"
STEPS="${STEPS:-1500}"
ARGS="${ARGS:-}"
OUT="${OUT:-bench/results/train_tuned.jsonl}"
RUNS="${RUNS:-100:f32 100:int8ans/4096 10:sparse 30:sparse 100:sparse}"
OUTER="${OUTER:-}"
OUTER_ARGS=""
if [ -n "$OUTER" ]; then
  OUTER_ARGS="--outer-lr ${OUTER%%:*} --outer-momentum ${OUTER##*:}"
fi
LOG="${OUT%.jsonl}.log"
mkdir -p "$(dirname "$OUT")"
: > "$OUT"
: > "$LOG"
for seed in $SEEDS; do
  for lr in $LRS; do
    echo "seed $seed, lr $lr: $RUNS, $STEPS steps${OUTER:+, outer $OUTER}" | tee -a "$LOG" >&2
    # shellcheck disable=SC2086
    "$PLEXUS" bench train --workers 4 --runs "$RUNS" --total-steps "$STEPS" --seed "$seed" \
      --lr "$lr" $OUTER_ARGS $ARGS --json 2>> "$LOG" >> "$OUT"
  done
done
python3 bench/train_tuned_table.py "$OUT"
