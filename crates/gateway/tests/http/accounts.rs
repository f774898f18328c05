//! Accounts on a real SQLite ledger: 401 without a known key, exact charges for the tokens
//! produced, 402 `insufficient_quota` when the hold cannot be covered, `/v1/account`, and
//! escrows left open by a killed gateway released when the ledger is opened again.

use super::support::*;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use plexus_gateway::accounts::Accounts;
use plexus_gateway::{AppState, GatewayConfig};
use plexus_ledger::{Address, Config, Op, RequestId};
use plexus_ledger_store::Store;
use serde_json::json;
use std::sync::Arc;

const PRICE: u64 = 3;

fn gateway_addr() -> Address {
    Address::repeat_byte(0x6a)
}

async fn accounts(url: &str) -> Arc<Accounts> {
    let a = Accounts::open(
        url,
        Config::default(),
        gateway_addr(),
        gateway_addr(),
        PRICE,
    )
    .await
    .unwrap();
    Arc::new(a)
}

fn with_key(mut req: Request<Body>, key: &str) -> Request<Body> {
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    req
}

fn chat(max_tokens: u64) -> serde_json::Value {
    json!({"model": TINY, "messages": [{"role": "user", "content": "hi"}],
           "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test]
async fn keys_holds_charges_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/ledger.db", dir.path().display());
    let acc = accounts(&url).await;
    let (key, account) = acc.create_key(None, "test", 10_000).await.unwrap();
    let (poor, _) = acc.create_key(None, "poor", 10).await.unwrap();
    let app = plexus_gateway::app(AppState::with_accounts(
        tiny_backend(),
        GatewayConfig::default(),
        Some(acc.clone()),
    ));

    // No key, unknown key: 401 invalid_api_key, before anything runs.
    let res = send(&app, post("/v1/chat/completions", &chat(4))).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json(res).await["error"]["code"], "invalid_api_key");
    let res = send(
        &app,
        with_key(post("/v1/chat/completions", &chat(4)), "plx-nope"),
    )
    .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    // A completion is charged exactly its completion tokens x price.
    let res = send(&app, with_key(post("/v1/chat/completions", &chat(8)), &key)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body = json(res).await;
    let n = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0);
    let res = send(&app, with_key(get("/v1/account"), &key)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let a = json(res).await;
    assert_eq!(
        a,
        json!({"account": account.to_string(), "available": 10_000 - n * PRICE,
               "escrow": 0, "spent": n * PRICE})
    );
    // The provider (here the gateway's own account) earned it, locked for the challenge window.
    let earned = acc.view(gateway_addr()).await;
    assert_eq!(earned.locked, n * PRICE);

    // Too little for the hold: 402 in OpenAI's shape, nothing held or spent.
    let res = send(
        &app,
        with_key(post("/v1/chat/completions", &chat(64)), &poor),
    )
    .await;
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    let e = json(res).await;
    assert_eq!(e["error"]["code"], "insufficient_quota");
    assert_eq!(e["error"]["type"], "insufficient_quota");
    let p = json(send(&app, with_key(get("/v1/account"), &poor)).await).await;
    assert_eq!(
        (p["available"].clone(), p["escrow"].clone()),
        (json!(10), json!(0))
    );

    // A request refused after its hold (context overflow) gives the hold back.
    let long = json!({"model": TINY, "messages": [{"role": "user", "content": "hi ".repeat(400)}],
                      "max_tokens": 4});
    let res = send(&app, with_key(post("/v1/chat/completions", &long), &key)).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    for _ in 0..100 {
        if acc.view(account).await.escrow == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(acc.view(account).await.escrow, 0);
    acc.with_store(|s| s.ledger().check_invariants())
        .await
        .unwrap();
}

#[tokio::test]
async fn escrow_left_by_a_killed_gateway_is_released_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/ledger.db", dir.path().display());
    let client = Address::repeat_byte(0x01);
    {
        // What a gateway killed mid-request leaves: an open escrow.
        let mut s = Store::open(&url, Config::default()).await.unwrap();
        s.execute(
            Op::Faucet {
                account: client,
                amount: 500,
            },
            1,
        )
        .await
        .unwrap();
        let open = Op::OpenEscrow {
            request: RequestId([5; 32]),
            client,
            gateway: gateway_addr(),
            amount: 300,
        };
        s.execute(open, 2).await.unwrap();
        s.close().await;
    }
    let acc = accounts(&url).await;
    let v = acc.view(client).await;
    assert_eq!((v.available, v.escrow, v.spent), (500, 0, 0));
}
