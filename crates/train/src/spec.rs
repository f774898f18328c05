//! The signed run spec: everything the workers of a distributed run agree on before round 0
//! (model, data, workers, H, optimizers, codec, rounds, deadline policy), signed by the key of
//! whoever created the run.
//!
//! A spec file is JSON: `{"spec": {...}, "creator": PEER_ID, "public_key": HEX,
//! "signature": HEX}`. The signed bytes are `"plexus-train-spec-v1\n"` followed by the compact
//! JSON of `spec` as this module serialises it (fields in declaration order), so a parsed spec
//! re-serialises to the bytes that were signed. Unknown fields anywhere are refused by name
//! (serde's `deny_unknown_fields`), and so is a version other than [`SPEC_VERSION`].
//!
//! The run's identity ([`SignedSpec::run_id`]) is the digest of the signed bytes and the
//! creator's key: every commitment names it, so a contribution to another run (or to an
//! edited copy of this one) is refused.

use crate::codec::Codec;
use crate::config::{RoundConfig, ScorePolicy};
use crate::deadline::DeadlinePolicy;
use crate::local::{TaskSetup, TextSetup};
use crate::outer::OuterConfig;
use plexus_core::keys::NodeKey;
use plexus_core::Digest;
use plexus_model::train::pretrained::Pretrained;
use plexus_model::train::task::Task;
use plexus_model::train::text::TextShard;
use plexus_model::train::{AdamWConfig, InnerConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// The spec format this build reads and writes.
pub const SPEC_VERSION: u32 = 1;
/// Largest spec file read.
pub const MAX_SPEC_BYTES: u64 = 64 * 1024;
const DOMAIN: &[u8] = b"plexus-train-spec-v1\n";

/// The model trained: a fresh decoder sized for the data's tokenizer, or an existing model to
/// fine-tune ([`ModelSpec::checkpoint`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Width; a fine-tuning run states its model's (checked by every worker).
    pub hidden: usize,
    /// Depth; a fine-tuning run states its model's (checked by every worker).
    pub layers: usize,
    /// Seed of the initial weights (every worker builds the same round-0 weights from it); 0
    /// in a fine-tuning run, which starts from the model's weights.
    pub init_seed: u64,
    /// Fine-tuning: the digest of the model's files
    /// ([`plexus_model::train::pretrained::Pretrained::digest`]; a GGUF or a checkpoint
    /// directory), which every worker holds and checks before round 0. The run trains on a
    /// text tokenized with the model's tokenizer. Absent: a fresh model (and not in the signed
    /// bytes, so specs written before fine-tuning keep the bytes they had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Digest>,
}

/// The data: a synthetic task (addition, reverse or sort) with its seed, or a UTF-8 text
/// ([`TEXT_TASK`]): `size` is then the predictions per window and `text` the digest of the
/// file, which every worker holds and checks before round 0
/// ([`plexus_model::train::text`]: character tokens, windows held out by hash).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub task: String,
    pub size: usize,
    /// Seed of the training examples, of their assignment to workers and of the scoring draw.
    pub seed: u64,
    /// Text runs: sha256 of the text file. Absent for synthetic tasks (and then not in the
    /// signed bytes, so task specs keep the bytes they had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Digest>,
}

/// `DataSpec::task` of a text run.
pub const TEXT_TASK: &str = "text";

/// Longest text window a spec may ask for.
pub const MAX_TEXT_WINDOW: usize = 4096;

/// What a run trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    Task(Task),
    Text { seq_len: usize, digest: Digest },
}

/// How many workers the run takes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSpec {
    /// Round 0 starts once this many workers (this one included) are connected.
    pub min: u32,
    /// Most contributions a round holds.
    pub max: u32,
}

/// The inner optimizer: AdamW with warmup and cosine decay over the run's inner steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InnerSpec {
    pub lr: f64,
    pub warmup: usize,
    pub min_lr_ratio: f64,
    /// Gradient clipping by global L2 norm; 0 disables.
    pub clip: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// The outer optimizer: Nesterov momentum (DiLoCo: lr 0.7, momentum 0.9); momentum 0 is
/// plain SGD.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OuterSpec {
    pub lr: f32,
    pub momentum: f32,
}

/// Round deadline: `median + k * MAD` of measured arrival times (see [`crate::deadline`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadlineSpec {
    pub initial_ms: u64,
    pub min_ms: u64,
    pub max_ms: u64,
    pub k: f64,
    pub slack: f64,
    pub window: usize,
}

/// Gauntlet scoring of contributions on held-out examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    /// Held-out examples per round; 0 disables scoring.
    pub examples: usize,
    pub tolerance: f32,
}

/// Round audits: after a round's set is fixed, each contribution is drawn for re-execution with
/// probability `rate` ([`crate::audit::drawn`]); every worker then re-executes the drawn ones
/// from their commitments before closing (a drawn worker its own too), and one that does not
/// match is dropped and its worker refused for the rest of the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSpec {
    pub rate: f64,
    /// Delegated auditors per drawn contribution ([`crate::reveal::committee`]): only they
    /// re-execute it, and the others take their verdicts (re-executing themselves on a
    /// mismatch or a silence). Absent: every worker re-executes every drawn contribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auditors: Option<u32>,
}

/// Stake: a worker's contributions count only while its account on the run's ledger (the
/// operator's, given to every worker with `--ledger`) has at least `min` staked (ledger units,
/// 1 PLX = 1,000,000). A worker an audit convicts is slashed there: everything slashable, once
/// per round's verdict ([`crate::audit::slash_request`]), the first honest auditor to record
/// it taking the challenger's share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StakeSpec {
    pub min: u64,
}

/// A distributed training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub version: u32,
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub workers: WorkersSpec,
    pub rounds: u64,
    /// Inner steps per round (H).
    pub inner_steps: u32,
    /// Sequences per inner step per worker.
    pub batch_size: u32,
    pub inner: InnerSpec,
    pub outer: OuterSpec,
    /// `f32`, `f16`, `int8` or `sparse`.
    pub codec: String,
    pub error_feedback: bool,
    pub deadline: DeadlineSpec,
    pub score: ScoreSpec,
    /// Held-out examples of the final evaluation (loss and exact match).
    pub eval_examples: usize,
    /// Round audits. Absent: none (and not in the signed bytes, so specs written before audits
    /// keep the bytes they had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSpec>,
    /// Stake asked of every worker. Absent: none (and not in the signed bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stake: Option<StakeSpec>,
}

/// A spec with its creator's signature: the file a run is started from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedSpec {
    pub spec: RunSpec,
    /// The creator's peer id (base58).
    pub creator: String,
    /// Protobuf encoding of the creator's public key, hex.
    pub public_key: String,
    /// Signature of the signed bytes, hex.
    pub signature: String,
}

/// Why a spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the spec file is larger than {MAX_SPEC_BYTES} bytes")]
    TooLarge,
    #[error("the spec does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("spec version {0} (this build reads version {SPEC_VERSION})")]
    Version(u32),
    #[error("the creator's public key does not decode")]
    BadKey,
    #[error("the public key does not belong to the named creator")]
    WrongCreator,
    #[error("the signature does not verify (the spec was altered or signed by another key)")]
    BadSignature,
    #[error("invalid spec: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> SpecError {
    SpecError::Invalid(msg.into())
}

impl RunSpec {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = DOMAIN.to_vec();
        // A struct of plain fields always serialises.
        out.extend(serde_json::to_vec(self).unwrap_or_default());
        out
    }

    /// The synthetic task.
    pub fn task(&self) -> Result<Task, SpecError> {
        match self.data()? {
            Data::Task(task) => Ok(task),
            Data::Text { .. } => Err(invalid("the run trains on a text, not a synthetic task")),
        }
    }

    /// The data: a synthetic task, or a text with its window and digest.
    pub fn data(&self) -> Result<Data, SpecError> {
        let d = &self.data;
        match (d.task.as_str(), d.text) {
            (TEXT_TASK, Some(digest)) => {
                if !(2..=MAX_TEXT_WINDOW).contains(&d.size) {
                    return Err(invalid(format!(
                        "a text run's size (predictions per window) must be 2..={MAX_TEXT_WINDOW}"
                    )));
                }
                Ok(Data::Text {
                    seq_len: d.size,
                    digest,
                })
            }
            (TEXT_TASK, None) => Err(invalid("a text run names its text's digest (data.text)")),
            (_, Some(_)) => Err(invalid(format!("data.text is only for task {TEXT_TASK:?}"))),
            (task, None) => Ok(Data::Task(
                Task::parse(task, d.size).map_err(|e| invalid(e.to_string()))?,
            )),
        }
    }

    pub fn codec(&self) -> Result<Codec, SpecError> {
        self.codec
            .parse::<Codec>()
            .map_err(|e| invalid(e.to_string()))
    }

    /// Checks every field's range (a spec from someone else is a claim).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != SPEC_VERSION {
            return Err(SpecError::Version(self.version));
        }
        if self.name.is_empty() || self.name.len() > 128 {
            return Err(invalid("name must be 1 to 128 bytes"));
        }
        self.data()?;
        let m = &self.model;
        if !(1..=65536).contains(&m.hidden) || !(1..=512).contains(&m.layers) {
            return Err(invalid("model hidden 1..=65536 and layers 1..=512"));
        }
        if m.checkpoint.is_none() && (m.hidden > 4096 || m.layers > 64) {
            return Err(invalid(
                "a fresh model has hidden 1..=4096 and layers 1..=64 (fine-tune a larger one from its checkpoint)",
            ));
        }
        if m.checkpoint.is_some() {
            if m.init_seed != 0 {
                return Err(invalid(
                    "model.init_seed must be 0 in a fine-tuning run: it starts from the checkpoint's weights",
                ));
            }
            if !matches!(self.data()?, Data::Text { .. }) {
                return Err(invalid(format!(
                    "model.checkpoint: a fine-tuning run trains on a text (data.task {TEXT_TASK:?}) tokenized with the model's tokenizer"
                )));
            }
        }
        let w = &self.workers;
        if w.min == 0 || w.min > w.max || w.max > 1024 {
            return Err(invalid("workers: 1 <= min <= max <= 1024"));
        }
        if !(1..=1_000_000).contains(&self.rounds) {
            return Err(invalid("rounds 1..=1000000"));
        }
        let i = &self.inner;
        let finite = [
            i.lr,
            i.min_lr_ratio,
            i.clip,
            i.weight_decay,
            i.beta1,
            i.beta2,
            i.eps,
        ]
        .iter()
        .all(|x| x.is_finite() && *x >= 0.0);
        if !finite || i.lr == 0.0 || i.beta1 >= 1.0 || i.beta2 >= 1.0 || i.eps == 0.0 {
            return Err(invalid(
                "inner: finite non-negative values, lr > 0, eps > 0, betas < 1",
            ));
        }
        let d = &self.deadline;
        if d.min_ms == 0
            || d.min_ms > d.max_ms
            || d.window == 0
            || d.window > 4096
            || !(d.k.is_finite() && d.k >= 0.0)
            || !(d.slack.is_finite() && d.slack >= 0.0)
        {
            return Err(invalid(
                "deadline: 0 < min_ms <= max_ms, 1 <= window <= 4096, k and slack finite >= 0",
            ));
        }
        if self.score.examples > 100_000
            || !(self.score.tolerance.is_finite() && self.score.tolerance >= 0.0)
        {
            return Err(invalid("score: examples <= 100000, tolerance finite >= 0"));
        }
        if !(1..=100_000).contains(&self.eval_examples) {
            return Err(invalid("eval_examples 1..=100000"));
        }
        if let Some(a) = &self.audit {
            if !(a.rate.is_finite() && (0.0..=1.0).contains(&a.rate)) {
                return Err(invalid("audit.rate must be a probability, 0 to 1"));
            }
            if a.auditors.is_some_and(|k| k == 0 || k >= self.workers.max) {
                return Err(invalid(
                    "audit.auditors must be at least 1 and below workers.max (leave it out for every worker to audit)",
                ));
            }
        }
        if self.stake.as_ref().is_some_and(|s| s.min == 0) {
            return Err(invalid(
                "stake.min must be above 0 (leave stake out for a run without one)",
            ));
        }
        self.round_config(Digest::of(b"check"))?
            .validate()
            .map_err(|e| invalid(e.to_string()))
    }

    /// Probability that a contribution is re-executed by the other workers (0 without audits).
    pub fn audit_rate(&self) -> f64 {
        self.audit.as_ref().map_or(0.0, |a| a.rate)
    }

    /// Delegated auditors per drawn contribution (`None`: every worker audits).
    pub fn audit_committee(&self) -> Option<usize> {
        self.audit.as_ref()?.auditors.map(|k| k as usize)
    }

    /// Stake (ledger units) a worker must hold for its contributions to count (0: none).
    pub fn min_stake(&self) -> u64 {
        self.stake.as_ref().map_or(0, |s| s.min)
    }

    /// The round settings of this run, named `run`.
    pub fn round_config(&self, run: Digest) -> Result<RoundConfig, SpecError> {
        let i = &self.inner;
        let outer = if self.outer.momentum == 0.0 {
            OuterConfig::Sgd { lr: self.outer.lr }
        } else {
            OuterConfig::Nesterov {
                lr: self.outer.lr,
                momentum: self.outer.momentum,
            }
        };
        let schedule_steps =
            usize::try_from(self.rounds.saturating_mul(u64::from(self.inner_steps)))
                .map_err(|_| invalid("rounds x inner steps overflows"))?;
        Ok(RoundConfig {
            run,
            seed: self.data.seed,
            inner_steps: self.inner_steps,
            batch_size: self.batch_size,
            inner: InnerConfig {
                lr: i.lr,
                warmup: i.warmup,
                min_lr_ratio: i.min_lr_ratio,
                schedule_steps,
                clip: i.clip,
                adamw: AdamWConfig {
                    beta1: i.beta1,
                    beta2: i.beta2,
                    eps: i.eps,
                    weight_decay: i.weight_decay,
                },
            },
            codec: self.codec()?,
            error_feedback: self.error_feedback,
            outer,
            deadline: DeadlinePolicy {
                initial_ms: self.deadline.initial_ms,
                min_ms: self.deadline.min_ms,
                max_ms: self.deadline.max_ms,
                k: self.deadline.k,
                slack: self.deadline.slack,
                window: self.deadline.window,
            },
            score: ScorePolicy {
                examples: self.score.examples,
                tolerance: self.score.tolerance,
            },
            max_workers: self.workers.max,
        })
    }

    /// The model and data of this run.
    pub fn setup(&self) -> Result<TaskSetup, SpecError> {
        Ok(TaskSetup {
            task: self.task()?,
            hidden: self.model.hidden,
            layers: self.model.layers,
            init_seed: self.model.init_seed,
            eval_examples: self.eval_examples,
        })
    }

    /// The local setup of a text run from the text `shard` a worker opened (with the spec's
    /// window) and, in a fine-tuning run, the model `init` it read (the shard tokenized with
    /// its tokenizer): refused unless they are the spec's text and model.
    pub fn text_setup(
        &self,
        shard: Arc<TextShard>,
        init: Option<Arc<Pretrained>>,
    ) -> Result<TextSetup, SpecError> {
        let Data::Text { seq_len, digest } = self.data()? else {
            return Err(invalid("the run trains on a synthetic task, not a text"));
        };
        if shard.digest() != digest {
            return Err(invalid(format!(
                "the text given has digest {}, the spec's text {digest}",
                shard.digest()
            )));
        }
        if shard.seq_len() != seq_len {
            return Err(invalid(format!(
                "the text was cut into windows of {} predictions, the spec's are {seq_len}",
                shard.seq_len()
            )));
        }
        match (self.model.checkpoint, &init) {
            (None, None) => {}
            (Some(digest), None) => {
                return Err(invalid(format!(
                    "the run fine-tunes the model with digest {digest}: it was not given"
                )))
            }
            (None, Some(_)) => {
                return Err(invalid("the run trains a fresh model, not a checkpoint"))
            }
            (Some(digest), Some(p)) => check_pretrained(&self.model, digest, p, &shard)?,
        }
        Ok(TextSetup {
            shard,
            hidden: self.model.hidden,
            layers: self.model.layers,
            init_seed: self.model.init_seed,
            eval_examples: self.eval_examples,
            init,
        })
    }

    /// Signs the spec with `key` (after validating it).
    pub fn sign(self, key: &NodeKey) -> Result<SignedSpec, SpecError> {
        self.validate()?;
        let signature = key.sign(&self.signed_bytes());
        Ok(SignedSpec {
            creator: key.peer_id().to_base58(),
            public_key: hex::encode(key.public().encode_protobuf()),
            signature: hex::encode(signature),
            spec: self,
        })
    }
}

/// A fine-tuning run's model `p` is the spec's: its files' digest, width and depth, and a
/// context that holds the run's windows.
fn check_pretrained(
    m: &ModelSpec,
    digest: Digest,
    p: &Pretrained,
    shard: &TextShard,
) -> Result<(), SpecError> {
    let seq_len = shard.seq_len();
    if p.digest != digest {
        return Err(invalid(format!(
            "the model {} has digest {}, the spec's model {digest}",
            p.path.display(),
            p.digest
        )));
    }
    let c = &p.config;
    if (c.hidden_size, c.num_layers) != (m.hidden, m.layers) {
        return Err(invalid(format!(
            "the model has hidden {} and {} layers, the spec says hidden {} and {} layers",
            c.hidden_size, c.num_layers, m.hidden, m.layers
        )));
    }
    let (theirs, mine) = (
        shard.tokenizer().get_vocab_size(true),
        p.tokenizer.inner().get_vocab_size(true),
    );
    if theirs != mine || mine > c.vocab_size {
        return Err(invalid(format!(
            "the text was tokenized with a vocabulary of {theirs} tokens, the model's has {mine} (of {} embeddings)",
            c.vocab_size
        )));
    }
    if seq_len + 1 > c.max_position_embeddings {
        return Err(invalid(format!(
            "windows of {} tokens are longer than the model's context of {}",
            seq_len + 1,
            c.max_position_embeddings
        )));
    }
    Ok(())
}

impl SignedSpec {
    /// Parses and verifies spec JSON: unknown fields, a bad signature or an invalid setting
    /// are refused.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        let s: SignedSpec = serde_json::from_str(text)?;
        s.verify()?;
        Ok(s)
    }

    /// Reads and verifies a spec file.
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let io = |source| SpecError::Io {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge);
        }
        Self::from_json(&std::fs::read_to_string(path).map_err(io)?)
    }

    /// The pretty JSON of the file.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the creator's signature, then the spec's settings.
    pub fn verify(&self) -> Result<(), SpecError> {
        let key_bytes = hex::decode(&self.public_key).map_err(|_| SpecError::BadKey)?;
        let key = libp2p_identity::PublicKey::try_decode_protobuf(&key_bytes)
            .map_err(|_| SpecError::BadKey)?;
        if key.to_peer_id().to_base58() != self.creator {
            return Err(SpecError::WrongCreator);
        }
        let sig = hex::decode(&self.signature).map_err(|_| SpecError::BadSignature)?;
        if !key.verify(&self.spec.signed_bytes(), &sig) {
            return Err(SpecError::BadSignature);
        }
        self.spec.validate()
    }

    /// The run's identity: digest of the signed bytes and the creator's key.
    pub fn run_id(&self) -> Digest {
        let mut b = self.spec.signed_bytes();
        b.extend_from_slice(self.public_key.as_bytes());
        Digest::of(&b)
    }

    /// The round settings, named by [`Self::run_id`].
    pub fn round_config(&self) -> Result<RoundConfig, SpecError> {
        self.spec.round_config(self.run_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> RunSpec {
        RunSpec {
            version: SPEC_VERSION,
            name: "reverse-3".into(),
            model: ModelSpec {
                hidden: 32,
                layers: 1,
                init_seed: 1,
                checkpoint: None,
            },
            data: DataSpec {
                task: "reverse".into(),
                size: 3,
                seed: 11,
                text: None,
            },
            workers: WorkersSpec { min: 2, max: 8 },
            rounds: 5,
            inner_steps: 3,
            batch_size: 8,
            inner: InnerSpec {
                lr: 3e-3,
                warmup: 2,
                min_lr_ratio: 0.1,
                clip: 1.0,
                weight_decay: 0.01,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
            },
            outer: OuterSpec {
                lr: 0.7,
                momentum: 0.9,
            },
            codec: "f16".into(),
            error_feedback: false,
            deadline: DeadlineSpec {
                initial_ms: 10_000,
                min_ms: 100,
                max_ms: 60_000,
                k: 3.0,
                slack: 0.25,
                window: 64,
            },
            score: ScoreSpec {
                examples: 16,
                tolerance: 0.0,
            },
            eval_examples: 64,
            audit: None,
            stake: None,
        }
    }

    fn key() -> NodeKey {
        NodeKey::from_secret([5; 32]).unwrap()
    }

    #[test]
    fn a_signed_spec_round_trips_and_names_its_run() {
        let s = example().sign(&key()).unwrap();
        let back = SignedSpec::from_json(&s.to_json()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.run_id(), s.run_id());
        let cfg = back.round_config().unwrap();
        assert_eq!(cfg.run, s.run_id());
        assert_eq!(cfg.inner.schedule_steps, 15);
        assert_eq!(cfg.max_workers, 8);
        let mut other = example();
        other.rounds = 6;
        assert_ne!(other.sign(&key()).unwrap().run_id(), s.run_id());
    }

    #[test]
    fn altered_forged_and_unknown_fields_are_refused_by_name() {
        let s = example().sign(&key()).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        v["spec"]["rounds"] = 50.into();
        let e = SignedSpec::from_json(&v.to_string()).unwrap_err();
        assert!(matches!(e, SpecError::BadSignature), "{e}");
        let other = NodeKey::from_secret([6; 32]).unwrap();
        let mut forged = example().sign(&other).unwrap();
        forged.creator = s.creator.clone();
        let e = SignedSpec::from_json(&forged.to_json()).unwrap_err();
        assert!(matches!(e, SpecError::WrongCreator), "{e}");
        for (path, field) in [
            (None, "colour"),
            (Some("data"), "corpus"),
            (Some("inner"), "nesterov"),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
            match path {
                None => v["spec"][field] = 1.into(),
                Some(p) => v["spec"][p][field] = 1.into(),
            }
            let e = SignedSpec::from_json(&v.to_string())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("unknown field `{field}`")), "{e}");
        }
        let mut v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        v["trailer"] = 1.into();
        let e = SignedSpec::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `trailer`"), "{e}");
    }

    #[test]
    fn an_audit_rate_is_signed_a_spec_without_one_keeps_its_bytes_and_bad_rates_are_refused() {
        let plain = example().sign(&key()).unwrap();
        assert!(!plain.to_json().contains("audit"));
        assert_eq!(plain.spec.audit_rate(), 0.0);
        let mut audited = example();
        audited.audit = Some(AuditSpec {
            rate: 0.25,
            auditors: None,
        });
        let signed = audited.sign(&key()).unwrap();
        let back = SignedSpec::from_json(&signed.to_json()).unwrap();
        assert_eq!(back.spec.audit_rate(), 0.25);
        assert_ne!(back.run_id(), plain.run_id());
        let mut v: serde_json::Value = serde_json::from_str(&signed.to_json()).unwrap();
        v["spec"]["audit"]["rate"] = 0.0.into();
        let e = SignedSpec::from_json(&v.to_string()).unwrap_err();
        assert!(matches!(e, SpecError::BadSignature), "{e}");
        for rate in [-0.1, 1.5, f64::NAN] {
            let mut bad = example();
            bad.audit = Some(AuditSpec {
                rate,
                auditors: None,
            });
            let e = bad.sign(&key()).unwrap_err().to_string();
            assert!(e.contains("audit.rate"), "{e}");
        }
    }

    #[test]
    fn delegated_auditors_are_signed_and_their_count_is_checked() {
        let plain = example().sign(&key()).unwrap();
        assert_eq!(plain.spec.audit_committee(), None);
        let mut delegated = example();
        delegated.audit = Some(AuditSpec {
            rate: 0.5,
            auditors: Some(1),
        });
        let back =
            SignedSpec::from_json(&delegated.clone().sign(&key()).unwrap().to_json()).unwrap();
        assert_eq!(back.spec.audit_committee(), Some(1));
        for k in [0, delegated.workers.max] {
            let mut bad = delegated.clone();
            bad.audit = Some(AuditSpec {
                rate: 0.5,
                auditors: Some(k),
            });
            let e = bad.sign(&key()).unwrap_err().to_string();
            assert!(e.contains("audit.auditors"), "{e}");
        }
    }

    #[test]
    fn a_stake_is_signed_a_spec_without_one_keeps_its_bytes_and_zero_is_refused() {
        let plain = example().sign(&key()).unwrap();
        assert!(!plain.to_json().contains("stake"));
        assert_eq!(plain.spec.min_stake(), 0);
        let mut staked = example();
        staked.stake = Some(StakeSpec { min: 2_000_000 });
        let signed = staked.sign(&key()).unwrap();
        let back = SignedSpec::from_json(&signed.to_json()).unwrap();
        assert_eq!(back.spec.min_stake(), 2_000_000);
        assert_ne!(back.run_id(), plain.run_id());
        let mut v: serde_json::Value = serde_json::from_str(&signed.to_json()).unwrap();
        v["spec"]["stake"]["min"] = 1.into();
        let e = SignedSpec::from_json(&v.to_string()).unwrap_err();
        assert!(matches!(e, SpecError::BadSignature), "{e}");
        let mut bad = example();
        bad.stake = Some(StakeSpec { min: 0 });
        let e = bad.sign(&key()).unwrap_err().to_string();
        assert!(e.contains("stake.min"), "{e}");
    }

    #[test]
    fn invalid_settings_are_refused_before_signing() {
        let mut bad = example();
        bad.codec = "int4".into();
        assert!(bad.sign(&key()).unwrap_err().to_string().contains("int4"));
        let mut bad = example();
        bad.workers = WorkersSpec { min: 3, max: 2 };
        assert!(bad.sign(&key()).is_err());
        let mut bad = example();
        bad.version = 2;
        assert!(matches!(bad.sign(&key()), Err(SpecError::Version(2))));
        let mut bad = example();
        bad.data.task = "poetry".into();
        assert!(bad.sign(&key()).is_err());
    }

    /// About 6,000 characters of words drawn by a seeded generator.
    fn words(seed: u64) -> String {
        const WORDS: [&str; 12] = [
            "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "pack", "my",
            "box",
        ];
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut out = String::new();
        while out.len() < 6000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
            out.push(if (x >> 20).is_multiple_of(9) {
                '.'
            } else {
                ' '
            });
        }
        out
    }

    fn corpus() -> Arc<TextShard> {
        Arc::new(TextShard::from_text(&words(1), 16).unwrap())
    }

    fn text_example(shard: &TextShard) -> RunSpec {
        let mut s = example();
        s.data = DataSpec {
            task: TEXT_TASK.into(),
            size: shard.seq_len(),
            seed: 3,
            text: Some(shard.digest()),
        };
        s
    }

    #[test]
    fn a_text_spec_signs_parses_and_takes_only_its_text() {
        let shard = corpus();
        let signed = text_example(&shard).sign(&key()).unwrap();
        let parsed = SignedSpec::from_json(&signed.to_json()).unwrap();
        assert_eq!(parsed.run_id(), signed.run_id());
        assert_eq!(
            parsed.spec.data().unwrap(),
            Data::Text {
                seq_len: 16,
                digest: shard.digest()
            }
        );
        let setup = parsed.spec.text_setup(shard.clone(), None).unwrap();
        assert_eq!(setup.shard.digest(), shard.digest());
        // Another text, or the same text cut into other windows, is refused by name.
        let other = Arc::new(TextShard::from_text(&words(2), 16).unwrap());
        let e = parsed
            .spec
            .text_setup(other, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("digest"), "{e}");
        let recut = Arc::new(TextShard::from_text(&words(1), 8).unwrap());
        let e = parsed
            .spec
            .text_setup(recut, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("windows of 8"), "{e}");
        // A task spec has no text to set up, and its JSON has no text field (its signed
        // bytes are those of specs written before text runs).
        assert!(example().text_setup(shard, None).is_err());
        assert!(!example()
            .sign(&key())
            .unwrap()
            .to_json()
            .contains("\"text\""));
    }

    /// A checkpoint directory of a fresh 1-layer model with the text's character tokenizer.
    fn saved_model(text: &str, seed: u64) -> (tempfile::TempDir, Arc<Pretrained>) {
        use plexus_model::train::{checkpoint, init_weights, small_llama_config};
        let base = TextShard::from_text(text, 16).unwrap();
        let vocab = base.tokenizer().get_vocab_size(true);
        let cfg = small_llama_config(32, 1, vocab, 17).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let w = init_weights(&cfg, seed).unwrap();
        checkpoint::save(
            dir.path(),
            &cfg,
            &w,
            base.tokenizer(),
            serde_json::json!({}),
        )
        .unwrap();
        let p = Arc::new(Pretrained::open(dir.path()).unwrap());
        (dir, p)
    }

    #[test]
    fn a_fine_tuning_spec_starts_from_its_model_and_no_other() {
        use crate::local::LocalData as _;
        let text = words(1);
        let (_dir, model) = saved_model(&text, 5);
        let shard = Arc::new(TextShard::from_text_with(&text, 16, &model.tokenizer).unwrap());
        let mut spec = text_example(&shard);
        spec.model = ModelSpec {
            hidden: 32,
            layers: 1,
            init_seed: 0,
            checkpoint: Some(model.digest),
        };
        let signed = spec.clone().sign(&key()).unwrap();
        let parsed = SignedSpec::from_json(&signed.to_json()).unwrap();
        assert_eq!(parsed.run_id(), signed.run_id());
        let setup = parsed
            .spec
            .text_setup(shard.clone(), Some(model.clone()))
            .unwrap();
        let (cfg, _, params) = setup.prepare(0).unwrap();
        assert_eq!((&*cfg, &params), (&*model.config, &model.params));
        let refused = |s: &RunSpec, m: Option<Arc<Pretrained>>| {
            s.text_setup(shard.clone(), m).err().unwrap().to_string()
        };
        // Without the model, with another model, or with a spec that misstates it.
        assert!(refused(&spec, None).contains("not given"));
        let (_dir2, other) = saved_model(&text, 6);
        assert!(refused(&spec, Some(other)).contains("digest"));
        let mut wide = spec.clone();
        wide.model.hidden = 64;
        assert!(refused(&wide, Some(model.clone())).contains("hidden 32"));
        // A fresh model's spec takes no model (and its JSON has no checkpoint field).
        assert!(refused(&text_example(&shard), Some(model.clone())).contains("fresh"));
        assert!(!example()
            .sign(&key())
            .unwrap()
            .to_json()
            .contains("checkpoint"));
        // A seed, or a synthetic task, with a checkpoint is refused by name.
        let mut seeded = spec.clone();
        seeded.model.init_seed = 1;
        let e = seeded.sign(&key()).err().unwrap().to_string();
        assert!(e.contains("init_seed"), "{e}");
        let mut task = example();
        task.model = spec.model.clone();
        let e = task.sign(&key()).err().unwrap().to_string();
        assert!(e.contains("trains on a text"), "{e}");
    }

    #[test]
    fn text_fields_must_agree() {
        let shard = corpus();
        let mut no_digest = text_example(&shard);
        no_digest.data.text = None;
        let e = no_digest.sign(&key()).err().unwrap().to_string();
        assert!(e.contains("data.text"), "{e}");
        let mut task_with_text = example();
        task_with_text.data.text = Some(shard.digest());
        let e = task_with_text.sign(&key()).err().unwrap().to_string();
        assert!(e.contains("data.text"), "{e}");
        let mut huge = text_example(&shard);
        huge.data.size = MAX_TEXT_WINDOW + 1;
        assert!(huge.sign(&key()).is_err());
        assert!(text_example(&shard).task().is_err());
    }
}
