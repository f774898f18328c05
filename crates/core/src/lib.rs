//! Plexus core: the small, dependency-light vocabulary every other crate shares.
//!
//! - [`hash`]: sha256 digests and the identities built from them (a model's identity is the
//!   sha256 of its weights).
//! - [`rng`]: counter-based random numbers (Philox4x32-10). A random draw is a pure function of
//!   `(seed, stream, counter)`, so any node can recompute any single draw without replaying a
//!   stream: the sampler, audits and shard assignment are built on it.
//!
//! - [`keys`]: the node key (secp256k1): libp2p identity and ledger account in one.
//! - [`announce`]: signed, expiring announcements of what a node serves.
//! - [`wire`]: the stage-call protocol and activations on the wire.
//! - [`receipt`]: what a stage node signs for each call it served (metering per provider).
//! - [`sampling`]: sampling parameters (the sampler itself is in `plexus-model`).
//!
//! Nothing here reads the clock, the environment or a global RNG, and nothing depends on tokio or
//! candle.

pub mod announce;
pub mod hash;
pub mod keys;
pub mod receipt;
pub mod rng;
pub mod sampling;
pub mod wire;

pub use hash::{Digest, Sha256Stream};
