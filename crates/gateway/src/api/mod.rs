//! The API routes of every dialect. Each handler parses its body with [`json::ApiJson`], checks
//! its fields against the route's table ([`fields`]), turns its tools and output format into
//! a [`guide::Guide`], resolves the shared options ([`params`]) and hands a
//! [`generation::Job`] to [`generation::start`], then answers with one JSON object or a stream
//! in its dialect's framing ([`crate::sse`]).
//!
//! - OpenAI: `POST /v1/chat/completions` ([`chat`]), `POST /v1/completions` ([`completions`]);
//!   `POST /v1/responses` ([`responses`]);
//! - Anthropic: `POST /v1/messages` ([`messages`]);
//! - Ollama: `POST /api/chat`, `POST /api/generate`, `GET /api/tags`, `POST /api/show`
//!   ([`ollama`]);
//! - `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` ([`models`]).

pub mod chat;
pub mod completions;
pub mod content;
pub mod fields;
pub mod format;
pub mod generation;
pub mod guide;
pub mod json;
pub mod logprobs;
pub mod messages;
pub mod models;
pub mod ollama;
pub mod params;
pub mod responses;
pub mod tools;

use plexus_verify::seed::RequestSeal;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now, for `created` fields.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh [`RequestSeal`] for a request: its id and the secret behind its seed commitment,
/// from system randomness (the seed of a request without `seed` must be unpredictable to the
/// client and the nodes until it is revealed).
pub(crate) fn seal() -> Result<RequestSeal, crate::error::ApiError> {
    let mut bytes = [0u8; 64];
    getrandom::fill(&mut bytes)
        .map_err(|e| crate::error::ApiError::Internal(format!("system randomness: {e}")))?;
    let (mut request, mut secret) = ([0u8; 32], [0u8; 32]);
    request.copy_from_slice(&bytes[..32]);
    secret.copy_from_slice(&bytes[32..]);
    Ok(RequestSeal::new(request, secret))
}

/// A random 64-bit value for ids. Not for cryptography: std's per-process
/// random hash keys mixed with a counter and the clock.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A fresh response id such as `chatcmpl-5f0c...`.
pub(crate) fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:08x}", random_u64(), random_u64() as u32)
}
