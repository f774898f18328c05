//! Step 5 of a worker's round (see the parent module): the round's audits. The round's set is
//! frozen first (a contribution arriving from now on is refused, so the set drawn from is the
//! set closed on, less what the audits drop). The worker then tells its audit nonce for the
//! round and collects the other members' ([`plexus_train::reveal`]: each sealed in its
//! commitment, told only once the teller's set is fixed); from the set's digest and the nonces
//! it draws which contributions are re-executed ([`plexus_train::reveal::drawn_revealed`], the
//! spec's rate; a member whose nonce did not come by the round's deadline is drawn); for each
//! drawn one of another worker it fetches that worker's start state of the round and
//! re-executes the round from the commitment ([`plexus_train::audit::reexecute`]). A drawn
//! worker re-executes its own round too, from the start state it kept: every worker then
//! spends the same time auditing and closes with the others (a drawn worker that skipped it
//! would close a round early and could run ahead alone), and a difference there is reported as
//! this build's own non-determinism. Honest workers holding the same set draw the same
//! contributions and, when the start state reaches each of them, reach the same verdicts.
//!
//! With delegated auditors (the spec's `audit.auditors`, `train spec --auditors K`), each
//! drawn contribution is re-executed only by its committee: the K other members the round's
//! draw key names ([`plexus_train::reveal::committee`], so nobody knows it when committing).
//! The others ask the committee for its verdicts (`TrainRequest::Verdicts`) and keep a
//! contribution every auditor passed; on a mismatch, or with no verdict by the round's
//! deadline (at least three times their own training time of the round), they re-execute it
//! themselves, so a lying or silent auditor costs time and never decides alone that a
//! contribution is dropped. An auditor that passes a bad contribution without computing is
//! not caught (at K = 1 a cheater's colluder on its committee lets it through: choose K for
//! the collusion share you assume). Audits then cost about `rate x K` re-executions per
//! contribution instead of `rate x (workers - 1)`.
//!
//! - Match: kept.
//! - The payload does not match, or the start state sent does not match the commitment's
//!   digests (or the commitment is not what the run prescribes): the worker lied. Its
//!   contribution is dropped and the worker is refused for the rest of the run. In a run that
//!   asks a stake, it is also slashed on the run's ledger ([`super::stake`]): every honest
//!   auditor brings the verdict, the ledger records the first. This assumes training
//!   gives the same bytes on the auditor's machine: it does across thread counts (tested);
//!   across CPUs with other SIMD paths it is not tested.
//! - No start state in time, or one that does not decode: the contribution cannot be checked
//!   and is dropped; the worker is not convicted (it may have crashed). Whether a start state
//!   arrives in time depends on each auditor's link, so two honest workers may disagree here;
//!   the next round's vote settles which state they go on from.

use super::shared::worker_name;
use super::stake::Slashed;
use super::{lock, Peers, Shared, Worker};
use plexus_net::PeerId;
use plexus_train::audit::{check_start, reexecute, AuditError, Before, StartCheck, Verdict};
use plexus_train::commit::{Commitment, Signed};
use plexus_train::local::LocalData;
use plexus_train::reveal::{committee, draw_key, drawn_revealed};
use plexus_train::round::GlobalState;
use plexus_train::worker::{fresh_digests, WorkerState};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shortest wait for the round's audit nonces (when the round's deadline is nearer), ms.
const MIN_REVEAL_WAIT: u64 = 2_000;
/// Longest wait for one peer's answer to an ask for nonces, ms (a peer that does not answer
/// must not hold up the next ask of the others).
const REVEAL_CALL_MS: u64 = 1_000;
/// Spacing of the asks for missing audit nonces.
const REVEAL_POLL: Duration = Duration::from_millis(100);

/// What one round's audits of other workers found (those not passed were dropped).
#[derive(Clone, Copy, Debug, Default)]
pub struct AuditTally {
    /// Re-executed by this worker, and of those passed.
    pub audited: usize,
    pub passed: usize,
    /// Kept on their delegated auditors' word.
    pub delegated: usize,
}

/// Why a drawn contribution was dropped, and whether its worker is convicted.
struct Failed {
    why: String,
    convict: bool,
}

impl<D: LocalData + Send + Sync + 'static> Worker<D> {
    /// Audits the drawn contributions of `round` before it closes. With delegated auditors,
    /// this worker re-executes only the contributions whose committee names it, then takes
    /// the committees' verdicts on the others (`train_ms`: how long its own training of the
    /// round took, which bounds how long a re-execution should take).
    pub(super) async fn audit(
        &self,
        peers: &Peers,
        shared: &Mutex<Shared>,
        round: u64,
        train_ms: u64,
    ) -> AuditTally {
        let rate = self.spec.spec.audit_rate();
        let committee_k = self.spec.spec.audit_committee();
        let mut tally = AuditTally::default();
        if rate <= 0.0 {
            return tally;
        }
        if rate < 1.0 || committee_k.is_some() {
            self.gather_reveals(peers, shared, round).await;
        }
        let (chosen, global, key, members) = {
            let s = lock(shared);
            let set = s.machine.held_set();
            let revealed = s.revealed(round);
            // The commitments only: an audit re-executes and compares digests (a payload can
            // be hundreds of megabytes).
            let chosen: Vec<Signed> = s
                .held
                .iter()
                .filter(|(w, _)| rate >= 1.0 || drawn_revealed(set, &revealed, w, rate))
                .map(|(_, c)| c.signed.clone())
                .collect();
            let members: Vec<Vec<u8>> = s.held.keys().cloned().collect();
            (
                chosen,
                // Shared, not copied: the machine steps it in place only at the close, after
                // the audits.
                s.machine.shared_state(),
                draw_key(set, &revealed),
                members,
            )
        };
        let mut delegated = Vec::new();
        for c in chosen {
            let worker = c.commitment.worker.clone();
            let auditors = committee_k.map(|k| committee(key, &worker, &members, k));
            if worker == self.me {
                if auditors.is_none() {
                    // The start state it keeps for its auditors, read back from disk only
                    // now (outside the lock): not held through the other audits.
                    let reader = lock(shared).start(round).map(|f| f.reader());
                    let own_start = reader.and_then(|r| {
                        tokio::task::block_in_place(|| r.load())
                            .map_err(|e| eprintln!("warning: its own start state of round {} could not be read back: {e:#}", round + 1))
                            .ok()
                    });
                    self.check_own(&c, &global, own_start).await;
                }
                continue;
            }
            match auditors {
                Some(auditors) if !auditors.contains(&self.me) => delegated.push((c, auditors)),
                _ => {
                    let pass = self
                        .audit_one(peers, shared, &c, round, &global, &mut tally)
                        .await;
                    if committee_k.is_some() {
                        // (Whether its start chains on, those that take this verdict check
                        // themselves against the set they closed: `take_verdicts`.)
                        lock(shared).record_verdict(round, worker, pass);
                    }
                }
            }
        }
        if !delegated.is_empty() {
            self.take_verdicts(
                peers, shared, round, &global, delegated, train_ms, &mut tally,
            )
            .await;
        }
        tally
    }

    /// Re-executes `c` itself; drops (and, when it lied, convicts and slashes) what does not
    /// match. Whether it passed.
    async fn audit_one(
        &self,
        peers: &Peers,
        shared: &Mutex<Shared>,
        c: &Signed,
        round: u64,
        global: &Arc<GlobalState>,
        tally: &mut AuditTally,
    ) -> bool {
        let worker = c.commitment.worker.clone();
        tally.audited += 1;
        match self.reexecute(peers, shared, c, round, global).await {
            Ok(()) => {
                tally.passed += 1;
                true
            }
            Err(f) => {
                self.refuse(shared, &worker, round, f);
                false
            }
        }
    }

    /// Drops `worker`'s contribution to `round` (and, when it lied, convicts and slashes it).
    fn refuse(&self, shared: &Mutex<Shared>, worker: &[u8], round: u64, f: Failed) {
        lock(shared).drop_audited(worker, f.convict);
        if f.convict {
            self.slash(worker, round);
        }
        eprintln!(
            "audit of round {}: dropped the contribution of {}: {}{}",
            round + 1,
            worker_name(worker),
            f.why,
            if f.convict {
                "; the worker is refused for the rest of the run"
            } else {
                ""
            }
        );
    }

    /// Takes the delegated auditors' verdicts on `pending` (each with its committee): a
    /// contribution every auditor passed is kept; one an auditor found different, or on which
    /// no verdict came by the round's deadline (at least three times this worker's own
    /// training time of the round), this worker re-executes itself, so a lying or silent
    /// auditor costs time, never a wrong verdict.
    #[allow(clippy::too_many_arguments)]
    async fn take_verdicts(
        &self,
        peers: &Peers,
        shared: &Mutex<Shared>,
        round: u64,
        global: &Arc<GlobalState>,
        pending: Vec<(Signed, Vec<Vec<u8>>)>,
        train_ms: u64,
        tally: &mut AuditTally,
    ) {
        let until = lock(shared)
            .machine
            .deadline_at()
            .max(self.now() + MIN_REVEAL_WAIT.max(3 * train_ms));
        let auditors: BTreeSet<Vec<u8>> = pending.iter().flat_map(|(_, a)| a.clone()).collect();
        // (contribution's worker, auditor) -> pass
        let mut heard: BTreeMap<(Vec<u8>, Vec<u8>), bool> = BTreeMap::new();
        let settled = |heard: &BTreeMap<(Vec<u8>, Vec<u8>), bool>, c: &Signed, a: &[Vec<u8>]| {
            let w = &c.commitment.worker;
            let said: Vec<bool> = a
                .iter()
                .filter_map(|m| heard.get(&(w.clone(), m.clone())).copied())
                .collect();
            said.contains(&false) || said.len() == a.len()
        };
        loop {
            let now = self.now();
            if pending.iter().all(|(c, a)| settled(&heard, c, a)) || now >= until {
                break;
            }
            let timeout = Duration::from_millis((until - now).min(REVEAL_CALL_MS));
            let asks = auditors
                .iter()
                .filter_map(|a| PeerId::from_bytes(a).ok())
                .map(|p| async move { (p.to_bytes(), peers.verdicts(p, round, timeout).await) });
            for (auditor, list) in futures::future::join_all(asks).await {
                // Only verdicts this auditor was asked for: one per pending contribution
                // whose committee names it (a peer answering with verdicts on made-up
                // workers must not grow the map).
                for v in list.into_iter().flatten() {
                    let asked = pending
                        .iter()
                        .any(|(c, a)| c.commitment.worker == v.worker && a.contains(&auditor));
                    if asked {
                        heard.insert((v.worker, auditor.clone()), v.pass);
                    }
                }
            }
            if !pending.iter().all(|(c, a)| settled(&heard, c, a)) {
                tokio::time::sleep(REVEAL_POLL).await;
            }
        }
        for (c, a) in pending {
            let w = c.commitment.worker.clone();
            let said: Vec<bool> = a
                .iter()
                .filter_map(|m| heard.get(&(w.clone(), m.clone())).copied())
                .collect();
            if !said.is_empty() && said.len() == a.len() && said.iter().all(|p| *p) {
                // The re-execution is taken on the committee's word; whether its start chains
                // on is checked here, against the set this worker closed the round before on
                // (a digest comparison; a committee member that did not close it could not).
                match self.check_start(shared, &c.commitment, round) {
                    Ok(_) => tally.delegated += 1,
                    Err(f) => self.refuse(shared, &w, round, f),
                }
                continue;
            }
            let why = if said.contains(&false) {
                "its delegated auditor found a different pseudo-gradient"
            } else {
                "no verdict from its delegated auditors in time"
            };
            eprintln!(
                "audit of round {}: re-executing the contribution of {} itself: {why}",
                round + 1,
                worker_name(&w)
            );
            let pass = self
                .audit_one(peers, shared, &c, round, global, tally)
                .await;
            if said.contains(&false) && pass {
                eprintln!(
                    "audit of round {}: the contribution of {} matched: its auditor's mismatch was not reproduced",
                    round + 1,
                    worker_name(&w)
                );
            }
        }
    }

    /// Collects the audit nonces of `round`'s fixed set ([`plexus_train::reveal`]; this
    /// worker's own was added when it fixed the set) from every peer, each of which answers
    /// once it has fixed its own set, until every member's is in, every member still missing
    /// has answered without its own (it withholds it), no peer is still at the round (those
    /// past it have told all they know), or the round's deadline has passed (at least
    /// [`MIN_REVEAL_WAIT`] from now). The contributions of members whose nonce did not
    /// come are then dropped (not convicted: they may have crashed).
    async fn gather_reveals(&self, peers: &Peers, shared: &Mutex<Shared>, round: u64) {
        let until = lock(shared)
            .machine
            .deadline_at()
            .max(self.now() + MIN_REVEAL_WAIT);
        // This worker's own nonce was added when it fixed the set: never waited for (missing
        // only when it does not open this worker's own seal).
        let mut withheld: BTreeSet<Vec<u8>> = BTreeSet::from([self.me.clone()]);
        loop {
            let (waiting, targets) = {
                let s = lock(shared);
                let waiting = s
                    .unrevealed(round)
                    .into_iter()
                    .any(|w| !withheld.contains(&w));
                (waiting, s.peers.keys().copied().collect::<Vec<PeerId>>())
            };
            let now = self.now();
            if !waiting || now >= until {
                break;
            }
            let timeout = Duration::from_millis((until - now).min(REVEAL_CALL_MS));
            let lists =
                futures::future::join_all(targets.into_iter().map(|p| async move {
                    (p.to_bytes(), peers.reveals(p, round, timeout).await)
                }))
                .await;
            let waiting = {
                let mut s = lock(shared);
                let mut told = Vec::new();
                for (teller, list) in lists {
                    let Some(list) = list else { continue };
                    s.add_reveals(round, list);
                    told.push(teller);
                }
                // A worker that has fixed its set tells its own nonce with the others': a
                // member that answered without one opening its seal withholds it.
                let missing = s.unrevealed(round);
                withheld.extend(told.into_iter().filter(|t| missing.contains(t)));
                // Peers that have closed the round told all they will ever know of it (a
                // joiner closing a round its peers left would otherwise wait for a departed
                // member's nonce until the deadline, while they run on and finish): only a
                // peer still at the round may yet learn one.
                let learning = s.peers.iter().any(|(p, st)| {
                    st.round == round && !st.done && !s.excluded(&p.to_bytes()) && !s.stuck(p)
                });
                learning && missing.into_iter().any(|w| !withheld.contains(&w))
            };
            if !waiting {
                break;
            }
            tokio::time::sleep(REVEAL_POLL).await;
        }
        let mut s = lock(shared);
        for w in s.unrevealed(round) {
            s.drop_audited(&w, false);
            eprintln!(
                "audit of round {}: dropped the contribution of {}: its audit nonce did not come in time",
                round + 1,
                worker_name(&w)
            );
        }
    }

    /// Slashes `worker`, convicted by this worker's audit of `round`, on the run's ledger (a
    /// run with stake), off the round's path (the ledger is a database other workers write
    /// too); says what became of it. [`Worker::finish`] waits for it.
    fn slash(&self, worker: &[u8], round: u64) {
        let Some(ledger) = self.ledger.clone() else {
            return;
        };
        let (run, worker) = (self.cfg.run, worker.to_vec());
        let task = tokio::spawn(async move {
            let who = worker_name(&worker);
            match ledger.slash(run, round, &worker).await {
                Ok(Slashed::Taken(amount)) => println!(
                    "slashed {who} {amount} on the run's ledger for its contribution to round {} (this worker brought the verdict)",
                    round + 1
                ),
                Ok(Slashed::AlreadyDone) => println!(
                    "{who} was already slashed for round {} (another auditor recorded the verdict first)",
                    round + 1
                ),
                Ok(Slashed::Nothing) => println!("{who} has nothing left to slash"),
                Err(e) => eprintln!("warning: could not slash {who} on the run's ledger: {e:#}"),
            }
        });
        self.slashes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// Re-executes this worker's own drawn contribution from the start state it kept, as its
    /// auditors do (same time spent); a difference is this build's non-determinism, said loudly.
    async fn check_own(&self, c: &Signed, global: &Arc<GlobalState>, start: Option<WorkerState>) {
        let Some(state) = start else { return };
        let verdict = self.rerun(&c.commitment, global, state).await;
        if !matches!(verdict, Ok(Ok(Verdict::Match))) {
            eprintln!(
                "warning: re-executing this worker's own round did not reproduce its contribution ({verdict:?}): training is not deterministic here, and auditors will drop it"
            );
        }
    }

    /// [`reexecute`] of `cm` from `global` and `state`, off the async threads (the weights
    /// shared, the start state moved: no model-sized copy).
    async fn rerun(
        &self,
        cm: &Commitment,
        global: &Arc<GlobalState>,
        state: WorkerState,
    ) -> Result<Result<Verdict, AuditError>, tokio::task::JoinError> {
        let (cfg, model, shard, global, cm) = (
            self.cfg.clone(),
            self.model.clone(),
            self.shard.clone(),
            Arc::clone(global),
            cm.clone(),
        );
        tokio::task::spawn_blocking(move || {
            reexecute(&cfg, &model, shard.as_ref(), &cm, &global.params, state)
        })
        .await
    }

    /// Whether `cm`'s start state is fresh or where its worker's commitment to the round
    /// before ended, as far as the set this worker closed that round on shows
    /// ([`check_start`]).
    fn check_start(
        &self,
        shared: &Mutex<Shared>,
        cm: &plexus_train::commit::Commitment,
        round: u64,
    ) -> Result<(), Failed> {
        let held = match round {
            0 => Some(None),
            r => lock(shared).closed_commitment(r - 1, &cm.worker),
        };
        let before = match &held {
            None => Before::Unknown,
            Some(c) => Before::Closed(c.as_ref()),
        };
        let fresh = *self
            .fresh
            .get_or_init(|| tokio::task::block_in_place(|| fresh_digests(self.n)));
        match check_start(cm, before, fresh) {
            StartCheck::Sound => Ok(()),
            StartCheck::Unchecked => {
                eprintln!(
                    "audit of round {}: the start state of {} is not checked against its last round (this worker did not close round {})",
                    round + 1,
                    worker_name(&cm.worker),
                    round
                );
                Ok(())
            }
            StartCheck::Unproven => Err(Failed {
                why: format!(
                    "its start state is not fresh, and the set this worker closed round {round} on holds no contribution of its to start from"
                ),
                convict: false,
            }),
            StartCheck::Broken => Err(Failed {
                why: format!(
                    "its start state is neither fresh nor where its signed contribution to round {round} ended"
                ),
                convict: true,
            }),
        }
    }

    /// Checks that `c`'s start state is one its worker may start from, fetches it and
    /// re-executes its round from `global`.
    async fn reexecute(
        &self,
        peers: &Peers,
        shared: &Mutex<Shared>,
        c: &Signed,
        round: u64,
        global: &Arc<GlobalState>,
    ) -> Result<(), Failed> {
        let cm = &c.commitment;
        let peer = PeerId::from_bytes(&cm.worker).map_err(|_| Failed {
            why: "its worker id is not a peer id".into(),
            convict: false,
        })?;
        self.check_start(shared, cm, round)?;
        let state = peers
            .start_state(peer, round, global.params.values.len())
            .await
            .ok_or_else(|| Failed {
                why: format!(
                    "it sent no usable start state of round {} in time",
                    round + 1
                ),
                convict: false,
            })?;
        let verdict = self.rerun(cm, global, state).await.map_err(|e| Failed {
            why: format!("the re-execution failed: {e}"),
            convict: false,
        })?;
        match verdict {
            Ok(Verdict::Match) => Ok(()),
            Ok(Verdict::Mismatch {
                what,
                committed,
                recomputed,
            }) => Err(Failed {
                why: format!(
                    "re-executed from its commitment, its {what} has digest {}, not the committed {}",
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
