//! The building blocks of a Llama-family block: linear projections (quantized or dense), RMSNorm,
//! token embeddings and rotary position embeddings.
//!
//! Every block comes in two flavours chosen by [`Mode`]: `Infer` uses candle's fused CPU kernels,
//! `Train` uses composed tensor ops that autograd can differentiate. Both compute the same
//! function; checkpoints trained with one are served with the other.

use crate::attention::RopeTable;
use crate::config::{ModelConfig, RopeLayout};
use crate::kernels::QuantMatrix;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use std::sync::Arc;

/// Whether the forward pass must be differentiable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Infer,
    Train,
}

/// `y = x W^T (+ b)` with `W` quantized (GGUF) or dense f32 (safetensors, training).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// How a [`Linear`] multiplies: our kernels for the GGML formats they cover (Q4_0, Q4_1, Q8_0
/// on the CPU), candle's `QMatMul` for the rest.
#[derive(Clone, Debug)]
enum Weight {
    Kernel(QuantMatrix),
    Candle(QMatMul),
}

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        let weight = match &weight {
            QMatMul::QTensor(q) => {
                QuantMatrix::new(q.clone()).map_or(Weight::Candle(weight), Weight::Kernel)
            }
            _ => Weight::Candle(weight),
        };
        Self { weight, bias }
    }

    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::new(QMatMul::Tensor(weight), bias)
    }

    /// Whether each output row depends on its input row alone, bit for bit, whatever the
    /// number of rows multiplied together: true for our kernels; candle's matmul may change
    /// its summation with the row count.
    pub fn rows_independent(&self) -> bool {
        matches!(self.weight, Weight::Kernel(_))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.weight, x.dims()) {
            (Weight::Kernel(q), _) => quant_forward(q, x)?,
            // Dense weights: fold batch and time into one matmul instead of candle's broadcast
            // batched matmul, which is several times slower forward and backward.
            (Weight::Candle(QMatMul::Tensor(w)), &[b, t, k]) => x
                .reshape((b * t, k))?
                .matmul(&w.t()?)?
                .reshape((b, t, w.dim(0)?))?,
            (Weight::Candle(w), _) => w.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `[.., cols] -> [.., rows]` through the kernel. The input is read in place when it is a
/// contiguous f32 CPU tensor (the usual case), copied otherwise.
fn quant_forward(q: &QuantMatrix, x: &Tensor) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(k) if *k == q.cols() => *k = q.rows(),
        _ => {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: x.shape().clone(),
                rhs: candle_core::Shape::from((q.rows(), q.cols())),
                op: "linear",
            })
        }
    }
    let x = to_f32(x.clone())?;
    let m = x.elem_count() / q.cols();
    let mut out = vec![0f32; m * q.rows()];
    {
        let (storage, layout) = x.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(cpu), Some((lo, hi))) => {
                q.matmul(&cpu.as_slice::<f32>()?[lo..hi], &mut out)
            }
            _ => q.matmul(&x.flatten_all()?.to_vec1::<f32>()?, &mut out),
        }
    }
    Tensor::from_vec(out, dims, x.device())
}

/// Root-mean-square normalisation with a learned scale.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// Normalises `[.., hidden]` with ggml's exact arithmetic (see [`crate::numerics`]).
    pub fn forward_exact(&self, x: &Tensor) -> Result<Tensor> {
        let w: Vec<f32> = self.weight.to_vec1()?;
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        Tensor::from_vec(
            crate::numerics::rms_norm(&v, &w, self.eps as f32),
            x.shape(),
            x.device(),
        )
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Infer => candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32),
            Mode::Train => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32),
        }
    }
}

/// Token embedding table; quantized tables are dequantized row by row on lookup, so a Q4 table
/// never costs its f32 size in memory.
#[derive(Clone, Debug)]
pub enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Dense(w) => {
                let mut dims = ids.dims().to_vec();
                dims.push(w.dim(1)?);
                w.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
            }
        }
    }

    /// The output projection when the model ties it to the embedding.
    pub fn as_linear(&self) -> Result<Linear> {
        Ok(match self {
            Embedding::Quantized(q) => Linear::new(QMatMul::from_arc(q.clone())?, None),
            Embedding::Dense(w) => Linear::dense(w.clone(), None),
        })
    }
}

/// Rotary position embedding for the batched (candle) path: the angles come from the same
/// [`RopeTable`] the cached path uses, so both rotate identically.
#[derive(Clone, Debug)]
pub struct Rope {
    table: RopeTable,
    layout: RopeLayout,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            table: RopeTable::new(cfg),
            layout: cfg.rope_layout,
        }
    }

    pub fn table(&self) -> &RopeTable {
        &self.table
    }

    /// `(cos, sin)`, each `[len, head_dim / 2]`, for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let (mut c, mut s) = (Vec::new(), Vec::new());
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in start..start + len {
            self.table.angles(p, &mut c, &mut s);
            cos.extend_from_slice(&c);
            sin.extend_from_slice(&s);
        }
        let half = cos.len() / len.max(1);
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }

    /// Rotates `x` of shape `[batch, heads, len, head_dim]`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mode: Mode) -> Result<Tensor> {
        use candle_nn::rotary_emb as re;
        match (self.layout, mode) {
            (RopeLayout::Interleaved, Mode::Infer) => re::rope_i(x, cos, sin),
            (RopeLayout::Interleaved, Mode::Train) => re::rope_i_slow(x, cos, sin),
            (RopeLayout::HalfSplit, Mode::Infer) => re::rope(x, cos, sin),
            (RopeLayout::HalfSplit, Mode::Train) => re::rope_slow(x, cos, sin),
        }
    }
}

/// SiLU-gated feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }

    /// The same function with ggml's SwiGLU arithmetic (see [`crate::numerics`]).
    pub fn forward_exact(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        let shape = g.shape().clone();
        let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let u: Vec<f32> = self.up.forward(x)?.flatten_all()?.to_vec1()?;
        let h = Tensor::from_vec(crate::numerics::swiglu(&g, &u), shape, x.device())?;
        self.down.forward(&h)
    }
}

/// The additive causal mask for `len` new positions after `past` cached ones, repeated `rep`
/// times along the rows (grouped-query heads folded into the row dimension).
pub fn causal_mask(len: usize, past: usize, rep: usize, device: &Device) -> Result<Tensor> {
    let total = past + len;
    let mut m = Vec::with_capacity(rep * len * total);
    for _ in 0..rep {
        for i in 0..len {
            m.extend((0..total).map(|j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }));
        }
    }
    Tensor::from_vec(m, (rep * len, total), device)
}

pub fn softmax_last_dim(x: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Infer => candle_nn::ops::softmax_last_dim(x),
        Mode::Train => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// f32 view of a tensor of any float dtype.
pub fn to_f32(t: Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t)
    } else {
        t.to_dtype(DType::F32)
    }
}
