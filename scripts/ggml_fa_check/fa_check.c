// Compares ggml's CPU flash_attn_ext (tiled path for N >= 64, one_chunk otherwise) with a
// per-row scalar model of each path (the spec in /tmp/tiled_fa_spec.md). Compile the model part
// with -ffp-contract=off: every fused multiply-add is written as fmaf.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-cpu.h"

static uint64_t rng = 0x2545f4914f6cdd1dull;
static float frand(void) { // uniform [-1, 1)
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 40) & 0xffffff) / (float)(1 << 24) * 2.0f - 1.0f;
}
static uint16_t f2h(float x) { return _cvtss_sh(x, 0); }
static float h2f(uint16_t h) { return _cvtsh_ss(h); }

// ggml_v_expf (AVX-512), one lane
static float v_expf(float x) {
    const float r = 0x1.8p23f;
    float z = fmaf(x, 0x1.715476p+0f, r);
    float n = z - r;
    float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    float u = b * b;
    float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)), u,
                   fmaf(0x1.ffffecp-1f, b, 1.0f));
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    return (float)ldexp((double)j, (int)n);
}
// GCC's _mm512_reduce_add_ps
static float reduce16(const float *v) {
    float t3[8], t6[4];
    for (int j = 0; j < 8; j++) t3[j] = v[8 + j] + v[j];
    for (int j = 0; j < 4; j++) t6[j] = t3[4 + j] + t3[j];
    return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

// ---- model of ggml_compute_forward_flash_attn_ext_tiled, one query row of one head ----
// q: DK f32; k,v: cache rows (f16) of this kv head, row j at k + j*stride; keys 0..=pos visible;
// ncells: cells present (keys >= ncells read as +0 V in the V product; llama.cpp's are stale/zero).
static void row_tiled(int D, const float *q, const uint16_t *k, const uint16_t *v, int stride, int pos,
                      int ncells, float scale, float *out) {
    float M = -INFINITY, S = 0.0f;
    float acc[512], kq[64];
    memset(acc, 0, sizeof(float) * D);
    for (int t0 = 0; t0 <= pos; t0 += 64) {
        for (int tk = 0; tk < 64; tk++) {
            int j = t0 + tk;
            if (j <= pos) {
                float a = 0.0f;
                for (int d = 0; d < D; d++) a = fmaf(h2f(k[j * stride + d]), q[d], a);
                kq[tk] = a * scale;
                kq[tk] = kq[tk] + 0.0f; // + mask (0)
            } else {
                kq[tk] = -INFINITY;
            }
        }
        float tmax = -INFINITY;
        for (int tk = 0; tk < 64; tk++) tmax = tmax > kq[tk] ? tmax : kq[tk];
        if (tmax == -INFINITY) continue; // (cannot happen: key t0 is visible)
        float Mnew = fmaxf(M, tmax);
        if (Mnew > M) {
            float ms = expf(M - Mnew);
            for (int d = 0; d < D; d++) acc[d] *= ms;
            S *= ms;
        }
        M = Mnew;
        double sum = 0.0;
        for (int b = 0; b < 4; b++) {
            for (int l = 0; l < 16; l++) kq[16 * b + l] = v_expf(kq[16 * b + l] - M);
            sum += (double)reduce16(kq + 16 * b);
        }
        S = (float)((double)S + sum);
        for (int tk = 0; tk < 64; tk++) {
            int j = t0 + tk;
            for (int d = 0; d < D; d++) {
                float vv = j < ncells ? h2f(v[j * stride + d]) : 0.0f;
                acc[d] = fmaf(vv, kq[tk], acc[d]);
            }
        }
    }
    float inv = S == 0.0f ? 0.0f : 1.0f / S;
    for (int d = 0; d < D; d++) out[d] = acc[d] * inv;
}

// ---- model of flash_attn_ext_f16_one_chunk (what attention.rs implements) ----
static float dot_f16(int n, const uint16_t *x, const uint16_t *y) {
    int np = n - n % 64;
    float acc[4][16] = {{0}};
    for (int i = 0; i < np; i += 64)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 16; l++) {
                int kk = i + j * 16 + l;
                acc[j][l] = fmaf(h2f(x[kk]), h2f(y[kk]), acc[j][l]);
            }
    float v[16];
    for (int l = 0; l < 16; l++) v[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    double s = reduce16(v);
    for (int kk = np; kk < n; kk++) s += (double)(h2f(x[kk]) * h2f(y[kk]));
    return (float)s;
}
static void row_one_chunk(int D, const float *q, const uint16_t *k, const uint16_t *v, int stride, int pos,
                          float scale, float *out) {
    uint16_t q16[512];
    float acc[512];
    for (int d = 0; d < D; d++) { q16[d] = f2h(q[d]); acc[d] = 0.0f; }
    float M = -INFINITY, S = 0.0f;
    for (int j = 0; j <= pos; j++) {
        float s = dot_f16(D, k + j * stride, q16) * scale;
        float ms = 1.0f, vs = 1.0f;
        if (s > M) {
            float old = M; M = s; ms = expf(old - M);
            for (int d = 0; d < D; d++) acc[d] = h2f(f2h(acc[d] * ms));
        } else {
            vs = expf(s - M);
        }
        for (int d = 0; d < D; d++) acc[d] = h2f(f2h(fmaf(h2f(v[j * stride + d]), vs, acc[d])));
        S = fmaf(S, ms, vs);
    }
    float inv = S == 0.0f ? 0.0f : 1.0f / S;
    for (int d = 0; d < D; d++) out[d] = acc[d] * inv;
}


// ---- model of the decode split-KV path (neq1 == 1, nek1 >= 512): one_chunk per thread's key
// range with partials, then ggml_flash_attn_ext_reduce_partials. variant: how GCC contracts
// `a*b + c*d`: 0 = fma(a, b, c*d), 1 = fma(c, d, a*b), 2 = no fusion.
static float comb(float a, float b, float c, float d, int variant) {
    if (variant == 0) return fmaf(a, b, c * d);
    if (variant == 1) return fmaf(c, d, a * b);
    return a * b + c * d;
}
static void row_split(int D, const float *q, const uint16_t *k, const uint16_t *v, int stride, int pos,
                      int nek1, int nth, float scale, int variant, float *out) {
    uint16_t q16[512];
    float acc[512], fin[512];
    for (int d = 0; d < D; d++) { q16[d] = f2h(q[d]); fin[d] = 0.0f; }
    int cs = (nek1 + nth - 1) / nth;
    float Mf = -INFINITY, Sf = 0.0f;
    for (int c = 0; c < nth; c++) {
        int a0 = c * cs, a1 = a0 + cs < nek1 ? a0 + cs : nek1;
        if (a0 >= nek1) continue;
        float M = -INFINITY, S = 0.0f;
        for (int d = 0; d < D; d++) acc[d] = 0.0f;
        for (int j = a0; j < a1 && j <= pos; j++) {
            float s = dot_f16(D, k + j * stride, q16) * scale;
            float ms = 1.0f, vs = 1.0f;
            if (s > M) {
                float old = M; M = s; ms = expf(old - M);
                for (int d = 0; d < D; d++) acc[d] = h2f(f2h(acc[d] * ms));
            } else {
                vs = expf(s - M);
            }
            for (int d = 0; d < D; d++) acc[d] = h2f(f2h(fmaf(h2f(v[j * stride + d]), vs, acc[d])));
            S = fmaf(S, ms, vs);
        }
        if (S == 0.0f) continue;
        float Mn = fmaxf(Mf, M);
        float so = expf(Mf - Mn), sn = expf(M - Mn);
        for (int d = 0; d < D; d++) fin[d] = comb(fin[d], so, acc[d], sn, variant);
        Sf = comb(Sf, so, S, sn, variant);
        Mf = Mn;
    }
    if (Sf != 0.0f) { float inv = 1.0f / Sf; for (int d = 0; d < D; d++) fin[d] *= inv; }
    for (int d = 0; d < D; d++) out[d] = fin[d];
}

static int run(int D, int H, int Hkv, int P, int N, int T, float qamp, float kamp) {
    int used = P + N;
    int nkv = used <= 256 ? 256 : (used + 255) / 256 * 256;
    size_t mem = (size_t)64 << 20;
    struct ggml_init_params ip = {mem, NULL, false};
    struct ggml_context *ctx = ggml_init(ip);
    struct ggml_tensor *q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, D, N, H, 1);
    struct ggml_tensor *k = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, nkv, Hkv, 1);
    struct ggml_tensor *v = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, D, nkv, Hkv, 1);
    struct ggml_tensor *m = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, nkv, N, 1, 1);
    float *qd = q->data; uint16_t *kd = k->data, *vd = v->data, *md = m->data;
    for (int h = 0; h < H; h++) for (int i = 0; i < N; i++) for (int d = 0; d < D; d++)
        qd[(h * N + i) * D + d] = qamp * frand();
    for (int g = 0; g < Hkv; g++) for (int j = 0; j < nkv; j++) for (int d = 0; d < D; d++) {
        // cells >= used hold stale finite values, like a reused llama.cpp cache
        kd[(g * nkv + j) * D + d] = f2h(kamp * frand());
        vd[(g * nkv + j) * D + d] = f2h(3.0f * frand());
    }
    for (int i = 0; i < N; i++) for (int j = 0; j < nkv; j++) md[i * nkv + j] = f2h(j <= P + i ? 0.0f : -INFINITY);
    float scale = 1.0f / sqrtf((float)D);
    struct ggml_tensor *o = ggml_flash_attn_ext(ctx, q, k, v, m, scale, 0.0f, 0.0f);
    ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
    struct ggml_cgraph *gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, o);
    ggml_graph_compute_with_ctx(ctx, gf, T);
    const float *od = o->data; // [D][H][N]: row (i, h) at (i*H + h)*D
    int rep = H / Hkv;
    long bad_t = 0, bad_o = 0, total = 0, bad_s[3] = {0, 0, 0};
    float tmp[512], qrow[512];
    uint16_t *ks = malloc(sizeof(uint16_t) * nkv * D), *vs = malloc(sizeof(uint16_t) * nkv * D);
    for (int h = 0; h < H; h++) {
        int g = h / rep;
        memcpy(ks, kd + (size_t)g * nkv * D, sizeof(uint16_t) * nkv * D);
        memcpy(vs, vd + (size_t)g * nkv * D, sizeof(uint16_t) * nkv * D);
        for (int i = 0; i < N; i++) {
            memcpy(qrow, qd + (h * N + i) * D, sizeof(float) * D);
            const float *got = od + ((size_t)i * H + h) * D;
            row_tiled(D, qrow, ks, vs, D, P + i, nkv, scale, tmp);
            for (int d = 0; d < D; d++) bad_t += memcmp(&tmp[d], &got[d], 4) != 0;
            row_one_chunk(D, qrow, ks, vs, D, P + i, scale, tmp);
            for (int d = 0; d < D; d++) bad_o += memcmp(&tmp[d], &got[d], 4) != 0;
            if (N == 1) for (int var = 0; var < 3; var++) { row_split(D, qrow, ks, vs, D, P + i, nkv, T, scale, var, tmp); for (int d = 0; d < D; d++) bad_s[var] += memcmp(&tmp[d], &got[d], 4) != 0; }
            total += D;
        }
    }
    printf("D=%d H=%d/%d past=%d N=%d nkv=%d threads=%d amp=%g/%g: %ld values; differ from tiled model %ld, from one-chunk model %ld\n",
           D, H, Hkv, P, N, nkv, T, qamp, kamp, total, bad_t, bad_o);
    if (N == 1) printf("    split-KV model: fma(old*so, new*sn) variants differ by %ld / %ld / %ld\n", bad_s[0], bad_s[1], bad_s[2]);
    free(ks); free(vs);
    ggml_free(ctx);
    return 0;
}

int main(int argc, char **argv) {
    ggml_cpu_init();
    int cases[][8] = {
        // D, H, Hkv, past, N, threads, qamp, kamp
        {64, 9, 3, 0, 5, 2, 3, 3},
        {64, 9, 3, 0, 63, 2, 3, 3},
        {64, 9, 3, 0, 64, 2, 3, 3},
        {64, 9, 3, 0, 76, 2, 3, 3},
        {64, 9, 3, 0, 76, 1, 3, 3},
        {64, 9, 3, 0, 76, 3, 3, 3},
        {64, 9, 3, 37, 100, 2, 4, 4},
        {64, 9, 3, 200, 130, 2, 6, 6},
        {128, 4, 2, 10, 70, 2, 3, 3},
        {80, 4, 1, 3, 66, 2, 3, 3},
        {64, 9, 3, 0, 300, 2, 8, 8},
        {64, 9, 3, 0, 76, 2, 20, 20},
        {64, 9, 3, 5, 200, 2, 40, 30},
        {64, 9, 3, 100, 1, 2, 3, 3},
        {64, 9, 3, 300, 1, 1, 3, 3},
        {64, 9, 3, 300, 1, 2, 3, 3},
        {64, 9, 3, 300, 1, 3, 3, 3},
        {64, 9, 3, 700, 1, 2, 6, 6},
        {128, 4, 2, 600, 1, 2, 3, 3},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int *a = cases[c];
        run(a[0], a[1], a[2], a[3], a[4], a[5], (float)a[6], (float)a[7]);
    }
    return 0;
}
