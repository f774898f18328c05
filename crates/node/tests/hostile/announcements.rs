//! Announcements on gossip. The design (crates/node/src/discovery.rs, directory.rs): an
//! announcement enters the directory only if its key matches the peer it claims, its signature
//! verifies, its time window is sane and gossip's authenticated author is that peer. Anything
//! else is refused, logged, and its sender disconnected; expired or stale ones are dropped
//! quietly (gossip lag and clock skew make them honest mistakes).

use crate::support::*;
use plexus_core::announce::MAX_TTL_MS;
use plexus_core::keys::NodeKey;
use plexus_node::discovery::now_ms;

type Forgery = Box<dyn Fn(&NodeKey, &NodeKey, &mut Bytes) -> Vec<u8>>;

/// Forged announcements; each gets the sender's key and the key of a victim it impersonates.
fn forgeries() -> Vec<(&'static str, Forgery)> {
    vec![
        (
            "claims the victim's peer id with its own key",
            Box::new(|me, victim, _| {
                let mut a = announcement(me);
                a.peer = victim.peer_id().to_string();
                a.sign(me).encode()
            }),
        ),
        (
            "carries the victim's key and id, signed by the sender",
            Box::new(|me, victim, _| announcement(victim).sign(me).encode()),
        ),
        (
            "genuinely signed by the victim, published by the sender",
            Box::new(|_, victim, _| announcement(victim).sign(victim).encode()),
        ),
        (
            "body altered after signing",
            Box::new(|me, _, _| {
                let mut s = announcement(me).sign(me);
                let at = s.body.len() - 10;
                s.body[at] ^= 0x01;
                s.encode()
            }),
        ),
        (
            "signature of other bytes",
            Box::new(|me, _, _| {
                let mut s = announcement(me).sign(me);
                s.signature = me.sign(b"something else");
                s.encode()
            }),
        ),
        (
            "time to live over the limit",
            Box::new(|me, _, _| {
                let mut a = announcement(me);
                a.ttl_ms = MAX_TTL_MS + 1;
                a.sign(me).encode()
            }),
        ),
        (
            "issued an hour from now",
            Box::new(|me, _, _| {
                let mut a = announcement(me);
                a.issued_at_ms = now_ms() + 3_600_000;
                a.sign(me).encode()
            }),
        ),
        (
            "implausible numbers: NaN speed, a span past the model (issue 7)",
            Box::new(|me, _, _| {
                let mut a = announcement(me);
                a.models[0].decode_s_per_layer = f32::NAN;
                a.models[0].end = a.models[0].num_layers + 1;
                a.sign(me).encode()
            }),
        ),
        (
            "negative speed to win every route (issue 7)",
            Box::new(|me, _, _| {
                let mut a = announcement(me);
                a.models[0].decode_s_per_layer = -1.0;
                a.sign(me).encode()
            }),
        ),
        (
            "random bytes",
            Box::new(|_, _, rng| {
                let n = 1 + (rng.next_u64() % 300) as usize;
                rng.fill(n)
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_announcements_are_refused_and_their_senders_disconnected() {
    let mut rng = Bytes(seed(0xF0_96ED));
    let reference = Reference::load();
    let node = start_node(None, |_| {}).await;

    // The path works: an honest announcement on gossip is admitted.
    let mut honest = GossipPeer::new();
    honest.join(&node).await;
    honest.publish(announcement(&honest.key).sign(&honest.key).encode());
    let id = honest.peer_id();
    assert!(honest.drive_until(|| node.knows(&id)).await);

    let victim = NodeKey::generate();
    for (what, forge) in forgeries() {
        let mut sender = GossipPeer::new();
        sender.join(&node).await;
        let refused = node.refused();
        sender.publish(forge(&sender.key, &victim, &mut rng));
        sender.wait_disconnected().await;
        assert_eq!(node.refused(), refused + 1, "{what}");
        assert!(!node.knows(&victim.peer_id()), "{what}: the victim entered");
        assert!(!node.knows(&sender.peer_id()), "{what}: the sender entered");
        logs()
            .wait_for(&["refused an announcement", &sender.peer_id().to_string()])
            .await;
    }

    // Expired: dropped quietly, the sender stays connected and its fresh announcement counts.
    let mut late = GossipPeer::new();
    late.join(&node).await;
    let ignored = node.ignored();
    let mut a = announcement(&late.key);
    a.issued_at_ms = now_ms() - 60_000;
    a.ttl_ms = 30_000;
    late.publish(a.sign(&late.key).encode());
    assert!(late.drive_until(|| node.ignored() > ignored).await);
    let id = late.peer_id();
    assert!(!node.knows(&id));
    late.publish(announcement(&late.key).sign(&late.key).encode());
    assert!(late.drive_until(|| node.knows(&id)).await);
    assert!(late.is_connected());

    // Stale: older than what the node holds for that peer; dropped quietly too.
    let known = node.directory.borrow().get(&id).unwrap().issued_at_ms;
    let mut older = announcement(&late.key);
    older.issued_at_ms = known - 1000;
    older.price = 999;
    let ignored = node.ignored();
    late.publish(older.sign(&late.key).encode());
    assert!(late.drive_until(|| node.ignored() > ignored).await);
    assert_ne!(node.directory.borrow().get(&id).unwrap().price, 999);

    assert_serves(&[&node], &reference).await;
    node.stop().await;
}
