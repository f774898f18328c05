//! [`ApiJson`]: a JSON body extractor whose every rejection is an OpenAI-style [`ApiError`]
//! (axum's `Json` answers 415/422 in plain text). The content type is not checked: clients
//! such as `curl -d` send JSON as form data.

use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// A request body parsed as JSON into `T`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.config().max_body_bytes,
                }
            } else {
                ApiError::invalid(format!("cannot read the request body: {r}"), None)
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid(
                "the request body is empty; send a JSON object",
                None,
            ));
        }
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            let what = if e.is_data() {
                "invalid request"
            } else {
                "the request body is not valid JSON"
            };
            ApiError::invalid(format!("{what}: {e}"), None)
        })
    }
}
