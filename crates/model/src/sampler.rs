//! Token sampling as a pure function.
//!
//! `sample(logits, history, params, position)` depends on nothing else: the random number for a
//! position is the counter-based draw `uniform(seed, Sampling, position)`, not the next value of
//! a stream. An auditor holding the logits of position `i` recomputes the token at `i` without
//! replaying positions `0..i`.
//!
//! Pipeline (llama.cpp's default order): logit bias -> penalties -> top-k -> top-p -> min-p ->
//! temperature -> draw. Temperature <= 0 is greedy (argmax after bias and penalties; ties go
//! to the lowest id).
//!
//! Log-probabilities ([`logprobs`]) are the log-softmax over the whole vocabulary of the logits
//! after bias, penalties and a grammar's mask, before the filters and temperature (OpenAI's
//! convention): so the greedy token is always the top-1, and they do not depend on the
//! sampling temperature.

use plexus_core::rng::{uniform, Stream};

pub use plexus_core::sampling::{mask_allows, SamplingParams, TokenLogprobs, MAX_TOP_LOGPROBS};

/// Adds `logit_bias`, applies the penalties ([`apply_penalties`]), then the `allowed` mask
/// (disallowed tokens become -inf), in place.
pub fn adjust(logits: &mut [f32], history: &[u32], params: &SamplingParams) {
    for &(id, bias) in &params.logit_bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += bias;
        }
    }
    apply_penalties(logits, history, params);
    if let Some(mask) = &params.allowed {
        for (i, l) in logits.iter_mut().enumerate() {
            if !mask_allows(mask, i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// The log-softmax of `logits` at `token` and at the `top` most likely ids (most likely first,
/// ties by lower id). NaN logits count as impossible.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let clean = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = logits
        .iter()
        .map(|&l| clean(l))
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(clean(l) - max).exp())
        .sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(clean(l)) - lse) as f32;
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut best: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, clean(l)))
        .collect();
    let top = top.min(best.len());
    if top > 0 && top < best.len() {
        best.select_nth_unstable_by(top - 1, order);
    }
    best.truncate(top);
    best.sort_unstable_by(order);
    TokenLogprobs {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: best.into_iter().map(|(id, l)| (id, lp(l))).collect(),
    }
}

/// Applies the repetition, frequency and presence penalties over the last `penalty_last_n`
/// tokens of `history`, in place (llama.cpp's `llama_sampler_penalties_apply`).
pub fn apply_penalties(logits: &mut [f32], history: &[u32], params: &SamplingParams) {
    if !params.has_penalties() || params.penalty_last_n == 0 {
        return;
    }
    let recent = &history[history.len().saturating_sub(params.penalty_last_n)..];
    let mut counts: Vec<(u32, u32)> = Vec::with_capacity(recent.len());
    for &t in recent {
        match counts.iter_mut().find(|(id, _)| *id == t) {
            Some((_, c)) => *c += 1,
            None => counts.push((t, 1)),
        }
    }
    for (id, count) in counts {
        let Some(l) = logits.get_mut(id as usize) else {
            continue;
        };
        if *l <= 0.0 {
            *l *= params.repetition_penalty;
        } else {
            *l /= params.repetition_penalty;
        }
        *l -= count as f32 * params.frequency_penalty + params.presence_penalty;
    }
}

/// The candidate set after top-k, top-p and min-p, as `(id, probability at temperature 1)`,
/// most likely first (ties by lower id), probabilities renormalised over the kept set.
pub fn candidates(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut c: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if params.top_k > 0 && params.top_k < c.len() {
        c.select_nth_unstable_by(params.top_k - 1, order);
        c.truncate(params.top_k);
    }
    c.sort_unstable_by(order);
    let Some(&(_, max)) = c.first() else {
        return Vec::new();
    };
    let mut p: Vec<(u32, f64)> = c
        .iter()
        .map(|&(id, l)| (id, f64::from(l - max).exp()))
        .collect();
    normalise(&mut p);
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = p.len();
        for (i, &(_, q)) in p.iter().enumerate() {
            cum += q;
            if cum >= f64::from(params.top_p) {
                keep = i + 1;
                break;
            }
        }
        p.truncate(keep.max(1));
        normalise(&mut p);
    }
    if params.min_p > 0.0 {
        let floor = p[0].1 * f64::from(params.min_p);
        p.retain(|&(_, q)| q >= floor);
        normalise(&mut p);
    }
    p
}

fn normalise(p: &mut [(u32, f64)]) {
    let total: f64 = p.iter().map(|x| x.1).sum();
    if total > 0.0 {
        for x in p.iter_mut() {
            x.1 /= total;
        }
    }
}

/// Index of the largest logit; ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The token at `position`, a pure function of its arguments.
pub fn sample(logits: &[f32], history: &[u32], params: &SamplingParams, position: u64) -> u32 {
    sample_scored(logits, history, params, position).0
}

/// [`sample`], plus the log-probabilities when `params.logprobs` asks for them.
pub fn sample_scored(
    logits: &[f32],
    history: &[u32],
    params: &SamplingParams,
    position: u64,
) -> (u32, Option<TokenLogprobs>) {
    let mut logits = logits.to_vec();
    adjust(&mut logits, history, params);
    let token = pick(&logits, params, position);
    let scores = params.logprobs.map(|n| {
        let n = n.min(MAX_TOP_LOGPROBS);
        logprobs(&logits, token, usize::from(n))
    });
    (token, scores)
}

/// The draw over adjusted logits.
fn pick(logits: &[f32], params: &SamplingParams, position: u64) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let mut c = candidates(logits, params);
    if c.is_empty() {
        return argmax(logits);
    }
    // Temperature after the filters: p_i^(1/T), renormalised; taken relative to the most
    // likely candidate ((p_i / p_0)^(1/T), the same distribution) so that a small T cannot
    // round every weight to 0 (which drew the least likely candidate).
    let inv_t = 1.0 / f64::from(params.temperature);
    // (p_0 > 0: the first candidate holds the largest logit, weight e^0 before normalising.)
    let top = c[0].1;
    for x in c.iter_mut() {
        x.1 = (x.1 / top).powf(inv_t);
    }
    normalise(&mut c);
    let u = uniform(params.seed, Stream::Sampling, position, 0);
    let mut cum = 0.0;
    for &(id, q) in &c {
        cum += q;
        if u < cum {
            return id;
        }
    }
    c[c.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn a_tiny_temperature_draws_the_most_likely_candidate() {
        // Every p^(1/T) underflowed to 0 at T = 0.001 and the last candidate was drawn.
        let logits: Vec<f32> = (0..50).map(|i| -0.05 * i as f32).collect();
        for t in [1e-3f32, 1e-6] {
            let p = params(t);
            for position in 0..20 {
                assert_eq!(sample(&logits, &[], &p, position), 0, "T {t}");
            }
        }
    }

    #[test]
    fn greedy_is_argmax_lowest_on_ties() {
        assert_eq!(sample(&[0.0, 2.0, 2.0, 1.0], &[], &params(0.0), 0), 1);
    }

    #[test]
    fn penalties_match_direct_formula() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params(1.0)
        };
        let mut l = vec![4.0, -4.0, 1.0];
        apply_penalties(&mut l, &[0, 1, 1], &p);
        assert_eq!(
            l,
            vec![4.0 / 2.0 - 0.5 - 0.25, -4.0 * 2.0 - 1.0 - 0.25, 1.0]
        );
    }

    #[test]
    fn penalty_window_is_respected() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            penalty_last_n: 1,
            ..params(1.0)
        };
        let mut l = vec![4.0, 4.0];
        apply_penalties(&mut l, &[0, 1], &p);
        assert_eq!(l, vec![4.0, 2.0]);
    }

    #[test]
    fn top_k_top_p_min_p_match_direct_computation() {
        let logits: Vec<f32> = vec![1.0, 3.0, 2.0, 0.0, 2.5];
        let soft: Vec<f64> = {
            let e: Vec<f64> = logits.iter().map(|&l| f64::from(l).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        // top-k 2 keeps ids 1 and 4.
        let c = candidates(
            &logits,
            &SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
        );
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4]);
        let z = soft[1] + soft[4];
        assert!((c[0].1 - soft[1] / z).abs() < 1e-12);
        // top-p: the smallest prefix reaching p.
        let p = (soft[1] + soft[4] + 0.5 * soft[2]) as f32;
        let c = candidates(
            &logits,
            &SamplingParams {
                top_p: p,
                ..params(1.0)
            },
        );
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4, 2]);
        // min-p 0.5: keep p_i >= 0.5 * p_max.
        let c = candidates(
            &logits,
            &SamplingParams {
                min_p: 0.5,
                ..params(1.0)
            },
        );
        let expect: Vec<u32> = [1u32, 4, 2]
            .into_iter()
            .filter(|&i| soft[i as usize] >= 0.5 * soft[1])
            .collect();
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), expect);
    }

    #[test]
    fn empirical_distribution_follows_temperature() {
        let logits = vec![0.0f32, 1.0, 2.0];
        let t = 2.0f32;
        let n = 20_000;
        let mut counts = [0usize; 3];
        let p = SamplingParams {
            seed: 9,
            ..params(t)
        };
        for pos in 0..n {
            counts[sample(&logits, &[], &p, pos) as usize] += 1;
        }
        let e: Vec<f64> = logits.iter().map(|&l| (f64::from(l) / 2.0).exp()).collect();
        let s: f64 = e.iter().sum();
        for i in 0..3 {
            let expected = e[i] / s;
            let got = counts[i] as f64 / n as f64;
            assert!(
                (got - expected).abs() < 0.015,
                "token {i}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn same_inputs_same_token_on_any_thread() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let p = SamplingParams {
            seed: 5,
            ..SamplingParams::default()
        };
        let here: Vec<u32> = (0..64)
            .map(|pos| sample(&logits, &[1, 2, 3], &p, pos))
            .collect();
        let threads: Vec<Vec<u32>> = (0..4)
            .map(|_| {
                let (l, p) = (logits.clone(), p.clone());
                std::thread::spawn(move || {
                    (0..64).map(|pos| sample(&l, &[1, 2, 3], &p, pos)).collect()
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        for t in threads {
            assert_eq!(t, here);
        }
    }

    #[test]
    fn logit_bias_comes_first() {
        let p = SamplingParams {
            logit_bias: vec![(2, 5.0), (99, 1.0)],
            ..params(0.0)
        };
        assert_eq!(sample(&[1.0, 3.0, 0.0], &[], &p, 0), 2);
    }

    #[test]
    fn the_allowed_mask_removes_tokens_everywhere() {
        // Token 1 would win; only 0 and 2 are allowed (bits 0 and 2).
        let p = SamplingParams {
            allowed: Some(vec![0b101]),
            logprobs: Some(3),
            ..params(0.0)
        };
        let (tok, lp) = sample_scored(&[1.0, 3.0, 2.0], &[], &p, 0);
        assert_eq!(tok, 2);
        let lp = lp.unwrap();
        assert_eq!(lp.top[2], (1, f32::NEG_INFINITY));
        assert!((lp.logprob - (1.0f32 / (1.0 + (-1.0f32).exp())).ln()).abs() < 1e-6);
        let hot = SamplingParams {
            temperature: 1.0,
            ..p
        };
        for pos in 0..200 {
            assert_ne!(sample(&[1.0, 30.0, 2.0], &[], &hot, pos), 1);
        }
    }

    #[test]
    fn logprobs_are_the_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let want = |i: usize| (f64::from(logits[i]).exp() / z).ln() as f32;
        assert!((lp.logprob - want(2)).abs() < 1e-6);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        for &(id, l) in &lp.top {
            assert!((l - want(id as usize)).abs() < 1e-6);
        }
        assert!(lp.is_plausible(3, 2, 4));
    }

    proptest! {
        #[test]
        fn greedy_token_is_the_top_logprob(
            logits in proptest::collection::vec(-30.0f32..30.0, 1..300),
            top in 1u8..=20, freq in -2.0f32..2.0, hist in proptest::collection::vec(0u32..300, 0..20),
        ) {
            let p = SamplingParams {
                frequency_penalty: freq,
                logprobs: Some(top),
                ..params(0.0)
            };
            let (tok, lp) = sample_scored(&logits, &hist, &p, 0);
            let lp = lp.unwrap();
            prop_assert_eq!(lp.top[0].0, tok);
            prop_assert_eq!(lp.top[0].1, lp.logprob);
            prop_assert!(lp.is_plausible(top, tok, logits.len()));
            let total: f64 = {
                let mut l = logits.clone();
                adjust(&mut l, &hist, &p);
                let all = logprobs(&l, tok, l.len());
                all.top.iter().map(|t| f64::from(t.1).exp()).sum()
            };
            prop_assert!((total - 1.0).abs() < 1e-4);
        }

        #[test]
        fn sample_is_pure_and_in_candidates(
            logits in proptest::collection::vec(-10.0f32..10.0, 1..200),
            seed: u64, pos: u64, top_k in 0usize..50, top_p in 0.1f32..1.0, min_p in 0.0f32..0.5,
        ) {
            let p = SamplingParams { temperature: 0.7, top_k, top_p, min_p, seed, ..SamplingParams::default() };
            let a = sample(&logits, &[], &p, pos);
            prop_assert_eq!(a, sample(&logits, &[], &p, pos));
            let c = candidates(&logits, &p);
            prop_assert!(c.iter().any(|x| x.0 == a));
            let total: f64 = c.iter().map(|x| x.1).sum();
            prop_assert!((total - 1.0).abs() < 1e-9);
        }
    }
}
