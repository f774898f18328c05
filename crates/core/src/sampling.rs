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
    /// Added to these tokens' logits before anything else (OpenAI's `logit_bias`); ids outside
    /// the vocabulary are ignored. At most [`MAX_LOGIT_BIAS`] entries.
    pub logit_bias: Vec<(u32, f32)>,
    /// Also report log-probabilities: `Some(n)` asks for the chosen token's and the `n` most
    /// likely tokens' (`n <= MAX_TOP_LOGPROBS`). They do not change the token.
    pub logprobs: Option<u8>,
    /// The tokens allowed at this position (constrained decoding: a grammar's mask), as a
    /// bitset, token `i` at bit `i % 32` of word `i / 32`; tokens past the end are not
    /// allowed. `None` allows every token. At most [`MAX_MASK_WORDS`] words.
    pub allowed: Option<Vec<u32>>,
}

/// Longest `allowed` mask, in 32-bit words (a vocabulary of 2^21 tokens).
pub const MAX_MASK_WORDS: usize = 1 << 16;

/// Whether `token` is allowed by the mask `allowed` (see [`SamplingParams::allowed`]).
pub fn mask_allows(allowed: &[u32], token: u32) -> bool {
    allowed
        .get(token as usize / 32)
        .is_some_and(|w| w >> (token % 32) & 1 == 1)
}

/// Most alternatives per position a caller may ask for (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// Most `logit_bias` entries (OpenAI allows 300 per request; a little headroom).
pub const MAX_LOGIT_BIAS: usize = 1024;

/// The log-probabilities of one sampled position: the log-softmax over the whole vocabulary
/// of the logits the sampler used, after `logit_bias` and penalties and before top-k, top-p,
/// min-p and temperature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The token sampled.
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens, most likely first (ties by lower id), distinct.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// Whether a peer's report is well formed for a request of `wanted` alternatives over a
    /// vocabulary of `vocab` tokens: ids in range and distinct, log-probabilities finite (or
    /// -inf) and at most 0, sorted, and the top one at least the chosen token's.
    pub fn is_plausible(&self, wanted: u8, token: u32, vocab: usize) -> bool {
        let ok = |id: u32, lp: f32| (id as usize) < vocab && lp <= 1e-4 && !lp.is_nan();
        self.token == token
            && ok(self.token, self.logprob)
            && self.top.len() == usize::from(wanted).min(vocab)
            && self.top.iter().all(|&(id, lp)| ok(id, lp))
            && self.top.windows(2).all(|w| w[0].1 >= w[1].1)
            && self.top.first().is_none_or(|t| t.1 >= self.logprob - 1e-4)
            && {
                let mut ids: Vec<u32> = self.top.iter().map(|t| t.0).collect();
                ids.sort_unstable();
                ids.windows(2).all(|w| w[0] != w[1])
            }
    }
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
            logit_bias: Vec::new(),
            logprobs: None,
            allowed: None,
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
