//! AVX-512 (F/BW/VL + VNNI) kernels: two weight rows share each 512-bit register, so one
//! `vpdpbusd` does the integer work of two of ggml's AVX2 blocks. Each 256-bit half still holds
//! one row's eight ggml lanes (in a permuted order that the final sum undoes), and every lane sees
//! the same FMA sequence as in ggml, so results match the AVX2 and scalar backends bit for bit.
//!
//! Signed weights use the unsigned x signed `vpdpbusd` with a bias: Q4_0 dots the raw nibbles
//! `q` and subtracts `8 * sum(y)` per lane, Q8_0 dots `x ^ 0x80 = x + 128` and subtracts
//! `128 * sum(y)`; the corrections depend only on the activation block, so a tile computes them
//! once for all its weight rows. The integer lane sums are exactly ggml's.
//!
//! Single leftover rows go to the AVX2 kernels, which give the same bits.

// Tiles index weight rows, pairs and activation rows in lockstep (pointer offsets, scales and
// accumulators); index loops say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

use super::avx2::{self, prefetch};
use super::{Kernel, Tile};
use std::arch::x86_64::*;

/// Row pairs per full tile (4 weight rows; with 4 activation rows, 8 accumulators).
const PAIRS: usize = 2;

pub struct Q4_0;
pub struct Q4_1;
pub struct Q8_0;

/// Sums 4 lanes as the tail of ggml's `hsum_float_8` does (after its hi + lo step).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_4(mut r: __m128) -> f32 {
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

/// # Safety
/// Activation row `c` block `b` is in the tile.
#[inline(always)]
unsafe fn act(t: &Tile, c: usize, b: usize) -> __m256i {
    // SAFETY: per the contract; 32 bytes, unaligned load.
    unsafe { _mm256_loadu_si256(t.qs.as_ptr().add(c * t.nb + b).cast()) }
}

/// Two rows' nibble blocks at `pa`, `pb` as 128-bit chunks `[a lo, b lo, a hi, b hi]`, where
/// `lo` are values 0..16 (low nibbles) and `hi` values 16..32.
///
/// # Safety
/// 16 bytes readable at each pointer; AVX-512 F/BW/VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn nibbles_x2(pa: *const u8, pb: *const u8) -> __m512i {
    // SAFETY: per the contract.
    let raw = unsafe {
        _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(pa.cast())),
            _mm_loadu_si128(pb.cast()),
        )
    };
    let z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4));
    _mm512_and_si512(z, _mm512_set1_epi8(0x0F))
}

/// An activation block as `[y lo, y lo, y hi, y hi]`, to meet [`nibbles_x2`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn spread_lo_hi(y: __m256i) -> __m512i {
    _mm512_permutexvar_epi64(
        _mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
        _mm512_castsi256_si512(y),
    )
}

/// Scale vector: lane 0 of `v` for chunks 0 and 2, lane `k` for chunks 1 and 3 (pairs of
/// nibble rows) or lane 0 for chunks 0-1, lane `k` for 2-3 (pairs of Q8_0 rows).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn spread_scales(idx: __m512i, v: __m128) -> __m512 {
    _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))
}

/// Q4_1 x Q8_1, `P` pairs of weight rows.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI + AVX2/FMA/F16C; the tile holds `2 P` weight rows and `C` activation
/// rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_1<const P: usize, const C: usize>(t: &Tile) {
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    // Lanes 1 and 3: ggml's `summs` of rows a and b (lanes 0 and 2 carry unused d * s).
    let mut summs = [[_mm_setzero_ps(); C]; P];
    let sidx = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
    let w = t.w.as_ptr();
    for b in 0..t.nb {
        let mut y = [_mm512_setzero_si512(); C];
        let mut dy = [_mm_setzero_ps(); C];
        let mut sy = [_mm_setzero_ps(); C];
        for c in 0..C {
            let i = c * t.nb + b;
            // SAFETY: `c < C`, `b < nb`.
            y[c] = spread_lo_hi(unsafe { act(t, c, b) });
            dy[c] = _mm_set1_ps(t.d[i]);
            sy[c] = _mm_set1_ps(t.s[i]);
        }
        for p in 0..P {
            // SAFETY: block `b` of rows `2p` and `2p + 1` is inside `t.w`.
            let (dm, qx) = unsafe {
                let pa = w.add(2 * p * t.row_bytes + b * 20);
                let pb = pa.add(t.row_bytes);
                prefetch(pa, t.ahead);
                prefetch(pb, t.ahead);
                let dm = _mm_cvtph_ps(_mm_unpacklo_epi32(
                    _mm_cvtsi32_si128(pa.cast::<i32>().read_unaligned()),
                    _mm_cvtsi32_si128(pb.cast::<i32>().read_unaligned()),
                ));
                (dm, nibbles_x2(pa.add(4), pb.add(4)))
            };
            for c in 0..C {
                let scale = spread_scales(sidx, _mm_mul_ps(dm, dy[c]));
                summs[p][c] = _mm_fmadd_ps(dm, sy[c], summs[p][c]);
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qx, y[c]);
                acc[p][c] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[p][c]);
            }
        }
    }
    for p in 0..P {
        for c in 0..C {
            let a = acc[p][c];
            let ra = _mm_add_ps(
                _mm512_extractf32x4_ps::<2>(a),
                _mm512_extractf32x4_ps::<0>(a),
            );
            let rb = _mm_add_ps(
                _mm512_extractf32x4_ps::<3>(a),
                _mm512_extractf32x4_ps::<1>(a),
            );
            let s = summs[p][c];
            let sa = _mm_cvtss_f32(_mm_movehdup_ps(s));
            let sb = _mm_cvtss_f32(_mm_movehdup_ps(_mm_movehl_ps(s, s)));
            // SAFETY: the caller's contract.
            unsafe {
                t.store(c, 2 * p, hsum_4(ra) + sa);
                t.store(c, 2 * p + 1, hsum_4(rb) + sb);
            }
        }
    }
}

/// Q4_0 x Q8_0, `P` pairs of weight rows.
///
/// # Safety
/// As [`q4_1`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_0<const P: usize, const C: usize>(t: &Tile) {
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let sidx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    let eights = _mm512_set1_epi8(8);
    let w = t.w.as_ptr();
    for b in 0..t.nb {
        let mut y = [_mm512_setzero_si512(); C];
        let mut bias = [_mm512_setzero_si512(); C];
        let mut dy = [_mm_setzero_ps(); C];
        for c in 0..C {
            // SAFETY: `c < C`, `b < nb`.
            y[c] = spread_lo_hi(unsafe { act(t, c, b) });
            // -8 * (lane sums of y): dotting the raw nibbles from this start gives (q - 8) . y.
            bias[c] = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), eights, y[c]),
            );
            dy[c] = _mm_set1_ps(t.d[c * t.nb + b]);
        }
        for p in 0..P {
            // SAFETY: block `b` of rows `2p` and `2p + 1` is inside `t.w`.
            let (dx, qx) = unsafe {
                let pa = w.add(2 * p * t.row_bytes + b * 18);
                let pb = pa.add(t.row_bytes);
                prefetch(pa, t.ahead);
                prefetch(pb, t.ahead);
                let da = i32::from(pa.cast::<u16>().read_unaligned());
                let db = i32::from(pb.cast::<u16>().read_unaligned());
                let dx = _mm_cvtph_ps(_mm_cvtsi32_si128(da | (db << 16)));
                (dx, nibbles_x2(pa.add(2), pb.add(2)))
            };
            for c in 0..C {
                let scale = spread_scales(sidx, _mm_mul_ps(dx, dy[c]));
                let dot = _mm512_dpbusd_epi32(bias[c], qx, y[c]);
                acc[p][c] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[p][c]);
            }
        }
    }
    for p in 0..P {
        for c in 0..C {
            let a = acc[p][c];
            let ra = _mm_add_ps(
                _mm512_extractf32x4_ps::<2>(a),
                _mm512_extractf32x4_ps::<0>(a),
            );
            let rb = _mm_add_ps(
                _mm512_extractf32x4_ps::<3>(a),
                _mm512_extractf32x4_ps::<1>(a),
            );
            // SAFETY: the caller's contract.
            unsafe {
                t.store(c, 2 * p, hsum_4(ra));
                t.store(c, 2 * p + 1, hsum_4(rb));
            }
        }
    }
}

/// Q8_0 x Q8_0, `P` pairs of weight rows: chunks `[a lo, a hi, b lo, b hi]`.
///
/// # Safety
/// As [`q4_1`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0<const P: usize, const C: usize>(t: &Tile) {
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let sidx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let flip = _mm512_set1_epi8(-128);
    let w = t.w.as_ptr();
    for b in 0..t.nb {
        let mut y = [_mm512_setzero_si512(); C];
        let mut bias = [_mm512_setzero_si512(); C];
        let mut dy = [_mm_setzero_ps(); C];
        for c in 0..C {
            // SAFETY: `c < C`, `b < nb`.
            y[c] = _mm512_broadcast_i64x4(unsafe { act(t, c, b) });
            // -128 * (lane sums of y): dotting x + 128 from this start gives x . y.
            bias[c] = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, y[c]),
            );
            dy[c] = _mm_set1_ps(t.d[c * t.nb + b]);
        }
        for p in 0..P {
            // SAFETY: block `b` of rows `2p` and `2p + 1` is inside `t.w`.
            let (dx, qx) = unsafe {
                let pa = w.add(2 * p * t.row_bytes + b * 34);
                let pb = pa.add(t.row_bytes);
                prefetch(pa, t.ahead);
                prefetch(pb, t.ahead);
                let da = i32::from(pa.cast::<u16>().read_unaligned());
                let db = i32::from(pb.cast::<u16>().read_unaligned());
                let dx = _mm_cvtph_ps(_mm_cvtsi32_si128(da | (db << 16)));
                let qx = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(pa.add(2).cast())),
                    _mm256_loadu_si256(pb.add(2).cast()),
                );
                (dx, _mm512_xor_si512(qx, flip))
            };
            for c in 0..C {
                let scale = spread_scales(sidx, _mm_mul_ps(dx, dy[c]));
                let dot = _mm512_dpbusd_epi32(bias[c], qx, y[c]);
                acc[p][c] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[p][c]);
            }
        }
    }
    for p in 0..P {
        for c in 0..C {
            let a = acc[p][c];
            let ra = _mm_add_ps(
                _mm512_extractf32x4_ps::<1>(a),
                _mm512_extractf32x4_ps::<0>(a),
            );
            let rb = _mm_add_ps(
                _mm512_extractf32x4_ps::<3>(a),
                _mm512_extractf32x4_ps::<2>(a),
            );
            // SAFETY: the caller's contract.
            unsafe {
                t.store(c, 2 * p, hsum_4(ra));
                t.store(c, 2 * p + 1, hsum_4(rb));
            }
        }
    }
}

macro_rules! avx512_kernel {
    ($t:ident, $f:ident) => {
        impl Kernel for $t {
            const ROWS: usize = 2 * PAIRS;
            unsafe fn full<const C: usize>(t: &Tile) {
                // SAFETY: the caller's contract.
                unsafe { $f::<PAIRS, C>(t) }
            }
            unsafe fn one<const C: usize>(t: &Tile) {
                // SAFETY: the caller's contract; AVX-512 implies the AVX2 set.
                unsafe { <avx2::$t as Kernel>::one::<C>(t) }
            }
        }
    };
}

avx512_kernel!(Q4_0, q4_0);
avx512_kernel!(Q4_1, q4_1);
avx512_kernel!(Q8_0, q8_0);
