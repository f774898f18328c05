//! Messages of the distributed training protocol (carried in `Request::Train` /
//! `Response::Train` of the stage protocol, postcard-encoded, at most the stage frame limit).
//!
//! - `Hello(status)`: who I am (the connection's peer id is the worker id) and where I am: run,
//!   round about to run, digest of my global state. Answered with the receiver's status. A
//!   worker says hello to every peer at each round boundary; that is how a joiner is expected
//!   and how a worker learns that it is behind or holds a state the others do not.
//! - `Push(contribution)`: a signed pseudo-gradient for a round; `Accepted` or `Refused(why)`.
//! - `Held { round }`: the (worker, commitment digest) pairs the receiver holds for a round
//!   (its current one, or the one it just closed); `Fetch` gets one of them. Every worker asks
//!   every peer before closing a round and fetches what it misses, so they close on the same
//!   set and compute the same next state without a coordinator.
//! - `State`: the receiver's global state (round, weights, outer momentum), checked by the
//!   asker against the digest the peers' statuses agree on.
//!
//! [`choose_target`] is the rule that decides, from the peers' statuses, which state a worker
//! should hold: the highest round anyone has reached (up to the run's length), and among the
//! workers there, the state digest most of them hold (ties to the smallest digest, so everyone
//! with the same view picks the same one).

use crate::commit::Contribution;
use crate::outer::OuterState;
use crate::round::GlobalState;
use plexus_core::wire::MAX_FRAME_BYTES;
use plexus_core::Digest;
use plexus_model::train::{Layout, Params};
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
    /// The worker finished the run and is about to leave.
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
    let all: Vec<(u64, Digest)> = peers
        .into_iter()
        .filter(|(r, _)| *r <= max_round)
        .chain(std::iter::once(mine))
        .collect();
    let top = all.iter().map(|(r, _)| *r).max()?;
    let mut votes: BTreeMap<Digest, usize> = BTreeMap::new();
    for (_, d) in all.iter().filter(|(r, _)| *r == top) {
        *votes.entry(*d).or_default() += 1;
    }
    // Most votes; among equals the smallest digest.
    let (best, _) = votes
        .iter()
        .max_by_key(|(d, n)| (**n, std::cmp::Reverse(**d)))?;
    let target = (top, *best);
    (target != mine).then_some(target)
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
        // Peers behind do not pull a worker back; implausible rounds are ignored.
        assert_eq!(choose_target((3, d(1)), [(1, d(9)), (99, d(9))], 10), None);
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
}
