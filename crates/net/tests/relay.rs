//! Circuit relay v2 and DCUtR between three real swarms on loopback: a relay (`--relay`), a
//! serving node that listens only through it (`--relay-via`), and a client that reaches the
//! node by the relayed address it announces. The call goes through the relay first; DCUtR
//! then punches a direct connection (on loopback it can, unless the machine is so loaded that
//! its timed attempts fail; a failed punch is tried again on a fresh circuit), the relayed one
//! is closed once idle by the client that dialed it, and calls go on over the direct one (or
//! through the relay when no hole was punched). Calls made meanwhile are never lost.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_core::keys::NodeKey;
use plexus_core::wire::{Request, Response};
use plexus_net::nat::is_relayed;
use plexus_net::{Multiaddr, NetConfig, NetEvent, NetHandle, RelayLimits};
use std::time::Duration;
use tokio::sync::mpsc;

fn loopback() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]
}

/// Waits for a listen address matching `want`.
async fn listening(
    events: &mut mpsc::Receiver<NetEvent>,
    want: impl Fn(&Multiaddr) -> bool,
) -> Multiaddr {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.recv().await {
                Some(NetEvent::Listening(a)) if want(&a) => return a,
                Some(_) => {}
                None => panic!("the network stopped"),
            }
        }
    })
    .await
    .expect("no such listen address in time")
}

/// Answers every Describe with `name` (the node's side of the test).
fn answer(handle: NetHandle, mut events: mpsc::Receiver<NetEvent>, name: &'static [u8]) {
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let NetEvent::Request { reply, .. } = e {
                handle
                    .respond(reply, Response::Described(name.to_vec()))
                    .await;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listening_through_a_relay_is_called_relayed_then_direct_after_dcutr() {
    // The relay.
    let relay_key = NodeKey::generate();
    let relay_id = relay_key.peer_id();
    let (relay, mut relay_events) = plexus_net::start(
        NetConfig::new(relay_key)
            .with_listen(loopback())
            .with_relay(Some(RelayLimits::default())),
    )
    .unwrap();
    let relay_addr = listening(&mut relay_events, |_| true)
        .await
        .with_p2p(relay_id)
        .unwrap();
    answer(relay, relay_events, b"relay");

    // The node: listens through the relay whatever AutoNAT says.
    let node_key = NodeKey::generate();
    let node_id = node_key.peer_id();
    let (node, mut node_events) = plexus_net::start(
        NetConfig::new(node_key)
            .with_listen(loopback())
            .with_relay_via(vec![relay_addr.clone()]),
    )
    .unwrap();
    let circuit = listening(&mut node_events, is_relayed).await;
    assert!(
        circuit.to_string().contains(&relay_id.to_string()),
        "{circuit}"
    );
    let status = node.nat().await.unwrap();
    assert_eq!(status.relays, vec![relay_id]);
    answer(node.clone(), node_events, b"node");
    let client_key = NodeKey::generate();
    let client_id = client_key.peer_id();

    // The client knows the node only by its relayed address.
    let (client, mut client_events) = plexus_net::start(
        // It serves stage calls too (as a node does): the node calls it back.
        NetConfig::new(client_key)
            .with_listen(loopback())
            .with_bootstrap(vec![relay_addr]),
    )
    .unwrap();
    // Circuits are opened over the connection to the relay: dialing through it while the
    // bootstrap dial is still under way is refused by libp2p (one dial per peer at a time).
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match client_events.recv().await {
                Some(NetEvent::Connected(p)) if p == relay_id => break,
                Some(_) => {}
                None => panic!("the network stopped"),
            }
        }
    })
    .await
    .expect("the client never reached the relay");
    answer(client.clone(), client_events, b"client");
    client.add_address(node_id, circuit.clone()).await;
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        client.call(node_id, Request::Describe),
    )
    .await
    .expect("the relayed call hung")
    .unwrap();
    assert_eq!(got, Response::Described(b"node".to_vec()));
    // Calls keep coming, both ways, while DCUtR punches the hole and the relayed connection
    // is retired: none of them may be lost with it (closing the relayed connection between
    // two answers would cut a call already sent on it). Held calls go out once the relayed
    // connection is gone, well before the 5 s limit on holding them.
    let busy = |from: NetHandle, to, name: &'static [u8]| {
        tokio::spawn(async move {
            for _ in 0..50 {
                let got =
                    tokio::time::timeout(Duration::from_secs(4), from.call(to, Request::Describe))
                        .await
                        .expect("a call was held back for the hold limit or hung");
                assert_eq!(got.unwrap(), Response::Described(name.to_vec()));
            }
        })
    };
    let callers: Vec<_> = (0..4)
        .map(|i| {
            if i % 2 == 0 {
                busy(client.clone(), node_id, b"node")
            } else {
                busy(node.clone(), client_id, b"client")
            }
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }

    // DCUtR upgrades the connection (on loopback an AutoNAT dial-back may open a direct one
    // first); the relayed one goes once no call is in flight. On a heavily loaded machine
    // DCUtR can give up (three attempts, timed by a measured round trip, then fresh circuits
    // for more): then the calls must still go through the relay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let direct = loop {
        let link = client
            .links()
            .await
            .into_iter()
            .find(|l| l.peer == node_id)
            .expect("connected to the node");
        if link.relayed == 0 && link.direct > 0 {
            eprintln!("direct: {link:?}");
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("no direct connection within 20 s: {link:?}");
            assert_eq!(
                link.direct, 0,
                "a direct connection, yet the relayed one was kept"
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for _ in 0..3 {
        let got = client.call(node_id, Request::Describe).await.unwrap();
        assert_eq!(got, Response::Described(b"node".to_vec()));
    }
    let link = client
        .links()
        .await
        .into_iter()
        .find(|l| l.peer == node_id)
        .unwrap();
    if direct {
        assert_eq!(
            link.relayed, 0,
            "calls went over the direct connection only"
        );
        assert!(link.direct >= 1);
    }
}

#[tokio::test]
async fn a_relay_address_without_the_relays_peer_id_is_refused_at_start() {
    let bare: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
    let err = plexus_net::start(
        NetConfig::new(NodeKey::generate())
            .with_listen(loopback())
            .with_relay_via(vec![bare]),
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("/p2p/"), "{err}");
}
