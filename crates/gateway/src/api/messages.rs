//! `POST /v1/messages`: Anthropic's Messages API on the same engine paths, billing and
//! grammar machinery as chat completions.
//!
//! ```text
//! body ─ fields::check(MESSAGES) ─ MessagesRequest ─> messages ([Message]) + Options
//!      ─ tools / tool_choice, renamed to OpenAI's shape ─> tools::parse ─> Guide
//!      ─> generation::start ─> one `message` object, or the event stream
//!         message_start, (content_block_start, content_block_delta*, content_block_stop)*,
//!         message_delta (stop_reason, usage), message_stop
//! ```
//!
//! Content blocks: `text`, `tool_use` (assistant), `tool_result` (user; `is_error: true` is
//! rendered as `Error: ` before the result). Other block types, a final assistant turn
//! (prefill) and `cache_control` are refused by name. Errors have Anthropic's shape
//! ([`crate::error::Dialect::Anthropic`]).

use super::content::{bad, object, string};
use super::fields;
use super::generation::{self, Job, Prompt};
use super::guide::{self, Guide};
use super::json::{self, ApiJson};
use super::params::{Options, Stop, MAX_STOP};
use super::tools::{self, CallStream, Delta};
use crate::accounts::Payer;
use crate::error::{AnthropicError, ApiError, Dialect};
use crate::sse::{self, Encoder};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_model::chat::Message;
use plexus_model::generate::{Completion, FinishReason};
use plexus_model::sampler::TokenLogprobs;
use plexus_model::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::sync::Arc;

/// The typed part of the body; [`fields::MESSAGES`] lists the fields it may have.
#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: String,
    max_tokens: Option<i64>,
    messages: Vec<InputMessage>,
    system: Option<Content>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    metadata: Option<Metadata>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    user_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputMessage {
    role: String,
    content: Content,
}

/// A string, or a list of content blocks (checked one by one so an error names the block).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

/// The block's fields, refusing any outside `allowed` (and `cache_control` unless null).
fn block<'a>(v: &'a Value, allowed: &[&str], at: &str) -> Result<&'a Map<String, Value>, ApiError> {
    let o = object(v, "a content block", at)?;
    for (k, value) in o {
        if k == "cache_control" && value.is_null() {
            continue;
        }
        if !allowed.contains(&k.as_str()) {
            let why = if k == "cache_control" {
                "`cache_control` is not supported (prompt caching is not implemented); remove it"
                    .to_owned()
            } else {
                format!("unknown field `{k}` in a content block")
            };
            return Err(bad(why, format!("{at}.{k}")));
        }
    }
    Ok(o)
}

/// The text of one `text` block.
fn text_block<'a>(b: &'a Value, at: &str) -> Result<&'a str, ApiError> {
    let o = block(b, &["type", "text", "citations"], at)?;
    if o.get("type").and_then(Value::as_str) != Some("text") {
        return Err(bad(
            "only `text` blocks are supported here",
            format!("{at}.type"),
        ));
    }
    if o.get("citations").is_some_and(|c| !c.is_null()) {
        return Err(bad(
            "`citations` is not supported",
            format!("{at}.citations"),
        ));
    }
    string(o, "text", at)
}

/// The text of `content` made of `text` blocks only (system prompts, tool results).
fn text_only(content: &Content, at: &str) -> Result<String, ApiError> {
    match content {
        Content::Text(s) => Ok(s.clone()),
        Content::Blocks(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(j, b)| text_block(b, &format!("{at}[{j}]")))
            .collect(),
    }
}

/// The conversation in the engine's terms: the system prompt first, a user turn's
/// `tool_result` blocks as `tool` messages before its text, an assistant turn's `tool_use`
/// blocks as its tool calls.
fn messages(system: Option<&Content>, input: &[InputMessage]) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    if let Some(s) = system {
        let text = text_only(s, "system")?;
        if !text.is_empty() {
            out.push(Message::new("system", text));
        }
    }
    if input.is_empty() {
        return Err(bad(
            "`messages` must contain at least one message",
            "messages",
        ));
    }
    for (i, m) in input.iter().enumerate() {
        let at = format!("messages[{i}]");
        let assistant = match m.role.as_str() {
            "user" => false,
            "assistant" => true,
            other => {
                return Err(bad(
                    format!("unsupported role `{other}`: use user or assistant"),
                    at + ".role",
                ))
            }
        };
        if assistant && i + 1 == input.len() {
            return Err(bad(
                "a final assistant turn (prefilling the answer) is not supported; end with a \
                 user turn",
                at + ".role",
            ));
        }
        let mut text = String::new();
        let mut calls = Vec::new();
        match &m.content {
            Content::Text(s) => text.push_str(s),
            Content::Blocks(blocks) => {
                for (j, b) in blocks.iter().enumerate() {
                    let at = format!("{at}.content[{j}]");
                    let kind = b.get("type").and_then(Value::as_str).unwrap_or_default();
                    match (kind, assistant) {
                        ("text", _) => text.push_str(text_block(b, &at)?),
                        ("tool_use", true) => {
                            let o = block(b, &["type", "id", "name", "input"], &at)?;
                            let input =
                                o.get("input").filter(|v| v.is_object()).ok_or_else(|| {
                                    bad("`input` must be an object", at.clone() + ".input")
                                })?;
                            calls.push(json!({"id": string(o, "id", &at)?, "type": "function",
                                "function": {"name": string(o, "name", &at)?, "arguments": input}}));
                        }
                        ("tool_result", false) => {
                            let o = block(b, &["type", "tool_use_id", "content", "is_error"], &at)?;
                            let content: Content = match o.get("content") {
                                None | Some(Value::Null) => Content::Text(String::new()),
                                Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                                    bad(
                                        "`content` must be a string or text blocks",
                                        at.clone() + ".content",
                                    )
                                })?,
                            };
                            let mut result = text_only(&content, &(at.clone() + ".content"))?;
                            match o.get("is_error") {
                                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                                Some(Value::Bool(true)) => result = format!("Error: {result}"),
                                Some(_) => {
                                    return Err(bad(
                                        "`is_error` must be a boolean",
                                        at + ".is_error",
                                    ))
                                }
                            }
                            let mut msg = Message::new("tool", result);
                            msg.tool_call_id = Some(string(o, "tool_use_id", &at)?.to_owned());
                            out.push(msg);
                        }
                        (other, _) => {
                            let role = if assistant { "assistant" } else { "user" };
                            return Err(bad(
                                format!(
                                    "content blocks of type {other:?} are not supported in {role} \
                                     turns (supported: text, tool_use in assistant turns, \
                                     tool_result in user turns)"
                                ),
                                at + ".type",
                            ));
                        }
                    }
                }
            }
        }
        if assistant {
            let mut msg = Message::new("assistant", text);
            if !calls.is_empty() {
                msg.tool_calls = Some(calls);
            }
            out.push(msg);
        } else if !text.is_empty() || !matches!(&m.content, Content::Blocks(b) if !b.is_empty()) {
            out.push(Message::new("user", text));
        }
    }
    Ok(out)
}

/// Anthropic's `tools` and `tool_choice` through the shared tool machinery.
fn parse_tools(
    tools: Option<&Value>,
    choice: Option<&Value>,
) -> Result<Option<tools::Tools>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .enumerate()
                .map(|(i, t)| {
                    let at = format!("tools[{i}]");
                    let o = block(t, &["type", "name", "description", "input_schema"], &at)?;
                    match o.get("type") {
                        None | Some(Value::Null) => {}
                        Some(v) if v == "custom" => {}
                        Some(v) => {
                            return Err(bad(
                                format!("tools of type {v} are not supported (only custom tools)"),
                                at + ".type",
                            ))
                        }
                    }
                    if !o.contains_key("input_schema") {
                        return Err(bad("a tool needs `input_schema`", at + ".input_schema"));
                    }
                    let mut f = Map::new();
                    for (from, to) in [
                        ("name", "name"),
                        ("description", "description"),
                        ("input_schema", "parameters"),
                    ] {
                        if let Some(v) = o.get(from) {
                            f.insert(to.into(), v.clone());
                        }
                    }
                    Ok(json!({"type": "function", "function": f}))
                })
                .collect::<Result<Vec<_>, ApiError>>()?,
        ),
        Some(_) => return Err(bad("`tools` must be an array", "tools")),
    };
    let (choice, parallel) = match choice {
        None | Some(Value::Null) => (Value::Null, Value::Null),
        Some(c) => {
            let o = c
                .as_object()
                .ok_or_else(|| bad("`tool_choice` must be an object", "tool_choice"))?;
            let kind = o.get("type").and_then(Value::as_str).unwrap_or_default();
            let keys: &[&str] = match kind {
                "tool" => &["type", "name", "disable_parallel_tool_use"],
                "none" => &["type"],
                _ => &["type", "disable_parallel_tool_use"],
            };
            if let Some(k) = o.keys().find(|k| !keys.contains(&k.as_str())) {
                return Err(bad(
                    format!("unknown field `{k}` for tool_choice {kind:?}"),
                    format!("tool_choice.{k}"),
                ));
            }
            let choice = match kind {
                "auto" => json!("auto"),
                "any" => json!("required"),
                "none" => json!("none"),
                "tool" => json!({"type": "function", "function": {"name": o.get("name")}}),
                other => {
                    return Err(bad(
                        format!(
                            "unsupported tool_choice type {other:?}: use auto, any, tool or none"
                        ),
                        "tool_choice.type",
                    ))
                }
            };
            let parallel = match o.get("disable_parallel_tool_use") {
                None | Some(Value::Null) => Value::Null,
                Some(Value::Bool(b)) => Value::Bool(!b),
                Some(_) => {
                    return Err(bad(
                        "`disable_parallel_tool_use` must be a boolean",
                        "tool_choice.disable_parallel_tool_use",
                    ))
                }
            };
            (choice, parallel)
        }
    };
    let Some(list) = list else {
        if !choice.is_null() && choice != "none" && choice != "auto" {
            return Err(bad("`tool_choice` needs `tools`", "tool_choice"));
        }
        return Ok(None);
    };
    tools::parse(Some(&Value::from(list)), Some(&choice), Some(&parallel)).map_err(|e| {
        e.map_param(|p| {
            p.replace(".function.parameters", ".input_schema")
                .replace(".function.", ".")
                .replace(
                    "parallel_tool_calls",
                    "tool_choice.disable_parallel_tool_use",
                )
        })
    })
}

/// Anthropic's ids: `toolu_...` for tool calls (the shared parser makes `call_...`).
fn tool_use_id(id: &str) -> String {
    format!("toolu_{}", id.strip_prefix("call_").unwrap_or(id))
}

/// The stop string that ended `c`, if one did: the generated tokens hold it, the text does
/// not.
fn matched_stop(tok: &Tokenizer, c: &Completion, stops: &[String]) -> Option<String> {
    if c.finish != FinishReason::Stop || stops.is_empty() {
        return None;
    }
    let full = tok.decode(&c.tokens).ok()?;
    let rest = full.get(c.text.len()..).unwrap_or(&full);
    stops
        .iter()
        .filter_map(|s| rest.find(s.as_str()).map(|at| (at, s)))
        .min_by_key(|(at, s)| (*at, usize::MAX - s.len()))
        .map(|(_, s)| s.clone())
}

/// `stop_reason` and `stop_sequence` of a finished answer.
fn stop_reason(stop: Option<String>, finish: FinishReason, calls: usize) -> (&'static str, Value) {
    match (finish, stop) {
        (FinishReason::Length, _) => ("max_tokens", Value::Null),
        (_, Some(s)) => ("stop_sequence", Value::from(s)),
        _ if calls > 0 => ("tool_use", Value::Null),
        _ => ("end_turn", Value::Null),
    }
}

/// What the handler keeps to answer once the generation started.
struct Answer {
    id: String,
    model: String,
    tokenizer: Arc<Tokenizer>,
    stops: Vec<String>,
    prompt_tokens: usize,
}

impl Answer {
    fn message(&self, content: Vec<Value>, c: Option<&Completion>) -> Value {
        let (stop, output) = match c {
            Some(c) => {
                let calls = content.iter().filter(|b| b["type"] == "tool_use").count();
                let (reason, seq) = stop_reason(
                    matched_stop(&self.tokenizer, c, &self.stops),
                    c.finish,
                    calls,
                );
                ((Value::from(reason), seq), c.tokens.len())
            }
            None => ((Value::Null, Value::Null), 0),
        };
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop.0,
            "stop_sequence": stop.1,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": output},
        })
    }
}

/// Anthropic's content blocks of a finished answer. A call cut short (by `max_tokens`) has
/// no complete input: its text goes back as a text block where it stood.
fn blocks(guide: &Guide, text: &str) -> Vec<Value> {
    let (content, calls) = guide.answer(text);
    let mut out = Vec::new();
    if let Some(t) = content.filter(|t| !t.is_empty() || calls.is_empty()) {
        out.push(json!({"type": "text", "text": t}));
    }
    for c in &calls {
        out.push(match guide::arguments(c) {
            Some(input) => json!({
                "type": "tool_use",
                "id": tool_use_id(c["id"].as_str().unwrap_or_default()),
                "name": c["function"]["name"],
                "input": input,
            }),
            None => json!({"type": "text",
                "text": c["function"]["arguments"].as_str().unwrap_or_default()}),
        });
    }
    out
}

/// The event stream of one answer.
struct Events {
    answer: Answer,
    calls: Option<CallStream>,
    /// The open block's index and whether it is text.
    open: Option<(usize, bool)>,
    blocks: usize,
    tool_uses: usize,
}

fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

impl Events {
    fn close(&mut self, out: &mut VecDeque<String>) {
        if let Some((index, _)) = self.open.take() {
            out.push_back(event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open(&mut self, block: Value, text: bool, out: &mut VecDeque<String>) -> usize {
        self.close(out);
        let index = self.blocks;
        self.blocks += 1;
        self.open = Some((index, text));
        out.push_back(event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn delta(&mut self, d: Delta, out: &mut VecDeque<String>) {
        let (index, delta) = match d {
            Delta::Content(text) => {
                let index = match self.open {
                    Some((i, true)) => i,
                    _ => self.open(json!({"type": "text", "text": ""}), true, out),
                };
                (index, json!({"type": "text_delta", "text": text}))
            }
            Delta::Start { id, name, .. } => {
                self.tool_uses += 1;
                let block = json!({"type": "tool_use", "id": tool_use_id(&id), "name": name,
                    "input": {}});
                self.open(block, false, out);
                return;
            }
            Delta::Arguments { text, .. } => match self.open {
                Some((i, false)) => (i, json!({"type": "input_json_delta", "partial_json": text})),
                _ => return,
            },
        };
        out.push_back(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }
}

impl Encoder for Events {
    fn start(&mut self, out: &mut VecDeque<String>) {
        let message = self.answer.message(Vec::new(), None);
        out.push_back(event(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        ));
    }

    fn piece(&mut self, _: usize, text: &str, _: &[TokenLogprobs], out: &mut VecDeque<String>) {
        let deltas = match self.calls.as_mut() {
            Some(s) => s.push(text),
            None => vec![Delta::Content(text.to_owned())],
        };
        for d in deltas {
            self.delta(d, out);
        }
    }

    fn done(&mut self, _: usize, cs: &[Completion], out: &mut VecDeque<String>) {
        let Some(c) = cs.first() else { return };
        if self.blocks == 0 {
            self.open(json!({"type": "text", "text": ""}), true, out);
        }
        self.close(out);
        let (reason, seq) = stop_reason(
            matched_stop(&self.answer.tokenizer, c, &self.answer.stops),
            c.finish,
            self.tool_uses,
        );
        out.push_back(event(
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": seq},
                "usage": {"output_tokens": c.tokens.len()}}),
        ));
        out.push_back(event("message_stop", &json!({"type": "message_stop"})));
    }

    fn fail(&mut self, error: &ApiError, out: &mut VecDeque<String>) {
        out.push_back(event("error", &error.body_in(Dialect::Anthropic)));
    }
}

/// The sampling options in the shared terms (`n` is always 1), checked by
/// [`Options::resolve`] after Anthropic's own ranges.
fn options(req: &MessagesRequest) -> Result<Options, ApiError> {
    let max_tokens = req
        .max_tokens
        .ok_or_else(|| ApiError::invalid("`max_tokens` is required", Some("max_tokens")))?;
    if let Some(t) = req.temperature.filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(ApiError::invalid(
            format!("`temperature` must be between 0 and 1, got {t}"),
            Some("temperature"),
        ));
    }
    let stop = req.stop_sequences.clone().unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            format!(
                "at most {MAX_STOP} stop sequences are supported, got {}",
                stop.len()
            ),
            Some("stop_sequences"),
        ));
    }
    if let Some(u) = req.metadata.as_ref().and_then(|m| m.user_id.as_deref()) {
        tracing::debug!(end_user = %u, "request from an end user");
    }
    Ok(Options {
        stream: req.stream,
        max_tokens: Some(max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop: Some(Stop::Many(stop)),
        ..Options::default()
    })
}

/// `POST /v1/messages/count_tokens`: the prompt's length in tokens as `/v1/messages` would
/// render it (system, messages, tools), without running the model or charging.
pub async fn count_tokens(
    State(state): State<AppState>,
    payer: Result<Payer, ApiError>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<Json<Value>, AnthropicError> {
    payer?;
    let body = json::object(body?.0)?;
    fields::check(&body, fields::COUNT_TOKENS)?;
    let guide = Guide::new(
        parse_tools(body.get("tools"), body.get("tool_choice"))?,
        None,
        "tools",
    )?;
    #[derive(Deserialize)]
    struct CountRequest {
        model: String,
        messages: Vec<InputMessage>,
        system: Option<Content>,
    }
    let req: CountRequest = json::parse(body)?;
    let entry = state
        .find_model(&req.model)
        .ok_or_else(|| ApiError::ModelNotFound(req.model.clone()))?;
    let prompt = Prompt::Chat(
        messages(req.system.as_ref(), &req.messages)?,
        guide.in_prompt,
    );
    let tokens = tokio::task::spawn_blocking(move || generation::encode(&entry, &prompt))
        .await
        .map_err(|e| ApiError::Internal(format!("count_tokens task: {e}")))??;
    Ok(Json(json!({ "input_tokens": tokens.len() })))
}

pub async fn handler(
    State(state): State<AppState>,
    payer: Result<Payer, ApiError>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<Response, AnthropicError> {
    let payer = payer?;
    let body = json::object(body?.0)?;
    fields::check(&body, fields::MESSAGES)?;
    let tools = parse_tools(body.get("tools"), body.get("tool_choice"))?;
    let mut guide = Guide::new(tools, None, "tools")?;
    let req: MessagesRequest = json::parse(body)?;
    let seal = super::seal()?;
    let opts = options(&req)?.resolve(&seal)?;
    let job = Job {
        seal,
        route: "/v1/messages",
        model: req.model.clone(),
        prompt: Prompt::Chat(
            messages(req.system.as_ref(), &req.messages)?,
            guide.in_prompt.clone(),
        ),
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: opts.stop.clone(),
        stream: opts.stream,
        payer: payer.0,
        n: 1,
        grammar: guide.grammar.take(),
    };
    let running = generation::start(&state, job).await?;
    let seed = running.seed;
    let seal = running.seal;
    let answer = Answer {
        id: super::response_id("msg").replacen('-', "_", 1),
        model: running.model.clone(),
        tokenizer: running.tokenizer.clone(),
        stops: opts.stop,
        prompt_tokens: running.prompt_tokens,
    };
    if opts.stream {
        let events = Events {
            answer,
            calls: guide.stream(),
            open: None,
            blocks: 0,
            tool_uses: 0,
        };
        return Ok(super::chat::with_seed(
            sse::respond(running, events),
            seed,
            &seal,
        ));
    }
    let cs = generation::finish(running).await?;
    let c = cs
        .first()
        .ok_or_else(|| ApiError::Internal("a generation returned no choice".into()))?;
    let body = answer.message(blocks(&guide, &c.text), Some(c));
    Ok(super::chat::with_seed(
        Json(body).into_response(),
        seed,
        &seal,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn input(v: Value) -> Vec<InputMessage> {
        serde_json::from_value(v).unwrap()
    }

    fn param(e: ApiError) -> String {
        e.body()["error"]["param"].as_str().unwrap().to_owned()
    }

    #[test]
    fn conversation_with_tool_use_and_results() {
        let m = messages(
            Some(&Content::Blocks(vec![json!({"type": "text", "text": "Be brief."})])),
            &input(json!([
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
                     "content": [{"type": "text", "text": "down"}]},
                    {"type": "text", "text": "And so?"}]},
            ])),
        )
        .unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "tool", "tool", "user"]
        );
        assert_eq!(m[2].content, "Checking.");
        let calls = m[2].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0]["function"]["arguments"]["city"], "Paris");
        assert_eq!(m[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(m[4].content, "Error: down");
        assert_eq!(m[5].content, "And so?");
    }

    #[test]
    fn unsupported_blocks_roles_and_prefill_are_named() {
        for (v, at) in [
            (
                json!([{"role": "user", "content": [{"type": "image", "source": {}}]}]),
                "messages[0].content[0].type",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text", "text": "x",
                    "cache_control": {"type": "ephemeral"}}]}]),
                "messages[0].content[0].cache_control",
            ),
            (
                json!([{"role": "system", "content": "x"}]),
                "messages[0].role",
            ),
            (
                json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
                "messages[1].role",
            ),
            (
                json!([{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b",
                    "input": {}}]}]),
                "messages[0].content[0].type",
            ),
        ] {
            assert_eq!(param(messages(None, &input(v)).unwrap_err()), at);
        }
    }

    #[test]
    fn tools_and_tool_choice_map_onto_the_shared_ones() {
        let tools = json!([{"name": "w", "description": "d",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
        let t = parse_tools(
            Some(&tools),
            Some(&json!({"type": "any", "disable_parallel_tool_use": true})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(t.choice, tools::Choice::Required);
        assert!(!t.parallel);
        let t = parse_tools(Some(&tools), Some(&json!({"type": "tool", "name": "w"})))
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, tools::Choice::Named("w".into()));
        let e = parse_tools(Some(&json!([{"name": "w", "input_schema": 3}])), None).unwrap_err();
        assert_eq!(param(e), "tools[0].input_schema");
        let e = parse_tools(
            Some(&json!([{"type": "web_search_20250305", "name": "s"}])),
            None,
        )
        .unwrap_err();
        assert_eq!(param(e), "tools[0].type");
        let e = parse_tools(Some(&tools), Some(&json!({"type": "tool", "name": "x"}))).unwrap_err();
        assert_eq!(param(e), "tool_choice");
    }

    #[test]
    fn stop_reasons() {
        assert_eq!(stop_reason(None, FinishReason::Stop, 0).0, "end_turn");
        assert_eq!(stop_reason(None, FinishReason::Stop, 2).0, "tool_use");
        assert_eq!(stop_reason(None, FinishReason::Length, 1).0, "max_tokens");
        let (r, s) = stop_reason(Some("END".into()), FinishReason::Stop, 0);
        assert_eq!((r, s), ("stop_sequence", json!("END")));
    }

    #[test]
    fn errors_have_anthropics_shape() {
        let e = ApiError::invalid("`max_tokens` is required", Some("max_tokens"));
        let b = e.body_in(Dialect::Anthropic);
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert!(b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"));
        let b = ApiError::ModelNotFound("m".into()).body_in(Dialect::Anthropic);
        assert_eq!(b["error"]["type"], "not_found_error");
    }
}
