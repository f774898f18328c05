//! Outbound training messages: each call to one peer has its own timeout, and a peer that
//! does not answer, answers garbage or is not a training peer counts as absent (the caller
//! tries another or goes on without it).

use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use plexus_core::wire::{Request, Response, MAX_FRAME_BYTES};
use plexus_core::Digest;
use plexus_net::{NetHandle, PeerId};
use plexus_train::commit::{Contribution, Signed};
use plexus_train::protocol::{
    decode, encode, AuditVerdict, HeldEntry, Reveal, Status, TrainRequest, TrainResponse,
};
use plexus_train::transfer::{start_from_bytes, start_len, StateFetch};
use plexus_train::worker::WorkerState;
use std::ops::Range;
use std::time::Duration;

/// How long one peer may take to answer a small message.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest link a range of the global state is given time for: a home uplink.
const SLOWEST_LINK_BITS_PER_S: f64 = 1e6;
/// The slowest uplink a drawn worker's whole start state is given time for (1.6 GB of a 135M
/// model: 21 minutes): an audit waits at most that long however its worker paces the ranges;
/// one slower is not audited in time, and its contribution is dropped (not convicted).
const AUDITED_LINK_BITS_PER_S: f64 = 10e6;
/// Times one range of a start state is asked of its only holder before the fetch fails.
const START_RANGE_TRIES: usize = 3;

/// How long a holder may take to send `len` bytes of the global state: the small-message
/// timeout plus the bytes at [`SLOWEST_LINK_BITS_PER_S`] (a range it misses goes to the next
/// holder, so a slow one delays the fetch by one wave, not the whole state). For the largest
/// range, 18.4 s: inside the transport's own 30 s per call.
fn range_timeout(len: usize) -> Duration {
    CALL_TIMEOUT + Duration::from_secs_f64(len as f64 * 8.0 / SLOWEST_LINK_BITS_PER_S)
}

/// How long `len` bytes (a payload, or an audited worker's start state) may take to come in
/// ranges from one holder: the
/// small-message timeout plus its bytes at [`AUDITED_LINK_BITS_PER_S`] (269 MB, a 135M model's
/// f16 pseudo-gradient: 225 s).
pub fn payload_budget(len: usize) -> Duration {
    CALL_TIMEOUT + Duration::from_secs_f64(len as f64 * 8.0 / AUDITED_LINK_BITS_PER_S)
}

/// A contribution as a peer relays it ([`Peers::fetch`]).
pub enum Fetched {
    Whole(Contribution),
    /// Its payload does not travel in one message: asked in ranges once the commitment checks.
    Offered(Signed),
}

#[derive(Clone)]
pub struct Peers {
    pub net: NetHandle,
    pub run: Digest,
}

impl Peers {
    async fn ask(
        &self,
        peer: PeerId,
        req: &TrainRequest,
        timeout: Duration,
    ) -> Option<TrainResponse> {
        self.ask_raw(peer, encode(req), timeout).await
    }

    /// Sends `msg` as a training message and decodes the answer.
    pub async fn ask_raw(
        &self,
        peer: PeerId,
        msg: Vec<u8>,
        timeout: Duration,
    ) -> Option<TrainResponse> {
        match tokio::time::timeout(timeout, self.net.call(peer, Request::Train { msg })).await {
            Ok(Ok(Response::Train { msg })) => decode(&msg).ok(),
            _ => None,
        }
    }

    /// Says hello to every connected peer; the statuses of those in this run.
    pub async fn hello_all(&self, me: &Status) -> Vec<(PeerId, Status)> {
        let peers = self.net.connected_peers().await;
        let req = TrainRequest::Hello(me.clone());
        let answers = join_all(peers.into_iter().map(|p| {
            let req = &req;
            async move { (p, self.ask(p, req, CALL_TIMEOUT).await) }
        }))
        .await;
        answers
            .into_iter()
            .filter_map(|(p, r)| match r {
                Some(TrainResponse::Status(s)) if s.run == self.run => Some((p, s)),
                _ => None,
            })
            .collect()
    }

    /// Sends `c` to each of `peers`; the refusals.
    pub async fn push(&self, peers: &[PeerId], c: &Contribution) -> Vec<(PeerId, String)> {
        self.send_all(peers, encode(&TrainRequest::Push(Box::new(c.clone()))))
            .await
    }

    /// Sends `msg` to each of `peers`; those that did not answer `Accepted`, and why.
    async fn send_all(&self, peers: &[PeerId], msg: Vec<u8>) -> Vec<(PeerId, String)> {
        let answers = join_all(peers.iter().map(|&p| {
            let msg = msg.clone();
            async move { (p, self.ask_raw(p, msg, CALL_TIMEOUT).await) }
        }))
        .await;
        answers
            .into_iter()
            .filter_map(|(p, r)| match r {
                Some(TrainResponse::Accepted) => None,
                Some(TrainResponse::Refused(why)) => Some((p, why)),
                Some(other) => Some((p, format!("unexpected answer {other:?}"))),
                None => Some((p, "no answer".into())),
            })
            .collect()
    }

    /// What `peer` holds for `round`.
    pub async fn held(&self, peer: PeerId, round: u64) -> Option<Vec<HeldEntry>> {
        let req = TrainRequest::Held {
            run: self.run,
            round,
        };
        match self.ask(peer, &req, CALL_TIMEOUT).await {
            Some(TrainResponse::Held { round: r, held }) if r == round => Some(held),
            _ => None,
        }
    }

    /// Offers this worker's own contribution, signed as `signed`, to each of `peers` (its
    /// payload does not travel in one message: they fetch it in ranges); the refusals.
    pub async fn offer(&self, peers: &[PeerId], signed: &Signed) -> Vec<(PeerId, String)> {
        self.send_all(
            peers,
            encode(&TrainRequest::Offer(Box::new(signed.clone()))),
        )
        .await
    }

    /// The contribution to `round` of `worker` whose commitment digest is `commitment`, from
    /// `peer`: whole, or only its commitment when its payload does not travel in one message
    /// (the caller checks it before asking the payload, [`Self::payload`]). `None` for no
    /// answer or another contribution than the one asked.
    pub async fn fetch(
        &self,
        peer: PeerId,
        round: u64,
        worker: Vec<u8>,
        commitment: Digest,
    ) -> Option<Fetched> {
        let req = TrainRequest::Fetch {
            run: self.run,
            round,
            worker,
        };
        match self.ask(peer, &req, CALL_TIMEOUT).await? {
            TrainResponse::Contribution(c) if c.signed.commitment.digest() == commitment => {
                Some(Fetched::Whole(*c))
            }
            TrainResponse::Offered(s) if s.commitment.digest() == commitment => {
                Some(Fetched::Offered(*s))
            }
            _ => None,
        }
    }

    /// The commitments of the offers to `round` that `peer` is still fetching.
    pub async fn pending(&self, peer: PeerId, round: u64) -> Option<Vec<Signed>> {
        let req = TrainRequest::Pending {
            run: self.run,
            round,
        };
        match self.ask(peer, &req, CALL_TIMEOUT).await {
            Some(TrainResponse::Pending { round: r, pending }) if r == round => Some(pending),
            _ => None,
        }
    }

    /// The payload committed in `signed`, in ranges from `holder` (each range asked up to
    /// [`START_RANGE_TRIES`] times, the whole within its bytes at [`AUDITED_LINK_BITS_PER_S`]),
    /// checked against the committed length and digest; `None` when it did not come in time or
    /// is not the committed bytes.
    /// The caller has checked the commitment (its length bounds the buffer).
    pub async fn payload(&self, holder: PeerId, signed: &Signed) -> Option<Contribution> {
        let (run, cm) = (self.run, &signed.commitment);
        let total = usize::try_from(cm.payload_len).ok()?;
        let budget = payload_budget(total);
        let holders = [holder];
        let fetch = self.ranges_of(
            &holders,
            total,
            START_RANGE_TRIES,
            |range| TrainRequest::PayloadRange {
                run,
                round: cm.round,
                worker: cm.worker.clone(),
                offset: range.start as u64,
                len: range.len() as u32,
            },
            |answer, range| match answer {
                TrainResponse::PayloadRange {
                    round,
                    worker,
                    offset,
                    total: t,
                    bytes,
                } if round == cm.round
                    && worker == cm.worker
                    && offset == range.start as u64
                    && t == total as u64 =>
                {
                    Some(bytes)
                }
                _ => None,
            },
        );
        let payload = match tokio::time::timeout(budget, fetch).await {
            Ok((Some(bytes), _)) => bytes,
            _ => return None,
        };
        (Digest::of(&payload) == cm.payload).then(|| Contribution {
            signed: signed.clone(),
            payload: payload.into(),
        })
    }

    /// The `total` bytes of the state whose digest is `digest`, in ranges asked of every one
    /// of `holders` at once ([`StateFetch`]: a range one holder misses goes to the next), or
    /// `None` when some range came from none of them; and the holders that delivered every
    /// range they were asked for. The caller checks the digest.
    pub async fn state_bytes(
        &self,
        holders: &[PeerId],
        digest: Digest,
        total: usize,
    ) -> (Option<Vec<u8>>, Vec<PeerId>) {
        let run = self.run;
        self.ranges_of(
            holders,
            total,
            1,
            |range| TrainRequest::StateRange {
                run,
                state: digest,
                offset: range.start as u64,
                // At most MAX_RANGE_BYTES (`transfer::ranges`).
                len: range.len() as u32,
            },
            |answer, range| match answer {
                TrainResponse::StateRange {
                    state,
                    offset,
                    total: t,
                    bytes,
                } if state == digest && offset == range.start as u64 && t == total as u64 => {
                    Some(bytes)
                }
                _ => None,
            },
        )
        .await
    }

    /// `peer`'s own start state of `round` (for an audit of its contribution) for a model of
    /// `n` parameters, in ranges ([`start_len`] bytes, any size; each range asked up to
    /// [`START_RANGE_TRIES`] times, the whole within its bytes at [`AUDITED_LINK_BITS_PER_S`]);
    /// from a worker of an earlier build, which answers only the whole, in one message when it
    /// fits. `None` when it did not come in time or does not decode.
    pub async fn start_state(&self, peer: PeerId, round: u64, n: usize) -> Option<WorkerState> {
        let run = self.run;
        let total = start_len(n);
        let budget = payload_budget(total);
        let holders = [peer];
        let fetch = self.ranges_of(
            &holders,
            total,
            START_RANGE_TRIES,
            |range| TrainRequest::StartRange {
                run,
                round,
                offset: range.start as u64,
                len: range.len() as u32,
            },
            |answer, range| match answer {
                TrainResponse::StartRange {
                    round: r,
                    offset,
                    total: t,
                    bytes,
                } if r == round && offset == range.start as u64 && t == total as u64 => Some(bytes),
                _ => None,
            },
        );
        if let Ok((Some(bytes), _)) = tokio::time::timeout(budget, fetch).await {
            return start_from_bytes(round, &bytes, n).ok();
        }
        if total + 4096 > MAX_FRAME_BYTES {
            return None;
        }
        let req = TrainRequest::StartState { run, round };
        match self
            .ask(peer, &req, CALL_TIMEOUT.max(range_timeout(total)))
            .await
        {
            Some(TrainResponse::StartState(s)) if s.round == round => s.into_state(n).ok(),
            _ => None,
        }
    }

    /// The `total` bytes asked in ranges of `holders` ([`StateFetch`], each range `tries` times
    /// per holder, a window of asks per holder): `ask` makes a range's request and `take` its bytes from an answer (`None`
    /// for a wrong one).
    async fn ranges_of(
        &self,
        holders: &[PeerId],
        total: usize,
        tries: usize,
        ask: impl Fn(&Range<usize>) -> TrainRequest,
        take: impl Fn(TrainResponse, &Range<usize>) -> Option<Vec<u8>>,
    ) -> (Option<Vec<u8>>, Vec<PeerId>) {
        if holders.is_empty() {
            return (None, Vec::new());
        }
        let mut fetch = StateFetch::with_tries(total, holders.len(), tries);
        // A window per holder: the next range is asked as soon as one comes back.
        let mut flying = FuturesUnordered::new();
        loop {
            for (i, range, h) in fetch.next_asks() {
                let req = ask(&range);
                let peer = holders[h];
                flying.push(async move {
                    let answer = self.ask(peer, &req, range_timeout(range.len())).await;
                    (i, range, answer)
                });
            }
            let Some((i, range, answer)) = flying.next().await else {
                break;
            };
            fetch.on_answer(i, answer.and_then(|a| take(a, &range)).as_deref());
            if fetch.failed() {
                break;
            }
        }
        let delivered = fetch
            .never_missed()
            .into_iter()
            .map(|h| holders[h])
            .collect();
        (fetch.finish(), delivered)
    }

    /// The audit nonces of `round` that `peer` knows, once it has fixed that round's set
    /// (waiting at most `timeout`, capped at the small-message timeout).
    pub async fn reveals(
        &self,
        peer: PeerId,
        round: u64,
        timeout: Duration,
    ) -> Option<Vec<Reveal>> {
        let req = TrainRequest::Reveals {
            run: self.run,
            round,
        };
        match self.ask(peer, &req, timeout.min(CALL_TIMEOUT)).await {
            Some(TrainResponse::Reveals { round: r, reveals }) if r == round => Some(reveals),
            _ => None,
        }
    }

    /// `peer`'s verdicts so far as a delegated auditor of `round` (waiting at most
    /// `timeout`, capped at the small-message timeout).
    pub async fn verdicts(
        &self,
        peer: PeerId,
        round: u64,
        timeout: Duration,
    ) -> Option<Vec<AuditVerdict>> {
        let req = TrainRequest::Verdicts {
            run: self.run,
            round,
        };
        match self.ask(peer, &req, timeout.min(CALL_TIMEOUT)).await {
            Some(TrainResponse::Verdicts { round: r, verdicts }) if r == round => Some(verdicts),
            _ => None,
        }
    }
}
