//! Shared helpers: the tiny local backend, a scripted backend, request and body helpers.

use axum::body::Body;
use axum::http::{Request, Response};
use axum::Router;
use http_body_util::BodyExt;
use plexus_gateway::{AppState, Backend, BackendError, GatewayConfig, LocalBackend, ModelEntry};
use plexus_model::chat::ChatTemplate;
use plexus_model::generate::{Completion, FinishReason, Flow, GenerateRequest, Piece};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;
use tower::ServiceExt;

pub const TINY: &str = "tiny";

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(name)
}

/// The tiny llama2 fixture served by the real engine (loaded once per test binary).
pub fn tiny_backend() -> Arc<LocalBackend> {
    static B: OnceLock<Arc<LocalBackend>> = OnceLock::new();
    B.get_or_init(|| {
        let b = LocalBackend::load(&fixture("llama2").join("model-f32.gguf"), None).unwrap();
        Arc::new(b.with_id(TINY))
    })
    .clone()
}

pub fn tiny_app(config: GatewayConfig) -> Router {
    plexus_gateway::app(AppState::new(tiny_backend(), config))
}

pub fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

pub async fn send(app: &Router, req: Request<Body>) -> Response<Body> {
    app.clone().oneshot(req).await.unwrap()
}

pub async fn text(res: Response<Body>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

pub async fn json(res: Response<Body>) -> Value {
    let t = text(res).await;
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
}

/// Checks the SSE framing (every event is `data: ...` followed by a blank line, the last is
/// `[DONE]`) and returns the JSON events.
pub fn sse_events(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "stream must end with [DONE]: {body}"
    );
    let mut events = Vec::new();
    for frame in body.split_terminator("\n\n") {
        let data = frame
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("frame without `data: `: {frame:?}"));
        assert!(!data.contains('\n'), "one line per event: {frame:?}");
        if data != "[DONE]" {
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    events
}

/// Asserts an OpenAI error body and returns it.
pub async fn expect_error(res: Response<Body>, status: u16, kind: &str) -> Value {
    assert_eq!(res.status().as_u16(), status);
    let v = json(res).await;
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    v
}

/// What the scripted backend does in `generate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// Emits "a", "b", "c" and stops.
    Abc,
    /// Emits "x " until `on_text` says stop (or 60 s pass).
    Endless,
    /// Waits for [`Scripted::release`], then behaves like `Abc`.
    Gated,
    Unavailable,
    Internal,
    /// Emits "a", then fails (an internal error carrying a secret).
    FailAfterA,
}

/// A backend that follows a script instead of running a model, and reports what happened.
pub struct Scripted {
    entry: ModelEntry,
    script: Script,
    /// Each generate call adds a permit when it starts...
    pub started: tokio::sync::Semaphore,
    /// ...and one here when `on_text` told it to stop.
    pub stopped: tokio::sync::Semaphore,
    gate: (Mutex<bool>, Condvar),
    pub with_models: AtomicBool,
}

impl Scripted {
    pub fn new(script: Script) -> Arc<Self> {
        let tiny = tiny_backend().entry().clone();
        Arc::new(Self {
            entry: ModelEntry {
                id: TINY.into(),
                ..tiny
            },
            script,
            started: tokio::sync::Semaphore::new(0),
            stopped: tokio::sync::Semaphore::new(0),
            gate: (Mutex::new(false), Condvar::new()),
            with_models: AtomicBool::new(true),
        })
    }

    /// The same script for a model without a chat template.
    pub fn without_template(script: Script) -> Arc<Self> {
        let mut s = Arc::into_inner(Self::new(script)).unwrap();
        s.entry.chat_template = None;
        Arc::new(s)
    }

    pub fn release(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }

    /// Waits (bounded) until `n` generations have started.
    pub async fn wait_started(&self, n: u32) {
        let p = tokio::time::timeout(Duration::from_secs(30), self.started.acquire_many(n))
            .await
            .expect("generations did not start")
            .unwrap();
        p.forget();
        self.started.add_permits(n as usize);
    }

    /// Waits (bounded) until a generation was told to stop.
    pub async fn wait_stopped(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.stopped.acquire())
            .await
            .expect("the generation was not stopped")
            .unwrap()
            .forget();
    }

    fn done(req: &GenerateRequest, text: String, n: usize, finish: FinishReason) -> Completion {
        Completion {
            tokens: vec![5; n],
            text,
            finish,
            logprobs: Vec::new(),
            prompt_tokens: req.prompt_tokens.len(),
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        }
    }
}

impl Backend for Scripted {
    fn models(&self) -> Vec<ModelEntry> {
        if self.with_models.load(Ordering::Acquire) {
            vec![self.entry.clone()]
        } else {
            Vec::new()
        }
    }

    fn generate(
        &self,
        _model_id: &str,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&Piece) -> Flow,
    ) -> Result<Completion, BackendError> {
        self.started.add_permits(1);
        match self.script {
            Script::Unavailable => {
                return Err(BackendError::Unavailable {
                    model: TINY.into(),
                    reason: "no chain covers layers 0..2".into(),
                })
            }
            Script::Internal => {
                return Err(BackendError::Internal(
                    "secret stage address 10.1.2.3".into(),
                ))
            }
            Script::FailAfterA => {
                on_text(&Piece::plain("a"));
                return Err(BackendError::Internal(
                    "secret stage address 10.1.2.3".into(),
                ));
            }
            Script::Gated => {
                let (lock, cv) = &self.gate;
                let open = lock.lock().unwrap();
                let (_open, timeout) = cv
                    .wait_timeout_while(open, Duration::from_secs(60), |open| !*open)
                    .unwrap();
                assert!(!timeout.timed_out(), "gate never opened");
            }
            Script::Endless => {
                let mut text = String::new();
                for _ in 0..60_000 {
                    text.push_str("x ");
                    if on_text(&Piece::plain("x ")) == Flow::Stop {
                        self.stopped.add_permits(1);
                        let n = text.len() / 2;
                        return Ok(Self::done(req, text, n, FinishReason::Cancelled));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                let n = text.len() / 2;
                return Ok(Self::done(req, text, n, FinishReason::Length));
            }
            Script::Abc => {}
        }
        let mut text = String::new();
        for p in ["a", "b", "c"] {
            text.push_str(p);
            if on_text(&Piece::plain(p)) == Flow::Stop {
                self.stopped.add_permits(1);
                return Ok(Self::done(req, text, 3, FinishReason::Cancelled));
            }
        }
        Ok(Self::done(req, text, 3, FinishReason::Stop))
    }

    fn render_metrics(&self, out: &mut String) {
        out.push_str("# TYPE scripted_calls gauge\nscripted_calls 1\n");
    }
}

pub fn scripted_app(backend: Arc<Scripted>, config: GatewayConfig) -> Router {
    plexus_gateway::app(AppState::new(backend, config))
}

/// A minimal chat request for the tiny model.
pub fn chat(extra: Value) -> Value {
    let mut v = serde_json::json!({
        "model": TINY,
        "messages": [{"role": "user", "content": "hello there"}],
        "temperature": 0,
        "max_tokens": 12,
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

/// The prompt length the gateway must report for `messages` on the tiny model.
pub fn chat_prompt_tokens(messages: &[(&str, &str)]) -> usize {
    let b = tiny_backend();
    let e = b.entry();
    let msgs: Vec<_> = messages
        .iter()
        .map(|(r, c)| plexus_model::chat::Message::new(*r, *c))
        .collect();
    let t: &ChatTemplate = e.chat_template.as_deref().unwrap();
    let text = t.render(&msgs, true).unwrap();
    e.tokenizer.encode(&text, true).unwrap().len()
}
