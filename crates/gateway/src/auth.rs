//! The static API key (`--api-key`, like llama-server's and vLLM's): when set, every route but
//! `/health` needs `Authorization: Bearer KEY` (what OpenAI clients send) or `x-api-key: KEY`;
//! anything else gets 401 in the error format of the route's dialect. A layer of its own, so per-account keys can
//! sit beside it.

use crate::error::{ApiError, Dialect};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

/// Routes that answer without a key (load balancers probe them).
const OPEN: &[&str] = &["/health"];

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The key a request presents, if any.
fn presented(req: &Request) -> Option<&[u8]> {
    let h = req.headers();
    if let Some(v) = h.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        return Some(v.strip_prefix(b"Bearer ").unwrap_or(v));
    }
    h.get("x-api-key").map(|v| v.as_bytes())
}

/// The middleware: passes requests with the configured key (or when none is configured).
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.config().api_key.as_deref() else {
        return next.run(req).await;
    };
    if OPEN.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let dialect = Dialect::of_path(req.uri().path());
    match presented(&req) {
        Some(k) if same(k, key.as_bytes()) => next.run(req).await,
        Some(_) => {
            ApiError::Unauthorized("Incorrect API key provided.".into()).response_in(dialect)
        }
        None => ApiError::Unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY` or \
             `x-api-key: KEY`."
                .into(),
        )
        .response_in(dialect),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_keys() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }
}
