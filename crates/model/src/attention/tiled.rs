//! ggml-cpu's tiled flash attention (`ggml_compute_forward_flash_attn_ext_tiled`), which
//! llama.cpp runs for ubatches of 64 query rows or more: the query stays f32, keys and values
//! are widened to f32, each score is one sequential FMA chain, the softmax moves 64 keys at a
//! time (tile maximum, libm `expf` for the rescale, ggml's vector exp for the weights, the
//! tile's weight sum in f64) and V accumulates in f32. Every output row depends only on its
//! own query row, so the arithmetic is defined per (row, head); see
//! `docs/design/llamacpp-tiled-attention.md` for the derivation and its check against ggml.
//!
//! Structure (spec section 4.1): per kv head and per 64-key tile the keys (transposed) and
//! values are widened once and used by every query head of the group and every row that sees
//! the tile; each (row, head) keeps its running max and sum, and `out` is its accumulator.
//! The per-(row, head, tile) step has a scalar definition ([`step_scalar`]) and AVX2 / AVX-512
//! versions (`simd`) that run the same operations lane by lane: scores vectorised over keys
//! (each lane one FMA chain over the head), weights by a vector port of
//! [`crate::numerics::expf`], V vectorised over the head (each lane one FMA chain over keys).
//! A few (row, head) pairs (2 on AVX2, 4 on AVX-512) go through a step together, sharing the
//! loads of the tile and keeping more independent FMA chains in flight.
//!
//! Keys after a row's position: score -INF, weight +0, value read as +0.0 (ggml reads whatever
//! the cell holds; with weight 0 that can only change the sign of an exactly zero accumulator).
//! The steps run the V chain over the visible keys only and then add +0.0 once, which is the
//! same thing: `fma(+0, +0, a) = a + 0`, and adding +0 twice is adding it once.

use super::AttnShape;
use crate::kernels::Backend;
use crate::kv_cache::LayerKv;
use half::f16;

/// Keys per tile (`GGML_FA_TILE_KV`); tiles start at position 0.
const TILE: usize = 64;

/// [`super::flash_attention`] as ggml's tiled kernel computes it, on `backend` (unsupported:
/// scalar), into `out` (`q.len()` long). Same inputs and layout: `q` is `[len][heads][head_dim]`
/// after RoPE (not rounded), `kv` holds at least rows `0..past + len` (later rows are ignored).
/// Every backend gives the same bits.
///
/// # Panics
/// If `out` is shorter than `q` or `kv` lacks rows `0..past + len`.
pub fn flash_attention_tiled_into(
    backend: Backend,
    q: &[f32],
    kv: &LayerKv,
    s: AttnShape,
    out: &mut [f32],
) {
    let d = s.head_dim;
    let rep = s.heads / s.kv_heads;
    let stride = s.kv_heads * d;
    let len = q.len() / (s.heads * d);
    let rows = len * s.heads;
    let cells = s.past + len;
    let (q, out) = (&q[..rows * d], &mut out[..rows * d]);
    assert!(
        kv.k.len() >= cells * stride && kv.v.len() >= cells * stride,
        "attention rows outside the cache"
    );
    let kernel = Kernel::pick(backend);
    out.fill(0.0);
    let mut state = Rows {
        q,
        acc: out,
        m: vec![f32::NEG_INFINITY; rows],
        s: vec![0f32; rows],
        d,
    };
    let mut kt = vec![0f32; d * TILE];
    let mut vt = vec![0f32; TILE * d];
    let mut krow = vec![0f32; d];
    let mut items = Vec::with_capacity(rows);
    for g in 0..s.kv_heads {
        let group = g * rep..(g + 1) * rep;
        for t0 in (0..cells).step_by(TILE) {
            let present = (cells - t0).min(TILE);
            let base = t0 * stride + g * d;
            kernel.pack(kv, base, stride, present, &mut krow, &mut kt, &mut vt);
            let tile = Tile {
                kt: &kt,
                vt: &vt,
                d,
                scale: s.scale,
            };
            // Rows whose position lies inside the tile see only part of it ...
            let first = t0.saturating_sub(s.past);
            let whole = (t0 + TILE - 1).saturating_sub(s.past).min(len);
            for i in first..whole {
                items.clear();
                items.extend(group.clone().map(|h| i * s.heads + h));
                kernel.steps(&tile, s.past + i + 1 - t0, &items, &mut state);
            }
            // ... the later ones all of it.
            items.clear();
            items.extend(
                (whole.max(first)..len).flat_map(|i| group.clone().map(move |h| i * s.heads + h)),
            );
            kernel.steps(&tile, TILE, &items, &mut state);
        }
    }
    for (acc, &sum) in state.acc.chunks_exact_mut(d).zip(&state.s) {
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        acc.iter_mut().for_each(|a| *a *= inv);
    }
}

/// One packed KV tile of one kv head.
struct Tile<'a> {
    /// The keys transposed, `[d][64]`, widened to f32; absent cells 0.
    kt: &'a [f32],
    /// The values, `[64][d]`, widened to f32; absent cells 0.
    vt: &'a [f32],
    d: usize,
    scale: f32,
}

/// The query rows of a call and each (row, head)'s softmax state; row `r` (= `i * heads + h`)
/// is `q[r * d..][..d]`, its accumulator `acc[r * d..][..d]`.
struct Rows<'a> {
    q: &'a [f32],
    acc: &'a mut [f32],
    m: Vec<f32>,
    s: Vec<f32>,
    d: usize,
}

/// The tile step on one backend.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// (row, head) pairs an AVX2 step takes together (more independent FMA chains in flight).
#[cfg(target_arch = "x86_64")]
const AVX2_ROWS: usize = 2;
/// (row, head) pairs an AVX-512 step takes together.
#[cfg(target_arch = "x86_64")]
const AVX512_ROWS: usize = 4;

impl Kernel {
    fn pick(backend: Backend) -> Self {
        let backend = if backend <= Backend::detect() {
            backend
        } else {
            Backend::Scalar
        };
        match backend {
            Backend::Scalar => Kernel::Scalar,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => Kernel::Avx2,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => Kernel::Avx512,
            #[cfg(not(target_arch = "x86_64"))]
            _ => Kernel::Scalar,
        }
    }

    /// Widens the tile's `present` cells (cell `tk` at `k[base + tk * stride..][..d]`) into
    /// `kt` (transposed, through the scratch row `krow`) and `vt`; absent cells become 0.
    #[allow(clippy::too_many_arguments)]
    fn pack(
        self,
        kv: &LayerKv,
        base: usize,
        stride: usize,
        present: usize,
        krow: &mut [f32],
        kt: &mut [f32],
        vt: &mut [f32],
    ) {
        let d = krow.len();
        kt.fill(0.0);
        vt[present * d..].fill(0.0);
        for tk in 0..present {
            let cell = base + tk * stride;
            widen(self, &kv.k[cell..][..d], krow);
            for (dk, &x) in krow.iter().enumerate() {
                kt[dk * TILE + tk] = x;
            }
            widen(self, &kv.v[cell..][..d], &mut vt[tk * d..][..d]);
        }
    }

    /// Runs the step of the tile for the (row, head) pairs `items`, which all see its first
    /// `visible` keys.
    fn steps(self, t: &Tile<'_>, visible: usize, items: &[usize], rows: &mut Rows<'_>) {
        assert!(
            (1..=TILE).contains(&visible)
                && t.kt.len() == t.d * TILE
                && t.vt.len() == TILE * t.d
                && rows.q.len() == rows.m.len() * t.d
                && rows.acc.len() == rows.q.len()
                && rows.s.len() == rows.m.len()
                && rows.d == t.d
                && items.iter().all(|&r| r < rows.m.len()),
            "tile step outside its buffers"
        );
        match self {
            Kernel::Scalar => items.iter().for_each(|&r| step_scalar(t, visible, r, rows)),
            // SAFETY: `pick` chose these only when the CPU has the features; the assert above
            // checked `visible` and that the tile and every row lie inside their buffers.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe {
                let mut groups = items.chunks_exact(AVX2_ROWS);
                for g in &mut groups {
                    let g = std::array::from_fn(|k| g[k]);
                    simd::step_avx2::<AVX2_ROWS>(t, visible, g, rows);
                }
                for &r in groups.remainder() {
                    simd::step_avx2::<1>(t, visible, [r], rows);
                }
            },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe {
                let mut groups = items.chunks_exact(AVX512_ROWS);
                for g in &mut groups {
                    let g = std::array::from_fn(|k| g[k]);
                    simd::step_avx512::<AVX512_ROWS>(t, visible, g, rows);
                }
                match *groups.remainder() {
                    [a, b, c] => simd::step_avx512::<3>(t, visible, [a, b, c], rows),
                    [a, b] => simd::step_avx512::<2>(t, visible, [a, b], rows),
                    [a] => simd::step_avx512::<1>(t, visible, [a], rows),
                    _ => {}
                }
            },
        }
    }
}

/// f16 -> f32 (exact), with F16C when the kernel may use it.
fn widen(kernel: Kernel, src: &[f16], dst: &mut [f32]) {
    match kernel {
        // SAFETY: the kernel was picked only when the CPU has F16C.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 | Kernel::Avx512 => unsafe { simd::widen(src, dst) },
        _ => dst.iter_mut().zip(src).for_each(|(y, x)| *y = x.to_f32()),
    }
}

/// The definition: one KV tile for one (row, head) `r` that sees the tile's first `visible`
/// (1..=64) keys (spec section 2.1, `row_tiled`'s loop body; the V chain over the hidden keys,
/// whose values are read as +0.0, is the `+ 0.0` at the end, see the module docs).
fn step_scalar(t: &Tile<'_>, visible: usize, r: usize, rows: &mut Rows<'_>) {
    let d = t.d;
    let q = &rows.q[r * d..][..d];
    let mut p = [f32::NEG_INFINITY; TILE];
    for (tk, pk) in p.iter_mut().enumerate().take(visible) {
        let mut a = 0f32;
        for (dk, &x) in q.iter().enumerate() {
            a = t.kt[dk * TILE + tk].mul_add(x, a);
        }
        *pk = a * t.scale + 0.0;
    }
    let tile_max = p
        .iter()
        .fold(f32::NEG_INFINITY, |mx, &x| if mx > x { mx } else { x });
    if tile_max == f32::NEG_INFINITY {
        return; // (only if every visible score overflowed to -inf)
    }
    let acc = &mut rows.acc[r * d..][..d];
    let (m, s) = (&mut rows.m[r], &mut rows.s[r]);
    let m_new = m.max(tile_max);
    if m_new > *m {
        let ms = (*m - m_new).exp();
        acc.iter_mut().for_each(|a| *a *= ms);
        *s *= ms;
    }
    *m = m_new;
    let mut sum = 0f64;
    for block in p.chunks_mut(16) {
        block
            .iter_mut()
            .for_each(|x| *x = crate::numerics::expf(*x - m_new));
        sum += f64::from(reduce16(block));
    }
    *s = (f64::from(*s) + sum) as f32;
    for (tk, &pk) in p.iter().enumerate().take(visible) {
        for (a, &v) in acc.iter_mut().zip(&t.vt[tk * d..][..d]) {
            *a = v.mul_add(pk, *a);
        }
    }
    if visible < TILE {
        // The hidden keys' `fma(+0.0, +0.0, a)`.
        acc.iter_mut().for_each(|a| *a += 0.0);
    }
}

/// GCC's `_mm512_reduce_add_ps` over 16 lanes: `hi8 + lo8`, `hi4 + lo4`, `(0+2) + (1+3)`.
fn reduce16(v: &[f32]) -> f32 {
    let mut t3 = [0f32; 8];
    for j in 0..8 {
        t3[j] = v[8 + j] + v[j];
    }
    let t6 = [t3[4] + t3[0], t3[5] + t3[1], t3[6] + t3[2], t3[7] + t3[3]];
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// The tile step in AVX2 and AVX-512, bit-identical to [`step_scalar`] lane by lane.
// The steps index several per-(row, head) arrays (`[_; R]`) by the same `r`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod simd {
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

    /// The scalar definition's fold of 16 lanes (as two 8-lane halves): `hi + lo`, then the
    /// upper 4 + lower 4, then `(t0 + t2) + (t1 + t3)` (GCC's `_mm512_reduce_add_ps`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fold16(lo: __m256, hi: __m256) -> f32 {
        let t3 = _mm256_add_ps(hi, lo);
        let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
        let t7 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
        _mm_cvtss_f32(_mm_add_ss(t7, _mm_movehdup_ps(t7)))
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{flash_attention_into, AttnKernel};

    /// `frand` of `scripts/ggml_fa_check/fa_check.c`: xorshift64, uniform in [-1, 1).
    fn rng(mut seed: u64) -> impl FnMut() -> f32 {
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
    fn inputs(
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
    fn fnv(values: &[f32]) -> u64 {
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
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), simd::exp8(_mm256_loadu_ps(x.as_ptr())))
                };
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
                unsafe {
                    _mm512_storeu_ps(out.as_mut_ptr(), simd::exp16(_mm512_loadu_ps(x.as_ptr())))
                };
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
}
