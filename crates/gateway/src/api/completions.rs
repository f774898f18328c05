//! `POST /v1/completions`: raw text in, text out (`text_completion` objects). The prompt is a
//! string or a list of exactly one string; it gets the BOS token when the model asks for one.

use super::chat::{fingerprint, with_seed};
use super::generation::{self, Job, Prompt};
use super::json::ApiJson;
use super::params::Options;
use crate::error::ApiError;
use crate::sse::{self, Chunks, Envelope};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// The request body (the fields Plexus uses; the rest are ignored).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    #[serde(flatten)]
    pub options: Options,
}

/// `prompt`: a string or a list of strings (token-id prompts are not supported).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

struct TextChunks(Envelope);

impl Chunks for TextChunks {
    fn opening(&self) -> Option<Value> {
        None
    }

    fn text(&self, text: &str) -> Value {
        self.0
            .chunk(json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": null}]))
    }

    fn closing(&self, finish_reason: &str) -> Value {
        self.0.chunk(json!([{
            "text": "", "index": 0, "logprobs": null, "finish_reason": finish_reason,
        }]))
    }

    fn usage(&self, usage: Value) -> Value {
        let mut v = self.0.chunk(json!([]));
        v["usage"] = usage;
        v
    }
}

pub async fn handler(
    State(state): State<AppState>,
    payer: crate::accounts::Payer,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let opts = req.options.resolve(super::random_u64())?;
    let prompt = match req.prompt {
        PromptField::One(s) => s,
        PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Many(v) => {
            return Err(ApiError::invalid(
                format!("`prompt` must be one string, got a list of {}", v.len()),
                Some("prompt"),
            ))
        }
    };
    let job = Job {
        route: "/v1/completions",
        model: req.model,
        prompt: Prompt::Text(prompt),
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: opts.stop,
        stream: opts.stream,
        payer: payer.0,
    };
    let running = generation::start(&state, job).await?;
    let seed = running.seed;
    let id = super::response_id("cmpl");
    let created = super::unix_now();
    let model = running.model.clone();
    let fp = fingerprint(&running.identity);
    if opts.stream {
        let chunks = TextChunks(Envelope {
            object: "text_completion",
            id,
            created,
            model,
            fingerprint: fp,
            include_usage: opts.include_usage,
        });
        return Ok(with_seed(
            sse::response(running, chunks, opts.include_usage),
            seed,
        ));
    }
    let prompt_tokens = running.prompt_tokens;
    let c = generation::finish(running).await?;
    let body = json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fp,
        "choices": [{
            "text": c.text,
            "index": 0,
            "logprobs": null,
            "finish_reason": c.finish.as_str(),
        }],
        "usage": sse::usage(prompt_tokens, &c),
    });
    Ok(with_seed(Json(body).into_response(), seed))
}
