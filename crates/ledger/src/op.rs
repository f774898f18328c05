//! The operations a ledger executes. Each one, once it succeeds, is recorded verbatim in its
//! journal entry, so replaying the journal re-executes exactly what happened.

use crate::types::{Address, Amount, RequestId};
use crate::voucher::SignedVoucher;
use serde::{Deserialize, Serialize};

/// One provider's total pay for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payout {
    pub provider: Address,
    pub amount: Amount,
}

/// An operation on the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Funds arriving from outside (a bridge, an operator's top-up).
    Deposit { account: Address, amount: Amount },
    /// Local-mode free funds, at most the configured faucet limit at a time.
    Faucet { account: Address, amount: Amount },
    /// Funds leaving the ledger from an account's available balance.
    Withdraw { account: Address, amount: Amount },
    /// Available funds bonded as stake.
    Stake { account: Address, amount: Amount },
    /// Stake starting its unbonding period.
    Unbond { account: Address, amount: Amount },
    /// Matured earnings and matured unbonded stake made available.
    Claim { account: Address },
    /// Funds of `client` held for one request; `gateway` is the address whose vouchers spend it.
    OpenEscrow {
        request: RequestId,
        client: Address,
        gateway: Address,
        amount: Amount,
    },
    /// A provider redeeming a cumulative voucher against an open escrow.
    Redeem {
        request: RequestId,
        voucher: SignedVoucher,
    },
    /// The gateway's final word on a request: each provider's total pay (at least what their
    /// vouchers already redeemed), the rest refunded to the client, the escrow closed.
    Settle {
        request: RequestId,
        payouts: Vec<Payout>,
    },
    /// A challenger disputing a provider's locked earnings for a request inside the challenge
    /// window: the earnings stay locked until the challenge is dismissed or ends in a slash.
    Challenge {
        request: RequestId,
        provider: Address,
        challenger: Address,
    },
    /// A challenge found groundless: the earnings are released to mature normally.
    Dismiss {
        request: RequestId,
        provider: Address,
    },
    /// Punishment of a provider: up to `amount` taken from stake, then unbonding stake, then
    /// locked earnings (those of `request` first); split between the challenger, a refund to the
    /// request's client and the treasury.
    Slash {
        offender: Address,
        amount: Amount,
        challenger: Address,
        request: Option<RequestId>,
    },
}

impl Op {
    /// A short name for logs and the history table.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Deposit { .. } => "deposit",
            Op::Faucet { .. } => "faucet",
            Op::Withdraw { .. } => "withdraw",
            Op::Stake { .. } => "stake",
            Op::Unbond { .. } => "unbond",
            Op::Claim { .. } => "claim",
            Op::OpenEscrow { .. } => "open-escrow",
            Op::Redeem { .. } => "redeem",
            Op::Settle { .. } => "settle",
            Op::Challenge { .. } => "challenge",
            Op::Dismiss { .. } => "dismiss",
            Op::Slash { .. } => "slash",
        }
    }
}
