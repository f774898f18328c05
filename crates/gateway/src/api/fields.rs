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
    yes("grammar"),
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
    yes("response_format"),
    yes("grammar"),
    no("best_of", null_or_one),
    no("echo", null_or_false),
    no("suffix", null_or_empty),
];

/// `POST /v1/messages` (Anthropic).
pub const MESSAGES: &[Field] = &[
    yes("model"),
    yes("messages"),
    yes("max_tokens"),
    yes("system"),
    yes("stop_sequences"),
    yes("stream"),
    yes("temperature"),
    yes("top_p"),
    yes("top_k"),
    yes("tools"),
    yes("tool_choice"),
    yes("metadata"),
    no("thinking", thinking_off),
    no("service_tier", anthropic_tier),
    no("container", null),
    no("mcp_servers", null_or_empty),
    no("context_management", null),
];

/// `POST /v1/responses` (stateless: nothing is stored).
pub const RESPONSES: &[Field] = &[
    yes("model"),
    yes("input"),
    yes("instructions"),
    yes("max_output_tokens"),
    yes("temperature"),
    yes("top_p"),
    yes("stream"),
    yes("tools"),
    yes("tool_choice"),
    yes("parallel_tool_calls"),
    yes("text"),
    yes("user"),
    yes("safety_identifier"),
    yes("metadata"),
    no("store", null_or_false),
    no("previous_response_id", null),
    no("conversation", null),
    no("include", null_or_empty),
    no("top_logprobs", null_or_zero),
    no("reasoning", null),
    no("truncation", truncation_off),
    no("background", null_or_false),
    no("service_tier", default_tier),
    no("max_tool_calls", null),
    no("prompt", null),
    no("prompt_cache_key", null),
    no("stream_options", null),
];

/// `POST /api/chat` (Ollama).
pub const OLLAMA_CHAT: &[Field] = &[
    yes("model"),
    yes("messages"),
    yes("stream"),
    yes("options"),
    yes("format"),
    yes("tools"),
    no("keep_alive", null),
    no("think", null_or_false),
    no("logprobs", null_or_false),
    no("top_logprobs", null_or_zero),
];

/// `POST /api/generate` (Ollama).
pub const OLLAMA_GENERATE: &[Field] = &[
    yes("model"),
    yes("prompt"),
    yes("system"),
    yes("raw"),
    yes("stream"),
    yes("options"),
    yes("format"),
    no("suffix", null_or_empty),
    no("template", null_or_empty),
    no("context", null_or_empty),
    no("images", null_or_empty),
    no("keep_alive", null),
    no("think", null_or_false),
    no("logprobs", null_or_false),
    no("top_logprobs", null_or_zero),
];

/// Ollama's `options` object.
pub const OLLAMA_OPTIONS: &[Field] = &[
    yes("temperature"),
    yes("top_p"),
    yes("top_k"),
    yes("min_p"),
    yes("seed"),
    yes("num_predict"),
    yes("stop"),
    yes("repeat_penalty"),
    yes("presence_penalty"),
    yes("frequency_penalty"),
    no("repeat_last_n", last_64),
    no("num_ctx", null),
    no("num_keep", null),
    no("typical_p", null_or_one_f),
    no("tfs_z", null_or_one_f),
    no("mirostat", null_or_zero),
    no("mirostat_tau", null),
    no("mirostat_eta", null),
    no("penalize_newline", null),
    no("numa", null_or_false),
    no("num_batch", null),
    no("num_gpu", null),
    no("main_gpu", null),
    no("use_mmap", null),
    no("num_thread", null),
];

fn last_64(v: &Value) -> bool {
    v.is_null() || v.as_u64() == Some(super::params::PENALTY_LAST_N as u64)
}

fn null_or_one_f(v: &Value) -> bool {
    v.is_null() || v.as_f64() == Some(1.0)
}

fn null_or_zero(v: &Value) -> bool {
    v.is_null() || v.as_i64() == Some(0)
}

fn truncation_off(v: &Value) -> bool {
    v.is_null() || v == "disabled"
}

/// `POST /v1/messages/count_tokens` (Anthropic).
pub const COUNT_TOKENS: &[Field] = &[
    yes("model"),
    yes("messages"),
    yes("system"),
    yes("tools"),
    yes("tool_choice"),
    no("thinking", thinking_off),
    no("mcp_servers", null_or_empty),
    no("context_management", null),
];

fn thinking_off(v: &Value) -> bool {
    v.is_null() || v.get("type").is_some_and(|t| t == "disabled")
}

fn anthropic_tier(v: &Value) -> bool {
    v.is_null() || v == "auto" || v == "standard_only"
}

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

    /// Every field of every table appears in docs/api-parameters.md, and the doc names no
    /// field the tables do not know.
    #[test]
    fn docs_list_every_field() {
        let doc = include_str!("../../../../docs/api-parameters.md");
        for (route, fields) in [
            ("POST /v1/chat/completions", CHAT),
            ("POST /v1/completions", COMPLETIONS),
            ("POST /v1/messages", MESSAGES),
            ("POST /v1/messages/count_tokens", COUNT_TOKENS),
            ("POST /v1/responses", RESPONSES),
            ("POST /api/chat", OLLAMA_CHAT),
            ("POST /api/generate", OLLAMA_GENERATE),
            ("options", OLLAMA_OPTIONS),
        ] {
            let start = doc
                .find(&format!("## `{route}`"))
                .unwrap_or_else(|| panic!("no section for {route}"));
            let section = &doc[start..];
            let section = &section[..section[3..].find("\n#").map_or(section.len(), |i| i + 3)];
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
