//! Sampling parameters: part of every generation request, on the wire between the gateway and
//! the last stage of a chain, and in audit records. The sampler itself lives in `plexus-model`.

use serde::{Deserialize, Serialize};

/// Sampling parameters. The defaults are llama.cpp's, except greedy is `temperature = 0`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// <= 0 selects greedy decoding.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top one's; 0 disables.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recent tokens; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence of a recent token.
    pub frequency_penalty: f32,
    /// Subtracted once if a token occurred recently.
    pub presence_penalty: f32,
    /// How many of the latest tokens the penalties look at.
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether any repetition, frequency or presence penalty is on.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}
