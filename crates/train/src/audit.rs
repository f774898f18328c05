//! Re-executing a sampled round from its commitment: the auditor takes the start state the
//! commitment names (global weights, the worker's optimizer state and residual, each checked
//! against its digest), recomputes the example ids from the seed, runs the same inner loop and
//! compares the payload digest. A mismatch drops the contribution; with settlement it is the
//! evidence for a slash.
//!
//! [`drawn`] is the coin: whether a contribution is re-executed, from a key and the rate. The
//! key is [`crate::reveal::draw_key`]: the digest of the round's whole set of commitments
//! ([`crate::round::RoundMachine::held_set`]) and the audit nonces the set's members reveal
//! once the set is fixed (commit-reveal: see [`crate::reveal`]), so no worker can compute it
//! when it commits, not even the last to commit. Every worker holding the same set and nonces
//! draws the same contributions, so they drop the same ones and still close on the same next
//! state without a coordinator.

use crate::assign::{example_ids, ids_digest};
use crate::commit::Commitment;
use crate::config::RoundConfig;
use crate::worker::{compute_round, WorkError, WorkerState};
use plexus_core::{Digest, Sha256Stream};
use plexus_model::train::{Params, Shard};
use plexus_model::ModelConfig;
use std::sync::Arc;

/// Whether `worker`'s contribution to the round whose set has digest `set` is re-executed, at
/// `rate` (0 never, 1 always).
pub fn drawn(set: Digest, worker: &[u8], rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    let mut h = Sha256Stream::new();
    h.update(b"plexus-train-audit-draw-v1");
    h.update(set.as_bytes());
    h.update(worker);
    let d = h.finish();
    let mut head = [0u8; 8];
    head.copy_from_slice(&d.as_bytes()[..8]);
    // The top 53 bits as a uniform number in [0, 1).
    let u = (u64::from_be_bytes(head) >> 11) as f64 / (1u64 << 53) as f64;
    u < rate
}

/// The ledger request id a conviction for `worker`'s contribution to `round` of `run` is
/// slashed under: every honest auditor derives the same one, so the ledger slashes once
/// (`sha256("plexus-train-slash-v1" || run || round u64 LE || worker)`).
pub fn slash_request(run: Digest, round: u64, worker: &[u8]) -> [u8; 32] {
    let mut h = Sha256Stream::new();
    h.update(b"plexus-train-slash-v1");
    h.update(run.as_bytes());
    h.update(&round.to_le_bytes());
    h.update(worker);
    h.finish().0
}

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

/// Re-executes `c` from `global` and the worker's start `state` (taken, not copied: the round
/// runs in it).
pub fn reexecute(
    cfg: &RoundConfig,
    model: &Arc<ModelConfig>,
    shard: &dyn Shard,
    c: &Commitment,
    global: &Params,
    state: WorkerState,
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
    let mut state = state;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_draw_is_a_deterministic_coin_of_the_rate_keyed_by_the_set() {
        let set = Digest::of(b"set");
        let workers: Vec<Vec<u8>> = (0..4000u32).map(|i| i.to_le_bytes().to_vec()).collect();
        assert!(workers.iter().all(|w| !drawn(set, w, 0.0)));
        assert!(workers.iter().all(|w| drawn(set, w, 1.0)));
        let hits = workers.iter().filter(|w| drawn(set, w, 0.25)).count();
        // 4000 draws at 1/4: 1000 expected, sd ~27.
        assert!((880..=1120).contains(&hits), "{hits}");
        // The same inputs draw the same; another set draws others.
        let again = workers.iter().filter(|w| drawn(set, w, 0.25)).count();
        assert_eq!(hits, again);
        let other = Digest::of(b"other set");
        let differ = workers
            .iter()
            .filter(|w| drawn(set, w, 0.25) != drawn(other, w, 0.25))
            .count();
        assert!(differ > 1000, "{differ}");
    }
}
