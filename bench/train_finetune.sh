#!/usr/bin/env bash
# Fine-tuning an existing model: synchronous data parallel and DiLoCo side by side at equal
# tokens (`plexus bench train --checkpoint`), on the real model (SmolLM2-135M-Instruct, GGUF
# Q4_1, read as f32) and a text of random words from a 16-word list (the text
# `crates/plexus/tests/train_net.rs` fine-tunes on, `sentences(1)`), tokenized with the model's
# own tokenizer. One JSON line per setting in $OUT, the log beside it.
#
# Environment (defaults in brackets):
#   PLEXUS  [target/debug/plexus]
#   MODEL   [../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf]
#   STEPS   [12]   inner steps per worker (= sync steps), a multiple of H
#   H       [3]
#   RUNS    []     several DiLoCo runs as H:CODEC (comma-separated) instead of H=$H sparse
#   OUT     [bench/results/train_finetune.jsonl]
#   ARGS    []     more `plexus bench train` flags
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PLEXUS="${PLEXUS:-target/debug/plexus}"
MODEL="${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
STEPS="${STEPS:-12}"
H="${H:-3}"
OUT="${OUT:-bench/results/train_finetune.jsonl}"
ARGS="${ARGS:-}"
if [ -n "${RUNS:-}" ]; then
  runs=(--runs "$RUNS")
else
  runs=(--inner-steps "$H" --codec sparse)
fi

text="$(mktemp -d)/words.txt"
python3 bench/words_text.py "$text"

mkdir -p "$(dirname "$OUT")"
# shellcheck disable=SC2086
/usr/bin/time -f "peak resident %M KB, %e s" "$PLEXUS" bench train --workers 2 \
  "${runs[@]}" --data "text:$text" --checkpoint "$MODEL" --seq-len 16 \
  --batch-size 2 --lr 3e-4 --warmup 1 --total-steps "$STEPS" --score-examples 4 \
  --eval-examples 32 --outer-lr 0.7 --outer-momentum 0.5 --json $ARGS \
  > "$OUT" 2> "${OUT%.jsonl}.log"
cat "$OUT"
tail -1 "${OUT%.jsonl}.log"
