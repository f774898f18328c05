//! `POST /v1/completions`: raw text in, text out (`text_completion` objects). The prompt is a
//! string or a list of exactly one string; it gets the BOS token when the model asks for one.
//! `response_format` or a GBNF `grammar` constrains the text as on chat ([`super::format`]), as
//! llama-server does.

use super::chat::{fingerprint, with_seed};
use super::fields;
use super::format;
use super::generation::{self, Job, Prompt};
use super::guide::Guide;
use super::json::{self, ApiJson};
use super::logprobs;
use super::params::{self, Options};
use crate::error::ApiError;
use crate::sse::{self, Chunks, Envelope};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_model::sampler::TokenLogprobs;
use plexus_model::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// The request body; [`super::fields::COMPLETIONS`] lists the fields it may have.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    pub logprobs: Option<i64>,
}

/// `prompt`: a string or a list of strings (token-id prompts are not supported).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

struct TextChunks {
    envelope: Envelope,
    /// Set when the request asked for log-probabilities.
    logprobs: Option<Arc<Tokenizer>>,
    /// Per choice: the character offset of its next token in its text.
    offsets: Vec<usize>,
}

impl Chunks for TextChunks {
    fn opening(&self, _choice: usize) -> Option<Value> {
        None
    }

    fn text(&mut self, choice: usize, text: &str, scores: &[TokenLogprobs]) -> Option<Value> {
        let lp = match (&self.logprobs, self.offsets.get_mut(choice)) {
            (Some(tok), Some(offset)) => logprobs::completion(tok, scores, offset),
            _ => Value::Null,
        };
        Some(
            self.envelope.chunk(
                json!([{"text": text, "index": choice, "logprobs": lp, "finish_reason": null}]),
            ),
        )
    }

    fn closing(&self, choice: usize, finish_reason: &str) -> Value {
        self.envelope.chunk(json!([{
            "text": "", "index": choice, "logprobs": null, "finish_reason": finish_reason,
        }]))
    }

    fn usage(&self, usage: Value) -> Value {
        let mut v = self.envelope.chunk(json!([]));
        v["usage"] = usage;
        v
    }
}

pub async fn handler(
    State(state): State<AppState>,
    payer: crate::accounts::Payer,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let body = json::object(body)?;
    fields::check(&body, fields::COMPLETIONS)?;
    let guide = Guide::format(format::output(&body)?);
    // Parsed apart, not flattened, so that a bad value names its field.
    let options: Options = json::parse(body.clone())?;
    let req: CompletionRequest = json::parse(body)?;
    let seal = super::seal()?;
    let mut opts = options.resolve(&seal)?;
    opts.sampling.logprobs = params::completion_logprobs(req.logprobs)?;
    let want_logprobs = opts.sampling.logprobs.is_some();
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
        seal,
        route: "/v1/completions",
        model: req.model,
        prompt: Prompt::Text(prompt),
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: opts.stop,
        stream: opts.stream,
        payer: payer.0,
        n: opts.n,
        grammar: guide.grammar,
    };
    let running = generation::start(&state, job).await?;
    let seed = running.seed;
    let seal = running.seal;
    let id = super::response_id("cmpl");
    let created = super::unix_now();
    let model = running.model.clone();
    let fp = fingerprint(&running.identity);
    if opts.stream {
        let chunks = TextChunks {
            envelope: Envelope {
                object: "text_completion",
                id,
                created,
                model,
                fingerprint: fp,
                include_usage: opts.include_usage,
            },
            logprobs: want_logprobs.then(|| running.tokenizer.clone()),
            offsets: vec![0; opts.n],
        };
        return Ok(with_seed(
            sse::response(running, chunks, opts.n, opts.include_usage),
            seed,
            &seal,
        ));
    }
    let prompt_tokens = running.prompt_tokens;
    let tokenizer = running.tokenizer.clone();
    let cs = generation::finish(running).await?;
    let choices: Vec<Value> = cs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = if want_logprobs {
                logprobs::completion(&tokenizer, &c.logprobs, &mut 0)
            } else {
                Value::Null
            };
            json!({
                "text": c.text,
                "index": i,
                "logprobs": lp,
                "finish_reason": c.finish.as_str(),
            })
        })
        .collect();
    let body = json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fp,
        "choices": choices,
        "usage": sse::usage(prompt_tokens, &cs),
    });
    Ok(with_seed(Json(body).into_response(), seed, &seal))
}
