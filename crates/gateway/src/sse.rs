//! Streaming responses. [`respond`] drains a [`Running`] generation into the body through an
//! [`Encoder`], the framing of one dialect (OpenAI's and the Responses API's server-sent
//! events, Anthropic's, Ollama's JSON lines). No comments or keep-alives.
//!
//! - OpenAI: every event is one `data: <json>\n\n` line, the last is `data: [DONE]`.
//!   [`Chunks`] says what the chunks of one endpoint look like (chat or text completion);
//!   [`response`] sends the opening chunk of each choice (if any), one chunk per text piece
//!   (with its choice `index`), a closing chunk per choice with its `finish_reason`, the usage
//!   chunk when asked for, then `[DONE]`. A failure after the stream started is sent as
//!   OpenAI's `{"error":{...}}` event, without `[DONE]`.
//!
//! Dropping the body (the client went away) drops the receiver, which stops the generation.

use crate::api::generation::{Event, Running};
use crate::error::ApiError;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::stream;
use plexus_model::generate::Completion;
use plexus_model::sampler::TokenLogprobs;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;

/// The chunk objects of one streaming endpoint.
pub trait Chunks: Send + 'static {
    /// The first chunk of a choice, before any text (chat's `{"role":"assistant"}` delta).
    fn opening(&self, choice: usize) -> Option<Value>;
    /// A chunk of new text with the log-probabilities of its tokens (empty unless asked for);
    /// `None` when the text only completes something sent later (a tool call's fixed layout).
    fn text(&mut self, choice: usize, text: &str, logprobs: &[TokenLogprobs]) -> Option<Value>;
    /// The last chunk of a choice, carrying `finish_reason`.
    fn closing(&self, choice: usize, finish_reason: &str) -> Value;
    /// The usage chunk (`choices: []`).
    fn usage(&self, usage: Value) -> Value;
}

/// The fields every chunk of one streamed response repeats.
pub struct Envelope {
    /// `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
    pub include_usage: bool,
}

impl Envelope {
    /// A chunk carrying `choices` (and `"usage": null` when the client asked for usage).
    pub fn chunk(&self, choices: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }
}

/// OpenAI's `usage` object (completion tokens summed over the choices).
pub fn usage(prompt_tokens: usize, choices: &[Completion]) -> Value {
    let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    })
}

/// What a streaming dialect makes of a running generation: whole frames, already framed
/// (`data: ...\n\n` for OpenAI, `event: ...\ndata: ...\n\n` for Anthropic and the Responses
/// API, one JSON line for Ollama).
pub trait Encoder: Send + 'static {
    /// The response's content type.
    fn content_type(&self) -> &'static str {
        "text/event-stream"
    }
    /// The frames sent before any text.
    fn start(&mut self, out: &mut VecDeque<String>);
    /// New text of one choice and the log-probabilities of its tokens.
    fn piece(
        &mut self,
        choice: usize,
        text: &str,
        logprobs: &[TokenLogprobs],
        out: &mut VecDeque<String>,
    );
    /// The end: every choice, and the prompt's length in tokens.
    fn done(&mut self, prompt_tokens: usize, choices: &[Completion], out: &mut VecDeque<String>);
    /// A failure after the stream started (the last frame).
    fn fail(&mut self, error: &ApiError, out: &mut VecDeque<String>);
}

/// OpenAI's framing of [`Chunks`].
struct OpenAi<C> {
    chunks: C,
    n: usize,
    include_usage: bool,
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

impl<C: Chunks> Encoder for OpenAi<C> {
    fn start(&mut self, out: &mut VecDeque<String>) {
        for i in 0..self.n {
            if let Some(v) = self.chunks.opening(i) {
                out.push_back(data(&v));
            }
        }
    }

    fn piece(
        &mut self,
        choice: usize,
        text: &str,
        logprobs: &[TokenLogprobs],
        out: &mut VecDeque<String>,
    ) {
        if let Some(chunk) = self.chunks.text(choice, text, logprobs) {
            out.push_back(data(&chunk));
        }
    }

    fn done(&mut self, prompt_tokens: usize, cs: &[Completion], out: &mut VecDeque<String>) {
        for (i, c) in cs.iter().enumerate() {
            out.push_back(data(&self.chunks.closing(i, c.finish.as_str())));
        }
        if self.include_usage {
            out.push_back(data(&self.chunks.usage(usage(prompt_tokens, cs))));
        }
        out.push_back("data: [DONE]\n\n".to_owned());
    }

    fn fail(&mut self, error: &ApiError, out: &mut VecDeque<String>) {
        out.push_back(data(&error.body()));
    }
}

struct State<E> {
    running: Running,
    encoder: E,
    queue: VecDeque<String>,
    done: bool,
}

impl<E: Encoder> State<E> {
    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Piece {
                choice,
                text,
                logprobs,
            }) => self
                .encoder
                .piece(choice, &text, &logprobs, &mut self.queue),
            Some(Event::Done(Ok(cs))) => {
                self.encoder
                    .done(self.running.prompt_tokens, &cs, &mut self.queue);
                self.done = true;
            }
            Some(Event::Done(Err(e))) => self.fail(e),
            None => self.fail(ApiError::Internal(
                "the generation task ended without a result".into(),
            )),
        }
    }

    fn fail(&mut self, e: ApiError) {
        if let ApiError::Internal(cause) = &e {
            tracing::error!(%cause, "stream failed");
        }
        self.encoder.fail(&e, &mut self.queue);
        self.done = true;
    }
}

/// The SSE response for a running generation in OpenAI's chunk format.
pub fn response<C: Chunks>(running: Running, chunks: C, n: usize, include_usage: bool) -> Response {
    respond(
        running,
        OpenAi {
            chunks,
            n,
            include_usage,
        },
    )
}

/// The streaming response for a running generation, framed by `encoder`.
pub fn respond<E: Encoder>(running: Running, mut encoder: E) -> Response {
    let mut queue = VecDeque::new();
    encoder.start(&mut queue);
    let content_type = encoder.content_type();
    let state = State {
        running,
        encoder,
        queue,
        done: false,
    };
    let body = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(frame) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(Bytes::from(frame)), st));
            }
            if st.done {
                return None;
            }
            let event = st.running.events.recv().await;
            st.on_event(event);
        }
    });
    let mut res = Body::from_stream(body).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Ask reverse proxies (nginx) not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}
