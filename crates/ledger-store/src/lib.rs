//! Durable storage for the Plexus ledger: the journal, the balances and API keys in SQLite (a
//! file, WAL, created on first start) or PostgreSQL (from a URL), behind one [`Store`].
//!
//! Every state change is one database transaction that appends the journal entry and updates
//! the balances it touches. On open the journal is replayed through the state machine (hash
//! chain and every operation re-checked) and the stored balances are compared with the
//! re-derived ones, so a store never serves from state its journal does not justify.
//!
//! One process writes at a time per journal entry: the entry's sequence number is the primary
//! key, so a second writer's stale append fails, the store reloads and retries once.
//!
//! Beside the journal, a gateway records the vouchers it signs during streams
//! ([`Store::record_vouchers`]): they are promises, not ledger state, until the request settles.

mod issued;
mod schema;
mod store;

pub use sqlx::Error as DbError;
pub use store::{hash_api_key, ApiKey, Backend, OpenError, Store, StoreError, VerifyError};

// Used by the ledger-crash-loop binary (src/bin) only.
use k256 as _;
use tokio as _;
#[cfg(test)]
use {proptest as _, tempfile as _};
