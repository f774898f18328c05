//! `POST /v1/responses`: OpenAI's Responses API, stateless (nothing is stored, so
//! `previous_response_id` and `store: true` are refused), on the same engine, billing and
//! grammar paths as chat completions.
//!
//! ```text
//! body ─ fields::check(RESPONSES) ─ input items + instructions ─> [Message]
//!      ─ flat function tools / text.format, in chat's shape ─> tools::parse, format::parse
//!      ─> Guide ─> generation::start ─> one `response` object, or the event stream
//!         response.created, response.in_progress, per output item: output_item.added,
//!         (content_part.added, output_text.delta*, output_text.done, content_part.done |
//!          function_call_arguments.delta*, function_call_arguments.done), output_item.done,
//!         then response.completed (response.incomplete when cut by max_output_tokens)
//! ```

use super::content::{bad, object, string};
use super::fields;
use super::format;
use super::generation::{self, Job, Prompt};
use super::guide::Guide;
use super::json::{self, ApiJson};
use super::params::Options;
use super::tools::{self, CallStream, Delta};
use crate::accounts::Payer;
use crate::error::ApiError;
use crate::sse::{self, Encoder};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_model::chat::Message;
use plexus_model::generate::{Completion, FinishReason};
use plexus_model::sampler::TokenLogprobs;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;

/// The typed part of the body; [`fields::RESPONSES`] lists the fields it may have.
#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    model: String,
    input: Input,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stream: Option<bool>,
    user: Option<String>,
    safety_identifier: Option<String>,
    metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Value>),
}

/// The fields of an input item, refusing any outside `allowed`.
fn item<'a>(v: &'a Value, allowed: &[&str], at: &str) -> Result<&'a Map<String, Value>, ApiError> {
    let o = object(v, "an input item", at)?;
    if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!("unknown field `{k}`"), format!("{at}.{k}")));
    }
    Ok(o)
}

/// A message item's text: a string or `input_text` / `output_text` parts.
fn message_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for (j, p) in parts.iter().enumerate() {
                let at = format!("{at}.content[{j}]");
                let o = item(p, &["type", "text", "annotations", "logprobs"], &at)?;
                match o.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text") => s.push_str(string(o, "text", &at)?),
                    other => {
                        return Err(bad(
                            format!(
                                "content parts of type {other:?} are not supported (only \
                                 input_text and output_text)"
                            ),
                            at + ".type",
                        ))
                    }
                }
            }
            Ok(s)
        }
        _ => Err(bad(
            "`content` must be a string or a list of text parts",
            format!("{at}.content"),
        )),
    }
}

/// The conversation: `instructions` as the system message, then the input items (messages,
/// `function_call` items as the assistant's tool calls, `function_call_output` items as
/// `tool` messages).
fn messages(instructions: Option<&str>, input: &Input) -> Result<Vec<Message>, ApiError> {
    let mut out: Vec<Message> = Vec::new();
    if let Some(s) = instructions.filter(|s| !s.is_empty()) {
        out.push(Message::new("system", s));
    }
    let items = match input {
        Input::Text(s) => {
            out.push(Message::new("user", s.as_str()));
            return Ok(out);
        }
        Input::Items(items) => items,
    };
    if items.is_empty() {
        return Err(bad("`input` must not be empty", "input"));
    }
    for (i, v) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = v.get("type").and_then(Value::as_str);
        match kind {
            None | Some("message") => {
                let o = item(v, &["type", "role", "content", "id", "status"], &at)?;
                let role = match string(o, "role", &at)? {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(bad(
                            format!("unsupported role `{other}`"),
                            format!("{at}.role"),
                        ))
                    }
                };
                out.push(Message::new(role, message_text(o.get("content"), &at)?));
            }
            Some("function_call") => {
                let o = item(
                    v,
                    &["type", "call_id", "name", "arguments", "id", "status"],
                    &at,
                )?;
                let arguments: Value = serde_json::from_str(string(o, "arguments", &at)?)
                    .ok()
                    .filter(Value::is_object)
                    .ok_or_else(|| {
                        bad(
                            "`arguments` must be a JSON object as text",
                            format!("{at}.arguments"),
                        )
                    })?;
                let call = json!({"id": string(o, "call_id", &at)?, "type": "function",
                    "function": {"name": string(o, "name", &at)?, "arguments": arguments}});
                match out.last_mut() {
                    Some(m) if m.role == "assistant" => {
                        m.tool_calls.get_or_insert_with(Vec::new).push(call)
                    }
                    _ => {
                        let mut m = Message::new("assistant", "");
                        m.tool_calls = Some(vec![call]);
                        out.push(m);
                    }
                }
            }
            Some("function_call_output") => {
                let o = item(v, &["type", "call_id", "output", "id", "status"], &at)?;
                let mut m = Message::new("tool", string(o, "output", &at)?);
                m.tool_call_id = Some(string(o, "call_id", &at)?.to_owned());
                out.push(m);
            }
            Some(other) => {
                return Err(bad(
                    format!(
                        "input items of type {other:?} are not supported (messages, \
                         function_call and function_call_output are)"
                    ),
                    at + ".type",
                ))
            }
        }
    }
    Ok(out)
}

/// `tools` (flat function tools), `tool_choice` and `parallel_tool_calls` through the shared
/// tool machinery.
fn parse_tools(body: &Map<String, Value>) -> Result<Option<tools::Tools>, ApiError> {
    let list = match body.get("tools") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let at = format!("tools[{i}]");
                let o = item(
                    t,
                    &["type", "name", "description", "parameters", "strict"],
                    &at,
                )?;
                if o.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(bad(
                        "only tools of type \"function\" are supported",
                        at + ".type",
                    ));
                }
                let mut f = o.clone();
                f.remove("type");
                Ok(json!({"type": "function", "function": f}))
            })
            .collect::<Result<Vec<_>, ApiError>>()?
            .into(),
        Some(_) => return Err(bad("`tools` must be an array", "tools")),
    };
    let choice = match body.get("tool_choice") {
        Some(Value::Object(o)) => {
            if o.get("type").and_then(Value::as_str) != Some("function")
                || o.keys().any(|k| k != "type" && k != "name")
            {
                return Err(bad(
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\": \
                     \"function\", \"name\": ...}",
                    "tool_choice",
                ));
            }
            json!({"type": "function", "function": {"name": o.get("name")}})
        }
        other => other.cloned().unwrap_or(Value::Null),
    };
    tools::parse(Some(&list), Some(&choice), body.get("parallel_tool_calls"))
        .map_err(|e| e.map_param(|p| p.replace(".function.", ".")))
}

/// `text.format`, in `response_format`'s shape for [`format::parse`].
fn parse_format(
    text: Option<&Value>,
) -> Result<Option<super::generation::GrammarRequest>, ApiError> {
    let Some(text) = text.filter(|t| !t.is_null()) else {
        return Ok(None);
    };
    let o = text
        .as_object()
        .ok_or_else(|| bad("`text` must be an object", "text"))?;
    if let Some((k, _)) = o
        .iter()
        .find(|(k, v)| k.as_str() != "format" && !v.is_null())
    {
        return Err(bad(
            format!("`text.{k}` is not supported"),
            format!("text.{k}"),
        ));
    }
    let format = match o.get("format") {
        Some(Value::Object(f)) if f.get("type").is_some_and(|t| t == "json_schema") => {
            let mut schema = f.clone();
            schema.remove("type");
            json!({"type": "json_schema", "json_schema": schema})
        }
        Some(f) => f.clone(),
        None => Value::Null,
    };
    format::parse(Some(&format))
        .map_err(|e| e.map_param(|p| p.replace("response_format", "text.format")))
}

/// What every response object repeats from the request, and the parts of it known once the
/// generation started.
struct Shell {
    id: String,
    created: u64,
    model: String,
    /// The echoed request fields (`instructions`, `tools`, `tool_choice`, ...).
    echo: Map<String, Value>,
    prompt_tokens: usize,
}

impl Shell {
    fn response(&self, status: &str, output: &[Value], c: Option<&Completion>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "model": self.model,
            "output": output,
            "previous_response_id": null,
            "store": false,
            "usage": null,
        });
        for (k, e) in &self.echo {
            v[k] = e.clone();
        }
        if let Some(c) = c {
            let n = c.tokens.len();
            v["usage"] = json!({
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": n,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + n,
            });
            if c.finish == FinishReason::Length {
                v["incomplete_details"] = json!({"reason": "max_output_tokens"});
            }
        }
        v
    }
}

/// `completed`, or `incomplete` when the answer was cut by `max_output_tokens`.
fn status(c: &Completion) -> &'static str {
    if c.finish == FinishReason::Length {
        "incomplete"
    } else {
        "completed"
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn call_item(call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}", call_id.trim_start_matches("call_")),
        "call_id": call_id, "name": name, "arguments": arguments, "status": status})
}

/// The output items of a finished answer.
fn output(guide: &Guide, text: &str) -> Vec<Value> {
    let (content, calls) = guide.answer(text);
    let mut out = Vec::new();
    if let Some(t) = content.filter(|t| !t.is_empty() || calls.is_empty()) {
        out.push(message_item(
            &super::response_id("msg").replacen('-', "_", 1),
            &t,
            "completed",
        ));
    }
    for c in &calls {
        let f = &c["function"];
        out.push(call_item(
            c["id"].as_str().unwrap_or_default(),
            f["name"].as_str().unwrap_or_default(),
            f["arguments"].as_str().unwrap_or_default(),
            "completed",
        ));
    }
    out
}

/// The event stream of one response.
struct Events {
    shell: Shell,
    calls: Option<CallStream>,
    /// The finished output items, and the open one (a message or a call, with its text).
    items: Vec<Value>,
    open: Option<Value>,
    sequence: u64,
}

impl Events {
    fn emit(&mut self, out: &mut VecDeque<String>, kind: &str, mut data: Value) {
        data["type"] = Value::from(kind);
        data["sequence_number"] = Value::from(self.sequence);
        self.sequence += 1;
        out.push_back(format!("event: {kind}\ndata: {data}\n\n"));
    }

    fn index(&self) -> usize {
        self.items.len()
    }

    fn close(&mut self, out: &mut VecDeque<String>) {
        let Some(mut item) = self.open.take() else {
            return;
        };
        let (id, index) = (item["id"].clone(), self.index());
        if item["type"] == "message" {
            let part = item["content"][0].clone();
            let text = part["text"].clone();
            self.emit(
                out,
                "response.output_text.done",
                json!({"item_id": id,
                "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
            );
            self.emit(
                out,
                "response.content_part.done",
                json!({"item_id": id,
                "output_index": index, "content_index": 0, "part": part}),
            );
        } else {
            let arguments = item["arguments"].clone();
            self.emit(
                out,
                "response.function_call_arguments.done",
                json!({"item_id": id,
                "output_index": index, "arguments": arguments}),
            );
        }
        item["status"] = Value::from("completed");
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": index,
            "item": item}),
        );
        self.items.push(item);
    }

    fn open_item(&mut self, item: Value, out: &mut VecDeque<String>) {
        self.close(out);
        let index = self.index();
        let mut added = item.clone();
        if added["type"] == "message" {
            added["content"] = json!([]);
        }
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": index,
            "item": added}),
        );
        if item["type"] == "message" {
            self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": item["id"],
                "output_index": index, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            );
        }
        self.open = Some(item);
    }

    fn delta(&mut self, d: Delta, out: &mut VecDeque<String>) {
        match d {
            Delta::Content(text) => {
                if !self.open.as_ref().is_some_and(|i| i["type"] == "message") {
                    let id = super::response_id("msg").replacen('-', "_", 1);
                    self.open_item(message_item(&id, "", "in_progress"), out);
                }
                let index = self.index();
                let Some(item) = self.open.as_mut() else {
                    return;
                };
                let t = format!(
                    "{}{text}",
                    item["content"][0]["text"].as_str().unwrap_or("")
                );
                item["content"][0]["text"] = Value::from(t);
                let id = item["id"].clone();
                self.emit(
                    out,
                    "response.output_text.delta",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
                );
            }
            Delta::Start { id, name, .. } => {
                self.open_item(call_item(&id, &name, "", "in_progress"), out);
            }
            Delta::Arguments { text, .. } => {
                let index = self.index();
                let Some(item) = self.open.as_mut().filter(|i| i["type"] == "function_call") else {
                    return;
                };
                let a = format!("{}{text}", item["arguments"].as_str().unwrap_or(""));
                item["arguments"] = Value::from(a);
                let id = item["id"].clone();
                self.emit(
                    out,
                    "response.function_call_arguments.delta",
                    json!({"item_id": id,
                    "output_index": index, "delta": text}),
                );
            }
        }
    }
}

impl Encoder for Events {
    fn start(&mut self, out: &mut VecDeque<String>) {
        let r = self.shell.response("in_progress", &[], None);
        self.emit(out, "response.created", json!({"response": r}));
        self.emit(out, "response.in_progress", json!({"response": r}));
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
        if self.items.is_empty() && self.open.is_none() {
            let id = super::response_id("msg").replacen('-', "_", 1);
            self.open_item(message_item(&id, "", "in_progress"), out);
        }
        self.close(out);
        let status = status(c);
        let r = self.shell.response(status, &self.items, Some(c));
        self.emit(out, &format!("response.{status}"), json!({"response": r}));
    }

    fn fail(&mut self, error: &ApiError, out: &mut VecDeque<String>) {
        let e = error.body()["error"].clone();
        self.emit(
            out,
            "error",
            json!({"code": e["code"], "message": e["message"],
            "param": e["param"]}),
        );
    }
}

pub async fn handler(
    State(state): State<AppState>,
    payer: Payer,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let body = json::object(body)?;
    fields::check(&body, fields::RESPONSES)?;
    let tools = parse_tools(&body)?;
    let mut guide = Guide::new(tools, parse_format(body.get("text"))?, "text")?;
    // Echoed as the request gave them, else as OpenAI reports its defaults.
    let mut echo = Map::new();
    for (k, default) in [
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("temperature", json!(1.0)),
        ("top_p", json!(1.0)),
        ("tools", json!([])),
        ("tool_choice", json!("auto")),
        ("parallel_tool_calls", json!(true)),
        ("text", json!({"format": {"type": "text"}})),
        ("user", Value::Null),
        ("metadata", json!({})),
    ] {
        let v = body.get(k).filter(|v| !v.is_null()).cloned();
        echo.insert(k.into(), v.unwrap_or(default));
    }
    let req: ResponsesRequest = json::parse(body)?;
    for (who, param) in [
        (&req.user, "user"),
        (&req.safety_identifier, "safety_identifier"),
    ] {
        if let Some(u) = who {
            tracing::debug!(end_user = %u, param, "request from an end user");
        }
    }
    let _ = &req.metadata; // Echoed back only.
    let seal = super::seal()?;
    let opts = Options {
        stream: req.stream,
        max_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        ..Options::default()
    }
    .resolve(&seal)
    .map_err(|e| e.map_param(|p| p.replace("max_tokens", "max_output_tokens")))?;
    let job = Job {
        seal,
        route: "/v1/responses",
        model: req.model.clone(),
        prompt: Prompt::Chat(
            messages(req.instructions.as_deref(), &req.input)?,
            guide.in_prompt.clone(),
        ),
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: opts.stop,
        stream: opts.stream,
        payer: payer.0,
        n: 1,
        grammar: guide.grammar.take(),
    };
    let running = generation::start(&state, job).await?;
    let seed = running.seed;
    let seal = running.seal;
    let shell = Shell {
        id: super::response_id("resp").replacen('-', "_", 1),
        created: super::unix_now(),
        model: running.model.clone(),
        echo,
        prompt_tokens: running.prompt_tokens,
    };
    if opts.stream {
        let events = Events {
            shell,
            calls: guide.stream(),
            items: Vec::new(),
            open: None,
            sequence: 0,
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
    let body = shell.response(status(c), &output(&guide, &c.text), Some(c));
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

    fn input(v: Value) -> Input {
        serde_json::from_value(v).unwrap()
    }

    fn param(e: ApiError) -> String {
        e.body()["error"]["param"].as_str().unwrap().to_owned()
    }

    #[test]
    fn items_become_the_conversation() {
        let m = messages(
            Some("Be brief."),
            &input(json!([
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "function_call", "call_id": "call_1", "name": "w",
                 "arguments": "{\"city\": \"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {"type": "message", "role": "developer",
                 "content": [{"type": "input_text", "text": "Answer."}]},
            ])),
        )
        .unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "system"]);
        assert_eq!(
            m[2].tool_calls.as_ref().unwrap()[0]["function"]["arguments"]["city"],
            "Paris"
        );
        assert_eq!(m[3].tool_call_id.as_deref(), Some("call_1"));
        let m = messages(None, &input(json!("hi"))).unwrap();
        assert_eq!((m[0].role.as_str(), m[0].content.as_str()), ("user", "hi"));
    }

    fn events(calls: Option<CallStream>) -> Events {
        Events {
            shell: Shell {
                id: "resp_1".into(),
                created: 0,
                model: "m".into(),
                echo: Map::new(),
                prompt_tokens: 3,
            },
            calls,
            items: Vec::new(),
            open: None,
            sequence: 0,
        }
    }

    fn completion(text: &str) -> Completion {
        Completion {
            tokens: vec![1, 2],
            text: text.into(),
            finish: FinishReason::Stop,
            logprobs: Vec::new(),
            prompt_tokens: 3,
            prefill_time: Default::default(),
            decode_time: Default::default(),
        }
    }

    /// Every event of a streamed answer, as (type, data).
    fn run(mut e: Events, pieces: &[&str]) -> Vec<(String, Value)> {
        let mut out = VecDeque::new();
        e.start(&mut out);
        for p in pieces {
            e.piece(0, p, &[], &mut out);
        }
        e.done(3, &[completion(&pieces.concat())], &mut out);
        out.iter()
            .map(|f| {
                let (head, data) = f.split_once("\ndata: ").unwrap();
                let data: Value = serde_json::from_str(data.trim()).unwrap();
                assert_eq!(head.strip_prefix("event: ").unwrap(), data["type"]);
                (head[7..].to_owned(), data)
            })
            .collect()
    }

    #[test]
    fn a_streamed_text_answer() {
        let ev = run(events(None), &["Hel", "lo"]);
        let kinds: Vec<&str> = ev.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, e) in ev.iter().enumerate() {
            assert_eq!(e.1["sequence_number"], i);
        }
        assert_eq!(ev[6].1["text"], "Hello");
        let done = &ev[9].1["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(done["usage"]["output_tokens"], 2);
    }

    #[test]
    fn a_streamed_call() {
        let text =
            "<tool_call>\n{\"name\": \"w\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (a, b) = text.split_at(30);
        let ev = run(events(Some(CallStream::new(true))), &[a, b]);
        let added = ev
            .iter()
            .find(|e| e.0 == "response.output_item.added")
            .unwrap();
        assert_eq!(added.1["item"]["name"], "w");
        let args: String = ev
            .iter()
            .filter(|e| e.0 == "response.function_call_arguments.delta")
            .map(|e| e.1["delta"].as_str().unwrap())
            .collect();
        assert_eq!(args, "{\"city\": \"Paris\"}");
        let done = &ev.last().unwrap().1["response"]["output"];
        assert_eq!(done.as_array().unwrap().len(), 1);
        assert_eq!(done[0]["type"], "function_call");
        assert_eq!(done[0]["arguments"], args);
        assert_eq!(done[0]["status"], "completed");
    }

    #[test]
    fn unsupported_items_and_tools_are_named() {
        let e = messages(None, &input(json!([{"type": "reasoning", "summary": []}]))).unwrap_err();
        assert_eq!(param(e), "input[0].type");
        let e = messages(
            None,
            &input(json!([{"role": "user", "content": [{"type": "input_image"}]}])),
        )
        .unwrap_err();
        assert_eq!(param(e), "input[0].content[0].type");
        let body = json!({"tools": [{"type": "web_search"}]});
        let e = parse_tools(body.as_object().unwrap()).unwrap_err();
        assert_eq!(param(e), "tools[0].type");
        let body = json!({"tools": [{"type": "function", "name": "w",
            "parameters": {"type": "object"}}], "tool_choice": {"type": "function", "name": "w"}});
        let t = parse_tools(body.as_object().unwrap()).unwrap().unwrap();
        assert_eq!(t.choice, tools::Choice::Named("w".into()));
        let e = parse_format(Some(&json!({"format": {"type": "sound"}}))).unwrap_err();
        assert_eq!(param(e), "text.format");
        assert!(
            parse_format(Some(&json!({"format": {"type": "json_schema", "name": "x",
            "schema": {"type": "object"}}})))
            .unwrap()
            .is_some()
        );
    }
}
