//! Several workers in one process on a synthetic task or a text: the DiLoCo protocol exactly as the
//! network runs it (signed contributions, the round machine's checks, scoring, the outer step),
//! minus the transport; and the synchronous data-parallel baseline at equal tokens. Used by
//! `plexus bench train` and the tests.
//!
//! Workers run one after another; each contribution "arrives" at the round's open time plus
//! the wall time its worker took (measured here, by the driver, never inside the machine), as
//! if the workers had run side by side. One [`RoundMachine`] stands for all workers' copies:
//! they hold the same set and so compute the same state (tested in `tests/rounds.rs`).

use crate::assign::example_ids;
use crate::codec::Codec;
use crate::config::RoundConfig;
use crate::outer::OuterState;
use crate::round::{GlobalState, Refusal, RoundMachine, RoundOutcome};
use crate::score::HeldOutScorer;
use crate::worker::{work_round, WorkError, WorkerState};
use plexus_core::keys::NodeKey;
use plexus_model::train::pretrained::Pretrained;
use plexus_model::train::task::Task;
use plexus_model::train::text::TextShard;
use plexus_model::train::{
    evaluate, inference_stage, init_weights, loss_of, small_llama_config, task_model_config,
    AdamWState, HeldOut, Params, Shard, TaskShard, TrainConfig, TrainError, Trainer,
};
use plexus_model::ModelConfig;
use std::sync::Arc;
use std::time::Instant;

/// The model and data of a local run.
#[derive(Clone, Debug)]
pub struct TaskSetup {
    pub task: Task,
    pub hidden: usize,
    pub layers: usize,
    /// Seed of the initial weights.
    pub init_seed: u64,
    /// Held-out examples of the final evaluation (loss and exact match).
    pub eval_examples: usize,
}

/// A text corpus as the data of a local run (see [`plexus_model::train::text`]).
#[derive(Clone)]
pub struct TextSetup {
    pub shard: Arc<TextShard>,
    pub hidden: usize,
    pub layers: usize,
    /// Seed of the initial weights.
    pub init_seed: u64,
    /// Held-out windows of the final evaluation (loss).
    pub eval_examples: usize,
    /// Fine-tuning: the model the run starts from (the shard is tokenized with its
    /// tokenizer); `hidden`, `layers` and `init_seed` (0) are then not used.
    pub init: Option<Arc<Pretrained>>,
}

/// Model config, shard and initial weights of a run.
pub type Prepared<S> = (Arc<ModelConfig>, Arc<S>, Params);

/// The model and data of a local run: a synthetic task ([`TaskSetup`]) or a text
/// ([`TextSetup`]).
pub trait LocalData {
    type Shard: HeldOut + 'static;

    /// Model config, shard and initial weights with data seed `seed`.
    fn prepare(&self, seed: u64) -> Result<Prepared<Self::Shard>, LocalError>;

    /// Held-out loss and exact match (NaN where the data has no exact answers) of `params`.
    fn evaluate(
        &self,
        model: &Arc<ModelConfig>,
        shard: &Self::Shard,
        params: &Params,
    ) -> Result<(f32, f64), LocalError>;

    /// Tokens in one training example.
    fn tokens_per_example(&self) -> u64;

    /// The tokenizer a checkpoint of the run is saved with.
    fn tokenizer<'a>(&self, shard: &'a Self::Shard) -> &'a tokenizers::Tokenizer;

    /// The `tokenizer_config.json` of the run's checkpoints when it is not the one of a model
    /// trained from scratch (a fine-tuned model keeps its own).
    fn tokenizer_config(&self) -> Option<serde_json::Value> {
        None
    }

    /// Drops the initial weights the setup holds once a caller has [`Self::prepare`]d its own
    /// copy and will not prepare again (a fine-tuned model's weights: a model-sized vector).
    fn release_weights(&mut self) {}
}

impl LocalData for TaskSetup {
    type Shard = TaskShard;

    fn prepare(&self, seed: u64) -> Result<Prepared<TaskShard>, LocalError> {
        prepare(self, seed)
    }

    fn evaluate(
        &self,
        model: &Arc<ModelConfig>,
        shard: &TaskShard,
        params: &Params,
    ) -> Result<(f32, f64), LocalError> {
        evaluate_params(self, model, shard, params)
    }

    fn tokens_per_example(&self) -> u64 {
        let (p, a) = self.task.lengths();
        (p + a + 1) as u64
    }

    fn tokenizer<'a>(&self, shard: &'a TaskShard) -> &'a tokenizers::Tokenizer {
        shard.tokenizer()
    }
}

impl LocalData for TextSetup {
    type Shard = TextShard;

    fn prepare(&self, _seed: u64) -> Result<Prepared<TextShard>, LocalError> {
        if let Some(p) = &self.init {
            return Ok((p.config.clone(), self.shard.clone(), p.params.clone()));
        }
        let cfg = Arc::new(small_llama_config(
            self.hidden,
            self.layers,
            self.shard.tokenizer().get_vocab_size(true),
            self.shard.seq_len() + 1,
        )?);
        let params = Params::from_tensors(&init_weights(&cfg, self.init_seed)?)?;
        Ok((cfg, self.shard.clone(), params))
    }

    fn evaluate(
        &self,
        model: &Arc<ModelConfig>,
        shard: &TextShard,
        params: &Params,
    ) -> Result<(f32, f64), LocalError> {
        let n = self.eval_examples.min(shard.held_out_windows());
        let seqs = (0..n as u64)
            .map(|i| shard.held_out(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((loss_of(model, params, &seqs)?, f64::NAN))
    }

    fn tokens_per_example(&self) -> u64 {
        self.shard.seq_len() as u64 + 1
    }

    fn tokenizer<'a>(&self, shard: &'a TextShard) -> &'a tokenizers::Tokenizer {
        shard.tokenizer()
    }

    fn tokenizer_config(&self) -> Option<serde_json::Value> {
        self.init.as_ref().map(|p| p.tokenizer_config())
    }

    fn release_weights(&mut self) {
        if let Some(p) = &self.init {
            self.init = Some(Arc::new(p.without_params()));
        }
    }
}

/// What a run ended with.
#[derive(Clone, Debug)]
pub struct Report {
    /// Mean held-out loss of the final weights.
    pub loss: f32,
    /// Held-out exact match of greedy answers (NaN for text).
    pub accuracy: f64,
    /// Payload bytes each worker sent (the largest over workers).
    pub bytes_per_worker: u64,
    /// Payload bytes each worker received from the others (all-gather; the largest).
    pub bytes_received_per_worker: u64,
    /// Training tokens processed over all workers.
    pub tokens: u64,
    pub seconds: f64,
    pub params: Params,
}

/// Why a local run failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("invalid run: {0}")]
    Config(String),
    #[error("training failed")]
    Train(#[from] TrainError),
    #[error("worker failed")]
    Work(#[from] WorkError),
    #[error("an honest contribution was refused")]
    Refused(#[from] Refusal),
}

/// Model config, shard and initial weights of `setup` with data seed `seed`.
pub fn prepare(setup: &TaskSetup, seed: u64) -> Result<Prepared<TaskShard>, LocalError> {
    let shard = Arc::new(TaskShard::new(setup.task, seed)?);
    let mut tc = TrainConfig::new(setup.task);
    tc.hidden = setup.hidden;
    tc.layers = setup.layers;
    let cfg = Arc::new(task_model_config(
        &tc,
        shard.tokenizer().get_vocab_size(true),
    )?);
    let params = Params::from_tensors(&init_weights(&cfg, setup.init_seed)?)?;
    Ok((cfg, shard, params))
}

/// The deterministic key of local worker `i` of a run seeded `seed`.
pub fn worker_key(seed: u64, i: usize) -> NodeKey {
    let d = plexus_core::Digest::of(format!("plexus-local-worker/{seed}/{i}").as_bytes());
    // A sha256 output is a valid secp256k1 secret except with negligible probability; fall
    // back to a fresh key rather than fail.
    NodeKey::from_secret(d.0).unwrap_or_else(NodeKey::generate)
}

/// Held-out loss and exact match of `params`.
pub fn evaluate_params(
    setup: &TaskSetup,
    cfg: &Arc<ModelConfig>,
    shard: &TaskShard,
    params: &Params,
) -> Result<(f32, f64), LocalError> {
    let seqs = (0..setup.eval_examples as u64)
        .map(|i| shard.held_out(i))
        .collect::<Result<Vec<_>, _>>()?;
    let loss = loss_of(cfg, params, &seqs)?;
    let stage = inference_stage(cfg, params)?;
    let e = evaluate(
        &stage,
        shard.tokenizer(),
        setup.task,
        shard.eos(),
        setup.eval_examples,
    )?;
    Ok((loss, e.exact_match()))
}

/// Per-round progress of a DiLoCo run.
pub struct RoundProgress<'a> {
    pub outcome: &'a RoundOutcome,
    /// Mean training loss of the workers' last inner step.
    pub train_loss: f32,
    /// Contributions that arrived after the deadline.
    pub late: usize,
    pub bytes_per_worker: u64,
}

/// DiLoCo with `workers` workers for `rounds` rounds.
pub fn run_diloco<D: LocalData>(
    setup: &D,
    cfg: &RoundConfig,
    workers: usize,
    rounds: usize,
    mut progress: impl FnMut(RoundProgress<'_>),
) -> Result<Report, LocalError> {
    cfg.validate()
        .map_err(|e| LocalError::Config(e.to_string()))?;
    if workers == 0 || rounds == 0 {
        return Err(LocalError::Config(
            "workers and rounds must be positive".into(),
        ));
    }
    let started = Instant::now();
    let (model, shard, params) = setup.prepare(cfg.seed)?;
    let n = params.values.len();
    let keys: Vec<NodeKey> = (0..workers).map(|i| worker_key(cfg.seed, i)).collect();
    let mut states: Vec<WorkerState> = (0..workers).map(|_| WorkerState::new(n)).collect();
    let global = GlobalState {
        round: 0,
        params,
        outer: OuterState::new(n),
    };
    let ids = keys.iter().map(|k| k.peer_id().to_bytes());
    let mut machine = RoundMachine::new(cfg.clone(), global, ids, 0);
    let mut scorer = HeldOutScorer {
        model: model.clone(),
        shard: shard.clone(),
        seed: cfg.seed,
        examples: cfg.score.examples,
    };
    let mut clock_ms = 0u64;
    let (mut sent, mut received) = (vec![0u64; workers], vec![0u64; workers]);
    let seq_len = setup.tokens_per_example();
    let mut tokens = 0u64;
    for _ in 0..rounds {
        let round = machine.round();
        let start = machine.state().params.clone();
        let mut arrivals = Vec::with_capacity(workers);
        let mut last_losses = Vec::with_capacity(workers);
        for (w, (k, st)) in keys.iter().zip(states.iter_mut()).enumerate() {
            let t = Instant::now();
            let (c, reports) = work_round(cfg, &model, shard.as_ref(), k, round, &start, st)?;
            let ms = t.elapsed().as_millis() as u64;
            last_losses.push(reports.last().map_or(f32::NAN, |r| r.loss));
            arrivals.push((clock_ms + ms, w, c));
            tokens += cfg.examples_per_round() as u64 * seq_len;
        }
        arrivals.sort_by_key(|(t, w, _)| (*t, *w));
        let mut late = 0;
        for (at, w, c) in &arrivals {
            sent[*w] += c.payload.len() as u64;
            match machine.offer(c, *at) {
                Ok(()) => {}
                // A worker slower than the adaptive deadline misses the round, as on the
                // network (its pseudo-gradient is lost, its bytes were still sent).
                Err(Refusal::PastDeadline { .. }) => late += 1,
                Err(e) => return Err(e.into()),
            }
        }
        let total: u64 = arrivals
            .iter()
            .map(|(_, _, c)| c.payload.len() as u64)
            .sum();
        for (_, w, c) in &arrivals {
            received[*w] += total - c.payload.len() as u64;
        }
        clock_ms = arrivals.last().map_or(clock_ms, |(t, _, _)| *t);
        let outcome = machine.close(clock_ms, &mut scorer)?;
        progress(RoundProgress {
            outcome: &outcome,
            train_loss: last_losses.iter().sum::<f32>() / last_losses.len() as f32,
            late,
            bytes_per_worker: sent.iter().copied().max().unwrap_or(0),
        });
    }
    let params = machine.state().params.clone();
    let (loss, accuracy) = setup.evaluate(&model, &shard, &params)?;
    Ok(Report {
        loss,
        accuracy,
        bytes_per_worker: sent.iter().copied().max().unwrap_or(0),
        bytes_received_per_worker: received.iter().copied().max().unwrap_or(0),
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        params,
    })
}

/// Synchronous data parallel at the same tokens as [`run_diloco`] with the same settings:
/// `rounds * H` steps, each over `workers * batch` examples (the mean of the workers'
/// gradients is the gradient of their joint batch), every worker sending its f32 gradient
/// every step.
pub fn run_sync<D: LocalData>(
    setup: &D,
    cfg: &RoundConfig,
    workers: usize,
    rounds: usize,
) -> Result<Report, LocalError> {
    cfg.validate()
        .map_err(|e| LocalError::Config(e.to_string()))?;
    let started = Instant::now();
    let (model, shard, params) = setup.prepare(cfg.seed)?;
    let n = params.values.len();
    let steps = rounds * cfg.inner_steps as usize;
    let b = cfg.batch_size as usize;
    let mut trainer = Trainer::from_params(model.clone(), params, AdamWState::new(n), cfg.inner)?;
    let keys: Vec<Vec<u8>> = (0..workers)
        .map(|i| worker_key(cfg.seed, i).peer_id().to_bytes())
        .collect();
    for step in 0..steps {
        let ids: Vec<u64> = keys
            .iter()
            .flat_map(|k| example_ids(cfg.seed, step as u64, k, b))
            .collect();
        trainer.step_on(step, &shard.batch(&ids)?)?;
    }
    let (params, _) = trainer.into_state()?;
    let (loss, accuracy) = setup.evaluate(&model, &shard, &params)?;
    let per_step = Codec::F32.encoded_len(n) as u64;
    Ok(Report {
        loss,
        accuracy,
        bytes_per_worker: per_step * steps as u64,
        bytes_received_per_worker: per_step * steps as u64 * (workers as u64 - 1),
        tokens: (steps * workers * b) as u64 * setup.tokens_per_example(),
        seconds: started.elapsed().as_secs_f64(),
        params,
    })
}
