//! Test cheats: a node started with `plexus node --cheat KIND` (a hidden flag) returns wrong
//! results for every call, the way a dishonest provider would, so the audits of
//! [`crate::audit`] can be tested end to end against real processes.
//!
//! - `random`: every output row (hidden states, or the logits the last stage samples from) is
//!   replaced by noise of the same scale (garbage: as cheap as not computing);
//! - `noise`: every output value is perturbed by 0.1% (a subtle cheat, like a cheaper
//!   quantization: the sampled tokens mostly stay the same, the fingerprints do not);
//! - `token`: a last stage computes honestly but returns another token than the one its
//!   logits and the request's protocol seed give (the most likely other token: as if it had
//!   sampled with a seed of its own choosing); only the auditor's token check, which samples
//!   its own logits with the same seed, can tell. Other stages are honest under it.
//! - `pick`: a last stage on a build of its own steers its answers within the near-tie rule:
//!   wherever another token's logit is within 0.5 of the sampled one's (twice
//!   `plexus_verify::near_tie::NEAR_TIE_NATS`), it returns that token. Each such token may
//!   pass a checker of another build as a near tie; only their number gives it away
//!   (`plexus_verify::ties`). Other stages are honest under it.
//!
//! The cheater commits honestly to what it returns (its receipts pass the gateway's checks):
//! only an audit's recomputation can tell.

use plexus_core::rng::{CounterRng, Stream};

/// How close (in logits) another token must be for `pick` to take it.
pub const PICK_NATS: f32 = 0.5;

/// How a cheating node corrupts its outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cheat {
    Random,
    Noise,
    Token,
    Pick,
}

impl std::str::FromStr for Cheat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(Cheat::Random),
            "noise" => Ok(Cheat::Noise),
            "token" => Ok(Cheat::Token),
            "pick" => Ok(Cheat::Pick),
            _ => Err(format!(
                "unknown cheat {s:?} (random, noise, token or pick)"
            )),
        }
    }
}

impl Cheat {
    /// Corrupts `rows` (row-major, `width` wide) of a call; `salt` varies the noise per call.
    pub fn apply(self, rows: &mut [f32], width: usize, salt: u64) {
        if matches!(self, Cheat::Token | Cheat::Pick) {
            return;
        }
        let mut rng = CounterRng::new(salt, Stream::Audit, 0x0063_6865_6174);
        for row in rows.chunks_mut(width.max(1)) {
            let ms = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / row.len() as f64;
            let scale = ms.sqrt().max(1e-3);
            for v in row.iter_mut() {
                let z = rng.next_normal();
                *v = match self {
                    Cheat::Random => (z * scale) as f32,
                    Cheat::Noise => (f64::from(*v) * (1.0 + 1e-3 * z)) as f32,
                    Cheat::Token | Cheat::Pick => *v,
                };
            }
        }
    }

    /// The token a cheating last stage returns instead of the `sampled` one: under `token`,
    /// the highest logit other than `sampled`'s; under `pick`, that one only when its logit
    /// is within [`PICK_NATS`] of the sampled one's (or above it); the other cheats keep it.
    pub fn token(self, sampled: u32, logits: &[f32]) -> u32 {
        if !matches!(self, Cheat::Token | Cheat::Pick) {
            return sampled;
        }
        let other = logits
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 != sampled)
            .max_by(|a, b| a.1.total_cmp(b.1));
        let close = |l: f32| {
            logits
                .get(sampled as usize)
                .is_some_and(|s| l >= s - PICK_NATS)
        };
        match other {
            Some((i, &l)) if self == Cheat::Token || close(l) => i as u32,
            _ => sampled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cheats_change_every_row_and_parse() {
        let rows: Vec<f32> = (0..16).map(|i| i as f32 - 7.5).collect();
        for cheat in [Cheat::Random, Cheat::Noise] {
            let mut r = rows.clone();
            cheat.apply(&mut r, 8, 3);
            assert!(r[..8] != rows[..8] && r[8..] != rows[8..], "{cheat:?}");
            assert!(r.iter().all(|v| v.is_finite()));
        }
        let mut r = rows.clone();
        Cheat::Noise.apply(&mut r, 8, 3);
        assert!(r
            .iter()
            .zip(&rows)
            .all(|(a, b)| (a - b).abs() <= 0.01 * b.abs() + 1e-6));
        assert_eq!("random".parse::<Cheat>(), Ok(Cheat::Random));
        assert_eq!("token".parse::<Cheat>(), Ok(Cheat::Token));
        let mut r = rows.clone();
        Cheat::Token.apply(&mut r, 8, 3);
        assert_eq!(r, rows, "a token cheat computes honestly");
        // The sampled token is the argmax (15); the cheat returns the runner-up (14).
        assert_eq!(Cheat::Token.token(15, &rows), 14);
        // `pick` takes the runner-up only when it is within PICK_NATS of the sampled token.
        assert_eq!("pick".parse::<Cheat>(), Ok(Cheat::Pick));
        assert_eq!(Cheat::Pick.token(15, &rows), 15);
        let mut near = rows.clone();
        near[14] = near[15] - 0.4;
        assert_eq!(Cheat::Pick.token(15, &near), 14);
        let mut r = rows.clone();
        Cheat::Pick.apply(&mut r, 8, 3);
        assert_eq!(r, rows, "a picker computes honestly");
        assert_eq!(Cheat::Token.token(3, &rows), 15);
        assert_eq!(Cheat::Noise.token(15, &rows), 15);
        assert!("skip".parse::<Cheat>().is_err());
    }
}
