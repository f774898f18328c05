//! Cached inference attention on the CPU: rotary embedding and flash attention over an f16 KV
//! cache, computed the way llama.cpp's CPU backend computes them, so that greedy outputs can be
//! checked token for token against it.
//!
//! - [`RopeTable`]: angles `p * base^(-2i/d) / factor_i` accumulated in f32 as ggml's rope cache
//!   does, `cos`/`sin` in f32, the rotation fused the way the reference build computes it.
//! - [`flash_attention`]: per query row and head, one pass over the cached keys with an online
//!   softmax and an f16 accumulator for V (ggml's `flash_attn_ext_f16_one_chunk`); the Q.K dot
//!   product sums in the order of ggml's AVX-512 `ggml_vec_dot_f16`.

use crate::config::{ModelConfig, RopeLayout, RopeScaling};
use crate::kv_cache::LayerKv;
use half::f16;

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
    let mut t3 = [0f32; 8];
    for j in 0..8 {
        t3[j] = v[8 + j] + v[j];
    }
    let t6 = [t3[4] + t3[0], t3[5] + t3[1], t3[6] + t3[2], t3[7] + t3[3]];
    let mut sum = f64::from((t6[0] + t6[2]) + (t6[1] + t6[3]));
    for k in np..n {
        sum += f64::from(x[k].to_f32() * y[k].to_f32());
    }
    sum as f32
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
}

/// Causal attention of the query rows `q` (`[len][heads][head_dim]`, positions `past..`) over
/// the cached keys and values of `kv` (which already include these rows). Returns
/// `[len][heads][head_dim]`.
pub fn flash_attention(q: &[f32], kv: &LayerKv, s: AttnShape) -> Vec<f32> {
    let d = s.head_dim;
    let rep = s.heads / s.kv_heads;
    let row = s.kv_heads * d;
    let len = q.len() / (s.heads * d);
    let mut out = vec![0f32; q.len()];
    let mut q16 = vec![f16::ZERO; d];
    let mut acc = vec![f16::ZERO; d];
    for i in 0..len {
        let pos = s.past + i;
        for h in 0..s.heads {
            let base = (i * s.heads + h) * d;
            for (dst, &x) in q16.iter_mut().zip(&q[base..base + d]) {
                *dst = f16::from_f32(x);
            }
            acc.fill(f16::ZERO);
            let kvh = h / rep;
            let (mut m, mut sum) = (f32::NEG_INFINITY, 0f32);
            for ic in 0..=pos {
                let off = ic * row + kvh * d;
                let score = dot_f16(&kv.k[off..off + d], &q16) * s.scale;
                let (mut ms, mut vs) = (1f32, 1f32);
                if score > m {
                    let old = m;
                    m = score;
                    ms = (old - m).exp();
                    for a in acc.iter_mut() {
                        *a = f16::from_f32(a.to_f32() * ms);
                    }
                } else {
                    vs = (score - m).exp();
                }
                for (a, v) in acc.iter_mut().zip(&kv.v[off..off + d]) {
                    *a = f16::from_f32(v.to_f32().mul_add(vs, a.to_f32()));
                }
                sum = sum.mul_add(ms, vs);
            }
            let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
            for (o, a) in out[base..base + d].iter_mut().zip(&acc) {
                *o = a.to_f32() * inv;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn attention_matches_softmax_reference() {
        let (heads, kv_heads, d, len) = (4, 2, 8, 5);
        let f = |i: usize, s: f32| ((i as f32) * s).sin();
        let q: Vec<f32> = (0..len * heads * d).map(|i| f(i, 0.7)).collect();
        let kv = LayerKv {
            k: (0..len * kv_heads * d)
                .map(|i| f16::from_f32(f(i, 0.3)))
                .collect(),
            v: (0..len * kv_heads * d)
                .map(|i| f16::from_f32(f(i, 0.5)))
                .collect(),
        };
        let scale = 1.0 / (d as f32).sqrt();
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            past: 0,
            scale,
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
