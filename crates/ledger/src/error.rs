//! One error enum per operation, each naming what was asked and what stood in the way.

use crate::journal::ChainError;
use crate::types::{Address, Amount, Bucket, RequestId, Timestamp};
use crate::voucher::SignatureError;

/// A bucket lacks the funds an operation needs.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("{bucket} holds {available}, {needed} needed")]
pub struct Insufficient {
    pub bucket: Bucket,
    pub needed: Amount,
    pub available: Amount,
}

/// A broken internal invariant (a bug, never bad input); the ledger is left unchanged.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("ledger invariant broken: {0}")]
pub struct InvariantError(pub String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DepositError {
    #[error("a deposit of 0 does nothing")]
    Zero,
    #[error("the faucet is off on this ledger")]
    FaucetOff,
    #[error("the faucet gives at most {max} at a time, {asked} asked")]
    OverFaucetLimit { asked: Amount, max: Amount },
    #[error("depositing {amount} would take the total supply past {max}")]
    SupplyOverflow { amount: Amount, max: Amount },
    #[error(transparent)]
    Invariant(#[from] InvariantError),
}

/// For withdraw, stake and unbond: moving an amount out of one bucket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoveError {
    #[error("an amount of 0 does nothing")]
    Zero,
    #[error(transparent)]
    Insufficient(#[from] Insufficient),
    #[error(transparent)]
    Invariant(#[from] InvariantError),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    #[error("{account} has nothing claimable at {now} (next unlock: {next:?})")]
    NothingClaimable {
        account: Address,
        now: Timestamp,
        next: Option<Timestamp>,
    },
    #[error(transparent)]
    Invariant(#[from] InvariantError),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EscrowError {
    #[error("an escrow of 0 holds nothing")]
    Zero,
    #[error("request {request} already has an escrow (open or settled)")]
    Duplicate { request: RequestId },
    #[error(transparent)]
    Insufficient(#[from] Insufficient),
    #[error(transparent)]
    Invariant(#[from] InvariantError),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettleError {
    #[error("request {request} has no escrow")]
    Unknown { request: RequestId },
    #[error("request {request} was already settled with other payouts")]
    Conflict { request: RequestId },
    #[error("provider {provider} is named twice in the payouts of request {request}")]
    DuplicateProvider {
        request: RequestId,
        provider: Address,
    },
    #[error("request {request} holds {held} in escrow, payouts add up to {asked}")]
    ExceedsEscrow {
        request: RequestId,
        held: Amount,
        asked: u128,
    },
    #[error(transparent)]
    Invariant(#[from] InvariantError),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedeemError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("the voucher is for request {voucher}, not for request {request}")]
    ForAnotherRequest {
        request: RequestId,
        voucher: RequestId,
    },
    #[error("request {request} has no open escrow (unknown or already settled)")]
    NotOpen { request: RequestId },
    #[error("the voucher's payer {payer} is not the gateway {gateway} holding request {request}")]
    WrongPayer {
        request: RequestId,
        payer: Address,
        gateway: Address,
    },
    #[error(
        "replayed voucher: nonce {nonce} for {provider} on request {request} is already redeemed"
    )]
    Replayed {
        request: RequestId,
        provider: Address,
        nonce: u64,
    },
    #[error("stale voucher: nonce {nonce} is older than the redeemed nonce {redeemed}")]
    Stale { nonce: u64, redeemed: u64 },
    #[error(
        "the voucher's cumulative amount {cumulative} is below the {redeemed} already redeemed"
    )]
    BelowRedeemed {
        cumulative: Amount,
        redeemed: Amount,
    },
    #[error("the voucher's cumulative amount {cumulative} equals what is already redeemed")]
    NothingNew { cumulative: Amount },
    #[error("request {request} holds {held} in escrow; vouchers would pay {asked}")]
    ExceedsEscrow {
        request: RequestId,
        held: Amount,
        asked: u128,
    },
    #[error(transparent)]
    Invariant(#[from] InvariantError),
    #[error(
        "request {request} is already settled: its settlement paid {provider} {paid} \
         (the voucher says {cumulative}); nothing is left in its escrow to redeem"
    )]
    Settled {
        request: RequestId,
        provider: Address,
        paid: Amount,
        cumulative: Amount,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChallengeError {
    #[error("{provider} has no locked earnings for request {request}")]
    NoEarnings {
        request: RequestId,
        provider: Address,
    },
    #[error("the challenge window of request {request} closed at {closed_at}; it is {now}")]
    WindowClosed {
        request: RequestId,
        closed_at: Timestamp,
        now: Timestamp,
    },
    #[error("the earnings of {provider} on request {request} are already challenged")]
    AlreadyChallenged {
        request: RequestId,
        provider: Address,
    },
    #[error("the earnings of {provider} on request {request} are not challenged")]
    NotChallenged {
        request: RequestId,
        provider: Address,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlashError {
    #[error("a slash of 0 does nothing")]
    Zero,
    #[error("{offender} has no stake, unbonding stake or locked earnings to slash")]
    NothingToSlash { offender: Address },
    #[error("{offender} was already slashed for request {request}")]
    AlreadySlashed {
        offender: Address,
        request: RequestId,
    },
    #[error(transparent)]
    Invariant(#[from] InvariantError),
}

/// Any operation's error (what [`crate::Ledger::execute`] returns).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpError {
    #[error("deposit refused: {0}")]
    Deposit(#[from] DepositError),
    #[error("withdraw, stake or unbond refused: {0}")]
    Move(#[from] MoveError),
    #[error("claim refused: {0}")]
    Claim(#[from] ClaimError),
    #[error("escrow refused: {0}")]
    Escrow(#[from] EscrowError),
    #[error("settlement refused: {0}")]
    Settle(#[from] SettleError),
    #[error("voucher refused: {0}")]
    Redeem(#[from] RedeemError),
    #[error("challenge refused: {0}")]
    Challenge(#[from] ChallengeError),
    #[error("slash refused: {0}")]
    Slash(#[from] SlashError),
}

/// Why a journal does not replay into a ledger.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("journal entry {seq} records an operation the rules refuse: {source}")]
    Refused {
        seq: u64,
        #[source]
        source: OpError,
    },
    #[error("journal entry {seq} records postings the rules do not produce")]
    Diverged { seq: u64 },
    #[error("journal entry {seq} records a settlement that was already settled")]
    Noop { seq: u64 },
}
