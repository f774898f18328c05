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

use crate::attention::{
    flash_attention_heads_into, flash_attention_into, kernel_runs, AttnKernel, AttnShape,
};
use crate::config::ModelConfig;
use crate::kv_cache::{KvCache, LayerKv};
use crate::layers::{causal_mask, softmax_last_dim, Embedding, Linear, Mlp, Mode, RmsNorm, Rope};
use candle_core::{Device, Tensor, D};
use std::ops::Range;
use std::sync::Arc;
use std::sync::{Mutex, PoisonError};

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

/// One sequence's part of a [`Stage::forward_many`] call.
pub struct BatchItem<'a> {
    pub input: StageInput<'a>,
    /// The sequence's cache: the new positions are appended to it.
    pub cache: &'a mut KvCache,
    /// Which logits the last stage returns for this item; `None` returns its hidden states
    /// (before the final norm) even from the last stage: a prefill chunk that is not the last.
    pub logits: Option<Logits>,
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

    /// Whether computing a sequence's positions in any split into calls gives the same bits:
    /// true when every matrix multiplication runs on our row-independent kernels (Q4_0,
    /// Q4_1, Q8_0); other formats go through candle's matmul, whose summation may depend on
    /// the row count. Reusing cached KV for a shared prompt prefix is exact only when true.
    pub fn split_invariant(&self) -> bool {
        let head = self.head.as_ref().is_none_or(|(_, l)| l.rows_independent());
        head && self.blocks.iter().all(|b| {
            [&b.q, &b.k, &b.v, &b.o, &b.mlp.gate, &b.mlp.up, &b.mlp.down]
                .iter()
                .all(|l| l.rows_independent())
        })
    }

    /// Bytes of f16 keys and values one position of one sequence takes in this stage's cache.
    pub fn kv_bytes_per_position(&self) -> u64 {
        (self.blocks.len() * self.cfg.num_kv_heads * self.cfg.head_dim * 2 * 2) as u64
    }

    /// Runs the new positions of one sequence through the stage, appending to `cache`.
    pub fn forward(
        &self,
        input: StageInput<'_>,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<StageOutput, ForwardError> {
        let mut items = [BatchItem {
            input,
            cache,
            logits: Some(logits),
        }];
        let mut out = self.forward_many(&mut items)?;
        out.pop().ok_or(ForwardError::WrongInput {
            span: self.span,
            got: "an empty batch",
        })
    }

    /// Runs the new positions of several sequences through the stage as one batch: the rows of
    /// every item go through the norms and matrix multiplications together (each weight block
    /// is read once for all of them), attention runs per item against its own cache. Every
    /// operation computes each row from that row alone (quantized dot products per activation
    /// row, row-wise norms, element-wise activations, attention per query row over its own
    /// sequence's keys, with the kernel its cache declares for the row's position,
    /// [`KvCache::prompt`]), so each item's output is bit-identical to running it alone, and to
    /// running its positions in any split into consecutive calls.
    ///
    /// Checks every item before computing anything: on `Err` no cache has changed.
    pub fn forward_many(
        &self,
        items: &mut [BatchItem<'_>],
    ) -> Result<Vec<StageOutput>, ForwardError> {
        let hidden = self.cfg.hidden_size;
        let mut lens = Vec::with_capacity(items.len());
        for item in items.iter() {
            let len = self.check(item)?;
            lens.push(len);
        }
        let total: usize = lens.iter().sum();
        if total == 0 {
            return Err(ForwardError::WrongInput {
                span: self.span,
                got: "no positions",
            });
        }
        let device = Device::Cpu;
        let x = if let Some(embed) = &self.embed {
            let mut ids = Vec::with_capacity(total);
            for item in items.iter() {
                if let StageInput::Tokens(t) = &item.input {
                    ids.extend_from_slice(t);
                }
            }
            embed.forward(&Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?)?
        } else {
            let mut rows = Vec::with_capacity(total);
            for item in items.iter() {
                if let StageInput::Hidden(h) = &item.input {
                    rows.push(h.reshape((1, (), hidden))?);
                }
            }
            Tensor::cat(&rows, 1)?
        };
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            x = self.block_many(block, &x, items, &lens, i)?;
        }
        for (item, &len) in items.iter_mut().zip(&lens) {
            item.cache.advance(len);
        }
        self.outputs(&x, items, &lens)
    }

    /// The length of an item's new positions, or why the stage cannot take it.
    fn check(&self, item: &BatchItem<'_>) -> Result<usize, ForwardError> {
        let len = match (&item.input, &self.embed) {
            (StageInput::Tokens(ids), Some(_)) => {
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                    return Err(ForwardError::BadToken {
                        id,
                        vocab: self.cfg.vocab_size,
                    });
                }
                ids.len()
            }
            (StageInput::Hidden(h), None) => {
                let (b, len, width) = h.dims3()?;
                if b != 1 || width != self.cfg.hidden_size {
                    return Err(ForwardError::WrongInput {
                        span: self.span,
                        got: "hidden states that are not [1, len, hidden]",
                    });
                }
                len
            }
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
        if len == 0 {
            return Err(ForwardError::WrongInput {
                span: self.span,
                got: "an item without positions",
            });
        }
        let needed = item.cache.len() + len;
        if needed > item.cache.max_len() {
            return Err(ForwardError::ContextOverflow {
                needed,
                max: item.cache.max_len(),
            });
        }
        Ok(len)
    }

    /// Splits the batch's final rows `x: [1, total, hidden]` back into one output per item.
    fn outputs(
        &self,
        x: &Tensor,
        items: &[BatchItem<'_>],
        lens: &[usize],
    ) -> Result<Vec<StageOutput>, ForwardError> {
        let head = self.head.as_ref();
        // Rows that go through the head, gathered so it runs once for the whole batch.
        let mut picks: Vec<(usize, usize)> = Vec::new();
        let mut start = 0;
        for (item, &len) in items.iter().zip(lens) {
            match (head, item.logits) {
                (Some(_), Some(Logits::Last)) => picks.push((start + len - 1, 1)),
                (Some(_), Some(Logits::All)) => picks.push((start, len)),
                _ => {}
            }
            start += len;
        }
        let logits = match head {
            Some((norm, head)) if !picks.is_empty() => {
                let rows: Vec<Tensor> = picks
                    .iter()
                    .map(|&(at, n)| x.narrow(1, at, n))
                    .collect::<candle_core::Result<_>>()?;
                let rows = if rows.len() == 1 {
                    rows[0].clone()
                } else {
                    Tensor::cat(&rows, 1)?
                };
                Some(head.forward(&norm.forward_exact(&rows)?)?.squeeze(0)?)
            }
            _ => None,
        };
        let mut out = Vec::with_capacity(items.len());
        let (mut start, mut row) = (0, 0);
        for (item, &len) in items.iter().zip(lens) {
            match (&logits, head.is_some(), item.logits) {
                (Some(l), true, Some(kind)) => {
                    let n = if kind == Logits::Last { 1 } else { len };
                    let mine = l.narrow(0, row, n)?;
                    row += n;
                    out.push(StageOutput::Logits(match kind {
                        Logits::Last => mine.flatten_all()?,
                        Logits::All => mine,
                    }));
                }
                _ => out.push(StageOutput::Hidden(x.narrow(1, start, len)?)),
            }
            start += len;
        }
        Ok(out)
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

    /// One block over the rows of every item (`x: [1, total, hidden]`): norms, projections
    /// and the MLP over all rows at once; rotary embedding and attention per item on its own
    /// f16 cache (see [`crate::attention`]).
    fn block_many(
        &self,
        block: &Block,
        x: &Tensor,
        items: &mut [BatchItem<'_>],
        lens: &[usize],
        layer: usize,
    ) -> candle_core::Result<Tensor> {
        let cfg = &*self.cfg;
        let (nh, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let total = x.dim(1)?;
        let h = block.attn_norm.forward_exact(x)?;
        let rows = |t: Tensor| -> candle_core::Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        let mut q = rows(block.q.forward(&h)?)?;
        let mut k = rows(block.k.forward(&h)?)?;
        let v = rows(block.v.forward(&h)?)?;
        let rope = self.rope.table();
        let (qw, kw) = (nh * hd, kvh * hd);
        let mut jobs = Vec::with_capacity(items.len());
        let mut start = 0;
        for (item, &len) in items.iter_mut().zip(lens) {
            let past = item.cache.len();
            let qs = &mut q[start * qw..(start + len) * qw];
            let ks = &mut k[start * kw..(start + len) * kw];
            rope.apply(qs, past, nh);
            rope.apply(ks, past, kvh);
            let prompt = item.cache.prompt();
            let kv = item
                .cache
                .append(layer, ks, &v[start * kw..(start + len) * kw]);
            // The rows in runs of one kernel each (usually one run).
            for (run, kernel) in kernel_runs(&prompt, past, past + len) {
                jobs.push(AttnJob {
                    start: start + (run.start - past),
                    len: run.len(),
                    kv,
                    shape: AttnShape {
                        heads: nh,
                        kv_heads: kvh,
                        head_dim: hd,
                        past: run.start,
                        scale: 1.0 / (hd as f32).sqrt(),
                        kernel,
                    },
                });
            }
            start += len;
        }
        let mut attn = vec![0f32; total * qw];
        attention_many(&q, &mut attn, qw, &jobs);
        let attn = Tensor::from_vec(attn, (1, total, qw), x.device())?;
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

/// The attention of one item's query rows `start..start + len` of a batch.
struct AttnJob<'a> {
    start: usize,
    len: usize,
    kv: &'a LayerKv,
    shape: AttnShape,
}

/// Below this many query-key dot products a batch's attention runs on the calling thread
/// (handing work to rayon from outside its pool costs tens of microseconds).
const PARALLEL_ATTENTION_DOTS: usize = 4096;

/// Attention of every job into its rows of `out` (`width = heads * head_dim` per row). Long
/// jobs are split into runs of query rows with about equal key counts, and a few short rows
/// over many keys (decode steps) into runs of heads, and run on rayon's threads with the
/// short ones; each row and head is computed as [`flash_attention_into`] computes it, from its
/// own query and its sequence's keys, so the split never changes a value.
fn attention_many(q: &[f32], out: &mut [f32], width: usize, jobs: &[AttnJob<'_>]) {
    let heads = jobs.first().map_or(1, |j| j.shape.heads);
    let dots: usize = jobs
        .iter()
        .map(|j| j.len * (j.shape.past + j.len) * heads)
        .sum();
    let threads = rayon::current_num_threads().max(1);
    // (query rows, output rows, keys, shape with `past` moved to the first row, heads).
    type Task<'a> = (
        &'a [f32],
        &'a mut [f32],
        &'a LayerKv,
        AttnShape,
        Range<usize>,
    );
    let mut tasks: Vec<Task<'_>> = Vec::new();
    let mut rest = out;
    for job in jobs {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(job.len * width);
        rest = tail;
        let q = &q[job.start * width..(job.start + job.len) * width];
        let pieces = if dots < PARALLEL_ATTENTION_DOTS || job.len < 8 {
            1
        } else {
            threads.min(job.len)
        };
        // A few rows (decode steps) over many keys: each row's heads split across the
        // threads instead, off the tiled kernel (which computes a tile's heads together).
        if pieces == 1
            && threads > 1
            && dots >= PARALLEL_ATTENTION_DOTS
            && job.shape.kernel != AttnKernel::Tiled
            && jobs.len() < threads
        {
            let d = job.shape.head_dim;
            let parts = threads.min(heads);
            let (mut q, mut mine) = (q, mine);
            for r in 0..job.len {
                let shape = AttnShape {
                    past: job.shape.past + r,
                    ..job.shape
                };
                for p in 0..parts {
                    let hs = heads * p / parts..heads * (p + 1) / parts;
                    let (qa, qb) = q.split_at(hs.len() * d);
                    let (oa, ob) = std::mem::take(&mut mine).split_at_mut(hs.len() * d);
                    tasks.push((qa, oa, job.kv, shape, hs));
                    (q, mine) = (qb, ob);
                }
            }
            continue;
        }
        // Row boundaries where the running key count (past + i + 1 for row i) reaches k/pieces.
        let past = job.shape.past;
        let work = |r: usize| r * past + r * (r + 1) / 2;
        let whole = work(job.len);
        let (mut q, mut mine, mut r0) = (q, mine, 0);
        for p in 1..=pieces {
            let r1 = if p == pieces {
                job.len
            } else {
                (r0..job.len)
                    .find(|&r| work(r) * pieces >= whole * p)
                    .unwrap_or(job.len)
            };
            let (qa, qb) = q.split_at((r1 - r0) * width);
            let (oa, ob) = std::mem::take(&mut mine).split_at_mut((r1 - r0) * width);
            if r1 > r0 {
                let shape = AttnShape {
                    past: past + r0,
                    ..job.shape
                };
                tasks.push((qa, oa, job.kv, shape, 0..heads));
            }
            (q, mine, r0) = (qb, ob, r1);
        }
    }
    // Chosen here: a backend forced on this thread does not reach the crew's threads.
    let backend = crate::kernels::current_backend();
    let run = |(q, out, kv, shape, hs): &mut Task<'_>| {
        if hs.len() == shape.heads {
            flash_attention_into(backend, q, kv, *shape, out);
        } else {
            flash_attention_heads_into(backend, q, kv, *shape, hs.clone(), out);
        }
    };
    if dots < PARALLEL_ATTENTION_DOTS || threads == 1 || tasks.len() == 1 {
        tasks.iter_mut().for_each(run);
    } else {
        // Each task's output rows are its own; the lock is never contended.
        let tasks: Vec<Mutex<_>> = tasks.into_iter().map(Mutex::new).collect();
        crate::kernels::for_each_index(tasks.len(), &|i| {
            let mut t = tasks[i].lock().unwrap_or_else(PoisonError::into_inner);
            run(&mut t);
        });
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
