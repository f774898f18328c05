//! `POST /v1/chat/completions`: a conversation rendered with the model's chat template.
//! Message content is a string or a list of `{"type":"text","text":...}` parts; other part
//! types are refused. Roles: `system`, `developer` (rendered as `system`), `user`,
//! `assistant` (with `tool_calls`), `tool` (with `tool_call_id`). Structured outputs
//! ([`super::format`]) and tool calls ([`super::tools`]) are generated under a grammar.

use super::fields;
use super::format;
use super::generation::{self, Job, Prompt, Running};
use super::guide::Guide;
use super::json::{self, ApiJson};
use super::logprobs;
use super::params::{self, Options};
use super::tools::{self, CallStream, Delta};
use crate::error::ApiError;
use crate::sse::{self, Chunks, Envelope};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_model::chat::Message;
use plexus_model::sampler::TokenLogprobs;
use plexus_model::Tokenizer;
use plexus_verify::seed::RequestSeal;
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
    /// An assistant turn's calls, as a previous answer gave them.
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a `tool` turn answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// A `tool` turn's function name.
    #[serde(default)]
    pub name: Option<String>,
    /// Fields the client sends back with a previous answer; only `null` is accepted.
    #[serde(default)]
    pub refusal: Option<Value>,
    #[serde(default)]
    pub annotations: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// JSON text.
    pub arguments: String,
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
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid_param(
                        format!(
                            "unsupported role `{other}`: use system, developer, user, \
                             assistant or tool"
                        ),
                        format!("messages[{i}].role"),
                    ))
                }
            };
            let at = |f: &str| format!("messages[{i}].{f}");
            for (f, v) in [
                ("refusal", &m.refusal),
                ("annotations", &m.annotations),
                ("audio", &m.audio),
                ("function_call", &m.function_call),
            ] {
                if v.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(ApiError::invalid_param(
                        format!("`{f}` is not supported in messages; remove it or set it to null"),
                        at(f),
                    ));
                }
            }
            if role != "tool" && (m.tool_call_id.is_some() || m.name.is_some()) {
                let f = if m.name.is_some() {
                    "name"
                } else {
                    "tool_call_id"
                };
                return Err(ApiError::invalid_param(
                    format!("`{f}` is only supported in messages of role `tool`"),
                    at(f),
                ));
            }
            if role == "tool" && m.tool_call_id.is_none() {
                return Err(ApiError::invalid_param(
                    "a `tool` message needs the `tool_call_id` it answers",
                    at("tool_call_id"),
                ));
            }
            if role != "assistant" && m.tool_calls.is_some() {
                return Err(ApiError::invalid_param(
                    "only assistant messages carry `tool_calls`",
                    at("tool_calls"),
                ));
            }
            let tool_calls = match &m.tool_calls {
                None => None,
                Some(calls) => Some(
                    calls
                        .iter()
                        .enumerate()
                        .map(|(j, c)| {
                            let arguments: Value = serde_json::from_str(&c.function.arguments)
                                .ok()
                                .filter(Value::is_object)
                                .ok_or_else(|| {
                                    ApiError::invalid_param(
                                        "tool call arguments must be a JSON object",
                                        at(&format!("tool_calls[{j}].function.arguments")),
                                    )
                                })?;
                            if c.kind != "function" {
                                return Err(ApiError::invalid_param(
                                    "only tool calls of type \"function\" are supported",
                                    at(&format!("tool_calls[{j}].type")),
                                ));
                            }
                            Ok(json!({"id": c.id, "type": "function", "function": {
                                "name": c.function.name, "arguments": arguments}}))
                        })
                        .collect::<Result<Vec<_>, ApiError>>()?,
                ),
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
            let mut msg = Message::new(role, content);
            msg.tool_calls = tool_calls;
            msg.tool_call_id = m.tool_call_id.clone();
            msg.name = m.name.clone();
            Ok(msg)
        })
        .collect()
}

/// Chat completion chunks (`chat.completion.chunk`).
struct ChatChunks {
    envelope: Envelope,
    /// Set when the request asked for log-probabilities.
    logprobs: Option<Arc<Tokenizer>>,
    /// Each choice's tool-call parser, when the model may call tools.
    calls: Option<Vec<CallStream>>,
}

/// One delta object from the changes a piece of text makes to an answer.
fn delta(deltas: Vec<Delta>) -> Value {
    let mut content: Option<String> = None;
    let mut calls: Vec<Value> = Vec::new();
    for d in deltas {
        match d {
            Delta::Content(t) => content.get_or_insert_with(String::new).push_str(&t),
            Delta::Start { index, id, name } => calls.push(json!({
                "index": index, "id": id, "type": "function",
                "function": {"name": name, "arguments": ""},
            })),
            Delta::Arguments { index, text } => match calls.last_mut() {
                Some(c) if c["index"] == index => {
                    let a = format!(
                        "{}{text}",
                        c["function"]["arguments"].as_str().unwrap_or_default()
                    );
                    c["function"]["arguments"] = Value::from(a);
                }
                _ => calls.push(json!({"index": index, "function": {"arguments": text}})),
            },
        }
    }
    let mut d = serde_json::Map::new();
    if let Some(c) = content {
        d.insert("content".into(), Value::from(c));
    }
    if !calls.is_empty() {
        d.insert("tool_calls".into(), Value::from(calls));
    }
    Value::Object(d)
}

/// OpenAI's `finish_reason`: `"tool_calls"` when an answer that ended by itself made calls.
fn finish_reason(finish: &str, calls: usize) -> &str {
    if calls > 0 && finish == "stop" {
        "tool_calls"
    } else {
        finish
    }
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

    fn text(&mut self, choice: usize, text: &str, scores: &[TokenLogprobs]) -> Option<Value> {
        let lp = match &self.logprobs {
            Some(tok) => logprobs::chat(tok, scores),
            None => Value::Null,
        };
        let delta = match self.calls.as_mut().and_then(|c| c.get_mut(choice)) {
            Some(stream) => delta(stream.push(text)),
            None => json!({"content": text}),
        };
        if delta.as_object().is_some_and(|d| d.is_empty()) && scores.is_empty() {
            return None;
        }
        Some(self.envelope.chunk(json!([{
            "index": choice, "delta": delta, "logprobs": lp, "finish_reason": null,
        }])))
    }

    fn closing(&self, choice: usize, finish: &str) -> Value {
        let calls = self
            .calls
            .as_ref()
            .and_then(|c| c.get(choice))
            .map_or(0, CallStream::calls);
        self.envelope.chunk(json!([{
            "index": choice, "delta": {}, "logprobs": null,
            "finish_reason": finish_reason(finish, calls),
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
/// Reports the request's sampling seed and the seal it was derived from (request id and the
/// gateway's seed commitment, lowercase hex) in response headers.
pub(crate) fn with_seed(mut res: Response, seed: u64, seal: &RequestSeal) -> Response {
    let h = res.headers_mut();
    h.insert("x-plexus-seed", seed.into());
    for (name, bytes) in [
        ("x-plexus-request-id", seal.request()),
        ("x-plexus-seed-commitment", seal.commitment().0),
    ] {
        if let Ok(v) = axum::http::HeaderValue::from_str(&hex::encode(bytes)) {
            h.insert(name, v);
        }
    }
    res
}

pub async fn handler(
    State(state): State<AppState>,
    payer: crate::accounts::Payer,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let body = json::object(body)?;
    fields::check(&body, fields::CHAT)?;
    let tools = tools::parse(
        body.get("tools"),
        body.get("tool_choice"),
        body.get("parallel_tool_calls"),
    )?;
    let format = format::output(&body)?;
    let param = format.as_ref().map_or("response_format", |f| f.param);
    let mut guide = Guide::new(tools, format, param)?;
    // Parsed apart, not flattened, so that a bad value names its field.
    let options: Options = json::parse(body.clone())?;
    let req: ChatRequest = json::parse(body)?;
    let seal = super::seal()?;
    let mut opts = options.resolve(&seal)?;
    opts.sampling.logprobs = params::chat_logprobs(req.logprobs, req.top_logprobs)?;
    let want_logprobs = opts.sampling.logprobs.is_some();
    let job = Job {
        seal,
        route: "/v1/chat/completions",
        model: req.model,
        prompt: Prompt::Chat(messages(&req.messages)?, guide.in_prompt.clone()),
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: opts.stop,
        stream: opts.stream,
        payer: payer.0,
        n: opts.n,
        grammar: guide.grammar.take(),
    };
    let running: Running = generation::start(&state, job).await?;
    let seed = running.seed;
    let seal = running.seal;
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
            calls: guide
                .calls
                .map(|_| (0..opts.n).filter_map(|_| guide.stream()).collect()),
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
                logprobs::chat(&tokenizer, &c.logprobs)
            } else {
                Value::Null
            };
            let (content, calls) = guide.answer(&c.text);
            let n = calls.len();
            let mut message = json!({"role": "assistant", "content": content});
            if n > 0 {
                message["tool_calls"] = Value::from(calls);
            }
            json!({
                "index": i,
                "message": message,
                "logprobs": lp,
                "finish_reason": finish_reason(c.finish.as_str(), n),
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
    Ok(with_seed(Json(body).into_response(), seed, &seal))
}
