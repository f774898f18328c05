//! The request fields chat and text completions share ([`Options`]), checked and turned into
//! engine terms ([`Resolved`]): OpenAI's defaults (temperature 1, top_p 1, no top-k, no min-p)
//! so that its semantics hold; temperature 0 is greedy; no seed draws a random one, which the
//! response reports in its `x-plexus-seed` header.

use crate::error::ApiError;
use plexus_model::SamplingParams;
use serde::Deserialize;

/// At most this many stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;

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
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Fields shared by `/v1/chat/completions` and `/v1/completions`. `null` means absent;
/// unknown fields are ignored.
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
}

/// Checked options in engine terms.
#[derive(Clone, Debug)]
pub struct Resolved {
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

impl Options {
    /// Checks the options; `random_seed` is used when the request names no seed.
    pub fn resolve(&self, random_seed: u64) -> Result<Resolved, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    format!("only n = 1 is supported, got n = {n}"),
                    Some("n"),
                ));
            }
        }
        in_range(self.temperature, 0.0, 2.0, "temperature")?;
        in_range(self.top_p, 0.0, 1.0, "top_p")?;
        in_range(self.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
        in_range(self.presence_penalty, -2.0, 2.0, "presence_penalty")?;
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
            top_k: 0,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            penalty_last_n: PENALTY_LAST_N,
            // OpenAI takes any integer; negative seeds map onto the upper half of u64.
            seed: self.seed.map_or(random_seed, |s| s as u64),
        };
        let stream = self.stream.unwrap_or(false);
        Ok(Resolved {
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

    fn opts(v: serde_json::Value) -> Options {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn openai_defaults() {
        let r = opts(serde_json::json!({})).resolve(7).unwrap();
        assert_eq!(r.sampling.temperature, 1.0);
        assert_eq!(r.sampling.top_p, 1.0);
        assert_eq!(r.sampling.top_k, 0);
        assert_eq!(r.sampling.min_p, 0.0);
        assert_eq!(r.sampling.seed, 7);
        assert!(!r.stream && !r.include_usage);
        assert_eq!(r.max_tokens, None);
    }

    #[test]
    fn max_completion_tokens_wins_and_stop_forms() {
        let r = opts(serde_json::json!({
            "max_tokens": 5, "max_completion_tokens": 9, "stop": "x", "seed": 3,
            "stream": true, "stream_options": {"include_usage": true}
        }))
        .resolve(0)
        .unwrap();
        assert_eq!(r.max_tokens, Some(9));
        assert_eq!(r.stop, vec!["x".to_string()]);
        assert_eq!(r.sampling.seed, 3);
        assert!(r.include_usage);
        let r = opts(serde_json::json!({"stop": ["a", "b"], "max_tokens": null}))
            .resolve(0)
            .unwrap();
        assert_eq!(r.stop.len(), 2);
    }

    #[test]
    fn rejects_out_of_range() {
        for bad in [
            serde_json::json!({"n": 2}),
            serde_json::json!({"temperature": 2.5}),
            serde_json::json!({"top_p": -0.1}),
            serde_json::json!({"max_tokens": 0}),
            serde_json::json!({"stop": ["a", "b", "c", "d", "e"]}),
            serde_json::json!({"presence_penalty": 3}),
        ] {
            let e = opts(bad.clone()).resolve(0).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
        }
    }
}
