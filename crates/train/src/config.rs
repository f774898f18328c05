//! What every participant of a run agrees on before round 0: the round settings a
//! [`crate::round::RoundMachine`] enforces and a worker trains with. (The signed run spec that
//! carries them over the network builds on this.)

use crate::codec::{Codec, ParseCodecError};
use crate::deadline::DeadlinePolicy;
use crate::outer::OuterConfig;
use plexus_core::Digest;
use plexus_model::train::InnerConfig;
use serde::{Deserialize, Serialize};

/// Gauntlet-style scoring of contributions on held-out data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScorePolicy {
    /// Held-out examples scored per round; 0 disables scoring.
    pub examples: usize,
    /// A contribution is applied only if the held-out loss of `global - delta / k` (`k`
    /// contributions accepted in the round) is at most `loss(global) * (1 + tolerance)`. See
    /// [`crate::score::HONEST_TOLERANCE`].
    pub tolerance: f32,
}

impl Default for ScorePolicy {
    fn default() -> Self {
        Self {
            examples: 64,
            tolerance: 0.0,
        }
    }
}

/// Round settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundConfig {
    /// Identity of the run (digest of its spec); commitments name it.
    pub run: Digest,
    pub seed: u64,
    /// Inner steps per round (H).
    pub inner_steps: u32,
    /// Sequences per inner step per worker.
    pub batch_size: u32,
    pub inner: InnerConfig,
    pub codec: Codec,
    /// Carry what the codec did not send into the next round.
    pub error_feedback: bool,
    pub outer: OuterConfig,
    pub deadline: DeadlinePolicy,
    pub score: ScorePolicy,
    /// Most contributions a round holds (the run's workers max): bounds the memory a flood of
    /// validly signed contributions from fresh keys can take.
    pub max_workers: u32,
}

/// Why round settings are not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("inner steps, batch size and workers max must be positive")]
    Empty,
    #[error(transparent)]
    Codec(#[from] ParseCodecError),
    #[error("outer learning rate and momentum must be finite, lr > 0, 0 <= momentum < 1")]
    Outer,
}

impl RoundConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.inner_steps == 0 || self.batch_size == 0 || self.max_workers == 0 {
            return Err(ConfigError::Empty);
        }
        self.codec.validate()?;
        let ok = match self.outer {
            OuterConfig::Nesterov { lr, momentum } => {
                lr.is_finite() && lr > 0.0 && (0.0..1.0).contains(&momentum)
            }
            OuterConfig::Sgd { lr } => lr.is_finite() && lr > 0.0,
        };
        if !ok {
            return Err(ConfigError::Outer);
        }
        Ok(())
    }

    /// Examples a worker trains on per round.
    pub fn examples_per_round(&self) -> usize {
        self.inner_steps as usize * self.batch_size as usize
    }

    /// Digest of what a re-execution must match: inner hyperparameters, H, batch, codec,
    /// error feedback.
    pub fn hyper_digest(&self) -> Digest {
        let v = serde_json::json!({
            "inner": self.inner,
            "inner_steps": self.inner_steps,
            "batch_size": self.batch_size,
            "codec": self.codec,
            "error_feedback": self.error_feedback,
        });
        Digest::of(v.to_string().as_bytes())
    }
}
