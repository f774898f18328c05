//! `POST /v1/chat/completions`: a conversation rendered with the model's chat template.
//! Message content is a string or a list of `{"type":"text","text":...}` parts; other part
//! types are refused.

use super::generation::{self, Job, Prompt, Running};
use super::json::ApiJson;
use super::params::Options;
use crate::error::ApiError;
use crate::sse::{self, Chunks, Envelope};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_model::chat::Message;
use serde::Deserialize;
use serde_json::{json, Value};

/// The request body (the fields Plexus uses; the rest are ignored).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub options: Options,
}

#[derive(Debug, Deserialize)]
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
        .map(|m| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(s)) => s.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match p {
                            Part::Text { text } => s.push_str(text),
                            Part::Other => {
                                return Err(ApiError::invalid(
                                    "only text content parts are supported",
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            Ok(Message::new(m.role.clone(), content))
        })
        .collect()
}

/// Chat completion chunks (`chat.completion.chunk`).
struct ChatChunks(Envelope);

impl Chunks for ChatChunks {
    fn opening(&self) -> Option<Value> {
        Some(self.0.chunk(json!([{
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        }])))
    }

    fn text(&self, text: &str) -> Value {
        self.0.chunk(json!([{
            "index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null,
        }]))
    }

    fn closing(&self, finish_reason: &str) -> Value {
        self.0.chunk(json!([{
            "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason,
        }]))
    }

    fn usage(&self, usage: Value) -> Value {
        let mut v = self.0.chunk(json!([]));
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
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let opts = req.options.resolve(super::random_u64())?;
    let job = Job {
        route: "/v1/chat/completions",
        model: req.model,
        prompt: Prompt::Chat(messages(&req.messages)?),
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: opts.stop,
        stream: opts.stream,
        payer: payer.0,
    };
    let running: Running = generation::start(&state, job).await?;
    let seed = running.seed;
    let id = super::response_id("chatcmpl");
    let created = super::unix_now();
    let model = running.model.clone();
    let fp = fingerprint(&running.identity);
    tracing::debug!(%id, seed, prompt_tokens = running.prompt_tokens, "chat completion");
    if opts.stream {
        let chunks = ChatChunks(Envelope {
            object: "chat.completion.chunk",
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
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fp,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": null,
            "finish_reason": c.finish.as_str(),
        }],
        "usage": sse::usage(prompt_tokens, &c),
    });
    Ok(with_seed(Json(body).into_response(), seed))
}
