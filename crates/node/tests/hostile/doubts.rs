//! Reputation in placement (issue 11): a gateway the nodes trust (`--trust-verdicts`) doubts a
//! node (audit misses the referees confirmed, improbable for an honest node, short of a
//! conviction) and announces it. Nodes on `plexus up`'s placement put their spare beside the
//! doubted node's span, so routing, which prefers reputable nodes, has one to prefer there; the
//! doubted node keeps its span (a doubt is not proof). Once a clean run clears it, the gateway
//! says so and the nodes go back to copying the costliest stage. The gateway is a real
//! [`NetworkClient`]; its misses are recorded straight into its audit book (the audits and
//! disputes that record them are tested in [`crate::audits`] and `plexus_node::audit`).

use crate::support::*;
use plexus_core::keys::NodeKey;
use plexus_model::LayerSpan;
use plexus_net::{NetConfig, PeerId};
use plexus_node::client::{ClientConfig, NetworkClient};
use plexus_node::service::{AutoPlacement, NodeConfig};
use std::collections::HashMap;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// Each node's span as another node's directory has it (`None` until every one is seen).
fn spans_seen(nodes: &[&TestNode]) -> Option<HashMap<PeerId, (u32, u32)>> {
    let mut out = HashMap::new();
    for n in nodes {
        let observer = nodes.iter().find(|o| o.peer != n.peer)?;
        let dir = observer.directory.borrow();
        let offers = dir.offers(&n.model);
        let (_, _, o) = offers.iter().find(|(p, _, _)| *p == n.peer)?;
        out.insert(n.peer, (o.start, o.end));
    }
    Some(out)
}

fn count(spans: &HashMap<PeerId, (u32, u32)>, span: (u32, u32)) -> usize {
    spans.values().filter(|s| **s == span).count()
}

/// Waits until `done` holds of the spans the nodes announce.
async fn until(
    nodes: &[&TestNode],
    limit: Duration,
    what: &str,
    done: impl Fn(&HashMap<PeerId, (u32, u32)>) -> bool,
) -> HashMap<PeerId, (u32, u32)> {
    within(limit, what, async {
        loop {
            if let Some(s) = spans_seen(nodes).filter(|s| done(s)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_goes_beside_the_node_a_trusted_gateway_doubts_and_back_issue_11() {
    let gateway_key = NodeKey::generate();
    let trusted = gateway_key.peer_id();
    let placed = move |c: &mut NodeConfig, bootstrap: Vec<plexus_net::Multiaddr>| {
        // `plexus up`'s placement: interchangeable nodes, two stages.
        c.auto = Some(AutoPlacement {
            stages: Some(2),
            every: Duration::from_millis(200),
            equal_speeds: true,
        });
        c.trust_verdicts = vec![trusted];
        c.announce_every = Duration::from_millis(200);
        c.net = c.net.clone().with_bootstrap(bootstrap);
    };
    let a = start_node(Some(LayerSpan::new(0, 1)), |c| placed(c, Vec::new())).await;
    let b = start_node(Some(LayerSpan::new(1, 2)), |c| {
        placed(c, vec![a.addr.clone()])
    })
    .await;
    let c = start_node(Some(LayerSpan::new(0, 1)), |c| {
        placed(c, vec![a.addr.clone(), b.addr.clone()])
    })
    .await;
    let nodes = [&a, &b, &c];
    let gateway = NetworkClient::start(ClientConfig::new(
        NetConfig::new(gateway_key)
            .with_listen(Vec::new())
            .with_bootstrap(nodes.iter().map(|n| n.addr.clone()).collect()),
    ))
    .unwrap();
    // The plan's spare copies the costliest stage (the first, all being equal): as started.
    let clear = |s: &HashMap<PeerId, (u32, u32)>| count(s, (0, 1)) == 2 && count(s, (1, 2)) == 1;
    let before = until(&nodes, MINUTE, "the nodes announce their spans", clear).await;
    assert_eq!(before[&b.peer], (1, 2), "{before:?}");

    // b, alone on 1..2, misses twice in three cross-build comparisons the referees confirmed:
    // doubted (not convicted). A spare moves beside it; b stays.
    {
        let mut book = gateway.book();
        for missed in [true, false, true] {
            assert!(!book.on_cross_check(b.peer, false, missed));
        }
        assert_eq!(book.doubted(), vec![b.peer]);
    }
    let beside = |s: &HashMap<PeerId, (u32, u32)>| count(s, (0, 1)) == 1 && count(s, (1, 2)) == 2;
    let doubting = until(
        &nodes,
        MINUTE,
        "a spare moves beside the doubted node",
        beside,
    )
    .await;
    assert_eq!(doubting[&b.peer], (1, 2), "the doubted node keeps its span");
    // And stays there while the doubt lasts (the plan after the move asks for no other).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(spans_seen(&nodes), Some(doubting));

    // A long clean run clears it; the gateway announces that at once (sooner than its
    // earlier announcement expires, 30 s), and the spare goes back to the costliest stage.
    {
        let mut book = gateway.book();
        for _ in 0..200 {
            book.on_cross_check(b.peer, false, false);
        }
        assert!(book.doubted().is_empty());
    }
    let cleared = "the spare goes back once the doubt is cleared";
    until(&nodes, Duration::from_secs(20), cleared, clear).await;
    assert_serves(&nodes, &Reference::load()).await;
    drop(gateway);
    for n in [a, b, c] {
        n.stop().await;
    }
}
