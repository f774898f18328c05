//! Held-out scoring for rounds: the loss on the `examples` held-out sequences
//! [`crate::assign::score_ids`] picks for the round (a synthetic task's held-out problems or a
//! text's held-out windows), computed with the training ops (deterministic whatever the thread
//! count).
//!
//! The round applies a contribution when the held-out loss with its share of the average
//! (`global - delta / k`) is at most `loss_before * (1 + tolerance)` ([`crate::ScorePolicy`]).
//! Tolerance 0 asks every contribution to improve the loss on its own, which honest ones fail
//! by noise: near convergence (losses of 1e-3, where a few examples decide) and with lossy
//! codecs (a sparse pseudo-gradient moves 1-3% of the weights). [`HONEST_TOLERANCE`] is the
//! documented slack `plexus bench train` uses; garbage or an inverted pseudo-gradient raises the
//! loss by far more and is still refused.

use crate::assign::score_ids;
use crate::round::Scorer;
use plexus_model::train::{loss_of, HeldOut, Params, TaskShard, TrainError};
use plexus_model::ModelConfig;
use std::sync::Arc;

/// Relative slack for honest contributions: one may raise the round's held-out loss by up to
/// 1% of it. (A contribution that makes the model worse by less passes; a run that wants no
/// slack sets 0.)
pub const HONEST_TOLERANCE: f32 = 0.01;

/// Scores on a shard's held-out split.
pub struct HeldOutScorer<S: ?Sized = TaskShard> {
    pub model: Arc<ModelConfig>,
    pub shard: Arc<S>,
    pub seed: u64,
    pub examples: usize,
}

impl<S: HeldOut + ?Sized> Scorer for HeldOutScorer<S> {
    fn loss(&mut self, round: u64, params: &Params) -> Result<f32, TrainError> {
        let seqs = score_ids(self.seed, round, self.examples)
            .into_iter()
            .map(|i| self.shard.held_out(i))
            .collect::<Result<Vec<_>, _>>()?;
        loss_of(&self.model, params, &seqs)
    }
}
