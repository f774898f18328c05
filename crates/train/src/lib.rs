//! Plexus training protocol: DiLoCo rounds among workers that talk rarely and send little.
//!
//! - [`codec`]: pseudo-gradient encodings (f32, f16, int8 per block, sparse top-k with few-bit
//!   values) with exact sizes, and error feedback.
//! - [`assign`]: which examples a worker trains on in a round (anyone can recompute it).
//! - [`worker`]: one worker's round: H inner steps (the model crate's `Trainer`), pseudo-gradient,
//!   encoding, signed [`commit`]ment.
//! - [`round`]: the round state machine every worker runs: refusal of bad contributions,
//!   Gauntlet-style scoring, deterministic aggregation, the [`outer`] step, the adaptive
//!   [`deadline`].
//! - [`audit`]: re-execution of a round from its commitment; [`reveal`]: the commit-reveal of
//!   per-worker nonces that keys which contributions are re-executed.
//! - [`local`]: a run of several workers in one process (tests, `plexus bench train`).
//! - [`spec`]: the signed run spec a distributed run starts from; [`protocol`]: the messages
//!   workers exchange over the network (`plexus train --distributed` drives them);
//!   [`transfer`]: a global state fetched in ranges from several peers; [`resume`]: a worker's
//!   checkpoint between rounds.
//!
//! The math (forward, backward, AdamW) is in `plexus_model::train`; this crate keeps the
//! protocol. Nothing here reads the clock: times are passed in.

pub mod ans;
pub mod assign;
pub mod audit;
pub mod codec;
pub mod commit;
pub mod config;
pub mod deadline;
pub mod local;
pub mod outer;
pub mod protocol;
pub mod resume;
pub mod reveal;
pub mod round;
pub mod score;
pub mod spec;
pub mod transfer;
pub mod worker;

pub use codec::Codec;
pub use config::{RoundConfig, ScorePolicy};
pub use outer::OuterConfig;
