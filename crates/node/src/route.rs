//! Route choice: the chain of stage nodes that covers layers `from..to` of a model with the
//! least expected time per token.
//!
//! Each offer is an edge from its first layer to its end; its cost is the measured round trip
//! to the node plus its compute (`decode_s_per_layer * layers`), inflated by its load, plus
//! its price converted to seconds:
//!
//! ```text
//! cost = (rtt + compute_s) * (1 + 2 * load) + price_s
//! price_s = price * layers / 1000 / time_value     (seconds a token's price is worth)
//! ```
//!
//! `price` is the node's announced micro-PLX per 1000 positions per layer and `time_value` the
//! driver's micro-PLX per second of latency per token (`ClientConfig::time_value`): a node
//! twice as dear must be faster by the price difference over `time_value` to win. Offers above
//! the driver's `max_price` never become candidates. A node that announced no KV room for a
//! new session ([`Candidate::full`]) costs [`FULL_PENALTY_S`] more: new sessions go to nodes
//! with room while any route of them exists, and to a full one only when none does (its room
//! may have freed since it announced; if not it refuses, and the chain routes around it).
//! The cheapest path over layer boundaries
//! (Dijkstra on a DAG, i.e. a forward pass in layer order) is the route. Pure: inputs in,
//! route out.

use plexus_net::PeerId;
use std::time::Duration;

/// One node's offer for a model, as routing sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub peer: PeerId,
    pub start: usize,
    pub end: usize,
    /// Expected compute per token for the whole span, in seconds.
    pub compute_s: f64,
    /// Measured round trip (unknown: a default is used).
    pub rtt: Option<Duration>,
    /// Sessions open over the most it accepts, in 0..=1 (more queueing as it fills).
    pub load: f64,
    /// Its price for one position through the span, in seconds of latency it is worth
    /// ([`price_s`]); 0 for free nodes.
    pub price_s: f64,
    /// It announced KV room for fewer than [`NEW_SESSION_POSITIONS`] positions.
    pub full: bool,
}

/// KV positions a new session needs free at a node: the first reservation a node's engine
/// makes for a session.
pub const NEW_SESSION_POSITIONS: u32 = 256;

/// Seconds added to the cost of a full node: more than any real route costs.
pub const FULL_PENALTY_S: f64 = 1e4;

/// The price of one position through `layers` layers at `price` (micro-PLX per 1000
/// position-layers), in seconds at `time_value` micro-PLX per second; 0 when `time_value` is
/// not positive (price ignored).
pub fn price_s(price: u64, layers: usize, time_value: f64) -> f64 {
    if time_value > 0.0 {
        price as f64 * layers as f64 / 1000.0 / time_value
    } else {
        0.0
    }
}

/// One stage of a chosen chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub peer: PeerId,
    pub start: usize,
    pub end: usize,
}

/// Round trip assumed for a node never pinged.
pub const DEFAULT_RTT: Duration = Duration::from_millis(20);

/// The expected seconds per token through `c`.
pub fn cost(c: &Candidate) -> f64 {
    let rtt = c.rtt.unwrap_or(DEFAULT_RTT).as_secs_f64();
    let full = if c.full { FULL_PENALTY_S } else { 0.0 };
    (rtt + c.compute_s) * (1.0 + 2.0 * c.load.clamp(0.0, 1.0)) + c.price_s.max(0.0) + full
}

/// The cheapest chain covering `from..to`, skipping `exclude`d peers; `None` if no chain
/// covers it. Ties go to the lower peer id, so every driver picks the same chain.
pub fn best_route(
    candidates: &[Candidate],
    from: usize,
    to: usize,
    exclude: &[PeerId],
) -> Option<(Vec<Hop>, f64)> {
    if from >= to {
        return None;
    }
    // best[l] = (cost to reach boundary l, index of the candidate that got there)
    let mut best: Vec<Option<(f64, usize)>> = vec![None; to + 1];
    best[from] = Some((0.0, usize::MAX));
    let mut order: Vec<usize> = (0..candidates.len())
        .filter(|&i| {
            let c = &candidates[i];
            c.start >= from && c.end <= to && c.start < c.end && !exclude.contains(&c.peer)
        })
        .collect();
    order.sort_by(|&a, &b| {
        let (ca, cb) = (&candidates[a], &candidates[b]);
        (ca.start, ca.peer.to_bytes()).cmp(&(cb.start, cb.peer.to_bytes()))
    });
    for &i in &order {
        let c = &candidates[i];
        let Some((here, _)) = best[c.start] else {
            continue;
        };
        let total = here + cost(c);
        if best[c.end].is_none_or(|(b, _)| total < b) {
            best[c.end] = Some((total, i));
        }
    }
    let (total, _) = best[to]?;
    let mut hops = Vec::new();
    let mut at = to;
    while at != from {
        let (_, i) = best[at]?;
        let c = &candidates[i];
        hops.push(Hop {
            peer: c.peer,
            start: c.start,
            end: c.end,
        });
        at = c.start;
    }
    hops.reverse();
    Some((hops, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(peer: PeerId, start: usize, end: usize, compute_s: f64) -> Candidate {
        Candidate {
            peer,
            start,
            end,
            compute_s,
            rtt: Some(Duration::from_millis(1)),
            load: 0.0,
            price_s: 0.0,
            full: false,
        }
    }

    /// Issue 8: a route through nodes with KV room wins over a faster one through a full
    /// node; with no route of nodes with room, the full one is still used.
    #[test]
    fn new_sessions_go_to_nodes_with_room_issue_8() {
        let (full, a, b) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut cands = vec![
            cand(full, 0, 30, 0.001),
            cand(a, 0, 10, 0.050),
            cand(b, 10, 30, 0.050),
        ];
        cands[0].full = true;
        let (route, _) = best_route(&cands, 0, 30, &[]).unwrap();
        assert_eq!(route.iter().map(|h| h.peer).collect::<Vec<_>>(), vec![a, b]);
        let (route, _) = best_route(&cands, 0, 30, &[b]).unwrap();
        assert_eq!(route.iter().map(|h| h.peer).collect::<Vec<_>>(), vec![full]);
    }

    #[test]
    fn price_weighs_against_speed() {
        let (fast, cheap) = (PeerId::random(), PeerId::random());
        // `fast` is 10 ms quicker per token and asks 100 micro-PLX per 1000 position-layers
        // over 10 layers (1 micro-PLX a token) more than the free `cheap`.
        let mut cands = vec![cand(fast, 0, 10, 0.010), cand(cheap, 0, 10, 0.020)];
        cands[0].price_s = price_s(100, 10, 1000.0); // 1 ms at 1000 micro-PLX/s: fast wins
        assert_eq!(best_route(&cands, 0, 10, &[]).unwrap().0[0].peer, fast);
        cands[0].price_s = price_s(100, 10, 10.0); // 100 ms at 10 micro-PLX/s: cheap wins
        assert_eq!(best_route(&cands, 0, 10, &[]).unwrap().0[0].peer, cheap);
        assert_eq!(price_s(100, 10, 0.0), 0.0);
    }

    #[test]
    fn picks_the_cheapest_cover_and_avoids_excluded_peers() {
        let (a, b, c, d) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let cands = vec![
            cand(a, 0, 10, 0.010),
            cand(b, 10, 30, 0.020),
            cand(c, 0, 30, 0.050),
            cand(d, 10, 30, 0.025),
        ];
        let (route, _) = best_route(&cands, 0, 30, &[]).unwrap();
        assert_eq!(route.iter().map(|h| h.peer).collect::<Vec<_>>(), vec![a, b]);
        let (route, _) = best_route(&cands, 0, 30, &[b]).unwrap();
        assert_eq!(route.iter().map(|h| h.peer).collect::<Vec<_>>(), vec![a, d]);
        let (route, _) = best_route(&cands, 0, 30, &[a]).unwrap();
        assert_eq!(route.iter().map(|h| h.peer).collect::<Vec<_>>(), vec![c]);
        assert!(best_route(&cands, 0, 30, &[a, c]).is_none());
        let (route, _) = best_route(&cands, 10, 30, &[b]).unwrap();
        assert_eq!(route.iter().map(|h| h.peer).collect::<Vec<_>>(), vec![d]);
    }

    proptest! {
        #[test]
        fn routes_are_contiguous_covers(
            spans in proptest::collection::vec((0usize..12, 1usize..12, 1u32..100), 1..12),
        ) {
            let peers: Vec<PeerId> = spans.iter().map(|_| PeerId::random()).collect();
            let cands: Vec<Candidate> = spans
                .iter()
                .zip(&peers)
                .map(|(&(s, len, ms), &p)| cand(p, s, (s + len).min(12), ms as f64 / 1000.0))
                .filter(|c| c.start < c.end)
                .collect();
            if let Some((route, total)) = best_route(&cands, 0, 12, &[]) {
                prop_assert_eq!(route.first().unwrap().start, 0);
                prop_assert_eq!(route.last().unwrap().end, 12);
                for w in route.windows(2) {
                    prop_assert_eq!(w[0].end, w[1].start);
                }
                // No single candidate covering everything is cheaper than the route.
                for c in cands.iter().filter(|c| c.start == 0 && c.end == 12) {
                    prop_assert!(total <= cost(c) + 1e-12);
                }
            }
        }
    }
}
