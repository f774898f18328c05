//! `response_format` (structured outputs): `{"type": "text"}` (the default),
//! `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema", "json_schema":
//! {"name", "description", "schema", "strict"}}`. JSON modes become a grammar that masks the
//! logits at every step ([`crate::grammar`]), so the output parses and validates unless it is
//! cut short by `max_tokens` or a stop string (`finish_reason: "length"` / `"stop"` before
//! the JSON closes). `strict: false` is enforced exactly like `strict: true`.
//!
//! [`output`] also reads llama-server's `grammar` (a GBNF grammar, [`crate::gbnf`]) on chat and
//! completions: the same masking, with the grammar the client wrote.

use super::generation::GrammarRequest;
use crate::error::ApiError;
use crate::grammar::with_json_options;
use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

const PARAM: &str = "response_format";

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message.into(), Some(PARAM))
}

/// Whether `name` is a name OpenAI accepts for a schema or a function: 1 to 64 of `a-z`,
/// `A-Z`, `0-9`, `_` and `-`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The grammar `response_format` asks for (`None`: free text).
pub fn parse(v: Option<&Value>) -> Result<Option<GrammarRequest>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let o = v.as_object().ok_or_else(|| {
        bad("`response_format` must be an object such as {\"type\": \"json_object\"}")
    })?;
    let kind = o.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"")
    })?;
    let allowed: &[&str] = match kind {
        "text" | "json_object" => &["type"],
        "json_schema" => &["type", "json_schema"],
        other => {
            return Err(bad(format!(
                "unsupported `response_format.type` {other:?}: use \"text\", \"json_object\" \
                 or \"json_schema\""
            )))
        }
    };
    if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown field `response_format.{k}` for type {kind:?}"
        )));
    }
    let schema = match kind {
        "text" => return Ok(None),
        "json_object" => json!({"type": "object"}),
        _ => json_schema(o.get("json_schema"))?,
    };
    Ok(Some(GrammarRequest {
        grammar: TopLevelGrammar::from_json_schema(with_json_options(schema)),
        param: PARAM,
    }))
}

/// The output constraint of chat and completions: `response_format` or llama-server's
/// `grammar`, not both.
pub fn output(body: &serde_json::Map<String, Value>) -> Result<Option<GrammarRequest>, ApiError> {
    let format = parse(body.get("response_format"))?;
    match (format, gbnf(body.get("grammar"))?) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "`grammar` and `response_format` cannot be combined: give one",
            Some("grammar"),
        )),
        (f, g) => Ok(f.or(g)),
    }
}

/// llama-server's `grammar`: GBNF text (`None` when absent, null or empty, as there).
fn gbnf(v: Option<&Value>) -> Result<Option<GrammarRequest>, ApiError> {
    let bad = |m: String| ApiError::invalid(m, Some("grammar"));
    let text = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(bad(format!(
                "`grammar` must be a GBNF grammar as a string, got {other}"
            )))
        }
    };
    let lark = crate::gbnf::to_lark(text).map_err(|e| bad(format!("invalid `grammar`: {e}")))?;
    Ok(Some(GrammarRequest {
        grammar: TopLevelGrammar::from_lark(lark),
        param: "grammar",
    }))
}

/// The schema of `{"type": "json_schema", "json_schema": {...}}`.
fn json_schema(v: Option<&Value>) -> Result<Value, ApiError> {
    let o = v.and_then(Value::as_object).ok_or_else(|| {
        bad("`response_format.json_schema` must be an object with `name` and `schema`")
    })?;
    if let Some(k) = o
        .keys()
        .find(|k| !["name", "description", "schema", "strict"].contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown field `response_format.json_schema.{k}`"
        )));
    }
    match o.get("name").and_then(Value::as_str) {
        Some(n) if valid_name(n) => {}
        _ => {
            return Err(bad(
                "`response_format.json_schema.name` must be 1 to 64 letters, digits, `_` or `-`",
            ))
        }
    }
    if let Some(d) = o
        .get("description")
        .filter(|d| !d.is_null() && !d.is_string())
    {
        return Err(bad(format!(
            "`response_format.json_schema.description` must be a string, got {d}"
        )));
    }
    if let Some(s) = o.get("strict").filter(|s| !s.is_null() && !s.is_boolean()) {
        return Err(bad(format!(
            "`response_format.json_schema.strict` must be a boolean, got {s}"
        )));
    }
    match o.get("schema") {
        None | Some(Value::Null) => Ok(json!({})),
        Some(s @ (Value::Object(_) | Value::Bool(_))) => Ok(s.clone()),
        Some(other) => Err(bad(format!(
            "`response_format.json_schema.schema` must be a JSON schema object, got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn param(v: Value) -> String {
        let e = parse(Some(&v))
            .err()
            .unwrap_or_else(|| panic!("{v} accepted"));
        assert_eq!(e.status(), 400);
        e.body()["error"]["param"].as_str().unwrap().to_owned()
    }

    #[test]
    fn text_is_free_and_json_modes_are_grammars() {
        assert!(parse(None).unwrap().is_none());
        assert!(parse(Some(&json!({"type": "text"}))).unwrap().is_none());
        assert!(parse(Some(&json!({"type": "json_object"})))
            .unwrap()
            .is_some());
        let s = json!({"type": "json_schema", "json_schema": {"name": "a_b-1", "strict": true,
            "schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}});
        assert!(parse(Some(&s)).unwrap().is_some());
    }

    fn body(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn grammar_is_gbnf_and_excludes_response_format() {
        assert!(output(&body(json!({"grammar": "root ::= \"a\""})))
            .unwrap()
            .is_some_and(|g| g.param == "grammar"));
        assert!(output(&body(json!({"grammar": ""}))).unwrap().is_none());
        assert!(output(&body(json!({"grammar": null}))).unwrap().is_none());
        for bad in [
            json!({"grammar": "root ::= \"a"}),
            json!({"grammar": 7}),
            json!({"grammar": "start: \"a\""}),
            json!({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}),
        ] {
            let e = output(&body(bad.clone()))
                .err()
                .unwrap_or_else(|| panic!("{bad}"));
            assert_eq!(e.status(), 400);
            assert_eq!(e.body()["error"]["param"], "grammar", "{bad}");
        }
    }

    #[test]
    fn bad_values_name_response_format() {
        for bad in [
            json!({"type": "sound"}),
            json!("json_object"),
            json!({}),
            json!({"type": "json_object", "schema": {}}),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}),
            json!({"type": "json_schema", "json_schema": {"name": "n", "schema": 3}}),
            json!({"type": "json_schema", "json_schema": {"name": "n", "strict": "yes"}}),
            json!({"type": "json_schema", "json_schema": {"name": "n", "extra": 1}}),
        ] {
            assert_eq!(param(bad), "response_format");
        }
    }
}
