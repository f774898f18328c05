//! Test-only misbehaviour of a worker (`plexus train --distributed --cheat KIND`), so the
//! process tests can show that honest workers refuse, drop or ignore each kind.

use plexus_core::keys::NodeKey;
use plexus_model::train::{Params, Shard, StepReport};
use plexus_model::ModelConfig;
use plexus_train::assign::{example_ids, ids_digest};
use plexus_train::commit::Contribution;
use plexus_train::round::GlobalState;
use plexus_train::worker::{compute_round, WorkError, WorkerState};
use plexus_train::RoundConfig;
use std::sync::Arc;

/// Test-only misbehaviour (`--cheat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cheat {
    /// Pseudo-gradients that do not decode (validly signed), and undecodable messages.
    Garbage,
    /// Each round, its contribution re-labelled as the previous round's.
    Stale,
    /// Trains on the examples of another worker id and commits as if it had trained on its
    /// own (valid, useful-looking, and not what it committed to: only an audit sees it).
    Lazy,
    /// Tells peers it is a round ahead, and serves a made-up state to match.
    Ahead,
    /// Sends its pseudo-gradient reversed and four times as large (decodes, signs and
    /// commits validly; raises the held-out loss).
    Harmful,
    /// Tells peers it is still at round 0, forever, and neither sends nor holds a contribution
    /// (as a worker still catching up would): peers that believed it would hold every round open to its
    /// deadline. (A claim of one round behind is no lie worth telling: it is what an honest
    /// peer a little ahead says; and a peer whose contribution is in is not behind.)
    Behind,
    /// Seals an audit nonce it never tells (a random value in its commitment, so the nonce it
    /// answers with opens nothing): the draw could not be computed with its contribution in.
    Withhold,
    /// Answers every range of the global state asked of it with the lowest bit of every value
    /// flipped (the state it says it holds is everyone's): a joiner's assembled state fails
    /// its digest.
    BadState,
    /// Sends its contribution to one peer only (the first by peer id) and answers `Fetch` and
    /// payload ranges of no other: the others get it only as relayed by that peer.
    OneSided,
    /// From its second round on, starts each round from optimizer moments of its own choosing
    /// (its first moments x 1000: updates far larger than its data gives), trains honestly
    /// from them, commits to them and serves them to its auditors: the re-execution
    /// reproduces its pseudo-gradient; only the start check sees that the state is neither
    /// fresh nor where its last round ended.
    ChosenStart,
}

/// What a [`Cheat::ChosenStart`] worker does to its state before a round.
pub fn choose_start(state: &mut WorkerState) {
    state.opt.m.iter_mut().for_each(|m| *m *= 1000.0);
}

/// A lazy worker's round: trained on the examples assigned to another id, committed with the
/// example digest of its own assignment and signed. Everything a receiver checks holds; the
/// payload is not the one its commitment's inputs give, which only a re-execution shows.
pub fn lazy_round(
    cfg: &RoundConfig,
    model: &Arc<ModelConfig>,
    shard: &dyn Shard,
    key: &NodeKey,
    round: u64,
    global: &Params,
    state: &mut WorkerState,
) -> Result<(Contribution, Vec<StepReport>), WorkError> {
    let me = key.peer_id().to_bytes();
    let mut w = compute_round(cfg, model, shard, b"someone else", round, global, state)?;
    w.commitment.worker = me.clone();
    w.commitment.examples =
        ids_digest(&example_ids(cfg.seed, round, &me, cfg.examples_per_round()));
    Ok(w.signed(key))
}

/// The state an `ahead` liar claims: a round later than `real`, with zeroed weights.
pub fn made_up_ahead(real: &GlobalState) -> GlobalState {
    let mut fake = real.clone();
    fake.round += 1;
    fake.params.values.iter_mut().for_each(|v| *v = 0.0);
    fake
}
