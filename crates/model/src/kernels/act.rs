//! Activation rows quantized to Q8_0 / Q8_1 exactly as ggml's x86 `quantize_row_q8_0` and
//! `quantize_row_q8_1` do (AVX2 build): per block of 32, `amax = max |x|`, `d = amax / 127`,
//! `id = 127 / amax` (0 when `amax` is 0), `q = round_half_even(x * id)`, `d` stored as f16 and,
//! for Q8_1, `s = f16(d * sum(q))` with the unrounded `d`. candle's own quantizer differs (it
//! rounds half away from zero and scales by `1 / d`), which is why this module exists.
//!
//! Scales are kept as f32 values of the f16s, which is what the dot products consume.

use super::{Backend, BLOCK};

/// `m` quantized rows of `nb` blocks: `qs[i * nb + b]`, `d[i * nb + b]`, `s[i * nb + b]`.
#[derive(Debug, Default)]
pub(crate) struct Activations {
    pub qs: Vec<[i8; BLOCK]>,
    pub d: Vec<f32>,
    /// Empty unless the sums were asked for.
    pub s: Vec<f32>,
}

impl Activations {
    /// Quantizes `x: [m, nb * 32]`, reusing the buffers.
    pub fn quantize(&mut self, x: &[f32], m: usize, nb: usize, sums: bool, backend: Backend) {
        let n = m * nb;
        debug_assert_eq!(x.len(), n * BLOCK);
        self.qs.resize(n, [0; BLOCK]);
        self.d.resize(n, 0.0);
        self.s.resize(if sums { n } else { 0 }, 0.0);
        let s = sums.then_some(&mut self.s[..]);
        match backend {
            Backend::Scalar => quantize_scalar(x, &mut self.qs, &mut self.d, s),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 | Backend::Avx512 => {
                // SAFETY: both backends imply AVX2, FMA and F16C (checked by the caller).
                unsafe { quantize_avx2(x, &mut self.qs, &mut self.d, s) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => quantize_scalar(x, &mut self.qs, &mut self.d, s),
        }
    }
}

/// The f32 value of the nearest f16 (ties to even), as `GGML_CPU_FP32_TO_FP16` stores it.
#[inline]
pub(crate) fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Portable version; the same values as [`quantize_avx2`].
pub(crate) fn quantize_scalar(
    x: &[f32],
    qs: &mut [[i8; BLOCK]],
    d: &mut [f32],
    mut s: Option<&mut [f32]>,
) {
    for (b, (xb, q)) in x.chunks_exact(BLOCK).zip(qs.iter_mut()).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let db = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (qi, &v) in q.iter_mut().zip(xb) {
            *qi = (v * id).round_ties_even() as i8;
            sum += i32::from(*qi);
        }
        d[b] = round_f16(db);
        if let Some(s) = s.as_deref_mut() {
            s[b] = round_f16(db * sum as f32);
        }
    }
}

/// ggml's AVX2 `quantize_row_q8_1` (and, without the sums, `quantize_row_q8_0`).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_avx2(
    x: &[f32],
    qs: &mut [[i8; BLOCK]],
    d: &mut [f32],
    mut s: Option<&mut [f32]>,
) {
    use std::arch::x86_64::*;
    for (b, (xb, q)) in x.chunks_exact(BLOCK).zip(qs.iter_mut()).enumerate() {
        // SAFETY: `xb` holds 32 floats, `q` 32 bytes; unaligned loads and stores.
        unsafe {
            let p = xb.as_ptr();
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let sign = _mm256_set1_ps(-0.0);
            let mut max_abs = _mm256_andnot_ps(sign, v[0]);
            max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign, v[1]));
            max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign, v[2]));
            max_abs = _mm256_max_ps(max_abs, _mm256_andnot_ps(sign, v[3]));
            let mut max4 = _mm_max_ps(
                _mm256_extractf128_ps::<1>(max_abs),
                _mm256_castps256_ps128(max_abs),
            );
            max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
            max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
            let amax = _mm_cvtss_f32(max4);
            let db = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mul = _mm256_set1_ps(id);
            const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let i0 = _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[0], mul)));
            let i1 = _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[1], mul)));
            let i2 = _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[2], mul)));
            let i3 = _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[3], mul)));
            if let Some(s) = s.as_deref_mut() {
                let sum = hsum_i32_8(_mm256_add_epi32(
                    _mm256_add_epi32(i0, i1),
                    _mm256_add_epi32(i2, i3),
                ));
                s[b] = round_f16(db * sum as f32);
            }
            d[b] = round_f16(db);
            // Pack to i8; the packs work per 128-bit half, the permute restores the order.
            let lo = _mm256_packs_epi32(i0, i1);
            let hi = _mm256_packs_epi32(i2, i3);
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(lo, hi),
                _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
            );
            _mm256_storeu_si256(q.as_mut_ptr().cast(), bytes);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_i32_8(a: std::arch::x86_64::__m256i) -> i32 {
    use std::arch::x86_64::*;
    let sum128 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
    let hi64 = _mm_unpackhi_epi64(sum128, sum128);
    let sum64 = _mm_add_epi32(hi64, sum128);
    let hi32 = _mm_shuffle_epi32::<0b10_11_00_01>(sum64);
    _mm_cvtsi128_si32(_mm_add_epi32(sum64, hi32))
}
