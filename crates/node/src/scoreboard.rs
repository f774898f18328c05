//! What a client measures of the peers it calls, and how routing uses it: a node's announced
//! speed is a claim; once the client has timed it, the measurement replaces the claim, and
//! recent failures make a peer dearer.
//!
//! - [`Scoreboard::record_call`]: a decode-sized call (one position) times the stage: the call's
//!   wall time minus the measured round trip, per layer, averaged (EWMA).
//! - [`Scoreboard::record_failure`]: a failed call (timeout, closed stream, wrong answer).
//!   Failures decay with every later success.
//! - [`Scoreboard::adjust`]: a routing candidate's compute becomes the measured one (when there
//!   is one), times `1 + FAILURE_WEIGHT x failures`.
//!
//! Pure: time comes in as durations measured by the caller.

use crate::route::Candidate;
use plexus_net::PeerId;
use std::collections::HashMap;
use std::time::Duration;

/// Weight of the newest sample in the average.
const ALPHA: f64 = 0.3;
/// How much one recent failure raises a peer's cost.
pub const FAILURE_WEIGHT: f64 = 4.0;
/// Peers remembered; past that the least trusted-looking entry (fewest samples) goes.
pub const MAX_PEERS: usize = 4096;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerScore {
    /// Measured seconds per layer per decoded token.
    pub decode_s_per_layer: Option<f64>,
    pub samples: u32,
    /// Recent failures, decaying by half with every success.
    pub failures: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Scoreboard {
    peers: HashMap<PeerId, PeerScore>,
}

impl Scoreboard {
    pub fn get(&self, peer: &PeerId) -> Option<&PeerScore> {
        self.peers.get(peer)
    }

    fn entry(&mut self, peer: PeerId) -> &mut PeerScore {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            if let Some(victim) = self
                .peers
                .iter()
                .min_by_key(|(p, s)| (s.samples, p.to_bytes()))
                .map(|(p, _)| *p)
            {
                self.peers.remove(&victim);
            }
        }
        self.peers.entry(peer).or_default()
    }

    /// A successful call to `peer` over `layers` layers for `positions` positions, which took
    /// `elapsed` with a round trip of `rtt`.
    pub fn record_call(
        &mut self,
        peer: PeerId,
        layers: usize,
        positions: usize,
        elapsed: Duration,
        rtt: Option<Duration>,
    ) {
        let s = self.entry(peer);
        s.failures *= 0.5;
        if positions != 1 || layers == 0 {
            return;
        }
        let compute = elapsed
            .saturating_sub(rtt.unwrap_or_default())
            .as_secs_f64();
        let per_layer = compute / layers as f64;
        s.decode_s_per_layer = Some(match s.decode_s_per_layer {
            Some(old) => old + ALPHA * (per_layer - old),
            None => per_layer,
        });
        s.samples = s.samples.saturating_add(1);
    }

    pub fn record_failure(&mut self, peer: PeerId) {
        let s = self.entry(peer);
        s.failures = (s.failures + 1.0).min(16.0);
    }

    /// Replaces the candidate's claimed compute with what was measured, and charges recent
    /// failures.
    pub fn adjust(&self, c: &mut Candidate) {
        let Some(s) = self.peers.get(&c.peer) else {
            return;
        };
        if let Some(m) = s.decode_s_per_layer {
            c.compute_s = m * (c.end - c.start) as f64;
        }
        c.compute_s *= 1.0 + FAILURE_WEIGHT * s.failures;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::route::best_route;

    /// A candidate over layers 0..10 with `compute_s` and nothing else against it.
    pub(crate) fn cand(peer: PeerId, compute_s: f64) -> Candidate {
        Candidate {
            peer,
            start: 0,
            end: 10,
            compute_s,
            rtt: Some(Duration::from_millis(1)),
            load: 0.0,
            price_s: 0.0,
            full: false,
        }
    }

    /// Issue 7: a node that claims to be fast and is much slower loses the route once the
    /// client has timed it.
    #[test]
    fn a_node_much_slower_than_it_claims_loses_the_route() {
        let (liar, honest) = (PeerId::random(), PeerId::random());
        let mut board = Scoreboard::default();
        let route = |board: &Scoreboard| {
            let mut cands = vec![cand(liar, 1e-6), cand(honest, 0.010)];
            cands.iter_mut().for_each(|c| board.adjust(c));
            best_route(&cands, 0, 10, &[]).unwrap().0[0].peer
        };
        assert_eq!(route(&board), liar, "unmeasured, the claim decides");
        for _ in 0..3 {
            board.record_call(
                liar,
                10,
                1,
                Duration::from_millis(200),
                Some(Duration::from_millis(1)),
            );
        }
        assert_eq!(route(&board), honest);
        let m = board.get(&liar).unwrap().decode_s_per_layer.unwrap();
        assert!((m - 0.0199).abs() < 1e-6, "{m}");
    }

    #[test]
    fn failures_cost_and_decay() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut board = Scoreboard::default();
        board.record_failure(a);
        let mut ca = cand(a, 0.010);
        board.adjust(&mut ca);
        assert!((ca.compute_s - 0.050).abs() < 1e-12);
        let route = |board: &Scoreboard| {
            let mut cands = vec![cand(a, 0.010), cand(b, 0.012)];
            cands.iter_mut().for_each(|c| board.adjust(c));
            best_route(&cands, 0, 10, &[]).unwrap().0[0].peer
        };
        assert_eq!(route(&board), b);
        for _ in 0..8 {
            board.record_call(a, 10, 7, Duration::from_millis(5), None);
        }
        assert_eq!(route(&board), a, "failures decay with successes");
        // Prefill calls do not count as decode timings.
        assert_eq!(board.get(&a).unwrap().decode_s_per_layer, None);
    }

    #[test]
    fn the_board_is_bounded() {
        let mut board = Scoreboard::default();
        for _ in 0..MAX_PEERS + 10 {
            board.record_failure(PeerId::random());
        }
        assert_eq!(board.peers.len(), MAX_PEERS);
    }
}
