//! The audit draw (Proof of Sampling, arXiv 2405.00295).
//!
//! After a provider has committed (its receipt, with the fingerprint digest, is signed and
//! held by the gateway), the gateway decides whether to audit the job:
//!
//! `u = u64_be(HMAC-SHA256(gateway_key, "plexus/audit-draw/v1" || request || commitment)[..8])
//! / 2^64`, audit when `u < p`.
//!
//! The request id is in the message because commitments can repeat: a copier that returns the
//! same answer (and so the same commitment) job after job would otherwise get the same draw
//! every time, and one lucky "no" would cover all its copies (`plexus sim` found this).
//!
//! The key is the gateway's secret, so the provider cannot predict the draw when it commits,
//! and the commitment is fixed before the draw, so it cannot change its answer after. Anyone
//! given the key later can re-check every draw.
//!
//! `p` comes from the PoSP equilibrium: a provider that cheats saves the job's cost `C` and
//! risks, when audited by an honest auditor, its payment `R` and the slash `S`. With a share `r`
//! of auditors colluding with it, honesty is the Nash equilibrium when
//! `p > C / ((1 - r) (R + S))`. [`Posp::probability`] returns that bound times a safety
//! margin, floored (so a huge stake never turns audits off) and capped at 1.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The inputs of the PoSP bound, in the ledger's unit (micro-PLX), and the collusion share.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Posp {
    /// What computing the job honestly costs the provider.
    pub cost: u64,
    /// What the job pays.
    pub reward: u64,
    /// What a caught cheater loses (its stake at risk).
    pub slash: u64,
    /// Share of auditors assumed to collude with a cheater, in `[0, 1)`.
    pub collusion: f64,
    /// Multiplier over the bound (2.0: audit twice as often as the bare equilibrium needs).
    pub margin: f64,
    /// Smallest probability used, whatever the stake.
    pub floor: f64,
}

/// Why a PoSP configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PospError {
    #[error("the collusion share {0} must be in [0, 1)")]
    Collusion(f64),
    #[error("payment plus slash is zero: no audit probability deters cheating")]
    NothingAtStake,
    #[error("the margin {0} must be at least 1")]
    Margin(f64),
    #[error("the floor {0} must be in [0, 1]")]
    Floor(f64),
}

impl Posp {
    /// The bare equilibrium bound `C / ((1 - r)(R + S))` (may exceed 1: then no p deters).
    pub fn bound(&self) -> Result<f64, PospError> {
        if !(0.0..1.0).contains(&self.collusion) {
            return Err(PospError::Collusion(self.collusion));
        }
        let at_stake = self.reward as f64 + self.slash as f64;
        if at_stake <= 0.0 {
            return Err(PospError::NothingAtStake);
        }
        Ok(self.cost as f64 / ((1.0 - self.collusion) * at_stake))
    }

    /// The audit probability: `min(1, max(floor, margin * bound))`.
    pub fn probability(&self) -> Result<f64, PospError> {
        if self.margin.is_nan() || self.margin < 1.0 {
            return Err(PospError::Margin(self.margin));
        }
        if !(0.0..=1.0).contains(&self.floor) {
            return Err(PospError::Floor(self.floor));
        }
        Ok((self.margin * self.bound()?).max(self.floor).min(1.0))
    }

    /// A cheater's expected gain per cheated job at audit probability `p` (negative: cheating
    /// does not pay): it saves `C`, and with probability `p (1 - r)` loses `R + S`.
    pub fn cheating_gain(&self, p: f64) -> f64 {
        self.cost as f64 - p * (1.0 - self.collusion) * (self.reward as f64 + self.slash as f64)
    }
}

/// Position-layers of the reference job the network's audit probability is priced on: 1024
/// positions through 32 layers (a long chat through a whole small model).
pub const REFERENCE_WORK: u64 = 1024 * 32;
/// The network's margin over the PoSP bound.
pub const NETWORK_MARGIN: f64 = 2.0;
/// The network's smallest audit probability, whatever the stake.
pub const NETWORK_FLOOR: f64 = 0.01;

/// The audit probability a gateway uses for a provider asking `price` (micro-PLX per 1000
/// position-layers) with `stake` (micro-PLX) at risk, when a share `collusion` of auditors may
/// collude: [`Posp::probability`] for the reference job ([`REFERENCE_WORK`]), whose honest cost
/// is taken equal to its pay (a provider prices at cost), with [`NETWORK_MARGIN`] and
/// [`NETWORK_FLOOR`]. Nothing at stake (no stake, no price) or an invalid collusion share: 1,
/// every job is audited.
pub fn network_probability(price: u64, stake: u64, collusion: f64) -> f64 {
    let pay =
        (u128::from(REFERENCE_WORK) * u128::from(price) / 1000).min(u128::from(u64::MAX)) as u64;
    Posp {
        cost: pay,
        reward: pay,
        slash: stake,
        collusion,
        margin: NETWORK_MARGIN,
        floor: NETWORK_FLOOR,
    }
    .probability()
    .unwrap_or(1.0)
}

/// How much more often a provider is audited when no other node of its span announces its
/// build. Its audits then compare across builds (`crate::compare`), where a gross miss
/// convicts at once as on one build but a marginal one convicts only after four confirmed
/// calls in a row (a binomial tail under 1e-6 at 1% per call): four times the audits keep
/// the expected penalty of such a cheat where PoSP put it. Announcing a build of one's own
/// (the way to trade exact comparison for the band) costs that much more scrutiny.
pub const CROSS_BUILD_AUDIT_FACTOR: f64 = 4.0;

/// The audit probability `p` for a provider whose audits compare across builds.
pub fn cross_build_probability(p: f64) -> f64 {
    (p * CROSS_BUILD_AUDIT_FACTOR).min(1.0)
}

/// The gateway's secret draw key.
#[derive(Clone)]
pub struct DrawKey([u8; 32]);

impl DrawKey {
    pub fn new(secret: [u8; 32]) -> Self {
        Self(secret)
    }

    /// The uniform in `[0, 1)` for a request's commitment (its 32-byte digest).
    pub fn uniform(&self, request: &[u8; 32], commitment: &[u8; 32]) -> f64 {
        let mut msg = [0u8; 64];
        msg[..32].copy_from_slice(request);
        msg[32..].copy_from_slice(commitment);
        self.uniform_for(b"plexus/audit-draw/v1", &msg)
    }

    /// Whether the job `request` with this commitment is audited at probability `p`.
    pub fn audits(&self, request: &[u8; 32], commitment: &[u8; 32], p: f64) -> bool {
        self.uniform(request, commitment) < p
    }

    /// A uniform for another purpose (planting known-answer audits, picking auditors), domain
    /// separated by `label`.
    pub fn uniform_for(&self, label: &[u8], message: &[u8]) -> f64 {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            // HMAC takes keys of any length; unreachable.
            return 1.0;
        };
        mac.update(label);
        mac.update(message);
        let out = mac.finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&out[..8]);
        (u64::from_be_bytes(first) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl std::fmt::Debug for DrawKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DrawKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn anchor_example() {
        // ANCHORS.md: C = R = 0.01, S = 10, r = 0.1 -> p > 0.11%.
        let p = Posp {
            cost: 10_000,
            reward: 10_000,
            slash: 10_000_000,
            collusion: 0.1,
            margin: 1.0,
            floor: 0.0,
        };
        let b = p.bound().unwrap();
        assert!((b - 0.00111).abs() < 1e-5, "{b}");
        assert!(p.cheating_gain(b * 1.01) < 0.0);
        assert!(p.cheating_gain(b * 0.99) > 0.0);
    }

    #[test]
    fn refuses_bad_parameters() {
        let ok = Posp {
            cost: 1,
            reward: 1,
            slash: 1,
            collusion: 0.0,
            margin: 1.0,
            floor: 0.0,
        };
        assert_eq!(
            Posp {
                collusion: 1.0,
                ..ok
            }
            .bound(),
            Err(PospError::Collusion(1.0))
        );
        assert_eq!(
            Posp {
                reward: 0,
                slash: 0,
                ..ok
            }
            .bound(),
            Err(PospError::NothingAtStake)
        );
        assert_eq!(
            Posp { margin: 0.5, ..ok }.probability(),
            Err(PospError::Margin(0.5))
        );
        assert_eq!(
            Posp { floor: 2.0, ..ok }.probability(),
            Err(PospError::Floor(2.0))
        );
        assert_eq!(Posp { cost: 100, ..ok }.probability(), Ok(1.0));
    }

    #[test]
    fn network_probability_follows_stake_and_price() {
        // Nothing at stake: every job.
        assert_eq!(network_probability(0, 0, 0.1), 1.0);
        assert_eq!(network_probability(10, 0, 0.1), 1.0);
        // 100 PLX staked at price 10: the bound is tiny, the floor applies.
        assert_eq!(network_probability(10, 100_000_000, 0.1), NETWORK_FLOOR);
        // Stake of the order of the pay: 2 * 327 / (0.9 * (327 + 3000)) = 0.218.
        let p = network_probability(10, 3_000, 0.1);
        assert!((p - 0.2185).abs() < 1e-3, "{p}");
        assert!(network_probability(10, 3_000, 0.5) > p);
        assert_eq!(network_probability(10, 3_000, 1.0), 1.0);
        // A build of its own: four times the probability, at most 1.
        assert_eq!(cross_build_probability(NETWORK_FLOOR), 4.0 * NETWORK_FLOOR);
        assert_eq!(cross_build_probability(p), 1.0f64.min(4.0 * p));
        assert_eq!(cross_build_probability(1.0), 1.0);
    }

    #[test]
    fn draw_rate_matches_p() {
        let key = DrawKey::new([7; 32]);
        let n = 20_000u32;
        let hits = (0..n)
            .filter(|i| {
                let mut c = [0u8; 32];
                c[..4].copy_from_slice(&i.to_le_bytes());
                key.audits(&c, &[9; 32], 0.05)
            })
            .count();
        let rate = hits as f64 / f64::from(n);
        assert!((rate - 0.05).abs() < 0.006, "{rate}");
    }

    proptest! {
        #[test]
        fn probability_deters(cost in 1u64..1_000_000, reward in 0u64..1_000_000, slash in 1u64..1_000_000_000, r in 0.0f64..0.9) {
            let posp = Posp { cost, reward, slash, collusion: r, margin: 1.5, floor: 0.0 };
            let p = posp.probability().unwrap();
            prop_assert!((0.0..=1.0).contains(&p));
            if p < 1.0 {
                prop_assert!(posp.cheating_gain(p) < 0.0);
            }
        }

        #[test]
        fn draw_is_keyed(c in any::<[u8; 32]>(), k1 in any::<[u8; 32]>(), k2 in any::<[u8; 32]>()) {
            prop_assume!(k1 != k2);
            let (a, b) = (DrawKey::new(k1), DrawKey::new(k2));
            prop_assert_eq!(a.uniform(&c, &c), DrawKey::new(k1).uniform(&c, &c));
            prop_assert_ne!(a.uniform(&c, &c), b.uniform(&c, &c));
            let mut other = c;
            other[5] ^= 1;
            prop_assert_ne!(a.uniform(&other, &c), a.uniform(&c, &c));
        }
    }
}
