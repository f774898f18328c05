//! What a worker's round loop and its inbound-message handler share: the round machine (pure;
//! times are passed in), the raw contributions it accepted (to serve peers that miss them),
//! the set of the round just closed, contributions that arrived a round early, the peers'
//! last statuses, this worker's start states of its last two rounds (for its auditors, on
//! disk: [`super::starts`]), the
//! workers convicted by an audit, and the bytes of the state peers fetch ranges of. Every collection is bounded by the run's workers max,
//! [`MAX_PEERS`] or [`KEPT_STARTS`], except the convicted, which grow by at most the run's
//! workers max a round (only contributions a round held can be convicted).

use super::offers::{Offered, Offers};
use super::stake::StakeGate;
use super::starts::{StartFile, StartReader};
use plexus_core::Digest;
use plexus_net::PeerId;
use plexus_train::commit::{Commitment, Contribution, Signed};
use plexus_train::protocol::{
    decode, travels_whole, AuditVerdict, HeldEntry, Reveal, StateTransfer, Status, TrainRequest,
    TrainResponse, WorkerStateTransfer,
};
use plexus_train::reveal::sealed;
use plexus_train::round::{GlobalState, Refusal, RoundMachine};
use plexus_train::transfer::{start_len, state_bytes, state_len, MAX_RANGE_BYTES};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// Peers whose status is remembered.
pub const MAX_PEERS: usize = 1024;

/// A peer seen behind this worker's round at every look for this many of this worker's rounds
/// in a row is no longer waited for. An honest straggler (slow, restarting, catching up) is
/// seen at the round once it has caught up, within a round; a peer that says it is behind
/// forever would otherwise hold every round to its deadline.
pub const STUCK_ROUNDS: u64 = 2;
/// Rounds whose start state this worker keeps for its auditors (the current one and the one
/// before: a peer may still be auditing the last round when this worker has moved on).
pub const KEPT_STARTS: usize = 2;

/// A worker id as people read it: its peer id, or "an unnamed worker" when the bytes are none.
pub fn worker_name(worker: &[u8]) -> String {
    PeerId::from_bytes(worker).map_or_else(|_| "an unnamed worker".to_string(), |p| p.to_string())
}

pub struct Shared {
    pub run: Digest,
    pub machine: RoundMachine,
    /// Contributions the machine accepted this round, by worker.
    pub held: BTreeMap<Vec<u8>, Contribution>,
    /// The set of the round closed last ([`Self::keep_closed`]).
    closed: Option<(u64, BTreeMap<Vec<u8>, Contribution>)>,
    /// The payloads of [`Self::closed`] were dropped, no peer needing them any more
    /// ([`Self::release_closed`]): its commitments are kept, its contributions not served.
    closed_released: bool,
    /// The other workers whose contributions are in [`Self::closed`].
    closed_members: Vec<PeerId>,
    /// Contributions for the next round, received before this one closed.
    pub early: BTreeMap<Vec<u8>, Contribution>,
    pub peers: HashMap<PeerId, Status>,
    /// The run is over for this worker (it lingers to serve the last round).
    pub done: bool,
    /// Contributions and messages refused so far.
    pub refused: u64,
    /// This worker's start state of its last rounds, oldest first.
    pub starts: VecDeque<StartFile>,
    /// Workers convicted by an audit, with the round: their contributions are refused.
    pub convicted: BTreeMap<Vec<u8>, u64>,
    /// Test-only (`--cheat ahead`): the status and state this worker claims to peers.
    pub claim: Option<GlobalState>,
    /// Test-only (`--cheat behind`): this worker tells peers it is still at round 0.
    pub claim_behind: bool,
    /// Workers whose last status said they are done (finished or left the run): not expected
    /// in the rounds this worker opens ([`Self::forget_gone`]) until they say otherwise.
    pub gone: std::collections::HashSet<Vec<u8>>,
    /// Test-only (`--cheat bad-state`): this worker flips a bit of every value in the state
    /// ranges it serves.
    pub corrupt_state: bool,
    /// Peers seen behind this worker's round, with this worker's round when that began (reset
    /// when one is seen at or past it): see [`STUCK_ROUNDS`].
    pub behind_since: HashMap<PeerId, u64>,
    /// The round whose set is fixed (after the sync, while its audits run and it closes):
    /// contributions to it are refused from then on.
    pub closing: Option<u64>,
    /// For a run that asks a stake: who holds it, as last read from the run's ledger.
    pub stake: Option<StakeGate>,
    /// Audit nonces revealed for the rounds whose sets are fixed (the last [`KEPT_STARTS`]),
    /// each opening its member's sealed value.
    pub reveals: BTreeMap<u64, BTreeMap<Vec<u8>, [u8; 32]>>,
    /// This worker's own nonce of the round it fixed last: told with the others' (even when
    /// its own contribution is not in its set: peers holding it need it).
    own_reveal: Option<(u64, Reveal)>,
    /// Peers that asked for the current round's nonces: they have fixed its set (cleared when
    /// the round changes).
    pub fixed_by: std::collections::HashSet<PeerId>,
    /// This worker's verdicts as a delegated auditor, by round (the last [`KEPT_STARTS`]).
    verdicts: BTreeMap<u64, BTreeMap<Vec<u8>, bool>>,
    /// The bytes of the last state a peer asked ranges of, with its digest: made once per
    /// state, not once per range.
    state_bytes: Option<(Digest, Arc<Vec<u8>>)>,
    /// Contributions offered by their workers whose payloads are being fetched.
    pub offers: Offers,
    /// Test-only (`--cheat one-sided`): the one peer `Fetch` and payload ranges are answered.
    pub serve_only: Option<PeerId>,
}

impl Shared {
    pub fn new(run: Digest, machine: RoundMachine) -> Self {
        Self {
            run,
            machine,
            held: BTreeMap::new(),
            closed: None,
            closed_released: false,
            closed_members: Vec::new(),
            early: BTreeMap::new(),
            peers: HashMap::new(),
            done: false,
            refused: 0,
            starts: VecDeque::new(),
            convicted: BTreeMap::new(),
            claim: None,
            claim_behind: false,
            corrupt_state: false,
            gone: Default::default(),
            behind_since: HashMap::new(),
            closing: None,
            stake: None,
            reveals: BTreeMap::new(),
            own_reveal: None,
            fixed_by: Default::default(),
            verdicts: BTreeMap::new(),
            state_bytes: None,
            offers: Offers::default(),
            serve_only: None,
        }
    }

    /// Keeps this worker's verdict, as a delegated auditor, on `worker`'s contribution to
    /// `round`, for the peers that take its word.
    pub fn record_verdict(&mut self, round: u64, worker: Vec<u8>, pass: bool) {
        self.verdicts.entry(round).or_default().insert(worker, pass);
        while self.verdicts.len() > KEPT_STARTS {
            self.verdicts.pop_first();
        }
    }

    /// Fixes the set of `round` (contributions to it are refused from now on) and from then on
    /// tells this worker's audit nonce for it, `own`.
    pub fn fix_set(&mut self, round: u64, own: Reveal) {
        self.closing = Some(round);
        self.add_reveals(round, vec![own.clone()]);
        self.own_reveal = Some((round, own));
    }

    /// The set of `round` once this worker has fixed it (it is closing, or closed last).
    fn fixed_set(&self, round: u64) -> Option<&BTreeMap<Vec<u8>, Contribution>> {
        if self.closing == Some(round) {
            return Some(&self.held);
        }
        match &self.closed {
            Some((r, set)) if *r == round => Some(set),
            _ => None,
        }
    }

    /// Keeps the nonces of `reveals` that open the sealed value of a member of `round`'s fixed
    /// set; how many were new.
    pub fn add_reveals(&mut self, round: u64, reveals: Vec<Reveal>) -> usize {
        let Some(set) = self.fixed_set(round) else {
            return 0;
        };
        let fresh: Vec<(Vec<u8>, [u8; 32])> = reveals
            .into_iter()
            .filter(|r| {
                set.get(&r.worker)
                    .is_some_and(|c| c.signed.commitment.reveal == sealed(&r.nonce))
            })
            .map(|r| (r.worker, r.nonce))
            .collect();
        let known = self.reveals.entry(round).or_default();
        let before = known.len();
        known.extend(fresh);
        let added = known.len() - before;
        while self.reveals.len() > KEPT_STARTS {
            self.reveals.pop_first();
        }
        added
    }

    /// The nonces revealed for members of `round`'s fixed set (for a round closed before the
    /// last one, those kept: each opened a member's seal when it came).
    pub fn revealed(&self, round: u64) -> BTreeMap<Vec<u8>, [u8; 32]> {
        let Some(known) = self.reveals.get(&round) else {
            return BTreeMap::new();
        };
        match self.fixed_set(round) {
            Some(set) => known
                .iter()
                .filter(|(w, _)| set.contains_key(*w))
                .map(|(w, n)| (w.clone(), *n))
                .collect(),
            None => known.clone(),
        }
    }

    /// What this worker tells of `round`: the members' nonces it knows and its own.
    fn told_reveals(&self, round: u64) -> Vec<Reveal> {
        let mut told: Vec<Reveal> = self
            .revealed(round)
            .into_iter()
            .map(|(worker, nonce)| Reveal { worker, nonce })
            .collect();
        if let Some((r, own)) = &self.own_reveal {
            if *r == round && !told.iter().any(|t| t.worker == own.worker) {
                told.push(own.clone());
            }
        }
        told
    }

    /// Members of `round`'s fixed set whose nonce has not been revealed.
    pub fn unrevealed(&self, round: u64) -> Vec<Vec<u8>> {
        let known = self.reveals.get(&round);
        self.fixed_set(round)
            .map(|set| {
                set.keys()
                    .filter(|w| !known.is_some_and(|k| k.contains_key(*w)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `worker` counts for nothing this round: convicted by an audit, or under the
    /// run's stake. Its contributions are refused, its status is no vote, nobody waits for it.
    pub fn excluded(&self, worker: &[u8]) -> bool {
        self.convicted.contains_key(worker) || self.stake.as_ref().is_some_and(|g| !g.holds(worker))
    }

    /// The status this worker tells its peers: its own ([`Self::status`]) unless it lies.
    pub fn told(&self) -> Status {
        match &self.claim {
            Some(g) => Status {
                round: g.round,
                state: g.digest(),
                ..self.status()
            },
            None if self.claim_behind => Status {
                round: 0,
                ..self.status()
            },
            None => self.status(),
        }
    }

    /// Whether `peer` has said it is behind for [`STUCK_ROUNDS`] of this worker's rounds in a
    /// row: its claim no longer holds a round open.
    pub fn stuck(&self, peer: &PeerId) -> bool {
        self.behind_since
            .get(peer)
            .is_some_and(|since| self.machine.round() >= since + STUCK_ROUNDS)
    }

    /// Drops the kept start states that will not be kept beside `round`'s (the caller does
    /// this before writing that one, so no more than [`KEPT_STARTS`] are ever on disk).
    pub fn make_room_for_start(&mut self, round: u64) {
        let keep_from = round.saturating_sub(KEPT_STARTS as u64 - 1);
        self.starts
            .retain(|f| f.round >= keep_from && f.round < round);
    }

    /// Keeps this worker's start state of a round for its auditors (written to disk by the
    /// caller, outside the lock); the oldest beyond [`KEPT_STARTS`] is dropped.
    pub fn keep_start(&mut self, file: StartFile) {
        self.starts.retain(|f| f.round != file.round);
        self.starts.push_back(file);
        while self.starts.len() > KEPT_STARTS {
            self.starts.pop_front();
        }
    }

    /// This worker's kept start state of `round`, if any.
    pub fn start(&self, round: u64) -> Option<&StartFile> {
        self.starts.iter().find(|f| f.round == round)
    }

    /// Drops `worker`'s contribution to the current round after a failed audit; a convicted
    /// worker's contributions are refused from now on.
    pub fn drop_audited(&mut self, worker: &[u8], convict: bool) {
        self.machine.drop_contribution(worker);
        self.held.remove(worker);
        if convict {
            let round = self.machine.round();
            self.convicted.entry(worker.to_vec()).or_insert(round);
            self.early.remove(worker);
        }
    }

    /// Stops waiting for workers that said they are done: called when a round opens, since
    /// the machine expects whoever contributed to the round before.
    pub fn forget_gone(&mut self) {
        for w in &self.gone {
            self.machine.unexpect(w);
        }
    }

    /// The bytes of the state whose digest is `digest`, if this worker holds it (or is the
    /// last one peers asked for).
    fn bytes_of_state(&mut self, digest: Digest) -> Option<Arc<Vec<u8>>> {
        if let Some((d, b)) = &self.state_bytes {
            if *d == digest {
                return Some(b.clone());
            }
        }
        let state = match &self.claim {
            Some(claim) if claim.digest() == digest => claim,
            Some(_) => return None,
            None if self.machine.state_digest() == digest => self.machine.state(),
            None => return None,
        };
        let bytes = Arc::new(state_bytes(state));
        self.state_bytes = Some((digest, bytes.clone()));
        Some(bytes)
    }

    pub fn status(&self) -> Status {
        Status {
            run: self.run,
            round: self.machine.round(),
            state: self.machine.state_digest(),
            done: self.done,
        }
    }

    /// Remembers `peer`'s status; a peer at this round is expected to contribute to it (unless
    /// an audit convicted it: its contributions are refused, so nobody waits for them), and one
    /// that says it is done (finished, or leaving the run) is no longer waited for.
    pub fn note_peer(&mut self, peer: PeerId, status: Status) {
        if status.run != self.run {
            return;
        }
        let worker = peer.to_bytes();
        if status.done {
            // Finished or leaving (`leave_on`): nothing more will come from it, this round or
            // the next (it may have contributed to this one, which makes it expected there).
            self.machine.unexpect(&worker);
            if self.gone.len() < MAX_PEERS {
                self.gone.insert(worker);
            }
        } else {
            self.gone.remove(&worker);
            if status.round == self.machine.round() && !self.excluded(&worker) {
                self.machine.expect(worker);
            }
        }
        if self.peers.len() < MAX_PEERS || self.peers.contains_key(&peer) {
            if status.round < self.machine.round() && !status.done {
                let round = self.machine.round();
                self.behind_since.entry(peer).or_insert(round);
                if self.stuck(&peer) {
                    // Nor is its contribution waited for (say it contributed last round, then
                    // stopped while claiming to catch up).
                    self.machine.unexpect(&peer.to_bytes());
                }
            } else {
                self.behind_since.remove(&peer);
            }
            self.peers.insert(peer, status);
        }
        self.release_closed();
    }

    /// Keeps `set` as the set of `round`, just closed by worker `me`: peers still closing that
    /// round fetch from it what they miss ([`Self::release_closed`] drops its payloads once
    /// none can).
    pub fn keep_closed(&mut self, round: u64, set: BTreeMap<Vec<u8>, Contribution>, me: &[u8]) {
        self.closed_members = set
            .keys()
            .filter(|w| w.as_slice() != me)
            .filter_map(|w| PeerId::from_bytes(w).ok())
            .collect();
        self.closed = Some((round, set));
        self.closed_released = false;
        self.release_closed();
    }

    /// What this worker holds of `worker`'s commitment to `round`, for the start check of its
    /// next round ([`plexus_train::audit::check_start`]): `None` when it did not close
    /// `round` (it joined, caught up or restarted since), else the commitment in the set it
    /// closed `round` on, if that set holds one.
    pub fn closed_commitment(&self, round: u64, worker: &[u8]) -> Option<Option<Commitment>> {
        match &self.closed {
            Some((r, set)) if *r == round => {
                Some(set.get(worker).map(|c| c.signed.commitment.clone()))
            }
            _ => None,
        }
    }

    /// Forgets the round closed last (this worker adopted another state).
    pub fn forget_closed(&mut self) {
        self.closed = None;
        self.closed_released = false;
        self.closed_members.clear();
    }

    /// Drops the payloads of the round closed last once every peer this worker knows, and
    /// every other worker whose contribution is in the set, has said it is past that round,
    /// done, or stuck behind ([`Self::stuck`]): nobody will fetch them any more, and they are
    /// a pseudo-gradient per worker (a model-sized vector each with f32) held through the next
    /// round's training. The commitments stay: the round's nonces are still checked against
    /// them. A peer's claim to be ahead only releases them early for that peer's own sake; an
    /// honest peer still closing the round keeps them, and so does a member of the set that
    /// this worker has no status of (disconnected a moment at the close: it may come back to
    /// fetch; a crashed one keeps them to the next close, as before). Convicted or unstaked
    /// peers are not waited for.
    fn release_closed(&mut self) {
        let Some((round, _)) = &self.closed else {
            return;
        };
        let round = *round;
        let past = |p: &PeerId, st: &Status| st.done || st.round > round || self.stuck(p);
        let waiting = self
            .peers
            .iter()
            .any(|(p, st)| !past(p, st) && !self.excluded(&p.to_bytes()));
        let member_unknown = self.closed_members.iter().any(|p| {
            !self.excluded(&p.to_bytes()) && self.peers.get(p).is_none_or(|st| !past(p, st))
        });
        if self.closed_released || waiting || member_unknown {
            return;
        }
        if let Some((_, set)) = &mut self.closed {
            for c in set.values_mut() {
                c.payload = Arc::from(Vec::new());
            }
        }
        self.closed_released = true;
    }

    /// Notes every status (see [`Self::note_peer`]) and keeps those whose peers may vote on the
    /// state to hold and serve it. A worker convicted by an audit trains on a state of its own
    /// making (its own contributions in, the others' refused): following it would fork this
    /// worker off the honest ones. Nor does a worker under the run's stake vote.
    pub fn note_voters(&mut self, statuses: Vec<(PeerId, Status)>) -> Vec<(PeerId, Status)> {
        for (p, st) in &statuses {
            self.note_peer(*p, st.clone());
        }
        statuses
            .into_iter()
            .filter(|(p, _)| !self.excluded(&p.to_bytes()))
            .collect()
    }

    /// Offers `c` (arrived at `now_ms`): this round's go to the machine, next round's wait.
    pub fn receive(&mut self, c: Contribution, now_ms: u64) -> Result<(), String> {
        self.admit(&c.signed)?;
        let cm = &c.signed.commitment;
        if cm.round == self.machine.round() + 1 {
            self.early.insert(cm.worker.clone(), c);
            return Ok(());
        }
        self.machine.offer(&c, now_ms).map_err(|e| e.to_string())?;
        self.held.insert(c.signed.commitment.worker.clone(), c);
        Ok(())
    }

    /// The checks of [`Self::receive`] that come before the machine's, and all of those for a
    /// contribution to the next round.
    fn admit(&self, signed: &Signed) -> Result<(), String> {
        let cm = &signed.commitment;
        if let Some(r) = self.convicted.get(&cm.worker) {
            return Err(format!(
                "the worker was convicted by the audit of round {}; refused for the rest of the run",
                r + 1
            ));
        }
        if let Some(why) = self.stake.as_ref().and_then(|g| g.refusal(&cm.worker)) {
            return Err(why);
        }
        let round = self.machine.round();
        if cm.round == round && self.closing == Some(round) {
            return Err(format!("round {} is closing: its set is fixed", round + 1));
        }
        if cm.round == round + 1 {
            signed
                .verify()
                .map_err(|e| Refusal::Forged(e).to_string())?;
            if cm.run != self.run {
                return Err(Refusal::WrongRun.to_string());
            }
            if self.early.contains_key(&cm.worker) {
                return Err(Refusal::Replayed.to_string());
            }
            let max = self.machine.config().max_workers;
            if self.early.len() + self.offers.count_for(round + 1) >= max as usize {
                return Err(Refusal::Full { max }.to_string());
            }
        }
        Ok(())
    }

    /// Takes `peer`'s offer of its own contribution `signed` (arrived at `now_ms`) when a push
    /// of it with the committed payload would be taken: its payload is then fetched
    /// ([`super::offers`]).
    pub fn offer(&mut self, peer: PeerId, signed: Signed, now_ms: u64) -> Result<(), String> {
        let cm = &signed.commitment;
        if peer.to_bytes() != cm.worker {
            return Err(format!(
                "{peer} offered {}'s contribution: a worker offers only its own",
                worker_name(&cm.worker)
            ));
        }
        if self.offers.is_pending(cm.round, &cm.worker) {
            return Err(
                "this contribution was offered already; its payload is being fetched".into(),
            );
        }
        if self.offers.failed(cm.round, &cm.worker) {
            return Err(format!(
                "its payload did not come when offered before: no other offer in round {}",
                cm.round + 1
            ));
        }
        self.admit(&signed)?;
        if cm.round == self.machine.round() + 1 {
            // The machine checks the rest when the round opens; the length bounds the fetch.
            let n = self.machine.state().params.values.len();
            let longest = self.machine.config().codec.encoded_len(n) as u64;
            if cm.payload_len > longest {
                return Err(Refusal::PayloadLength {
                    len: cm.payload_len,
                    max: longest,
                }
                .to_string());
            }
        } else {
            self.machine
                .check_commitment(&signed, now_ms)
                .map_err(|e| e.to_string())?;
            let max = self.machine.config().max_workers as usize;
            if self.held.len() + self.offers.count_for(cm.round) >= max {
                return Err(Refusal::Full { max: max as u32 }.to_string());
            }
        }
        self.offers.add(Offered {
            from: peer,
            signed,
            at_ms: now_ms,
        });
        Ok(())
    }

    /// Checks a commitment a peer relays (`Fetch` answered `Offered`) as listed for `worker`'s
    /// contribution to the current `round`, as a push of it at `at_ms` would be checked, before
    /// any byte of its payload is asked.
    pub fn check_relayed(
        &mut self,
        signed: &Signed,
        worker: &[u8],
        round: u64,
        at_ms: u64,
    ) -> Result<(), String> {
        let cm = &signed.commitment;
        if cm.worker != worker || cm.round != round || round != self.machine.round() {
            return Err(format!(
                "a commitment of {} to round {} where {} to round {} was listed",
                worker_name(&cm.worker),
                cm.round + 1,
                worker_name(worker),
                round + 1
            ));
        }
        self.admit(signed)?;
        self.machine
            .check_commitment(signed, at_ms)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The contribution of `worker` to `round` this worker holds: of the round (or the one
    /// just closed), or early for the next.
    fn contribution_of(&self, round: u64, worker: &[u8]) -> Option<&Contribution> {
        if round == self.machine.round() + 1 {
            return self.early.get(worker);
        }
        self.set_of(round).and_then(|s| s.get(worker))
    }

    /// The contributions held for `round` (this one or the one just closed, until its
    /// payloads are released).
    fn set_of(&self, round: u64) -> Option<&BTreeMap<Vec<u8>, Contribution>> {
        if round == self.machine.round() {
            return Some(&self.held);
        }
        match &self.closed {
            Some((r, set)) if *r == round && !self.closed_released => Some(set),
            _ => None,
        }
    }

    /// The answer to `peer`'s push or offer (`what`) of the contribution committed in `cm`,
    /// which this worker took or refused (`taken`).
    fn answer_contribution(
        &mut self,
        peer: PeerId,
        cm: &Commitment,
        taken: Result<(), String>,
        what: &str,
    ) -> TrainResponse {
        match taken {
            Ok(()) => {
                // Contributing to this round is being at it, whatever its last hello said (a
                // joiner says hello before it fetches the state it catches up to).
                if cm.round == self.machine.round() {
                    self.behind_since.remove(&peer);
                }
                TrainResponse::Accepted
            }
            Err(why) => {
                self.refused += 1;
                eprintln!(
                    "refused {what} from {} (sent by {peer}) for round {} at round {}: {why}",
                    worker_name(&cm.worker),
                    cm.round,
                    self.machine.round()
                );
                TrainResponse::Refused(why)
            }
        }
    }

    /// When `req` asks a range of a start state this worker keeps: what reads the answer
    /// ([`StartReader::answer_range`]), for the serve loop to run off the lock and off the
    /// loop (a disk read); `None` for every other request, which [`Self::answer`] answers.
    pub fn start_range(&self, req: &TrainRequest) -> Option<(StartReader, u64, u32)> {
        match *req {
            TrainRequest::StartRange {
                run,
                round,
                offset,
                len,
            } if run == self.run => Some((self.start(round)?.reader(), offset, len)),
            _ => None,
        }
    }

    /// Answers one message from `peer`.
    #[cfg(test)]
    pub fn handle(&mut self, peer: PeerId, msg: &[u8], now_ms: u64) -> TrainResponse {
        match self.decode(peer, msg) {
            Ok(req) => self.answer(peer, req, now_ms),
            Err(refused) => refused,
        }
    }

    /// Decodes a message from `peer`; one that does not decode is counted and refused.
    pub fn decode(&mut self, peer: PeerId, msg: &[u8]) -> Result<TrainRequest, TrainResponse> {
        decode::<TrainRequest>(msg).map_err(|e| {
            self.refused += 1;
            eprintln!("refused a message from {peer}: {e}");
            TrainResponse::Refused(e.to_string())
        })
    }

    /// Answers one decoded request from `peer`.
    pub fn answer(&mut self, peer: PeerId, req: TrainRequest, now_ms: u64) -> TrainResponse {
        let other_run = |run: Digest| run != self.run;
        match req {
            TrainRequest::Hello(status) => {
                if other_run(status.run) {
                    return TrainResponse::Refused("another run".into());
                }
                self.note_peer(peer, status);
                TrainResponse::Status(self.told())
            }
            TrainRequest::Push(c) => {
                let cm = c.signed.commitment.clone();
                let taken = self.receive(*c, now_ms);
                self.answer_contribution(peer, &cm, taken, "a contribution")
            }
            TrainRequest::Held { run, round } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                match self.set_of(round) {
                    Some(set) => TrainResponse::Held {
                        round,
                        held: set
                            .iter()
                            .map(|(w, c)| HeldEntry {
                                worker: w.clone(),
                                commitment: c.signed.commitment.digest(),
                            })
                            .collect(),
                    },
                    None => TrainResponse::NotHeld,
                }
            }
            TrainRequest::Fetch { run, round, worker } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                if self.serve_only.is_some_and(|p| p != peer) {
                    return TrainResponse::NotHeld;
                }
                match self.set_of(round).and_then(|s| s.get(&worker)) {
                    Some(c) if !travels_whole(c.payload.len()) => {
                        TrainResponse::Offered(Box::new(c.signed.clone()))
                    }
                    Some(c) => TrainResponse::Contribution(Box::new(c.clone())),
                    None => TrainResponse::NotHeld,
                }
            }
            TrainRequest::State { run } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                // Workers of earlier builds ask for the whole state in one message: answered
                // only while it fits one.
                let state = self.claim.as_ref().unwrap_or(self.machine.state());
                let n = state.params.values.len();
                if state_len(n) + 1024 > plexus_core::wire::MAX_FRAME_BYTES {
                    return TrainResponse::Refused(
                        "the state is larger than one message: ask for its ranges".into(),
                    );
                }
                TrainResponse::State(StateTransfer::of(state))
            }
            TrainRequest::Reveals { run, round } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                if round == self.machine.round() && self.fixed_by.len() < MAX_PEERS {
                    self.fixed_by.insert(peer);
                }
                // Nonces are told only once this worker's set of the round is fixed (or the
                // round is behind it): a contribution it still took could otherwise be made
                // knowing them. A peer still closing a round this worker closed earlier (a
                // joiner, a straggler) needs them as much as the others did.
                if self.fixed_set(round).is_none() && round >= self.machine.round() {
                    return TrainResponse::NotHeld;
                }
                TrainResponse::Reveals {
                    round,
                    reveals: self.told_reveals(round),
                }
            }
            TrainRequest::Verdicts { run, round } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                TrainResponse::Verdicts {
                    round,
                    verdicts: self
                        .verdicts
                        .get(&round)
                        .map(|v| {
                            v.iter()
                                .map(|(worker, pass)| AuditVerdict {
                                    worker: worker.clone(),
                                    pass: *pass,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            }
            TrainRequest::StateRange {
                run,
                state,
                offset,
                len,
            } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                if len as usize > MAX_RANGE_BYTES {
                    return TrainResponse::Refused(format!(
                        "a state range of {len} bytes (at most {MAX_RANGE_BYTES})"
                    ));
                }
                let Some(bytes) = self.bytes_of_state(state) else {
                    return TrainResponse::NotHeld;
                };
                let total = bytes.len() as u64;
                let end = offset.saturating_add(u64::from(len));
                if end > total {
                    return TrainResponse::Refused(format!(
                        "bytes {offset}..{end} of a state of {total}"
                    ));
                }
                let mut bytes = bytes[offset as usize..end as usize].to_vec();
                if self.corrupt_state {
                    // The lowest bit of every value (and of the round's bytes 0 and 4): finite
                    // numbers stay finite, so only the digest (or the round) tells.
                    for (i, b) in bytes.iter_mut().enumerate() {
                        if (offset as usize + i).is_multiple_of(4) {
                            *b ^= 1;
                        }
                    }
                }
                TrainResponse::StateRange {
                    state,
                    offset,
                    total,
                    bytes,
                }
            }
            TrainRequest::StartState { run, round } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                match self.start(round) {
                    Some(f) if start_len(f.n) + 4096 > plexus_core::wire::MAX_FRAME_BYTES => {
                        TrainResponse::Refused(
                            "the start state does not fit one message: ask for it in ranges".into(),
                        )
                    }
                    // Small enough for one message: read back whole.
                    Some(f) => match f.load() {
                        Ok(st) => TrainResponse::StartState(WorkerStateTransfer::of(round, &st)),
                        Err(e) => TrainResponse::Refused(format!("its start state: {e}")),
                    },
                    None => TrainResponse::NotHeld,
                }
            }
            TrainRequest::StartRange {
                run,
                round,
                offset,
                len,
            } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                match self.start(round) {
                    // (The serve loop reads the ranges of kept states itself, off the lock:
                    // [`Self::start_range`]; this answers the same when called directly.)
                    Some(file) => file.reader().answer_range(offset, len),
                    None => TrainResponse::NotHeld,
                }
            }
            TrainRequest::Offer(signed) => {
                let cm = signed.commitment.clone();
                let taken = self.offer(peer, *signed, now_ms);
                self.answer_contribution(peer, &cm, taken, "the offer of a contribution")
            }
            TrainRequest::Pending { run, round } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                TrainResponse::Pending {
                    round,
                    pending: self.offers.pending_of(round),
                }
            }
            TrainRequest::PayloadRange {
                run,
                round,
                worker,
                offset,
                len,
            } => {
                if other_run(run) {
                    return TrainResponse::Refused("another run".into());
                }
                if self.serve_only.is_some_and(|p| p != peer) {
                    return TrainResponse::NotHeld;
                }
                let Some(c) = self.contribution_of(round, &worker) else {
                    return TrainResponse::NotHeld;
                };
                let total = c.payload.len() as u64;
                let end = offset.saturating_add(u64::from(len));
                if len as usize > MAX_RANGE_BYTES || end > total {
                    return TrainResponse::Refused(format!(
                        "bytes {offset}..{end} of a payload of {total} (ranges of at most {MAX_RANGE_BYTES})"
                    ));
                }
                TrainResponse::PayloadRange {
                    round,
                    worker,
                    offset,
                    total,
                    bytes: c.payload[offset as usize..end as usize].to_vec(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::keys::NodeKey;
    use plexus_model::train::task::Task;
    use plexus_train::commit::{Commitment, Signed};
    use plexus_train::local::{prepare, TaskSetup};
    use plexus_train::outer::OuterState;
    use plexus_train::protocol::choose_target;

    fn shared() -> Shared {
        let setup = TaskSetup {
            task: Task::Reverse { len: 3 },
            hidden: 32,
            layers: 1,
            init_seed: 1,
            eval_examples: 4,
        };
        let (_, _, params) = prepare(&setup, 1).unwrap();
        let n = params.values.len();
        let global = GlobalState {
            round: 4,
            params,
            outer: OuterState::new(n),
        };
        let cfg = plexus_train::RoundConfig {
            run: Digest::of(b"run"),
            seed: 1,
            inner_steps: 1,
            batch_size: 1,
            inner: plexus_model::train::InnerConfig {
                lr: 1e-3,
                warmup: 0,
                min_lr_ratio: 1.0,
                schedule_steps: 1,
                clip: 0.0,
                adamw: plexus_model::train::AdamWConfig::default(),
            },
            codec: plexus_train::Codec::F32,
            error_feedback: false,
            outer: plexus_train::OuterConfig::default(),
            deadline: plexus_train::deadline::DeadlinePolicy::default(),
            score: plexus_train::ScorePolicy::default(),
            max_workers: 4,
        };
        Shared::new(cfg.run, RoundMachine::new(cfg, global, [], 0))
    }

    fn ask_range(s: &mut Shared, state: Digest, offset: u64, len: u32) -> TrainResponse {
        let req = TrainRequest::StateRange {
            run: s.run,
            state,
            offset,
            len,
        };
        s.handle(PeerId::random(), &plexus_train::protocol::encode(&req), 0)
    }

    #[test]
    fn a_worker_that_says_it_is_done_is_not_waited_for_until_it_says_otherwise() {
        let mut s = shared();
        let peer = PeerId::random();
        let worker = peer.to_bytes();
        let at = |s: &Shared, done: bool| Status { done, ..s.status() };
        s.note_peer(peer, at(&s, false));
        assert!(s.machine.expects(&worker));
        s.note_peer(peer, at(&s, true));
        assert!(!s.machine.expects(&worker), "waited for a worker that left");
        // Closing a round expects whoever contributed to it; a gone worker is forgotten again.
        s.machine.expect(worker.clone());
        s.forget_gone();
        assert!(!s.machine.expects(&worker), "waited for a worker that left");
        // Back (restarted, caught up): expected again.
        s.note_peer(peer, at(&s, false));
        s.forget_gone();
        assert!(s.machine.expects(&worker));
    }

    #[test]
    fn state_ranges_are_served_for_the_state_held_and_assemble_to_it() {
        let mut s = shared();
        let digest = s.machine.state().digest();
        let n = s.machine.state().params.values.len();
        let total = plexus_train::transfer::state_len(n);
        // Three ranges, asked out of order, assemble to a state with the digest asked for.
        let mut bytes = vec![0u8; total];
        for r in plexus_train::transfer::ranges(total, 3).into_iter().rev() {
            match ask_range(&mut s, digest, r.start as u64, r.len() as u32) {
                TrainResponse::StateRange {
                    state,
                    offset,
                    total: t,
                    bytes: b,
                } => {
                    assert_eq!((state, offset, t), (digest, r.start as u64, total as u64));
                    bytes[r].copy_from_slice(&b);
                }
                other => panic!("{other:?}"),
            }
        }
        let layout = s.machine.state().params.layout.clone();
        let back = plexus_train::transfer::state_from_bytes(&bytes, layout).unwrap();
        assert_eq!(back.digest(), digest);
        // Another state is not held; ranges past the end or over the limit are refused.
        assert_eq!(
            ask_range(&mut s, Digest::of(b"other"), 0, 8),
            TrainResponse::NotHeld
        );
        assert!(matches!(
            ask_range(&mut s, digest, total as u64 - 4, 8),
            TrainResponse::Refused(_)
        ));
        let over = plexus_train::transfer::MAX_RANGE_BYTES as u32 + 1;
        assert!(matches!(
            ask_range(&mut s, digest, 0, over),
            TrainResponse::Refused(_)
        ));
        assert!(matches!(
            ask_range(&mut s, digest, u64::MAX, 8),
            TrainResponse::Refused(_)
        ));
    }

    #[test]
    fn a_convicted_worker_neither_votes_nor_serves_its_state() {
        let mut s = shared();
        let (honest, convicted) = (PeerId::random(), PeerId::random());
        s.convicted.insert(convicted.to_bytes(), 1);
        let at = |round: u64, byte: u8| Status {
            run: s.run,
            round,
            state: Digest([byte; 32]),
            done: false,
        };
        let mine = (4, s.status().state);
        // The fork would win a tie (the smaller digest).
        let (theirs, forked) = (at(5, 9), at(5, 0));
        let statuses = vec![(honest, theirs.clone()), (convicted, forked.clone())];
        // Both statuses are noted; only the honest one votes.
        let voters = s.note_voters(statuses);
        assert_eq!(voters, vec![(honest, theirs.clone())]);
        assert_eq!(s.peers.get(&convicted), Some(&forked));
        let votes = voters.iter().map(|(_, st)| (st.round, st.state));
        assert_eq!(
            choose_target(mine, votes, 10),
            Some((5, theirs.state)),
            "followed the convicted worker"
        );
    }

    /// A contribution of `key`'s worker to `s`'s current round, with sealed nonce `reveal`
    /// (valid as far as its signature goes).
    fn contribution(s: &Shared, key: &NodeKey, reveal: Digest) -> Contribution {
        Contribution {
            signed: Signed::sign(
                key,
                Commitment {
                    run: s.run,
                    round: s.machine.round(),
                    worker: key.peer_id().to_bytes(),
                    start_weights: s.machine.start(),
                    start_optimizer: Digest([0; 32]),
                    start_residual: Digest([0; 32]),
                    examples: Digest([0; 32]),
                    seed: 1,
                    first_step: 0,
                    inner_steps: 1,
                    batch_size: 1,
                    hyper: Digest([0; 32]),
                    payload: Digest([0; 32]),
                    payload_len: 0,
                    end_optimizer: Digest([0; 32]),
                    end_residual: Digest([0; 32]),
                    reveal,
                },
            ),
            payload: Vec::new().into(),
        }
    }

    /// A valid contribution of `key` to `round` of `s`'s run (payload: zeros in the codec).
    fn valid_contribution(s: &Shared, key: &NodeKey, round: u64) -> Contribution {
        let cfg = s.machine.config();
        let n = s.machine.state().params.values.len();
        let payload = cfg.codec.encode(&vec![0.0; n]).unwrap();
        let mut c = contribution(s, key, Digest([0; 32]));
        let cm = &mut c.signed.commitment;
        cm.round = round;
        cm.first_step = round * u64::from(cfg.inner_steps);
        cm.hyper = cfg.hyper_digest();
        cm.payload = Digest::of(&payload);
        cm.payload_len = payload.len() as u64;
        Contribution {
            signed: Signed::sign(key, c.signed.commitment),
            payload: payload.into(),
        }
    }

    /// An offer is checked like a push but for its payload, made only by its own worker, and
    /// pending (once) until its payload is fetched; then it is received as arriving when the
    /// offer did, and any worker holding it serves its payload in ranges.
    #[test]
    fn offers_are_checked_like_pushes_and_their_payloads_served_in_ranges() {
        use plexus_train::protocol::encode;
        let mut s = shared();
        let round = s.machine.round();
        let key = NodeKey::generate();
        let worker = key.peer_id().to_bytes();
        let c = valid_contribution(&s, &key, round);
        let offer = |s: &mut Shared, from: PeerId, signed: &Signed| {
            let msg = encode(&TrainRequest::Offer(Box::new(signed.clone())));
            s.handle(from, &msg, 10)
        };
        // Another peer cannot offer it; a forged or stale one is refused before any fetch.
        let r = offer(&mut s, PeerId::random(), &c.signed);
        assert!(
            matches!(&r, TrainResponse::Refused(w) if w.contains("only its own")),
            "{r:?}"
        );
        let mut forged = c.signed.clone();
        forged.commitment.payload_len += 1;
        assert!(matches!(
            offer(&mut s, key.peer_id(), &forged),
            TrainResponse::Refused(_)
        ));
        let stale = valid_contribution(&s, &key, round - 1);
        assert!(matches!(
            offer(&mut s, key.peer_id(), &stale.signed),
            TrainResponse::Refused(_)
        ));
        let mut long = c.signed.commitment.clone();
        long.payload_len = 1 << 40;
        let long = Signed::sign(&key, long);
        let r = offer(&mut s, key.peer_id(), &long);
        assert!(
            matches!(&r, TrainResponse::Refused(w) if w.contains("longer than")),
            "{r:?}"
        );
        assert!(s.offers.take_queue().is_empty());
        // Taken once, queued for its fetch; the same offer again is refused while pending.
        assert_eq!(
            offer(&mut s, key.peer_id(), &c.signed),
            TrainResponse::Accepted
        );
        assert!(matches!(
            offer(&mut s, key.peer_id(), &c.signed),
            TrainResponse::Refused(_)
        ));
        let queued = s.offers.take_queue();
        assert_eq!(queued.len(), 1);
        assert_eq!((queued[0].from, queued[0].at_ms), (key.peer_id(), 10));
        assert!(s.offers.pending_for(round));
        // Its payload came: settled and received.
        s.offers.settle(round, &worker, true);
        s.receive(c.clone(), queued[0].at_ms).unwrap();
        assert!(s.machine.contributes(&worker));
        // Any worker holding it serves its payload, in ranges that assemble to it.
        let total = c.payload.len();
        let mut got = Vec::new();
        for offset in (0..total).step_by(1000) {
            let len = 1000.min(total - offset) as u32;
            let req = TrainRequest::PayloadRange {
                run: s.run,
                round,
                worker: worker.clone(),
                offset: offset as u64,
                len,
            };
            match s.handle(PeerId::random(), &encode(&req), 0) {
                TrainResponse::PayloadRange {
                    bytes, total: t, ..
                } if t == total as u64 => got.extend(bytes),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, &c.payload[..]);
        let past = TrainRequest::PayloadRange {
            run: s.run,
            round,
            worker: worker.clone(),
            offset: total as u64 - 1,
            len: 2,
        };
        assert!(matches!(
            s.handle(PeerId::random(), &encode(&past), 0),
            TrainResponse::Refused(_)
        ));
        let other = TrainRequest::PayloadRange {
            run: s.run,
            round,
            worker: vec![1, 2, 3],
            offset: 0,
            len: 1,
        };
        assert_eq!(
            s.handle(PeerId::random(), &encode(&other), 0),
            TrainResponse::NotHeld
        );
        // Once held, an offer of it is a replay.
        assert!(matches!(
            offer(&mut s, key.peer_id(), &c.signed),
            TrainResponse::Refused(_)
        ));
    }

    /// The round closed last is served to peers still closing it; its payloads are dropped
    /// once every peer is past it, done or stuck, and its commitments kept.
    #[test]
    fn the_closed_rounds_payloads_are_released_once_every_peer_is_past_it() {
        use plexus_train::protocol::encode;
        let mut s = shared();
        let closed = s.machine.round() - 1;
        let key = NodeKey::generate();
        let worker = key.peer_id().to_bytes();
        let c = valid_contribution(&s, &key, closed);
        let payload = Arc::clone(&c.payload);
        let run = s.run;
        let at = |round: u64, done: bool| Status {
            run,
            round,
            state: Digest([0; 32]),
            done,
        };
        let (a, b, gone) = (PeerId::random(), PeerId::random(), PeerId::random());
        s.note_peer(a, at(closed, false));
        s.note_peer(b, at(closed, false));
        s.note_peer(gone, at(closed, true));
        let member = key.peer_id();
        // Its member (the contributing worker) has no status yet: kept however the others
        // stand.
        s.keep_closed(closed, [(worker.clone(), c.clone())].into(), &[]);
        let fetch = TrainRequest::Fetch {
            run: s.run,
            round: closed,
            worker: worker.clone(),
        };
        let served = TrainResponse::Contribution(Box::new(c));
        assert_eq!(s.handle(a, &encode(&fetch), 0), served);
        // One peer past it, one still closing it: still served.
        s.note_peer(a, at(closed + 1, false));
        assert_eq!(s.handle(b, &encode(&fetch), 0), served);
        assert!(Arc::strong_count(&payload) > 1);
        s.note_peer(b, at(closed + 1, false));
        assert_eq!(
            s.handle(b, &encode(&fetch), 0),
            served,
            "a member not heard of"
        );
        // The member past it too: released, the commitment kept.
        s.note_peer(member, at(closed + 1, false));
        assert_eq!(s.handle(b, &encode(&fetch), 0), TrainResponse::NotHeld);
        drop(served);
        assert_eq!(Arc::strong_count(&payload), 1, "the payload is still held");
        assert!(s
            .fixed_set(closed)
            .is_some_and(|set| set.contains_key(&worker)));
        // A set kept while a peer is still at its round is served again (the release is per
        // set).
        let earlier = closed - 1;
        s.note_peer(PeerId::random(), at(earlier, false));
        let c = valid_contribution(&s, &key, earlier);
        s.keep_closed(earlier, [(worker.clone(), c)].into(), &[]);
        let fetch_earlier = TrainRequest::Fetch {
            run: s.run,
            round: earlier,
            worker,
        };
        assert!(matches!(
            s.handle(a, &encode(&fetch_earlier), 0),
            TrainResponse::Contribution(_)
        ));
    }

    /// A worker tells audit nonces only once it has fixed the round's set, and keeps only
    /// those that open a member's sealed value.
    #[test]
    fn nonces_are_told_once_the_set_is_fixed_and_kept_only_when_they_open_the_seal() {
        use plexus_train::protocol::encode;
        use plexus_train::reveal::nonce;
        let mut s = shared();
        let round = s.machine.round();
        let key = NodeKey::generate();
        let worker = key.peer_id().to_bytes();
        let n = nonce(&key, s.run, round);
        s.held
            .insert(worker.clone(), contribution(&s, &key, sealed(&n)));
        let ask = TrainRequest::Reveals { run: s.run, round };
        let peer = PeerId::random();
        assert_eq!(s.handle(peer, &encode(&ask), 0), TrainResponse::NotHeld);
        let told = || Reveal {
            worker: worker.clone(),
            nonce: n,
        };
        assert_eq!(s.add_reveals(round, vec![told()]), 0, "kept before fixing");
        s.closing = Some(round);
        let wrong = vec![
            Reveal {
                worker: worker.clone(),
                nonce: [0; 32],
            },
            Reveal {
                worker: vec![1, 2],
                nonce: n,
            },
        ];
        assert_eq!(s.add_reveals(round, wrong), 0);
        assert_eq!(s.unrevealed(round), vec![worker.clone()]);
        assert_eq!(s.add_reveals(round, vec![told()]), 1);
        assert!(s.unrevealed(round).is_empty());
        assert_eq!(
            s.handle(peer, &encode(&ask), 0),
            TrainResponse::Reveals {
                round,
                reveals: vec![told()]
            }
        );
        // A round this worker closed before its last one is still told: a joiner or a
        // straggler closing it now needs its nonces.
        let earlier = round - 1;
        s.reveals.insert(earlier, [(worker.clone(), n)].into());
        let ask_earlier = TrainRequest::Reveals {
            run: s.run,
            round: earlier,
        };
        assert_eq!(
            s.handle(peer, &encode(&ask_earlier), 0),
            TrainResponse::Reveals {
                round: earlier,
                reveals: vec![told()]
            }
        );
    }

    /// A run that asks a stake: a worker under it is refused, not waited for and no voter;
    /// once the ledger shows its stake, its contribution gets past the gate (on to the round
    /// machine's own checks).
    #[test]
    fn a_worker_under_the_runs_stake_counts_for_nothing_until_it_stakes() {
        let mut s = shared();
        s.stake = Some(StakeGate::new(1_000));
        let key = NodeKey::generate();
        let (peer, worker) = (key.peer_id(), key.peer_id().to_bytes());
        let account = plexus_ledger::address_of(&key.public()).unwrap();
        let round = s.machine.round();
        let c = contribution(&s, &key, Digest([0; 32]));
        let status = Status {
            run: s.run,
            round,
            state: s.status().state,
            done: false,
        };
        let why = s.receive(c.clone(), 0).unwrap_err();
        assert!(
            why.contains("not staked") && why.contains(&account.to_string()),
            "{why}"
        );
        assert!(s.note_voters(vec![(peer, status.clone())]).is_empty());
        assert!(!s.machine.expects(&worker), "waited for an unstaked worker");

        s.stake.as_mut().unwrap().update([(account, 1_000)].into());
        if let Err(why) = s.receive(c, 0) {
            assert!(!why.contains("not staked"), "{why}");
        }
        assert_eq!(
            s.note_voters(vec![(peer, status.clone())]),
            vec![(peer, status)]
        );
        assert!(s.machine.expects(&worker));
    }
}
