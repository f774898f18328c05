//! Near ties as evidence: a last stage that picks, among the tokens its logits nearly tie, the
//! one it likes. Each such token passes the near-tie rule ([`crate::near_tie`]), so without a
//! record a provider of a build of its own could steer every answer it serves.
//!
//! Across builds an honest last stage's token differs from a checker's draw on about 7% of
//! tokens, and almost all of those flips need little slack (under
//! [`NARROW_NEAR_TIE_NATS`](crate::near_tie::NARROW_NEAR_TIE_NATS)); a provider that takes the
//! token it likes whenever a near tie lets it shows near ties more often, and wide ones far more
//! often. Every token a checker of another build compared (the same token, or a near tie) is
//! one observation, kept per provider and per checker; the provider is convicted when its count
//! of near ties, or of wide near ties, is improbable for an honest node: a binomial tail under
//! [`CONVICTION_TAIL`] at [`CROSS_BUILD_NEAR_TIE_RATE`] or [`CROSS_BUILD_WIDE_NEAR_TIE_RATE`]
//! (Gonka's rule, as [`crate::stats`]). What a provider can still steer unseen is bounded by
//! those rates less the honest ones.
//!
//! A checker that itself picks reports honest log-probabilities with another token: an honest
//! provider's token is then what the checker's own numbers give, which is not counted as a
//! near tie ([`crate::near_tie::TokenDraw::drawn_as_reported`]). A checker could still frame a
//! provider with a draw of its own making (log-probabilities that admit the provider's token
//! only widely). So each verdict leaves out, per count, the checkers whose observations weigh
//! most against the provider (the largest excess over the honest rate): one of two or three,
//! and up to half less one of more. Conviction needs the excess to hold against the rest, so a
//! minority of framing checkers convicts nobody; with a single checker nobody can be blamed,
//! and nobody is. A convicted node's observations, as provider and as checker, are dropped
//! ([`TieBook::forget`]).

use crate::stats::{binomial_tail, CONVICTION_TAIL};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Honest near ties per compared token across builds, assumed: measured 16 of 288 (5.6%; 20
/// flips, 4 of them what the checker's own numbers give) in `tests/cross_build.rs`, and 6 of
/// 72 (8.3%, flips counted before that distinction) in the network
/// (`binary(up) & test(near_ties)`); about twice that is assumed. Both measurements are of
/// one pair of builds (the tiled and the untiled prompt attention) on short greedy and
/// temperature-0.8 chats: a pair of builds further apart, or answers of higher entropy, flip
/// more often.
pub const CROSS_BUILD_NEAR_TIE_RATE: f64 = 0.15;

/// Honest wide near ties per compared token across builds, assumed: measured 1 of 288 (0.35%)
/// in `tests/cross_build.rs` (2.3% is the 99% upper confidence bound of that, were the tokens
/// independent; tokens of one answer are not quite); 3% assumed.
pub const CROSS_BUILD_WIDE_NEAR_TIE_RATE: f64 = 0.03;

/// How many providers, and checkers per provider, a book keeps (the least observed go first).
pub const MAX_PROVIDERS: usize = 4096;
pub const MAX_CHECKERS: usize = 64;

/// Compared tokens and the near ties among them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TieCounts {
    /// Tokens compared with a checker's draw (the same token or a near tie; misses and
    /// undecided tokens are judged elsewhere).
    pub tokens: u64,
    pub near_ties: u64,
    /// Near ties that need more than the narrow slack.
    pub wide: u64,
}

impl TieCounts {
    fn add(&mut self, o: &TieCounts) {
        self.tokens += o.tokens;
        self.near_ties += o.near_ties;
        self.wide += o.wide;
    }
}

/// Per provider, per checker, the tokens compared across builds.
#[derive(Clone, Debug)]
pub struct TieBook<P: Ord + Copy> {
    providers: BTreeMap<P, BTreeMap<P, TieCounts>>,
}

impl<P: Ord + Copy> Default for TieBook<P> {
    fn default() -> Self {
        Self {
            providers: BTreeMap::new(),
        }
    }
}

impl<P: Ord + Copy> TieBook<P> {
    /// Records that `checker`'s draw judged one of `provider`'s tokens the same token
    /// (`near_tie` false) or a near tie (`wide` when it needed more than the narrow slack);
    /// whether `provider`'s record now convicts it.
    pub fn record(&mut self, provider: P, checker: P, near_tie: bool, wide: bool) -> bool {
        if !self.providers.contains_key(&provider) && self.providers.len() >= MAX_PROVIDERS {
            let least = self
                .providers
                .iter()
                .min_by_key(|(_, by)| by.values().map(|c| c.tokens).sum::<u64>())
                .map(|(p, _)| *p);
            if let Some(p) = least {
                self.providers.remove(&p);
            }
        }
        let by = self.providers.entry(provider).or_default();
        if !by.contains_key(&checker) && by.len() >= MAX_CHECKERS {
            let least = by.iter().min_by_key(|(_, c)| c.tokens).map(|(p, _)| *p);
            if let Some(c) = least {
                by.remove(&c);
            }
        }
        let c = by.entry(checker).or_default();
        c.tokens += 1;
        c.near_ties += u64::from(near_tie);
        c.wide += u64::from(near_tie && wide);
        near_tie && self.convicts(&provider)
    }

    /// All of `provider`'s observations.
    pub fn counts(&self, provider: &P) -> TieCounts {
        let mut total = TieCounts::default();
        if let Some(by) = self.providers.get(provider) {
            by.values().for_each(|c| total.add(c));
        }
        total
    }

    /// `provider`'s observations without the checkers that weigh most against it, per count:
    /// (tokens, near ties) and (tokens, wide near ties); `None` with fewer than two checkers.
    fn trimmed(&self, provider: &P) -> Option<[(u64, u64, f64); 2]> {
        let by = self.providers.get(provider)?;
        let m = by.len();
        if m < 2 {
            return None;
        }
        let leave_out = ((m - 1) / 2).max(1);
        let rest = |count: fn(&TieCounts) -> u64, q: f64| {
            let mut cs: Vec<&TieCounts> = by.values().collect();
            // The largest excess over the honest rate first.
            let excess = |c: &TieCounts| count(c) as f64 - c.tokens as f64 * q;
            cs.sort_by(|a, b| excess(b).total_cmp(&excess(a)));
            let kept = &cs[leave_out..];
            let n = kept.iter().map(|c| c.tokens).sum::<u64>();
            (n, kept.iter().map(|c| count(c)).sum::<u64>(), q)
        };
        Some([
            rest(|c| c.near_ties, CROSS_BUILD_NEAR_TIE_RATE),
            rest(|c| c.wide, CROSS_BUILD_WIDE_NEAR_TIE_RATE),
        ])
    }

    /// How probable `provider`'s record is for an honest node, the more suspicious of its two
    /// counts, once the checkers that weigh most against it are left out (1 with fewer than
    /// two checkers).
    pub fn honest_tail(&self, provider: &P) -> f64 {
        self.trimmed(provider).map_or(1.0, |counts| {
            counts
                .iter()
                .map(|&(n, k, q)| binomial_tail(n, k, q))
                .fold(1.0, f64::min)
        })
    }

    /// Whether `provider`'s near ties convict it. The exact tail is summed only where a
    /// lower bound on it (method of types: `P[X >= k] >= exp(-n KL(k/n, q)) / (n + 1)`) does
    /// not already clear the threshold: a verdict runs under the gateway's audit lock.
    pub fn convicts(&self, provider: &P) -> bool {
        let Some(counts) = self.trimmed(provider) else {
            return false;
        };
        counts.iter().any(|&(n, k, q)| {
            let a = k as f64 / n.max(1) as f64;
            if a <= q {
                return false;
            }
            let kl = a * (a / q).ln()
                + if a < 1.0 {
                    (1.0 - a) * ((1.0 - a) / (1.0 - q)).ln()
                } else {
                    0.0
                };
            let lower = (-(n as f64) * kl).exp() / (n as f64 + 1.0);
            lower < CONVICTION_TAIL && binomial_tail(n, k, q) < CONVICTION_TAIL
        })
    }

    /// Every observation: (provider, checker, counts), providers in order.
    pub fn entries(&self) -> impl Iterator<Item = (P, P, TieCounts)> + '_ {
        self.providers
            .iter()
            .flat_map(|(p, by)| by.iter().map(move |(c, counts)| (*p, *c, *counts)))
    }

    /// Puts back what [`Self::entries`] gave (a gateway's audit book read from disk), within
    /// the book's bounds: beyond [`MAX_PROVIDERS`] providers or [`MAX_CHECKERS`] checkers of
    /// one, the entry is refused (`false`).
    pub fn restore(&mut self, provider: P, checker: P, counts: TieCounts) -> bool {
        if !self.providers.contains_key(&provider) && self.providers.len() >= MAX_PROVIDERS {
            return false;
        }
        let by = self.providers.entry(provider).or_default();
        if !by.contains_key(&checker) && by.len() >= MAX_CHECKERS {
            return false;
        }
        by.insert(checker, counts);
        true
    }

    /// Drops everything recorded of `peer`, as a provider and as a checker (a convicted node:
    /// it is no longer routed to, and what it reported of others is not evidence).
    pub fn forget(&mut self, peer: &P) {
        self.providers.remove(peer);
        for by in self.providers.values_mut() {
            by.remove(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::rng::{CounterRng, Stream};

    /// A provider's behaviour against an honest checker: the share of its tokens that are
    /// near ties, and of wide ones.
    #[derive(Clone, Copy)]
    struct Rates {
        near: f64,
        wide: f64,
    }

    const HONEST: Rates = Rates {
        near: 0.083,
        wide: 0.0035,
    };

    fn observe(rng: &mut CounterRng, r: Rates) -> (bool, bool) {
        let u = rng.next_f64();
        (u < r.near, u < r.wide)
    }

    /// Tokens until `rates[provider]` is convicted, checked by the other nodes in turn, each
    /// observed at the provider's rates, except that a checker in `framers` reports a wide
    /// near tie for every token; `None` when not within `tokens`.
    fn run(
        rates: &[Rates],
        provider: usize,
        framers: &[usize],
        tokens: u64,
        seed: u64,
    ) -> Option<u64> {
        let mut rng = CounterRng::new(seed, Stream::Audit, 7);
        let mut book = TieBook::default();
        let n = rates.len();
        for t in 0..tokens {
            let checker = (provider + 1 + (t as usize % (n - 1))) % n;
            let (near, wide) = if framers.contains(&checker) {
                (true, true)
            } else {
                observe(&mut rng, rates[provider])
            };
            if book.record(provider, checker, near, wide) {
                return Some(t + 1);
            }
        }
        None
    }

    #[test]
    fn honest_providers_are_never_convicted() {
        for seed in 0..20 {
            assert_eq!(run(&[HONEST; 4], 0, &[], 10_000, seed), None, "seed {seed}");
        }
        // Nor when a minority of their checkers frames them: one of three, two of five.
        for seed in 0..4 {
            assert_eq!(run(&[HONEST; 4], 0, &[1], 10_000, seed), None);
            assert_eq!(run(&[HONEST; 6], 0, &[2, 4], 10_000, seed), None);
        }
    }

    #[test]
    fn a_provider_that_picks_its_near_ties_is_convicted() {
        // Taking its own second choice wherever it is within 0.5 nats of its top, as measured
        // in tests/cross_build.rs: 60 deviations in 288 tokens, 26 narrow near ties, 18 wide,
        // 14 misses, 2 the checker's own token; with the honest near ties (16, 1 wide), about
        // 0.21 near ties and 0.066 wide ones per token (0.22 here, erring high).
        let picker = Rates {
            near: 0.22,
            wide: 0.066,
        };
        let mut took: Vec<u64> = (0..20)
            .map(|seed| {
                run(&[picker, HONEST, HONEST, HONEST], 0, &[], 10_000, seed)
                    .unwrap_or_else(|| panic!("seed {seed}: the picker was not convicted"))
            })
            .collect();
        took.sort();
        eprintln!("a picker convicted after {took:?} compared tokens");
        assert!(took[19] <= 3000, "{took:?}");
        // Picking only among narrow near ties stays under the assumed rate: this is what
        // the rates leave a provider (the bound the module docs state).
        let narrow = Rates {
            near: 0.12,
            wide: 0.0035,
        };
        assert_eq!(
            run(&[narrow, HONEST, HONEST, HONEST], 0, &[], 10_000, 1),
            None
        );
    }

    #[test]
    fn a_lone_framer_convicts_nobody_and_one_checker_blames_nobody() {
        let mut book = TieBook::default();
        // Checker 9 reports a wide near tie for every token of provider 0; checkers 1 and 2
        // see an honest record.
        let mut rng = CounterRng::new(3, Stream::Audit, 0);
        for t in 0..3000u64 {
            let convicted = if t % 3 == 0 {
                book.record(0u32, 9, true, true)
            } else {
                let (near, wide) = observe(&mut rng, HONEST);
                book.record(0, 1 + (t % 3) as u32, near, wide)
            };
            assert!(!convicted, "framed at token {t}");
        }
        assert!(book.counts(&0).wide >= 1000);
        // A provider seen by one checker only: its record is never enough.
        let mut one = TieBook::default();
        for _ in 0..1000 {
            assert!(!one.record(5u32, 6, true, true));
        }
        assert_eq!(one.honest_tail(&5), 1.0);
        // A second checker that sees the same makes it conclusive.
        let convicted = (0..100).any(|_| one.record(5u32, 7, true, true));
        assert!(convicted);
    }

    #[test]
    fn a_convicted_node_is_forgotten_as_provider_and_as_checker() {
        let mut book = TieBook::default();
        book.record(1u32, 2, true, true);
        book.record(3, 1, true, false);
        book.record(3, 2, false, false);
        book.forget(&1);
        assert_eq!(book.counts(&1), TieCounts::default());
        assert_eq!(
            book.counts(&3),
            TieCounts {
                tokens: 1,
                near_ties: 0,
                wide: 0
            }
        );
    }

    #[test]
    fn the_book_stays_bounded() {
        let mut book = TieBook::default();
        for c in 0..(MAX_CHECKERS as u32 + 10) {
            book.record(0u32, c + 1, false, false);
        }
        assert_eq!(book.providers[&0].len(), MAX_CHECKERS);
        for p in 0..(MAX_PROVIDERS as u32 + 10) {
            book.record(p + 1000, 1, false, false);
        }
        assert_eq!(book.providers.len(), MAX_PROVIDERS);
    }
}
