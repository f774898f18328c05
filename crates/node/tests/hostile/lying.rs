//! A stage that answers well-formed frames with the wrong content: the chain must treat it as
//! failed and go around it, so the user gets the right answer instead of an error.

use crate::support::*;
use plexus_core::keys::NodeKey;
use plexus_core::wire::{Activations, DType, ErrorCode, Request, Response};
use plexus_model::generate::{generate_with, Flow};
use plexus_model::LayerSpan;
use plexus_net::{NetConfig, NetEvent, PeerId};
use plexus_node::client::{ClientConfig, NetworkClient};

/// A peer announcing layers `0..1` of `model` as unbeatably fast, answering every forward with
/// activations `width` wide.
async fn liar(model: plexus_core::Digest, width: usize) -> (PeerId, plexus_net::Multiaddr) {
    let key = NodeKey::generate();
    let (handle, mut events, addr) = serving_peer(&key).await;
    let peer = key.peer_id();
    let mut a = announcement(&key);
    a.addrs = vec![addr.to_string()];
    a.models = vec![scripted_offer(model, "liar", 0, 1)];
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let NetEvent::Request { request, reply, .. } = e else {
                continue;
            };
            let response = match request {
                Request::Describe => {
                    a.issued_at_ms = plexus_node::discovery::now_ms();
                    Response::Described(a.sign(&key).encode())
                }
                Request::Forward(f) => {
                    let rows = f.chunk_sizes().last().copied().unwrap_or(0);
                    Response::Hidden {
                        hidden: Activations::encode(
                            &vec![0.5; rows * width],
                            rows,
                            width,
                            DType::F32,
                        ),
                        compute_us: 0,
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
    (peer, addr.with_p2p(peer).unwrap())
}

/// Issue 7: a reply of the wrong width went on to the next stage, which answered BadRequest,
/// and the user got a 400. Now the chain fails the liar over and the text is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_of_the_wrong_width_is_failed_over_issue_7() {
    let reference = Reference::load();
    let first = start_node(Some(LayerSpan::new(0, 1)), |_| {}).await;
    let last = start_node(Some(LayerSpan::new(1, 2)), |_| {}).await;
    let (liar_peer, liar_addr) = liar(first.model, HIDDEN + 1).await;
    let net = NetConfig::new(NodeKey::generate())
        .with_listen(Vec::new())
        .with_bootstrap(vec![liar_addr, last.addr.clone()]);
    let client = NetworkClient::start(ClientConfig::new(net)).unwrap();
    // Only the liar serves layer 0 when the chain opens; the honest node joins after.
    assert!(client.wait_for_route(&first.model, LAYERS, WAIT).await);
    let honest = first.addr.clone();
    let req = greedy_request();
    let want = reference.generate(&req);
    let tokenizer = reference.model.tokenizer.clone();
    let model = first.model;
    let (route, got, failovers) = within(
        WAIT,
        "a generation around the liar",
        tokio::task::spawn_blocking(move || {
            let mut chain = client
                .open_chain(model, LAYERS, CONTEXT, req.sampling.clone())
                .unwrap();
            let route = chain.route();
            let handle = client.handle().clone();
            tokio::runtime::Handle::current().block_on(handle.dial(honest));
            let got = generate_with(&mut chain, &tokenizer, &req, |_| Flow::Continue)
                .map(|g| g.tokens)
                .map_err(|e| e.to_string());
            (route, got, chain.failovers())
        }),
    )
    .await
    .unwrap();
    assert_eq!(route[0].peer, liar_peer, "the chain opens through the liar");
    assert_eq!(got.unwrap(), want);
    assert!(failovers >= 1);
    first.stop().await;
    last.stop().await;
}
