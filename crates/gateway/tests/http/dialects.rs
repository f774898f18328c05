//! The Anthropic, Responses and Ollama dialects on the tiny model: each greedy answer equals
//! the chat completion's (one engine path), streams join to it, errors have the dialect's
//! shape and name the parameter; `--alias` names; `response_format` on `/v1/completions`.
//! Tool calls need a longer context than the tiny model's 256 positions (the tool prompt
//! alone is longer): tests/dialects_client.py checks them on the real model.

use crate::support::*;
use axum::body::Body;
use plexus_gateway::GatewayConfig;
use serde_json::{json, Value};

/// The greedy chat completion of "hello there" (12 tokens): text, prompt and output tokens.
async fn reference() -> (String, u64, u64) {
    let app = tiny_app(GatewayConfig::new());
    let v = json(send(&app, post("/v1/chat/completions", &chat(json!({})))).await).await;
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

fn message(extra: Value) -> Value {
    let mut v = json!({
        "model": TINY,
        "max_tokens": 12,
        "temperature": 0,
        "messages": [{"role": "user", "content": "hello there"}],
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

/// `event: NAME\ndata: JSON` frames as (name, data), checking that each names its type.
fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split_terminator("\n\n")
        .map(|frame| {
            let (head, data) = frame.split_once('\n').unwrap();
            let name = head.strip_prefix("event: ").unwrap().to_owned();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name.as_str(), "{frame}");
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn anthropic_message_equals_the_chat_completion() {
    let (text, prompt, output) = reference().await;
    let app = tiny_app(GatewayConfig::new());
    let res = send(&app, post("/v1/messages", &message(json!({})))).await;
    assert_eq!(res.status(), 200);
    let v = json(res).await;
    assert_eq!(v["type"], "message");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["content"], json!([{"type": "text", "text": text}]));
    assert_eq!(v["usage"]["input_tokens"], prompt);
    assert_eq!(v["usage"]["output_tokens"], output);
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["stop_sequence"], Value::Null);
    let count = json!({"model": TINY, "messages": [{"role": "user", "content": "hello there"}]});
    let c = json(send(&app, post("/v1/messages/count_tokens", &count)).await).await;
    assert_eq!(c, json!({"input_tokens": prompt}));

    let res = send(
        &app,
        post("/v1/messages", &message(json!({"stream": true}))),
    )
    .await;
    assert_eq!(res.status(), 200);
    let events = named_events(&crate::support::text(res).await);
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names[..2], ["message_start", "content_block_start"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let streamed: String = events
        .iter()
        .filter(|e| e.0 == "content_block_delta")
        .map(|e| e.1["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], prompt);
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], output);

    // A stop sequence from the middle of the text ends it there and is reported.
    let stop: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(3)
        .collect();
    let v = json(
        send(
            &app,
            post("/v1/messages", &message(json!({"stop_sequences": [stop]}))),
        )
        .await,
    )
    .await;
    assert_eq!(v["stop_reason"], "stop_sequence", "{v}");
    assert_eq!(v["stop_sequence"], stop.as_str());
    assert_eq!(v["content"][0]["text"], text[..text.find(&stop).unwrap()]);
}

/// Asserts Anthropic's error body and that its message names `param`.
async fn anthropic_error(res: axum::http::Response<Body>, status: u16, kind: &str, param: &str) {
    assert_eq!(res.status().as_u16(), status);
    let v = json(res).await;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(param),
        "{param}: {v}"
    );
}

#[tokio::test]
async fn anthropic_refusals_have_anthropics_shape() {
    let app = tiny_app(GatewayConfig::new());
    let mut no_max = message(json!({}));
    no_max.as_object_mut().unwrap().remove("max_tokens");
    for (body, param) in [
        (no_max, "max_tokens"),
        (message(json!({"temperature": 1.5})), "temperature"),
        (
            message(json!({"frequency_penalty": 1})),
            "frequency_penalty",
        ),
        (
            message(json!({"thinking": {"type": "enabled", "budget_tokens": 100}})),
            "thinking",
        ),
        (
            message(json!({"messages": [{"role": "user", "content": [
                {"type": "image", "source": {}}]}]})),
            "messages[0].content[0].type",
        ),
        (
            message(
                json!({"tools": [{"name": "f", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "tool", "name": "g"}}),
            ),
            "tool_choice",
        ),
    ] {
        let res = send(&app, post("/v1/messages", &body)).await;
        anthropic_error(res, 400, "invalid_request_error", param).await;
    }
    let res = send(
        &app,
        post("/v1/messages", &message(json!({"model": "nope"}))),
    )
    .await;
    anthropic_error(res, 404, "not_found_error", "nope").await;
    let res = send(&app, post("/v1/messages", &json!([1]))).await;
    anthropic_error(res, 400, "invalid_request_error", "JSON object").await;
    let res = send(&app, post("/v1/messages/batches", &json!({}))).await;
    anthropic_error(res, 404, "not_found_error", "/v1/messages/batches").await;

    // The static key: Anthropic's clients send it as `x-api-key`.
    let app = tiny_app(GatewayConfig::new().with_api_key(Some("k".into())));
    let res = send(&app, post("/v1/messages", &message(json!({})))).await;
    anthropic_error(res, 401, "authentication_error", "API key").await;
    let mut req = post("/v1/messages", &message(json!({"max_tokens": 2})));
    req.headers_mut().insert("x-api-key", "k".parse().unwrap());
    assert_eq!(send(&app, req).await.status(), 200);
}

fn response(extra: Value) -> Value {
    let mut v = json!({"model": TINY, "input": "hello there", "max_output_tokens": 12,
        "temperature": 0});
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

#[tokio::test]
async fn responses_equal_the_chat_completion() {
    let (text, prompt, output) = reference().await;
    let app = tiny_app(GatewayConfig::new());
    let v = json(send(&app, post("/v1/responses", &response(json!({})))).await).await;
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "incomplete", "{v}");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["output"][0]["content"][0]["text"], text.as_str());
    assert_eq!(v["usage"]["input_tokens"], prompt);
    assert_eq!(v["usage"]["output_tokens"], output);
    assert_eq!(v["store"], false);

    let res = send(&app, post("/responses", &response(json!({"stream": true})))).await;
    let events = named_events(&crate::support::text(res).await);
    let streamed: String = events
        .iter()
        .filter(|e| e.0 == "response.output_text.delta")
        .map(|e| e.1["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(events.last().unwrap().0, "response.incomplete");
    assert_eq!(
        events.last().unwrap().1["response"]["output"][0]["content"][0]["text"],
        text.as_str()
    );

    for (extra, param) in [
        (
            json!({"previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"store": true}), "store"),
        (json!({"max_output_tokens": 0}), "max_output_tokens"),
        (
            json!({"text": {"format": {"type": "sound"}}}),
            "text.format",
        ),
        (json!({"input": [{"type": "reasoning"}]}), "input[0].type"),
    ] {
        let res = send(&app, post("/v1/responses", &response(extra))).await;
        let v = expect_error(res, 400, "invalid_request_error").await;
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

#[tokio::test]
async fn ollama_chat_generate_and_tags() {
    let (text, prompt, output) = reference().await;
    let app = tiny_app(GatewayConfig::new());
    let greedy = json!({"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0});
    let body = json!({"model": TINY, "messages": [{"role": "user", "content": "hello there"}],
        "options": greedy, "stream": false});
    let v = json(send(&app, post("/api/chat", &body)).await).await;
    assert_eq!(v["message"]["content"], text.as_str(), "{v}");
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["prompt_eval_count"], prompt);
    assert_eq!(v["eval_count"], output);

    // Streamed by default: JSON lines, the last one `done`.
    let mut body = body;
    body.as_object_mut().unwrap().remove("stream");
    let res = send(&app, post("/api/chat", &body)).await;
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let lines: Vec<Value> = crate::support::text(res)
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 2);
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));
    assert_eq!(lines.last().unwrap()["done"], true);
    let streamed: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);

    // generate renders the chat template like chat.
    let g = json!({"model": TINY, "prompt": "hello there", "options": greedy, "stream": false});
    let v = json(send(&app, post("/api/generate", &g)).await).await;
    assert_eq!(v["response"], text.as_str(), "{v}");

    let v = json(send(&app, get("/api/tags")).await).await;
    assert_eq!(v["models"][0]["name"], TINY);
    let v = json(send(&app, post("/api/show", &json!({"model": TINY}))).await).await;
    assert!(v["model_info"]["general.context_length"].as_u64().unwrap() > 0);

    for (body, status, param) in [
        (
            json!({"model": TINY, "messages": [], "options": {"num_ctx": 8}}),
            400,
            "options.num_ctx",
        ),
        (
            json!({"model": TINY, "prompt": "x", "keep_alive": "5m"}),
            400,
            "keep_alive",
        ),
        (json!({"model": "nope", "prompt": "x"}), 404, "nope"),
    ] {
        let path = if body.get("messages").is_some() {
            "/api/chat"
        } else {
            "/api/generate"
        };
        let res = send(&app, post(path, &body)).await;
        assert_eq!(res.status().as_u16(), status);
        let v = json(res).await;
        assert!(v["error"].as_str().unwrap().contains(param), "{v}");
    }
}

#[tokio::test]
async fn an_alias_is_listed_and_answered_and_the_id_still_works() {
    let app = tiny_app(GatewayConfig::new().with_alias(TINY, "my-model"));
    let v = json(send(&app, get("/v1/models")).await).await;
    assert_eq!(v["data"][0]["id"], "my-model");
    for name in ["my-model", TINY] {
        let res = send(
            &app,
            post("/v1/chat/completions", &chat(json!({"model": name}))),
        )
        .await;
        assert_eq!(res.status(), 200);
        assert_eq!(json(res).await["model"], "my-model");
    }
    let res = send(&app, get("/v1/models/my-model")).await;
    assert_eq!(json(res).await["id"], "my-model");
}

#[tokio::test]
async fn completions_follow_a_response_format() {
    let app = tiny_app(GatewayConfig::new());
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer",
        "minimum": 0, "maximum": 99}}, "required": ["n"], "additionalProperties": false});
    let body = json!({"model": TINY, "prompt": "A number:", "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}});
    let v = json(send(&app, post("/v1/completions", &body)).await).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let out: Value = serde_json::from_str(v["choices"][0]["text"].as_str().unwrap()).unwrap();
    assert!(out["n"].as_u64().unwrap() <= 99, "{out}");
}
