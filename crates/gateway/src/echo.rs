//! A benchmark backend: no model runs; each "token" is the unix time in microseconds at which
//! the backend handed it to the gateway, paced at a fixed interval. A client subtracting that
//! stamp from its receive time measures what the gateway adds (HTTP, JSON, SSE, queues,
//! scheduling) without engine noise. Used by `bench/gateway_overhead.sh` through the hidden
//! `plexus gateway --bench-echo-ms N` flag; never a serving mode.

use crate::backend::{Backend, BackendError, ModelEntry};
use plexus_model::generate::{Completion, FinishReason, Flow, GenerateRequest, Piece};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Emits timestamps instead of text; see the module docs.
pub struct EchoBackend {
    entry: ModelEntry,
    pace: Duration,
}

impl EchoBackend {
    /// Serves `entry` (its tokenizer and template are used for prompts as usual), one stamp
    /// every `pace`.
    pub fn new(entry: ModelEntry, pace: Duration) -> Self {
        Self { entry, pace }
    }
}

fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

impl Backend for EchoBackend {
    fn models(&self) -> Vec<ModelEntry> {
        vec![self.entry.clone()]
    }

    fn generate(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&Piece) -> Flow,
    ) -> Result<Completion, BackendError> {
        if model_id != self.entry.id {
            return Err(BackendError::Invalid(format!("unknown model {model_id}")));
        }
        let started = Instant::now();
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        let mut n = 0;
        while n < req.max_tokens {
            let due = started + self.pace * n as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let piece = format!("{} ", now_micros());
            text.push_str(&piece);
            n += 1;
            if on_text(&Piece::plain(&piece)) == Flow::Stop {
                finish = FinishReason::Cancelled;
                break;
            }
        }
        Ok(Completion {
            tokens: vec![0; n],
            text,
            finish,
            logprobs: Vec::new(),
            prompt_tokens: req.prompt_tokens.len(),
            prefill_time: Duration::ZERO,
            decode_time: started.elapsed(),
        })
    }
}
