//! Checks the dialects with typed content share (Anthropic's content blocks in [`super::messages`],
//! the Responses API's input items in [`super::responses`], tool definitions in
//! [`super::tools`]): errors that name the field at fault by its path (`messages[0].content[1]
//! .text`), objects, and string fields.

use crate::error::ApiError;
use serde_json::{Map, Value};

/// A 400 naming `param` (a path into the body).
pub fn bad(message: impl Into<String>, param: impl Into<String>) -> ApiError {
    ApiError::invalid_param(message.into(), param.into())
}

/// The fields of `v` at `at`, which must be an object (`noun` says what it is, for the error).
pub fn object<'a>(v: &'a Value, noun: &str, at: &str) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| bad(format!("{noun} must be an object"), at))
}

/// The string field `k` of `o` (the object at `at`).
pub fn string<'a>(o: &'a Map<String, Value>, k: &str, at: &str) -> Result<&'a str, ApiError> {
    o.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("`{k}` must be a string"), format!("{at}.{k}")))
}
