//! Plexus verification, pure logic: what a gateway needs to audit stage calls by Proof of
//! Sampling. No I/O, no clock, no global randomness; the engine calls (replays) live in the
//! caller (the node, the gateway, `plexus sim`).
//!
//! - [`seed`]: the protocol's sampling seed (request id + the gateway's commitment);
//! - [`fingerprint`]: per-32-position activation fingerprints and the 32-byte digest a
//!   receipt commits to ([`commitment::Commitment`] adds the sampled tokens);
//! - [`compare`]: exact and tolerance comparison;
//! - [`draw`]: the keyed audit draw and the PoSP probability;
//! - [`tokens`]: Token-DiFR, recomputing each sampled token from the auditor's logits;
//! - [`stats`]: Gonka-style statistical verdicts (binomial tail < 1e-6);
//! - [`arbitration`]: k referees, majority verdict, who is slashed;
//! - [`known_answer`]: planted audits that catch lazy auditors;
//! - [`reputation`]: the published score.
//!
//! Flow: provider computes and commits -> gateway draws (`draw`) -> auditor replays and
//! fingerprints -> gateway compares (`compare`, `tokens`) -> pass, miss (`stats`) or case
//! (`arbitration`) -> the binary applies verdicts to the ledger (slash, refund, challenger pay)
//! and to routing (`reputation`).

pub mod arbitration;
pub mod commitment;
pub mod compare;
pub mod draw;
pub mod fingerprint;
pub mod known_answer;
pub mod near_tie;
pub mod replay;
pub mod reputation;
pub mod seed;
pub mod stats;
pub mod ties;
pub mod tokens;

pub use commitment::Commitment;
pub use fingerprint::{Fingerprint, Fingerprinter, Scheme, WINDOW};

// Dev-dependencies used by the integration tests only.
#[cfg(test)]
use plexus_testkit as _;
#[cfg(test)]
use rayon as _;
#[cfg(test)]
use tempfile as _;
