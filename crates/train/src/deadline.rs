//! The round deadline from measured times, not a guess: `median + k * MAD` of how long the
//! accepted contributions of recent rounds took to arrive after the round opened (MAD scaled by
//! 1.4826 to estimate a standard deviation), at least `median * (1 + slack)`, within
//! `[min_ms, max_ms]`. Before any round was measured it is `initial_ms`.
//!
//! Crashed workers send nothing, so they add no samples and do not stretch the deadline; a
//! straggler's late arrival is not a sample at all. When most of a round's valid work arrives
//! late, the round machine restarts the deadline from those late times
//! ([`crate::round::RoundMachine::finish_close`]): every worker slowed down.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// How the deadline adapts.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadlinePolicy {
    pub initial_ms: u64,
    pub min_ms: u64,
    pub max_ms: u64,
    pub k: f64,
    /// Minimum headroom over the median, as a fraction.
    pub slack: f64,
    /// Samples kept (the most recent).
    pub window: usize,
}

impl Default for DeadlinePolicy {
    fn default() -> Self {
        Self {
            initial_ms: 120_000,
            min_ms: 1_000,
            max_ms: 3_600_000,
            k: 3.0,
            slack: 1.0,
            window: 64,
        }
    }
}

/// Recent arrival times and the deadline they give.
#[derive(Clone, Debug, Default)]
pub struct Deadline {
    samples: VecDeque<u64>,
}

fn median(sorted: &[u64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2] as f64
    } else {
        (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0
    }
}

impl Deadline {
    /// Records one arrival, `ms` after its round opened.
    pub fn record(&mut self, policy: &DeadlinePolicy, ms: u64) {
        self.samples.push_back(ms);
        while self.samples.len() > policy.window.max(1) {
            self.samples.pop_front();
        }
    }

    /// Milliseconds a round stays open for contributions.
    pub fn current_ms(&self, policy: &DeadlinePolicy) -> u64 {
        if self.samples.is_empty() {
            return policy.initial_ms.clamp(policy.min_ms, policy.max_ms);
        }
        let mut s: Vec<u64> = self.samples.iter().copied().collect();
        s.sort_unstable();
        let med = median(&s);
        let mut dev: Vec<u64> = s.iter().map(|&x| (x as f64 - med).abs() as u64).collect();
        dev.sort_unstable();
        let mad = 1.4826 * median(&dev);
        let d = (med + policy.k * mad).max(med * (1.0 + policy.slack));
        (d.ceil() as u64).clamp(policy.min_ms, policy.max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapts_to_measured_times_and_resists_outliers() {
        let p = DeadlinePolicy {
            initial_ms: 60_000,
            min_ms: 100,
            slack: 0.25,
            ..DeadlinePolicy::default()
        };
        let mut d = Deadline::default();
        assert_eq!(d.current_ms(&p), 60_000);
        for ms in [1000, 1100, 900, 1050, 950, 1000] {
            d.record(&p, ms);
        }
        let base = d.current_ms(&p);
        assert!((1250..1400).contains(&base), "{base}");
        d.record(&p, 50_000); // one straggler
        let after = d.current_ms(&p);
        assert!(after < 1500, "{after}");
        // Slower workers everywhere: the deadline follows.
        for _ in 0..64 {
            d.record(&p, 4000);
        }
        assert_eq!(d.current_ms(&p), 5000);
    }
}
