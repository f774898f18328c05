//! The Plexus node: serves a span of a model's layers to the network, and the client side that
//! drives a chain of such nodes.
//!
//! - [`service`]: the daemon (`plexus node`): engine + network + announcements.
//! - [`engine`]: the engine thread with per-session KV caches.
//! - [`client`]: drives generations over a chain of remote stages, with failover.
//! - [`directory`], [`discovery`]: who serves what, from verified announcements.
//! - [`route`]: the cheapest chain for a request; [`reputation`]: the gateway's score of each
//!   node in it; [`placement`]: spans for nodes.
//! - [`measure`]: seconds per layer and free memory.
//! - [`metering`]: signed receipts of stage calls checked and summed per provider.
//! - [`audit`]: Proof-of-Sampling audits of stage calls (draw, shadow auditor, referees);
//!   [`cheat`]: the test-only cheating modes audits must catch.

pub mod audit;
pub mod chain;
pub mod cheat;
pub mod checks;
pub mod client;
pub mod directory;
pub mod discovery;
pub mod engine;
pub mod gather;
pub mod measure;
pub mod metering;
pub mod placement;
pub mod probe;
pub mod reputation;
pub mod route;
pub mod scoreboard;
pub mod service;
pub mod verdicts;
pub mod vouchers;

pub use service::{AutoPlacement, Node, NodeConfig, StartNodeError};

// Dev-dependencies are for the integration tests in tests/.
#[cfg(test)]
use {futures as _, libp2p as _, tracing_subscriber as _};
