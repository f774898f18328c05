//! Plexus settlement: a pure, journaled state machine over accounts, stake, escrow, vouchers
//! and slashing. No I/O, no clock, no randomness: time is an argument of every operation, so
//! the same operations give the same journal bytes anywhere. Storage lives in
//! `plexus-ledger-store`.
//!
//! - [`types`]: amounts (micro-PLX, integers), time, addresses, request ids, buckets, postings.
//! - [`config`]: chain id, challenge window, unbonding period, slash split, faucet.
//! - [`op`]: the operations, recorded verbatim in the journal.
//! - [`ledger`]: the state machine.
//! - [`journal`]: hash-chained entries with double-entry postings; balances derived from them.
//! - [`voucher`]: EIP-712 cumulative vouchers signed with secp256k1.
//! - [`receipt`]: EIP-712 stage receipts, a provider's signed account of one stage call.
//!
//! ## Money flow
//!
//! A client's deposit (or faucet) lands in its *available* bucket. A request opens an *escrow*
//! for its maximum cost; the gateway signs cumulative *vouchers* to providers, who *redeem* them
//! into *locked* earnings; *settle* closes the escrow (providers paid at least their vouchers,
//! the rest refunded). Locked earnings become claimable after the challenge window unless
//! challenged. Providers *stake*; *unbond* starts an unbonding period longer than the challenge
//! window. *Slash* (called by verification) takes from stake, then unbonding stake, then locked
//! earnings, and splits it between challenger, the request's client and the treasury.
//!
//! ## Entry points for verification
//!
//! [`Ledger::earnings`] lists what is still inside its window; [`Ledger::challenge`] freezes a
//! provider's earnings for one request before the window closes; [`Ledger::dismiss`] releases
//! them; [`Ledger::slash`] punishes (and ends the challenge on that request).

pub mod config;
pub mod error;
pub mod journal;
pub mod ledger;
pub mod op;
pub mod receipt;
pub mod types;
pub mod voucher;

pub use config::Config;
pub use error::*;
pub use journal::{derive_balances, verify_chain, Entry};
pub use ledger::{AccountView, Earning, Escrow, Ledger, Settlement, Tranche};
pub use op::{Op, Payout};
pub use types::{
    address_of, address_of_peer, Address, Amount, Bucket, Posting, RequestId, Timestamp,
};
pub use voucher::{SignedVoucher, Voucher};

// Dev-dependencies used by the integration tests only.
#[cfg(test)]
use proptest as _;
