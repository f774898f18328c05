//! Token check (Token-DiFR, arXiv 2511.20621): with the sampling seed fixed by the protocol,
//! the tokens a last stage emitted are themselves evidence. The auditor runs one teacher-forced
//! pass over prompt + output (`Logits::All`), and for every generated token recomputes, with the
//! engine's sampler, the token its own logits give at that position; an honest provider's tokens
//! match (exactly, on the same build), a substitute model's or made-up tokens do not.
//!
//! Layout: for a prompt of `p` tokens and output `t[0..n]`, the pass runs over
//! `prompt ++ t[0..n-1]`; the token `t[i]` was sampled from the logits of position `p - 1 + i`,
//! with history `prompt ++ t[..i]` and sampler position `p + i`.

use plexus_model::sampler::sample;
use plexus_model::SamplingParams;
use serde::{Deserialize, Serialize};

/// The outcome of a token check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCheck {
    /// Tokens recomputed.
    pub checked: u64,
    /// Of those, equal to the provider's.
    pub matched: u64,
    /// Index (in the output) of the first token that differed.
    pub first_mismatch: Option<u64>,
}

impl TokenCheck {
    pub fn match_rate(&self) -> f64 {
        if self.checked == 0 {
            1.0
        } else {
            self.matched as f64 / self.checked as f64
        }
    }

    pub fn mismatches(&self) -> u64 {
        self.checked - self.matched
    }
}

/// Why tokens could not be checked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenCheckError {
    #[error("{got} logits are not {rows} rows of the vocabulary {vocab}")]
    Shape {
        got: usize,
        rows: usize,
        vocab: usize,
    },
    #[error("an empty prompt has no position to sample the first token from")]
    EmptyPrompt,
}

/// Checks `output` against `logits` (row-major `[prompt.len() + output.len() - 1, vocab]`, the
/// teacher-forced pass over `prompt ++ output[..n-1]`), sampled with `params` (whose seed is
/// the protocol seed).
pub fn check_tokens(
    logits: &[f32],
    vocab: usize,
    prompt: &[u32],
    output: &[u32],
    params: &SamplingParams,
) -> Result<TokenCheck, TokenCheckError> {
    if output.is_empty() {
        return Ok(TokenCheck {
            checked: 0,
            matched: 0,
            first_mismatch: None,
        });
    }
    if prompt.is_empty() {
        return Err(TokenCheckError::EmptyPrompt);
    }
    let rows = prompt.len() + output.len() - 1;
    if vocab == 0 || logits.len() != rows * vocab {
        return Err(TokenCheckError::Shape {
            got: logits.len(),
            rows,
            vocab,
        });
    }
    let mut history: Vec<u32> = prompt.to_vec();
    let mut check = TokenCheck {
        checked: 0,
        matched: 0,
        first_mismatch: None,
    };
    for (i, &token) in output.iter().enumerate() {
        let row = prompt.len() - 1 + i;
        let l = &logits[row * vocab..(row + 1) * vocab];
        let expected = sample(l, &history, params, history.len() as u64);
        check.checked += 1;
        if expected == token {
            check.matched += 1;
        } else if check.first_mismatch.is_none() {
            check.first_mismatch = Some(i as u64);
        }
        history.push(token);
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits whose argmax at row r is token (r * 3) % vocab.
    fn logits(rows: usize, vocab: usize) -> Vec<f32> {
        let mut l = vec![0.0f32; rows * vocab];
        for r in 0..rows {
            l[r * vocab + (r * 3) % vocab] = 10.0;
        }
        l
    }

    #[test]
    fn greedy_tokens_match_their_logits() {
        let vocab = 11;
        let prompt = [1u32, 2, 3];
        let output: Vec<u32> = (0..5).map(|i| (((2 + i) * 3) % vocab) as u32).collect();
        let l = logits(prompt.len() + output.len() - 1, vocab);
        let c = check_tokens(&l, vocab, &prompt, &output, &SamplingParams::greedy()).unwrap();
        assert_eq!((c.checked, c.matched, c.first_mismatch), (5, 5, None));
        let mut bad = output.clone();
        bad[3] = (bad[3] + 1) % vocab as u32;
        let c = check_tokens(&l, vocab, &prompt, &bad, &SamplingParams::greedy()).unwrap();
        assert_eq!((c.matched, c.first_mismatch), (4, Some(3)));
    }

    #[test]
    fn seeded_sampling_is_recomputed() {
        let vocab = 50;
        let prompt = [4u32];
        let flat: Vec<f32> = (0..vocab * 20)
            .map(|i| ((i * 7919) % 13) as f32 * 0.3)
            .collect();
        let params = SamplingParams {
            seed: 99,
            ..SamplingParams::default()
        };
        let mut history = prompt.to_vec();
        let mut out = Vec::new();
        for row in 0..20 {
            let t = sample(
                &flat[row * vocab..(row + 1) * vocab],
                &history,
                &params,
                history.len() as u64,
            );
            out.push(t);
            history.push(t);
        }
        let rows = prompt.len() + out.len() - 1;
        let c = check_tokens(&flat[..rows * vocab], vocab, &prompt, &out, &params).unwrap();
        assert_eq!(c.matched, 20);
        let other = SamplingParams {
            seed: 100,
            ..params
        };
        let c = check_tokens(&flat[..rows * vocab], vocab, &prompt, &out, &other).unwrap();
        assert!(c.matched < 20, "another seed must not reproduce every draw");
    }

    #[test]
    fn refuses_wrong_shapes() {
        assert_eq!(
            check_tokens(&[0.0; 10], 5, &[1], &[1, 2, 3], &SamplingParams::greedy()),
            Err(TokenCheckError::Shape {
                got: 10,
                rows: 3,
                vocab: 5
            })
        );
        assert_eq!(
            check_tokens(&[], 5, &[], &[1], &SamplingParams::greedy()),
            Err(TokenCheckError::EmptyPrompt)
        );
    }
}
