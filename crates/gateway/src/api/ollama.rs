//! Ollama's API: `POST /api/chat`, `POST /api/generate`, `GET /api/tags`, `POST /api/show`,
//! on the same engine, billing and grammar paths as the OpenAI routes.
//!
//! ```text
//! body ─ fields::check(OLLAMA_*) ─ options ─ fields::check(OLLAMA_OPTIONS) ─> Options
//!      ─ tools (OpenAI's shape already) / format ("json" or a schema) ─> Guide
//!      ─> generation::start ─> one JSON object, or JSON lines (`stream` defaults to true),
//!         the last with `done: true`, `done_reason` and the token counts and durations
//! ```
//!
//! Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1
//! over the last 64 tokens), so a client that sets nothing gets what it would get from Ollama.
//! Errors are `{"error": "..."}` ([`crate::error::Dialect::Ollama`]).

use super::fields;
use super::format;
use super::generation::{self, Job, Prompt};
use super::guide::{self, Guide};
use super::json::{self, ApiJson};
use super::params::{Options, Resolved, Stop, PENALTY_LAST_N};
use super::tools::{self, CallStream, Delta};
use crate::accounts::Payer;
use crate::error::{ApiError, Dialect, OllamaError};
use crate::sse::{self, Encoder};
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_model::chat::Message;
use plexus_model::generate::Completion;
use plexus_model::sampler::TokenLogprobs;
use plexus_verify::seed::RequestSeal;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;

/// `options` (Ollama's sampling settings) in the shared terms, Ollama's defaults for what is
/// not set.
#[derive(Debug, Default, Deserialize)]
struct OllamaOptions {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    seed: Option<i64>,
    num_predict: Option<i64>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
}

/// The body's `options` resolved under the request's `seal` (which derives the sampling seed
/// when the body gives none), `stream` defaulting to true as in Ollama.
fn resolved(
    body: &Map<String, Value>,
    stream: Option<bool>,
    seal: &RequestSeal,
) -> Result<Resolved, ApiError> {
    options(body.get("options"), stream.unwrap_or(true))?.resolve(seal)
}

fn options(v: Option<&Value>, stream: bool) -> Result<Options, ApiError> {
    let o = match v {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "`options` must be an object",
                Some("options"),
            ))
        }
    };
    let at = |p: &str| format!("options.{p}");
    fields::check(&o, fields::OLLAMA_OPTIONS).map_err(|e| e.map_param(at))?;
    let opts: OllamaOptions = json::parse(o).map_err(|e| e.map_param(at))?;
    let max_tokens = match opts.num_predict {
        // -1: no limit, -2: up to the context; both end at the context here.
        None | Some(-1) | Some(-2) => None,
        Some(n) if n > 0 => Some(n),
        Some(n) => {
            return Err(ApiError::invalid(
                format!("`num_predict` must be positive, -1 or -2, got {n}"),
                Some("options.num_predict"),
            ))
        }
    };
    Ok(Options {
        stream: Some(stream),
        max_tokens,
        temperature: Some(opts.temperature.unwrap_or(0.8)),
        top_p: Some(opts.top_p.unwrap_or(0.9)),
        top_k: Some(opts.top_k.unwrap_or(40)),
        min_p: opts.min_p,
        seed: opts.seed,
        stop: opts.stop.map(Stop::Many),
        repetition_penalty: Some(opts.repeat_penalty.unwrap_or(1.1)),
        presence_penalty: opts.presence_penalty,
        frequency_penalty: opts.frequency_penalty,
        ..Options::default()
    })
}

/// `format`: `"json"` (any JSON value... as Ollama: an object) or a JSON schema.
fn parse_format(v: Option<&Value>) -> Result<Option<generation::GrammarRequest>, ApiError> {
    let rf = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) if s == "json" => json!({"type": "json_object"}),
        Some(schema @ Value::Object(_)) => {
            json!({"type": "json_schema", "json_schema": {"name": "format", "schema": schema}})
        }
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`format` must be \"json\" or a JSON schema, got {other}"),
                Some("format"),
            ))
        }
    };
    format::parse(Some(&rf)).map_err(|e| e.map_param(|p| p.replace("response_format", "format")))
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
    images: Option<Vec<Value>>,
    tool_calls: Option<Vec<Value>>,
    tool_name: Option<String>,
    thinking: Option<String>,
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
            let at = |f: &str| format!("messages[{i}].{f}");
            let role = match m.role.as_str() {
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::invalid_param(
                        format!("unsupported role `{other}`: use system, user, assistant or tool"),
                        at("role"),
                    ))
                }
            };
            if m.images.as_ref().is_some_and(|i| !i.is_empty()) {
                return Err(ApiError::invalid_param(
                    "images are not supported (the models served are text-only)",
                    at("images"),
                ));
            }
            if m.thinking.as_ref().is_some_and(|t| !t.is_empty()) {
                return Err(ApiError::invalid_param(
                    "`thinking` is not supported",
                    at("thinking"),
                ));
            }
            let mut msg = Message::new(role, m.content.as_str());
            if let Some(calls) = &m.tool_calls {
                let calls = calls
                    .iter()
                    .enumerate()
                    .map(|(j, c)| {
                        let f = &c["function"];
                        match (f["name"].as_str(), f["arguments"].is_object()) {
                            (Some(name), true) => Ok(json!({"id": format!("call_{i}_{j}"),
                                "type": "function",
                                "function": {"name": name, "arguments": f["arguments"]}})),
                            _ => Err(ApiError::invalid_param(
                                "a tool call must be {\"function\": {\"name\", \"arguments\": {...}}}",
                                at(&format!("tool_calls[{j}]")),
                            )),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                msg.tool_calls = Some(calls);
            }
            msg.name = m.tool_name.clone().filter(|_| role == "tool");
            Ok(msg)
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    raw: Option<bool>,
    stream: Option<bool>,
}

/// RFC 3339 UTC time of `secs` since the epoch (`created_at`).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Which route a reply belongs to: `/api/chat` answers in `message`, `/api/generate` in
/// `response`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Generate,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Chat => "/api/chat",
            Route::Generate => "/api/generate",
        }
    }
}

/// The fields every line of a reply repeats.
struct Reply {
    route: Route,
    model: String,
    prompt_tokens: usize,
}

impl Reply {
    fn line(&self, text: &str, calls: Vec<Value>) -> Value {
        let mut v = json!({"model": self.model, "created_at": rfc3339(super::unix_now())});
        match self.route {
            Route::Chat => {
                let mut m = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    m["tool_calls"] = Value::from(calls);
                }
                v["message"] = m;
            }
            Route::Generate => v["response"] = Value::from(text),
        }
        v["done"] = Value::Bool(false);
        v
    }

    /// The last line (the whole answer when not streamed): `text`, the `calls` (in OpenAI's
    /// shape; one cut short is added to the text), `done`, why, counts and durations.
    fn closing(&self, mut text: String, calls: &[Value], c: &Completion) -> Value {
        let calls = ollama_calls(calls, &mut text);
        self.last(self.line(&text, calls), c)
    }

    /// The last line: `done`, why, and the counts and durations (nanoseconds).
    fn last(&self, mut v: Value, c: &Completion) -> Value {
        let (prefill, decode) = (c.prefill_time.as_nanos(), c.decode_time.as_nanos());
        v["done"] = Value::Bool(true);
        v["done_reason"] = Value::from(c.finish.as_str());
        v["total_duration"] = Value::from((prefill + decode) as u64);
        v["load_duration"] = Value::from(0);
        v["prompt_eval_count"] = Value::from(self.prompt_tokens);
        v["prompt_eval_duration"] = Value::from(prefill as u64);
        v["eval_count"] = Value::from(c.tokens.len());
        v["eval_duration"] = Value::from(decode as u64);
        v
    }
}

/// Ollama's tool calls (`{"function": {"name", "arguments": {...}}}`) from OpenAI's; a call cut
/// short stays text.
fn ollama_calls(calls: &[Value], text: &mut String) -> Vec<Value> {
    let mut out = Vec::new();
    for c in calls {
        match guide::arguments(c) {
            Some(a) => out.push(json!({"function": {"name": c["function"]["name"],
                "arguments": a}})),
            None => text.push_str(c["function"]["arguments"].as_str().unwrap_or_default()),
        }
    }
    out
}

/// The JSON lines of one reply. Tool calls are sent whole, with the last line, as Ollama
/// sends a call once it is complete.
struct Lines {
    reply: Reply,
    calls: Option<CallStream>,
    /// The calls so far, in OpenAI's shape.
    pending: Vec<Value>,
}

impl Encoder for Lines {
    fn content_type(&self) -> &'static str {
        "application/x-ndjson"
    }

    fn start(&mut self, _: &mut VecDeque<String>) {}

    fn piece(&mut self, _: usize, text: &str, _: &[TokenLogprobs], out: &mut VecDeque<String>) {
        let mut content = String::new();
        match self.calls.as_mut() {
            Some(s) => {
                for d in s.push(text) {
                    match d {
                        Delta::Content(t) => content.push_str(&t),
                        Delta::Start { id, name, .. } => self
                            .pending
                            .push(json!({"id": id, "function": {"name": name, "arguments": ""}})),
                        Delta::Arguments { index, text } => {
                            if let Some(c) = self.pending.get_mut(index) {
                                let a = c["function"]["arguments"].as_str().unwrap_or_default();
                                c["function"]["arguments"] = Value::from(format!("{a}{text}"));
                            }
                        }
                    }
                }
            }
            None => content.push_str(text),
        }
        if !content.is_empty() {
            out.push_back(format!("{}\n", self.reply.line(&content, Vec::new())));
        }
    }

    fn done(&mut self, _: usize, cs: &[Completion], out: &mut VecDeque<String>) {
        let Some(c) = cs.first() else { return };
        let last = self.reply.closing(String::new(), &self.pending, c);
        out.push_back(format!("{last}\n"));
    }

    fn fail(&mut self, error: &ApiError, out: &mut VecDeque<String>) {
        out.push_back(format!("{}\n", error.body_in(Dialect::Ollama)));
    }
}

/// Starts `route`'s job (one choice, on the body's options and the guide's grammar) and
/// answers with one object or JSON lines.
async fn run(
    state: &AppState,
    route: Route,
    request: (String, Prompt),
    (opts, seal): (Resolved, RequestSeal),
    payer: Payer,
    mut guide: Guide,
) -> Result<Response, OllamaError> {
    let (model, prompt) = request;
    let stream = opts.stream;
    let job = Job {
        seal,
        route: route.path(),
        model,
        prompt,
        max_tokens: opts.max_tokens,
        sampling: opts.sampling,
        stop: opts.stop,
        stream,
        payer: payer.0,
        n: 1,
        grammar: guide.grammar.take(),
    };
    let running = generation::start(state, job).await?;
    let seed = running.seed;
    let seal = running.seal;
    let reply = Reply {
        route,
        model: running.model.clone(),
        prompt_tokens: running.prompt_tokens,
    };
    if stream {
        let lines = Lines {
            reply,
            calls: guide.stream(),
            pending: Vec::new(),
        };
        return Ok(super::chat::with_seed(
            sse::respond(running, lines),
            seed,
            &seal,
        ));
    }
    let cs = generation::finish(running).await?;
    let c = cs
        .first()
        .ok_or_else(|| ApiError::Internal("a generation returned no choice".into()))?;
    let (content, calls) = guide.answer(&c.text);
    let body = reply.closing(content.unwrap_or_default(), &calls, c);
    Ok(super::chat::with_seed(
        Json(body).into_response(),
        seed,
        &seal,
    ))
}

pub async fn chat(
    State(state): State<AppState>,
    payer: Result<Payer, ApiError>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<Response, OllamaError> {
    let payer = payer?;
    let body = json::object(body?.0)?;
    fields::check(&body, fields::OLLAMA_CHAT)?;
    let tools = tools::parse(body.get("tools"), None, None)?;
    let guide = Guide::new(tools, parse_format(body.get("format"))?, "format")?;
    let req: ChatRequest = json::parse(body.clone())?;
    let seal = super::seal()?;
    let opts = resolved(&body, req.stream, &seal)?;
    let prompt = Prompt::Chat(messages(&req.messages)?, guide.in_prompt.clone());
    run(
        &state,
        Route::Chat,
        (req.model, prompt),
        (opts, seal),
        payer,
        guide,
    )
    .await
}

pub async fn generate(
    State(state): State<AppState>,
    payer: Result<Payer, ApiError>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<Response, OllamaError> {
    let payer = payer?;
    let body = json::object(body?.0)?;
    fields::check(&body, fields::OLLAMA_GENERATE)?;
    let guide = Guide::format(parse_format(body.get("format"))?);
    let req: GenerateRequest = json::parse(body.clone())?;
    let seal = super::seal()?;
    let opts = resolved(&body, req.stream, &seal)?;
    let prompt = if req.raw.unwrap_or(false) {
        if req.system.is_some() {
            return Err(ApiError::invalid(
                "`system` cannot be combined with `raw: true` (the prompt is sent as it is)",
                Some("system"),
            )
            .into());
        }
        Prompt::Text(req.prompt)
    } else {
        let mut m = Vec::new();
        if let Some(s) = req.system.filter(|s| !s.is_empty()) {
            m.push(Message::new("system", s));
        }
        m.push(Message::new("user", req.prompt));
        Prompt::Chat(m, Vec::new())
    };
    run(
        &state,
        Route::Generate,
        (req.model, prompt),
        (opts, seal),
        payer,
        guide,
    )
    .await
}

/// The `details` of a model, as far as Plexus knows them.
fn details() -> Value {
    json!({"parent_model": "", "format": "gguf", "family": "", "families": null,
        "parameter_size": "", "quantization_level": ""})
}

/// `GET /api/tags`: the served models.
pub async fn tags(State(state): State<AppState>) -> Json<Value> {
    let models: Vec<Value> = state
        .models()
        .iter()
        .map(|m| {
            json!({"name": m.id, "model": m.id, "modified_at": rfc3339(m.created),
                "size": 0, "digest": m.identity, "details": details()})
        })
        .collect();
    Json(json!({ "models": models }))
}

/// `/api/show`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowRequest {
    model: String,
    verbose: Option<bool>,
}

/// `POST /api/show`: what Plexus knows of a model (its context length, whether it can chat).
pub async fn show(
    State(state): State<AppState>,
    body: Result<ApiJson<ShowRequest>, ApiError>,
) -> Result<Json<Value>, OllamaError> {
    let req = body?.0;
    let _ = req.verbose; // Everything known is always shown.
    let m = state
        .find_model(&req.model)
        .ok_or_else(|| ApiError::ModelNotFound(req.model.clone()))?;
    let mut capabilities = vec!["completion"];
    if m.chat_template.is_some() {
        capabilities.push("tools");
    }
    Ok(Json(json!({
        "modelfile": "",
        "parameters": format!(
            "temperature 0.8\ntop_k 40\ntop_p 0.9\nrepeat_penalty 1.1\nrepeat_last_n {PENALTY_LAST_N}"
        ),
        "template": "",
        "details": details(),
        "model_info": {"general.context_length": m.context, "plexus.identity": m.identity},
        "capabilities": capabilities,
        "modified_at": rfc3339(m.created),
    })))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_300_000), "2026-12-03T12:13:20Z");
    }

    #[test]
    fn options_have_ollamas_defaults_and_names() {
        let r = options(None, true)
            .unwrap()
            .resolve(&plexus_verify::seed::RequestSeal::new([1; 32], [1; 32]))
            .unwrap();
        assert_eq!(r.sampling.temperature, 0.8);
        assert_eq!(r.sampling.top_k, 40);
        assert_eq!(r.max_tokens, None);
        let r = options(
            Some(&json!({"num_predict": 5, "seed": 3, "stop": ["x"]})),
            false,
        )
        .unwrap()
        .resolve(&plexus_verify::seed::RequestSeal::new([1; 32], [1; 32]))
        .unwrap();
        assert_eq!(
            (r.max_tokens, r.sampling.seed, r.stream),
            (Some(5), 3, false)
        );
        for (bad, at) in [
            (json!({"num_ctx": 4096}), "options.num_ctx"),
            (json!({"mirostat": 1}), "options.mirostat"),
            (json!({"temperature": "hot"}), "options.temperature"),
            (json!({"num_predict": 0}), "options.num_predict"),
        ] {
            let e = options(Some(&bad), true).unwrap_err();
            assert_eq!(e.body()["error"]["param"], at, "{bad}");
        }
    }

    #[test]
    fn formats() {
        assert!(parse_format(Some(&json!("json"))).unwrap().is_some());
        assert!(parse_format(Some(&json!({"type": "object"})))
            .unwrap()
            .is_some());
        assert!(parse_format(Some(&json!(""))).unwrap().is_none());
        let e = parse_format(Some(&json!("yaml"))).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "format");
    }
}
