//! Reputation: one published number per node in `[0, 1]`, from what the gateway measured.
//!
//! ```text
//! score = trust * availability * speed * doubt    (0 once convicted: the node is excluded)
//! trust        = (passed + 1) / (passed + 2 + 10 * misses)
//! doubt        = 0.1 while the gateway doubts the node, else 1
//! availability = (answered + 1) / (calls + 1)
//! speed        = min(1, sqrt(reference_latency / measured_latency))
//! ```
//!
//! - `passed` / `misses`: audits of this node that passed / were tolerance misses; a marginal
//!   miss costs as much trust as ten passes, so a node recovers only by a long honest run;
//! - `doubt`: a node whose referee-confirmed misses are improbable for an honest node, short of
//!   a conviction (`crate::stats::MissRecord::doubts`), weighs a tenth: with 100 audits passed
//!   and 2 missed its trust is still 0.83, above a newcomer's 0.5, and routing would keep
//!   preferring it to the spare placed beside it;
//! - `answered` / `calls`: stage calls it answered in time (uptime as seen by the gateway);
//! - latencies are what the gateway measured, never the node's own claims: in the network
//!   (`plexus-node`'s `reputation`) a node's decode seconds per layer as the gateway timed its
//!   calls (round trip removed, averaged), `reference` the median of those over the model's
//!   measured nodes; in `plexus sim`, seconds per job. Unmeasured: speed 1.
//!
//! Reputation belongs to the node key, not to its owner: a conviction zeroes this node only.
//! Routing divides a node's expected compute time by the score (see `plexus-node`'s
//! `reputation::weigh`), so nodes with no history (score 0.5) are used, and proven ones
//! preferred.

use serde::{Deserialize, Serialize};

/// What the gateway has recorded about one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub audits_passed: u64,
    pub audits_missed: u64,
    pub calls: u64,
    pub answered: u64,
    /// Median measured latency of its calls, seconds.
    pub latency: f64,
    pub convicted: bool,
    /// The gateway doubts it ([`DOUBT_WEIGHT`]).
    #[serde(default)]
    pub doubted: bool,
}

/// The weight of one miss against passes.
pub const MISS_WEIGHT: f64 = 10.0;

/// What a doubted node's score is multiplied by.
pub const DOUBT_WEIGHT: f64 = 0.1;

impl Record {
    /// The published score (module docs), with `reference` the median latency of the span.
    pub fn score(&self, reference: f64) -> f64 {
        if self.convicted {
            return 0.0;
        }
        let trust = (self.audits_passed as f64 + 1.0)
            / (self.audits_passed as f64 + 2.0 + MISS_WEIGHT * self.audits_missed as f64);
        let availability = (self.answered.min(self.calls) as f64 + 1.0) / (self.calls as f64 + 1.0);
        let speed = if self.latency > 0.0 && reference > 0.0 {
            (reference / self.latency).sqrt().min(1.0)
        } else {
            1.0
        };
        let doubt = if self.doubted { DOUBT_WEIGHT } else { 1.0 };
        trust * availability * speed * doubt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formula() {
        let new = Record::default();
        assert!((new.score(0.1) - 0.5).abs() < 1e-12);
        let good = Record {
            audits_passed: 98,
            calls: 1000,
            answered: 1000,
            latency: 0.1,
            ..Record::default()
        };
        assert!((good.score(0.1) - 0.99).abs() < 1e-12);
        let slow = Record {
            latency: 0.4,
            ..good
        };
        assert!((slow.score(0.1) - 0.495).abs() < 1e-12);
        let missed = Record {
            audits_missed: 1,
            ..good
        };
        assert!(missed.score(0.1) < 0.91 && missed.score(0.1) > 0.89);
        // Doubted: below a newcomer, whatever its record.
        let doubted = Record {
            audits_missed: 2,
            doubted: true,
            ..good
        };
        assert!(doubted.score(0.1) < new.score(0.1));
        assert_eq!(
            Record {
                convicted: true,
                ..good
            }
            .score(0.1),
            0.0
        );
    }

    proptest! {
        #[test]
        fn bounded_and_monotone(p in 0u64..10_000, m in 0u64..100, c in 0u64..10_000, a in 0u64..10_000, lat in 0.0f64..10.0, reference in 0.001f64..10.0) {
            let r = Record { audits_passed: p, audits_missed: m, calls: c, answered: a, latency: lat, convicted: false, doubted: false };
            let s = r.score(reference);
            prop_assert!((0.0..=1.0).contains(&s));
            let more_passed = Record { audits_passed: p + 1, ..r }.score(reference);
            let more_missed = Record { audits_missed: m + 1, ..r }.score(reference);
            prop_assert!(more_passed >= s);
            prop_assert!(more_missed <= s);
            let doubted = Record { doubted: true, ..r }.score(reference);
            prop_assert!(doubted <= s * DOUBT_WEIGHT + 1e-12);
        }
    }
}
