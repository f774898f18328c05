//! Which request fields each route knows and what Plexus does with each, checked before a body
//! is parsed: a field Plexus does not implement is refused with a 400 naming it, unless its
//! value means "off" (null or the default), since then there is nothing to ignore; a field no
//! route knows is refused too, as OpenAI does. `docs/api-parameters.md` lists the same tables
//! (a test keeps them in step).

use crate::error::ApiError;
use serde_json::{Map, Value};

/// What Plexus does with one request field.
#[derive(Clone, Copy)]
pub enum Status {
    /// Implemented; its value is checked when the body is parsed.
    Supported,
    /// Not implemented: accepted only when `off` holds for its value.
    Unsupported { off: fn(&Value) -> bool },
}

/// One known field of a request body.
pub struct Field {
    pub name: &'static str,
    pub status: Status,
}

const fn yes(name: &'static str) -> Field {
    Field {
        name,
        status: Status::Supported,
    }
}

const fn no(name: &'static str, off: fn(&Value) -> bool) -> Field {
    Field {
        name,
        status: Status::Unsupported { off },
    }
}

fn null(v: &Value) -> bool {
    v.is_null()
}

fn null_or_false(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(false)
}

fn null_or_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn null_or_one(v: &Value) -> bool {
    v.is_null() || v.as_i64() == Some(1)
}

fn text_modality(v: &Value) -> bool {
    v.is_null() || v.as_array().is_some_and(|a| a == &[Value::from("text")])
}

fn default_tier(v: &Value) -> bool {
    v.is_null() || v == "auto" || v == "default"
}

fn tool_choice_none(v: &Value) -> bool {
    v.is_null() || v == "none"
}

/// `POST /v1/chat/completions`.
pub const CHAT: &[Field] = &[
    yes("model"),
    yes("messages"),
    yes("stream"),
    yes("stream_options"),
    yes("max_tokens"),
    yes("max_completion_tokens"),
    yes("temperature"),
    yes("top_p"),
    yes("seed"),
    yes("stop"),
    yes("n"),
    yes("frequency_penalty"),
    yes("presence_penalty"),
    yes("user"),
    yes("safety_identifier"),
    // Extensions llama-server and vLLM accept.
    yes("top_k"),
    yes("min_p"),
    yes("repetition_penalty"),
    yes("logprobs"),
    yes("top_logprobs"),
    yes("logit_bias"),
    yes("response_format"),
    yes("tools"),
    yes("tool_choice"),
    yes("parallel_tool_calls"),
    no("functions", null_or_empty),
    no("function_call", tool_choice_none),
    no("audio", null),
    no("modalities", text_modality),
    no("prediction", null),
    no("reasoning_effort", null),
    no("verbosity", null),
    no("web_search_options", null),
    no("metadata", null_or_empty),
    no("store", null_or_false),
    no("service_tier", default_tier),
    no("prompt_cache_key", null),
];

/// `POST /v1/completions`.
pub const COMPLETIONS: &[Field] = &[
    yes("model"),
    yes("prompt"),
    yes("stream"),
    yes("stream_options"),
    yes("max_tokens"),
    yes("temperature"),
    yes("top_p"),
    yes("seed"),
    yes("stop"),
    yes("n"),
    yes("frequency_penalty"),
    yes("presence_penalty"),
    yes("user"),
    yes("top_k"),
    yes("min_p"),
    yes("repetition_penalty"),
    yes("logprobs"),
    yes("logit_bias"),
    no("best_of", null_or_one),
    no("echo", null_or_false),
    no("suffix", null_or_empty),
];

/// Checks every field of `body` against `fields`: unknown and unimplemented fields are refused
/// with a 400 naming them.
pub fn check(body: &Map<String, Value>, fields: &[Field]) -> Result<(), ApiError> {
    for (name, value) in body {
        match fields.iter().find(|f| f.name == name) {
            None => {
                return Err(ApiError::invalid_param(
                    format!("Unrecognized request argument supplied: `{name}`"),
                    name.clone(),
                ))
            }
            Some(Field {
                status: Status::Unsupported { off },
                ..
            }) if !off(value) => {
                return Err(ApiError::invalid_param(
                    format!(
                        "`{name}` is not supported by this server (see docs/api-parameters.md); \
                         remove it or set it to null"
                    ),
                    name.clone(),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn unknown_and_unsupported_fields_are_named() {
        let e = check(&obj(json!({"model": "m", "bogus": 1})), CHAT).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "bogus");
        let e = check(&obj(json!({"echo": true})), COMPLETIONS).unwrap_err();
        assert_eq!(e.body()["error"]["param"], "echo");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn off_values_of_unsupported_fields_pass() {
        check(
            &obj(json!({
                "functions": [], "function_call": "none", "logprobs": false, "store": false,
                "modalities": ["text"], "service_tier": "auto", "metadata": null,
            })),
            CHAT,
        )
        .unwrap();
        for bad in [
            json!({"functions": [{"name": "f"}]}),
            json!({"modalities": ["text", "audio"]}),
            json!({"store": true}),
        ] {
            assert!(check(&obj(bad.clone()), CHAT).is_err(), "{bad}");
        }
    }

    /// Every field of both tables appears in docs/api-parameters.md, and the doc names no
    /// field the tables do not know.
    #[test]
    fn docs_list_every_field() {
        let doc = include_str!("../../../../docs/api-parameters.md");
        for (route, fields) in [
            ("/v1/chat/completions", CHAT),
            ("/v1/completions", COMPLETIONS),
        ] {
            let start = doc
                .find(&format!("## `POST {route}`"))
                .unwrap_or_else(|| panic!("no section for {route}"));
            let section = &doc[start..];
            let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
            let documented: Vec<&str> = section
                .lines()
                .filter_map(|l| l.strip_prefix("| `"))
                .filter_map(|l| l.split('`').next())
                .collect();
            for f in fields {
                assert!(
                    documented.contains(&f.name),
                    "{route}: `{}` is not documented",
                    f.name
                );
            }
            for d in &documented {
                assert!(
                    fields.iter().any(|f| f.name == *d),
                    "{route}: the doc lists `{d}`, the table does not"
                );
            }
        }
    }
}
