//! Training the model definition of [`crate::stage`] in f32 on one machine: AdamW with linear
//! warmup and cosine decay, gradient clipping by global norm, exact-match evaluation on a
//! held-out split, and checkpoints in Hugging Face layout that [`crate::load`] reads back.
//!
//! Flow of one step: examples `(seed, step * batch + j)` -> token batch -> `Stage::forward_batch`
//! (differentiable ops) -> masked cross-entropy on the answer tokens -> backward -> clip ->
//! AdamW at the scheduled learning rate.

pub mod checkpoint;
pub mod task;

use crate::config::{Architecture, ModelConfig, RopeLayout, RopeScaling};
use crate::layers::Mode;
use crate::stage::{LayerSpan, Stage};
use crate::weights::{HfTensors, LoadWeightsError, Weight, WeightSource};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use plexus_core::rng::{CounterRng, Stream};
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

/// A model being trained on a task.
pub struct Trainer {
    pub config: TrainConfig,
    pub model_config: Arc<ModelConfig>,
    pub tokenizer: tokenizers::Tokenizer,
    vars: Vec<(String, Var)>,
    stage: Stage,
    opt: AdamW,
    eos: u32,
}

/// The model a task trains: a small Llama with tied embeddings.
pub fn task_model_config(tc: &TrainConfig, vocab_size: usize) -> Result<ModelConfig, TrainError> {
    if !tc.hidden.is_multiple_of(32) || tc.hidden == 0 || tc.layers == 0 {
        return Err(TrainError::Config(format!(
            "hidden size {} must be a positive multiple of 32, layers {} positive",
            tc.hidden, tc.layers
        )));
    }
    let heads = tc.hidden / 32;
    let (p, a) = tc.task.lengths();
    Ok(ModelConfig {
        architecture: Architecture::Llama,
        vocab_size,
        hidden_size: tc.hidden,
        intermediate_size: tc.hidden * 4,
        num_layers: tc.layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_layout: RopeLayout::HalfSplit,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: (p + a + 1).next_power_of_two().max(64),
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

impl Trainer {
    pub fn new(config: TrainConfig) -> Result<Self, TrainError> {
        if config.batch_size == 0 || config.steps == 0 {
            return Err(TrainError::Config(
                "steps and batch size must be positive".into(),
            ));
        }
        let tokenizer = task::task_tokenizer().map_err(TrainError::Config)?;
        let eos = tokenizer
            .token_to_id(task::EOS)
            .ok_or_else(|| TrainError::Config("task tokenizer lacks EOS".into()))?;
        let cfg = Arc::new(task_model_config(&config, tokenizer.get_vocab_size(true))?);
        let init = init_weights(&cfg, config.seed)?;
        let mut vars: Vec<(String, Var)> = init
            .into_iter()
            .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let map = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let stage = WeightSource::Hf(&HfTensors::Map(map)).build_stage(
            cfg.clone(),
            LayerSpan::full(cfg.num_layers),
            Mode::Train,
        )?;
        let opt = AdamW::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            ParamsAdamW {
                lr: config.lr,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: config.weight_decay,
            },
        )?;
        Ok(Self {
            config,
            model_config: cfg,
            tokenizer,
            vars,
            stage,
            opt,
            eos,
        })
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        // The task alphabet is closed, so every character is one known token.
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// Tokens `[batch, len]` of `prompt + answer + EOS` for training step `step`.
    fn batch(&self, step: usize) -> Result<Vec<Vec<u32>>, TrainError> {
        let b = self.config.batch_size;
        let (p, a) = self.config.task.lengths();
        (0..b)
            .map(|j| {
                let e = self
                    .config
                    .task
                    .train_example(self.config.seed, (step * b + j) as u64);
                let mut ids = self.encode(&e.prompt);
                ids.extend(self.encode(&e.answer));
                ids.push(self.eos);
                if ids.len() != p + a + 1 {
                    return Err(TrainError::Config(format!(
                        "example {e:?} did not tokenize"
                    )));
                }
                Ok(ids)
            })
            .collect()
    }

    /// One optimizer step (0-based `step`).
    pub fn step(&mut self, step: usize) -> Result<StepReport, TrainError> {
        let seqs = self.batch(step)?;
        let (p, _) = self.config.task.lengths();
        let (b, len) = (seqs.len(), seqs[0].len());
        let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
        let all = Tensor::from_vec(flat, (b, len), &Device::Cpu)?;
        let inputs = all.narrow(1, 0, len - 1)?.contiguous()?;
        let targets = all.narrow(1, 1, len - 1)?.contiguous()?;
        // Loss only where the target is part of the answer (or its EOS).
        let mask: Vec<f32> = (0..len - 1)
            .map(|t| if t + 1 >= p { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (1, len - 1), &Device::Cpu)?;
        let logits = self.stage.forward_batch(&inputs)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = logp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?;
        let n = mask.sum_all()?.to_scalar::<f32>()? * b as f32;
        let loss = (picked.broadcast_mul(&mask)?.sum_all()? * (-1.0 / f64::from(n)))?;
        let mut grads = loss.backward()?;
        let mut sq = 0f64;
        for (_, v) in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
            }
        }
        let grad_norm = sq.sqrt();
        if self.config.clip > 0.0 && grad_norm > self.config.clip {
            let scale = self.config.clip / (grad_norm + 1e-6);
            for (_, v) in &self.vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * scale)?);
                }
            }
        }
        let lr = lr_at(
            step,
            self.config.steps,
            self.config.warmup,
            self.config.lr,
            self.config.min_lr_ratio,
        );
        self.opt.set_learning_rate(lr);
        self.opt.step(&grads)?;
        Ok(StepReport {
            step,
            loss: loss.to_scalar::<f32>()?,
            lr,
            grad_norm,
        })
    }

    /// The current weights by Hugging Face name (detached copies of the variables' values).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        self.vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// An inference stage over the current weights.
    pub fn inference_stage(&self) -> Result<Stage, TrainError> {
        let cfg = self.model_config.clone();
        Ok(
            WeightSource::Hf(&HfTensors::Map(self.weights()?)).build_stage(
                cfg.clone(),
                LayerSpan::full(cfg.num_layers),
                Mode::Infer,
            )?,
        )
    }

    /// Greedy exact-match accuracy on the first `n` held-out examples.
    pub fn evaluate(&self, n: usize) -> Result<EvalReport, TrainError> {
        let stage = self.inference_stage()?;
        evaluate(&stage, &self.tokenizer, self.config.task, self.eos, n)
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
                "task_size": match self.config.task {
                    Task::Addition { digits } => digits,
                    Task::Reverse { len } | Task::Sort { len } => len,
                },
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
        let mut t = Trainer::new(tc).unwrap();
        let first = t.step(0).unwrap().loss;
        let mut last = first;
        for s in 1..30 {
            last = t.step(s).unwrap().loss;
        }
        assert!(last < first * 0.8, "loss {first} -> {last}");
    }
}
