//! The rules a ledger runs under: chain id, challenge window, unbonding period, slash split and
//! the local-mode faucet. Fixed when a ledger is created (stored beside its journal).

use crate::types::{Amount, MAX_AMOUNT};
use serde::{Deserialize, Serialize};

/// One hour, in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;

/// Basis points in a whole (100%).
pub const BPS: u32 = 10_000;

/// The rules of one ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The EIP-712 domain's chain id: vouchers signed for another chain are refused.
    pub chain_id: u64,
    /// How long a provider's earnings stay locked (and slashable) after they are paid.
    pub challenge_window_ms: u64,
    /// How long unbonding stake stays slashable before it is claimable. Longer than the
    /// challenge window, so stake cannot leave before the work it backed can be challenged.
    pub unbonding_period_ms: u64,
    /// Share of a slash paid to the challenger, in basis points.
    pub challenger_bps: u32,
    /// Share of a slash refunded to the client of the slashed request, in basis points. The rest
    /// goes to the treasury (so does the refund share when there is no client to refund).
    pub refund_bps: u32,
    /// Largest single faucet deposit (local mode); `0` disables the faucet.
    pub faucet_max: Amount,
}

impl Default for Config {
    /// Local-mode rules: chain id 31337 (a development chain), earnings locked 24 h, stake
    /// unbonding over 7 days, slashes split 50% challenger / 25% client / 25% treasury.
    fn default() -> Self {
        Self {
            chain_id: 31_337,
            challenge_window_ms: 24 * HOUR_MS,
            unbonding_period_ms: 7 * 24 * HOUR_MS,
            challenger_bps: 5_000,
            refund_bps: 2_500,
            faucet_max: 1_000_000 * crate::types::UNITS_PER_PLX,
        }
    }
}

/// Rules that cannot work together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "the unbonding period ({unbonding_ms} ms) must be longer than the challenge window \
         ({window_ms} ms), or stake could leave before the work it backs can be challenged"
    )]
    UnbondingTooShort { unbonding_ms: u64, window_ms: u64 },
    #[error("the slash split gives {total} basis points of 10000 to challenger and client")]
    SplitOver100 { total: u64 },
    #[error("the faucet limit {max} exceeds the largest amount {MAX_AMOUNT}")]
    FaucetTooLarge { max: Amount },
}

impl Config {
    /// Checks the rules hold together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.unbonding_period_ms <= self.challenge_window_ms {
            return Err(ConfigError::UnbondingTooShort {
                unbonding_ms: self.unbonding_period_ms,
                window_ms: self.challenge_window_ms,
            });
        }
        let total = u64::from(self.challenger_bps) + u64::from(self.refund_bps);
        if total > u64::from(BPS) {
            return Err(ConfigError::SplitOver100 { total });
        }
        if self.faucet_max > MAX_AMOUNT {
            return Err(ConfigError::FaucetTooLarge {
                max: self.faucet_max,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_hold_and_bad_ones_are_named() {
        Config::default().validate().unwrap();
        let c = Config {
            unbonding_period_ms: HOUR_MS,
            challenge_window_ms: HOUR_MS,
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::UnbondingTooShort { .. })
        ));
        let c = Config {
            challenger_bps: 9_000,
            refund_bps: 2_000,
            ..Config::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::SplitOver100 { total: 11_000 })
        );
    }
}
