//! Step 5 of a worker's round (see the parent module): the round's audits. From the digest of
//! the set it is about to close on, the worker draws which contributions are re-executed
//! ([`plexus_train::audit::drawn`], the spec's rate); for each drawn one of another worker it
//! fetches that worker's start state of the round and re-executes the round from the
//! commitment ([`plexus_train::audit::reexecute`]). Every honest worker holding the same set
//! draws the same contributions and reaches the same verdicts, so they drop the same ones.
//!
//! - Match: kept.
//! - The payload does not match, or the start state sent does not match the commitment's
//!   digests (or the commitment is not what the run prescribes): the worker lied. Its
//!   contribution is dropped and the worker is refused for the rest of the run. (With stake
//!   on a ledger this is the evidence a slash takes: the signed commitment and the
//!   re-executed digest; training workers hold no ledger accounts yet.)
//! - No start state in time, or one that does not decode: the contribution cannot be checked
//!   and is dropped; the worker is not convicted (it may have crashed).

use super::{lock, Peers, Shared, Worker};
use plexus_net::PeerId;
use plexus_train::audit::{drawn, reexecute, AuditError, Verdict};
use plexus_train::commit::Contribution;
use plexus_train::local::LocalData;
use std::sync::Mutex;

/// What one round's audits found.
#[derive(Clone, Copy, Debug, Default)]
pub struct AuditTally {
    pub audited: usize,
    pub passed: usize,
    pub dropped: usize,
}

/// Why a drawn contribution was dropped, and whether its worker is convicted.
struct Failed {
    why: String,
    convict: bool,
}

impl<D: LocalData + Send + Sync + 'static> Worker<D> {
    /// Audits the drawn contributions of `round` before it closes.
    pub(super) async fn audit(
        &self,
        peers: &Peers,
        shared: &Mutex<Shared>,
        round: u64,
    ) -> AuditTally {
        let rate = self.spec.spec.audit_rate();
        let mut tally = AuditTally::default();
        if rate <= 0.0 {
            return tally;
        }
        let (chosen, global) = {
            let s = lock(shared);
            let set = s.machine.held_set();
            let chosen: Vec<Contribution> = s
                .held
                .iter()
                .filter(|(w, _)| **w != self.me && drawn(set, w, rate))
                .map(|(_, c)| c.clone())
                .collect();
            (chosen, s.machine.state().params.clone())
        };
        for c in chosen {
            tally.audited += 1;
            let worker = c.signed.commitment.worker.clone();
            let who = PeerId::from_bytes(&worker)
                .map_or_else(|_| "an unnamed worker".to_string(), |p| p.to_string());
            match self.reexecute(peers, &c, round, &global).await {
                Ok(()) => tally.passed += 1,
                Err(f) => {
                    tally.dropped += 1;
                    lock(shared).drop_audited(&worker, f.convict);
                    eprintln!(
                        "audit of round {}: dropped the contribution of {who}: {}{}",
                        round + 1,
                        f.why,
                        if f.convict {
                            "; the worker is refused for the rest of the run"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        tally
    }

    /// Fetches the start state of `c`'s worker and re-executes its round from `global`.
    async fn reexecute(
        &self,
        peers: &Peers,
        c: &Contribution,
        round: u64,
        global: &plexus_model::train::Params,
    ) -> Result<(), Failed> {
        let cm = c.signed.commitment.clone();
        let peer = PeerId::from_bytes(&cm.worker).map_err(|_| Failed {
            why: "its worker id is not a peer id".into(),
            convict: false,
        })?;
        let transfer = peers.start_state(peer, round).await.ok_or_else(|| Failed {
            why: format!("it sent no start state of round {} in time", round + 1),
            convict: false,
        })?;
        let state = transfer
            .into_state(global.values.len())
            .map_err(|e| Failed {
                why: format!("its start state does not decode: {e}"),
                convict: false,
            })?;
        let (cfg, model, shard, global) = (
            self.cfg.clone(),
            self.model.clone(),
            self.shard.clone(),
            global.clone(),
        );
        let verdict = tokio::task::spawn_blocking(move || {
            reexecute(&cfg, &model, shard.as_ref(), &cm, &global, &state)
        })
        .await
        .map_err(|e| Failed {
            why: format!("the re-execution failed: {e}"),
            convict: false,
        })?;
        match verdict {
            Ok(Verdict::Match) => Ok(()),
            Ok(Verdict::Mismatch {
                committed,
                recomputed,
            }) => Err(Failed {
                why: format!(
                    "re-executed from its commitment, its pseudo-gradient has digest {}, not the committed {}",
                    recomputed.short(),
                    committed.short()
                ),
                convict: true,
            }),
            Err(AuditError::Work(e)) => Err(Failed {
                why: format!("the re-execution failed: {e}"),
                convict: false,
            }),
            Err(e) => Err(Failed {
                why: e.to_string(),
                convict: true,
            }),
        }
    }
}
