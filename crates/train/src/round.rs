//! Rounds as a pure state machine. Every worker runs one [`RoundMachine`] and feeds it the
//! contributions it receives (its own included) with the time they arrived; time and the
//! held-out scorer are passed in, nothing is read from the clock or the network here.
//!
//! - open: round `r` starts from global weights with digest `start`; it stays open until
//!   [`RoundMachine::deadline_at`] (adaptive, see [`crate::deadline`]) or until every expected
//!   worker has contributed.
//! - [`RoundMachine::offer`]: a contribution is refused if its signature or worker key is
//!   forged, it names another run, an earlier round (stale, e.g. a late pseudo-gradient), a
//!   later round, other start weights or hyperparameters, if it repeats one already held
//!   (replay) or is a second, different one from the same worker (equivocation), if its payload
//!   does not match its digest or does not decode under the run's codec, if the round is
//!   past its deadline or already holds the run's maximum number of contributions.
//! - [`RoundMachine::close`]: the accepted contributions, in order of worker id, are each scored
//!   on the round's held-out examples (Gauntlet) as the part they take in the average they
//!   join: `loss(global - delta / k)` for `k` accepted contributions, against `loss(global)`
//!   (scoring `global - delta` would judge a sparse pseudo-gradient at k times the weight it
//!   gets: with error feedback that overshoots and honest ones were refused); those that raise
//!   the loss by more than the run's tolerance are dropped; the rest are averaged and the outer
//!   optimizer steps. The result is a pure function of (state, set of contributions), so
//!   workers holding the same set compute the same next weights bit for bit; the outcome's
//!   `set` digest and `next` hash let them check that they agree.

use crate::codec::{Codec, DecodeError};
use crate::commit::{Contribution, Signed, VerifyError};
use crate::config::RoundConfig;
use crate::deadline::Deadline;
use crate::outer::OuterState;
use plexus_core::{Digest, Sha256Stream};
use plexus_model::train::{Params, TrainError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The state every participant holds between rounds (what a joiner fetches, by hash).
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalState {
    /// The round about to run.
    pub round: u64,
    pub params: Params,
    pub outer: OuterState,
}

impl GlobalState {
    /// Digest of round, weights and outer momentum.
    pub fn digest(&self) -> Digest {
        self.digest_with(self.params.digest())
    }

    /// [`Self::digest`] given the weights' digest (hashing a large model's weights takes
    /// seconds: done once per state).
    fn digest_with(&self, params: Digest) -> Digest {
        let mut h = Sha256Stream::new();
        h.update(b"plexus-global-v1");
        h.update(&self.round.to_le_bytes());
        h.update(params.as_bytes());
        h.update(
            plexus_model::train::params::digest_f32s(b"outer", &self.outer.momentum).as_bytes(),
        );
        h.finish()
    }
}

/// Why a contribution was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    #[error("forged commitment")]
    Forged(#[from] VerifyError),
    #[error("contribution for another run")]
    WrongRun,
    #[error("stale contribution for round {round} (the round is {current})")]
    Stale { round: u64, current: u64 },
    #[error("contribution for future round {round} (the round is {current})")]
    Future { round: u64, current: u64 },
    #[error("contribution trained from other start weights")]
    WrongStart,
    #[error("contribution with other hyperparameters, seed or schedule than the run's")]
    WrongSettings,
    #[error("contribution already received (replay)")]
    Replayed,
    #[error("second, different contribution from the same worker this round")]
    Equivocation,
    #[error("payload does not match its committed digest or length")]
    PayloadDigest,
    #[error("a payload of {len} bytes committed, longer than the run's codec makes ({max})")]
    PayloadLength { len: u64, max: u64 },
    #[error("payload does not decode")]
    Payload(#[from] DecodeError),
    #[error("round already holds the run's maximum of {max} contributions")]
    Full { max: u32 },
    #[error("this worker's contribution to the round was dropped after its audit")]
    Dropped,
    #[error("round {round} is closing: its set is fixed")]
    Closing { round: u64 },
    #[error("round {round} closed for contributions at {deadline_ms} ms")]
    PastDeadline { round: u64, deadline_ms: u64 },
}

/// Held-out loss of a parameter vector (deterministic: every worker must get the same number).
pub trait Scorer {
    fn loss(&mut self, round: u64, params: &Params) -> Result<f32, TrainError>;
}

/// A contribution the round holds: its payload as it came (encoded, shared with whoever relays
/// it), decoded only while the round is scored, one at a time: a worker's memory grows by
/// the encoded size of each contribution, not by a model-sized vector per worker.
struct Accepted {
    commitment: Digest,
    payload: Arc<[u8]>,
    arrived_ms: u64,
}

/// The score a contribution got.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub worker: Vec<u8>,
    /// Held-out loss of `global - delta / k`, `k` the round's accepted contributions (NaN when
    /// scoring is off).
    pub loss: f32,
}

/// What closing a round did.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundOutcome {
    pub round: u64,
    /// Held-out loss of the start weights (NaN when scoring is off).
    pub loss_before: f32,
    pub applied: Vec<Scored>,
    /// Contributions that did not lower the held-out loss.
    pub rejected: Vec<Scored>,
    /// Workers whose contribution was dropped before closing ([`RoundMachine::drop_contribution`]:
    /// a failed audit), in order of worker id.
    pub dropped: Vec<Vec<u8>>,
    /// Digest of the sorted commitment digests the round aggregated from.
    pub set: Digest,
    /// Digest of the next global state.
    pub next: Digest,
}

/// One participant's view of the run's rounds.
pub struct RoundMachine {
    cfg: RoundConfig,
    /// Shared with a round being scored ([`Closing`]) and with a driver writing it to disk.
    state: Arc<GlobalState>,
    /// Digest of the state's weights (what contributions must start from).
    start: Digest,
    /// [`GlobalState::digest`] of the state.
    digest: Digest,
    hyper: Digest,
    opened_ms: u64,
    received: BTreeMap<Vec<u8>, Accepted>,
    /// Dropped this round: not offered again, reported at close.
    dropped: BTreeSet<Vec<u8>>,
    expected: BTreeSet<Vec<u8>>,
    deadline: Deadline,
    /// The set was taken out to be scored ([`Self::begin_close`]): no contribution is taken.
    closing: bool,
    /// Contributions of this round valid but for arriving after its deadline: when each
    /// arrived, in ms after the round opened (at most the run's workers max).
    late: BTreeMap<Vec<u8>, u64>,
    /// The workers who did valid work last round, in its set or late (those expected when the
    /// machine was made, for its first round): only their late arrivals count as measurements.
    previous: BTreeSet<Vec<u8>>,
}

/// Digest of a round's set: the round and its sorted commitment digests.
fn set_digest<'a>(round: u64, commitments: impl Iterator<Item = &'a Digest>) -> Digest {
    let mut set = Sha256Stream::new();
    set.update(b"plexus-round-set-v1");
    set.update(&round.to_le_bytes());
    for c in commitments {
        set.update(c.as_bytes());
    }
    set.finish()
}

impl RoundMachine {
    /// Opens `state.round` at `now_ms`, expecting contributions from `expected`.
    pub fn new(
        cfg: RoundConfig,
        state: GlobalState,
        expected: impl IntoIterator<Item = Vec<u8>>,
        now_ms: u64,
    ) -> Self {
        let start = state.params.digest();
        let digest = state.digest_with(start);
        let hyper = cfg.hyper_digest();
        let expected: BTreeSet<Vec<u8>> = expected.into_iter().collect();
        Self {
            previous: expected.clone(),
            cfg,
            state: Arc::new(state),
            start,
            digest,
            hyper,
            opened_ms: now_ms,
            received: BTreeMap::new(),
            dropped: BTreeSet::new(),
            expected,
            deadline: Deadline::default(),
            closing: false,
            late: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &RoundConfig {
        &self.cfg
    }

    pub fn round(&self) -> u64 {
        self.state.round
    }

    pub fn state(&self) -> &GlobalState {
        &self.state
    }

    /// The state, shared (to write it to disk without holding the machine).
    pub fn shared_state(&self) -> Arc<GlobalState> {
        Arc::clone(&self.state)
    }

    /// [`GlobalState::digest`] of [`Self::state`], computed once per state.
    pub fn state_digest(&self) -> Digest {
        self.digest
    }

    /// Digest of the weights this round starts from.
    pub fn start(&self) -> Digest {
        self.start
    }

    /// A worker that will contribute from this round on (a joiner admitted at the boundary).
    pub fn expect(&mut self, worker: Vec<u8>) {
        self.expected.insert(worker);
    }

    /// Whether the round waits for `worker`'s contribution.
    pub fn expects(&self, worker: &[u8]) -> bool {
        self.expected.contains(worker)
    }

    /// Takes over `other`'s measured arrival times (a worker that adopts another state keeps
    /// what it learned about its peers' speed, instead of waiting the initial deadline again).
    pub fn keep_deadline_of(&mut self, other: &RoundMachine) {
        self.deadline = other.deadline.clone();
    }

    /// Starts the round's clock at `now_ms` if that is later than when it opened: a worker
    /// calls it when it starts training the round, so the time it spent closing the last one
    /// (scoring, the outer step, saving; long for a large model) does not eat the deadline.
    /// Arrivals are then measured from here: a contribution taken before (an early one from a
    /// faster peer) keeps its time from the opening, which only makes the next deadlines more
    /// lenient.
    pub fn start_clock(&mut self, now_ms: u64) {
        self.opened_ms = self.opened_ms.max(now_ms);
    }

    /// Time at which the round stops accepting contributions.
    pub fn deadline_at(&self) -> u64 {
        self.opened_ms + self.deadline.current_ms(&self.cfg.deadline)
    }

    /// Workers whose contribution this round holds.
    pub fn contributors(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.received.keys()
    }

    /// Digest of the set held now (what [`RoundOutcome::set`] will be if nothing changes): the
    /// key of the audit draw ([`crate::audit::drawn`]).
    pub fn held_set(&self) -> Digest {
        set_digest(
            self.state.round,
            self.received.values().map(|a| &a.commitment),
        )
    }

    /// Removes `worker`'s contribution from this round (it failed its audit): not aggregated,
    /// not offered again this round, reported in the outcome. Whether it was held.
    pub fn drop_contribution(&mut self, worker: &[u8]) -> bool {
        self.dropped.insert(worker.to_vec());
        self.received.remove(worker).is_some()
    }

    /// Whether the round should close now: past its deadline, or every expected worker in.
    pub fn should_close(&self, now_ms: u64) -> bool {
        self.past_deadline(now_ms) || self.all_in()
    }

    /// Whether the round's deadline has passed.
    pub fn past_deadline(&self, now_ms: u64) -> bool {
        now_ms >= self.deadline_at()
    }

    /// No longer waits for `worker`'s contribution this round (it is still taken if it comes).
    pub fn unexpect(&mut self, worker: &[u8]) {
        self.expected.remove(worker);
    }

    /// Whether `worker`'s contribution to this round is held.
    pub fn contributes(&self, worker: &[u8]) -> bool {
        self.received.contains_key(worker)
    }

    /// Whether every expected worker's contribution is in.
    pub fn all_in(&self) -> bool {
        !self.expected.is_empty() && self.expected.iter().all(|w| self.received.contains_key(w))
    }

    /// Checks and keeps `c`, which arrived at `now_ms`.
    pub fn offer(&mut self, c: &Contribution, now_ms: u64) -> Result<(), Refusal> {
        let digest = self.check_commitment(&c.signed, now_ms)?;
        let cm = &c.signed.commitment;
        if cm.payload_len != c.payload.len() as u64 || Digest::of(&c.payload) != cm.payload {
            return Err(Refusal::PayloadDigest);
        }
        // Decoded here to refuse what does not decode, and again when the round is scored.
        self.cfg
            .codec
            .decode(&c.payload, self.state.params.values.len())?;
        self.received.insert(
            cm.worker.clone(),
            Accepted {
                commitment: digest,
                payload: Arc::clone(&c.payload),
                arrived_ms: now_ms.saturating_sub(self.opened_ms),
            },
        );
        Ok(())
    }

    /// Checks a signed commitment that arrived at `now_ms` as [`Self::offer`] would, all but
    /// its payload (which a contribution too large for one message sends after it): its
    /// digest when this round would take a payload matching it.
    /// A commitment valid in every way but its lateness is remembered as a measurement of how
    /// long the round's work takes ([`Self::finish_close`]).
    pub fn check_commitment(&mut self, signed: &Signed, now_ms: u64) -> Result<Digest, Refusal> {
        let cm = &signed.commitment;
        signed.verify()?;
        if cm.run != self.cfg.run {
            return Err(Refusal::WrongRun);
        }
        let current = self.state.round;
        if self.closing {
            return Err(Refusal::Closing { round: current });
        }
        if cm.round < current {
            return Err(Refusal::Stale {
                round: cm.round,
                current,
            });
        }
        if cm.round > current {
            return Err(Refusal::Future {
                round: cm.round,
                current,
            });
        }
        let digest = cm.digest();
        if self.dropped.contains(&cm.worker) {
            return Err(Refusal::Dropped);
        }
        if let Some(held) = self.received.get(&cm.worker) {
            return Err(if held.commitment == digest {
                Refusal::Replayed
            } else {
                Refusal::Equivocation
            });
        }
        if self.received.len() >= self.cfg.max_workers as usize {
            return Err(Refusal::Full {
                max: self.cfg.max_workers,
            });
        }
        if cm.start_weights != self.start {
            return Err(Refusal::WrongStart);
        }
        if cm.hyper != self.hyper
            || cm.seed != self.cfg.seed
            || cm.inner_steps != self.cfg.inner_steps
            || cm.batch_size != self.cfg.batch_size
            || cm.first_step != current * u64::from(self.cfg.inner_steps)
        {
            return Err(Refusal::WrongSettings);
        }
        let max = self.cfg.codec.encoded_len(self.state.params.values.len()) as u64;
        if cm.payload_len > max {
            return Err(Refusal::PayloadLength {
                len: cm.payload_len,
                max,
            });
        }
        if now_ms >= self.deadline_at() {
            // Valid in every other way: how long the work took, measured (only of a worker of
            // the last round's set: a newcomer's or a stranger's key cannot stretch deadlines).
            if self.late.len() < self.cfg.max_workers as usize && self.previous.contains(&cm.worker)
            {
                let arrived = now_ms.saturating_sub(self.opened_ms);
                self.late.entry(cm.worker.clone()).or_insert(arrived);
            }
            return Err(Refusal::PastDeadline {
                round: current,
                deadline_ms: self.deadline_at(),
            });
        }
        Ok(digest)
    }

    /// Closes the round at `now_ms`: scores, aggregates, steps, opens the next round
    /// ([`Self::begin_close`], [`Closing::score`] and [`Self::finish_close`] in one go).
    pub fn close(
        &mut self,
        now_ms: u64,
        scorer: &mut dyn Scorer,
    ) -> Result<RoundOutcome, TrainError> {
        let scored = self.begin_close().score(scorer)?;
        Ok(self.finish_close(scored, now_ms))
    }

    /// Takes the round's set out to be scored ([`Closing::score`], which needs no access to
    /// the machine: a driver answers peers meanwhile). Until [`Self::finish_close`] the machine
    /// refuses contributions and still holds the round's start state.
    pub fn begin_close(&mut self) -> Closing {
        self.closing = true;
        Closing {
            round: self.state.round,
            received: std::mem::take(&mut self.received),
            state: Arc::clone(&self.state),
            codec: self.cfg.codec,
            scoring: self.cfg.score.examples > 0,
            tolerance: self.cfg.score.tolerance,
        }
    }

    /// Applies a scored set of this round: the outer step on the mean of the contributions
    /// that improve the held-out loss; opens the next round at `now_ms`.
    ///
    /// # Panics
    /// If `scored` is not of the round [`Self::begin_close`] took (a driver's bug).
    pub fn finish_close(&mut self, scored: ScoredSet, now_ms: u64) -> RoundOutcome {
        assert!(
            self.closing && scored.round == self.state.round,
            "finish_close of round {} while the machine is at round {} (closing: {})",
            scored.round,
            self.state.round,
            self.closing
        );
        // A straggler's late arrival does not stretch the deadline for everyone (the median
        // and MAD of the on-time ones set it); but when most of the round's valid work came
        // late, every worker slowed down (a loaded machine, a larger model than the first
        // rounds measured): the deadline restarts from this round's times, late ones included,
        // instead of closing every later round empty while its window of old samples decays.
        // (A late one that came back relayed is in the set: counted once, as on time.) Each
        // late time counts at most twice the deadline it missed: a few workers arriving very
        // late, on purpose or not, can only double it a round.
        let mut late = std::mem::take(&mut self.late);
        late.retain(|w, _| !scored.workers.contains(w));
        if late.len() > scored.arrivals.len() {
            let cap = 2 * self.deadline.current_ms(&self.cfg.deadline);
            self.deadline = Deadline::default();
            for &arrived in late.values() {
                self.deadline.record(&self.cfg.deadline, arrived.min(cap));
            }
        }
        for &arrived in &scored.arrivals {
            self.deadline.record(&self.cfg.deadline, arrived);
        }
        // The scored set dropped its handle on the state: stepped in place, not copied.
        let state = Arc::make_mut(&mut self.state);
        if let Some(mean) = &scored.mean {
            state
                .outer
                .step(&self.cfg.outer, &mut state.params.values, mean);
        }
        state.round += 1;
        // Whoever sent a valid contribution is alive: expect them next round.
        self.expected = scored.workers.into_iter().collect();
        // Those who did valid work, late or not (a round that closed empty keeps measuring).
        self.previous = self.expected.iter().chain(late.keys()).cloned().collect();
        let dropped = std::mem::take(&mut self.dropped).into_iter().collect();
        self.start = self.state.params.digest();
        self.digest = self.state.digest_with(self.start);
        self.opened_ms = now_ms;
        self.closing = false;
        RoundOutcome {
            round: scored.round,
            loss_before: scored.loss_before,
            applied: scored.applied,
            rejected: scored.rejected,
            dropped,
            set: scored.set,
            next: self.digest,
        }
    }
}

/// A round's set taken out of its machine to be scored ([`RoundMachine::begin_close`]).
pub struct Closing {
    round: u64,
    received: BTreeMap<Vec<u8>, Accepted>,
    state: Arc<GlobalState>,
    codec: Codec,
    scoring: bool,
    tolerance: f32,
}

/// What scoring a round's set found ([`Closing::score`]), for [`RoundMachine::finish_close`].
pub struct ScoredSet {
    round: u64,
    loss_before: f32,
    applied: Vec<Scored>,
    rejected: Vec<Scored>,
    /// Mean of the applied contributions' deltas (`None` when none applies).
    mean: Option<Vec<f32>>,
    set: Digest,
    /// When each contribution arrived, in ms after the round opened.
    arrivals: Vec<u64>,
    workers: Vec<Vec<u8>>,
}

impl Closing {
    /// Scores every contribution by the held-out loss of `global - delta / k` (`k` the set's
    /// size; Gauntlet-style), keeps those that do not make it worse than without them (within
    /// the run's tolerance), and averages their deltas. Deterministic: every worker holding the
    /// same set gets the same bytes.
    pub fn score(self, scorer: &mut dyn Scorer) -> Result<ScoredSet, TrainError> {
        let Closing {
            round,
            received,
            state,
            codec,
            scoring,
            tolerance,
        } = self;
        let loss_before = if scoring {
            scorer.loss(round, &state.params)?
        } else {
            f32::NAN
        };
        let set = set_digest(round, received.values().map(|a| &a.commitment));
        let (mut applied, mut rejected) = (Vec::new(), Vec::new());
        let n = state.params.values.len();
        let mut sum = vec![0f32; n];
        let share = 1.0 / received.len().max(1) as f32;
        // Checked when offered; a payload that no longer decodes is a bug, not a peer's.
        let decode = |a: &Accepted| {
            codec
                .decode(&a.payload, n)
                .expect("a held payload decodes (checked when it was offered)")
        };
        for (worker, a) in &received {
            let loss = if scoring {
                // The candidate `global - delta / k` is written over the decoded delta, and
                // the payload decoded again if it joins the sum: one model-sized buffer for
                // a contribution at a time, not two.
                let mut candidate = decode(a);
                candidate
                    .iter_mut()
                    .zip(&state.params.values)
                    .for_each(|(d, p)| *d = p - *d * share);
                let candidate = Params {
                    layout: Arc::clone(&state.params.layout),
                    values: candidate,
                };
                scorer.loss(round, &candidate)?
            } else {
                f32::NAN
            };
            let scored = Scored {
                worker: worker.clone(),
                loss,
            };
            let improves =
                !scoring || (loss.is_finite() && loss <= loss_before * (1.0 + tolerance));
            if improves {
                sum.iter_mut().zip(&decode(a)).for_each(|(s, d)| *s += d);
                applied.push(scored);
            } else {
                rejected.push(scored);
            }
        }
        let mean = (!applied.is_empty()).then(|| {
            let inv = 1.0 / applied.len() as f32;
            sum.iter_mut().for_each(|s| *s *= inv);
            sum
        });
        Ok(ScoredSet {
            round,
            loss_before,
            applied,
            rejected,
            mean,
            set,
            arrivals: received.values().map(|a| a.arrived_ms).collect(),
            workers: received.into_keys().collect(),
        })
    }
}
