//! [`ApiError`]: every way a request fails, mapped to a status and OpenAI's error body
//! `{"error":{"message","type","param","code"}}`. Internal causes are logged, never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::borrow::Cow;
use std::time::Duration;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something unsupported (400).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<Cow<'static, str>>,
    },
    /// The prompt, or the prompt plus the requested completion, does not fit the context (400).
    #[error("{message}")]
    ContextLengthExceeded {
        message: String,
        param: &'static str,
    },
    /// No model with this id (404).
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// A key is required and was missing or wrong (401).
    #[error("{0}")]
    Unauthorized(String),
    /// No route at this path (404).
    #[error("invalid URL ({method} {path})")]
    UnknownRoute { method: String, path: String },
    /// The route exists, the method does not (405).
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The body is over the configured limit (413).
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// No API key, or one the ledger does not know (401).
    #[error("{0}")]
    InvalidApiKey(String),
    /// The account cannot cover the request's maximum cost (402).
    #[error("{0}")]
    InsufficientQuota(String),
    /// Every generation slot and queue place is taken (429).
    #[error("the server is busy: too many requests are running or waiting; retry later")]
    Overloaded { retry_after: Duration },
    /// The engine has no room for this request (KV memory budget, engine queue) (429,
    /// `server_overloaded`). The message is sent.
    #[error("{0}")]
    ServerOverloaded(String),
    /// The backend cannot serve now, or the server is shutting down (503). The message is sent.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (500). The cause is logged; clients get a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: param.map(Cow::Borrowed),
        }
    }

    /// A 400 naming a parameter known only at run time (`messages[2].role`).
    pub fn invalid_param(message: impl Into<String>, param: String) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(Cow::Owned(param)),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } | Self::ContextLengthExceeded { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::UnknownRoute { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            Self::InsufficientQuota(_) => StatusCode::PAYMENT_REQUIRED,
            Self::Overloaded { .. } | Self::ServerOverloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error` object (also sent inside a stream that fails after it started).
    pub fn body(&self) -> serde_json::Value {
        let (kind, param, code) = match self {
            Self::InvalidRequest { param, .. } => ("invalid_request_error", param.as_deref(), None),
            Self::ContextLengthExceeded { param, .. } => (
                "invalid_request_error",
                Some(*param),
                Some("context_length_exceeded"),
            ),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            Self::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::UnknownRoute { .. } => ("invalid_request_error", None, Some("unknown_url")),
            Self::MethodNotAllowed { .. } => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            Self::PayloadTooLarge { .. } => {
                ("invalid_request_error", None, Some("request_too_large"))
            }
            Self::InvalidApiKey(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::InsufficientQuota(_) => ("insufficient_quota", None, Some("insufficient_quota")),
            Self::Overloaded { .. } => ("rate_limit_error", None, Some("rate_limit_exceeded")),
            Self::ServerOverloaded(_) => ("server_error", None, Some("server_overloaded")),
            Self::Unavailable(_) => (
                "service_unavailable_error",
                None,
                Some("service_unavailable"),
            ),
            Self::Internal(_) => ("server_error", None, None),
        };
        let message = match self {
            Self::Internal(_) => {
                "The server had an error while processing your request.".to_owned()
            }
            Self::ModelNotFound(m) => {
                format!("The model `{m}` does not exist or you do not have access to it.")
            }
            other => other.to_string(),
        };
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(cause) => tracing::error!(%cause, "request failed"),
            other => tracing::debug!(error = %other, "request rejected"),
        }
        let mut res = (self.status(), Json(self.body())).into_response();
        let retry = match &self {
            Self::Overloaded { retry_after } => Some(*retry_after),
            Self::ServerOverloaded(_) => Some(Duration::from_secs(1)),
            _ => None,
        };
        if let Some(retry_after) = retry {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        res
    }
}
