//! Cached inference attention on the CPU: rotary embedding and flash attention over an f16 KV
//! cache, computed the way llama.cpp's CPU backend computes them, so that greedy outputs can be
//! checked token for token against it.
//!
//! - [`RopeTable`]: angles `p * base^(-2i/d) / factor_i` accumulated in f32 as ggml's rope cache
//!   does, `cos`/`sin` in f32, the rotation fused the way the reference build computes it.
//! - [`flash_attention`]: per query row and head, one pass over the cached keys with an online
//!   softmax and an f16 accumulator for V (ggml's `flash_attn_ext_f16_one_chunk`); the Q.K dot
//!   product sums in the order of ggml's AVX-512 `ggml_vec_dot_f16`.
//! - the per-head loop has a scalar definition and AVX2 / AVX-512 versions (`simd`), chosen at
//!   run time like the matmul kernels; they convert with F16C, multiply-add lane by lane in the
//!   same order and round the V accumulator to f16 at the same points, so all give the same
//!   bits (tested on random heads and on the model's outputs).

use crate::config::{ModelConfig, RopeLayout, RopeScaling};
use crate::kernels::Backend;
use crate::kv_cache::LayerKv;
use half::f16;

#[cfg(target_arch = "x86_64")]
mod simd;
mod tiled;

pub use tiled::flash_attention_tiled_into;

/// Which of ggml-cpu's flash-attention paths a call reproduces. llama.cpp picks per ubatch
/// (`Tiled` when it has 64 query rows or more, `SplitKv` for one row over a view of 512
/// cells or more); Plexus picks per position, from the prompt the sequence declared
/// ([`kernel_at`]), so any chunking gives the same bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttnKernel {
    /// `ggml_compute_forward_flash_attn_ext_f16_one_chunk`: f16 query and V accumulator, one
    /// key at a time.
    #[default]
    OneChunk,
    /// `ggml_compute_forward_flash_attn_ext_tiled`: f32 query, 64-key tiles, f32 accumulator.
    Tiled,
    /// ggml's split-KV path for a one-row ubatch over a cache view of [`SPLIT_KV_MIN_CELLS`]
    /// cells or more: the one-chunk kernel over each of [`LLAMA_THREADS`] key ranges of the
    /// view, the partial results merged in order (`ggml_flash_attn_ext_reduce_partials`).
    SplitKv,
}

/// The thread count of the llama.cpp whose split-KV decode Plexus reproduces. From position
/// 256 on, llama.cpp's decode splits the keys by its thread count, so its bits depend on it;
/// Plexus computes as `-t 2` (the setting of its recorded fixtures) on any machine.
pub const LLAMA_THREADS: usize = 2;
/// llama.cpp pads the KV cache view an ubatch attends over to a multiple of this many cells.
pub const LLAMA_KV_PAD: usize = 256;
/// Cells of that view from which a one-row ubatch takes the split-KV path.
pub const SPLIT_KV_MIN_CELLS: usize = 512;
/// The first position whose one-row ubatch llama.cpp computes on the split-KV path.
const SPLIT_KV_FROM: usize = SPLIT_KV_MIN_CELLS - LLAMA_KV_PAD;

/// The cells of llama.cpp's KV view when it computes position `p` of a sequence whose cache
/// holds positions `0..=p` (`n_kv`: at least one pad, rounded up to whole pads; llama.cpp's
/// `-c` is assumed to be a multiple of the pad above `p`).
pub const fn llama_kv_cells(p: usize) -> usize {
    let padded = (p + 1).div_ceil(LLAMA_KV_PAD) * LLAMA_KV_PAD;
    if padded > LLAMA_KV_PAD {
        padded
    } else {
        LLAMA_KV_PAD
    }
}

/// The kernel llama.cpp computes position `p` with, in a sequence whose latest prompt was fed
/// as the positions `prompt`: the prompt's rows in ubatches of 64 rows or more take the tiled
/// kernel ([`tiled_prompt_rows`]); a row alone in its ubatch (a decode step, or a prompt's last
/// ubatch of one row) takes the split-KV path once llama.cpp's view has 512 cells; every other
/// row the one-chunk kernel. Positions outside the prompt are decode steps.
pub fn kernel_at(prompt: &std::ops::Range<usize>, p: usize) -> AttnKernel {
    let alone = if prompt.contains(&p) {
        let n = prompt.len();
        if p - prompt.start < tiled_prompt_rows(n) {
            return AttnKernel::Tiled;
        }
        // Not tiled: in the last ubatch, alone when it has one row.
        n % LLAMA_UBATCH == 1
    } else {
        true
    };
    if alone && llama_kv_cells(p) >= SPLIT_KV_MIN_CELLS {
        AttnKernel::SplitKv
    } else {
        AttnKernel::OneChunk
    }
}

/// The positions where [`kernel_at`] for `prompt` may change (it is constant between them).
pub fn kernel_cuts(prompt: &std::ops::Range<usize>) -> [usize; 5] {
    [
        prompt.start,
        prompt.start + tiled_prompt_rows(prompt.len()),
        prompt.end.saturating_sub(1).max(prompt.start),
        prompt.end,
        SPLIT_KV_FROM,
    ]
}

/// The positions `from..to` cut into runs of one kernel each ([`kernel_at`]), in order.
pub fn kernel_runs(
    prompt: &std::ops::Range<usize>,
    from: usize,
    to: usize,
) -> Vec<(std::ops::Range<usize>, AttnKernel)> {
    let mut cuts: Vec<usize> = kernel_cuts(prompt)
        .into_iter()
        .filter(|&c| c > from && c < to)
        .collect();
    cuts.sort_unstable();
    cuts.push(to);
    let mut runs: Vec<(std::ops::Range<usize>, AttnKernel)> = Vec::new();
    let mut start = from;
    for end in cuts {
        if end <= start {
            continue;
        }
        let kernel = kernel_at(prompt, start);
        match runs.last_mut() {
            Some((r, k)) if *k == kernel => r.end = end,
            _ => runs.push((start..end, kernel)),
        }
        start = end;
    }
    runs
}

/// llama.cpp's default `n_ubatch`: a prompt is fed in ubatches of this many rows.
pub const LLAMA_UBATCH: usize = 512;
/// Rows from which a ubatch takes ggml's tiled kernel (`GGML_FA_TILE_Q`).
pub const TILED_MIN_ROWS: usize = 64;

/// How many leading rows of a prompt feed of `len` rows llama.cpp computes with the tiled
/// kernel: every whole ubatch of [`LLAMA_UBATCH`] rows, and the last partial one when it has
/// [`TILED_MIN_ROWS`] rows or more. Decode steps (one row) are never tiled.
pub const fn tiled_prompt_rows(len: usize) -> usize {
    let rest = len % LLAMA_UBATCH;
    if rest > 0 && rest < TILED_MIN_ROWS {
        len - rest
    } else {
        len
    }
}

/// Rotary embedding parameters in ggml's form.
#[derive(Clone, Debug)]
pub struct RopeTable {
    theta_scale: f32,
    /// Per-frequency divisors (llama3 scaling), one per rotated pair.
    factors: Vec<f32>,
    layout: RopeLayout,
    head_dim: usize,
}

impl RopeTable {
    pub fn new(cfg: &ModelConfig) -> Self {
        let half = cfg.head_dim / 2;
        let factors = match &cfg.rope_scaling {
            RopeScaling::None => vec![1.0; half],
            RopeScaling::Factors(f) => f.clone(),
            // The same divisors llama.cpp's converter writes as rope_freqs.weight.
            RopeScaling::Llama3(s) => {
                let old = s.original_max_position_embeddings as f64;
                let (low, high) = (old / s.low_freq_factor, old / s.high_freq_factor);
                (0..half)
                    .map(|i| {
                        let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high {
                            1.0
                        } else if wavelen > low {
                            s.factor as f32
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 / ((1.0 - smooth) / s.factor + smooth)) as f32
                        }
                    })
                    .collect()
            }
        };
        Self {
            theta_scale: (cfg.rope_theta as f32).powf(-2.0 / cfg.head_dim as f32),
            factors,
            layout: cfg.rope_layout,
            head_dim: cfg.head_dim,
        }
    }

    /// `(cos, sin)` of every pair at position `p`, each `head_dim / 2` long.
    pub fn angles(&self, p: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        let mut theta = p as f32;
        for &ff in &self.factors {
            let t = theta / ff;
            cos.push(t.cos());
            sin.push(t.sin());
            theta *= self.theta_scale;
        }
    }

    /// Rotates `x` (`[len][heads][head_dim]`) whose first row is at position `start`.
    pub fn apply(&self, x: &mut [f32], start: usize, heads: usize) {
        let d = self.head_dim;
        let half = d / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(half), Vec::with_capacity(half));
        for (row, chunk) in x.chunks_mut(heads * d).enumerate() {
            self.angles(start + row, &mut cos, &mut sin);
            for head in chunk.chunks_mut(d) {
                for i in 0..half {
                    let (a, b) = match self.layout {
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                        RopeLayout::HalfSplit => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    // The fused forms GCC contracts ggml's `x0*cos - x1*sin` and
                    // `x0*sin + x1*cos` into (bit-exact against llama.cpp's dump).
                    head[a] = x0.mul_add(cos[i], -(x1 * sin[i]));
                    head[b] = x0.mul_add(sin[i], x1 * cos[i]);
                }
            }
        }
    }
}

/// `sum_i x_i y_i` over f16 vectors, summed like ggml's AVX-512 `ggml_vec_dot_f16`: four
/// 16-lane f32 accumulators over 64-element steps, folded (0+2, 1+3, 0+1), then the 16 lanes
/// reduced as `_mm512_reduce_add_ps` does, the tail added in f64.
pub fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
    let n = x.len().min(y.len());
    let np = n - n % 64;
    let mut acc = [[0f32; 16]; 4];
    for i in (0..np).step_by(64) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, a) in lanes.iter_mut().enumerate() {
                let k = i + j * 16 + l;
                *a = x[k].to_f32().mul_add(y[k].to_f32(), *a);
            }
        }
    }
    let mut v = [0f32; 16];
    for l in 0..16 {
        v[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let mut sum = f64::from(reduce16(&v));
    for k in np..n {
        sum += f64::from(x[k].to_f32() * y[k].to_f32());
    }
    sum as f32
}

/// GCC's `_mm512_reduce_add_ps` over 16 lanes: `hi8 + lo8`, `hi4 + lo4`, `(0+2) + (1+3)`
/// (both kernels' scalar definitions fold 16 lanes this way).
fn reduce16(v: &[f32]) -> f32 {
    let mut t3 = [0f32; 8];
    for j in 0..8 {
        t3[j] = v[8 + j] + v[j];
    }
    let t6 = [t3[4] + t3[0], t3[5] + t3[1], t3[6] + t3[2], t3[7] + t3[3]];
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Cached positions before the first query row.
    pub past: usize,
    pub scale: f32,
    /// The kernel every row of the call takes.
    pub kernel: AttnKernel,
}

/// Causal attention of the query rows `q` (`[len][heads][head_dim]`, positions `past..`) over
/// the cached keys and values of `kv` (which already include these rows). Returns
/// `[len][heads][head_dim]`. Runs on the fastest backend this CPU has (or the one forced with
/// [`crate::kernels::with_backend`]); every backend gives the same bits.
pub fn flash_attention(q: &[f32], kv: &LayerKv, s: AttnShape) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    flash_attention_into(crate::kernels::current_backend(), q, kv, s, &mut out);
    out
}

/// [`flash_attention`] on `backend` (unsupported: scalar) into `out` (`q.len()` long).
pub fn flash_attention_into(
    backend: Backend,
    q: &[f32],
    kv: &LayerKv,
    s: AttnShape,
    out: &mut [f32],
) {
    if s.kernel == AttnKernel::Tiled {
        return flash_attention_tiled_into(backend, q, kv, s, out);
    }
    flash_attention_heads_into(backend, q, kv, s, 0..s.heads, out);
}

/// [`flash_attention_into`] for the query heads `heads` only, on the one-chunk or split-KV
/// path: `q` and `out` hold `[len][heads.len()][head_dim]`. Each head's output is the one
/// [`flash_attention_into`] gives it (threads may share a row's heads).
///
/// # Panics
/// On the tiled kernel (it computes every head of a tile together), or on heads outside
/// the shape.
pub fn flash_attention_heads_into(
    backend: Backend,
    q: &[f32],
    kv: &LayerKv,
    s: AttnShape,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
) {
    assert!(
        s.kernel != AttnKernel::Tiled && heads.end <= s.heads,
        "a subset of heads on the one-chunk or split-KV path"
    );
    let d = s.head_dim;
    let rep = s.heads / s.kv_heads;
    let row = s.kv_heads * d;
    let nh = heads.len();
    let len = q.len() / (nh * d).max(1);
    let kernel = HeadKernel::pick(backend, d);
    let mut q16 = vec![f16::ZERO; d];
    // The same query as f32 (exact): the SIMD loops multiply by it directly.
    let mut qf = vec![0f32; d];
    let mut acc = vec![0f32; d];
    // One key range's partial output (the split-KV path).
    let mut part = if s.kernel == AttnKernel::SplitKv {
        vec![0f32; d]
    } else {
        Vec::new()
    };
    for i in 0..len {
        let keys = s.past + i + 1;
        for (j, h) in heads.clone().enumerate() {
            let base = (i * nh + j) * d;
            for ((h16, hf), &x) in q16.iter_mut().zip(qf.iter_mut()).zip(&q[base..base + d]) {
                *h16 = f16::from_f32(x);
                *hf = h16.to_f32();
            }
            let head = Head {
                k: &kv.k,
                v: &kv.v,
                stride: row,
                offset: (h / rep) * d,
                first: 0,
                keys,
                scale: s.scale,
            };
            let inv = if s.kernel == AttnKernel::SplitKv {
                split_kv(kernel, &head, &q16, &qf, &mut part, &mut acc)
            } else {
                kernel.run(&head, &q16, &qf, &mut acc).inv_sum()
            };
            for (o, a) in out[base..base + d].iter_mut().zip(&acc) {
                *o = a * inv;
            }
        }
    }
}

/// ggml's split-KV path for one row and head (ops.cpp 9492-9520, then
/// `ggml_flash_attn_ext_reduce_partials`): llama.cpp's view of `llama_kv_cells(keys - 1)` cells
/// is cut into [`LLAMA_THREADS`] ranges of `ceil(cells / threads)` keys; the one-chunk kernel
/// runs on each (keys past the row's own are masked: a range holding none is skipped), and the
/// partial outputs (f16 accumulators read as f32), maxima and sums merge in range order:
/// `acc = fma(acc, exp(m - m'), part * exp(m_c - m'))`, `sum` likewise (GCC's contraction of
/// ggml's `a * b + c * d`, checked against ggml in `docs/design/llamacpp-tiled-attention.md`).
/// Leaves the merged unnormalised output in `acc` and returns `1 / sum` (0 for no key).
fn split_kv(
    kernel: HeadKernel,
    head: &Head<'_>,
    q16: &[f16],
    qf: &[f32],
    part: &mut [f32],
    acc: &mut [f32],
) -> f32 {
    let cells = llama_kv_cells(head.keys.max(1) - 1);
    let chunk = cells.div_ceil(LLAMA_THREADS);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    acc.fill(0.0);
    for t in 0..LLAMA_THREADS {
        let (first, end) = (t * chunk, ((t + 1) * chunk).min(head.keys));
        if first >= end {
            continue;
        }
        let range = Head {
            first,
            keys: end,
            ..*head
        };
        let c = kernel.run(&range, q16, qf, part);
        if c.sum == 0.0 {
            continue;
        }
        let new = max.max(c.max);
        let (old_scale, new_scale) = ((max - new).exp(), (c.max - new).exp());
        for (a, p) in acc.iter_mut().zip(part.iter()) {
            *a = a.mul_add(old_scale, p * new_scale);
        }
        sum = sum.mul_add(old_scale, c.sum * new_scale);
        max = new;
    }
    if sum == 0.0 {
        0.0
    } else {
        1.0 / sum
    }
}

/// One query head's keys and values: key `j` is `k[j * stride + offset..][..head_dim]`.
#[derive(Clone, Copy)]
pub(crate) struct Head<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub stride: usize,
    pub offset: usize,
    /// Keys attended to: `first..keys`.
    pub first: usize,
    pub keys: usize,
    pub scale: f32,
}

/// The per-head loop on one backend.
#[derive(Clone, Copy, Debug)]
enum HeadKernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl HeadKernel {
    /// The SIMD loops take whole 64-value steps of the head (every Llama-family head size).
    fn pick(backend: Backend, head_dim: usize) -> Self {
        let backend = if backend <= Backend::detect() {
            backend
        } else {
            Backend::Scalar
        };
        match backend {
            _ if !head_dim.is_multiple_of(64) => HeadKernel::Scalar,
            Backend::Scalar => HeadKernel::Scalar,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => HeadKernel::Avx2,
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => HeadKernel::Avx512,
            #[cfg(not(target_arch = "x86_64"))]
            _ => HeadKernel::Scalar,
        }
    }

    /// Leaves the head's unnormalised output (f16 values) in `acc` and returns its softmax's
    /// max and sum.
    fn run(self, head: &Head<'_>, q16: &[f16], qf: &[f32], acc: &mut [f32]) -> OnlineSoftmax {
        match self {
            HeadKernel::Scalar => head_scalar(head, q16, acc),
            // SAFETY: `pick` chose these only when the CPU has the features and `head_dim` is a
            // multiple of 64; `Head` indexes inside `k` and `v` (checked by the slicing below).
            #[cfg(target_arch = "x86_64")]
            HeadKernel::Avx2 => {
                head.check(q16.len());
                unsafe { simd::head_avx2(head, qf, acc) }
            }
            #[cfg(target_arch = "x86_64")]
            HeadKernel::Avx512 => {
                head.check(q16.len());
                unsafe { simd::head_avx512(head, qf, acc) }
            }
        }
    }
}

impl Head<'_> {
    /// # Panics
    /// If a key or value of the head lies outside the cache (the SIMD loops read unchecked).
    fn check(&self, d: usize) {
        let end = (self.keys.max(1) - 1) * self.stride + self.offset + d;
        assert!(
            self.keys == 0 || (end <= self.k.len() && end <= self.v.len()),
            "attention head outside the cache"
        );
    }
}

/// The definition (ggml's `flash_attn_ext_f16_one_chunk` for one row and head): one pass over
/// the keys with an online softmax; V accumulates in f16 (`acc` holds f16 values in f32).
fn head_scalar(head: &Head<'_>, q16: &[f16], acc: &mut [f32]) -> OnlineSoftmax {
    let d = q16.len();
    acc.fill(0.0);
    let mut softmax = OnlineSoftmax::new();
    for ic in head.first..head.keys {
        let off = ic * head.stride + head.offset;
        let score = dot_f16(&head.k[off..off + d], q16) * head.scale;
        let (rescale, vs) = softmax.push(score);
        if let Some(ms) = rescale {
            for a in acc.iter_mut() {
                *a = f16::from_f32(*a * ms).to_f32();
            }
        }
        for (a, v) in acc.iter_mut().zip(&head.v[off..off + d]) {
            *a = f16::from_f32(v.to_f32().mul_add(vs, *a)).to_f32();
        }
    }
    softmax
}

/// The running max and denominator of a softmax over scores seen one at a time, shared by the
/// scalar definition and the SIMD loops so all keep the same arithmetic: a score above the max
/// rescales what was accumulated by `exp(old - new)` and weighs its value 1; any other score
/// weighs its value `exp(score - max)`.
pub(crate) struct OnlineSoftmax {
    max: f32,
    sum: f32,
}

impl OnlineSoftmax {
    fn new() -> Self {
        Self {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }

    /// Takes the next key's score: the factor to rescale the accumulator by first, if any,
    /// and the weight of this key's value.
    #[inline]
    fn push(&mut self, score: f32) -> (Option<f32>, f32) {
        let (mut ms, mut vs) = (1f32, 1f32);
        let mut rescale = None;
        if score > self.max {
            let old = self.max;
            self.max = score;
            ms = (old - self.max).exp();
            rescale = Some(ms);
        } else {
            vs = (score - self.max).exp();
        }
        self.sum = self.sum.mul_add(ms, vs);
        (rescale, vs)
    }

    /// `1 / sum`, or 0 when no key was seen.
    fn inv_sum(&self) -> f32 {
        if self.sum == 0.0 {
            0.0
        } else {
            1.0 / self.sum
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Smooth deterministic inputs: `q_len` query values `qa * sin(0.7 i)` and `cells` cache
    /// rows of `row` values, keys `ka * sin(0.3 i)`, values `sin(0.5 i)`.
    fn sine_inputs(
        q_len: usize,
        cells: usize,
        row: usize,
        (qa, ka): (f32, f32),
    ) -> (Vec<f32>, LayerKv) {
        let f = |i: usize, s: f32| ((i as f32) * s).sin();
        let q = (0..q_len).map(|i| qa * f(i, 0.7)).collect();
        let kv = LayerKv {
            k: (0..cells * row)
                .map(|i| f16::from_f32(ka * f(i, 0.3)))
                .collect(),
            v: (0..cells * row).map(|i| f16::from_f32(f(i, 0.5))).collect(),
        };
        (q, kv)
    }

    #[test]
    fn dot_matches_plain_sum() {
        let x: Vec<f16> = (0..200)
            .map(|i| f16::from_f32((i as f32 * 0.37).sin()))
            .collect();
        let y: Vec<f16> = (0..200)
            .map(|i| f16::from_f32((i as f32 * 0.11).cos()))
            .collect();
        let plain: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| f64::from(a.to_f32() * b.to_f32()))
            .sum();
        assert!((f64::from(dot_f16(&x, &y)) - plain).abs() < 1e-4);
    }

    /// Every backend gives the scalar definition's bits: head sizes 64 and 128 (SIMD) and 48
    /// (scalar fallback), grouped heads, prompts after a cached past, and values large enough
    /// that the f16 accumulator rounds and the running maximum moves often.
    #[test]
    fn every_backend_gives_the_scalar_bits() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for (heads, kv_heads, d, past, len, amp, kernel) in [
            (9, 3, 64, 0, 37, 3.0, AttnKernel::OneChunk),
            (9, 3, 64, 50, 9, 12.0, AttnKernel::OneChunk),
            (4, 4, 128, 7, 20, 4.0, AttnKernel::OneChunk),
            (2, 1, 48, 3, 5, 2.0, AttnKernel::OneChunk),
            (3, 1, 64, 0, 1, 30.0, AttnKernel::OneChunk),
            (9, 3, 64, 300, 2, 12.0, AttnKernel::SplitKv),
            (4, 4, 128, 511, 3, 4.0, AttnKernel::SplitKv),
            (2, 1, 48, 256, 1, 2.0, AttnKernel::SplitKv),
            (3, 1, 64, 0, 1, 30.0, AttnKernel::SplitKv),
        ] {
            let total = past + len;
            let q: Vec<f32> = (0..len * heads * d).map(|_| amp * next()).collect();
            let kv = LayerKv {
                k: (0..total * kv_heads * d)
                    .map(|_| f16::from_f32(amp * next()))
                    .collect(),
                v: (0..total * kv_heads * d)
                    .map(|_| f16::from_f32(100.0 * next()))
                    .collect(),
            };
            let shape = AttnShape {
                heads,
                kv_heads,
                head_dim: d,
                past,
                scale: 1.0 / (d as f32).sqrt(),
                kernel,
            };
            let mut want = vec![0f32; q.len()];
            flash_attention_into(Backend::Scalar, &q, &kv, shape, &mut want);
            for backend in Backend::available() {
                let mut got = vec![f32::NAN; q.len()];
                flash_attention_into(backend, &q, &kv, shape, &mut got);
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{backend:?}, {kernel:?}, heads {heads}/{kv_heads}, d {d}, past {past}"
                );
            }
        }
    }

    /// The split-KV path computes the same attention (within f16 rounding of the two
    /// partial accumulators) with other bits: the merge is not a no-op.
    #[test]
    fn split_kv_stays_close_to_one_chunk_with_other_bits() {
        let (heads, kv_heads, d, past) = (4, 2, 64, 400);
        let (q, kv) = sine_inputs(heads * d, past + 1, kv_heads * d, (2.0, 1.0));
        let shape = |kernel| AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            past,
            scale: 1.0 / (d as f32).sqrt(),
            kernel,
        };
        let one = flash_attention(&q, &kv, shape(AttnKernel::OneChunk));
        let split = flash_attention(&q, &kv, shape(AttnKernel::SplitKv));
        for (a, b) in one.iter().zip(&split) {
            assert!((a - b).abs() <= 2e-3 * (1.0 + a.abs()), "{a} vs {b}");
        }
        assert!(one
            .iter()
            .zip(&split)
            .any(|(a, b)| a.to_bits() != b.to_bits()));
    }

    /// Output bits of ggml-cpu's own split-KV path (one query row, a view of 512 or 768
    /// cells, 2 threads), printed by `scripts/ggml_fa_check/split_pin.c` built against the
    /// reference llama.cpp on the same inputs: every backend gives them, the one-chunk kernel
    /// does not.
    #[test]
    fn split_kv_bits_are_pinned_against_ggml() {
        use tiled::tests::{fnv, inputs};
        #[rustfmt::skip]
        let cases = [
            ((9, 3, 64), 300, (3.0, 3.0, 3.0), 0x2545_f491_4f6c_dd1d, 0xca12_7efa_4a93_9c4b, [0xbdf4_15e7, 0x3ff4_5af2]),
            ((9, 3, 64), 256, (4.0, 4.0, 2.0), 0x9e37_79b9_7f4a_7c15, 0x1f9b_b78c_22e4_2965, [0xbf3a_4d7d, 0xbd66_a42f]),
            ((9, 3, 64), 511, (40.0, 30.0, 3.0), 0xdead_beef_cafe_f00d, 0x1206_aa54_f6c7_d53c, [0x3f90_a000, 0x4028_0000]),
            ((9, 3, 64), 700, (6.0, 6.0, 3.0), 0x1234_5678_90ab_cdef, 0x3da7_098e_92fc_99dc, [0xbc05_a5e4, 0x3d3a_40ca]),
            ((4, 2, 128), 600, (3.0, 3.0, 3.0), 0x0bad_c0ff_ee0d_df00, 0x89f4_4212_1b89_dc97, [0xbf17_b193, 0x3e33_b79b]),
        ];
        for (heads, past, amps, seed, hash, ends) in cases {
            // The tiled kernel's pinned inputs, drawn the same way (one row, `past + 1` cells).
            let (q, kv, s) = inputs(heads, past, 1, past + 1, amps, seed);
            let shape = |kernel| AttnShape { kernel, ..s };
            for backend in Backend::available() {
                let mut out = vec![f32::NAN; q.len()];
                flash_attention_into(backend, &q, &kv, shape(AttnKernel::SplitKv), &mut out);
                let got_ends = [out[0].to_bits(), out[out.len() - 1].to_bits()];
                assert_eq!(got_ends, ends, "{backend:?} past {past}");
                assert_eq!(fnv(&out), hash, "{backend:?} past {past}");
                flash_attention_into(backend, &q, &kv, shape(AttnKernel::OneChunk), &mut out);
                assert_ne!(
                    fnv(&out),
                    hash,
                    "{backend:?} past {past}: one-chunk gives them too"
                );
            }
        }
    }

    /// Heads computed in subsets (as threads share a decode row) give the bits of the whole.
    #[test]
    fn heads_in_subsets_give_the_whole_rows_bits() {
        let (heads, kv_heads, d, past, len) = (9, 3, 64, 300, 2);
        let (q, kv) = sine_inputs(len * heads * d, past + len, kv_heads * d, (3.0, 2.0));
        for kernel in [AttnKernel::OneChunk, AttnKernel::SplitKv] {
            let s = AttnShape {
                heads,
                kv_heads,
                head_dim: d,
                past,
                scale: 0.125,
                kernel,
            };
            let whole = flash_attention(&q, &kv, s);
            for backend in Backend::available() {
                for i in 0..len {
                    let row = AttnShape {
                        past: past + i,
                        ..s
                    };
                    for hs in [0..4, 4..9, 2..3] {
                        let qs = &q[(i * heads + hs.start) * d..(i * heads + hs.end) * d];
                        let mut got = vec![f32::NAN; qs.len()];
                        flash_attention_heads_into(backend, qs, &kv, row, hs.clone(), &mut got);
                        let want = &whole[(i * heads + hs.start) * d..(i * heads + hs.end) * d];
                        assert!(
                            got.iter()
                                .zip(want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{backend:?} {kernel:?} row {i} heads {hs:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_follow_llama_cpp_ubatches() {
        use AttnKernel::{OneChunk, SplitKv, Tiled};
        for (p, cells) in [(0, 256), (255, 256), (256, 512), (511, 512), (512, 768)] {
            assert_eq!(llama_kv_cells(p), cells, "position {p}");
        }
        for (prompt, p, kernel) in [
            // Short prompt: one-chunk, decode steps split from 256.
            (0..10, 5, OneChunk),
            (0..10, 10, OneChunk),
            (0..10, 255, OneChunk),
            (0..10, 256, SplitKv),
            // Nothing declared: every position a decode step.
            (0..0, 0, OneChunk),
            (0..0, 300, SplitKv),
            // A one-token prompt is alone in its ubatch.
            (0..1, 0, OneChunk),
            (300..301, 300, SplitKv),
            // Tiled prompts, then decode.
            (0..100, 0, Tiled),
            (0..100, 99, Tiled),
            (0..100, 100, OneChunk),
            (0..300, 299, Tiled),
            (0..300, 300, SplitKv),
            // A last ubatch of one row: split; of 28 rows: one-chunk.
            (0..513, 511, Tiled),
            (0..513, 512, SplitKv),
            (0..513, 513, SplitKv),
            (0..540, 512, OneChunk),
            (0..540, 539, OneChunk),
            (0..540, 540, SplitKv),
        ] {
            assert_eq!(
                kernel_at(&prompt, p),
                kernel,
                "prompt {prompt:?}, position {p}"
            );
        }
        assert_eq!(
            kernel_runs(&(0..540), 500, 545),
            vec![(500..512, Tiled), (512..540, OneChunk), (540..545, SplitKv)]
        );
        assert_eq!(
            kernel_runs(&(0..0), 250, 260),
            vec![(250..256, OneChunk), (256..260, SplitKv)]
        );
        assert_eq!(kernel_runs(&(0..0), 7, 7), vec![]);
        // Runs cover the positions in order, each with the kernel of every position in it.
        for prompt in [0..0, 0..1, 0..70, 5..69, 0..513, 0..540, 0..1100, 200..264] {
            for (from, to) in [
                (0, 1200),
                (0, 1),
                (255, 257),
                (63, 65),
                (511, 514),
                (530, 600),
            ] {
                let runs = kernel_runs(&prompt, from, to);
                let mut at = from;
                for (r, k) in &runs {
                    assert_eq!(r.start, at);
                    assert!(r.end > r.start);
                    assert!(
                        r.clone().all(|p| kernel_at(&prompt, p) == *k),
                        "{prompt:?} {r:?}"
                    );
                    at = r.end;
                }
                assert_eq!(at, to, "{prompt:?} {from}..{to}");
            }
        }
    }

    #[test]
    fn attention_matches_softmax_reference() {
        let (heads, kv_heads, d, len) = (4, 2, 8, 5);
        let (q, kv) = sine_inputs(len * heads * d, len, kv_heads * d, (1.0, 1.0));
        let scale = 1.0 / (d as f32).sqrt();
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            past: 0,
            scale,
            kernel: AttnKernel::OneChunk,
        };
        let out = flash_attention(&q, &kv, shape);
        for i in 0..len {
            for h in 0..heads {
                let qh = &q[(i * heads + h) * d..][..d];
                let kvh = h / (heads / kv_heads);
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &kv.k[(j * kv_heads + kvh) * d..][..d];
                        qh.iter()
                            .zip(k)
                            .map(|(a, b)| f64::from(*a) * f64::from(b.to_f32()))
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = w.iter().sum();
                for c in 0..d {
                    let want: f64 = (0..=i)
                        .map(|j| w[j] / z * f64::from(kv.v[(j * kv_heads + kvh) * d + c].to_f32()))
                        .sum();
                    let got = f64::from(out[(i * heads + h) * d + c]);
                    assert!(
                        (got - want).abs() < 5e-3,
                        "row {i} head {h} dim {c}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
