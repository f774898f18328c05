//! Near ties: whether a last stage's sampled token, which differs from the one a checker
//! (an auditor or referee on another build) drew, is still one the provider's sampler could
//! honestly have drawn from logits a little off the checker's (Token-DiFR, arXiv 2511.20621:
//! with the seed fixed by the protocol, a differing token is evidence in proportion to how far
//! it is from the checker's draw).
//!
//! Across builds honest logits differ (up to 10% relative error measured, `tests/cross_build.rs`)
//! and about 7% of sampled tokens flip: a greedy argmax between two near-equal logits, or a
//! seeded draw `u` close to a boundary of the cumulative distribution. Counting every flip as a
//! miss cost an honest node a failover and trust on every one. A checker reports its draw
//! ([`TokenDraw`]: its top log-probabilities over the adjusted logits, the sampler's filters and
//! the seeded `u`), and the gateway admits the provider's token when some log-probabilities
//! within [`NEAR_TIE_NATS`] of the checker's would have drawn it with the same `u`. The provider's own report is
//! a claim and never admits anything: only a checker's draw is used.
//!
//! The report holds the top 20 tokens; the sampler's candidate set may reach past them
//! (top-k 40 by default). The unreported tokens are bounded (each less likely than the last
//! reported, their mass what the list leaves), and the interval is widened for the worst
//! case; where no bound exists (temperature above 1 without top-k) only the exact token is
//! admitted.

use plexus_core::rng::{uniform, Stream};
use plexus_model::SamplingParams;
use serde::{Deserialize, Serialize};

/// How far (in nats) each of the provider's log-probabilities may honestly lie from the
/// checker's (calibrated in `tests/cross_build.rs`; BENCHMARKS.md). A greedy token is a near
/// tie within twice this of the checker's top; a sampled one when such moves (which may also
/// reorder tokens within twice this of each other, and move the top-p and min-p cuts) can put
/// the seeded draw inside its interval.
pub const NEAR_TIE_NATS: f32 = 0.25;

/// The slack under which a near tie is *narrow*: honest flips across builds almost all are
/// (1 of 288 tokens measured needed more; `tests/cross_build.rs`), while a provider that picks
/// the token it likes among near ties often needs more. Near ties, and wide ones apart, are
/// counted per provider and convict when improbable for an honest node ([`crate::ties`]).
pub const NARROW_NEAR_TIE_NATS: f32 = 0.10;

/// A checker's draw at one position: what the gateway needs to judge another token against it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenDraw {
    /// The token the checker drew.
    pub token: u32,
    /// Its most likely tokens with their log-probabilities (log-softmax of the adjusted
    /// logits), most likely first.
    pub top: Vec<(u32, f32)>,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// The seeded uniform the sampler drew with (unused when greedy).
    pub u: f64,
}

impl TokenDraw {
    /// The checker's draw of `token` with log-probabilities `top` at sampler position
    /// `position` under `params` (whose seed is the protocol seed).
    pub fn new(token: u32, top: Vec<(u32, f32)>, params: &SamplingParams, position: u64) -> Self {
        Self {
            token,
            top,
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            u: uniform(params.seed, Stream::Sampling, position, 0),
        }
    }

    /// Whether `token` is the checker's token or a near tie of it (see the module docs).
    pub fn admits(&self, token: u32) -> bool {
        matches!(
            self.judge(token),
            Judgement::Same | Judgement::NearTie | Judgement::Undecided
        )
    }

    /// How `token` (the provider's) stands against this draw.
    pub fn judge(&self, token: u32) -> Judgement {
        self.judge_within(token, NEAR_TIE_NATS)
    }

    /// Whether `token`, a near tie of this draw, needs more than [`NARROW_NEAR_TIE_NATS`] of
    /// slack: a wide near tie (false for the same token, a narrow near tie or a miss).
    pub fn is_wide_near_tie(&self, token: u32) -> bool {
        // (a token drawn as reported needs no slack: see `drawn_as_reported`)
        self.judge(token) == Judgement::NearTie
            && self.judge_within(token, NARROW_NEAR_TIE_NATS) == Judgement::Miss
    }

    /// The least slack (in nats, to 0.005) under which `token` is a near tie of this draw:
    /// `Some(0.0)` for the checker's own token, `None` when not even [`NEAR_TIE_NATS`]
    /// admits it, or when the draw cannot judge it (calibration and reports).
    pub fn slack_needed(&self, token: u32) -> Option<f32> {
        match self.judge(token) {
            Judgement::Same => return Some(0.0),
            Judgement::NearTie => {}
            Judgement::Miss | Judgement::Undecided => return None,
        }
        if self.drawn_as_reported(token) {
            return Some(0.0);
        }
        // Admission grows with the slack: bisect between what misses and what admits.
        let (mut lo, mut hi) = (0.0f32, NEAR_TIE_NATS);
        while hi - lo > 0.005 {
            let mid = 0.5 * (lo + hi);
            if self.judge_within(token, mid) == Judgement::NearTie {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    /// Whether the draw as reported (no slack) gives `token`: the checker's own token when it
    /// sampled honestly from what it reports, or another one when it did not (a checker that
    /// picks reports honest log-probabilities but another token). Such a token is not a near
    /// tie of the provider's: it is what the checker's own numbers say.
    pub fn drawn_as_reported(&self, token: u32) -> bool {
        self.within(token, 0.0) == Judgement::NearTie
    }

    /// [`Self::judge`] with each log-probability allowed to move by `nats`.
    fn judge_within(&self, token: u32, nats: f32) -> Judgement {
        if token == self.token {
            return Judgement::Same;
        }
        self.within(token, nats)
    }

    /// Whether moving each log-probability by up to `nats` can make the draw give `token`
    /// (`NearTie`), whatever token the checker itself returned.
    fn within(&self, token: u32, nats: f32) -> Judgement {
        let list = &self.top;
        let well_formed = !list.is_empty()
            && list.iter().all(|x| !x.1.is_nan() && x.1 <= 1e-4)
            && list.windows(2).all(|w| w[0].1 >= w[1].1);
        let Some(t) = list
            .iter()
            .position(|x| x.0 == token)
            .filter(|_| well_formed)
        else {
            return Judgement::Miss;
        };
        let lp_t = list[t].1;
        let slack = 2.0 * nats;
        let verdict = |near: bool| {
            if near {
                Judgement::NearTie
            } else {
                Judgement::Miss
            }
        };
        if !lp_t.is_finite() {
            return Judgement::Miss; // a token of probability 0 is never drawn
        }
        // Greedy, and the filters that leave one candidate (top-k 1, top-p 0): the top token
        // up to the slack.
        if self.temperature <= 0.0 || self.top_k == 1 || self.top_p <= 0.0 {
            return verdict(list[0].1 - lp_t <= slack);
        }
        let Some(kept) = self.kept(nats) else {
            return Judgement::Undecided;
        };
        if !kept.maybe[t] {
            return Judgement::Miss;
        }
        // Tempered log-weights `lp / T` (any common scale cancels in the sampler's
        // normalisation), summed in log space so that no temperature under- or overflows;
        // each log-probability may move by up to `nats`, a weight by `up` = d / T.
        let inv_t = 1.0 / f64::from(self.temperature);
        let lw = |lp: f32| f64::from(lp) * inv_t;
        let up = f64::from(nats) * inv_t;
        let (mut surely_above, mut maybe_above) = (Vec::new(), Vec::new());
        let (mut surely_below, mut maybe_below) = (Vec::new(), Vec::new());
        // The unreported tokens are all less likely than the last reported one: below the
        // token, unless that one is within the slack of it.
        if list[list.len() - 1].1 < lp_t - slack {
            surely_below.push(kept.unknown_lo_ln);
            maybe_below.push(kept.unknown_hi_ln);
        } else {
            maybe_above.push(kept.unknown_hi_ln);
            maybe_below.push(kept.unknown_hi_ln);
        }
        for (j, &(_, lp)) in list.iter().enumerate() {
            if j == t || !kept.maybe[j] {
                continue;
            }
            if lp > lp_t + slack {
                // Above the token whatever the moves, and kept whenever the token is.
                surely_above.push(lw(lp));
            } else if lp >= lp_t - slack {
                maybe_above.push(lw(lp));
                // Placed after the token, it weighs no more than the token does.
                maybe_below.push(lw(lp.min(lp_t)));
            } else if kept.surely[j] {
                surely_below.push(lw(lp));
            } else {
                maybe_below.push(lw(lp));
            }
        }
        let w_t = lw(lp_t);
        let (sa, ma, sb, mb) = (
            log_sum(&surely_above),
            log_sum(&maybe_above),
            log_sum(&surely_below),
            log_sum(&maybe_below),
        );
        // The earliest the token's interval can start: what is surely above shrinks, all the
        // rest grows. The latest it can end: everything that may be above grows with it, and
        // only what is surely kept below counts against it. x / (x + y) = 1 / (1 + e^(y - x)).
        let share = |x: f64, y: f64| {
            if x == f64::NEG_INFINITY {
                0.0
            } else if y == f64::NEG_INFINITY {
                1.0
            } else {
                1.0 / (1.0 + (y - x).exp())
            }
        };
        let start = share(sa - up, log_sum(&[w_t, mb, sb]) + up);
        let end = share(log_sum(&[sa, ma, w_t]) + up, sb - up);
        verdict(start <= self.u && self.u < end)
    }

    /// Which reported tokens the sampler's top-k, top-p and min-p cuts keep surely or maybe
    /// (log-probabilities moved by up to `nats`, which may also reorder tokens within twice
    /// that), and bounds on the tempered weight the unreported tokens add; `None` when their
    /// weight has no bound.
    fn kept(&self, nats: f32) -> Option<Kept> {
        let list = &self.top;
        let delta = f64::from(nats);
        let (e1, e2) = (delta.exp(), (2.0 * delta).exp());
        let slack = 2.0 * nats;
        let n = list.len();
        let p: Vec<f64> = list.iter().map(|&(_, lp)| f64::from(lp).exp()).collect();
        let (p0, p_last, lp_last) = (p[0], p[n - 1], list[n - 1].1);
        let unlisted = (1.0 - p.iter().sum::<f64>()).max(0.0);
        // Top-k: a token within the slack of the k-th may be in or out.
        let (mut surely, mut maybe) = (vec![true; n], vec![true; n]);
        let mut unknown_count: Option<usize> = None; // None: no bound
        let mut unknown_maybe = unlisted > 0.0;
        if self.top_k > 0 {
            let k = self.top_k;
            if k < n {
                let (lp_k, lp_km1) = (list[k].1, list[k - 1].1);
                for i in 0..n {
                    surely[i] = i < k && list[i].1 > lp_k + slack;
                    maybe[i] = list[i].1 >= lp_km1 - slack;
                }
                unknown_maybe &= lp_last >= lp_km1 - slack;
                unknown_count = Some(k);
            } else {
                unknown_count = Some(k - n);
                unknown_maybe &= k > n;
            }
        }
        let unknown_mass = match unknown_count {
            Some(c) => unlisted.min(c as f64 * p_last),
            None => unlisted,
        };
        let unknown_mass = if unknown_maybe { unknown_mass } else { 0.0 };
        // Top-p: kept while the normalised mass before the token is under top_p.
        let top_p = f64::from(self.top_p);
        if top_p < 1.0 {
            let in_set_lo: f64 = (0..n).filter(|&i| surely[i]).map(|i| p[i]).sum();
            let in_set_hi: f64 =
                (0..n).filter(|&i| maybe[i]).map(|i| p[i]).sum::<f64>() + unknown_mass;
            let frac = |before: f64, rest: f64, grow: f64| {
                let b = before * grow;
                if b <= 0.0 {
                    0.0
                } else {
                    b / (b + rest / grow)
                }
            };
            let mut next = (surely.clone(), maybe.clone());
            for i in 0..n {
                let lp = list[i].1;
                let may_precede = |j: usize| j != i && maybe[j] && list[j].1 >= lp - slack;
                let must_precede = |j: usize| j != i && surely[j] && list[j].1 > lp + slack;
                let before_hi: f64 = (0..n).filter(|&j| may_precede(j)).map(|j| p[j]).sum();
                let before_lo: f64 = (0..n).filter(|&j| must_precede(j)).map(|j| p[j]).sum();
                // The largest and smallest share of the set that can come before the token.
                let share_hi = frac(before_hi, (in_set_lo - before_hi).max(0.0), e1);
                let share_lo = frac(before_lo, (in_set_hi - before_lo).max(0.0), 1.0 / e1);
                next.0[i] &= share_hi < top_p;
                next.1[i] &= share_lo < top_p;
            }
            let before_unknown: f64 = (0..n)
                .filter(|&j| surely[j] && list[j].1 > lp_last + slack)
                .map(|j| p[j])
                .sum();
            unknown_maybe &= frac(
                before_unknown,
                (in_set_hi - before_unknown).max(0.0),
                1.0 / e1,
            ) < top_p;
            (surely, maybe) = next;
        }
        // Min-p: relative to the top token, which moves too.
        let floor = p0 * f64::from(self.min_p);
        for i in 0..n {
            surely[i] &= p[i] >= floor * e2;
            maybe[i] &= p[i] >= floor / e2;
        }
        unknown_maybe &= p_last >= floor / e2;
        let unknown_mass = if unknown_maybe { unknown_mass } else { 0.0 };
        let inv_t = 1.0 / f64::from(self.temperature);
        // Each unreported token has p <= p_last: at T <= 1, p^(1/T) <= p * p_last^(1/T-1)
        // bounds them by their mass; above, only their count does (log-weights, as `judge`).
        let ln_last = f64::from(lp_last);
        let unknown_hi_ln = match (inv_t >= 1.0, unknown_count) {
            _ if unknown_mass == 0.0 => f64::NEG_INFINITY,
            (true, _) => unknown_mass.ln() + (inv_t - 1.0) * ln_last,
            (false, Some(c)) => (c as f64).ln() + inv_t * ln_last,
            (false, None) => return None,
        };
        // Surely kept only without any filter that could cut them; at T = 1 their weight is
        // their mass, at other temperatures it has no useful lower bound.
        let unknown_surely = unknown_mass > 0.0
            && self.top_k == 0
            && top_p >= 1.0
            && self.min_p <= 0.0
            && inv_t == 1.0;
        let unknown_lo_ln = if unknown_surely {
            unknown_mass.ln()
        } else {
            f64::NEG_INFINITY
        };
        Some(Kept {
            surely,
            maybe,
            unknown_lo_ln,
            unknown_hi_ln,
        })
    }
}

/// `ln(sum(exp(x)))` of log-weights (-inf for none).
fn log_sum(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY || m.is_nan() {
        return m;
    }
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// How a provider's token stands against a checker's draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// The checker drew the same token.
    Same,
    /// Another token, within the slack of the checker's draw.
    NearTie,
    /// Another token of the checker's reported top list, where the unreported tokens have no
    /// bound (temperature above 1 without top-k): passed, not counted either way.
    Undecided,
    /// Outside the slack, or not among the checker's reported tokens.
    Miss,
}

/// The sampler's candidate set as far as a reported top list can tell.
struct Kept {
    /// Per listed token: kept under every admissible perturbation.
    surely: Vec<bool>,
    /// Per listed token: kept under some.
    maybe: Vec<bool>,
    /// Bounds on the log of the tempered weight (on the scale of the listed `logprob / T`)
    /// the unreported tokens add (-inf: none).
    unknown_lo_ln: f64,
    unknown_hi_ln: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sampling at temperature `t` with no top-k, top-p or min-p filter.
    fn unfiltered(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        }
    }

    fn draw(top: &[(u32, f32)], params: &SamplingParams, token: u32) -> TokenDraw {
        TokenDraw::new(token, top.to_vec(), params, 7)
    }

    fn log_softmax(logits: &[f32]) -> Vec<(u32, f32)> {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits.iter().map(|l| (l - m).exp()).sum();
        let mut v: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, l - m - z.ln()))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    #[test]
    fn greedy_admits_only_tokens_within_the_logit_slack() {
        let top = log_softmax(&[5.0, 4.8, 3.0, 0.0]);
        let d = draw(&top, &SamplingParams::greedy(), 0);
        assert!(d.admits(0));
        assert!(d.admits(1), "0.2 nats below the top is a near tie");
        assert!(!d.admits(2), "2 nats below is not");
        assert!(!d.admits(3));
        assert!(
            !d.admits(99),
            "a token the list does not hold is never admitted"
        );
    }

    #[test]
    fn sampling_admits_the_neighbours_of_the_draw_only() {
        // Four distinct probabilities, far apart in logits: no reordering.
        let top = log_softmax(&[4.0, 2.0, 0.0, -2.0]);
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 3,
            ..SamplingParams::default()
        };
        let p: Vec<f64> = top.iter().map(|t| f64::from(t.1).exp()).collect();
        let mut d = draw(&top, &params, 0);
        // u just past the first interval's end: token 1 is drawn, token 0 is a near tie.
        d.u = p[0] + 0.01;
        d.token = 1;
        assert!(d.admits(1) && d.admits(0));
        assert!(!d.admits(2) && !d.admits(3));
        // u in the middle of token 0's interval: nothing else is admitted.
        d.u = p[0] / 2.0;
        d.token = 0;
        assert!(!d.admits(1) && !d.admits(2));
    }

    #[test]
    fn near_equal_probabilities_may_swap_places() {
        // Tokens 0 and 1 within 0.1 nats: an honest build may order them the other way, so
        // a draw deep inside token 0's interval admits token 1 too; token 2 stays out.
        let top = log_softmax(&[3.0, 2.9, 0.0]);
        let params = unfiltered(1.0);
        let mut d = draw(&top, &params, 0);
        d.u = 0.1;
        assert!(d.admits(1));
        assert!(!d.admits(2));
    }

    /// The token the sampler draws at `u` from full `logits` (its candidates, tempered).
    fn reference(logits: &[f32], params: &SamplingParams, u: f64) -> u32 {
        let mut c = plexus_model::sampler::candidates(logits, params);
        let inv_t = 1.0 / f64::from(params.temperature);
        c.iter_mut().for_each(|x| x.1 = x.1.powf(inv_t));
        let total: f64 = c.iter().map(|x| x.1).sum();
        let mut cum = 0.0;
        for &(id, q) in &c {
            cum += q / total;
            if u < cum {
                return id;
            }
        }
        c[c.len() - 1].0
    }

    /// Over a grid of draws `u`, the share of those where the honest token differs from
    /// `cheat` that still admit `cheat` (the checker's logits are the honest ones).
    fn admitted_share(logits: &[f32], params: &SamplingParams, cheat: u32) -> f64 {
        let top: Vec<(u32, f32)> = log_softmax(logits).into_iter().take(20).collect();
        let (mut differ, mut admitted) = (0, 0);
        for i in 0..2000 {
            let u = (f64::from(i) + 0.5) / 2000.0;
            let honest = reference(logits, params, u);
            if honest == cheat {
                continue;
            }
            let mut d = draw(&top, params, honest);
            d.u = u;
            differ += 1;
            admitted += usize::from(d.admits(cheat));
        }
        admitted as f64 / differ.max(1) as f64
    }

    #[test]
    fn unreported_tokens_are_bounded_or_the_token_is_undecided() {
        // A flat distribution over 100 tokens, 20 reported: every token may take any place,
        // the unreported ones too (they are as likely as the reported ones).
        let top: Vec<(u32, f32)> = log_softmax(&[0.0f32; 100]).into_iter().take(20).collect();
        let flat = unfiltered(1.0);
        let mut d = draw(&top, &flat, 5);
        for u in [0.1, 0.6] {
            d.u = u;
            assert_eq!(d.judge(6), Judgement::NearTie, "equal logits: any order");
        }
        assert_eq!(
            d.judge(50),
            Judgement::Miss,
            "an unreported token is never admitted"
        );
        // Ten tokens 3 nats above the 90 others (20 reported): the unreported ones are then
        // below every token of the top ten whatever the moves, and at T = 1 without filters
        // weigh exactly their mass. The top ten fill the first 69% of the draw's range (79%
        // at most with the moves); a draw past that is none of theirs.
        let mut logits = vec![0.0f32; 100];
        logits[..10].fill(3.0);
        let top3: Vec<(u32, f32)> = log_softmax(&logits).into_iter().take(20).collect();
        let mut d = draw(&top3, &flat, 5);
        d.u = 0.5;
        assert_eq!(d.judge(6), Judgement::NearTie);
        d.u = 0.85;
        assert_eq!(d.judge(6), Judgement::Miss, "past the top ten");
        // Above T = 1 without top-k the unreported tokens have no bound: a reported token is
        // undecided (passed, not counted), an unreported one still a miss.
        let hot = SamplingParams {
            temperature: 1.5,
            ..flat
        };
        let d = draw(&top, &hot, 5);
        assert_eq!(d.judge(6), Judgement::Undecided);
        assert_eq!(d.judge(50), Judgement::Miss);
        assert_eq!(d.judge(5), Judgement::Same);
    }

    #[test]
    fn a_list_holding_little_of_the_mass_does_not_admit_what_the_sampler_would_not_draw() {
        // 20 reported tokens holding 6.4% of the mass, 980 others: token 0 is drawn for u
        // under 0.7%; at T = 1 without filters the unreported weigh exactly their mass. With
        // every log-probability 0.25 nats off, tokens 1-5 (within 0.5 nats) may come before
        // it: its interval may end at about 5%, never at 64% (before the unreported tokens
        // were weighed).
        let mut logits = vec![0.0f32; 1000];
        for (i, l) in logits.iter_mut().take(20).enumerate() {
            *l = 2.0 - 0.1 * i as f32;
        }
        let params = unfiltered(1.0);
        let share = admitted_share(&logits, &params, 0);
        assert!(share < 0.06, "token 0 admitted for {share} of the draws");
    }

    #[test]
    fn a_node_answering_greedily_is_not_admitted_wherever_it_samples_otherwise() {
        // A peaked Zipf distribution (exponent 2.5) under the default filters: the argmax is
        // drawn for u under 0.87, and with log-probabilities 0.25 nats off up to about 0.93,
        // so about half of the other draws (0.87-1) admit it; never all of them (before, the
        // second token was not counted as surely kept).
        let logits: Vec<f32> = (1..=1000).map(|k| -2.5 * (k as f32).ln()).collect();
        let share = admitted_share(&logits, &SamplingParams::default(), 0);
        assert!(
            share < 0.6,
            "the argmax admitted for {share} of the other draws"
        );
        // Over a flatter one (exponent 1) ranks 6-14 lie within 0.5 nats of rank 9 and may
        // take any order, so the rank-9 token is admitted for about half of the other draws;
        // never all of them (before, when the unreported tokens made the set too uncertain).
        let flat: Vec<f32> = (1..=1000).map(|k| -(k as f32).ln()).collect();
        let share = admitted_share(&flat, &SamplingParams::default(), 8);
        assert!(
            share < 0.6,
            "the rank-9 token admitted for {share} of the other draws"
        );
    }

    #[test]
    fn tiny_temperatures_and_a_top_p_of_zero_judge_like_greedy_without_overflow() {
        let top = log_softmax(&[3.0, 2.8, 1.0, 0.0]);
        for t in [1e-3f32, 1e-5, 1e-30] {
            let params = SamplingParams {
                temperature: t,
                ..SamplingParams::default()
            };
            let mut d = draw(&top, &params, 0);
            for u in [0.01, 0.5, 0.99] {
                d.u = u;
                assert_eq!(
                    d.judge(1),
                    Judgement::NearTie,
                    "T {t} u {u}: 0.2 nats below"
                );
                assert_eq!(d.judge(2), Judgement::Miss, "T {t} u {u}: 2 nats below");
            }
        }
        let params = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        let d = draw(&top, &params, 0);
        assert_eq!(d.judge(1), Judgement::NearTie);
        assert_eq!(d.judge(2), Judgement::Miss);
    }

    #[test]
    fn top_k_of_one_is_greedy_up_to_the_slack() {
        let top = log_softmax(&[3.0, 2.8, 1.0]);
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 1,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let d = draw(&top, &params, 0);
        assert_eq!(
            d.judge(1),
            Judgement::NearTie,
            "0.2 nats: may be the top one"
        );
        assert_eq!(d.judge(2), Judgement::Miss);
    }

    #[test]
    fn a_malformed_report_admits_nothing() {
        let params = SamplingParams::default();
        let unsorted = draw(&[(1, -2.0), (0, -0.1)], &params, 0);
        assert_eq!(unsorted.judge(1), Judgement::Miss);
        let nan = draw(&[(0, -0.1), (1, f32::NAN)], &params, 0);
        assert_eq!(nan.judge(1), Judgement::Miss);
        assert_eq!(nan.judge(0), Judgement::Same);
    }

    #[test]
    fn default_filters_close_the_set_inside_the_list() {
        // The defaults (top-k 40, top-p 0.95, min-p 0.05) over a peaked distribution keep a
        // few tokens: the rest of the list and the unreported tokens are surely cut.
        let mut logits = vec![-10.0f32; 1000];
        logits[..4].copy_from_slice(&[3.0, 2.0, 1.0, 0.5]);
        let top: Vec<(u32, f32)> = log_softmax(&logits).into_iter().take(20).collect();
        let params = SamplingParams::default();
        let mut d = draw(&top, &params, 0);
        let kept = d.kept(NEAR_TIE_NATS).unwrap();
        assert_eq!(kept.unknown_hi_ln, f64::NEG_INFINITY);
        assert!(kept.maybe[..3].iter().all(|&m| m) && !kept.maybe[4..].iter().any(|&m| m));
        let inv_t = 1.0 / f64::from(params.temperature);
        let w: Vec<f64> = top[..4]
            .iter()
            .map(|k| (f64::from(k.1) * inv_t).exp())
            .collect();
        let boundary = w[0] / w.iter().sum::<f64>();
        d.u = boundary - 0.005;
        assert!(
            d.admits(1),
            "a draw just before the boundary admits the next token"
        );
        assert!(!d.admits(3), "two places away is not a near tie");
        d.u = boundary / 3.0;
        assert!(
            !d.admits(1),
            "a draw deep inside the first interval admits only it"
        );
        assert!(
            !d.admits(500),
            "a token far outside the set is not admitted"
        );
    }

    #[test]
    fn a_checker_that_picks_does_not_make_honest_tokens_near_ties() {
        // Greedy: the checker reports honest log-probabilities but returns its runner-up.
        let greedy = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let top = vec![(4, -0.6), (5, -0.8), (9, -3.0)];
        let picker = draw(&top, &greedy, 5);
        assert!(
            picker.drawn_as_reported(4),
            "the honest token is what its numbers give"
        );
        assert!(!picker.drawn_as_reported(5), "its own token is not");
        let c = crate::compare::Answer::Token {
            token: 4,
            draw: None,
        }
        .cross_check(&crate::compare::Answer::Token {
            token: 5,
            draw: Some(picker),
        });
        assert_eq!((c.missed, c.near_ties, c.wide_near_ties), (0, 0, 0));
        // Against an honest checker the runner-up is a near tie (0.2 nats: 0.1 of slack each).
        let honest = draw(&top, &greedy, 4);
        let c = crate::compare::Answer::Token {
            token: 5,
            draw: None,
        }
        .cross_check(&crate::compare::Answer::Token {
            token: 4,
            draw: Some(honest.clone()),
        });
        assert_eq!((c.missed, c.near_ties), (0, 1));
        assert_eq!(
            honest.slack_needed(5).map(|s| (s * 100.0).round()),
            Some(10.0)
        );
    }

    proptest::proptest! {
        /// A near tie under some slack stays one under any larger slack (what
        /// `slack_needed` bisects on), and the slack it reports admits the token.
        #[test]
        fn more_slack_admits_at_least_as_much(
            logits in proptest::collection::vec(-6.0f32..6.0, 4..40),
            t in 0.0f32..1.5,
            top_k in 0usize..8,
            top_p in 0.5f32..1.0,
            min_p in 0.0f32..0.2,
            seed in 0u64..1000,
            pick in 0usize..40,
        ) {
            let params = SamplingParams { temperature: t, top_k, top_p, min_p, seed,
                ..SamplingParams::default() };
            let mut top = log_softmax(&logits);
            top.truncate(20);
            let token = top[pick % top.len()].0;
            let d = TokenDraw::new(top[0].0, top, &params, 3);
            let mut admitted = false;
            for i in 0..=25 {
                let now = d.judge_within(token, 0.01 * i as f32) != Judgement::Miss;
                proptest::prop_assert!(now || !admitted, "slack {} lost the token", 0.01 * i as f32);
                admitted = now;
            }
            if let Some(s) = d.slack_needed(token) {
                proptest::prop_assert!(d.judge_within(token, s) != Judgement::Miss);
                // (to the bisection's resolution, 0.005 nats)
                if d.is_wide_near_tie(token) {
                    proptest::prop_assert!(s >= NARROW_NEAR_TIE_NATS);
                } else if d.judge(token) == Judgement::NearTie {
                    proptest::prop_assert!(s <= NARROW_NEAR_TIE_NATS + 0.005);
                }
            }
        }
    }
}
