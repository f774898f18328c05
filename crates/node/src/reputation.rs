//! Reputation in routing: the gateway's published score of each node
//! ([`plexus_verify::reputation::Record::score`]) from what the gateway itself measured, and
//! how routing uses it.
//!
//! ```text
//! score        = trust x availability x speed x doubt  (0 once convicted: never routed to)
//! trust        = (audits passed + 1) / (audits passed + 2 + 10 x audits missed)
//! doubt        = 0.1 while this gateway doubts the node (`AuditBook::doubted`), else 1
//! availability = (calls answered + 1) / (calls + 1)     (uptime as the gateway saw it)
//! speed        = min(1, sqrt(reference / latency))
//! latency      = the node's decode seconds per layer as this gateway timed them
//!                (the scoreboard's average, round trip removed; never the node's claim)
//! reference    = the median of those latencies over the model's measured nodes
//! ```
//!
//! A node not yet timed has speed 1 (nothing measured against it); a node with no history at
//! all scores 0.5. Routing divides a candidate's expected compute time by the score (at least
//! [`MIN_SCORE`]): a new node's time counts double, a long honest, available and fast record
//! brings the factor near 1. A slow node is charged twice on purpose, once by its measured
//! time and once by its lower reputation (by the square root, so a node twice as slow as the
//! median costs 2 x 1.41 = 2.8 times the median's time, not 4 times).

use crate::audit::AuditBook;
use crate::route::Candidate;
use crate::scoreboard::Scoreboard;
use plexus_net::PeerId;

/// The least score routing divides by: a poor record costs at most 20 times its time (it is
/// still used when nothing else serves the span).
pub const MIN_SCORE: f64 = 0.05;

/// The median of the measured per-layer decode latencies of `peers`, if any was measured.
pub fn reference_latency<'a>(
    scores: &Scoreboard,
    peers: impl IntoIterator<Item = &'a PeerId>,
) -> Option<f64> {
    let mut measured: Vec<f64> = peers
        .into_iter()
        .filter_map(|p| scores.get(p)?.decode_s_per_layer)
        .filter(|s| s.is_finite() && *s > 0.0)
        .collect();
    if measured.is_empty() {
        return None;
    }
    measured.sort_by(f64::total_cmp);
    let n = measured.len();
    Some(if n % 2 == 1 {
        measured[n / 2]
    } else {
        0.5 * (measured[n / 2 - 1] + measured[n / 2])
    })
}

/// Drops convicted candidates and divides each other one's expected compute time by its
/// score (module docs).
pub fn weigh(book: &AuditBook, scores: &Scoreboard, candidates: &mut Vec<Candidate>) {
    candidates.retain(|c| !book.is_convicted(&c.peer));
    let reference = reference_latency(scores, candidates.iter().map(|c| &c.peer));
    for c in candidates.iter_mut() {
        c.compute_s /= score(book, scores, &c.peer, reference).max(MIN_SCORE);
    }
}

/// `peer`'s published score against `reference` ([`reference_latency`]).
pub fn score(book: &AuditBook, scores: &Scoreboard, peer: &PeerId, reference: Option<f64>) -> f64 {
    let latency = scores.get(peer).and_then(|s| s.decode_s_per_layer);
    book.score(peer, latency, reference)
}

/// The published score of each of `peers` (what `/metrics` shows), the reference being the
/// median over them all.
pub fn published(book: &AuditBook, scores: &Scoreboard, peers: &[PeerId]) -> Vec<(PeerId, f64)> {
    let reference = reference_latency(scores, peers);
    peers
        .iter()
        .map(|p| (*p, score(book, scores, p, reference)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::best_route;
    use crate::scoreboard::tests::cand;
    use std::time::Duration;

    fn timed(scores: &mut Scoreboard, peer: PeerId, ms_per_token: u64) {
        for _ in 0..4 {
            scores.record_call(peer, 10, 1, Duration::from_millis(ms_per_token), None);
        }
    }

    #[test]
    fn the_median_of_what_was_measured() {
        let p: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let mut scores = Scoreboard::default();
        assert_eq!(reference_latency(&scores, &p), None);
        timed(&mut scores, p[0], 10);
        timed(&mut scores, p[1], 30);
        timed(&mut scores, p[2], 20);
        let r = reference_latency(&scores, &p).unwrap();
        assert!((r - 0.002).abs() < 1e-9, "{r}");
        timed(&mut scores, p[3], 40);
        let r = reference_latency(&scores, &p).unwrap();
        assert!((r - 0.0025).abs() < 1e-9, "{r}");
        // Published: every peer's score against that median: no history gives 0.5, the
        // fastest keeps speed 1, the slowest loses sqrt(median / its latency).
        let published = published(&AuditBook::default(), &scores, &p);
        assert_eq!(published.len(), 4);
        assert!((published[0].1 - 0.5).abs() < 1e-9, "{published:?}");
        assert!((published[3].1 - 0.5 * (0.0025f64 / 0.004).sqrt()).abs() < 1e-9);
    }

    /// Two nodes claiming the same speed with the same honest record: the one the gateway
    /// measured slower loses reputation (its claim is not what counts), and routing picks the
    /// other even though the scoreboard alone already charges its time.
    #[test]
    fn measured_latency_lowers_reputation_and_routing_follows() {
        let (fast, slow) = (PeerId::random(), PeerId::random());
        let mut book = AuditBook::default();
        let mut scores = Scoreboard::default();
        for p in [fast, slow] {
            for _ in 0..20 {
                book.on_call(p, true);
                book.on_audit(p, true);
            }
        }
        timed(&mut scores, fast, 10);
        timed(&mut scores, slow, 40);
        let mut cands = vec![cand(fast, 0.01), cand(slow, 0.01)];
        cands.iter_mut().for_each(|c| scores.adjust(c));
        let reference = reference_latency(&scores, [&fast, &slow]);
        let s_fast = book.score(&fast, Some(0.001), reference);
        let s_slow = book.score(&slow, Some(0.004), reference);
        assert!(s_slow < s_fast, "{s_slow} vs {s_fast}");
        weigh(&book, &scores, &mut cands);
        assert!(cands[1].compute_s > 4.0 * cands[0].compute_s, "{cands:?}");
        assert_eq!(best_route(&cands, 0, 10, &[]).unwrap().0[0].peer, fast);
    }

    /// Uptime counts: a node that failed half its calls is routed to after a node that
    /// answered every one, at equal measured speed; a convicted node is dropped.
    #[test]
    fn unanswered_calls_lower_reputation_and_convictions_exclude() {
        let (up, flaky, convicted) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut book = AuditBook::default();
        for i in 0..20 {
            book.on_call(up, true);
            book.on_call(flaky, i % 2 == 0);
            book.on_call(convicted, true);
        }
        book.convict(convicted);
        let scores = Scoreboard::default();
        let mut cands = vec![cand(flaky, 0.01), cand(up, 0.01), cand(convicted, 0.001)];
        weigh(&book, &scores, &mut cands);
        assert_eq!(cands.len(), 2);
        assert!(cands[0].compute_s > 1.8 * cands[1].compute_s, "{cands:?}");
        assert_eq!(best_route(&cands, 0, 10, &[]).unwrap().0[0].peer, up);
    }
}
