//! Building a [`Stage`] from stored weights: GGUF files (quantized, llama.cpp names) and Hugging
//! Face safetensors (dense, `model.layers.N...` names, one file or sharded), or an in-memory map
//! of Hugging Face names (training).
//!
//! Every tensor is checked against the shape the configuration implies before use, so a file
//! that disagrees with its own metadata is an error naming the tensor, not a crash mid-forward.

use crate::config::ModelConfig;
use crate::gguf::{GgufError, GgufFile};
use crate::layers::{to_f32, Embedding, Linear, Mlp, Mode, RmsNorm};
use crate::stage::{Block, LayerSpan, Stage};
use candle_core::quantized::QMatMul;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// A logical weight of the model, independent of the file format's naming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    Embed,
    OutputNorm,
    Output,
    Layer(usize, LayerWeight),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerWeight {
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl Weight {
    pub fn gguf_name(self) -> String {
        use LayerWeight::*;
        match self {
            Weight::Embed => "token_embd.weight".into(),
            Weight::OutputNorm => "output_norm.weight".into(),
            Weight::Output => "output.weight".into(),
            Weight::Layer(i, w) => {
                let s = match w {
                    AttnNorm => "attn_norm.weight",
                    Q => "attn_q.weight",
                    K => "attn_k.weight",
                    V => "attn_v.weight",
                    O => "attn_output.weight",
                    QBias => "attn_q.bias",
                    KBias => "attn_k.bias",
                    VBias => "attn_v.bias",
                    FfnNorm => "ffn_norm.weight",
                    Gate => "ffn_gate.weight",
                    Up => "ffn_up.weight",
                    Down => "ffn_down.weight",
                };
                format!("blk.{i}.{s}")
            }
        }
    }

    pub fn hf_name(self) -> String {
        use LayerWeight::*;
        match self {
            Weight::Embed => "model.embed_tokens.weight".into(),
            Weight::OutputNorm => "model.norm.weight".into(),
            Weight::Output => "lm_head.weight".into(),
            Weight::Layer(i, w) => {
                let s = match w {
                    AttnNorm => "input_layernorm.weight",
                    Q => "self_attn.q_proj.weight",
                    K => "self_attn.k_proj.weight",
                    V => "self_attn.v_proj.weight",
                    O => "self_attn.o_proj.weight",
                    QBias => "self_attn.q_proj.bias",
                    KBias => "self_attn.k_proj.bias",
                    VBias => "self_attn.v_proj.bias",
                    FfnNorm => "post_attention_layernorm.weight",
                    Gate => "mlp.gate_proj.weight",
                    Up => "mlp.up_proj.weight",
                    Down => "mlp.down_proj.weight",
                };
                format!("model.layers.{i}.{s}")
            }
        }
    }

    /// The shape `cfg` implies, candle order.
    pub fn shape(self, cfg: &ModelConfig) -> Vec<usize> {
        use LayerWeight::*;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        match self {
            Weight::Embed | Weight::Output => vec![cfg.vocab_size, h],
            Weight::OutputNorm => vec![h],
            Weight::Layer(_, w) => match w {
                AttnNorm | FfnNorm => vec![h],
                Q => vec![q, h],
                K | V => vec![kv, h],
                O => vec![h, q],
                QBias => vec![q],
                KBias | VBias => vec![kv],
                Gate | Up => vec![i, h],
                Down => vec![h, i],
            },
        }
    }

    /// Every weight a stage over `span` needs.
    pub fn all_for(cfg: &ModelConfig, span: LayerSpan) -> Vec<Weight> {
        use LayerWeight::*;
        let mut out = Vec::new();
        if span.start == 0 || (span.end == cfg.num_layers && cfg.tie_word_embeddings) {
            out.push(Weight::Embed);
        }
        for l in span.range() {
            let mut ws = vec![AttnNorm, Q, K, V, O, FfnNorm, Gate, Up, Down];
            if cfg.qkv_bias {
                ws.extend([QBias, KBias, VBias]);
            }
            out.extend(ws.into_iter().map(|w| Weight::Layer(l, w)));
        }
        if span.end == cfg.num_layers {
            out.push(Weight::OutputNorm);
            if !cfg.tie_word_embeddings {
                out.push(Weight::Output);
            }
        }
        out
    }
}

/// Why a model's weights cannot be turned into a stage.
#[derive(Debug, thiserror::Error)]
pub enum LoadWeightsError {
    #[error("weight {name} is missing")]
    Missing { name: String },
    #[error("weight {name} has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("layer span {span} is outside the model's {layers} layers")]
    BadSpan { span: LayerSpan, layers: usize },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("cannot read weight {name}")]
    Tensor {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("cannot read safetensors {path}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
}

/// Dense tensors keyed by Hugging Face names.
pub enum HfTensors {
    Mmap(MmapedSafetensors),
    Map(HashMap<String, Tensor>),
}

impl HfTensors {
    /// Maps one or several (sharded) safetensors files.
    pub fn open(paths: &[PathBuf]) -> Result<Self, LoadWeightsError> {
        // SAFETY: read-only maps of files we do not modify (see gguf.rs for the same contract).
        let st = unsafe { MmapedSafetensors::multi(paths) }.map_err(|source| {
            LoadWeightsError::Safetensors {
                path: paths.first().cloned().unwrap_or_default(),
                source,
            }
        })?;
        Ok(Self::Mmap(st))
    }

    fn get(&self, name: &str) -> Option<Result<Tensor, candle_core::Error>> {
        match self {
            HfTensors::Mmap(st) => {
                // MmapedSafetensors reports a missing name as an error; look it up first.
                let present = st.tensors().iter().any(|(n, _)| n == name);
                present.then(|| st.load(name, &Device::Cpu))
            }
            HfTensors::Map(m) => m.get(name).cloned().map(Ok),
        }
    }
}

/// Where the weights come from.
pub enum WeightSource<'a> {
    Gguf(&'a GgufFile),
    Hf(&'a HfTensors),
}

impl WeightSource<'_> {
    fn name(&self, w: Weight) -> String {
        match self {
            WeightSource::Gguf(_) => w.gguf_name(),
            WeightSource::Hf(_) => w.hf_name(),
        }
    }

    fn check(&self, w: Weight, got: &[usize], cfg: &ModelConfig) -> Result<(), LoadWeightsError> {
        let expected = w.shape(cfg);
        if got != expected.as_slice() {
            return Err(LoadWeightsError::Shape {
                name: self.name(w),
                got: got.to_vec(),
                expected,
            });
        }
        Ok(())
    }

    fn dense(&self, w: Weight, cfg: &ModelConfig) -> Result<Tensor, LoadWeightsError> {
        let name = self.name(w);
        let t = match self {
            WeightSource::Gguf(g) => {
                g.tensor(&name)?
                    .dequantize(&Device::Cpu)
                    .map_err(|source| LoadWeightsError::Tensor {
                        name: name.clone(),
                        source,
                    })?
            }
            WeightSource::Hf(h) => h
                .get(&name)
                .ok_or_else(|| LoadWeightsError::Missing { name: name.clone() })?
                .and_then(to_f32)
                .map_err(|source| LoadWeightsError::Tensor {
                    name: name.clone(),
                    source,
                })?,
        };
        self.check(w, t.dims(), cfg)?;
        Ok(t)
    }

    fn matmul(&self, w: Weight, cfg: &ModelConfig) -> Result<QMatMul, LoadWeightsError> {
        match self {
            WeightSource::Gguf(g) => {
                let name = self.name(w);
                let q = g.tensor(&name)?;
                self.check(w, q.shape().dims(), cfg)?;
                QMatMul::from_qtensor(q).map_err(|source| LoadWeightsError::Tensor { name, source })
            }
            WeightSource::Hf(_) => Ok(QMatMul::Tensor(self.dense(w, cfg)?)),
        }
    }

    fn linear(
        &self,
        l: usize,
        w: LayerWeight,
        bias: Option<LayerWeight>,
        cfg: &ModelConfig,
    ) -> Result<Linear, LoadWeightsError> {
        let b = match bias {
            Some(b) if cfg.qkv_bias => Some(self.dense(Weight::Layer(l, b), cfg)?),
            _ => None,
        };
        Ok(Linear::new(self.matmul(Weight::Layer(l, w), cfg)?, b))
    }

    fn embedding(&self, cfg: &ModelConfig) -> Result<Embedding, LoadWeightsError> {
        match self {
            WeightSource::Gguf(g) => {
                let name = self.name(Weight::Embed);
                let q = g.tensor(&name)?;
                self.check(Weight::Embed, q.shape().dims(), cfg)?;
                Ok(match q.dtype() {
                    candle_core::quantized::GgmlDType::F32 => Embedding::Dense(
                        q.dequantize(&Device::Cpu)
                            .map_err(|source| LoadWeightsError::Tensor { name, source })?,
                    ),
                    _ => Embedding::Quantized(Arc::new(q)),
                })
            }
            WeightSource::Hf(_) => Ok(Embedding::Dense(self.dense(Weight::Embed, cfg)?)),
        }
    }

    /// Builds the stage for `span`, loading only the weights it needs.
    pub fn build_stage(
        &self,
        cfg: Arc<ModelConfig>,
        span: LayerSpan,
        mode: Mode,
    ) -> Result<Stage, LoadWeightsError> {
        use LayerWeight::*;
        if span.is_empty() || span.end > cfg.num_layers {
            return Err(LoadWeightsError::BadSpan {
                span,
                layers: cfg.num_layers,
            });
        }
        let last = span.end == cfg.num_layers;
        let needs_embed = span.start == 0 || (last && cfg.tie_word_embeddings);
        let embed = needs_embed.then(|| self.embedding(&cfg)).transpose()?;
        let norm = |w: Weight| -> Result<RmsNorm, LoadWeightsError> {
            Ok(RmsNorm::new(self.dense(w, &cfg)?, cfg.rms_norm_eps))
        };
        let mut blocks = Vec::with_capacity(span.len());
        for l in span.range() {
            blocks.push(Block {
                attn_norm: norm(Weight::Layer(l, AttnNorm))?,
                q: self.linear(l, Q, Some(QBias), &cfg)?,
                k: self.linear(l, K, Some(KBias), &cfg)?,
                v: self.linear(l, V, Some(VBias), &cfg)?,
                o: self.linear(l, O, None, &cfg)?,
                ffn_norm: norm(Weight::Layer(l, FfnNorm))?,
                mlp: Mlp {
                    gate: self.linear(l, Gate, None, &cfg)?,
                    up: self.linear(l, Up, None, &cfg)?,
                    down: self.linear(l, Down, None, &cfg)?,
                },
            });
        }
        let head = if last {
            let out = match (&embed, cfg.tie_word_embeddings) {
                (Some(e), true) => e.as_linear().map_err(|source| LoadWeightsError::Tensor {
                    name: self.name(Weight::Embed),
                    source,
                })?,
                _ => Linear::new(self.matmul(Weight::Output, &cfg)?, None),
            };
            Some((norm(Weight::OutputNorm)?, out))
        } else {
            None
        };
        // A last stage that is not also the first keeps the (tied) table only as its head.
        let embed = if span.start == 0 { embed } else { None };
        Ok(Stage::new(cfg, span, embed, blocks, head, mode))
    }
}

/// Dense f32 weights of a Hugging Face checkpoint loaded fully in memory (training).
pub fn dense_map(
    source: &HfTensors,
    cfg: &ModelConfig,
) -> Result<HashMap<String, Tensor>, LoadWeightsError> {
    WeightSource::Hf(source).dense_map(cfg)
}

impl WeightSource<'_> {
    /// Every weight of the model, dequantized to f32, by Hugging Face name (in the source's
    /// own layout: a GGUF's Q and K rows stay in its interleaved rope order).
    pub fn dense_map(
        &self,
        cfg: &ModelConfig,
    ) -> Result<HashMap<String, Tensor>, LoadWeightsError> {
        let mut out = HashMap::new();
        for w in Weight::all_for(cfg, LayerSpan::full(cfg.num_layers)) {
            out.insert(
                w.hf_name(),
                self.dense(w, cfg)?.to_dtype(DType::F32).map_err(|source| {
                    LoadWeightsError::Tensor {
                        name: w.hf_name(),
                        source,
                    }
                })?,
            );
        }
        Ok(out)
    }
}
