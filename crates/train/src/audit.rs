//! Re-executing a sampled round from its commitment: the auditor takes the start state the
//! commitment names (global weights, the worker's optimizer state and residual, each checked
//! against its digest), recomputes the example ids from the seed, runs the same inner loop and
//! compares the payload digest and the digests of the state the round ended in. A mismatch
//! drops the contribution; with settlement it is the evidence for a slash.
//!
//! The start state itself is not the worker's to choose ([`check_start`]): it is a fresh one,
//! or the state the worker's commitment to the round before ended in. Otherwise a worker could
//! pick moments or a residual that make its honest-looking round send any pseudo-gradient it
//! likes, and the re-execution would reproduce it. A claimed end state that its round did not
//! compute is caught when that round is audited; one that it did compute binds the next round.
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
#[cfg(doc)]
use crate::worker::fresh_digests;
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
    /// It does not (`what`: the pseudo-gradient, or the state the round ended in): the
    /// contribution is dropped.
    Mismatch {
        what: &'static str,
        committed: Digest,
        recomputed: Digest,
    },
}

/// What an auditor holds of the round before a commitment's.
#[derive(Clone, Copy, Debug)]
pub enum Before<'a> {
    /// It did not close that round (it joined, caught up or restarted since): nothing to
    /// check the start against.
    Unknown,
    /// It closed it on a set holding this commitment of the worker's (or none: `None`; also
    /// for round 0, which has no round before).
    Closed(Option<&'a Commitment>),
}

/// Whether a commitment's start state is one its worker may start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartCheck {
    /// A fresh state, or the one its commitment to the round before ended in.
    Sound,
    /// Not fresh, and this auditor did not close the round before: not checked.
    Unchecked,
    /// Not fresh, and the set this auditor closed the round before on holds no commitment of
    /// the worker's: not proven (its view of that set may differ); the contribution is
    /// dropped, the worker not convicted.
    Unproven,
    /// Neither fresh nor where the commitment it signed for the round before ended: a lie
    /// (both commitments are signed by it).
    Broken,
}

/// [`StartCheck`] of `c` against what the auditor holds of the round before; `fresh`: the
/// digests of a fresh state of the model ([`fresh_digests`]).
pub fn check_start(c: &Commitment, before: Before<'_>, fresh: (Digest, Digest)) -> StartCheck {
    let start = (c.start_optimizer, c.start_residual);
    if let Before::Closed(Some(prev)) = before {
        if prev.worker == c.worker
            && prev.run == c.run
            && prev.round + 1 == c.round
            && (prev.end_optimizer, prev.end_residual) == start
        {
            return StartCheck::Sound;
        }
    }
    if start == fresh {
        return StartCheck::Sound;
    }
    match before {
        Before::Unknown => StartCheck::Unchecked,
        Before::Closed(None) => StartCheck::Unproven,
        Before::Closed(Some(_)) => StartCheck::Broken,
    }
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
    let w = &w.commitment;
    Ok(if recomputed != c.payload {
        Verdict::Mismatch {
            what: "pseudo-gradient",
            committed: c.payload,
            recomputed,
        }
    } else if w.end_optimizer != c.end_optimizer {
        Verdict::Mismatch {
            what: "optimizer state it ended in",
            committed: c.end_optimizer,
            recomputed: w.end_optimizer,
        }
    } else if w.end_residual != c.end_residual {
        Verdict::Mismatch {
            what: "residual it ended in",
            committed: c.end_residual,
            recomputed: w.end_residual,
        }
    } else {
        Verdict::Match
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
