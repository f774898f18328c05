//! Statistical verdicts from tolerance misses (Gonka's rule): a node is convicted only when its
//! run of misses would be improbable for an honest node, `P[X >= misses | n, fpr] < 1e-6`, where
//! `fpr` is the measured false-positive rate of one honest comparison. One miss is never enough.

use serde::{Deserialize, Serialize};

/// The conviction threshold on the binomial tail.
pub const CONVICTION_TAIL: f64 = 1e-6;

/// `P[X >= k]` for `X ~ Binomial(n, q)`, computed in log space. The terms are summed from `k`
/// away from the mode (upwards above the mean, and as `1 - P[X <= k - 1]` downwards below it),
/// where they shrink, so the 100,000 terms kept at most cover everything that counts whatever
/// `n` is.
pub fn binomial_tail(n: u64, k: u64, q: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (lq, lp) = (q.ln(), (1.0 - q).ln());
    let term = |log_c: f64, i: u64| log_c + i as f64 * lq + (n - i) as f64 * lp;
    let log_sum = |terms: &[f64]| {
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
    };
    const MAX_TERMS: usize = 100_000;
    if (k as f64) > n as f64 * q {
        // Upper tail: i = k, k + 1, ... (log C(n, i) built incrementally).
        let mut log_c = ln_choose(n, k);
        let mut terms = Vec::with_capacity((n - k + 1).min(MAX_TERMS as u64) as usize);
        let mut i = k;
        loop {
            terms.push(term(log_c, i));
            if i == n || terms.len() >= MAX_TERMS {
                break;
            }
            log_c += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
            i += 1;
        }
        log_sum(&terms).exp().min(1.0)
    } else {
        // At or below the mean: 1 - P[X <= k - 1], i = k - 1, k - 2, ..., 0.
        let mut i = k - 1;
        let mut log_c = ln_choose(n, i);
        let mut terms = Vec::with_capacity(k.min(MAX_TERMS as u64) as usize);
        loop {
            terms.push(term(log_c, i));
            if i == 0 || terms.len() >= MAX_TERMS {
                break;
            }
            log_c += (i as f64).ln() - ((n - i + 1) as f64).ln();
            i -= 1;
        }
        (1.0 - log_sum(&terms).exp()).clamp(0.0, 1.0)
    }
}

fn ln_choose(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum()
}

/// Tolerance outcomes of one node, accumulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissRecord {
    pub comparisons: u64,
    pub misses: u64,
}

impl MissRecord {
    pub fn record(&mut self, missed: bool) {
        self.comparisons += 1;
        self.misses += u64::from(missed);
    }

    /// The probability an honest node (miss rate `fpr`) misses at least this often.
    pub fn honest_tail(&self, fpr: f64) -> f64 {
        binomial_tail(self.comparisons, self.misses, fpr)
    }

    /// Whether the record convicts at the measured false-positive rate.
    pub fn convicts(&self, fpr: f64) -> bool {
        self.misses > 0 && self.honest_tail(fpr) < CONVICTION_TAIL
    }

    /// Whether a node with this record is doubted, given whether it was before (`doubted`):
    /// short of a conviction, but improbable for an honest node. Hysteresis, so a node near
    /// the line does not flip with every comparison: it enters doubt with at least
    /// [`DOUBT_MIN_MISSES`] misses and a tail under [`DOUBT_TAIL`], and leaves it only once
    /// the tail is back above [`CLEAR_TAIL`] (at the rows' 1% rate, two misses in four
    /// comparisons doubt a node; three misses then take about 80 clean comparisons to clear).
    pub fn doubts(&self, fpr: f64, doubted: bool) -> bool {
        let tail = self.honest_tail(fpr);
        if doubted {
            tail < CLEAR_TAIL
        } else {
            self.misses >= DOUBT_MIN_MISSES && tail < DOUBT_TAIL
        }
    }
}

/// The tail under which a record doubts a node ([`MissRecord::doubts`]): a thousand times
/// short of the evidence that convicts.
pub const DOUBT_TAIL: f64 = 1e-3;
/// The tail above which a doubted node is cleared.
pub const CLEAR_TAIL: f64 = 0.05;
/// The fewest misses that doubt a node: one miss is never enough, here as for convictions.
pub const DOUBT_MIN_MISSES: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // P[X >= 1 | 10, 0.5] = 1 - 2^-10
        assert!((binomial_tail(10, 1, 0.5) - (1.0 - 1.0 / 1024.0)).abs() < 1e-12);
        // P[X >= 10 | 10, 0.5] = 2^-10
        assert!((binomial_tail(10, 10, 0.5) - 1.0 / 1024.0).abs() < 1e-15);
        assert_eq!(binomial_tail(5, 6, 0.3), 0.0);
        assert_eq!(binomial_tail(5, 0, 0.3), 1.0);
        // P[X >= 3 | 4, 0.2] = 4*0.008*0.8 + 0.0016 = 0.0272
        assert!((binomial_tail(4, 3, 0.2) - 0.0272).abs() < 1e-12);
    }

    #[test]
    fn one_miss_never_convicts() {
        let mut r = MissRecord::default();
        r.record(true);
        assert!(!r.convicts(0.001));
        // Three misses in three at fpr 1e-3: tail 1e-9 < 1e-6.
        r.record(true);
        r.record(true);
        assert!(r.convicts(0.001));
        // The same three among 10,000 comparisons are what an honest node shows.
        let honest = MissRecord {
            comparisons: 10_000,
            misses: 3,
        };
        assert!(!honest.convicts(0.001));
    }

    #[test]
    fn doubt_needs_two_improbable_misses_and_clears_only_after_a_long_clean_run() {
        let rows = 0.01;
        let mut r = MissRecord::default();
        r.record(true);
        assert!(!r.doubts(rows, false), "one miss");
        r.record(false);
        r.record(true);
        // Two misses in three at 1%: tail 3e-4.
        assert!(r.doubts(rows, false));
        assert!(!r.convicts(rows));
        // Hysteresis: a few clean comparisons later the tail is over the entry line (1e-3)
        // but a doubted node stays doubted until it passes the clearing line (5%).
        for _ in 0..5 {
            r.record(false);
        }
        assert!(r.honest_tail(rows) > DOUBT_TAIL);
        assert!(!r.doubts(rows, false));
        assert!(r.doubts(rows, true));
        let mut clean = 0;
        while r.doubts(rows, true) {
            r.record(false);
            clean += 1;
            assert!(clean < 1000);
        }
        assert!(r.honest_tail(rows) >= CLEAR_TAIL);
        assert!(clean > 20, "cleared after {clean}");
        // An honest node's record at its own rate is never doubted.
        let honest = MissRecord {
            comparisons: 1000,
            misses: 10,
        };
        assert!(!honest.doubts(rows, false) && !honest.doubts(rows, true));
    }

    /// Checked after every comparison, the entry line is crossed more often than its 1e-3:
    /// of 2,000 honest nodes missing at exactly the rows' honest rate, over 2,000 comparisons
    /// each, 16 (0.8%) are doubted at some point, 7 of them still at the end. What that costs
    /// them: a spare beside them for a while, and a tenth of their routing score.
    #[test]
    fn honest_nodes_are_rarely_doubted_over_a_long_run() {
        let rate = 0.01;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (nodes, comparisons) = (2000, 2000);
        let (mut ever, mut at_end) = (0, 0);
        for _ in 0..nodes {
            let (mut r, mut doubted, mut was) = (MissRecord::default(), false, false);
            for _ in 0..comparisons {
                let missed = uniform() < rate;
                r.record(missed);
                // The tail only changes on a miss or while doubted (a clean comparison
                // raises it): skip the rest, as the gateway's decision would not change.
                if missed || doubted {
                    doubted = r.doubts(rate, doubted);
                    was |= doubted;
                }
            }
            ever += usize::from(was);
            at_end += usize::from(doubted);
        }
        let share = ever as f64 / nodes as f64;
        eprintln!("honest nodes doubted at some point: {ever} of {nodes}, at the end {at_end}");
        assert!(share < 0.02, "{share}");
        assert!(at_end <= ever);
    }

    #[test]
    fn tails_far_below_the_mean_stay_near_one_for_any_n() {
        // 60,000 misses in 2,000,000 comparisons at q = 0.15 (mean 300,000): an honest record.
        let t = binomial_tail(2_000_000, 60_000, 0.15);
        assert!(t > 0.999_999, "{t}");
        let honest = MissRecord {
            comparisons: 2_000_000,
            misses: 60_001,
        };
        assert!(!honest.convicts(0.15));
        // Both branches agree around the mean.
        let (n, q) = (1000u64, 0.1f64);
        for k in [90u64, 100, 101, 110] {
            let direct: f64 = (k..=n)
                .map(|i| {
                    (ln_choose(n, i) + i as f64 * q.ln() + (n - i) as f64 * (1.0 - q).ln()).exp()
                })
                .sum();
            assert!((binomial_tail(n, k, q) - direct).abs() < 1e-9, "{k}");
        }
    }

    proptest! {
        #[test]
        fn tail_is_monotone(n in 1u64..300, k in 0u64..300, q in 0.001f64..0.999) {
            let k = k.min(n);
            let t = binomial_tail(n, k, q);
            prop_assert!((0.0..=1.0 + 1e-12).contains(&t));
            if k < n {
                prop_assert!(binomial_tail(n, k + 1, q) <= t + 1e-12);
            }
            prop_assert!(binomial_tail(n + 1, k, q) + 1e-12 >= t);
        }
    }
}
