//! The per-head attention loop ([`super::head_scalar`]) in AVX2 and AVX-512, bit-identical to
//! it: keys and values are widened from f16 with F16C (exact), the Q.K product runs in the
//! scalar definition's lanes (four 16-lane accumulators over 64-value steps, one FMA per value;
//! AVX2 holds each 16-lane accumulator in two registers) and is folded in its order, and the V
//! accumulator is rounded to f16 (`vcvtps2ph`, round to nearest even like `half`) after every
//! multiply and multiply-add, as the scalar loop rounds it. The softmax's `exp` stays scalar.
//!
//! Both need `head_dim % 64 == 0`; callers check the head lies inside the cache.

use super::{Head, OnlineSoftmax};
use std::arch::x86_64::*;

/// `vcvtps2ph` immediate: round to nearest even (exceptions stay masked, as by default).
const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT;

/// The scalar definition's fold of the 16 lanes `v` (as two 8-lane halves): `hi + lo`, then
/// the upper 4 + lower 4, then `(t0 + t2) + (t1 + t3)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn fold16(lo: __m256, hi: __m256) -> f32 {
    let t3 = _mm256_add_ps(hi, lo);
    let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    let t7 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
    _mm_cvtss_f32(_mm_add_ss(t7, _mm_movehdup_ps(t7)))
}

/// The unnormalised output of one head into `acc` (f16 values), returning its softmax's max
/// and sum.
///
/// `q` is the query rounded to f16 (held in f32).
///
/// # Safety
/// AVX2, FMA and F16C are available; `q.len() == acc.len()` is a multiple of 64; every key
/// and value row `j * stride + offset .. + head_dim` for `first <= j < keys` lies inside `k`
/// and `v`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn head_avx2(head: &Head<'_>, q: &[f32], acc: &mut [f32]) -> OnlineSoftmax {
    let d = q.len();
    let qp = q.as_ptr();
    let ap = acc.as_mut_ptr();
    acc.fill(0.0);
    let mut softmax = OnlineSoftmax::new();
    for ic in head.first..head.keys {
        let off = ic * head.stride + head.offset;
        let kp = head.k.as_ptr().add(off) as *const __m128i;
        // Lanes 0..8 and 8..16 of the four accumulators.
        let mut lo = [_mm256_setzero_ps(); 4];
        let mut hi = [_mm256_setzero_ps(); 4];
        for i in (0..d / 8).step_by(8) {
            for j in 0..4 {
                let (a, b) = (i + 2 * j, i + 2 * j + 1);
                let ka = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(a)));
                let kb = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(b)));
                let qa = _mm256_loadu_ps(qp.add(8 * a));
                let qb = _mm256_loadu_ps(qp.add(8 * b));
                lo[j] = _mm256_fmadd_ps(ka, qa, lo[j]);
                hi[j] = _mm256_fmadd_ps(kb, qb, hi[j]);
            }
        }
        let vlo = _mm256_add_ps(_mm256_add_ps(lo[0], lo[2]), _mm256_add_ps(lo[1], lo[3]));
        let vhi = _mm256_add_ps(_mm256_add_ps(hi[0], hi[2]), _mm256_add_ps(hi[1], hi[3]));
        // (The definition's f64 tail sum has nothing to add: no tail.)
        let score = fold16(vlo, vhi) * head.scale;
        let (rescale, vs) = softmax.push(score);
        if let Some(ms) = rescale {
            let s = _mm256_set1_ps(ms);
            for c in (0..d).step_by(8) {
                let a = _mm256_mul_ps(_mm256_loadu_ps(ap.add(c)), s);
                let a = _mm256_cvtph_ps(_mm256_cvtps_ph::<ROUND>(a));
                _mm256_storeu_ps(ap.add(c), a);
            }
        }
        let vp = head.v.as_ptr().add(off) as *const __m128i;
        let s = _mm256_set1_ps(vs);
        for c in (0..d).step_by(8) {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(c / 8)));
            let a = _mm256_fmadd_ps(v, s, _mm256_loadu_ps(ap.add(c)));
            let a = _mm256_cvtph_ps(_mm256_cvtps_ph::<ROUND>(a));
            _mm256_storeu_ps(ap.add(c), a);
        }
    }
    softmax
}

/// [`head_avx2`] with 16-lane registers.
///
/// # Safety
/// As [`head_avx2`], plus AVX-512 F.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn head_avx512(head: &Head<'_>, q: &[f32], acc: &mut [f32]) -> OnlineSoftmax {
    let d = q.len();
    let qp = q.as_ptr();
    let ap = acc.as_mut_ptr();
    acc.fill(0.0);
    let mut softmax = OnlineSoftmax::new();
    for ic in head.first..head.keys {
        let off = ic * head.stride + head.offset;
        let kp = head.k.as_ptr().add(off) as *const __m256i;
        let mut acc4 = [_mm512_setzero_ps(); 4];
        for i in (0..d / 16).step_by(4) {
            for (j, a) in acc4.iter_mut().enumerate() {
                let k = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(i + j)));
                let q = _mm512_loadu_ps(qp.add(16 * (i + j)));
                *a = _mm512_fmadd_ps(k, q, *a);
            }
        }
        let v = _mm512_add_ps(
            _mm512_add_ps(acc4[0], acc4[2]),
            _mm512_add_ps(acc4[1], acc4[3]),
        );
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let score = fold16(lo, hi) * head.scale;
        let (rescale, vs) = softmax.push(score);
        if let Some(ms) = rescale {
            let s = _mm512_set1_ps(ms);
            for c in (0..d).step_by(16) {
                let a = _mm512_mul_ps(_mm512_loadu_ps(ap.add(c)), s);
                let a = _mm512_cvtph_ps(_mm512_cvtps_ph::<ROUND>(a));
                _mm512_storeu_ps(ap.add(c), a);
            }
        }
        let vp = head.v.as_ptr().add(off) as *const __m256i;
        let s = _mm512_set1_ps(vs);
        for c in (0..d).step_by(16) {
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(c / 16)));
            let a = _mm512_fmadd_ps(v, s, _mm512_loadu_ps(ap.add(c)));
            let a = _mm512_cvtph_ps(_mm512_cvtps_ph::<ROUND>(a));
            _mm512_storeu_ps(ap.add(c), a);
        }
    }
    softmax
}
