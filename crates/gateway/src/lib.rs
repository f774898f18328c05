//! Plexus gateway: the OpenAI-compatible HTTP API (with the Anthropic Messages, OpenAI
//! Responses and Ollama dialects beside it) in front of a [`backend::Backend`].
//!
//! ```text
//! HTTP ─> server::app (axum router, body limit, per-route metrics)
//!          ├─ api::chat / completions / responses / messages / ollama
//!          │     └─ api::guide (tools, formats) ─> api::generation ─> limits (slot | queue | 429)
//!          │                └─ spawn_blocking: Backend::generate
//!          │                      └─ text pieces ─> JSON, or a stream (sse::Encoder per dialect)
//!          ├─ api::models (/v1/models, /health)
//!          └─ /metrics (metrics + Backend::render_metrics)
//! ```
//!
//! Start with [`serve`] (a listener, a backend, a [`GatewayConfig`], a shutdown future), or
//! build [`app`] over an [`AppState`] to drive it without a socket.

pub mod accounts;
pub mod api;
pub mod auth;
pub mod backend;
pub mod config;
pub mod cors;
pub mod delivery;
pub mod echo;
pub mod error;
pub mod gbnf;
pub mod grammar;
pub mod limits;
pub mod live;
pub mod local;
pub mod metrics;
pub mod network;
pub mod payments;
pub mod server;
pub mod slashing;
pub mod sse;
pub mod state;
pub mod tab;

pub use backend::{Backend, BackendError, ModelEntry};
pub use config::GatewayConfig;
pub use error::ApiError;
pub use local::LocalBackend;
pub use server::{app, serve, serve_state};
pub use state::AppState;

// Dependencies kept for the network backend that lands next (plexus-node's client) and
// the core types it brings.
use tokio_stream as _;
#[cfg(test)]
use {http_body_util as _, plexus_testkit as _, tempfile as _, tower as _};
