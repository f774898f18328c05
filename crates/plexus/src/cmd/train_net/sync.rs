//! Step 4 of a worker's round (see the parent module): before fixing its set, a worker fetches
//! the contributions to the round that its peers hold and it misses, so that every worker
//! closes on the same set.
//!
//! 1. It waits until the payloads offered to it for the round have come or their fetches
//!    failed ([`super::offers`]).
//! 2. It asks every peer which contributions it holds (`Held`) and fetches the missing ones
//!    (`Fetch`): whole, or, for a payload too large for one message, the signed commitment
//!    first, checked as a push would be ([`Shared::check_relayed`]: worker, round, signature,
//!    start, settings, length) before any byte of the payload is asked of that peer in ranges.
//!    A peer that fails to deliver one is not asked for the rest of its list this pass.
//! 3. It asks every peer which offers it is still fetching (`Pending`); while one of them is a
//!    valid contribution this worker misses, it waits and goes back to 2 (that peer will hold
//!    it and close with it), for at most the time a payload of the codec's largest size may
//!    take ([`payload_budget`]). Without this, a worker whose offer one peer failed to fetch
//!    (a lost link, or a worker serving one peer and stalling another) would have it in one
//!    peer's set and not in the other's.
//!
//! A fetched contribution counts as arriving just before the deadline: it was on time where it
//! arrived.

use super::peers::{payload_budget, Fetched, Peers};
use super::shared::Shared;
use super::{lock, Worker, POLL};
use plexus_net::PeerId;
use plexus_train::local::LocalData;
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
        let n = self.n;
        let until = Instant::now() + payload_budget(self.cfg.codec.encoded_len(n));
        let mut synced = 0;
        loop {
            synced += self.fetch_listed(peers, shared, round).await;
            if !self.fetched_elsewhere(peers, shared, round).await || Instant::now() >= until {
                return synced;
            }
            tokio::time::sleep(PENDING_POLL).await;
        }
    }

    /// One pass of step 2 (module docs).
    async fn fetch_listed(&self, peers: &Peers, shared: &Mutex<Shared>, round: u64) -> usize {
        let targets: Vec<PeerId> = lock(shared).peers.keys().copied().collect();
        let lists = futures::future::join_all(
            targets
                .into_iter()
                .map(|p| async move { (p, peers.held(p, round).await) }),
        )
        .await;
        let max = self.cfg.max_workers as usize;
        let mut synced = 0;
        for (peer, list) in lists {
            for entry in list.unwrap_or_default().into_iter().take(max) {
                if lock(shared).held.contains_key(&entry.worker) {
                    continue;
                }
                let worker = entry.worker.clone();
                let fetched = peers
                    .fetch(peer, round, entry.worker, entry.commitment)
                    .await;
                let c = match fetched {
                    Some(Fetched::Whole(c)) => Some(c),
                    Some(Fetched::Offered(signed)) => {
                        let checked = {
                            let mut s = lock(shared);
                            let at = self.listed_at(&s, &worker);
                            s.check_relayed(&signed, &worker, round, at)
                        };
                        match checked {
                            Ok(()) => peers.payload(peer, &signed).await,
                            Err(why) => {
                                eprintln!("{peer} relayed a contribution to round {} that is refused: {why}", round + 1);
                                None
                            }
                        }
                    }
                    None => None,
                };
                let Some(c) = c else {
                    eprintln!(
                        "{peer} did not send the contribution it listed for round {} (no answer in time, not held, or not the listed one); not asked for the rest of its list",
                        round + 1
                    );
                    break;
                };
                let mut s = lock(shared);
                let at = self.listed_at(&s, &worker);
                match s.receive(c, at) {
                    Ok(()) => synced += 1,
                    Err(why) => eprintln!(
                        "a contribution {peer} holds for round {} was refused: {why}",
                        round + 1
                    ),
                }
            }
        }
        synced
    }

    /// When `worker`'s contribution fetched from a peer counts as arriving: now, or just
    /// before its deadline if that has passed (it was on time where it arrived).
    fn listed_at(&self, s: &Shared, worker: &[u8]) -> u64 {
        self.now()
            .min(s.machine.deadline_of(worker).saturating_sub(1))
    }

    /// Step 3 (module docs): whether a peer is still fetching a valid contribution to `round`
    /// that this worker misses.
    async fn fetched_elsewhere(&self, peers: &Peers, shared: &Mutex<Shared>, round: u64) -> bool {
        let targets: Vec<PeerId> = lock(shared).peers.keys().copied().collect();
        let lists = futures::future::join_all(
            targets
                .into_iter()
                .map(|p| async move { peers.pending(p, round).await }),
        )
        .await;
        let max = self.cfg.max_workers as usize;
        let mut s = lock(shared);
        let mut seen = BTreeSet::new();
        lists
            .into_iter()
            .flat_map(|l| l.unwrap_or_default().into_iter().take(max))
            .filter(|signed| seen.insert(signed.commitment.digest()))
            .any(|signed| {
                let worker = signed.commitment.worker.clone();
                let at = self.listed_at(&s, &worker);
                !s.held.contains_key(&worker)
                    && s.check_relayed(&signed, &worker, round, at).is_ok()
            })
    }
}
