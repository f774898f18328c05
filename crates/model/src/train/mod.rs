//! Training the model definition of [`crate::stage`] in f32: AdamW with linear warmup and
//! cosine decay, gradient clipping by global norm, exact-match evaluation on a held-out split,
//! and checkpoints in Hugging Face layout that [`crate::load`] reads back.
//!
//! - [`Trainer`]: the inner loop as a library. It starts from given [`Params`] and
//!   [`AdamWState`], takes batches from a [`Shard`] by example id, runs steps and hands back the
//!   new weights and optimizer state. Same inputs, same bytes, whatever the thread count: the
//!   optimizer and the gradient norm are sequential scalar code over flat vectors, and candle's
//!   CPU matmul splits rows, not the reduction.
//! - [`TaskTrainer`]: a whole single-machine run on a synthetic task (`plexus train`).
//!
//! Flow of one step: example ids -> [`Sequence`]s -> padded token batch ->
//! `Stage::forward_batch` (differentiable ops) -> masked cross-entropy on the scored tokens ->
//! backward -> flat gradient -> clip -> AdamW at the scheduled learning rate -> variables.

pub mod adamw;
pub mod checkpoint;
pub mod params;
pub mod pretrained;
pub mod shard;
pub mod task;
pub mod text;

use crate::config::{Architecture, ModelConfig, RopeLayout, RopeScaling};
use crate::layers::Mode;
use crate::stage::{LayerSpan, Stage};
use crate::weights::{HfTensors, LoadWeightsError, Weight, WeightSource};
pub use adamw::{AdamWConfig, AdamWState};
use candle_core::{DType, Device, Tensor, Var, D};
pub use params::{Layout, Params};
use plexus_core::rng::{CounterRng, Stream};
use serde::{Deserialize, Serialize};
pub use shard::{HeldOut, Sequence, Shard, TaskShard};
use std::collections::HashMap;
use std::sync::Arc;
use task::Task;

/// What to train.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub task: Task,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    /// The cosine decays to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm; 0 disables.
    pub clip: f64,
    pub seed: u64,
    pub hidden: usize,
    pub layers: usize,
}

impl TrainConfig {
    pub fn new(task: Task) -> Self {
        Self {
            task,
            steps: 1500,
            batch_size: 64,
            lr: 3e-3,
            warmup: 100,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            clip: 1.0,
            seed: 0,
            hidden: 128,
            layers: 2,
        }
    }
}

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("tensor operation failed")]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Forward(#[from] crate::stage::ForwardError),
    #[error(transparent)]
    Weights(#[from] LoadWeightsError),
    #[error("training diverged at step {step}: the gradient is not finite")]
    Diverged { step: usize },
    #[error("cannot write checkpoint {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The learning rate at `step` (0-based): linear warmup to `peak`, then cosine to
/// `peak * min_ratio` at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cos)
}

/// The model a task trains: a small Llama with tied embeddings.
pub fn task_model_config(tc: &TrainConfig, vocab_size: usize) -> Result<ModelConfig, TrainError> {
    let (p, a) = tc.task.lengths();
    small_llama_config(tc.hidden, tc.layers, vocab_size, p + a + 1)
}

/// A small Llama with tied embeddings, heads of 32, MLP 4x wide, for sequences of up to
/// `max_len` tokens (what tasks and text shards train from scratch).
pub fn small_llama_config(
    hidden: usize,
    layers: usize,
    vocab_size: usize,
    max_len: usize,
) -> Result<ModelConfig, TrainError> {
    if !hidden.is_multiple_of(32) || hidden == 0 || layers == 0 {
        return Err(TrainError::Config(format!(
            "hidden size {hidden} must be a positive multiple of 32, layers {layers} positive"
        )));
    }
    let heads = hidden / 32;
    Ok(ModelConfig {
        architecture: Architecture::Llama,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: hidden * 4,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_layout: RopeLayout::HalfSplit,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: max_len.next_power_of_two().max(64),
        tie_word_embeddings: true,
        qkv_bias: false,
        bos_token_id: None,
        eos_token_ids: vec![1],
    })
}

/// Random initial weights by Hugging Face name: N(0, 0.02), residual outputs scaled down by
/// sqrt(2 * layers) (GPT-2), norms at one. A pure function of `seed`.
pub fn init_weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>, TrainError> {
    let mut out = HashMap::new();
    for (i, w) in Weight::all_for(cfg, LayerSpan::full(cfg.num_layers))
        .into_iter()
        .enumerate()
    {
        let shape = w.shape(cfg);
        let n: usize = shape.iter().product();
        let name = w.hf_name();
        let t = if shape.len() == 1 {
            let fill = if name.ends_with("bias") { 0.0 } else { 1.0 };
            Tensor::full(fill as f32, shape, &Device::Cpu)?
        } else {
            use crate::weights::LayerWeight::{Down, O};
            let residual = matches!(w, Weight::Layer(_, O) | Weight::Layer(_, Down));
            let std = 0.02
                / if residual {
                    (2.0 * cfg.num_layers as f64).sqrt()
                } else {
                    1.0
                };
            let mut rng = CounterRng::new(seed, Stream::Init, i as u64);
            let v: Vec<f32> = (0..n).map(|_| (rng.next_normal() * std) as f32).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// One optimizer step's numbers.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    pub step: usize,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f64,
}

/// Exact-match accuracy on held-out examples.
#[derive(Clone, Debug)]
pub struct EvalReport {
    pub correct: usize,
    pub total: usize,
    /// Greedy answers, in held-out order (token ids before EOS).
    pub predictions: Vec<Vec<u32>>,
}

impl EvalReport {
    pub fn exact_match(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Hyperparameters of the inner loop. Part of a round's commitment.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InnerConfig {
    /// Peak learning rate.
    pub lr: f64,
    pub warmup: usize,
    /// The cosine decays to `lr * min_lr_ratio` at `schedule_steps`.
    pub min_lr_ratio: f64,
    /// Length of the learning-rate schedule in steps (the whole run's inner steps).
    pub schedule_steps: usize,
    /// Clip gradients to this global L2 norm; 0 disables.
    pub clip: f64,
    pub adamw: AdamWConfig,
}

impl InnerConfig {
    pub fn lr_at(&self, step: usize) -> f64 {
        lr_at(
            step,
            self.schedule_steps,
            self.warmup,
            self.lr,
            self.min_lr_ratio,
        )
    }

    /// The learning rate of `step` for an optimizer that has taken `optimizer_steps` steps.
    /// A fresh optimizer that joins a run past its warmup (a late DiLoCo worker) warms up
    /// again over `warmup` of its own steps: Adam's first steps move every weight by about
    /// the full learning rate, a jolt the outer momentum would carry for many rounds.
    pub fn lr_for(&self, step: usize, optimizer_steps: u64) -> f64 {
        let lr = self.lr_at(step);
        if step < self.warmup || self.warmup == 0 {
            return lr;
        }
        let own = (optimizer_steps as f64 + 1.0) / self.warmup as f64;
        lr * own.min(1.0)
    }
}

/// The token batch of `seqs`, padded with token 0, and the mask of scored predictions.
fn batch_tensors(seqs: &[Sequence]) -> Result<(Tensor, Tensor, Tensor, f32), TrainError> {
    let len = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
    if seqs.is_empty() || len < 2 {
        return Err(TrainError::Config(
            "a batch needs at least one sequence of two or more tokens".into(),
        ));
    }
    let b = seqs.len();
    let mut flat = Vec::with_capacity(b * len);
    let mut mask = Vec::<f32>::with_capacity(b * (len - 1));
    let mut count = 0f32;
    for s in seqs {
        if s.scored_from == 0 || s.scored_from >= s.tokens.len() {
            return Err(TrainError::Config(format!(
                "sequence of {} tokens scored from {}",
                s.tokens.len(),
                s.scored_from
            )));
        }
        flat.extend_from_slice(&s.tokens);
        flat.extend(std::iter::repeat_n(0, len - s.tokens.len()));
        // Prediction t is of token t + 1.
        for t in 0..len - 1 {
            let scored = t + 1 >= s.scored_from && t + 1 < s.tokens.len();
            mask.push(if scored { 1.0 } else { 0.0 });
            count += if scored { 1.0 } else { 0.0 };
        }
    }
    let all = Tensor::from_vec(flat, (b, len), &Device::Cpu)?;
    let inputs = all.narrow(1, 0, len - 1)?.contiguous()?;
    let targets = all.narrow(1, 1, len - 1)?.contiguous()?;
    let mask = Tensor::from_vec(mask, (b, len - 1), &Device::Cpu)?;
    Ok((inputs, targets, mask, count))
}

/// Mean cross-entropy of `stage` on the scored tokens of `seqs`.
fn masked_loss(stage: &Stage, seqs: &[Sequence]) -> Result<Tensor, TrainError> {
    let (inputs, targets, mask, count) = batch_tensors(seqs)?;
    let logits = stage.forward_batch(&inputs)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?;
    Ok(((picked * mask)?.sum_all()? * (-1.0 / f64::from(count)))?)
}

fn train_stage(cfg: &Arc<ModelConfig>, map: HashMap<String, Tensor>) -> Result<Stage, TrainError> {
    Ok(WeightSource::Hf(&HfTensors::Map(map)).build_stage(
        cfg.clone(),
        LayerSpan::full(cfg.num_layers),
        Mode::Train,
    )?)
}

/// Mean held-out loss of `params` on `seqs` (no gradients), with the same differentiable ops
/// as training, so every worker scoring the same vector gets the same number.
pub fn loss_of(
    cfg: &Arc<ModelConfig>,
    params: &Params,
    seqs: &[Sequence],
) -> Result<f32, TrainError> {
    let stage = train_stage(cfg, params.to_tensors()?)?;
    let mut total = 0f64;
    let mut n = 0usize;
    // Chunks bound the activation memory; the mean is weighted by chunk size.
    for chunk in seqs.chunks(128) {
        let l = masked_loss(&stage, chunk)?.to_scalar::<f32>()?;
        total += f64::from(l) * chunk.len() as f64;
        n += chunk.len();
    }
    Ok((total / n.max(1) as f64) as f32)
}

/// The inner loop: a model being trained from given weights and optimizer state.
///
/// The weights live once, in the variables the stage computes with (no flat copy beside them):
/// each step takes the gradients out tensor by tensor and updates each variable in place of
/// its slice of the optimizer's moments. [`Self::params`] flattens them on demand.
pub struct Trainer {
    model_config: Arc<ModelConfig>,
    inner: InnerConfig,
    layout: Arc<Layout>,
    /// One variable per layout entry, in layout order; the stage computes with them.
    vars: Vec<Var>,
    stage: Stage,
    opt: AdamWState,
}

impl Trainer {
    /// A trainer at `params` with optimizer state `opt` (use [`AdamWState::new`] to start).
    pub fn from_params(
        model_config: Arc<ModelConfig>,
        params: Params,
        opt: AdamWState,
        inner: InnerConfig,
    ) -> Result<Self, TrainError> {
        Self::from_weights(model_config, &params, opt, inner)
    }

    /// [`Self::from_params`] from borrowed weights (copied once, into the variables).
    pub fn from_weights(
        model_config: Arc<ModelConfig>,
        params: &Params,
        opt: AdamWState,
        inner: InnerConfig,
    ) -> Result<Self, TrainError> {
        if opt.len() != params.values.len() {
            return Err(TrainError::Config(format!(
                "optimizer state covers {} parameters, the weights have {}",
                opt.len(),
                params.values.len()
            )));
        }
        let entries = params.layout.entries();
        let mut vars = Vec::with_capacity(entries.len());
        let mut map = HashMap::with_capacity(entries.len());
        let mut off = 0;
        for (name, shape) in entries {
            let n: usize = shape.iter().product();
            let var =
                Var::from_slice(&params.values[off..off + n], shape.as_slice(), &Device::Cpu)?;
            map.insert(name.clone(), var.as_tensor().clone());
            vars.push(var);
            off += n;
        }
        let stage = train_stage(&model_config, map)?;
        Ok(Self {
            model_config,
            inner,
            layout: Arc::clone(&params.layout),
            vars,
            stage,
            opt,
        })
    }

    pub fn model_config(&self) -> &Arc<ModelConfig> {
        &self.model_config
    }

    pub fn inner(&self) -> &InnerConfig {
        &self.inner
    }

    /// The current weights (a copy, flattened from the variables).
    pub fn params(&self) -> Result<Params, TrainError> {
        let mut values = Vec::with_capacity(self.layout.len());
        for var in &self.vars {
            values.extend(var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Params {
            layout: Arc::clone(&self.layout),
            values,
        })
    }

    pub fn opt_state(&self) -> &AdamWState {
        &self.opt
    }

    /// Gives back weights and optimizer state.
    pub fn into_state(self) -> Result<(Params, AdamWState), TrainError> {
        let params = self.params()?;
        Ok((params, self.opt))
    }

    /// One optimizer step on `batch`; `step` (0-based, counted over the whole run) picks the
    /// learning rate from the schedule.
    pub fn step_on(&mut self, step: usize, batch: &[Sequence]) -> Result<StepReport, TrainError> {
        let (loss, mut grads) = {
            let loss = masked_loss(&self.stage, batch)?;
            let grads = loss.backward()?;
            // The loss tensor, and with it the step's graph and activations, goes here.
            (loss.to_scalar::<f32>()?, grads)
        };
        // Each gradient leaves the store as it is flattened: at most one extra tensor.
        let mut flat = Vec::with_capacity(self.layout.len());
        for (var, (_, shape)) in self.vars.iter().zip(self.layout.entries()) {
            match grads.remove(var.as_tensor()) {
                Some(g) => flat.extend(g.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0.0, shape.iter().product())),
            }
        }
        drop(grads);
        let grad_norm = flat
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
            .sqrt();
        if !grad_norm.is_finite() {
            return Err(TrainError::Diverged { step });
        }
        if self.inner.clip > 0.0 && grad_norm > self.inner.clip {
            let scale = (self.inner.clip / (grad_norm + 1e-6)) as f32;
            flat.iter_mut().for_each(|g| *g *= scale);
        }
        let lr = self.inner.lr_for(step, self.opt.step);
        let k = self.opt.begin_step(&self.inner.adamw, lr);
        let mut off = 0;
        for (var, (_, shape)) in self.vars.iter().zip(self.layout.entries()) {
            let n: usize = shape.iter().product();
            let mut values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            self.opt.apply(&k, off, &mut values, &flat[off..off + n]);
            var.set(&Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?)?;
            off += n;
        }
        Ok(StepReport {
            step,
            loss,
            lr,
            grad_norm,
        })
    }

    /// `ids.len() / batch_size` steps on the examples `ids` of `shard`, batch `j` taking
    /// `ids[j * batch_size..][..batch_size]`; the first step is step `first_step` of the
    /// schedule.
    pub fn run(
        &mut self,
        shard: &dyn Shard,
        ids: &[u64],
        batch_size: usize,
        first_step: usize,
    ) -> Result<Vec<StepReport>, TrainError> {
        if batch_size == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch_size) {
            return Err(TrainError::Config(format!(
                "{} example ids do not make whole batches of {batch_size}",
                ids.len()
            )));
        }
        ids.chunks(batch_size)
            .enumerate()
            .map(|(j, chunk)| self.step_on(first_step + j, &shard.batch(chunk)?))
            .collect()
    }

    /// An inference stage over the current weights.
    pub fn inference_stage(&self) -> Result<Stage, TrainError> {
        inference_stage(&self.model_config, &self.params()?)
    }
}

/// An inference stage (whole model) over `params`.
pub fn inference_stage(cfg: &Arc<ModelConfig>, params: &Params) -> Result<Stage, TrainError> {
    Ok(
        WeightSource::Hf(&HfTensors::Map(params.to_tensors()?)).build_stage(
            cfg.clone(),
            LayerSpan::full(cfg.num_layers),
            Mode::Infer,
        )?,
    )
}

/// A whole single-machine run on a synthetic task: fresh weights from the seed, example
/// `step * batch + j` at step `step`.
pub struct TaskTrainer {
    pub config: TrainConfig,
    pub model_config: Arc<ModelConfig>,
    pub tokenizer: tokenizers::Tokenizer,
    shard: TaskShard,
    trainer: Trainer,
}

impl TrainConfig {
    /// The inner-loop hyperparameters of this run.
    pub fn inner(&self) -> InnerConfig {
        InnerConfig {
            lr: self.lr,
            warmup: self.warmup,
            min_lr_ratio: self.min_lr_ratio,
            schedule_steps: self.steps,
            clip: self.clip,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
        }
    }
}

impl TaskTrainer {
    pub fn new(config: TrainConfig) -> Result<Self, TrainError> {
        if config.batch_size == 0 || config.steps == 0 {
            return Err(TrainError::Config(
                "steps and batch size must be positive".into(),
            ));
        }
        let shard = TaskShard::new(config.task, config.seed)?;
        let tokenizer = shard.tokenizer().clone();
        let cfg = Arc::new(task_model_config(&config, tokenizer.get_vocab_size(true))?);
        let params = Params::from_tensors(&init_weights(&cfg, config.seed)?)?;
        let opt = AdamWState::new(params.values.len());
        let trainer = Trainer::from_params(cfg.clone(), params, opt, config.inner())?;
        Ok(Self {
            config,
            model_config: cfg,
            tokenizer,
            shard,
            trainer,
        })
    }

    /// One optimizer step (0-based `step`).
    pub fn step(&mut self, step: usize) -> Result<StepReport, TrainError> {
        let b = self.config.batch_size as u64;
        let ids: Vec<u64> = (0..b).map(|j| step as u64 * b + j).collect();
        let batch = self.shard.batch(&ids)?;
        self.trainer.step_on(step, &batch)
    }

    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// An inference stage over the current weights.
    pub fn inference_stage(&self) -> Result<Stage, TrainError> {
        self.trainer.inference_stage()
    }

    /// The current weights by Hugging Face name.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        self.trainer.params()?.to_tensors()
    }

    /// Greedy exact-match accuracy on the first `n` held-out examples.
    pub fn evaluate(&self, n: usize) -> Result<EvalReport, TrainError> {
        let stage = self.trainer.inference_stage()?;
        evaluate(
            &stage,
            &self.tokenizer,
            self.config.task,
            self.shard.eos(),
            n,
        )
    }

    /// Writes the checkpoint (see [`checkpoint::save`]).
    pub fn save(
        &self,
        dir: &std::path::Path,
        metrics: serde_json::Value,
    ) -> Result<(), TrainError> {
        checkpoint::save(
            dir,
            &self.model_config,
            &self.weights()?,
            &self.tokenizer,
            serde_json::json!({
                "task": self.config.task.name(),
                "task_size": self.config.task.size(),
                "steps": self.config.steps,
                "batch_size": self.config.batch_size,
                "lr": self.config.lr,
                "warmup": self.config.warmup,
                "clip": self.config.clip,
                "seed": self.config.seed,
                "metrics": metrics,
            }),
        )
    }
}

/// Greedy exact-match evaluation of `stage` on the first `n` held-out examples of `task`,
/// batched (all examples of a task have the same length).
pub fn evaluate(
    stage: &Stage,
    tokenizer: &tokenizers::Tokenizer,
    task: Task,
    eos: u32,
    n: usize,
) -> Result<EvalReport, TrainError> {
    let (_, a) = task.lengths();
    let enc = |s: &str| -> Vec<u32> {
        tokenizer
            .encode(s, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    };
    let examples: Vec<_> = (0..n as u64).map(|i| task.held_out_example(i)).collect();
    let mut report = EvalReport {
        correct: 0,
        total: n,
        predictions: Vec::with_capacity(n),
    };
    for chunk in examples.chunks(256) {
        let mut seqs: Vec<Vec<u32>> = chunk.iter().map(|e| enc(&e.prompt)).collect();
        for _ in 0..=a {
            let len = seqs[0].len();
            let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
            let x = Tensor::from_vec(flat, (seqs.len(), len), &Device::Cpu)?;
            let logits = stage.forward_batch(&x)?.narrow(1, len - 1, 1)?.squeeze(1)?;
            let next: Vec<u32> = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?;
            for (s, t) in seqs.iter_mut().zip(next) {
                s.push(t);
            }
        }
        for (e, s) in chunk.iter().zip(&seqs) {
            let p = s.len() - a - 1;
            let answer = &s[p..p + a];
            let ok = answer == enc(&e.answer).as_slice() && s[p + a] == eos;
            report.correct += usize::from(ok);
            let pred: Vec<u32> = s[p..].iter().copied().take_while(|&t| t != eos).collect();
            report.predictions.push(pred);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| lr_at(s, 1000, 100, 1.0, 0.1);
        assert!((lr(0) - 0.01).abs() < 1e-12);
        assert!((lr(99) - 1.0).abs() < 1e-12);
        assert!((lr(100) - 1.0).abs() < 1e-12);
        assert!((lr(550) - 0.55).abs() < 1e-9);
        assert!((lr(1000) - 0.1).abs() < 1e-12);
        assert!(lr(300) > lr(301));
    }

    #[test]
    fn a_fresh_optimizer_past_the_warmup_warms_up_again() {
        let inner = InnerConfig {
            lr: 1.0,
            warmup: 10,
            min_lr_ratio: 0.1,
            schedule_steps: 1000,
            clip: 0.0,
            adamw: AdamWConfig::default(),
        };
        // An optimizer that ran from step 0 follows the schedule exactly.
        for s in [0, 5, 9, 10, 500, 999] {
            assert_eq!(inner.lr_for(s, s as u64), inner.lr_at(s));
        }
        // One that joins at step 500 ramps up over its own first 10 steps.
        assert!((inner.lr_for(500, 0) - inner.lr_at(500) / 10.0).abs() < 1e-12);
        assert!((inner.lr_for(504, 4) - inner.lr_at(504) / 2.0).abs() < 1e-12);
        assert_eq!(inner.lr_for(509, 9), inner.lr_at(509));
        assert_eq!(inner.lr_for(600, 100), inner.lr_at(600));
    }

    #[test]
    fn init_is_deterministic() {
        let tc = TrainConfig::new(Task::Reverse { len: 4 });
        let cfg = task_model_config(&tc, 41).unwrap();
        let a = init_weights(&cfg, 7).unwrap();
        let b = init_weights(&cfg, 7).unwrap();
        for (k, t) in &a {
            let d: f32 = (t - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0, "{k}");
        }
    }

    #[test]
    fn loss_falls_in_a_few_steps() {
        let mut tc = TrainConfig::new(Task::Reverse { len: 4 });
        tc.steps = 30;
        tc.warmup = 5;
        tc.batch_size = 16;
        tc.hidden = 64;
        tc.layers = 1;
        let mut t = TaskTrainer::new(tc).unwrap();
        let first = t.step(0).unwrap().loss;
        let mut last = first;
        for s in 1..30 {
            last = t.step(s).unwrap().loss;
        }
        assert!(last < first * 0.8, "loss {first} -> {last}");
    }
}
