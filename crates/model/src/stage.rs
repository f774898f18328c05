//! One model definition for the whole Llama family, run as a contiguous span of layers.
//!
//! A [`Stage`] holds `[embedding] + layers[a..b) + [final norm + output head]`: the embedding
//! only when `a == 0`, the head only when `b == num_layers`. The whole model is the stage that
//! spans every layer, so one code path serves single-process inference, split inference and
//! training:
//!
//! - tokens or hidden states in -> `Stage::forward` -> hidden states or logits out;
//! - each call appends the new positions' keys/values to the caller's [`KvCache`];
//! - stages chained in one process give bit-identical logits to the whole model, because they
//!   run exactly the same ops on exactly the same tensors.

use crate::attention::{flash_attention, AttnShape};
use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::layers::{causal_mask, softmax_last_dim, Embedding, Linear, Mlp, Mode, RmsNorm, Rope};
use candle_core::{Device, Tensor, D};
use std::ops::Range;
use std::sync::Arc;

/// The layers `start..end` that a stage holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerSpan {
    pub start: usize,
    pub end: usize,
}

impl LayerSpan {
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    pub fn full(num_layers: usize) -> Self {
        Self::new(0, num_layers)
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn range(&self) -> Range<usize> {
        self.start..self.end
    }

    /// Splits `num_layers` into `parts` contiguous spans of nearly equal length.
    pub fn split_even(num_layers: usize, parts: usize) -> Vec<LayerSpan> {
        let parts = parts.clamp(1, num_layers.max(1));
        (0..parts)
            .map(|i| LayerSpan::new(i * num_layers / parts, (i + 1) * num_layers / parts))
            .collect()
    }
}

impl std::fmt::Display for LayerSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl std::str::FromStr for LayerSpan {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once("..")
            .ok_or_else(|| format!("expected START..END, got {s:?}"))?;
        let a = a
            .trim()
            .parse()
            .map_err(|_| format!("bad start in {s:?}"))?;
        let b = b.trim().parse().map_err(|_| format!("bad end in {s:?}"))?;
        if b <= a {
            return Err(format!("empty span {s:?}"));
        }
        Ok(Self::new(a, b))
    }
}

/// What a stage consumes.
pub enum StageInput<'a> {
    /// Token ids (first stage only).
    Tokens(&'a [u32]),
    /// Hidden states `[1, len, hidden]` from the previous stage.
    Hidden(Tensor),
}

/// Which positions' logits the last stage returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: `[vocab]` (generation).
    Last,
    /// Every new position: `[len, vocab]` (teacher-forced replay, verification).
    All,
}

/// What a stage produces.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden states `[1, len, hidden]` for the next stage.
    Hidden(Tensor),
    /// f32 logits, shaped per [`Logits`].
    Logits(Tensor),
}

/// Why a forward pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("context overflow: {needed} positions needed, the context holds {max}")]
    ContextOverflow { needed: usize, max: usize },
    #[error("stage {span} cannot take {got}")]
    WrongInput { span: LayerSpan, got: &'static str },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("tensor operation failed")]
    Tensor(#[from] candle_core::Error),
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: RmsNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: RmsNorm,
    pub mlp: Mlp,
}

/// A span of a model's layers with its ends (see the module docs).
#[derive(Clone, Debug)]
pub struct Stage {
    cfg: Arc<ModelConfig>,
    span: LayerSpan,
    embed: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<(RmsNorm, Linear)>,
    rope: Rope,
    mode: Mode,
}

impl Stage {
    pub fn new(
        cfg: Arc<ModelConfig>,
        span: LayerSpan,
        embed: Option<Embedding>,
        blocks: Vec<Block>,
        head: Option<(RmsNorm, Linear)>,
        mode: Mode,
    ) -> Self {
        let rope = Rope::new(&cfg);
        Self {
            cfg,
            span,
            embed,
            blocks,
            head,
            rope,
            mode,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn span(&self) -> LayerSpan {
        self.span
    }

    pub fn is_first(&self) -> bool {
        self.embed.is_some()
    }

    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// A fresh cache for one sequence through this stage.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.blocks.len(),
            self.cfg.num_kv_heads * self.cfg.head_dim,
            self.cfg.max_position_embeddings,
        )
    }

    /// Runs the new positions of one sequence through the stage, appending to `cache`.
    pub fn forward(
        &self,
        input: StageInput<'_>,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<StageOutput, ForwardError> {
        let device = Device::Cpu;
        let x = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(embed)) => {
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(ForwardError::BadToken {
                        id,
                        vocab: self.cfg.vocab_size,
                    });
                }
                embed.forward(&Tensor::new(ids, &device)?.unsqueeze(0)?)?
            }
            (StageInput::Hidden(h), None) => h,
            (StageInput::Tokens(_), None) => {
                return Err(ForwardError::WrongInput {
                    span: self.span,
                    got: "token ids (it is not the first stage)",
                })
            }
            (StageInput::Hidden(_), Some(_)) => {
                return Err(ForwardError::WrongInput {
                    span: self.span,
                    got: "hidden states (it is the first stage)",
                })
            }
        };
        let len = x.dim(1)?;
        let past = cache.len();
        if past + len > cache.max_len() {
            return Err(ForwardError::ContextOverflow {
                needed: past + len,
                max: cache.max_len(),
            });
        }
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.block_cached(block, &x, cache, i)?;
        }
        cache.advance(len);
        match &self.head {
            None => Ok(StageOutput::Hidden(x)),
            Some((norm, head)) => {
                let x = match logits {
                    Logits::Last => x.narrow(1, len - 1, 1)?,
                    Logits::All => x,
                };
                let out = head.forward(&norm.forward_exact(&x)?)?;
                let out = match logits {
                    Logits::Last => out.flatten_all()?,
                    Logits::All => out.squeeze(0)?,
                };
                Ok(StageOutput::Logits(out))
            }
        }
    }

    /// Logits `[batch, len, vocab]` for a batch of equal-length sequences without a cache:
    /// the training forward pass (differentiable when the stage was built in `Mode::Train`).
    pub fn forward_batch(&self, tokens: &Tensor) -> Result<Tensor, ForwardError> {
        let Some(embed) = &self.embed else {
            return Err(ForwardError::WrongInput {
                span: self.span,
                got: "token ids (it is not the first stage)",
            });
        };
        let Some((norm, head)) = &self.head else {
            return Err(ForwardError::WrongInput {
                span: self.span,
                got: "a batch (it is not a whole model)",
            });
        };
        let device = tokens.device().clone();
        let (_, len) = tokens.dims2()?;
        let mut x = embed.forward(tokens)?;
        let (cos, sin) = self.rope.tables(0, len, &device)?;
        let rep = self.cfg.num_heads / self.cfg.num_kv_heads;
        let mask = causal_mask(len, 0, rep, &device)?;
        for block in &self.blocks {
            x = self.block_batch(block, &x, &cos, &sin, &mask)?;
        }
        Ok(head.forward(&norm.forward(&x, self.mode)?)?)
    }

    /// One block for one sequence with a cache: projections on candle, rotary embedding and
    /// attention on the f16 cache (see [`crate::attention`]).
    fn block_cached(
        &self,
        block: &Block,
        x: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let cfg = &*self.cfg;
        let (b, len, _) = x.dims3()?;
        if b != 1 {
            candle_core::bail!("cached forward takes one sequence, got a batch of {b}");
        }
        let (nh, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let past = cache.len();
        let h = block.attn_norm.forward_exact(x)?;
        let rows = |t: Tensor| -> candle_core::Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        let mut q = rows(block.q.forward(&h)?)?;
        let mut k = rows(block.k.forward(&h)?)?;
        let v = rows(block.v.forward(&h)?)?;
        let rope = self.rope.table();
        rope.apply(&mut q, past, nh);
        rope.apply(&mut k, past, kvh);
        let kv = cache.append(layer, &k, &v);
        let shape = AttnShape {
            heads: nh,
            kv_heads: kvh,
            head_dim: hd,
            past,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let attn = flash_attention(&q, kv, shape);
        let attn = Tensor::from_vec(attn, (1, len, nh * hd), x.device())?;
        let x = (x + block.o.forward(&attn)?)?;
        let h = block.ffn_norm.forward_exact(&x)?;
        x + block.mlp.forward_exact(&h)?
    }

    /// One block for a batch of whole sequences, in candle ops (differentiable in
    /// `Mode::Train`).
    fn block_batch(
        &self,
        block: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let cfg = &*self.cfg;
        let (b, len, _) = x.dims3()?;
        let (nh, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let rep = nh / kvh;

        let h = block.attn_norm.forward(x, self.mode)?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, len, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(block.q.forward(&h)?, nh)?;
        let k = heads(block.k.forward(&h)?, kvh)?;
        let v = heads(block.v.forward(&h)?, kvh)?;
        let q = self.rope.apply(&q, cos, sin, self.mode)?;
        let k = self.rope.apply(&k, cos, sin, self.mode)?;

        // Fold the query heads that share a key/value head into the row dimension, so grouped
        // attention is one matmul per kv head without copying K and V `rep` times.
        let q = q.reshape((b, kvh, rep * len, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores, self.mode)?;
        let attn = probs
            .matmul(&v)?
            .reshape((b, nh, len, hd))?
            .transpose(1, 2)?
            .reshape((b, len, nh * hd))?;
        let x = (x + block.o.forward(&attn)?)?;
        let h = block.ffn_norm.forward(&x, self.mode)?;
        x + block.mlp.forward(&h)?
    }
}

/// Runs a chain of stages in one process (used by tests and by `generate`): the output of each
/// stage feeds the next, each with its own cache.
pub fn forward_chain(
    stages: &[Stage],
    caches: &mut [KvCache],
    tokens: &[u32],
    logits: Logits,
) -> Result<Tensor, ForwardError> {
    let mut input = StageInput::Tokens(tokens);
    for (stage, cache) in stages.iter().zip(caches.iter_mut()) {
        match stage.forward(input, cache, logits)? {
            StageOutput::Hidden(h) => input = StageInput::Hidden(h),
            StageOutput::Logits(l) => return Ok(l),
        }
    }
    Err(ForwardError::WrongInput {
        span: stages.last().map_or(LayerSpan::new(0, 0), |s| s.span),
        got: "a chain that does not end with the output head",
    })
}

/// Last-dimension argmax (greedy decoding helper for tests).
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_covers_all_layers() {
        let spans = LayerSpan::split_even(30, 4);
        assert_eq!(spans.first().unwrap().start, 0);
        assert_eq!(spans.last().unwrap().end, 30);
        for w in spans.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        assert_eq!(LayerSpan::split_even(2, 5).len(), 2);
    }

    #[test]
    fn span_parses() {
        assert_eq!("3..7".parse::<LayerSpan>().unwrap(), LayerSpan::new(3, 7));
        assert!("7..3".parse::<LayerSpan>().is_err());
        assert!("x".parse::<LayerSpan>().is_err());
    }
}
