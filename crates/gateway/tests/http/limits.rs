//! Admission (429 with Retry-After, the queue), cancellation when the client goes away, and
//! graceful shutdown.

use crate::support::*;
use axum::Router;
use http_body_util::BodyExt;
use plexus_gateway::{AppState, GatewayConfig};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits (bounded) until the metrics page shows `line`.
async fn wait_metric(app: &Router, line: &str) {
    for _ in 0..3000 {
        if text(send(app, get("/metrics")).await).await.contains(line) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("metric {line} never showed");
}

#[tokio::test]
async fn saturated_gateway_queues_then_answers_429() {
    let backend = Scripted::new(Script::Gated);
    let config = GatewayConfig::new()
        .with_max_concurrent(1)
        .with_max_queue(1);
    let app = scripted_app(backend.clone(), config);
    let req = post("/v1/chat/completions", &chat(json!({})));
    let running = tokio::spawn({
        let app = app.clone();
        async move { send(&app, req).await }
    });
    backend.wait_started(1).await;
    let queued = tokio::spawn({
        let app = app.clone();
        let req = post("/v1/chat/completions", &chat(json!({})));
        async move { send(&app, req).await }
    });
    wait_metric(&app, "plexus_gateway_queue_depth 1").await;
    wait_metric(&app, "plexus_gateway_in_flight 1").await;

    let res = send(&app, post("/v1/chat/completions", &chat(json!({})))).await;
    assert_eq!(res.headers()["retry-after"], "1");
    let v = expect_error(res, 429, "rate_limit_error").await;
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    backend.release();
    for task in [running, queued] {
        let res = task.await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(json(res).await["choices"][0]["message"]["content"], "abc");
    }
    wait_metric(&app, "plexus_gateway_in_flight 0").await;
    wait_metric(&app, "plexus_gateway_queue_depth 0").await;
}

#[tokio::test]
async fn leaving_the_queue_gives_the_place_back() {
    let backend = Scripted::new(Script::Gated);
    let config = GatewayConfig::new()
        .with_max_concurrent(1)
        .with_max_queue(1);
    let app = scripted_app(backend.clone(), config);
    let running = tokio::spawn({
        let app = app.clone();
        let req = post("/v1/chat/completions", &chat(json!({})));
        async move { send(&app, req).await }
    });
    backend.wait_started(1).await;
    let leaver = tokio::spawn({
        let app = app.clone();
        let req = post("/v1/chat/completions", &chat(json!({})));
        async move { send(&app, req).await }
    });
    wait_metric(&app, "plexus_gateway_queue_depth 1").await;
    leaver.abort();
    wait_metric(&app, "plexus_gateway_queue_depth 0").await;
    // The place is free again: this one queues instead of getting 429.
    let next = tokio::spawn({
        let app = app.clone();
        let req = post("/v1/chat/completions", &chat(json!({})));
        async move { send(&app, req).await }
    });
    wait_metric(&app, "plexus_gateway_queue_depth 1").await;
    backend.release();
    assert_eq!(running.await.unwrap().status(), 200);
    assert_eq!(next.await.unwrap().status(), 200);
}

#[tokio::test]
async fn dropping_a_stream_stops_the_generation() {
    let backend = Scripted::new(Script::Endless);
    let app = scripted_app(backend.clone(), GatewayConfig::new());
    let req = post("/v1/chat/completions", &chat(json!({"stream": true})));
    let res = send(&app, req).await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    for _ in 0..3 {
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.data_ref().unwrap().starts_with(b"data: "));
    }
    drop(body);
    backend.wait_stopped().await;
    wait_metric(&app, "plexus_gateway_in_flight 0").await;
}

#[tokio::test]
async fn dropping_a_request_stops_the_generation() {
    let backend = Scripted::new(Script::Endless);
    let app = scripted_app(backend.clone(), GatewayConfig::new());
    let task = tokio::spawn({
        let app = app.clone();
        let req = post("/v1/completions", &json!({"model": TINY, "prompt": "hi"}));
        async move { send(&app, req).await }
    });
    backend.wait_started(1).await;
    task.abort();
    backend.wait_stopped().await;
    wait_metric(&app, "plexus_gateway_in_flight 0").await;
}

/// Sends one HTTP/1.1 request over a real socket and reads the whole response.
async fn raw_request(addr: std::net::SocketAddr, body: &serde_json::Value) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let backend = Scripted::new(Script::Gated);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = GatewayConfig::new().with_shutdown_grace(Duration::from_secs(30));
    let server = tokio::spawn(plexus_gateway::serve(
        listener,
        backend.clone(),
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    let client = tokio::spawn(async move { raw_request(addr, &chat(json!({}))).await });
    backend.wait_started(1).await;
    stop.send(()).unwrap();
    // New connections are refused once the server stops accepting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    backend.release();
    let response = client.await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"abc\""), "{response}");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_cancels_after_the_grace_period() {
    let backend = Scripted::new(Script::Endless);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = GatewayConfig::new().with_shutdown_grace(Duration::from_millis(300));
    let state = AppState::new(backend.clone(), config);
    let server = tokio::spawn(plexus_gateway::serve_state(
        listener,
        state.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client =
        tokio::spawn(async move { raw_request(addr, &chat(json!({"stream": true}))).await });
    backend.wait_started(1).await;
    stop.send(()).unwrap();
    backend.wait_stopped().await;
    assert!(state.is_cancelled());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve did not return")
        .unwrap()
        .unwrap();
    let response = client.await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("data: "), "{response}");
    let _ = Arc::strong_count(&backend);
}
