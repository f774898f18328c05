//! Server-sent events for streaming responses: every event is one `data: <json>\n\n` line, the
//! last is `data: [DONE]`. No comments or keep-alives, so every line a client sees is data.
//!
//! - [`Chunks`] says what the chunks of one endpoint look like (chat or text completion);
//! - [`response`] drains a [`Running`] generation into the body: the opening chunk of each
//!   choice (if any), one chunk per text piece (with its choice `index`), a closing chunk per
//!   choice with its `finish_reason`, the usage chunk when asked for, then `[DONE]`. A failure after the stream started is sent as OpenAI's
//!   `{"error":{...}}` event, without `[DONE]`.
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

struct State<C> {
    running: Running,
    chunks: C,
    include_usage: bool,
    queue: VecDeque<String>,
    done: bool,
}

impl<C: Chunks> State<C> {
    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Piece {
                choice,
                text,
                logprobs,
            }) => {
                if let Some(chunk) = self.chunks.text(choice, &text, &logprobs) {
                    self.queue.push_back(chunk.to_string());
                }
            }
            Some(Event::Done(Ok(cs))) => {
                for (i, c) in cs.iter().enumerate() {
                    let chunk = self.chunks.closing(i, c.finish.as_str());
                    self.queue.push_back(chunk.to_string());
                }
                if self.include_usage {
                    let u = usage(self.running.prompt_tokens, &cs);
                    self.queue.push_back(self.chunks.usage(u).to_string());
                }
                self.queue.push_back("[DONE]".to_owned());
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
        self.queue.push_back(e.body().to_string());
        self.done = true;
    }
}

/// The SSE response for a running generation.
pub fn response<C: Chunks>(running: Running, chunks: C, n: usize, include_usage: bool) -> Response {
    let queue = (0..n)
        .filter_map(|i| chunks.opening(i))
        .map(|v| v.to_string())
        .collect();
    let state = State {
        running,
        chunks,
        include_usage,
        queue,
        done: false,
    };
    let body = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.queue.pop_front() {
                let frame = Bytes::from(format!("data: {data}\n\n"));
                return Some((Ok::<_, Infallible>(frame), st));
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
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Ask reverse proxies (nginx) not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}
