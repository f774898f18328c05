//! Held-out scoring for rounds on a synthetic task: the loss on the `examples` held-out
//! problems [`crate::assign::score_ids`] picks for the round, computed with the training ops
//! (deterministic whatever the thread count).

use crate::assign::score_ids;
use crate::round::Scorer;
use plexus_model::train::{loss_of, Params, TaskShard, TrainError};
use plexus_model::ModelConfig;
use std::sync::Arc;

/// Scores on a task's held-out split.
pub struct HeldOutScorer {
    pub model: Arc<ModelConfig>,
    pub shard: Arc<TaskShard>,
    pub seed: u64,
    pub examples: usize,
}

impl Scorer for HeldOutScorer {
    fn loss(&mut self, round: u64, params: &Params) -> Result<f32, TrainError> {
        let seqs = score_ids(self.seed, round, self.examples)
            .into_iter()
            .map(|i| self.shard.held_out(i))
            .collect::<Result<Vec<_>, _>>()?;
        loss_of(&self.model, params, &seqs)
    }
}
