//! `plexus train spec`: builds a run spec from flags, signs it with the creator's node key and
//! writes the file `plexus train --distributed` reads (format: `plexus_train::spec`).

use crate::cli::TrainSpecArgs;
use anyhow::Context as _;
use plexus_core::keys::NodeKey;
use plexus_model::train::pretrained::Pretrained;
use plexus_model::train::text::TextShard;
use plexus_train::spec::TEXT_TASK;
use plexus_train::spec::{
    AuditSpec, DataSpec, DeadlineSpec, InnerSpec, ModelSpec, OuterSpec, RunSpec, ScoreSpec,
    StakeSpec, WorkersSpec, SPEC_VERSION,
};
use plexus_train::Codec;

/// Predictions per window of a text run when `--seq-len` is not given.
const DEFAULT_SEQ_LEN: usize = 32;

pub fn write(a: &TrainSpecArgs) -> anyhow::Result<()> {
    let codec: Codec = a.codec.parse()?;
    let error_feedback = match a.error_feedback.as_str() {
        "auto" => matches!(codec, Codec::Sparse { .. }),
        "on" => true,
        "off" => false,
        other => anyhow::bail!("--error-feedback {other:?}: expected auto, on or off"),
    };
    let init = a
        .checkpoint
        .as_deref()
        // Read whole, weights included: a model whose weights do not load is refused here,
        // and `plexus up --train` then checks only that its files are these (by digest).
        .map(|p| Pretrained::open(p).with_context(|| format!("--checkpoint {}", p.display())))
        .transpose()?;
    let mut text_shard = None;
    let data = match &a.text {
        None => DataSpec {
            task: a.task.clone(),
            size: a.size,
            seed: a.seed,
            text: None,
        },
        Some(path) => {
            let seq_len = a.seq_len.unwrap_or(DEFAULT_SEQ_LEN);
            let shard = match &init {
                Some(p) => TextShard::open_with(path, seq_len, &p.tokenizer),
                None => TextShard::open(path, seq_len),
            }
            .with_context(|| format!("--text {}", path.display()))?;
            let digest = shard.digest();
            text_shard = Some(std::sync::Arc::new(shard));
            DataSpec {
                task: TEXT_TASK.into(),
                size: seq_len,
                seed: a.seed,
                text: Some(digest),
            }
        }
    };
    let spec = RunSpec {
        version: SPEC_VERSION,
        name: a.name.clone(),
        model: match &init {
            None => ModelSpec {
                hidden: a.hidden,
                layers: a.layers,
                init_seed: a.init_seed,
                checkpoint: None,
            },
            Some(p) => ModelSpec {
                hidden: p.config.hidden_size,
                layers: p.config.num_layers,
                init_seed: 0,
                checkpoint: Some(p.digest),
            },
        },
        data,
        workers: WorkersSpec {
            min: a.workers_min,
            max: a.workers_max,
        },
        rounds: a.rounds,
        inner_steps: a.inner_steps,
        batch_size: a.batch_size,
        inner: InnerSpec {
            lr: a.lr,
            warmup: a.warmup,
            min_lr_ratio: 0.1,
            clip: a.clip,
            weight_decay: a.weight_decay,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        },
        outer: OuterSpec {
            lr: a.outer_lr,
            momentum: a.outer_momentum,
        },
        codec: a.codec.clone(),
        error_feedback,
        deadline: DeadlineSpec {
            initial_ms: a.deadline_initial_ms,
            min_ms: a.deadline_min_ms,
            max_ms: a.deadline_max_ms,
            k: a.deadline_k,
            slack: a.deadline_slack,
            window: 64,
        },
        score: ScoreSpec {
            examples: a.score_examples,
            tolerance: a.score_tolerance,
        },
        eval_examples: a.eval_examples,
        audit: match (a.audit_rate != 0.0, a.auditors) {
            (true, auditors) => Some(AuditSpec {
                rate: a.audit_rate,
                auditors,
            }),
            (false, None) => None,
            (false, Some(_)) => {
                anyhow::bail!("--auditors: this spec audits nothing (--audit-rate 0)")
            }
        },
        stake: a
            .min_stake
            .as_deref()
            .map(|s| {
                crate::cmd::ledger::parse_amount(s)
                    .map_err(|e| anyhow::anyhow!("--min-stake {s:?}: {e}"))
                    .map(|min| StakeSpec { min })
            })
            .transpose()?,
    };
    if let (Some(p), Some(shard)) = (init, text_shard) {
        // Refused now rather than by every worker at its start.
        spec.validate()?;
        spec.text_setup(shard, Some(std::sync::Arc::new(p)))?;
    }
    let dir = a
        .data_dir
        .clone()
        .unwrap_or_else(crate::cmd::net::default_data_dir);
    let key_path = dir.join("node.key");
    let key = NodeKey::load_or_create(&key_path)
        .with_context(|| format!("cannot load the node key {}", key_path.display()))?;
    let signed = spec.sign(&key)?;
    std::fs::write(&a.out, signed.to_json() + "\n")
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    println!(
        "wrote {} (run {}, signed by {})",
        a.out.display(),
        signed.run_id(),
        signed.creator
    );
    Ok(())
}
