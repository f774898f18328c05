//! [`ApiError`]: every way a request fails, mapped to a status and OpenAI's error body
//! `{"error":{"message","type","param","code"}}`, or another [`Dialect`]'s shape
//! (Anthropic, Ollama). Internal causes are logged, never sent.

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

    /// The same error naming `f(param)` instead (a dialect's path for a field the shared code
    /// names in OpenAI's terms).
    pub fn map_param(self, f: impl Fn(&str) -> String) -> Self {
        match self {
            Self::InvalidRequest {
                message,
                param: Some(p),
            } => Self::InvalidRequest {
                message,
                param: Some(Cow::Owned(f(&p))),
            },
            other => other,
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

/// The API dialect a route speaks: it decides the shape of error bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error":{"message","type","param","code"}}`.
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`.
    Anthropic,
    /// `{"error":"message"}`.
    Ollama,
}

impl Dialect {
    /// The dialect of a request path (for errors raised before a handler runs: auth, unknown
    /// routes, wrong methods).
    pub fn of_path(path: &str) -> Self {
        if path.starts_with("/v1/messages") {
            Self::Anthropic
        } else if path.starts_with("/api/") {
            Self::Ollama
        } else {
            Self::OpenAi
        }
    }
}

impl ApiError {
    /// The error body in `dialect`'s shape. Anthropic's and Ollama's have no `param` field, so
    /// the message starts with the parameter it names (as Anthropic's own errors do).
    pub fn body_in(&self, dialect: Dialect) -> serde_json::Value {
        let openai = self.body();
        if dialect == Dialect::OpenAi {
            return openai;
        }
        let error = &openai["error"];
        let text = error["message"].as_str().unwrap_or_default();
        let message = match error["param"].as_str() {
            Some(p) if !text.contains(p) => format!("{p}: {text}"),
            _ => text.to_owned(),
        };
        if dialect == Dialect::Ollama {
            return json!({ "error": message });
        }
        let kind = match self {
            Self::InvalidRequest { .. }
            | Self::ContextLengthExceeded { .. }
            | Self::MethodNotAllowed { .. } => "invalid_request_error",
            Self::ModelNotFound(_) | Self::UnknownRoute { .. } => "not_found_error",
            Self::Unauthorized(_) | Self::InvalidApiKey(_) => "authentication_error",
            Self::PayloadTooLarge { .. } => "request_too_large",
            Self::InsufficientQuota(_) => "billing_error",
            Self::Overloaded { .. } => "rate_limit_error",
            Self::ServerOverloaded(_) | Self::Unavailable(_) => "overloaded_error",
            Self::Internal(_) => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": message}})
    }

    /// The response in `dialect`'s shape (with `Retry-After` when the server is busy).
    pub fn response_in(self, dialect: Dialect) -> Response {
        match &self {
            Self::Internal(cause) => tracing::error!(%cause, "request failed"),
            other => tracing::debug!(error = %other, "request rejected"),
        }
        let mut res = (self.status(), Json(self.body_in(dialect))).into_response();
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response_in(Dialect::OpenAi)
    }
}

/// An [`ApiError`] answered in Anthropic's shape (the return type of its handlers).
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        self.0.response_in(Dialect::Anthropic)
    }
}

/// An [`ApiError`] answered in Ollama's shape (the return type of its handlers).
#[derive(Debug)]
pub struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        self.0.response_in(Dialect::Ollama)
    }
}
