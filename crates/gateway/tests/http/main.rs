#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! HTTP handler tests without a socket (`app(state).oneshot(request)`): the OpenAI routes on a
//! tiny random-weight model (tests/fixtures/tiny/llama2, ChatML template, context 256), and a
//! scripted backend for admission, cancellation, backend failures and shutdown.

mod accounts;
mod api;
mod batching;
mod dialects;
mod errors;
mod features;
mod limits;
mod support;
