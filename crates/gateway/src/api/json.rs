//! [`ApiJson`]: a JSON body extractor whose every rejection is an OpenAI-style [`ApiError`]
//! (axum's `Json` answers 415/422 in plain text). The content type is not checked: clients
//! such as `curl -d` send JSON as form data. [`parse`] turns a checked object into a typed
//! request, naming the field whose value has the wrong type.

use crate::error::ApiError;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

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
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::invalid(format!("the request body is not valid JSON: {e}"), None)
        })?;
        serde_path_to_error::deserialize(value)
            .map(ApiJson)
            .map_err(path_error)
    }
}

fn path_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if path == "." || path.is_empty() {
        ApiError::invalid(format!("invalid request: {inner}"), None)
    } else {
        ApiError::invalid_param(format!("invalid `{path}`: {inner}"), path)
    }
}

/// The body as a JSON object (anything else is a 400).
pub fn object(body: Value) -> Result<Map<String, Value>, ApiError> {
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        )),
    }
}

/// Parses a checked object into `T`; a field of the wrong type is named in the error.
pub fn parse<T: DeserializeOwned>(body: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(body)).map_err(path_error)
}
