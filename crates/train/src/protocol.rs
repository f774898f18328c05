//! Messages of the distributed training protocol (carried in `Request::Train` /
//! `Response::Train` of the stage protocol, postcard-encoded, at most the stage frame limit).
//!
//! - `Hello(status)`: who I am (the connection's peer id is the worker id) and where I am: run,
//!   round about to run, digest of my global state. Answered with the receiver's status. A
//!   worker says hello to every peer at each round boundary; that is how a joiner is expected
//!   and how a worker learns that it is behind or holds a state the others do not.
//! - `Push(contribution)`: a signed pseudo-gradient for a round; `Accepted` or `Refused(why)`.
//! - `Offer(signed commitment)`: a worker's own contribution whose payload is too large for one
//!   message ([`travels_whole`]): the receiver checks the commitment as it would a push
//!   (`Accepted` or `Refused(why)`), then asks the payload of the offering worker in ranges
//!   (`PayloadRange { round, worker, offset, len }`, answered by any worker holding that
//!   contribution) and checks it against the committed digest. The commitment's arrival is
//!   what counts against the round's deadline; the payload may follow after it (bounded by
//!   its bytes on a slow link).
//! - `Held { round }`: the (worker, commitment digest) pairs the receiver holds for a round
//!   (its current one, or the one it just closed); `Fetch` gets one of them. Every worker asks
//!   every peer before closing a round and fetches what it misses, so they close on the same
//!   set and compute the same next state without a coordinator. A contribution too large for
//!   one message is answered as `Offered(signed commitment)`, and its payload asked in ranges
//!   once the commitment passed the checks of a push. `Pending { round }` lists the
//!   commitments of the offers the receiver is still fetching: a worker that misses one waits
//!   (bounded) until that peer holds it, so both close on the same set.
//! - `StateRange { state, offset, len }`: bytes of the global state (round, weights, outer
//!   momentum) whose digest is `state`, answered only by a worker holding that state; a
//!   worker that catches up asks every holder for some of the ranges and checks the whole
//!   against the digest the peers' statuses agree on ([`crate::transfer`]). `State` (the whole
//!   state in one message) is still answered, for workers of earlier builds.
//! - `StartRange { round, offset, len }`: bytes of the receiver's own start state of a round
//!   it contributed to (AdamW moments and error-feedback residual), which an auditor needs to
//!   re-execute that contribution ([`crate::audit::reexecute`] checks it against the
//!   commitment's digests); asked in ranges ([`crate::transfer::start_slice`]), so a model of
//!   any size can be audited. A worker of a run with audits keeps the last two rounds' start
//!   states. `StartState` (the whole start state in one message) is still answered when it
//!   fits, and asked when ranges get no answer, for workers of earlier builds.
//! - `Verdicts { round }`: the receiver's verdicts so far on the contributions of the round
//!   it audits as a delegated auditor ([`crate::reveal::committee`]).
//! - `Reveals { round }`: the audit nonces of the round's set the receiver knows (its own and
//!   those it collected, each opening a member's sealed value), answered only once the
//!   receiver has fixed that set ([`crate::reveal`]); `NotHeld` before.
//!
//! [`choose_target`] is the rule that decides, from the peers' statuses, which state a worker
//! should hold: among the states at its own round or later (up to the run's length; a worker
//! is never pulled back), the one the most workers hold, the later round among equals, then
//! the smallest digest (so everyone with the same view picks the same one). A status is a
//! peer's claim: counting holders rather than taking the highest round means one peer that
//! claims a later round, with a state it made up to match, cannot pull away workers that
//! hold the same state as another (in a run of two the other worker decides anyway). Peers
//! still closing the previous round have not voted yet: while a state ahead is held by no more
//! workers than are behind, [`wait_for_stragglers`] says to ask again first (bounded by the
//! caller), so a liar is not followed just because it answered while the others were busy.

use crate::codec::ErrorFeedback;
use crate::commit::{Contribution, Signed};
use crate::outer::OuterState;
use crate::round::GlobalState;
use crate::worker::WorkerState;
use plexus_core::wire::MAX_FRAME_BYTES;
use plexus_core::Digest;
use plexus_model::train::adamw::DecodeStateError;
use plexus_model::train::{AdamWState, Layout, Params};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where a worker stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub run: Digest,
    /// The round about to run (the run's length once finished).
    pub round: u64,
    /// [`GlobalState::digest`] of the state that round starts from.
    pub state: Digest,
    /// The worker finished the run, or is leaving it: it contributes nothing more.
    pub done: bool,
}

/// A question to a peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TrainRequest {
    Hello(Status),
    Push(Box<Contribution>),
    Held {
        run: Digest,
        round: u64,
    },
    Fetch {
        run: Digest,
        round: u64,
        worker: Vec<u8>,
    },
    State {
        run: Digest,
    },
    StartState {
        run: Digest,
        round: u64,
    },
    /// The audit nonces of `round`'s set the peer knows ([`crate::reveal`]); answered only
    /// once the peer has fixed that set.
    Reveals {
        run: Digest,
        round: u64,
    },
    /// The verdicts of the receiver's delegated audits of `round` so far.
    Verdicts {
        run: Digest,
        round: u64,
    },
    /// Bytes `offset..offset + len` of the global state whose digest is `state`
    /// ([`crate::transfer::state_bytes`]; `len` at most [`crate::transfer::MAX_RANGE_BYTES`]).
    StateRange {
        run: Digest,
        state: Digest,
        offset: u64,
        len: u32,
    },
    /// Bytes `offset..offset + len` of the receiver's own start state of `round`
    /// ([`crate::transfer::start_slice`]; `len` at most [`crate::transfer::MAX_RANGE_BYTES`]).
    StartRange {
        run: Digest,
        round: u64,
        offset: u64,
        len: u32,
    },
    /// The sender's own contribution, whose payload does not travel in one message
    /// ([`travels_whole`]): the receiver asks it in ranges.
    Offer(Box<Signed>),
    /// Bytes `offset..offset + len` of the payload of `worker`'s contribution to `round`
    /// (`len` at most [`crate::transfer::MAX_RANGE_BYTES`]).
    PayloadRange {
        run: Digest,
        round: u64,
        worker: Vec<u8>,
        offset: u64,
        len: u32,
    },
    /// The commitments of the contributions to `round` offered to the receiver whose payloads
    /// it is still fetching.
    Pending {
        run: Digest,
        round: u64,
    },
}

/// A delegated auditor's verdict on one worker's contribution: `pass` when the re-execution
/// reproduced its payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerdict {
    pub worker: Vec<u8>,
    pub pass: bool,
}

/// One worker's audit nonce for a round, as revealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reveal {
    pub worker: Vec<u8>,
    pub nonce: [u8; 32],
}

/// One contribution a peer holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldEntry {
    pub worker: Vec<u8>,
    /// Digest of its signed commitment.
    pub commitment: Digest,
}

/// A global state as it travels: f32 little-endian bytes of the weights (in the run's layout)
/// and of the outer momentum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateTransfer {
    pub round: u64,
    pub params: Vec<u8>,
    pub momentum: Vec<u8>,
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TrainResponse {
    Status(Status),
    Accepted,
    Refused(String),
    Held {
        round: u64,
        held: Vec<HeldEntry>,
    },
    Contribution(Box<Contribution>),
    State(StateTransfer),
    /// The round or contribution asked for is not held (any more).
    NotHeld,
    StartState(WorkerStateTransfer),
    Reveals {
        round: u64,
        reveals: Vec<Reveal>,
    },
    Verdicts {
        round: u64,
        verdicts: Vec<AuditVerdict>,
    },
    /// A range of a state's bytes; `total` is the length of them all.
    StateRange {
        state: Digest,
        offset: u64,
        total: u64,
        bytes: Vec<u8>,
    },
    /// A range of a start state's bytes; `total` is the length of them all.
    StartRange {
        round: u64,
        offset: u64,
        total: u64,
        bytes: Vec<u8>,
    },
    /// The answer to `Fetch` for a contribution whose payload does not travel in one message:
    /// its signed commitment; the payload is asked in ranges.
    Offered(Box<Signed>),
    /// A range of a contribution's payload; `total` is its length.
    PayloadRange {
        round: u64,
        worker: Vec<u8>,
        offset: u64,
        total: u64,
        bytes: Vec<u8>,
    },
    Pending {
        round: u64,
        pending: Vec<Signed>,
    },
}

/// Room a contribution's message takes besides its payload (the commitment, key, signature
/// and framing are a few hundred bytes).
const CONTRIBUTION_OVERHEAD: usize = 4096;

/// Whether a contribution with a payload of `payload_len` bytes travels in one message (`Push`,
/// `Contribution`); a larger one is offered and its payload asked in ranges.
pub fn travels_whole(payload_len: usize) -> bool {
    payload_len.saturating_add(CONTRIBUTION_OVERHEAD) <= MAX_FRAME_BYTES
}

/// A worker's start state of a round as it travels: the AdamW state's bytes and the residual's
/// f32 little-endian bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStateTransfer {
    pub round: u64,
    pub opt: Vec<u8>,
    pub residual: Vec<u8>,
}

impl WorkerStateTransfer {
    pub fn of(round: u64, state: &WorkerState) -> Self {
        Self {
            round,
            opt: state.opt.to_bytes(),
            residual: f32_bytes(&state.feedback.residual),
        }
    }

    /// The state for a model of `n` parameters (sizes and finiteness checked; the auditor
    /// checks the digests against the commitment).
    pub fn into_state(self, n: usize) -> Result<WorkerState, MessageError> {
        Self::decode(self.round, &self.opt, &self.residual, n)
    }

    /// [`Self::into_state`] from the two parts' bytes wherever they lie (an auditor's ranges
    /// assembled into one buffer, [`crate::transfer::start_from_bytes`]).
    pub fn decode(
        round: u64,
        opt: &[u8],
        residual: &[u8],
        n: usize,
    ) -> Result<WorkerState, MessageError> {
        let opt = AdamWState::from_bytes(opt, n).map_err(|e| match e {
            DecodeStateError::NonFinite => MessageError::NonFinite,
            DecodeStateError::Length { got, expected, .. } => MessageError::StateSize {
                round,
                got,
                expected,
            },
        })?;
        if residual.len() != 4 * n {
            return Err(MessageError::StateSize {
                round,
                got: residual.len(),
                expected: 4 * n,
            });
        }
        let residual = f32s_from(residual, n).ok_or(MessageError::NonFinite)?;
        Ok(WorkerState {
            opt,
            feedback: ErrorFeedback { residual },
        })
    }
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed training message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after a training message")]
    Trailing(usize),
    #[error("state of round {round} holds {got} bytes of weights and momentum, the run's model needs {expected}")]
    StateSize {
        round: u64,
        got: usize,
        expected: usize,
    },
    #[error("state holds a non-finite number")]
    NonFinite,
}

/// Postcard bytes of a message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_allocvec(msg).unwrap_or_default()
}

/// Decodes one whole message of at most the stage frame limit.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, MessageError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    let (msg, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| MessageError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(MessageError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Little-endian bytes of `values`.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Parses [`f32_bytes`] of exactly `n` finite values.
pub fn f32s_from(bytes: &[u8], n: usize) -> Option<Vec<f32>> {
    if bytes.len() != 4 * n {
        return None;
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    v.iter().all(|x| x.is_finite()).then_some(v)
}

impl StateTransfer {
    pub fn of(state: &GlobalState) -> Self {
        Self {
            round: state.round,
            params: f32_bytes(&state.params.values),
            momentum: f32_bytes(&state.outer.momentum),
        }
    }

    /// The state in the run's `layout` (sizes and finiteness checked; the caller checks the
    /// digest).
    pub fn into_state(self, layout: Arc<Layout>) -> Result<GlobalState, MessageError> {
        let n = layout.len();
        if self.params.len() != 4 * n || self.momentum.len() != 4 * n {
            return Err(MessageError::StateSize {
                round: self.round,
                got: self.params.len() + self.momentum.len(),
                expected: 8 * n,
            });
        }
        let values = f32s_from(&self.params, n).ok_or(MessageError::NonFinite)?;
        let momentum = f32s_from(&self.momentum, n).ok_or(MessageError::NonFinite)?;
        Ok(GlobalState {
            round: self.round,
            params: Params { layout, values },
            outer: OuterState { momentum },
        })
    }
}

/// The `(round, state digest)` a worker at `mine` should hold given its peers' statuses, or
/// `None` if it holds it already. Statuses beyond `max_round` (the run's length) are ignored.
pub fn choose_target(
    mine: (u64, Digest),
    peers: impl IntoIterator<Item = (u64, Digest)>,
    max_round: u64,
) -> Option<(u64, Digest)> {
    let mut votes: BTreeMap<(u64, Digest), usize> = BTreeMap::new();
    for state in peers
        .into_iter()
        .filter(|(r, _)| *r <= max_round && *r >= mine.0)
        .chain(std::iter::once(mine))
    {
        *votes.entry(state).or_default() += 1;
    }
    // Most holders; among equals the later round, then the smaller digest.
    let (&target, _) = votes
        .iter()
        .max_by_key(|((r, d), n)| (**n, *r, std::cmp::Reverse(*d)))?;
    (target != mine).then_some(target)
}

/// Whether a worker at `mine` should hear from its peers again before acting on `target`
/// ([`choose_target`]'s answer; `None`: stay): the state it would hold then is held by no more
/// workers than are still behind it, who may yet arrive at another state and outvote it (the
/// worker may be on a fork of its own, or a liar may have answered first).
pub fn wait_for_stragglers(
    mine: (u64, Digest),
    peers: &[(u64, Digest)],
    target: Option<(u64, Digest)>,
) -> bool {
    let target = target.unwrap_or(mine);
    let holders = peers.iter().filter(|s| **s == target).count() + usize::from(target == mine);
    let behind = peers.iter().filter(|(r, _)| *r < mine.0).count();
    holders <= behind
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: u8) -> Digest {
        Digest([b; 32])
    }

    #[test]
    fn the_target_is_the_latest_round_the_most_hold() {
        // Everyone agrees: nothing to do.
        assert_eq!(choose_target((3, d(1)), [(3, d(1)), (3, d(1))], 10), None);
        // Behind: go to the round ahead.
        assert_eq!(
            choose_target((2, d(1)), [(3, d(2)), (3, d(2))], 10),
            Some((3, d(2)))
        );
        // Outvoted at the same round.
        assert_eq!(
            choose_target((3, d(1)), [(3, d(2)), (3, d(2))], 10),
            Some((3, d(2)))
        );
        // A tie goes to the smaller digest, for everyone.
        assert_eq!(choose_target((3, d(1)), [(3, d(2))], 10), None);
        assert_eq!(choose_target((3, d(2)), [(3, d(1))], 10), Some((3, d(1))));
        // Peers behind do not pull a worker back, even many; implausible rounds are ignored.
        assert_eq!(choose_target((3, d(1)), [(1, d(9)), (99, d(9))], 10), None);
        assert_eq!(choose_target((3, d(1)), [(2, d(9)), (2, d(9))], 10), None);
        // A joiner goes where the most workers are.
        assert_eq!(
            choose_target((0, d(0)), [(5, d(5)), (5, d(5)), (5, d(5))], 10),
            Some((5, d(5)))
        );
    }

    #[test]
    fn one_peer_claiming_a_later_round_does_not_pull_away_workers_that_agree() {
        // A liar ahead, with a state it made up, against two workers holding the same state.
        assert_eq!(choose_target((3, d(1)), [(3, d(1)), (4, d(9))], 10), None);
        assert_eq!(
            choose_target((3, d(1)), [(3, d(1)), (3, d(1)), (9, d(0))], 10),
            None
        );
        // A joiner is not fooled either while two honest peers agree.
        assert_eq!(
            choose_target((0, d(0)), [(5, d(5)), (5, d(5)), (6, d(9))], 10),
            Some((5, d(5)))
        );
        // Two workers ahead that agree outvote one behind (the usual catch-up).
        assert_eq!(
            choose_target((3, d(1)), [(4, d(2)), (4, d(2)), (9, d(0))], 10),
            Some((4, d(2)))
        );
    }

    #[test]
    fn a_lone_state_waits_for_the_peers_still_behind() {
        // The liar answered first; two honest peers are still closing the last round.
        let peers = [(4, d(9)), (2, d(1)), (2, d(1))];
        let target = choose_target((3, d(1)), peers, 10);
        assert_eq!(target, Some((4, d(9))));
        assert!(wait_for_stragglers((3, d(1)), &peers, target));
        // Once they arrive they outvote it.
        let peers = [(4, d(9)), (3, d(1)), (3, d(1))];
        assert_eq!(choose_target((3, d(1)), peers, 10), None);
        assert!(!wait_for_stragglers((3, d(1)), &peers, None));
        // Nobody behind (a run of two, or everyone has voted): move on.
        assert!(!wait_for_stragglers(
            (3, d(1)),
            &[(4, d(9))],
            Some((4, d(9)))
        ));
        // More holders ahead than peers behind: they cannot be outvoted.
        let peers = [(4, d(2)), (4, d(2)), (2, d(1))];
        assert!(!wait_for_stragglers((3, d(1)), &peers, Some((4, d(2)))));
        // A worker alone on its state while three peers are behind: it may be on a fork of its
        // own; it waits to hear where they arrive, and follows them if they agree elsewhere.
        let behind = [(2, d(5)), (2, d(5)), (2, d(5))];
        assert!(wait_for_stragglers((3, d(1)), &behind, None));
        let arrived = [(3, d(7)), (3, d(7)), (3, d(7))];
        assert_eq!(choose_target((3, d(1)), arrived, 10), Some((3, d(7))));
        // Two holders of its state against one straggler: go on.
        assert!(!wait_for_stragglers(
            (3, d(1)),
            &[(3, d(1)), (2, d(5))],
            None
        ));
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let req = TrainRequest::Held {
            run: d(7),
            round: 4,
        };
        let bytes = encode(&req);
        assert_eq!(decode::<TrainRequest>(&bytes).unwrap(), req);
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            decode::<TrainRequest>(&long),
            Err(MessageError::Trailing(1))
        );
        assert!(matches!(
            decode::<TrainRequest>(&[200, 1, 2]),
            Err(MessageError::Malformed(_))
        ));
    }

    #[test]
    fn a_state_of_the_wrong_size_or_with_nan_is_refused() {
        let setup = crate::local::TaskSetup {
            task: plexus_model::train::task::Task::Reverse { len: 3 },
            hidden: 32,
            layers: 1,
            init_seed: 0,
            eval_examples: 1,
        };
        let (_, _, params) = crate::local::prepare(&setup, 0).unwrap();
        let n = params.values.len();
        let layout = params.layout.clone();
        let state = GlobalState {
            round: 2,
            params,
            outer: OuterState::new(n),
        };
        let t = StateTransfer::of(&state);
        assert_eq!(t.clone().into_state(layout.clone()).unwrap(), state);
        let mut short = t.clone();
        short.params.pop();
        assert!(matches!(
            short.into_state(layout.clone()),
            Err(MessageError::StateSize { .. })
        ));
        let mut nan = t;
        nan.momentum[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(nan.into_state(layout), Err(MessageError::NonFinite));
    }

    #[test]
    fn a_start_state_round_trips_and_one_of_the_wrong_size_or_with_nan_is_refused() {
        let n = 10;
        let mut state = WorkerState::new(n);
        state.opt.step = 7;
        state.opt.m[3] = 0.5;
        state.feedback.residual[2] = -1.25;
        let t = WorkerStateTransfer::of(4, &state);
        let bytes = encode(&TrainResponse::StartState(t.clone()));
        let TrainResponse::StartState(back) = decode(&bytes).unwrap() else {
            panic!("not a start state")
        };
        assert_eq!(back.clone().into_state(n).unwrap(), state);
        assert!(matches!(
            back.clone().into_state(n + 1),
            Err(MessageError::StateSize { .. })
        ));
        let mut nan = back.clone();
        nan.residual[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(nan.into_state(n), Err(MessageError::NonFinite));
        let mut short = back;
        short.opt.pop();
        assert!(matches!(
            short.into_state(n),
            Err(MessageError::StateSize { .. })
        ));
    }
}
