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

use super::{reduce16, AttnShape};
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

/// The tile step in AVX2 and AVX-512, bit-identical to [`step_scalar`] lane by lane.
#[cfg(target_arch = "x86_64")]
mod simd;

#[cfg(test)]
pub(super) mod tests;
