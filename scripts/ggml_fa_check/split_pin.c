// Prints the output bits of ggml-cpu's flash_attn_ext on its split-KV decode path (one query
// row, a KV view of 512 cells or more, 2 threads) for the inputs of
// `split_kv_bits_are_pinned_against_ggml` in crates/model/src/attention.rs, drawn in the same
// order (all of q, then per cell, kv head and value K then V). Build against the reference
// llama.cpp build (llama-cpp-python 0.3.36's vendor/llama.cpp, configured as in ANCHORS.md):
//   L=~/.cache/anchors/llama_cpp_python-0.3.36/vendor/llama.cpp
//   gcc -O2 -mf16c split_pin.c -I$L/ggml/include -L$L/build/ggml/src -lggml -lggml-cpu \
//       -lggml-base -fopenmp -lstdc++ -lm -o /tmp/split_pin && /tmp/split_pin
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "ggml.h"
#include "ggml-cpu.h"

static uint64_t state;
static float frand(void) {
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    return (float)((state >> 40) & 0xffffff) / (float)(1 << 24) * 2.0f - 1.0f;
}

static void run(int H, int Hkv, int D, int past, float qa, float ka, float va, uint64_t seed) {
    state = seed;
    int cells = past + 1;
    int nkv = cells <= 256 ? 256 : (cells + 255) / 256 * 256;
    struct ggml_init_params ip = {(size_t)64 << 20, NULL, false};
    struct ggml_context *ctx = ggml_init(ip);
    struct ggml_tensor *q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, 1, H, 1);
    struct ggml_tensor *k = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, nkv, Hkv, 1);
    struct ggml_tensor *v = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, nkv, Hkv, 1);
    struct ggml_tensor *m = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, nkv, 1, 1, 1);
    float *qd = q->data;
    uint16_t *kd = k->data, *vd = v->data, *md = m->data;
    for (int i = 0; i < H * D; i++) qd[i] = qa * frand();
    memset(kd, 0, sizeof(uint16_t) * nkv * Hkv * D);
    memset(vd, 0, sizeof(uint16_t) * nkv * Hkv * D);
    for (int j = 0; j < cells; j++)
        for (int g = 0; g < Hkv; g++)
            for (int d = 0; d < D; d++) {
                kd[(g * nkv + j) * D + d] = _cvtss_sh(ka * frand(), 0);
                vd[(g * nkv + j) * D + d] = _cvtss_sh(va * frand(), 0);
            }
    for (int j = 0; j < nkv; j++) md[j] = _cvtss_sh(j <= past ? 0.0f : -INFINITY, 0);
    struct ggml_tensor *o = ggml_flash_attn_ext(ctx, q, k, v, m, 1.0f / sqrtf((float)D), 0.0f, 0.0f);
    ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
    struct ggml_cgraph *gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, o);
    ggml_graph_compute_with_ctx(ctx, gf, 2);
    const float *od = o->data; // one row: [H][D]
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < H * D; i++) {
        uint32_t b;
        memcpy(&b, &od[i], 4);
        h = (h ^ b) * 0x100000001b3ull;
    }
    uint32_t first, last;
    memcpy(&first, &od[0], 4);
    memcpy(&last, &od[H * D - 1], 4);
    printf("((%d, %d, %d), %d, (%g, %g, %g), 0x%016llx, 0x%016llx, [0x%08x, 0x%08x]),\n", H, Hkv, D, past,
           qa, ka, va, (unsigned long long)seed, (unsigned long long)h, first, last);
    ggml_free(ctx);
}

int main(void) {
    ggml_cpu_init();
    run(9, 3, 64, 300, 3, 3, 3, 0x2545f4914f6cdd1dull);
    run(9, 3, 64, 256, 4, 4, 2, 0x9e3779b97f4a7c15ull);
    run(9, 3, 64, 511, 40, 30, 3, 0xdeadbeefcafef00dull);
    run(9, 3, 64, 700, 6, 6, 3, 0x1234567890abcdefull);
    run(4, 2, 128, 600, 3, 3, 3, 0x0badc0ffee0ddf00ull);
    return 0;
}
