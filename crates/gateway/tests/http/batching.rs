//! Issue 8 through the HTTP gateway on the real SmolLM2-135M-Instruct (Q4_1): concurrent
//! chat completions, batched by the engine, each give the text of the same request sent
//! alone; a request whose KV cache does not fit the budget gets 429 `server_overloaded`.

use crate::support::{json, post, send};
use plexus_gateway::{AppState, GatewayConfig, LocalBackend};
use plexus_model::serve::ServeConfig;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

fn real_model() -> PathBuf {
    plexus_testkit::real_model()
}

fn app(config: ServeConfig) -> axum::Router {
    let backend = LocalBackend::load_with(&real_model(), None, config)
        .unwrap()
        .with_id("smol");
    plexus_gateway::app(AppState::new(Arc::new(backend), GatewayConfig::new()))
}

fn body(i: u64) -> Value {
    let topics = [
        "the sea",
        "bread",
        "a red bicycle",
        "winter",
        "owls",
        "chess",
    ];
    let mut b = json!({
        "model": "smol",
        "messages": [{"role": "user", "content": format!("Write one sentence about {}.", topics[i as usize % topics.len()])}],
        "max_tokens": 8 + 5 * i,
    });
    if i % 2 == 1 {
        b["temperature"] = json!(0.9);
        b["seed"] = json!(1000 + i);
    } else {
        b["temperature"] = json!(0);
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_chats_equal_the_same_chats_alone_issue_8() {
    let app = app(ServeConfig::default());
    let bodies: Vec<Value> = (0..6).map(body).collect();
    let together = futures::future::join_all(bodies.iter().map(|b| {
        let app = app.clone();
        async move { json(send(&app, post("/v1/chat/completions", b)).await).await }
    }))
    .await;
    for (b, got) in bodies.iter().zip(&together) {
        let alone = json(send(&app, post("/v1/chat/completions", b)).await).await;
        assert_eq!(
            got["choices"][0]["message"]["content"], alone["choices"][0]["message"]["content"],
            "request {b}"
        );
        assert_eq!(got["usage"], alone["usage"], "request {b}");
    }
}

#[tokio::test]
async fn a_request_beyond_the_kv_budget_is_429_server_overloaded_issue_8() {
    // Room for about 100 positions of SmolLM2 (23,040 bytes each).
    let app = app(ServeConfig {
        kv_budget: 100 * 23_040,
        ..ServeConfig::default()
    });
    let mut b = body(0);
    b["max_tokens"] = json!(500);
    let res = send(&app, post("/v1/chat/completions", &b)).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    let v = json(res).await;
    assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KV cache budget"),
        "{v}"
    );
    // Streamed, the refusal is still the response's status, not an error event after a 200
    // (the stream starts once the engine admitted the generation).
    b["stream"] = json!(true);
    let res = send(&app, post("/v1/chat/completions", &b)).await;
    assert_eq!(res.status(), 429);
    let v = json(res).await;
    assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
    // A request that fits is served, streamed or not.
    b["max_tokens"] = json!(4);
    assert_eq!(
        send(&app, post("/v1/chat/completions", &b)).await.status(),
        200
    );
    b["stream"] = json!(false);
    assert_eq!(
        send(&app, post("/v1/chat/completions", &b)).await.status(),
        200
    );
}
