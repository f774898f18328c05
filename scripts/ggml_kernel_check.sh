#!/usr/bin/env bash
# Checks that Plexus's quantized matmul kernels (crates/model/src/kernels) give the same bits as
# llama.cpp's CPU dot products: random Q4_0/Q4_1/Q8_0 matrices and real SmolLM2 tensors.
#
# Needs llama.cpp built as bench/engine_vs_llamacpp.sh builds it (static ggml libraries under
# $ANCHORS/llama_cpp_python-0.3.36/vendor/llama.cpp/build).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
A="${ANCHORS:-$HOME/.cache/anchors}"
BUILD="$A/llama_cpp_python-0.3.36/vendor/llama.cpp/build"
LIBS=("$BUILD/ggml/src/libggml-cpu.a" "$BUILD/ggml/src/libggml-base.a")
for l in "${LIBS[@]}"; do
    [[ -f "$l" ]] || { echo "error: $l missing: build llama.cpp first (bench/engine_vs_llamacpp.sh)" >&2; exit 1; }
done

OUT="$(mktemp -d /tmp/ggml_kernel_check.XXXXXX)"
trap 'rm -rf "$OUT"' EXIT
gcc -O2 "$REPO_ROOT/scripts/ggml_kernel_check.c" "${LIBS[@]}" -lstdc++ -lm -lpthread -fopenmp \
    -o "$OUT/check"
(cd "$REPO_ROOT" && PLEXUS_GGML_CHECK_DIR="$OUT" cargo test -q -p plexus-model --lib \
    dump_cases_for_ggml_check -- --ignored >/dev/null)
"$OUT/check" "$OUT"/*.bin
