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
        if token == self.token {
            return true;
        }
        let list = self.listed();
        let Some(t) = list.iter().position(|x| x.0 == token) else {
            return false;
        };
        let lp_t = list[t].1;
        let slack = 2.0 * NEAR_TIE_NATS;
        if self.temperature <= 0.0 {
            return list[0].1 - lp_t <= slack;
        }
        let Some(kept) = self.kept(&list) else {
            return false;
        };
        if !kept.maybe[t] {
            return false;
        }
        // Tempered weights (any common scale cancels in the sampler's normalisation), and
        // how far one may move: each log-probability by up to NEAR_TIE_NATS.
        let inv_t = 1.0 / f64::from(self.temperature);
        let w = |lp: f32| (f64::from(lp) * inv_t).exp();
        let up = (f64::from(NEAR_TIE_NATS) * inv_t).exp();
        let (mut surely_above, mut maybe_above, mut surely_below, mut maybe_below) =
            (0.0f64, 0.0f64, 0.0f64, kept.unknown);
        for (j, &(_, lp)) in list.iter().enumerate() {
            if j == t || !kept.maybe[j] {
                continue;
            }
            if lp > lp_t + slack {
                surely_above += w(lp);
            } else if lp >= lp_t - slack {
                maybe_above += w(lp);
                maybe_below += w(lp);
            } else if kept.surely[j] {
                surely_below += w(lp);
            } else {
                maybe_below += w(lp);
            }
        }
        let w_t = w(lp_t);
        // The earliest the token's interval can start: what is surely above shrinks, all the
        // rest grows. The latest it can end: everything that may be above grows with it, and
        // only what is surely kept below counts against it.
        let start =
            surely_above / up / (surely_above / up + (w_t + maybe_below + surely_below) * up);
        let above = surely_above + maybe_above + w_t;
        let end = above * up / (above * up + surely_below / up);
        start <= self.u && self.u < end
    }

    /// The reported list after the sampler's top-k cut.
    fn listed(&self) -> Vec<(u32, f32)> {
        let mut list = self.top.clone();
        if self.top_k > 0 && self.top_k < list.len() {
            list.truncate(self.top_k);
        }
        list
    }

    /// Which listed tokens the sampler's top-p and min-p cuts keep surely or maybe (log-
    /// probabilities moved by up to [`NEAR_TIE_NATS`]), and the largest tempered weight the
    /// unreported tokens could add; `None` when that weight has no bound.
    fn kept(&self, list: &[(u32, f32)]) -> Option<Kept> {
        let margin = (2.0 * f64::from(NEAR_TIE_NATS)).exp();
        let p: Vec<f64> = list.iter().map(|&(_, lp)| f64::from(lp).exp()).collect();
        let listed: f64 = p.iter().sum();
        let (p0, p_last) = (*p.first()?, *p.last()?);
        // Tokens the top-k set holds beyond the list (all less likely than the last listed).
        let beyond = match self.top_k {
            0 => None,
            k if k > list.len() => Some(k - list.len()),
            _ => Some(0),
        };
        let unknown_mass = match beyond {
            Some(0) => 0.0,
            Some(n) => (1.0 - listed).max(0.0).min(n as f64 * p_last),
            None => (1.0 - listed).max(0.0),
        };
        let top_p = f64::from(self.top_p);
        let floor = p0 * f64::from(self.min_p);
        let (mut surely, mut maybe) = (Vec::with_capacity(p.len()), Vec::with_capacity(p.len()));
        let mut before = 0.0;
        for &q in &p {
            let (p_sure, p_maybe) = if top_p >= 1.0 {
                (true, true)
            } else {
                (
                    before < top_p * listed / margin,
                    before < top_p * (listed + unknown_mass) * margin,
                )
            };
            surely.push(p_sure && q >= floor * margin);
            maybe.push(p_maybe && q >= floor / margin);
            before += q;
        }
        let open = unknown_mass > 0.0
            && (top_p >= 1.0 || before < top_p * (listed + unknown_mass) * margin)
            && p_last >= floor / margin;
        let unknown = if !open {
            0.0
        } else {
            let inv_t = 1.0 / f64::from(self.temperature);
            // Each unreported token has p <= p_last: at T <= 1, p^(1/T) <= p * p_last^(1/T-1)
            // bounds them by their mass; above, only their count does.
            match (inv_t >= 1.0, beyond) {
                (true, _) => unknown_mass * p_last.powf(inv_t - 1.0),
                (false, Some(n)) => n as f64 * p_last.powf(inv_t),
                (false, None) => return None,
            }
        };
        Some(Kept {
            surely,
            maybe,
            unknown,
        })
    }
}

/// The sampler's candidate set as far as a reported top list can tell.
struct Kept {
    /// Per listed token: kept under every admissible perturbation.
    surely: Vec<bool>,
    /// Per listed token: kept under some.
    maybe: Vec<bool>,
    /// The largest tempered weight (on the scale of the listed `exp(logprob)^(1/T)`) the
    /// unreported tokens can add.
    unknown: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let mut d = draw(&top, &params, 0);
        d.u = 0.1;
        assert!(d.admits(1));
        assert!(!d.admits(2));
    }

    #[test]
    fn unreported_tokens_are_bounded_or_nothing_else_is_admitted() {
        // A flat distribution over 100 tokens, 20 reported: at T = 1 the 80 unreported weigh
        // at most their mass, and every reported token may honestly take any place.
        let top: Vec<(u32, f32)> = log_softmax(&[0.0f32; 100]).into_iter().take(20).collect();
        let flat = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let d = draw(&top, &flat, 5);
        assert!(d.admits(6), "equal logits: any order is honest");
        assert!(!d.admits(50), "an unreported token is never admitted");
        // Above T = 1 without top-k the unreported tokens have no bound.
        let hot = SamplingParams {
            temperature: 1.5,
            ..flat
        };
        assert!(draw(&top, &hot, 5).kept(&top).is_none());
        assert!(!draw(&top, &hot, 5).admits(6));
        assert!(draw(&top, &hot, 5).admits(5));
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
        let kept = d.kept(&top).unwrap();
        assert_eq!(kept.unknown, 0.0);
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
}
