#!/bin/bash
# Builds ggml-base + ggml-cpu of the reference llama.cpp (the one vendored in
# llama-cpp-python 0.3.36) by hand with the reference build's flags, into the current
# directory, as libggmlmini.a for fa_check.c (which compares ggml's flash attention, bit for
# bit, with C models of its one-chunk, tiled and split-KV paths; see
# docs/design/llamacpp-tiled-attention.md, section 7).
#   pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36; tar xzf llama_cpp_python-0.3.36.tar.gz
#   mkdir -p /tmp/ggmlbuild && cd /tmp/ggmlbuild && cp .../ggml-version.h . && bash .../build.sh LLAMA_CPP_DIR
set -e
G=${1:?usage: build.sh LLAMA_CPP_DIR (vendor/llama.cpp of llama-cpp-python 0.3.36)}/ggml
ARCH="-msse4.2 -mf16c -mfma -mavx -mavx2 -mavxvnni -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw -mavx512vbmi -mavx512vnni -mavx512bf16"
DEFS="-DNDEBUG -D_GNU_SOURCE -D_XOPEN_SOURCE=600 -DGGML_SCHED_MAX_COPIES=4 -DGGML_USE_OPENMP -DGGML_USE_LLAMAFILE -DGGML_USE_CPU -DGGML_SSE42 -DGGML_F16C -DGGML_FMA -DGGML_AVX -DGGML_AVX2 -DGGML_AVX_VNNI -DGGML_AVX512 -DGGML_AVX512_VBMI -DGGML_AVX512_VNNI -DGGML_AVX512_BF16"
INC="-I$G/include -I$G/src -I$G/src/ggml-cpu -I$PWD"
objs=()
compile() { src=$1; o=$(echo $src | tr / _).o; objs+=($o); case $src in *.c) nice -n 19 gcc -std=gnu11 -O3 -fopenmp $ARCH $DEFS $INC -c $G/src/$src -o $o;; *) nice -n 19 g++ -std=gnu++17 -O3 -fopenmp $ARCH $DEFS $INC -c $G/src/$src -o $o;; esac; echo done $src; }
for s in ggml.c ggml.cpp ggml-alloc.c ggml-backend.cpp ggml-backend-meta.cpp ggml-opt.cpp ggml-threading.cpp ggml-quants.c gguf.cpp   ggml-cpu/ggml-cpu.c ggml-cpu/ggml-cpu.cpp ggml-cpu/repack.cpp ggml-cpu/hbm.cpp ggml-cpu/quants.c ggml-cpu/traits.cpp ggml-cpu/amx/amx.cpp ggml-cpu/amx/mmq.cpp ggml-cpu/tiled/tiled.cpp ggml-cpu/tiled/tiled-kernel.cpp ggml-cpu/binary-ops.cpp ggml-cpu/unary-ops.cpp ggml-cpu/vec.cpp ggml-cpu/ops.cpp ggml-cpu/llamafile/sgemm.cpp ggml-cpu/arch/x86/quants.c ggml-cpu/arch/x86/repack.cpp; do
  [ -f $(echo $s | tr / _).o ] || compile $s
done
ar rcs libggmlmini.a *.o
echo BUILD-OK
# Then link fa_check.c against libggmlmini.a (with the same -m flags, -fopenmp, -lstdc++, -lm) and run it; fa_check.out is its output in the study.
