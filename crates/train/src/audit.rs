//! Re-executing a sampled round from its commitment: the auditor takes the start state the
//! commitment names (global weights, the worker's optimizer state and residual, each checked
//! against its digest), recomputes the example ids from the seed, runs the same inner loop and
//! compares the payload digest. A mismatch drops the contribution; with settlement it is the
//! evidence for a slash.

use crate::assign::{example_ids, ids_digest};
use crate::commit::Commitment;
use crate::config::RoundConfig;
use crate::worker::{compute_round, WorkError, WorkerState};
use plexus_core::Digest;
use plexus_model::train::{Params, Shard};
use plexus_model::ModelConfig;
use std::sync::Arc;

/// The result of a re-execution.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The recomputed payload has the committed digest.
    Match,
    /// It does not: the contribution is dropped.
    Mismatch {
        committed: Digest,
        recomputed: Digest,
    },
}

/// Why a round could not be re-executed (the inputs do not match the commitment).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the commitment is for run {got}, not {expected}")]
    WrongRun { got: Digest, expected: Digest },
    #[error("the {what} given do not match the commitment's digest")]
    StartState { what: &'static str },
    #[error("the commitment's {what} differ from what the run prescribes")]
    Prescribed { what: &'static str },
    #[error("re-execution failed")]
    Work(#[from] WorkError),
}

/// Re-executes `c` from `global` and the worker's start `state`.
pub fn reexecute(
    cfg: &RoundConfig,
    model: &Arc<ModelConfig>,
    shard: &dyn Shard,
    c: &Commitment,
    global: &Params,
    state: &WorkerState,
) -> Result<Verdict, AuditError> {
    if c.run != cfg.run {
        return Err(AuditError::WrongRun {
            got: c.run,
            expected: cfg.run,
        });
    }
    if global.digest() != c.start_weights {
        return Err(AuditError::StartState { what: "weights" });
    }
    if state.opt.digest() != c.start_optimizer {
        return Err(AuditError::StartState {
            what: "optimizer state",
        });
    }
    if state.residual_digest() != c.start_residual {
        return Err(AuditError::StartState { what: "residual" });
    }
    let ids = example_ids(cfg.seed, c.round, &c.worker, cfg.examples_per_round());
    if ids_digest(&ids) != c.examples {
        return Err(AuditError::Prescribed {
            what: "example ids",
        });
    }
    if c.hyper != cfg.hyper_digest()
        || c.seed != cfg.seed
        || c.inner_steps != cfg.inner_steps
        || c.batch_size != cfg.batch_size
        || c.first_step != c.round * u64::from(cfg.inner_steps)
    {
        return Err(AuditError::Prescribed {
            what: "hyperparameters",
        });
    }
    let mut state = state.clone();
    let w = compute_round(cfg, model, shard, &c.worker, c.round, global, &mut state)?;
    let recomputed = Digest::of(&w.payload);
    Ok(if recomputed == c.payload {
        Verdict::Match
    } else {
        Verdict::Mismatch {
            committed: c.payload,
            recomputed,
        }
    })
}
