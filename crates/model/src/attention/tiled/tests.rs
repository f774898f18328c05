//! Tests of the tiled kernel: every backend against a transliteration of the spec's C
//! reference, bits pinned against ggml, and the vector exp lane by lane.

use super::*;
use crate::attention::{flash_attention_into, AttnKernel};

/// `frand` of `scripts/ggml_fa_check/fa_check.c`: xorshift64, uniform in [-1, 1).
pub(crate) fn rng(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) & 0xff_ffff) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
    }
}

/// Query rows `[len][heads][d]` and a cache of `cells >= past + len` rows, drawn in the
/// order of the C program that produced [`ggml_bits_are_pinned`]'s hashes: all of `q`,
/// then per cell, kv head and value K then V.
#[allow(clippy::too_many_arguments)]
pub(crate) fn inputs(
    (heads, kv_heads, d): (usize, usize, usize),
    past: usize,
    len: usize,
    cells: usize,
    (qa, ka, va): (f32, f32, f32),
    seed: u64,
) -> (Vec<f32>, LayerKv, AttnShape) {
    let mut next = rng(seed);
    let q: Vec<f32> = (0..len * heads * d).map(|_| qa * next()).collect();
    let mut kv = LayerKv::default();
    for _ in 0..cells * kv_heads * d {
        kv.k.push(f16::from_f32(ka * next()));
        kv.v.push(f16::from_f32(va * next()));
    }
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim: d,
        past,
        scale: 1.0 / (d as f32).sqrt(),
        kernel: AttnKernel::Tiled,
    };
    (q, kv, shape)
}

/// Spec section 2.1's `row_tiled` (the C model verified against ggml), transliterated,
/// with the values of cells after the row's position read as 0.
fn row_tiled(q: &[f32], kv: &LayerKv, s: AttnShape, h: usize, pos: usize) -> Vec<f32> {
    let d = q.len();
    let stride = s.kv_heads * d;
    let offset = (h / (s.heads / s.kv_heads)) * d;
    let k = |j: usize, i: usize| kv.k[j * stride + offset + i].to_f32();
    let v = |j: usize, i: usize| kv.v[j * stride + offset + i].to_f32();
    let (mut m, mut sum_s) = (f32::NEG_INFINITY, 0f32);
    let mut acc = vec![0f32; d];
    for t0 in (0..=pos).step_by(64) {
        let mut kq = [0f32; 64];
        for (tk, kq) in kq.iter_mut().enumerate() {
            let j = t0 + tk;
            *kq = if j <= pos {
                let mut a = 0f32;
                for (i, &x) in q.iter().enumerate() {
                    a = k(j, i).mul_add(x, a);
                }
                a * s.scale + 0.0
            } else {
                f32::NEG_INFINITY
            };
        }
        let tmax = kq
            .iter()
            .fold(f32::NEG_INFINITY, |mx, &x| if mx > x { mx } else { x });
        if tmax == f32::NEG_INFINITY {
            continue;
        }
        let m_new = m.max(tmax);
        if m_new > m {
            let ms = (m - m_new).exp();
            acc.iter_mut().for_each(|a| *a *= ms);
            sum_s *= ms;
        }
        m = m_new;
        let mut sum = 0f64;
        for b in 0..4 {
            for x in &mut kq[16 * b..16 * b + 16] {
                *x = crate::numerics::expf(*x - m);
            }
            sum += f64::from(reduce16(&kq[16 * b..16 * b + 16]));
        }
        sum_s = (f64::from(sum_s) + sum) as f32;
        for (tk, &p) in kq.iter().enumerate() {
            let j = t0 + tk;
            for (i, a) in acc.iter_mut().enumerate() {
                let vv = if j <= pos { v(j, i) } else { 0.0 };
                *a = vv.mul_add(p, *a);
            }
        }
    }
    let inv = if sum_s == 0.0 { 0.0 } else { 1.0 / sum_s };
    acc.iter().map(|a| a * inv).collect()
}

fn reference(q: &[f32], kv: &LayerKv, s: AttnShape) -> Vec<f32> {
    let d = s.head_dim;
    let mut out = Vec::with_capacity(q.len());
    for (r, qh) in q.chunks_exact(d).enumerate() {
        let (i, h) = (r / s.heads, r % s.heads);
        out.extend(row_tiled(qh, kv, s, h, s.past + i));
    }
    out
}

fn tiled(backend: Backend, q: &[f32], kv: &LayerKv, s: AttnShape) -> Vec<f32> {
    let mut out = vec![f32::NAN; q.len()];
    flash_attention_tiled_into(backend, q, kv, s, &mut out);
    out
}

/// Index of the first value whose bits differ.
fn first_diff(a: &[f32], b: &[f32]) -> Option<usize> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
}

/// Every backend gives the bits of the spec's per-row C model: head sizes 64, 128 (SIMD),
/// 48, 80 (not multiples of 64), 72 and 36 (tails of the 16- and 8-lane registers),
/// grouped heads, a cached past, row counts crossing tile boundaries, and amplitudes large
/// enough that the maximum moves, weights underflow and the AVX2 exp takes its scalar lanes.
#[test]
fn every_backend_gives_the_reference_bits() {
    #[rustfmt::skip]
    let cases = [
        // (heads, kv_heads, d), past, len, (q, k, v amplitudes)
        ((9, 3, 64), 50, 100, (4.0, 4.0, 2.0)),
        ((9, 3, 64), 0, 1, (3.0, 3.0, 3.0)),
        ((9, 3, 64), 0, 130, (3.0, 3.0, 3.0)),
        ((4, 2, 128), 10, 70, (3.0, 3.0, 3.0)),
        ((6, 2, 48), 0, 130, (5.0, 5.0, 3.0)),
        ((4, 1, 80), 3, 66, (3.0, 3.0, 3.0)),
        ((3, 3, 72), 63, 2, (6.0, 6.0, 1.0)),
        ((2, 1, 36), 100, 40, (8.0, 8.0, 1.0)),
        ((9, 3, 64), 5, 200, (40.0, 30.0, 3.0)),
        ((2, 2, 64), 127, 65, (30.0, 30.0, 50.0)),
    ];
    for (n, (heads, past, len, amp)) in cases.into_iter().enumerate() {
        let (q, kv, s) = inputs(heads, past, len, past + len, amp, n as u64 + 1);
        let want = reference(&q, &kv, s);
        for backend in Backend::available() {
            let got = tiled(backend, &q, &kv, s);
            if let Some(at) = first_diff(&want, &got) {
                panic!(
                    "{backend:?}, heads {heads:?}, past {past}, len {len}: value {at} is {} not {}",
                    got[at], want[at]
                );
            }
        }
        // Through the kernel switch too.
        let mut got = vec![0f32; q.len()];
        flash_attention_into(Backend::detect(), &q, &kv, s, &mut got);
        assert_eq!(first_diff(&want, &got), None);
    }
}

/// Each row depends only on its own query and the keys up to its position: cutting the
/// rows into calls (as `attention_many` does) or handing over later cache rows changes
/// nothing.
#[test]
fn split_calls_and_later_cache_rows_give_the_same_bits() {
    let (d, heads) = (64, 4);
    let (q, kv, s) = inputs((heads, 2, d), 20, 150, 200, (5.0, 5.0, 2.0), 7);
    let row = heads * d;
    for backend in Backend::available() {
        let whole = tiled(backend, &q, &kv, s);
        let mut parts = Vec::new();
        for (r0, r1) in [(0, 1), (1, 44), (44, 107), (107, 150)] {
            let part = AttnShape {
                past: s.past + r0,
                ..s
            };
            parts.extend(tiled(backend, &q[r0 * row..r1 * row], &kv, part));
        }
        assert_eq!(first_diff(&whole, &parts), None, "{backend:?}");
    }
}

/// Close to the exact softmax attention (computed in f64) of the same f32 query and f16
/// keys and values.
#[test]
fn tiled_matches_an_f64_softmax() {
    let (heads, kv_heads, d, past, len) = (6, 2, 64, 30, 100);
    let (q, kv, s) = inputs(
        (heads, kv_heads, d),
        past,
        len,
        past + len,
        (4.0, 4.0, 3.0),
        3,
    );
    let stride = kv_heads * d;
    for backend in Backend::available() {
        let out = tiled(backend, &q, &kv, s);
        let mut worst = 0f64;
        for i in 0..len {
            for h in 0..heads {
                let qh = &q[(i * heads + h) * d..][..d];
                let off = (h / (heads / kv_heads)) * d;
                let scores: Vec<f64> = (0..=past + i)
                    .map(|j| {
                        let k = &kv.k[j * stride + off..][..d];
                        let dot: f64 = qh
                            .iter()
                            .zip(k)
                            .map(|(a, b)| f64::from(*a) * f64::from(b.to_f32()))
                            .sum();
                        dot * f64::from(s.scale)
                    })
                    .collect();
                let mx = scores.iter().copied().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = w.iter().sum();
                for c in 0..d {
                    let want: f64 = w
                        .iter()
                        .enumerate()
                        .map(|(j, w)| w / z * f64::from(kv.v[j * stride + off + c].to_f32()))
                        .sum();
                    let got = f64::from(out[(i * heads + h) * d + c]);
                    worst = worst.max((got - want).abs());
                }
            }
        }
        assert!(worst < 5e-3, "{backend:?}: off by {worst}");
        assert!(worst > 0.0);
    }
}

/// The signed-zero corner: a row whose accumulator is an exact -0 (a negative product
/// that underflowed) before its hidden keys leaves with +0, as the spec's definition reads
/// their values as +0.0 (`fma(+0, +0, -0) = +0`); skipping the hidden keys would give -0.
#[test]
fn hidden_keys_turn_a_negative_zero_accumulator_positive() {
    for d in [64, 20] {
        let mut q = vec![0f32; 2 * d];
        q[d] = 100.0;
        let mut kv = LayerKv {
            k: vec![f16::ZERO; 2 * d],
            v: vec![f16::ZERO; 2 * d],
        };
        // Row 1 (position 1): key 0 scores 125 with value +0, key 1 scores 30 (weight
        // e^-95, subnormal) with value -2^-24, whose product underflows to -0.
        kv.k[0] = f16::from_f32(10.0);
        kv.k[d] = f16::from_f32(2.4);
        kv.v[d..].fill(f16::from_bits(0x8001));
        let s = AttnShape {
            heads: 1,
            kv_heads: 1,
            head_dim: d,
            past: 0,
            scale: 0.125,
            kernel: AttnKernel::Tiled,
        };
        let want = reference(&q, &kv, s);
        assert!(want[d..].iter().all(|x| x.to_bits() == 0), "{want:?}");
        for backend in Backend::available() {
            let got = tiled(backend, &q, &kv, s);
            assert_eq!(first_diff(&want, &got), None, "{backend:?} d {d}: {got:?}");
        }
    }
}

/// FNV-1a over the bits of every value, in order.
pub(crate) fn fnv(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(x.to_bits())).wrapping_mul(0x100_0000_01b3)
    })
}

/// Output bits pinned against ggml itself: ggml-cpu's `flash_attn_ext` (the tiled path:
/// 64 query rows or more), built from the reference llama.cpp tree with the reference
/// flags as `scripts/ggml_fa_check/build.sh` does, run on these inputs (drawn in the same
/// order by a C program; the cache past `past + len` holds stale values up to ggml's
/// padded n_kv, which ggml reads with weight 0). The spec's C model gave the same hashes.
#[test]
fn ggml_bits_are_pinned() {
    #[rustfmt::skip]
    let cases = [
        ((9, 3, 64), 0, 76, (3.0, 3.0, 3.0), 0x2545_f491_4f6c_dd1d, 0xfcbb_12ab_10b7_efa8, [0xbf6b_c000, 0xbe3d_8a13]),
        ((9, 3, 64), 50, 100, (4.0, 4.0, 2.0), 0x9e37_79b9_7f4a_7c15, 0x2be2_083b_d537_ad2f, [0xbec7_bf98, 0x3e90_d5fb]),
        ((4, 2, 128), 10, 70, (3.0, 3.0, 3.0), 0x1234_5678_90ab_cdef, 0xf585_2f5e_9daa_672e, [0xbfb3_a634, 0xbfd3_c60d]),
        ((4, 1, 80), 3, 66, (3.0, 3.0, 3.0), 0x0bad_c0ff_ee0d_df00, 0x85b3_946e_5919_54fe, [0xbff4_2481, 0xbf36_71a4]),
        ((6, 2, 48), 0, 130, (5.0, 5.0, 3.0), 0x0005_deec_e66d, 0xa59b_560e_8dd7_3f7e, [0x3d14_c000, 0x3fa9_1124]),
        ((9, 3, 64), 5, 200, (40.0, 30.0, 3.0), 0xdead_beef_cafe_f00d, 0x3eaf_79e6_33fb_93ab, [0x400b_6000, 0x4012_8000]),
    ];
    for (heads, past, len, amp, seed, hash, ends) in cases {
        let (q, kv, s) = inputs(heads, past, len, past + len, amp, seed);
        for backend in Backend::available() {
            let out = tiled(backend, &q, &kv, s);
            let got_ends = [out[0].to_bits(), out[out.len() - 1].to_bits()];
            assert_eq!(
                got_ends, ends,
                "{backend:?} {heads:?} past {past} len {len}"
            );
            assert_eq!(
                fnv(&out),
                hash,
                "{backend:?} {heads:?} past {past} len {len}"
            );
        }
    }
}

/// Inputs for the vector exp: a fine sweep over every range the exponent takes (normal,
/// subnormal and zero results, overflow), the boundaries of the AVX2 fast path, specials
/// and random bit patterns.
fn exp_inputs() -> Vec<f32> {
    let mut xs: Vec<f32> = (-300_000..150_000).map(|i| i as f32 * 7.3e-4).collect();
    for n in [
        -193.0f32, -192.0, -150.0, -149.0, -127.0, -126.0, 127.0, 128.0, 192.0, 193.0,
    ] {
        let x0 = n * std::f32::consts::LN_2;
        let mut x = x0 - 0.01;
        while x < x0 + 0.01 {
            xs.push(x);
            x = f32::from_bits(x.to_bits().wrapping_add(if x < 0.0 { u32::MAX } else { 1 }));
            if x.to_bits() == 0x8000_0000 {
                x = 0.0;
            }
        }
    }
    xs.extend([
        0.0,
        -0.0,
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::MIN,
        f32::MAX,
    ]);
    xs.extend([f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 1e-30, -1e-30]);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..400_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        xs.push(f32::from_bits((seed >> 32) as u32));
    }
    xs
}

/// `numerics::expf`'s bits, or both NaN.
fn same_exp(x: f32, got: f32) -> bool {
    let want = crate::numerics::expf(x);
    want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan())
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exp_gives_the_scalar_bits_lane_by_lane() {
    use std::arch::x86_64::*;
    let xs = exp_inputs();
    let backends = Backend::available();
    if backends.contains(&Backend::Avx2) {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn run(x: &[f32]) -> [f32; 8] {
            let mut out = [0f32; 8];
            // SAFETY: `x` and `out` hold 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), simd::exp8(_mm256_loadu_ps(x.as_ptr()))) };
            out
        }
        for chunk in xs.chunks_exact(8) {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            let got = unsafe { run(chunk) };
            for (&x, &e) in chunk.iter().zip(&got) {
                assert!(same_exp(x, e), "AVX2 exp({x:e}) = {e:e}");
            }
        }
    }
    if backends.contains(&Backend::Avx512) {
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        fn run(x: &[f32]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: `x` and `out` hold 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), simd::exp16(_mm512_loadu_ps(x.as_ptr()))) };
            out
        }
        for chunk in xs.chunks_exact(16) {
            // SAFETY: the CPU has AVX-512 F, AVX2, FMA and F16C.
            let got = unsafe { run(chunk) };
            for (&x, &e) in chunk.iter().zip(&got) {
                assert!(same_exp(x, e), "AVX-512 exp({x:e}) = {e:e}");
            }
        }
    }
}

/// [`vector_exp_gives_the_scalar_bits_lane_by_lane`] over every f32 (about a minute).
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore = "slow: all 2^32 inputs"]
fn vector_exp_gives_the_scalar_bits_for_every_f32() {
    use std::arch::x86_64::*;
    let backends = Backend::available();
    #[target_feature(enable = "avx2,fma,f16c")]
    fn run8(x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: `x` and `out` hold 16 floats.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), simd::exp8(_mm256_loadu_ps(x.as_ptr())));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(8),
                simd::exp8(_mm256_loadu_ps(x.as_ptr().add(8))),
            );
        }
        out
    }
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn run16(x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: `x` and `out` hold 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), simd::exp16(_mm512_loadu_ps(x.as_ptr()))) };
        out
    }
    for hi in 0..1u64 << 28 {
        let x: [f32; 16] = std::array::from_fn(|l| f32::from_bits((hi << 4 | l as u64) as u32));
        let want = x.map(crate::numerics::expf);
        let ok = |got: [f32; 16]| {
            want.iter()
                .zip(&got)
                .all(|(w, g)| w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan()))
        };
        if backends.contains(&Backend::Avx2) {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            assert!(ok(unsafe { run8(&x) }), "AVX2 {x:?}");
        }
        if backends.contains(&Backend::Avx512) {
            // SAFETY: the CPU has AVX-512 F, AVX2, FMA and F16C.
            assert!(ok(unsafe { run16(&x) }), "AVX-512 {x:?}");
        }
    }
}
