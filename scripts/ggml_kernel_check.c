// Recomputes the cases written by the `dump_cases_for_ggml_check` test with llama.cpp's own
// x86 `quantize_row_q8_0/1` and `ggml_vec_dot_{q4_0_q8_0,q4_1_q8_1,q8_0_q8_0}` and counts the
// outputs whose bits differ from Plexus's kernels. Built and run by ggml_kernel_check.sh.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void ggml_cpu_init(void);
void quantize_row_q8_0(const float *x, void *y, int64_t k);
void quantize_row_q8_1(const float *x, void *y, int64_t k);
typedef void (*vec_dot_t)(int n, float *s, size_t bs, const void *vx, size_t bx, const void *vy,
                          size_t by, int nrc);
void ggml_vec_dot_q4_0_q8_0(int, float *, size_t, const void *, size_t, const void *, size_t, int);
void ggml_vec_dot_q4_1_q8_1(int, float *, size_t, const void *, size_t, const void *, size_t, int);
void ggml_vec_dot_q8_0_q8_0(int, float *, size_t, const void *, size_t, const void *, size_t, int);

static void read_all(FILE *f, void *p, size_t n) {
    if (fread(p, 1, n, f) != n) {
        fprintf(stderr, "short file\n");
        exit(2);
    }
}

int main(int argc, char **argv) {
    ggml_cpu_init(); // fills the f16 -> f32 table the dot products read
    long total_bad = 0;
    for (int a = 1; a < argc; a++) {
        FILE *f = fopen(argv[a], "rb");
        if (!f) {
            perror(argv[a]);
            return 2;
        }
        uint64_t h[4];
        read_all(f, h, sizeof h);
        const int fmt = (int)h[0];
        const int64_t rows = h[1], cols = h[2], m = h[3], nb = cols / 32;
        const size_t wb = fmt == 0 ? 18 : fmt == 1 ? 20 : 34; // weight block bytes
        const size_t ab = fmt == 1 ? 36 : 34;                  // activation block bytes
        const vec_dot_t dot = fmt == 0   ? ggml_vec_dot_q4_0_q8_0
                              : fmt == 1 ? ggml_vec_dot_q4_1_q8_1
                                         : ggml_vec_dot_q8_0_q8_0;
        uint8_t *w = malloc(rows * nb * wb), *y = malloc(nb * ab);
        float *x = malloc(m * cols * 4), *ours = malloc(m * rows * 4);
        read_all(f, w, rows * nb * wb);
        read_all(f, x, m * cols * 4);
        read_all(f, ours, m * rows * 4);
        fclose(f);
        long bad = 0;
        for (int64_t i = 0; i < m; i++) {
            (fmt == 1 ? quantize_row_q8_1 : quantize_row_q8_0)(x + i * cols, y, cols);
            for (int64_t r = 0; r < rows; r++) {
                float s;
                dot((int)cols, &s, 0, w + r * nb * wb, 0, y, 0, 1);
                if (memcmp(&s, &ours[i * rows + r], 4) != 0 && bad++ < 3) {
                    printf("  [%ld][%ld]: ggml %.9g, plexus %.9g\n", (long)i, (long)r, s,
                           ours[i * rows + r]);
                }
            }
        }
        printf("%s: %ld x %ld, m %ld: %ld of %ld outputs differ\n", argv[a], (long)rows,
               (long)cols, (long)m, bad, (long)(m * rows));
        total_bad += bad;
        free(w), free(y), free(x), free(ours);
    }
    return total_bad != 0;
}
