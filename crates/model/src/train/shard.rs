//! Where a trainer's examples come from: a [`Shard`] maps an example id to a token sequence and
//! the position from which its tokens are scored. Ids are what a round's assignment hands out
//! and what a commitment lists, so anyone holding the shard can rebuild a worker's batches.

use super::task::{self, Task};
use super::TrainError;

/// One training sequence: the loss counts the predictions of `tokens[scored_from..]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    /// Index of the first token whose prediction is scored (>= 1).
    pub scored_from: usize,
}

/// A source of training examples addressed by id. Must be a pure function of the id.
pub trait Shard: Send + Sync {
    fn example(&self, id: u64) -> Result<Sequence, TrainError>;

    /// The examples with these ids, in order.
    fn batch(&self, ids: &[u64]) -> Result<Vec<Sequence>, TrainError> {
        ids.iter().map(|&id| self.example(id)).collect()
    }
}

/// A shard with a held-out split: example `i` of it is never trained on. Must be a pure
/// function of `i` (every worker scoring a round must see the same sequences).
pub trait HeldOut: Shard {
    fn held_out(&self, i: u64) -> Result<Sequence, TrainError>;
}

/// Training examples of a synthetic task: id `i` is `task.train_example(seed, i)` as
/// `prompt + answer + EOS`, scored on the answer and EOS.
pub struct TaskShard {
    pub task: Task,
    pub seed: u64,
    tokenizer: tokenizers::Tokenizer,
    eos: u32,
}

impl TaskShard {
    pub fn new(task: Task, seed: u64) -> Result<Self, TrainError> {
        let tokenizer = task::task_tokenizer().map_err(TrainError::Config)?;
        let eos = tokenizer
            .token_to_id(task::EOS)
            .ok_or_else(|| TrainError::Config("task tokenizer lacks EOS".into()))?;
        Ok(Self {
            task,
            seed,
            tokenizer,
            eos,
        })
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    fn sequence(&self, e: &task::Example) -> Result<Sequence, TrainError> {
        let enc = |s: &str| {
            self.tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|err| TrainError::Config(format!("cannot tokenize {s:?}: {err}")))
        };
        let (p, a) = self.task.lengths();
        let mut tokens = enc(&e.prompt)?;
        tokens.extend(enc(&e.answer)?);
        tokens.push(self.eos);
        if tokens.len() != p + a + 1 {
            return Err(TrainError::Config(format!(
                "example {e:?} did not tokenize"
            )));
        }
        Ok(Sequence {
            tokens,
            scored_from: p,
        })
    }

    /// Held-out example `i` in the same form (for held-out loss).
    pub fn held_out(&self, i: u64) -> Result<Sequence, TrainError> {
        self.sequence(&self.task.held_out_example(i))
    }
}

impl HeldOut for TaskShard {
    fn held_out(&self, i: u64) -> Result<Sequence, TrainError> {
        TaskShard::held_out(self, i)
    }
}

impl Shard for TaskShard {
    fn example(&self, id: u64) -> Result<Sequence, TrainError> {
        self.sequence(&self.task.train_example(self.seed, id))
    }
}
