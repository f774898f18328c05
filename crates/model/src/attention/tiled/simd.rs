//! The tile step of the tiled kernel in AVX2 and AVX-512, bit-identical to the scalar
//! `step_scalar` lane by lane (see the parent module).

// The steps index several per-(row, head) arrays (`[_; R]`) by the same `r`.
#![allow(clippy::needless_range_loop)]

// The 16-lane fold (GCC's `_mm512_reduce_add_ps` order) the one-chunk kernel uses too.
use super::super::simd::fold16;
use super::{Rows, Tile, TILE};
use half::f16;
use std::arch::x86_64::*;

// `numerics::expf`'s constants.
const SHIFT: f32 = f32::from_bits(0x4b40_0000); // 0x1.8p23
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
const C4: f32 = f32::from_bits(0x3c07_2010); // 0x1.0e4020p-7
const C3: f32 = f32::from_bits(0x3d2b_9f17); // 0x1.573e2ep-5
const C2: f32 = f32::from_bits(0x3e2a_af33); // 0x1.555e66p-3
const C1: f32 = f32::from_bits(0x3eff_fedb); // 0x1.fffdb6p-2
const C0: f32 = f32::from_bits(0x3f7f_fff6); // 0x1.ffffecp-1

/// f16 -> f32 with F16C (exact, like `to_f32`), 8 at a time, the rest one by one.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn widen(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm_loadu_si128(src.as_ptr().add(i).cast());
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(x));
        i += 8;
    }
    for (y, x) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *y = x.to_f32();
    }
}

/// `numerics::expf` on 16 lanes: ggml's AVX-512 `ggml_v_expf`, of which it is the scalar
/// model (`vscalefps` for `j * 2^n`).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) fn exp16(x: __m512) -> __m512 {
    let shift = _mm512_set1_ps(SHIFT);
    let z = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), shift);
    let n = _mm512_sub_ps(z, shift);
    let b = _mm512_fnmadd_ps(
        n,
        _mm512_set1_ps(LN2_LO),
        _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x),
    );
    let u = _mm512_mul_ps(b, b);
    let j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(
            _mm512_fmadd_ps(_mm512_set1_ps(C4), b, _mm512_set1_ps(C3)),
            u,
            _mm512_fmadd_ps(_mm512_set1_ps(C2), b, _mm512_set1_ps(C1)),
        ),
        u,
        _mm512_fmadd_ps(_mm512_set1_ps(C0), b, _mm512_set1_ps(1.0)),
    );
    let res = _mm512_scalef_ps(j, n);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
    if big == 0 {
        return res;
    }
    let zero = _mm512_setzero_ps();
    let alt = _mm512_mask_blend_ps(
        _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
        _mm512_set1_ps(f32::INFINITY),
        zero,
    );
    _mm512_mask_blend_ps(big, res, alt)
}

/// `numerics::expf` on 8 lanes (NOT ggml's AVX2 `ggml_v_expf`, which differs): the same
/// polynomial, then `j * 2^n` as one multiply by `2^n` built from exponent bits, which
/// rounds once like `vscalefps` while `2^n` is a normal float; lanes with `n` outside
/// `-126..=127` but `|n| <= 192` take the scalar function.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn exp8(x: __m256) -> __m256 {
    let shift = _mm256_set1_ps(SHIFT);
    let z = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), shift);
    let n = _mm256_sub_ps(z, shift);
    let b = _mm256_fnmadd_ps(
        n,
        _mm256_set1_ps(LN2_LO),
        _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x),
    );
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_set1_ps(C4), b, _mm256_set1_ps(C3)),
            u,
            _mm256_fmadd_ps(_mm256_set1_ps(C2), b, _mm256_set1_ps(C1)),
        ),
        u,
        _mm256_fmadd_ps(_mm256_set1_ps(C0), b, _mm256_set1_ps(1.0)),
    );
    let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    let res = _mm256_mul_ps(j, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e)));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
    let outside = _mm256_or_ps(
        _mm256_cmp_ps::<_CMP_LT_OQ>(n, _mm256_set1_ps(-126.0)),
        _mm256_cmp_ps::<_CMP_GT_OQ>(n, _mm256_set1_ps(127.0)),
    );
    if _mm256_movemask_ps(outside) == 0 {
        return res;
    }
    // |n| > 192: 0 for n <= 0, +inf above.
    let alt = _mm256_and_ps(
        _mm256_cmp_ps::<_CMP_GT_OQ>(n, _mm256_setzero_ps()),
        _mm256_set1_ps(f32::INFINITY),
    );
    let res = _mm256_blendv_ps(res, alt, big);
    let slow = _mm256_movemask_ps(_mm256_andnot_ps(big, outside));
    if slow == 0 {
        return res;
    }
    let (mut xs, mut rs) = ([0f32; 8], [0f32; 8]);
    // SAFETY: both arrays hold 8 floats.
    unsafe {
        _mm256_storeu_ps(xs.as_mut_ptr(), x);
        _mm256_storeu_ps(rs.as_mut_ptr(), res);
    }
    for (l, (r, &x)) in rs.iter_mut().zip(&xs).enumerate() {
        if slow >> l & 1 == 1 {
            *r = crate::numerics::expf(x);
        }
    }
    // SAFETY: as above.
    unsafe { _mm256_loadu_ps(rs.as_ptr()) }
}

/// What the V product of a step needs per (row, head): the tile's weights, the rescale
/// factor of the accumulator (if the maximum grew), and whether the tile counts at all.
struct Weights<const R: usize> {
    p: [[f32; TILE]; R],
    ms: [Option<f32>; R],
    live: [bool; R],
    acc: [*mut f32; R],
}

/// The query row pointers of `items`.
///
/// # Safety
/// Every item `< rows.m.len()` and `rows.q.len() == rows.m.len() * d`.
unsafe fn row_ptrs<const R: usize>(
    items: [usize; R],
    rows: &mut Rows<'_>,
) -> ([*const f32; R], [*mut f32; R]) {
    let d = rows.d;
    let (mut q, mut acc) = ([std::ptr::null(); R], [std::ptr::null_mut(); R]);
    for r in 0..R {
        q[r] = rows.q.as_ptr().add(items[r] * d);
        acc[r] = rows.acc.as_mut_ptr().add(items[r] * d);
    }
    (q, acc)
}

/// The softmax part of the step for (row, head) `i` given its 64 masked scores `x`
/// (scaled, `+ 0.0`, -inf past `visible`) and their maximum: updates `m` and `s`, returns
/// the rescale factor, or `None` in the first slot if the tile is skipped.
#[inline]
fn update(rows: &mut Rows<'_>, i: usize, tile_max: f32) -> Option<(f32, Option<f32>)> {
    if tile_max == f32::NEG_INFINITY {
        return None;
    }
    let m = rows.m[i];
    let m_new = m.max(tile_max);
    let mut rescale = None;
    if m_new > m {
        let ms = (m - m_new).exp();
        rows.s[i] *= ms;
        rescale = Some(ms);
    }
    rows.m[i] = m_new;
    Some((m_new, rescale))
}

/// [`super::step_scalar`] for the (row, head) pairs `items` together, 16 keys or head
/// values per register.
///
/// # Safety
/// AVX-512 F, AVX2, FMA and F16C are available; `visible` is in `1..=64`; `t.kt` and `t.vt`
/// hold `t.d * 64` values; every item is `< rows.m.len()`, and `rows.q`, `rows.acc` hold
/// `rows.m.len() * t.d` values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn step_avx512<const R: usize>(
    t: &Tile<'_>,
    visible: usize,
    items: [usize; R],
    rows: &mut Rows<'_>,
) {
    let d = t.d;
    let kt = t.kt.as_ptr();
    let (q, acc) = row_ptrs(items, rows);
    // Scores: lane `tk` of block `j` is key `16 j + tk`'s FMA chain over the head.
    let mut sc = [[_mm512_setzero_ps(); 4]; R];
    for dk in 0..d {
        let k = kt.add(dk * TILE);
        let kb = [
            _mm512_loadu_ps(k),
            _mm512_loadu_ps(k.add(16)),
            _mm512_loadu_ps(k.add(32)),
            _mm512_loadu_ps(k.add(48)),
        ];
        for r in 0..R {
            let b = _mm512_set1_ps(*q[r].add(dk));
            for j in 0..4 {
                sc[r][j] = _mm512_fmadd_ps(kb[j], b, sc[r][j]);
            }
        }
    }
    let shown = if visible >= TILE {
        u64::MAX
    } else {
        (1u64 << visible) - 1
    };
    let (scale, zero) = (_mm512_set1_ps(t.scale), _mm512_setzero_ps());
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut w = Weights {
        p: [[0f32; TILE]; R],
        ms: [None; R],
        live: [false; R],
        acc,
    };
    for r in 0..R {
        let mut x = [zero; 4];
        for (j, x) in x.iter_mut().enumerate() {
            let y = _mm512_add_ps(_mm512_mul_ps(sc[r][j], scale), zero);
            *x = _mm512_mask_blend_ps((shown >> (16 * j)) as u16, ninf, y);
        }
        let tile_max = _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_max_ps(x[0], x[1]),
            _mm512_max_ps(x[2], x[3]),
        ));
        let Some((m_new, rescale)) = update(rows, items[r], tile_max) else {
            continue;
        };
        (w.live[r], w.ms[r]) = (true, rescale);
        let mv = _mm512_set1_ps(m_new);
        let mut sum = 0f64;
        for (j, &x) in x.iter().enumerate() {
            let e = exp16(_mm512_sub_ps(x, mv));
            _mm512_storeu_ps(w.p[r].as_mut_ptr().add(16 * j), e);
            let lo = _mm512_castps512_ps256(e);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
            sum += f64::from(fold16(lo, hi));
        }
        let s = &mut rows.s[items[r]];
        *s = (f64::from(*s) + sum) as f32;
    }
    if !w.live.contains(&true) {
        return;
    }
    let mut c = 0;
    while c < d {
        let lanes = (d - c).min(64);
        match lanes.div_ceil(16) {
            4 => v_avx512::<R, 4>(t, c, lanes, visible, &w),
            3 => v_avx512::<R, 3>(t, c, lanes, visible, &w),
            2 => v_avx512::<R, 2>(t, c, lanes, visible, &w),
            _ => v_avx512::<R, 1>(t, c, lanes, visible, &w),
        }
        c += lanes;
    }
}

/// The V product for head values `c..c + lanes` (`W` registers, the last one masked):
/// `acc = fma(v[tk], p[tk], acc * ms)` for the visible keys in order, then `+ 0.0` if some
/// keys were hidden.
///
/// # Safety
/// As [`step_avx512`]; `c + lanes <= t.d`, `lanes` in `16 W - 15..=16 W`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn v_avx512<const R: usize, const W: usize>(
    t: &Tile<'_>,
    c: usize,
    lanes: usize,
    visible: usize,
    w: &Weights<R>,
) {
    let d = t.d;
    let tail = ((1u32 << (lanes - 16 * (W - 1))) - 1) as u16;
    let mask = |k: usize| if k + 1 < W { u16::MAX } else { tail };
    let mut a = [[_mm512_setzero_ps(); W]; R];
    for r in 0..R {
        for (k, a) in a[r].iter_mut().enumerate() {
            let x = _mm512_maskz_loadu_ps(mask(k), w.acc[r].add(c + 16 * k));
            *a = match w.ms[r] {
                Some(ms) => _mm512_mul_ps(x, _mm512_set1_ps(ms)),
                None => x,
            };
        }
    }
    let vt = t.vt.as_ptr().add(c);
    for tk in 0..visible {
        let row = vt.add(tk * d);
        let mut v = [_mm512_setzero_ps(); W];
        for (k, v) in v.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(mask(k), row.add(16 * k));
        }
        for r in 0..R {
            let p = _mm512_set1_ps(w.p[r][tk]);
            for k in 0..W {
                a[r][k] = _mm512_fmadd_ps(v[k], p, a[r][k]);
            }
        }
    }
    for r in 0..R {
        if !w.live[r] {
            continue;
        }
        for (k, &a) in a[r].iter().enumerate() {
            let a = if visible < TILE {
                _mm512_add_ps(a, _mm512_setzero_ps())
            } else {
                a
            };
            _mm512_mask_storeu_ps(w.acc[r].add(c + 16 * k), mask(k), a);
        }
    }
}

/// [`step_avx512`] with 8-lane registers: the scores in two halves of 32 keys.
///
/// # Safety
/// As [`step_avx512`], with AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn step_avx2<const R: usize>(
    t: &Tile<'_>,
    visible: usize,
    items: [usize; R],
    rows: &mut Rows<'_>,
) {
    let d = t.d;
    let kt = t.kt.as_ptr();
    let (q, acc) = row_ptrs(items, rows);
    let mut w = Weights {
        p: [[0f32; TILE]; R],
        ms: [None; R],
        live: [false; R],
        acc,
    };
    // Raw scores into `w.p`: lane `tk` is key `tk`'s FMA chain over the head.
    for half in 0..2 {
        let mut sc = [[_mm256_setzero_ps(); 4]; R];
        for dk in 0..d {
            let k = kt.add(dk * TILE + 32 * half);
            let kb = [
                _mm256_loadu_ps(k),
                _mm256_loadu_ps(k.add(8)),
                _mm256_loadu_ps(k.add(16)),
                _mm256_loadu_ps(k.add(24)),
            ];
            for r in 0..R {
                let b = _mm256_set1_ps(*q[r].add(dk));
                for j in 0..4 {
                    sc[r][j] = _mm256_fmadd_ps(kb[j], b, sc[r][j]);
                }
            }
        }
        for r in 0..R {
            for (j, &s) in sc[r].iter().enumerate() {
                _mm256_storeu_ps(w.p[r].as_mut_ptr().add(32 * half + 8 * j), s);
            }
        }
    }
    let (scale, zero) = (_mm256_set1_ps(t.scale), _mm256_setzero_ps());
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let shown = _mm256_set1_epi32(visible as i32);
    for r in 0..R {
        let mut x = [zero; 8];
        for (j, x) in x.iter_mut().enumerate() {
            let y = _mm256_loadu_ps(w.p[r].as_ptr().add(8 * j));
            let y = _mm256_add_ps(_mm256_mul_ps(y, scale), zero);
            let keys = _mm256_add_epi32(lane, _mm256_set1_epi32(8 * j as i32));
            let seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(shown, keys));
            *x = _mm256_blendv_ps(ninf, y, seen);
        }
        let mut mx = x[0];
        for &x in &x[1..] {
            mx = _mm256_max_ps(mx, x);
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let tile_max = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        let Some((m_new, rescale)) = update(rows, items[r], tile_max) else {
            // (The raw scores in `w.p[r]` are never used: the pair is not live.)
            continue;
        };
        (w.live[r], w.ms[r]) = (true, rescale);
        let mv = _mm256_set1_ps(m_new);
        let mut sum = 0f64;
        for b in 0..4 {
            let lo = exp8(_mm256_sub_ps(x[2 * b], mv));
            let hi = exp8(_mm256_sub_ps(x[2 * b + 1], mv));
            _mm256_storeu_ps(w.p[r].as_mut_ptr().add(16 * b), lo);
            _mm256_storeu_ps(w.p[r].as_mut_ptr().add(16 * b + 8), hi);
            sum += f64::from(fold16(lo, hi));
        }
        let s = &mut rows.s[items[r]];
        *s = (f64::from(*s) + sum) as f32;
    }
    if !w.live.contains(&true) {
        return;
    }
    let mut c = 0;
    while c < d {
        let lanes = (d - c).min(32);
        match lanes.div_ceil(8) {
            4 => v_avx2::<R, 4>(t, c, lanes, visible, &w),
            3 => v_avx2::<R, 3>(t, c, lanes, visible, &w),
            2 => v_avx2::<R, 2>(t, c, lanes, visible, &w),
            _ => v_avx2::<R, 1>(t, c, lanes, visible, &w),
        }
        c += lanes;
    }
}

/// [`v_avx512`] with 8-lane registers.
///
/// # Safety
/// As [`step_avx2`]; `c + lanes <= t.d`, `lanes` in `8 W - 7..=8 W`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn v_avx2<const R: usize, const W: usize>(
    t: &Tile<'_>,
    c: usize,
    lanes: usize,
    visible: usize,
    w: &Weights<R>,
) {
    let d = t.d;
    let full = _mm256_set1_epi32(-1);
    let tail = _mm256_cmpgt_epi32(
        _mm256_set1_epi32((lanes - 8 * (W - 1)) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let mask = |k: usize| if k + 1 < W { full } else { tail };
    let mut a = [[_mm256_setzero_ps(); W]; R];
    for r in 0..R {
        for (k, a) in a[r].iter_mut().enumerate() {
            let x = _mm256_maskload_ps(w.acc[r].add(c + 8 * k), mask(k));
            *a = match w.ms[r] {
                Some(ms) => _mm256_mul_ps(x, _mm256_set1_ps(ms)),
                None => x,
            };
        }
    }
    let vt = t.vt.as_ptr().add(c);
    for tk in 0..visible {
        let row = vt.add(tk * d);
        let mut v = [_mm256_setzero_ps(); W];
        for (k, v) in v.iter_mut().enumerate() {
            *v = _mm256_maskload_ps(row.add(8 * k), mask(k));
        }
        for r in 0..R {
            let p = _mm256_set1_ps(w.p[r][tk]);
            for k in 0..W {
                a[r][k] = _mm256_fmadd_ps(v[k], p, a[r][k]);
            }
        }
    }
    for r in 0..R {
        if !w.live[r] {
            continue;
        }
        for (k, &a) in a[r].iter().enumerate() {
            let a = if visible < TILE {
                _mm256_add_ps(a, _mm256_setzero_ps())
            } else {
                a
            };
            _mm256_maskstore_ps(w.acc[r].add(c + 8 * k), mask(k), a);
        }
    }
}
