//! Stage receipts end to end: every computed answer of a real node carries a receipt signed by
//! its node key, a chain driver meters each provider by them, and a provider whose receipts
//! lie (more positions than it was sent, signed by itself) is not paid for them.

use crate::support::*;
use plexus_core::keys::NodeKey;
use plexus_core::receipt::{output_digest, Receipt};
use plexus_core::wire::{ErrorCode, Request, Response};
use plexus_core::Digest;
use plexus_model::generate::{generate_with, Flow};
use plexus_model::LayerSpan;
use plexus_net::{NetConfig, NetEvent, PeerId};
use plexus_node::client::{ClientConfig, NetworkClient};
use plexus_node::metering::Usage;

fn account(key: &NodeKey) -> plexus_ledger::Address {
    plexus_ledger::address_of(&key.public()).unwrap()
}

/// Generates `greedy_request` through whatever chain `bootstrap` offers; returns the tokens and
/// the chain's metered usage.
async fn generate_metered(
    bootstrap: Vec<plexus_net::Multiaddr>,
    model: Digest,
) -> (Vec<u32>, Usage) {
    let net = NetConfig::new(NodeKey::generate())
        .with_listen(Vec::new())
        .with_bootstrap(bootstrap);
    let client = NetworkClient::start(ClientConfig::new(net)).unwrap();
    assert!(client.wait_for_route(&model, LAYERS, WAIT).await);
    let reference = Reference::load();
    let tokenizer = reference.model.tokenizer.clone();
    let req = greedy_request();
    within(
        WAIT,
        "a metered generation",
        tokio::task::spawn_blocking(move || {
            let mut chain = client
                .open_chain(model, LAYERS, CONTEXT, req.sampling.clone())
                .unwrap();
            let got = generate_with(&mut chain, &tokenizer, &req, |_| Flow::Continue).unwrap();
            (got.tokens, chain.usage().clone())
        }),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_is_metered_by_its_signed_receipts() {
    let reference = Reference::load();
    let (k0, k1) = (NodeKey::generate(), NodeKey::generate());
    let (a0, a1) = (account(&k0), account(&k1));
    // Without checks: each node would also audit the other's span (both stake nothing, so
    // every job is drawn), and be paid for that work too; this test meters serving alone.
    let first = start_node(Some(LayerSpan::new(0, 1)), |c| {
        c.price = 100;
        c.net.key = k0.clone();
        c.checks = false;
    })
    .await;
    let last = start_node(Some(LayerSpan::new(1, 2)), |c| {
        c.price = 3_000;
        c.net.key = k1.clone();
        c.checks = false;
    })
    .await;

    // One call by hand: the receipt is the node's, for exactly this call.
    let c = caller(&first).await;
    let f = forward(&first, &reference, session(9), 0, &PROMPT);
    let Response::Receipted { response, receipt } =
        c.call_receipted(Request::Forward(f.clone())).await
    else {
        panic!("a computed answer without a receipt");
    };
    let mut want = Receipt::for_call(&f, 100, output_digest(&response).unwrap());
    want.signature = receipt.signature.clone();
    // Issue 11: it commits to the fingerprint of the activations it returned.
    want.commitment = plexus_node::audit::expected_commitment(
        f.position,
        f.tokens.len() as u32,
        &response,
        [0; 32],
    );
    assert_ne!(want.commitment, [0; 32]);
    assert_eq!(*receipt, want);
    assert_eq!(plexus_ledger::receipt::signer(&receipt, 31_337), Ok(a0));

    let (tokens, usage) =
        generate_metered(vec![first.addr.clone(), last.addr.clone()], first.model).await;
    assert_eq!(tokens, reference.generate(&greedy_request()));
    // Every position fed through the chain: the prompt, then each generated token but the last.
    let positions = (PROMPT.len() + tokens.len() - 1) as u64;
    assert_eq!(usage.refused, 0, "{usage:?}");
    let w0 = usage.providers[&(a0, 100)];
    let w1 = usage.providers[&(a1, 3_000)];
    assert_eq!((w0.work, w1.work), (positions, positions), "{usage:?}");
    assert_eq!(w0.calls, tokens.len() as u64);
    let costs = usage.costs();
    assert_eq!(costs[&a0], positions * 100 / 1000);
    assert_eq!(costs[&a1], positions * 3_000 / 1000);
    first.stop().await;
    last.stop().await;
}

/// A last stage announcing layers `1..2` that answers every forward with token 17 and a receipt
/// it signs itself claiming ten times the positions it was sent.
async fn inflating_liar(model: Digest) -> (NodeKey, PeerId, plexus_net::Multiaddr) {
    let key = NodeKey::generate();
    let signer = plexus_ledger::receipt::signing_key(&key).unwrap();
    let (handle, mut events, addr) = serving_peer(&key).await;
    let peer = key.peer_id();
    let mut a = announcement(&key);
    a.addrs = vec![addr.to_string()];
    a.price = 50;
    a.models = vec![scripted_offer(model, "liar", 1, 2)];
    let me = key.clone();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let NetEvent::Request { request, reply, .. } = e else {
                continue;
            };
            let response = match request {
                Request::Describe => {
                    a.issued_at_ms = plexus_node::discovery::now_ms();
                    Response::Described(a.sign(&me).encode())
                }
                Request::Forward(f) => {
                    let answer = Response::Token {
                        token: 17,
                        compute_us: 0,
                    };
                    let mut r = Receipt::for_call(&f, 50, output_digest(&answer).unwrap());
                    r.positions *= 10;
                    plexus_ledger::receipt::sign(&mut r, 31_337, &signer);
                    Response::Receipted {
                        response: Box::new(answer),
                        receipt: Box::new(r),
                    }
                }
                Request::Close { .. } => Response::Closed,
                // Claims to have forked without holding anything.
                Request::Fork { positions, .. } => Response::Forked { positions },
                Request::Voucher { .. } => Response::VoucherKept { cumulative: 0 },
                Request::Train { .. } => Response::Error {
                    code: ErrorCode::BadRequest,
                    message: "not a training peer".into(),
                },
            };
            handle.respond(reply, response).await;
        }
    });
    (key, peer, addr.with_p2p(peer).unwrap())
}

/// The liar (cheapest, so routed to first) is neither paid nor used: its answer carries no
/// receipt the chain accepts, so nothing commits it to that answer and no audit could check
/// it; the call fails over to the honest last stage, and the text is the honest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_claiming_more_than_was_sent_is_not_paid_nor_its_answer_used() {
    let first = start_node(Some(LayerSpan::new(0, 1)), |c| c.price = 100).await;
    // Priced far above the liar (1 s of latency a token's worth): routed to only after it.
    let last = start_node(Some(LayerSpan::new(1, 2)), |c| c.price = 1_000_000).await;
    let (liar, _, liar_addr) = inflating_liar(first.model).await;
    let (tokens, usage) = generate_metered(
        vec![first.addr.clone(), last.addr.clone(), liar_addr],
        first.model,
    )
    .await;
    assert_eq!(tokens, Reference::load().generate(&greedy_request()));
    assert!(usage.refused >= 1, "{usage:?}");
    assert!(
        usage.providers.keys().all(|(a, _)| *a != account(&liar)),
        "the liar was paid: {usage:?}"
    );
    assert_eq!(usage.providers.len(), 2, "{usage:?}");
    logs()
        .wait_for(&["stage call not paid", "claims positions"])
        .await;
    logs()
        .wait_for(&["without a receipt this gateway accepts"])
        .await;
    first.stop().await;
    last.stop().await;
}
