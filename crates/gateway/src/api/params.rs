//! The request fields chat and text completions share ([`Options`]), checked and turned into
//! engine terms ([`Resolved`]): OpenAI's defaults (temperature 1, top_p 1, no top-k, no min-p)
//! so that its semantics hold; temperature 0 is greedy; without a `seed` the protocol derives
//! one from the request's [`RequestSeal`] (its id and the gateway's commitment,
//! [`plexus_verify::seed`]), so that the sampled tokens are checkable by an auditor; the
//! response reports the seed in its `x-plexus-seed` header (and the seal in
//! `x-plexus-request-id` / `x-plexus-seed-commitment`). Which fields exist at all is checked
//! before ([`super::fields`]); here their values are.

use crate::error::ApiError;
use plexus_core::sampling::{MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS};
use plexus_model::SamplingParams;
use plexus_verify::seed::RequestSeal;
use serde::Deserialize;
use std::collections::BTreeMap;

/// At most this many stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// At most this many choices per request (`n`; OpenAI allows 128, but choices run one after
/// the other here, so a large `n` would hold a generation slot for a long time).
pub const MAX_N: usize = 16;

/// How many recent tokens the frequency and presence penalties look at (llama-server's
/// `repeat_last_n` default).
pub const PENALTY_LAST_N: usize = 64;

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Fields shared by `/v1/chat/completions` and `/v1/completions`. `null` means absent.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Options {
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// llama-server / vLLM extension: keep the k most likely tokens (0 or -1: off).
    pub top_k: Option<i64>,
    /// llama-server / vLLM extension: drop tokens below `min_p` times the top one's probability.
    pub min_p: Option<f32>,
    /// vLLM extension (llama-server's `repeat_penalty`): divides positive logits of recent
    /// tokens, multiplies negative ones; 1 is off.
    pub repetition_penalty: Option<f32>,
    /// The end user, for the operator's logs; it does not change the output (as at OpenAI).
    pub user: Option<String>,
    /// Same as `user`.
    pub safety_identifier: Option<String>,
    /// Token id (as a string) -> bias added to its logit, -100 to 100.
    pub logit_bias: Option<BTreeMap<String, f32>>,
}

/// Checked options in engine terms.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Choices to generate (`n`).
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

fn in_range(v: Option<f32>, lo: f32, hi: f32, param: &'static str) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid(
            format!("`{param}` must be between {lo} and {hi}, got {x}"),
            Some(param),
        )),
        _ => Ok(()),
    }
}

/// Chat's `logprobs` (bool) and `top_logprobs` (0 to 20) as the engine's request.
pub fn chat_logprobs(logprobs: Option<bool>, top: Option<i64>) -> Result<Option<u8>, ApiError> {
    match (logprobs, top) {
        (Some(true), top) => top_count(top.unwrap_or(0), "top_logprobs").map(Some),
        (_, None) => Ok(None),
        (_, Some(_)) => Err(ApiError::invalid(
            "`top_logprobs` needs `logprobs` set to true",
            Some("top_logprobs"),
        )),
    }
}

/// The completions' `logprobs` (an integer, 0 to 20: the chosen token plus that many).
pub fn completion_logprobs(logprobs: Option<i64>) -> Result<Option<u8>, ApiError> {
    logprobs.map(|n| top_count(n, "logprobs")).transpose()
}

fn top_count(n: i64, param: &'static str) -> Result<u8, ApiError> {
    match u8::try_from(n) {
        Ok(k) if k <= MAX_TOP_LOGPROBS => Ok(k),
        _ => Err(ApiError::invalid(
            format!("`{param}` must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
            Some(param),
        )),
    }
}

impl Options {
    /// `logit_bias` as (token id, bias) pairs, ids ascending. Ids are checked against the
    /// vocabulary when the model is known.
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(map) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        if map.len() > MAX_LOGIT_BIAS {
            return Err(ApiError::invalid(
                format!(
                    "at most {MAX_LOGIT_BIAS} `logit_bias` entries, got {}",
                    map.len()
                ),
                Some("logit_bias"),
            ));
        }
        let mut out: Vec<(u32, f32)> = map
            .iter()
            .map(|(k, &v)| {
                let id = k.trim().parse::<u32>().map_err(|_| {
                    ApiError::invalid(
                        format!("`logit_bias` keys must be token ids, got {k:?}"),
                        Some("logit_bias"),
                    )
                })?;
                if !(-100.0..=100.0).contains(&v) {
                    return Err(ApiError::invalid(
                        format!("`logit_bias` values must be between -100 and 100, got {v}"),
                        Some("logit_bias"),
                    ));
                }
                Ok((id, v))
            })
            .collect::<Result<_, _>>()?;
        out.sort_unstable_by_key(|e| e.0);
        out.dedup_by_key(|e| e.0);
        Ok(out)
    }

    /// Checks the options; the seed is the client's, else the protocol's from `seal`.
    pub fn resolve(&self, seal: &RequestSeal) -> Result<Resolved, ApiError> {
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::invalid(
                    format!("`n` must be between 1 and {MAX_N}, got {n}"),
                    Some("n"),
                ))
            }
        };
        in_range(self.temperature, 0.0, 2.0, "temperature")?;
        in_range(self.top_p, 0.0, 1.0, "top_p")?;
        in_range(self.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
        in_range(self.presence_penalty, -2.0, 2.0, "presence_penalty")?;
        in_range(self.min_p, 0.0, 1.0, "min_p")?;
        in_range(self.repetition_penalty, 0.01, 10.0, "repetition_penalty")?;
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("`top_k` must be positive, 0 or -1 (off), got {k}"),
                    Some("top_k"),
                ))
            }
        };
        if self.stream_options.is_some() && self.stream != Some(true) {
            return Err(ApiError::invalid(
                "`stream_options` is only allowed when `stream` is true",
                Some("stream_options"),
            ));
        }
        for (who, param) in [
            (&self.user, "user"),
            (&self.safety_identifier, "safety_identifier"),
        ] {
            if let Some(u) = who {
                tracing::debug!(end_user = %u, param, "request from an end user");
            }
        }
        // `max_completion_tokens` is the newer name and wins when both are set.
        let (max_tokens, param) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        };
        let max_tokens = match max_tokens {
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    format!("`{param}` must be at least 1, got {m}"),
                    Some(param),
                ))
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(
                format!(
                    "at most {MAX_STOP} stop sequences are allowed, got {}",
                    stop.len()
                ),
                Some("stop"),
            ));
        }
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            penalty_last_n: PENALTY_LAST_N,
            // OpenAI takes any integer; negative seeds map onto the upper half of u64.
            seed: seal.source(self.seed.map(|s| s as u64)).seed(),
            logit_bias: self.logit_bias()?,
            logprobs: None,
            allowed: None,
        };
        let stream = self.stream.unwrap_or(false);
        Ok(Resolved {
            n,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            max_tokens,
            sampling,
            stop,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SEAL: RequestSeal = RequestSeal::new([0; 32], [0; 32]);

    fn opts(v: serde_json::Value) -> Options {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn openai_defaults() {
        let seal = RequestSeal::new([1; 32], [2; 32]);
        let r = opts(serde_json::json!({})).resolve(&seal).unwrap();
        assert_eq!(r.sampling.temperature, 1.0);
        assert_eq!(r.sampling.top_p, 1.0);
        assert_eq!(r.sampling.top_k, 0);
        assert_eq!(r.sampling.min_p, 0.0);
        assert_eq!(r.sampling.seed, seal.protocol_seed());
        assert!(!r.stream && !r.include_usage);
        assert_eq!(r.max_tokens, None);
    }

    #[test]
    fn max_completion_tokens_wins_and_stop_forms() {
        let r = opts(serde_json::json!({
            "max_tokens": 5, "max_completion_tokens": 9, "stop": "x", "seed": 3,
            "stream": true, "stream_options": {"include_usage": true}
        }))
        .resolve(&SEAL)
        .unwrap();
        assert_eq!(r.max_tokens, Some(9));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.sampling.seed, 3);
        assert!(r.include_usage);
        let r = opts(serde_json::json!({"stop": ["a", "b"], "max_tokens": null}))
            .resolve(&SEAL)
            .unwrap();
        assert_eq!(r.stop.len(), 2);
    }

    #[test]
    fn logprobs_requests() {
        assert_eq!(chat_logprobs(None, None).unwrap(), None);
        assert_eq!(chat_logprobs(Some(false), None).unwrap(), None);
        assert_eq!(chat_logprobs(Some(true), None).unwrap(), Some(0));
        assert_eq!(chat_logprobs(Some(true), Some(20)).unwrap(), Some(20));
        assert!(chat_logprobs(Some(true), Some(21)).is_err());
        assert!(chat_logprobs(Some(false), Some(2)).is_err());
        assert!(chat_logprobs(None, Some(2)).is_err());
        assert_eq!(completion_logprobs(Some(3)).unwrap(), Some(3));
        assert!(completion_logprobs(Some(-1)).is_err());
        let r = opts(serde_json::json!({"logit_bias": {"9": -100, " 2": 5.5}}))
            .resolve(&SEAL)
            .unwrap();
        assert_eq!(r.sampling.logit_bias, vec![(2, 5.5), (9, -100.0)]);
    }

    #[test]
    fn rejects_out_of_range() {
        for bad in [
            serde_json::json!({"n": 0}),
            serde_json::json!({"n": 17}),
            serde_json::json!({"temperature": 2.5}),
            serde_json::json!({"top_p": -0.1}),
            serde_json::json!({"max_tokens": 0}),
            serde_json::json!({"stop": ["a", "b", "c", "d", "e"]}),
            serde_json::json!({"presence_penalty": 3}),
            serde_json::json!({"top_k": -2}),
            serde_json::json!({"min_p": 1.5}),
            serde_json::json!({"repetition_penalty": 0}),
            serde_json::json!({"stream_options": {"include_usage": true}}),
            serde_json::json!({"logit_bias": {"abc": 1}}),
            serde_json::json!({"logit_bias": {"5": 101}}),
        ] {
            let e = opts(bad.clone()).resolve(&SEAL).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
        }
    }
}
