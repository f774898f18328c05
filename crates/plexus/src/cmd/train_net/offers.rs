//! Contributions too large for one message ([`plexus_train::protocol::travels_whole`]): their
//! workers offer the signed commitment, and the receiver fetches the payload in ranges from
//! the offering worker before the round's set is fixed.
//!
//! An offer is checked like a push, all but the payload ([`Shared::offer`]): a forged, stale,
//! replayed or late commitment is refused at once, before any byte of payload is asked. An
//! accepted offer is pending until its payload came and was checked against the committed
//! digest and length ([`fetch_offered`]); then it is received as a push that arrived when the
//! offer did (the commitment binds the payload, so the deadline measures when the work was
//! done, not how long its bytes took). A worker fixing a round's set first waits for the
//! round's pending offers ([`Offers::pending_for`]), and for those its peers are still
//! fetching (listed by `Pending`) that it misses ([`super::sync`]); each fetch is bounded by its
//! bytes on a slow link ([`super::peers::Peers::payload`]), and a worker whose fetch failed
//! cannot offer again in that round nor is asked for it directly, so a worker that offers and
//! then serves slowly delays a round by at most about twice that bound (its offer's fetch, then
//! the sync's); a failed fetch leaves the contribution to the sync from the peers that hold it.
//!
//! Only a worker offers its own contribution (others relay through `Held`/`Fetch`), so a peer
//! cannot block a worker's contribution by offering it first and then not serving it.

use super::lock;
use super::peers::Peers;
use super::shared::{worker_name, Shared};
use plexus_net::PeerId;
use plexus_train::commit::Signed;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// An accepted offer whose payload is to be fetched.
#[derive(Clone, Debug)]
pub struct Offered {
    pub from: PeerId,
    pub signed: Signed,
    /// When the offer arrived (ms since the worker's epoch): the contribution's arrival.
    pub at_ms: u64,
}

/// Offers being fetched, by (round, worker), those not yet handed to a fetch task, and those
/// whose fetch failed (not taken again in that round).
#[derive(Default)]
pub struct Offers {
    pending: BTreeMap<(u64, Vec<u8>), Signed>,
    queue: Vec<Offered>,
    failed: BTreeSet<(u64, Vec<u8>)>,
}

impl Offers {
    /// Whether `worker`'s contribution to `round` is being fetched.
    pub fn is_pending(&self, round: u64, worker: &[u8]) -> bool {
        self.pending.contains_key(&(round, worker.to_vec()))
    }

    /// Whether any contribution to `round` is being fetched.
    pub fn pending_for(&self, round: u64) -> bool {
        self.pending.keys().any(|(r, _)| *r == round)
    }

    /// Offers being fetched for `round`.
    pub fn count_for(&self, round: u64) -> usize {
        self.pending.keys().filter(|(r, _)| *r == round).count()
    }

    /// The commitments of the offers to `round` being fetched.
    pub fn pending_of(&self, round: u64) -> Vec<Signed> {
        self.pending
            .iter()
            .filter(|((r, _), _)| *r == round)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Whether `worker`'s offer for `round` was fetched and failed: its worker did not serve
    /// the committed bytes in time, and another offer of it this round is refused (a worker
    /// re-offering after every failure would hold the round's sync open again and again).
    pub fn failed(&self, round: u64, worker: &[u8]) -> bool {
        self.failed.contains(&(round, worker.to_vec()))
    }

    /// Keeps `offer` as pending and queues its fetch.
    pub fn add(&mut self, offer: Offered) {
        let cm = &offer.signed.commitment;
        self.pending
            .insert((cm.round, cm.worker.clone()), offer.signed.clone());
        self.queue.push(offer);
    }

    /// The offers whose fetch is to start.
    pub fn take_queue(&mut self) -> Vec<Offered> {
        std::mem::take(&mut self.queue)
    }

    /// Ends the fetch of `worker`'s contribution to `round`: `ok` when its payload came.
    pub fn settle(&mut self, round: u64, worker: &[u8], ok: bool) {
        self.pending.remove(&(round, worker.to_vec()));
        if !ok {
            // Older rounds' failures are forgotten (bounded by the workers of two rounds).
            self.failed.retain(|(r, _)| *r + 1 >= round);
            self.failed.insert((round, worker.to_vec()));
        }
    }
}

/// Fetches the payload of `offer` from its worker and receives the contribution as arriving
/// when the offer did; the offer is settled either way.
pub async fn fetch_offered(peers: Peers, shared: Arc<Mutex<Shared>>, offer: Offered) {
    let cm = &offer.signed.commitment;
    let (round, worker) = (cm.round, cm.worker.clone());
    let got = peers.payload(offer.from, &offer.signed).await;
    let mut s = lock(&shared);
    s.offers.settle(round, &worker, got.is_some());
    let Some(c) = got else {
        eprintln!(
            "the payload of {}'s contribution to round {} did not come from it (no answer in time, not held, or not the committed bytes)",
            worker_name(&worker),
            round + 1
        );
        return;
    };
    if let Err(why) = s.receive(c, offer.at_ms) {
        s.refused += 1;
        eprintln!(
            "refused the contribution {} offered for round {} once its payload came: {why}",
            worker_name(&worker),
            round + 1
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::keys::NodeKey;
    use plexus_core::Digest;
    use plexus_train::commit::Commitment;

    fn offer(round: u64, key: &NodeKey) -> Offered {
        let commitment = Commitment {
            run: Digest::of(b"run"),
            round,
            worker: key.peer_id().to_bytes(),
            start_weights: Digest::of(b"w"),
            start_optimizer: Digest::of(b"o"),
            start_residual: Digest::of(b"r"),
            examples: Digest::of(b"e"),
            seed: 1,
            first_step: 0,
            inner_steps: 1,
            batch_size: 1,
            hyper: Digest::of(b"h"),
            payload: Digest::of(b"p"),
            payload_len: 1,
            end_optimizer: Digest::of(b"eo"),
            end_residual: Digest::of(b"er"),
            reveal: Digest::of(b"n"),
        };
        Offered {
            from: key.peer_id(),
            signed: Signed::sign(key, commitment),
            at_ms: 5,
        }
    }

    #[test]
    fn offers_stay_pending_until_settled() {
        let (a, b) = (
            NodeKey::from_secret([1; 32]).unwrap(),
            NodeKey::from_secret([2; 32]).unwrap(),
        );
        let mut o = Offers::default();
        o.add(offer(3, &a));
        o.add(offer(4, &b));
        assert!(o.is_pending(3, &a.peer_id().to_bytes()));
        assert!(!o.is_pending(4, &a.peer_id().to_bytes()));
        assert_eq!((o.count_for(3), o.count_for(4)), (1, 1));
        assert_eq!(o.take_queue().len(), 2);
        assert!(o.take_queue().is_empty());
        assert_eq!(o.pending_of(3).len(), 1);
        o.settle(3, &a.peer_id().to_bytes(), false);
        assert!(!o.pending_for(3) && o.pending_of(3).is_empty());
        assert!(o.failed(3, &a.peer_id().to_bytes()));
        assert!(!o.failed(4, &b.peer_id().to_bytes()));
        o.settle(4, &b.peer_id().to_bytes(), true);
        assert!(!o.failed(4, &b.peer_id().to_bytes()));
        // Failures two rounds old are forgotten.
        o.settle(5, &b.peer_id().to_bytes(), false);
        assert!(!o.failed(3, &a.peer_id().to_bytes()));
        o.add(offer(4, &b));
        assert!(o.pending_for(4));
    }
}
