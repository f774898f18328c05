//! The OpenAI-compatible routes. Each handler parses its body with [`json::ApiJson`], checks
//! its fields against the route's table ([`fields`]), resolves
//! the shared options ([`params`]) and hands a [`generation::Job`] to [`generation::start`],
//! then answers with one JSON object or an SSE stream ([`crate::sse`]).
//!
//! - `POST /v1/chat/completions` ([`chat`]), `POST /v1/completions` ([`completions`]);
//! - `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` ([`models`]).

pub mod chat;
pub mod completions;
pub mod fields;
pub mod format;
pub mod generation;
pub mod json;
pub mod logprobs;
pub mod models;
pub mod params;
pub mod tools;

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now, for `created` fields.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random 64-bit value for ids and default seeds. Not for cryptography: std's per-process
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
