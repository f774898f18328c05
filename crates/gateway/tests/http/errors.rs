//! Every error path answers with the right status and OpenAI's error body.

use crate::support::*;
use axum::body::Body;
use axum::http::Request;
use plexus_gateway::GatewayConfig;
use serde_json::json;
use std::sync::atomic::Ordering;

const INVALID: &str = "invalid_request_error";

#[tokio::test]
async fn bad_json_and_missing_fields_are_400() {
    let app = tiny_app(GatewayConfig::new());
    let raw = |body: &'static str| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    expect_error(send(&app, raw("{not json")).await, 400, INVALID).await;
    expect_error(send(&app, raw("")).await, 400, INVALID).await;
    let v = expect_error(send(&app, raw(r#"{"model":"tiny"}"#)).await, 400, INVALID).await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("messages"),
        "{v}"
    );
    let wrong_type = chat(json!({"temperature": "hot"}));
    expect_error(
        send(&app, post("/v1/chat/completions", &wrong_type)).await,
        400,
        INVALID,
    )
    .await;
    // No content type (curl -d sends form data) still parses as JSON.
    let res = send(
        &app,
        Request::post("/v1/chat/completions")
            .body(Body::from(chat(json!({"max_tokens": 1})).to_string()))
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn unknown_model_is_404() {
    let app = tiny_app(GatewayConfig::new());
    let req = chat(json!({"model": "gpt-5"}));
    let v = expect_error(
        send(&app, post("/v1/chat/completions", &req)).await,
        404,
        INVALID,
    )
    .await;
    assert_eq!(v["error"]["code"], "model_not_found");
    let req = json!({"model": "gpt-5", "prompt": "hi"});
    let v = expect_error(
        send(&app, post("/v1/completions", &req)).await,
        404,
        INVALID,
    )
    .await;
    assert_eq!(v["error"]["code"], "model_not_found");
    let v = expect_error(send(&app, get("/v1/models/gpt-5")).await, 404, INVALID).await;
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn context_overflow_is_400() {
    let app = tiny_app(GatewayConfig::new());
    // The tiny model's context is 256 positions; each digit is at least one token.
    let long = "1 2 3 4 5 6 7 8 9 ".repeat(40);
    let req = chat(json!({"messages": [{"role": "user", "content": long}]}));
    let v = expect_error(
        send(&app, post("/v1/chat/completions", &req)).await,
        400,
        INVALID,
    )
    .await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "messages");
    let req = json!({"model": TINY, "prompt": long});
    let v = expect_error(
        send(&app, post("/v1/completions", &req)).await,
        400,
        INVALID,
    )
    .await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "prompt");

    // The prompt fits but not with the completion asked for.
    let req = chat(json!({"max_tokens": 250}));
    let v = expect_error(
        send(&app, post("/v1/chat/completions", &req)).await,
        400,
        INVALID,
    )
    .await;
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("250 in the completion"),
        "{v}"
    );
    let req = chat(json!({"max_tokens": 1, "max_completion_tokens": 250}));
    expect_error(
        send(&app, post("/v1/chat/completions", &req)).await,
        400,
        INVALID,
    )
    .await;

    // Without max_tokens a fitting prompt may use the rest of the context.
    let ok = chat(json!({"max_tokens": null}));
    let res = send(&app, post("/v1/chat/completions", &ok)).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let app = tiny_app(GatewayConfig::new().with_max_body_bytes(1000));
    let req = chat(json!({"messages": [{"role": "user", "content": "a".repeat(2000)}]}));
    let v = expect_error(
        send(&app, post("/v1/chat/completions", &req)).await,
        413,
        INVALID,
    )
    .await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("1000"),
        "{v}"
    );
    // Also when the client sends no Content-Length (chunked).
    let chunks: Vec<Result<String, std::io::Error>> = vec![
        Ok("{\"model\":\"tiny\",\"prompt\":\"".into()),
        Ok("b".repeat(5000)),
        Ok("\"}".into()),
    ];
    let req = Request::post("/v1/completions")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    expect_error(send(&app, req).await, 413, INVALID).await;
}

#[tokio::test]
async fn unsupported_options_are_400() {
    let app = tiny_app(GatewayConfig::new());
    for (extra, param) in [
        (json!({"n": 0}), "n"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"temperature": 3}), "temperature"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content",
        ),
    ] {
        let req = chat(extra.clone());
        let v = expect_error(
            send(&app, post("/v1/chat/completions", &req)).await,
            400,
            INVALID,
        )
        .await;
        assert_eq!(v["error"]["param"], param, "{extra}");
    }
    let req = json!({"model": TINY, "prompt": ["a", "b"]});
    expect_error(
        send(&app, post("/v1/completions", &req)).await,
        400,
        INVALID,
    )
    .await;
    let req = json!({"model": TINY, "prompt": "hi", "n": 17});
    expect_error(
        send(&app, post("/v1/completions", &req)).await,
        400,
        INVALID,
    )
    .await;
}

#[tokio::test]
async fn unknown_route_and_method() {
    let app = tiny_app(GatewayConfig::new());
    let v = expect_error(send(&app, get("/v1/engines")).await, 404, INVALID).await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/engines"));
    let req = Request::delete("/v1/models").body(Body::empty()).unwrap();
    expect_error(send(&app, req).await, 405, INVALID).await;
    expect_error(send(&app, get("/v1/chat/completions")).await, 405, INVALID).await;
}

#[tokio::test]
async fn model_without_chat_template() {
    let app = scripted_app(
        Scripted::without_template(Script::Abc),
        GatewayConfig::new(),
    );
    let v = expect_error(
        send(&app, post("/v1/chat/completions", &chat(json!({})))).await,
        400,
        INVALID,
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/completions"));
    let res = send(
        &app,
        post("/v1/completions", &json!({"model": TINY, "prompt": "x"})),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["choices"][0]["text"], "abc");
}

#[tokio::test]
async fn backend_failures() {
    let app = scripted_app(Scripted::new(Script::Unavailable), GatewayConfig::new());
    let req = chat(json!({}));
    expect_error(
        send(&app, post("/v1/chat/completions", &req)).await,
        503,
        "service_unavailable_error",
    )
    .await;

    let app = scripted_app(Scripted::new(Script::Internal), GatewayConfig::new());
    let v = expect_error(
        send(&app, post("/v1/chat/completions", &req)).await,
        500,
        "server_error",
    )
    .await;
    assert!(!v.to_string().contains("10.1.2.3"), "the cause leaked: {v}");
    // Streamed, a failure before any text is still the response's status...
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    expect_error(
        send(&app, post("/v1/chat/completions", &sreq)).await,
        500,
        "server_error",
    )
    .await;
    // ...and a failure mid-stream arrives as an error event.
    let app = scripted_app(Scripted::new(Script::FailAfterA), GatewayConfig::new());
    let res = send(&app, post("/v1/chat/completions", &sreq)).await;
    assert_eq!(res.status(), 200);
    let body = text(res).await;
    assert!(body.starts_with("data: "), "{body}");
    assert!(body.contains("\"server_error\""), "{body}");
    assert!(!body.contains("10.1.2.3"), "the cause leaked: {body}");
}

#[tokio::test]
async fn health_without_models_is_503() {
    let backend = Scripted::new(Script::Abc);
    backend.with_models.store(false, Ordering::Release);
    let app = scripted_app(backend, GatewayConfig::new());
    let res = send(&app, get("/health")).await;
    assert_eq!(res.status(), 503);
}

#[tokio::test]
async fn empty_prompt_is_400_or_bos_only() {
    // The tiny model adds BOS, so an empty text prompt is one token and runs.
    let app = tiny_app(GatewayConfig::new());
    let req = json!({"model": TINY, "prompt": "", "max_tokens": 2});
    assert_eq!(
        send(&app, post("/v1/completions", &req)).await.status(),
        200
    );
}
