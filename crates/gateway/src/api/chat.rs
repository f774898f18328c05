//! `POST /v1/chat/completions`: a conversation rendered with the model's chat template.
//! Message content is a string or a list of `{"type":"text","text":...}` parts; other part
//! types are refused. Roles: `system`, `developer` (rendered as `system`), `user`,
//! `assistant`.

use super::fields;
use super::generation::{self, Job, Prompt, Running};
use super::json::{self, ApiJson};
use super::logprobs;
use super::params::{self, Options};
use crate::error::ApiError;
use crate::sse::{self, Chunks, Envelope};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_model::chat::Message;
use plexus_model::sampler::TokenLogprobs;
use plexus_model::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// The request body; [`super::fields::CHAT`] lists the fields it may have.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    /// Absent or `null` for assistant turns that only called tools.
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type")]
pub enum Part {
    #[serde(rename = "text")]
    Text { text: String },
    #[serde(other)]
    Other,
}

fn messages(req: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    if req.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message",
            Some("messages"),
        ));
    }
    req.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid_param(
                        format!(
                            "unsupported role `{other}`: use system, developer, user or \
                             assistant"
                        ),
                        format!("messages[{i}].role"),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(s)) => s.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match p {
                            Part::Text { text } => s.push_str(text),
                            Part::Other => {
                                return Err(ApiError::invalid_param(
                                    "only text content parts are supported",
                                    format!("messages[{i}].content"),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

/// Chat completion chunks (`chat.completion.chunk`).
struct ChatChunks {
    envelope: Envelope,
    /// Set when the request asked for log-probabilities.
    logprobs: Option<Arc<Tokenizer>>,
}

impl Chunks for ChatChunks {
    fn opening(&self, choice: usize) -> Option<Value> {
        Some(self.envelope.chunk(json!([{
            "index": choice,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        }])))
    }

    fn text(&mut self, choice: usize, text: &str, scores: &[TokenLogprobs]) -> Value {
        let lp = match &self.logprobs {
            Some(tok) => logprobs::chat(tok, scores),
            None => Value::Null,
        };
        self.envelope.chunk(json!([{
            "index": choice, "delta": {"content": text}, "logprobs": lp, "finish_reason": null,
        }]))
    }

    fn closing(&self, choice: usize, finish_reason: &str) -> Value {
        self.envelope.chunk(json!([{
            "index": choice, "delta": {}, "logprobs": null, "finish_reason": finish_reason,
        }]))
    }

    fn usage(&self, usage: Value) -> Value {
        let mut v = self.envelope.chunk(json!([]));
        v["usage"] = usage;
        v
    }
}

/// `system_fingerprint`: which weights answered (the start of the model's identity).
pub(crate) fn fingerprint(identity: &str) -> String {
    format!("plexus-{}", identity.get(..16).unwrap_or(identity))
}

/// Adds the seed header to a response.
pub(crate) fn with_seed(mut res: Response, seed: u64) -> Response {
    res.headers_mut().insert("x-plexus-seed", seed.into());
    res
}

pub async fn handler(
    State(state): State<AppState>,
    payer: crate::accounts::Payer,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let body = json::object(body)?;
    fields::check(&body, fields::CHAT)?;
    // Parsed apart, not flattened, so that a bad value names its field.
    let options: Options = json::parse(body.clone())?;
    let req: ChatRequest = json::parse(body)?;
    let mut opts = options.resolve(super::random_u64())?;
    opts.sampling.logprobs = params::chat_logprobs(req.logprobs, req.top_logprobs)?;
    let want_logprobs = opts.sampling.logprobs.is_some();
    let job = Job {
        route: "/v1/chat/completions",
        model: req.model,
        prompt: Prompt::Chat(messages(&req.messages)?),
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: opts.stop,
        stream: opts.stream,
        payer: payer.0,
        n: opts.n,
    };
    let running: Running = generation::start(&state, job).await?;
    let seed = running.seed;
    let id = super::response_id("chatcmpl");
    let created = super::unix_now();
    let model = running.model.clone();
    let fp = fingerprint(&running.identity);
    tracing::debug!(%id, seed, prompt_tokens = running.prompt_tokens, "chat completion");
    if opts.stream {
        let chunks = ChatChunks {
            envelope: Envelope {
                object: "chat.completion.chunk",
                id,
                created,
                model,
                fingerprint: fp,
                include_usage: opts.include_usage,
            },
            logprobs: want_logprobs.then(|| running.tokenizer.clone()),
        };
        return Ok(with_seed(
            sse::response(running, chunks, opts.n, opts.include_usage),
            seed,
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
                logprobs::chat(&tokenizer, &c.logprobs)
            } else {
                Value::Null
            };
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": lp,
                "finish_reason": c.finish.as_str(),
            })
        })
        .collect();
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fp,
        "choices": choices,
        "usage": sse::usage(prompt_tokens, &cs),
    });
    Ok(with_seed(Json(body).into_response(), seed))
}
