//! Step 4 of a worker's round (see the parent module): before fixing its set, a worker fetches
//! the contributions to the round that its peers hold and it misses, so that every worker
//! closes on the same set.
//!
//! 1. It waits until the payloads offered to it for the round have come or their fetches
//!    failed ([`super::offers`]).
//! 2. It asks every peer (not convicted, staked, not stuck behind) which contributions it
//!    holds (`Held`) and fetches the missing ones (`Fetch`): whole, or, for a payload too large
//!    for one message, the signed commitment first, checked as a push would be
//!    ([`Shared::check_relayed`]: worker, round, signature, start, settings, length) before
//!    any byte of the payload is asked of that peer in ranges. A peer that does not deliver
//!    one is not asked for the rest of its list; one whose relay this worker's own rules refuse
//!    (a worker it convicted) is asked for the rest. A (peer, worker) pair that failed is not
//!    asked again this round, nor a worker for its own contribution after its offer failed.
//! 3. It asks every peer which offers it is still fetching (`Pending`; a worker listing its
//!    own is not believed, nor one of a worker that is not a known peer of the run, and a run
//!    whose payloads travel whole skips this step); while one of them is a valid contribution this worker misses, or
//!    an offer made to this worker meanwhile is still being fetched, it waits and goes back
//!    to 2 (that peer will hold it and close with it). Every fetch and wait ends within the
//!    time a payload of the codec's largest size may take from when the sync began
//!    ([`payload_budget`]). Without step 3, a worker whose offer one peer failed to fetch (a
//!    lost link, or a worker serving one peer and stalling another) would be in one peer's
//!    set and not in the other's.
//!
//! A fetched contribution counts as arriving just before the deadline: it was on time where it
//! arrived.

use super::peers::{payload_budget, Fetched, Peers};
use super::shared::Shared;
use super::{lock, Worker, POLL};
use plexus_net::PeerId;
use plexus_train::commit::Contribution;
use plexus_train::local::LocalData;
use plexus_train::protocol::HeldEntry;
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a worker asks again what its peers are still fetching.
const PENDING_POLL: Duration = Duration::from_millis(500);

impl<D: LocalData + Send + Sync + 'static> Worker<D> {
    /// Fetches the contributions to `round` that peers hold and this worker misses (module
    /// docs); how many it took.
    pub(super) async fn sync(&self, peers: &Peers, shared: &Mutex<Shared>, round: u64) -> usize {
        while lock(shared).offers.pending_for(round) {
            tokio::time::sleep(POLL).await;
        }
        let until = Instant::now() + payload_budget(self.cfg.codec.encoded_len(self.n));
        // (peer, worker) pairs that failed: not asked again this round.
        let mut failed = BTreeSet::new();
        let mut synced = 0;
        loop {
            synced += self
                .fetch_listed(peers, shared, round, until, &mut failed)
                .await;
            let waiting = lock(shared).offers.pending_for(round)
                || self.fetched_elsewhere(peers, shared, round).await;
            if !waiting || Instant::now() >= until {
                return synced;
            }
            tokio::time::sleep(PENDING_POLL).await;
        }
    }

    /// The peers to sync from: not convicted, not under the run's stake, not stuck behind.
    fn sources(&self, shared: &Mutex<Shared>) -> Vec<PeerId> {
        let s = lock(shared);
        s.peers
            .keys()
            .filter(|p| !s.excluded(&p.to_bytes()) && !s.stuck(p))
            .copied()
            .collect()
    }

    /// One pass of step 2 (module docs), each fetch within `until`; a (peer, worker) pair that
    /// fails is added to `failed` and not asked again.
    async fn fetch_listed(
        &self,
        peers: &Peers,
        shared: &Mutex<Shared>,
        round: u64,
        until: Instant,
        failed: &mut BTreeSet<(PeerId, Vec<u8>)>,
    ) -> usize {
        let lists = futures::future::join_all(
            self.sources(shared)
                .into_iter()
                .map(|p| async move { (p, peers.held(p, round).await) }),
        )
        .await;
        let max = self.cfg.max_workers as usize;
        let mut synced = 0;
        for (peer, list) in lists {
            for entry in list.unwrap_or_default().into_iter().take(max) {
                let worker = entry.worker.clone();
                {
                    let s = lock(shared);
                    // A worker whose own offer to this one did not deliver is not asked again.
                    let refused_offer =
                        peer.to_bytes() == worker && s.offers.failed(round, &worker);
                    if s.held.contains_key(&worker)
                        || s.excluded(&worker)
                        || refused_offer
                        || failed.contains(&(peer, worker.clone()))
                    {
                        continue;
                    }
                }
                let left = until.saturating_duration_since(Instant::now());
                let fetch = self.fetch_one(peers, shared, peer, round, entry);
                let c = match tokio::time::timeout(left, fetch).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(Refused(why))) => {
                        // A valid answer this worker's own rules refuse (a worker it convicted,
                        // say): the peer's other entries are still asked.
                        eprintln!(
                            "{peer} relayed a contribution to round {} that is refused: {why}",
                            round + 1
                        );
                        failed.insert((peer, worker));
                        continue;
                    }
                    Ok(Err(NotSent)) | Err(_) => {
                        eprintln!(
                            "{peer} did not send the contribution it listed for round {} (no answer in time, not held, or not the listed one); not asked for the rest of its list",
                            round + 1
                        );
                        failed.insert((peer, worker));
                        break;
                    }
                };
                let mut s = lock(shared);
                let at = self.listed_at(&s);
                match s.receive(c, at) {
                    Ok(()) => synced += 1,
                    Err(why) => {
                        eprintln!(
                            "a contribution {peer} holds for round {} was refused: {why}",
                            round + 1
                        );
                        failed.insert((peer, worker));
                    }
                }
            }
        }
        synced
    }

    /// The contribution `entry` names, from `peer`: whole, or its commitment checked before its
    /// payload is asked in ranges.
    async fn fetch_one(
        &self,
        peers: &Peers,
        shared: &Mutex<Shared>,
        peer: PeerId,
        round: u64,
        entry: HeldEntry,
    ) -> Result<Contribution, Miss> {
        let worker = entry.worker.clone();
        match peers
            .fetch(peer, round, entry.worker, entry.commitment)
            .await
        {
            Some(Fetched::Whole(c)) => Ok(c),
            Some(Fetched::Offered(signed)) => {
                {
                    let mut s = lock(shared);
                    let at = self.listed_at(&s);
                    s.check_relayed(&signed, &worker, round, at)
                        .map_err(Refused)?;
                }
                peers.payload(peer, &signed).await.ok_or(NotSent)
            }
            None => Err(NotSent),
        }
    }

    /// When a contribution fetched from a peer counts as arriving: now, or just before the
    /// deadline if that has passed (it was on time where it arrived).
    fn listed_at(&self, s: &Shared) -> u64 {
        self.now().min(s.machine.deadline_at().saturating_sub(1))
    }

    /// Step 3 (module docs): whether a peer is still fetching a valid contribution to `round`
    /// that this worker misses (a worker listing its own offer as pending is not believed:
    /// nobody fetches its own). Only for a run whose payloads are offered (too large for one
    /// message: others are never fetched in ranges), and only a contribution of a worker this
    /// one knows as a peer of the run: a listing of a commitment signed by a throwaway key
    /// would otherwise hold every round's sync for a payload's time.
    async fn fetched_elsewhere(&self, peers: &Peers, shared: &Mutex<Shared>, round: u64) -> bool {
        if plexus_train::protocol::travels_whole(self.cfg.codec.encoded_len(self.n)) {
            return false;
        }
        let lists = futures::future::join_all(
            self.sources(shared)
                .into_iter()
                .map(|p| async move { (p, peers.pending(p, round).await) }),
        )
        .await;
        let max = self.cfg.max_workers as usize;
        let mut s = lock(shared);
        let at = self.listed_at(&s);
        let mut seen = BTreeSet::new();
        lists
            .into_iter()
            .flat_map(|(p, l)| {
                l.unwrap_or_default()
                    .into_iter()
                    .take(max)
                    .map(move |signed| (p, signed))
            })
            .filter(|(p, signed)| {
                p.to_bytes() != signed.commitment.worker && seen.insert(signed.commitment.digest())
            })
            .any(|(_, signed)| {
                let worker = signed.commitment.worker.clone();
                let known = PeerId::from_bytes(&worker).is_ok_and(|p| s.peers.contains_key(&p));
                known
                    && !s.held.contains_key(&worker)
                    && !s.excluded(&worker)
                    && s.check_relayed(&signed, &worker, round, at).is_ok()
            })
    }
}

/// Why a listed contribution was not taken from a peer.
enum Miss {
    /// Its commitment is refused by this worker's own rules (the peer may be honest).
    Refused(String),
    /// No answer in time, not held, another one than listed, or not the committed bytes.
    NotSent,
}
use Miss::{NotSent, Refused};
