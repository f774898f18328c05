//! Log-probabilities, `n` choices, `logit_bias`, extension sampling fields and the refusal of
//! every unsupported field, on the tiny model.

use crate::support::*;
use plexus_gateway::GatewayConfig;
use serde_json::{json, Value};

async fn chat_ok(extra: Value) -> Value {
    let app = tiny_app(GatewayConfig::new());
    let res = send(&app, post("/v1/chat/completions", &chat(extra))).await;
    assert_eq!(res.status(), 200);
    json(res).await
}

async fn chat_events(extra: Value) -> Vec<Value> {
    let app = tiny_app(GatewayConfig::new());
    let mut body = chat(extra);
    body["stream"] = json!(true);
    let res = send(&app, post("/v1/chat/completions", &body)).await;
    assert_eq!(res.status(), 200);
    sse_events(&text(res).await)
}

fn tokens(content: &Value) -> Vec<(String, f64)> {
    content
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["token"].as_str().unwrap().to_owned(),
                e["logprob"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn greedy_logprobs_top1_is_the_chosen_token() {
    let v = chat_ok(json!({"logprobs": true, "top_logprobs": 4, "max_tokens": 12})).await;
    let choice = &v["choices"][0];
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(choice["logprobs"]["refusal"], Value::Null);
    let mut spelled = Vec::new();
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 4, "{e}");
        assert_eq!(top[0]["token"], e["token"], "{e}");
        assert_eq!(top[0]["logprob"], e["logprob"], "{e}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "sorted: {lps:?}");
        assert!(lps.iter().all(|&l| l <= 0.0));
        let mut toks: Vec<&Value> = top.iter().map(|t| &t["bytes"]).collect();
        toks.dedup();
        assert_eq!(toks.len(), 4, "distinct: {e}");
        spelled.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    // The random-weight model emits stray bytes; the text shows them as U+FFFD.
    assert_eq!(
        String::from_utf8_lossy(&spelled),
        choice["message"]["content"].as_str().unwrap()
    );
    // Without logprobs the answer is the same and carries none.
    let plain = chat_ok(json!({"max_tokens": 12})).await;
    assert_eq!(plain["choices"][0]["message"], choice["message"]);
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
}

#[tokio::test]
async fn streamed_logprobs_equal_the_plain_ones() {
    let extra = json!({"logprobs": true, "top_logprobs": 2, "max_tokens": 16});
    let v = chat_ok(extra.clone()).await;
    let want = tokens(&v["choices"][0]["logprobs"]["content"]);
    let events = chat_events(extra).await;
    let mut got = Vec::new();
    for e in &events {
        for c in e["choices"].as_array().unwrap() {
            if let Some(content) = c["logprobs"].get("content") {
                got.extend(tokens(content));
            }
        }
    }
    assert_eq!(got, want);
}

#[tokio::test]
async fn logprobs_do_not_depend_on_temperature() {
    let greedy = chat_ok(json!({"logprobs": true, "top_logprobs": 20, "max_tokens": 1})).await;
    let hot = chat_ok(json!({
        "logprobs": true, "top_logprobs": 20, "max_tokens": 1, "temperature": 1.7, "seed": 3,
    }))
    .await;
    let top = |v: &Value| v["choices"][0]["logprobs"]["content"][0]["top_logprobs"].clone();
    assert_eq!(top(&greedy), top(&hot));
    assert_eq!(top(&greedy).as_array().unwrap().len(), 20);
}

#[tokio::test]
async fn completion_logprobs_legacy_shape() {
    let app = tiny_app(GatewayConfig::new());
    let body =
        json!({"model": TINY, "prompt": "hello", "max_tokens": 8, "temperature": 0, "logprobs": 2});
    let v = json(send(&app, post("/v1/completions", &body)).await).await;
    let lp = &v["choices"][0]["logprobs"];
    let toks: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(toks.concat(), v["choices"][0]["text"].as_str().unwrap());
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    for (i, t) in toks.iter().enumerate() {
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() >= 2 && top.len() <= 3, "{top:?}");
        assert_eq!(top[*t], lp["token_logprobs"][i]);
        if i + 1 < toks.len() {
            assert_eq!(offsets[i + 1], offsets[i] + t.chars().count() as u64);
        }
    }
}

#[tokio::test]
async fn n_choices_share_the_prompt_and_derive_seeds() {
    let extra = json!({"n": 3, "temperature": 1.0, "seed": 9, "max_tokens": 10});
    let v = chat_ok(extra.clone()).await;
    let texts: Vec<&str> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["message"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
    let one = chat_ok(json!({"temperature": 1.0, "seed": 9, "max_tokens": 10})).await;
    assert_eq!(one["choices"][0]["message"]["content"], texts[0]);
    // The usage counts the prompt once and every choice's tokens.
    let prompt = chat_prompt_tokens(&[("user", "hello there")]) as u64;
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    // Streamed: the same texts, one closing chunk per choice.
    let events = chat_events(extra).await;
    let mut parts = vec![String::new(); 3];
    let mut finishes = 0;
    let mut roles = 0;
    for e in &events {
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            parts[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
            finishes += usize::from(c["finish_reason"].is_string());
            roles += usize::from(c["delta"]["role"].is_string());
        }
    }
    assert_eq!(parts, texts);
    assert_eq!((finishes, roles), (3, 3));
}

#[tokio::test]
async fn logit_bias_bans_and_forces_tokens() {
    let tok = tiny_backend().entry().tokenizer.clone();
    let v = chat_ok(json!({"max_tokens": 1, "logprobs": true, "top_logprobs": 2})).await;
    let first = &v["choices"][0]["logprobs"]["content"][0];
    let bytes: Vec<u8> = first["bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    let id = (0..tok.vocab_size() as u32)
        .find(|&i| tok.token_bytes(i) == bytes)
        .unwrap();
    let banned = chat_ok(json!({
        "max_tokens": 1, "logprobs": true, "top_logprobs": 2, "logit_bias": {id.to_string(): -100},
    }))
    .await;
    let second = &banned["choices"][0]["logprobs"]["content"][0];
    assert_ne!(second["bytes"], first["bytes"]);
    // The runner-up of the unbiased distribution wins now.
    assert_eq!(second["token"], first["top_logprobs"][1]["token"]);
    let forced = chat_ok(json!({"max_tokens": 1, "logit_bias": {"7": 100}})).await;
    assert_eq!(
        forced["choices"][0]["message"]["content"].as_str().unwrap(),
        String::from_utf8_lossy(&tok.token_bytes(7))
    );
}

#[tokio::test]
async fn extension_sampling_fields_are_used() {
    // top_k 1 is greedy whatever the temperature.
    let greedy = chat_ok(json!({"max_tokens": 10})).await;
    let k1 = chat_ok(json!({"max_tokens": 10, "temperature": 1.5, "top_k": 1, "seed": 4})).await;
    assert_eq!(greedy["choices"][0]["message"], k1["choices"][0]["message"]);
    let v =
        chat_ok(json!({"max_tokens": 4, "min_p": 0.1, "repetition_penalty": 1.2, "user": "u1"}))
            .await;
    assert!(v["choices"][0]["message"]["content"].is_string());
}

#[tokio::test]
async fn unsupported_fields_and_bad_values_name_their_param() {
    let app = tiny_app(GatewayConfig::new());
    for (extra, param) in [
        (json!({"mirostat": 2}), "mirostat"),
        (
            json!({"response_format": {"type": "sound"}}),
            "response_format",
        ),
        (json!({"audio": {"voice": "alloy"}}), "audio"),
        (json!({"store": true}), "store"),
        (
            json!({"prediction": {"type": "content", "content": "x"}}),
            "prediction",
        ),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"n": 0}), "n"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"logit_bias": {"100000": 1}}), "logit_bias"),
        (json!({"top_k": -5}), "top_k"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (
            json!({"stream": true, "stream_options": {"include_obfuscation": true}}),
            "stream_options.include_obfuscation",
        ),
        (
            json!({"messages": [{"role": "narrator", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x", "name": "bob"}]}),
            "messages[0].name",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content",
        ),
    ] {
        let res = send(&app, post("/v1/chat/completions", &chat(extra.clone()))).await;
        let v = expect_error(res, 400, "invalid_request_error").await;
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    // "Off" values of unsupported fields are accepted: nothing is ignored.
    let res = send(
        &app,
        post(
            "/v1/chat/completions",
            &chat(json!({
                "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                "store": false, "service_tier": "auto", "modalities": ["text"], "audio": null,
            })),
        ),
    )
    .await;
    assert_eq!(res.status(), 200);
    for (extra, param) in [
        (json!({"echo": true}), "echo"),
        (json!({"best_of": 3}), "best_of"),
        (json!({"suffix": "end"}), "suffix"),
        (json!({"logprobs": 21}), "logprobs"),
        (json!({"messages": []}), "messages"),
    ] {
        let mut body = json!({"model": TINY, "prompt": "hi", "max_tokens": 2});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let res = send(&app, post("/v1/completions", &body)).await;
        let v = expect_error(res, 400, "invalid_request_error").await;
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
}

#[tokio::test]
async fn routes_answer_without_the_v1_prefix() {
    let app = tiny_app(GatewayConfig::new());
    let v = json(send(&app, get("/models")).await).await;
    assert_eq!(v["data"][0]["id"], TINY);
    let res = send(&app, post("/chat/completions", &chat(json!({})))).await;
    assert_eq!(res.status(), 200);
    let body = json!({"model": TINY, "prompt": "hi", "max_tokens": 2});
    assert_eq!(send(&app, post("/completions", &body)).await.status(), 200);
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    use axum::body::Body;
    use axum::http::Request;
    let app = tiny_app(GatewayConfig::new().with_api_key(Some("s3cret".into())));
    let with = |auth: Option<(&str, &str)>| {
        let mut r = Request::get("/v1/models");
        if let Some((k, v)) = auth {
            r = r.header(k, v);
        }
        r.body(Body::empty()).unwrap()
    };
    for bad in [
        None,
        Some(("authorization", "Bearer wrong")),
        Some(("authorization", "Bearer s3cret2")),
        Some(("x-api-key", "s3cre")),
    ] {
        let v = expect_error(send(&app, with(bad)).await, 401, "invalid_request_error").await;
        assert_eq!(v["error"]["code"], "invalid_api_key", "{bad:?}");
    }
    for good in [
        Some(("authorization", "Bearer s3cret")),
        Some(("x-api-key", "s3cret")),
    ] {
        assert_eq!(send(&app, with(good)).await.status(), 200, "{good:?}");
    }
    // Health stays open for load balancers; a POST without the key is refused before parsing.
    assert_eq!(send(&app, get("/health")).await.status(), 200);
    let res = send(&app, post("/v1/chat/completions", &chat(json!({})))).await;
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn cors_allows_local_and_configured_origins_only() {
    use axum::body::Body;
    use axum::http::Request;
    let app = tiny_app(
        GatewayConfig::new()
            .with_api_key(Some("k".into()))
            .with_cors_origins(vec!["https://app.example.com".into()]),
    );
    let preflight = |origin: &str| {
        Request::options("/v1/chat/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    for ok in ["http://localhost:3000", "https://app.example.com"] {
        let res = send(&app, preflight(ok)).await;
        assert!(res.status().is_success(), "{ok}: {}", res.status());
        assert_eq!(res.headers()["access-control-allow-origin"], ok);
    }
    let res = send(&app, preflight("https://evil.example.com")).await;
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    // A real request from an allowed origin gets the header (and still needs the key).
    let req = Request::get("/v1/models")
        .header("origin", "http://127.0.0.1:5173")
        .header("authorization", "Bearer k")
        .body(Body::empty())
        .unwrap();
    let res = send(&app, req).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://127.0.0.1:5173"
    );
}
