//! The routes working as OpenAI's do, on the tiny model.

use crate::support::*;
use plexus_gateway::GatewayConfig;
use serde_json::{json, Value};

#[tokio::test]
async fn models_and_health() {
    let app = tiny_app(GatewayConfig::new());
    let res = send(&app, get("/v1/models")).await;
    assert_eq!(res.status(), 200);
    let v = json(res).await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], TINY);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "plexus");
    assert_eq!(v["data"][0]["identity"].as_str().unwrap().len(), 64);

    let v = json(send(&app, get("/v1/models/tiny")).await).await;
    assert_eq!(v["id"], TINY);

    let res = send(&app, get("/health")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await, json!({"status": "ok"}));
}

#[tokio::test]
async fn chat_completion_object_and_usage() {
    let app = tiny_app(GatewayConfig::new());
    let res = send(&app, post("/v1/chat/completions", &chat(json!({})))).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-plexus-seed"));
    let v = json(res).await;
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], TINY);
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    let finish = choice["finish_reason"].as_str().unwrap();
    let u = &v["usage"];
    let prompt = chat_prompt_tokens(&[("user", "hello there")]) as u64;
    assert_eq!(u["prompt_tokens"], prompt);
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert_eq!(u["total_tokens"], prompt + completion);
    match finish {
        "length" => assert_eq!(completion, 12),
        "stop" => assert!(completion < 12),
        other => panic!("finish_reason {other}"),
    }
}

#[tokio::test]
async fn content_parts_equal_a_string() {
    let app = tiny_app(GatewayConfig::new());
    let parts = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello "}, {"type": "text", "text": "there"}
    ]}]});
    let a = json(send(&app, post("/v1/chat/completions", &chat(parts))).await).await;
    let b = json(send(&app, post("/v1/chat/completions", &chat(json!({})))).await).await;
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    assert_eq!(a["usage"], b["usage"]);
}

#[tokio::test]
async fn chat_stream_matches_non_stream() {
    let app = tiny_app(GatewayConfig::new());
    let whole = json(send(&app, post("/v1/chat/completions", &chat(json!({})))).await).await;
    let req = chat(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let res = send(&app, post("/v1/chat/completions", &req)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let events = sse_events(&text(res).await);
    let first = &events[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let id = first["id"].as_str().unwrap();
    assert!(events.iter().all(|e| e["id"] == id), "one id per stream");
    let usage = events.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    let closing = &events[events.len() - 2];
    assert_eq!(closing["choices"][0]["delta"], json!({}));
    assert_eq!(
        closing["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    let streamed: String = events[1..events.len() - 2]
        .iter()
        .map(|e| {
            assert!(e["choices"][0]["finish_reason"].is_null());
            assert!(e["usage"].is_null(), "usage is null before the usage chunk");
            e["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(streamed, whole["choices"][0]["message"]["content"]);
}

#[tokio::test]
async fn stream_without_usage_has_no_usage_chunk() {
    let app = tiny_app(GatewayConfig::new());
    let res = send(
        &app,
        post("/v1/chat/completions", &chat(json!({"stream": true}))),
    )
    .await;
    let events = sse_events(&text(res).await);
    let last = events.last().unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert!(events.iter().all(|e| e.get("usage").is_none()));
}

#[tokio::test]
async fn text_completions_plain_and_streamed() {
    let app = tiny_app(GatewayConfig::new());
    let body = json!({"model": TINY, "prompt": ["the cat"], "max_tokens": 10, "temperature": 0});
    let res = send(&app, post("/v1/completions", &body)).await;
    assert_eq!(res.status(), 200);
    let v = json(res).await;
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    let tiny = tiny_backend();
    let prompt = tiny
        .entry()
        .tokenizer
        .encode("the cat", true)
        .unwrap()
        .len() as u64;
    assert_eq!(v["usage"]["prompt_tokens"], prompt);

    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let events = sse_events(&text(send(&app, post("/v1/completions", &stream_body)).await).await);
    assert!(events.iter().all(|e| e["object"] == "text_completion"));
    let text_streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text_streamed, v["choices"][0]["text"]);
    assert_eq!(events.last().unwrap()["usage"], v["usage"]);
}

#[tokio::test]
async fn stop_strings_cut_the_text() {
    let app = tiny_app(GatewayConfig::new());
    let base = chat(json!({"max_tokens": 30}));
    let v = json(send(&app, post("/v1/chat/completions", &base)).await).await;
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let chars: Vec<char> = full.chars().collect();
    assert!(
        chars.len() >= 6,
        "the tiny model should say something: {full:?}"
    );
    let mid = chars.len() / 2;
    let stop: String = chars[mid..mid + 2].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];

    for stop_field in [json!(stop), json!(["\u{1}never", stop])] {
        let req = chat(json!({"max_tokens": 30, "stop": stop_field}));
        let v = json(send(&app, post("/v1/chat/completions", &req)).await).await;
        assert_eq!(v["choices"][0]["message"]["content"], cut, "stop {stop:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");

        let mut sreq = req.clone();
        sreq["stream"] = json!(true);
        let events = sse_events(&text(send(&app, post("/v1/chat/completions", &sreq)).await).await);
        let streamed: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, cut);
    }
}

#[tokio::test]
async fn seeded_sampling_repeats() {
    let app = tiny_app(GatewayConfig::new());
    let req = chat(json!({"temperature": 1.0, "top_p": 0.9, "seed": 42, "max_tokens": 16}));
    let a = json(send(&app, post("/v1/chat/completions", &req)).await).await;
    let res = send(&app, post("/v1/chat/completions", &req)).await;
    assert_eq!(res.headers()["x-plexus-seed"], "42");
    let b = json(res).await;
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
}

/// Without a client seed, the seed is the protocol's: derived from the request id and the
/// gateway's seed commitment it reports, so the same (request id, commitment) gives the same
/// seed and the same tokens (what an auditor recomputes).
#[tokio::test]
async fn the_seed_is_derived_from_the_request_id_and_commitment_issue_11() {
    let app = tiny_app(GatewayConfig::new());
    let req = chat(json!({"temperature": 1.0, "max_tokens": 16}));
    let res = send(&app, post("/v1/chat/completions", &req)).await;
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    let bytes = |name: &str| -> [u8; 32] {
        hex::decode(h[name].to_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap()
    };
    let (request, commitment) = (
        bytes("x-plexus-request-id"),
        plexus_core::Digest(bytes("x-plexus-seed-commitment")),
    );
    let seed: u64 = h["x-plexus-seed"].to_str().unwrap().parse().unwrap();
    assert_eq!(
        seed,
        plexus_verify::seed::protocol_seed(&request, &commitment)
    );
    let first = json(res).await;
    // Replaying with that seed (as an auditor does) gives the same tokens.
    let mut again = req.clone();
    // OpenAI's `seed` is a signed integer: the upper half of u64 goes as negatives.
    again["seed"] = json!(seed as i64);
    let res = send(&app, post("/v1/chat/completions", &again)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["x-plexus-seed"].to_str().unwrap(),
        seed.to_string()
    );
    // Every request has its own id and commitment.
    assert_ne!(bytes("x-plexus-request-id").to_vec(), {
        let id = res.headers()["x-plexus-request-id"].to_str().unwrap();
        hex::decode(id).unwrap()
    });
    let second = json(res).await;
    assert_eq!(
        first["choices"][0]["message"],
        second["choices"][0]["message"]
    );
}

#[tokio::test]
async fn metrics_page() {
    let backend = Scripted::new(Script::Abc);
    let app = scripted_app(backend, GatewayConfig::new());
    let res = send(&app, post("/v1/chat/completions", &chat(json!({})))).await;
    assert_eq!(res.status(), 200);
    let _ = text(res).await;
    let _ = text(send(&app, get("/nowhere")).await).await;
    let res = send(&app, get("/metrics")).await;
    assert_eq!(res.status(), 200);
    let page = text(res).await;
    for needle in [
        "plexus_gateway_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
        "plexus_gateway_requests_total{route=\"unmatched\",status=\"404\"} 1",
        "plexus_gateway_completion_tokens_total 3",
        "plexus_gateway_queue_depth 0",
        "plexus_gateway_in_flight 0",
        "plexus_gateway_time_to_first_token_seconds_count 1",
        "plexus_gateway_request_duration_seconds_count{route=\"/v1/chat/completions\"} 1",
        "scripted_calls 1",
    ] {
        assert!(page.contains(needle), "missing {needle} in\n{page}");
    }
    assert!(page.ends_with("# EOF\n"), "{page}");
    let prompt: Value = page
        .lines()
        .find_map(|l| l.strip_prefix("plexus_gateway_prompt_tokens_total "))
        .map(|n| json!(n.parse::<u64>().unwrap()))
        .unwrap();
    assert_eq!(
        prompt,
        json!(chat_prompt_tokens(&[("user", "hello there")]))
    );
}
