//! AVX2 + FMA + F16C kernels: ggml's AVX2 `ggml_vec_dot_*` loops, run on two weight rows and up
//! to four activation rows at once, so each weight block is unpacked once per tile and the FMA
//! chains of different outputs overlap. Per output the operations are ggml's, in ggml's order.

// Tiles index weight rows, pairs and activation rows in lockstep (pointer offsets, scales and
// accumulators); index loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::{Kernel, Tile, BLOCK};
use std::arch::x86_64::*;

/// Weight rows per full tile (2 x 4 accumulators leave registers for the operands).
const ROWS: usize = 2;

pub struct Q4_0;
pub struct Q4_1;
pub struct Q8_0;

/// ggml's `hsum_float_8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_float_8(x: __m256) -> f32 {
    let mut r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// Two f16s at `p` (unaligned) as f32s in lanes 0 and 1.
///
/// # Safety
/// `p` is readable for 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16x2(p: *const u8) -> __m128 {
    // SAFETY: per the contract.
    _mm_cvtph_ps(_mm_cvtsi32_si128(unsafe {
        p.cast::<i32>().read_unaligned()
    }))
}

/// 16 bytes of nibbles as 32 bytes in 0..16: low nibbles first (values 0..16), then high.
///
/// # Safety
/// `p` is readable for 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: per the contract.
    let raw = unsafe { _mm_loadu_si128(p.cast()) };
    let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4));
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Eight i32 lane sums of `x * y` for unsigned `x` (ggml's `mul_sum_us8_pairs_float` without
/// VNNI; the integers are the same either way).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes_us(x: __m256i, y: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_madd_epi16(
        _mm256_set1_epi16(1),
        _mm256_maddubs_epi16(x, y),
    ))
}

/// Signed `x` (ggml's `mul_sum_i8_pairs_float`): `|x| * sign(y, x)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes_ss(x: __m256i, y: __m256i) -> __m256 {
    lanes_us(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// Hints the cache line `ahead` bytes past `p` (the same column a few rows below) into L1;
/// never faults, even past the end of the matrix.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, ahead: usize) {
    // SAFETY: prefetching is a hint that does not access memory architecturally.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead).cast()) };
}

/// # Safety
/// Activation row `c` block `b` is in the tile.
#[inline(always)]
unsafe fn act(t: &Tile, c: usize, b: usize) -> __m256i {
    // SAFETY: per the contract; 32 bytes, unaligned load.
    unsafe { _mm256_loadu_si256(t.qs.as_ptr().add(c * t.nb + b).cast()) }
}

/// Q4_1 x Q8_1 for `R` weight rows.
///
/// # Safety
/// AVX2/FMA/F16C; the tile holds `R` weight rows and `C` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1<const R: usize, const C: usize>(t: &Tile) {
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut summs = [[0f32; C]; R];
    let w = t.w.as_ptr();
    for b in 0..t.nb {
        let mut y = [_mm256_setzero_si256(); C];
        for (c, yc) in y.iter_mut().enumerate() {
            // SAFETY: `c < C`, `b < nb`.
            *yc = unsafe { act(t, c, b) };
        }
        for r in 0..R {
            // SAFETY: block `b` of row `r` is inside `t.w` (R rows of `row_bytes`).
            let (dm, qx) = unsafe {
                let p = w.add(r * t.row_bytes + b * 20);
                prefetch(p, t.ahead);
                (f16x2(p), nibbles(p.add(4)))
            };
            let d0 = _mm_cvtss_f32(dm);
            let m0 = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            for c in 0..C {
                let i = c * t.nb + b;
                summs[r][c] = m0.mul_add(t.s[i], summs[r][c]);
                let d = _mm256_set1_ps(d0 * t.d[i]);
                acc[r][c] = _mm256_fmadd_ps(d, lanes_us(qx, y[c]), acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            // SAFETY: the caller's contract.
            unsafe { t.store(c, r, hsum_float_8(acc[r][c]) + summs[r][c]) };
        }
    }
}

/// Q4_0 x Q8_0 (`OFFSET` 8) and Q8_0 x Q8_0: `acc = fma(dx * dy, lanes, acc)`, no minimum.
///
/// # Safety
/// As [`q4_1`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q_0<const BYTES: usize, const R: usize, const C: usize>(t: &Tile) {
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let w = t.w.as_ptr();
    for b in 0..t.nb {
        let mut y = [_mm256_setzero_si256(); C];
        for (c, yc) in y.iter_mut().enumerate() {
            // SAFETY: `c < C`, `b < nb`.
            *yc = unsafe { act(t, c, b) };
        }
        for r in 0..R {
            // SAFETY: block `b` of row `r` is inside `t.w`.
            let (dx, qx) = unsafe {
                let p = w.add(r * t.row_bytes + b * BYTES);
                prefetch(p, t.ahead);
                let dx = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                    p.cast::<u16>().read_unaligned(),
                ))));
                let qx = if BYTES == 18 {
                    _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8))
                } else {
                    _mm256_loadu_si256(p.add(2).cast())
                };
                (dx, qx)
            };
            for c in 0..C {
                let d = _mm256_set1_ps(dx * t.d[c * t.nb + b]);
                acc[r][c] = _mm256_fmadd_ps(d, lanes_ss(qx, y[c]), acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            // SAFETY: the caller's contract.
            unsafe { t.store(c, r, hsum_float_8(acc[r][c])) };
        }
    }
}

impl Kernel for Q4_1 {
    const ROWS: usize = ROWS;
    unsafe fn full<const C: usize>(t: &Tile) {
        // SAFETY: the caller's contract.
        unsafe { q4_1::<ROWS, C>(t) }
    }
    unsafe fn one<const C: usize>(t: &Tile) {
        // SAFETY: the caller's contract.
        unsafe { q4_1::<1, C>(t) }
    }
}

impl Kernel for Q4_0 {
    const ROWS: usize = ROWS;
    unsafe fn full<const C: usize>(t: &Tile) {
        // SAFETY: the caller's contract.
        unsafe { q_0::<18, ROWS, C>(t) }
    }
    unsafe fn one<const C: usize>(t: &Tile) {
        // SAFETY: the caller's contract.
        unsafe { q_0::<18, 1, C>(t) }
    }
}

impl Kernel for Q8_0 {
    const ROWS: usize = ROWS;
    unsafe fn full<const C: usize>(t: &Tile) {
        // SAFETY: the caller's contract.
        unsafe { q_0::<34, ROWS, C>(t) }
    }
    unsafe fn one<const C: usize>(t: &Tile) {
        // SAFETY: the caller's contract.
        unsafe { q_0::<34, 1, C>(t) }
    }
}

const _: () = assert!(BLOCK == 32);
