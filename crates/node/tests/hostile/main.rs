//! Hostile input against a real node on loopback: what a misbehaving or malicious peer can
//! send, and what the node must do about it (answer, refuse, disconnect, ban), while it keeps
//! serving everyone else correctly.
//!
//! - [`frames`]: raw bytes on the stage protocol: garbage, truncated, oversized and stalled
//!   frames, inconsistent shapes, the whole kept wire corpus; strikes and bans.
//! - [`requests`]: well-formed but wrong calls (sessions, positions, models, vocabulary,
//!   context), odd activations (NaN, infinities, bogus int8 scales, wrong widths) and floods.
//! - [`announcements`]: forged, relayed, tampered and expired announcements on gossip.
//! - [`receipts`]: signed receipts of stage calls, metering per provider, inflated claims.
//! - [`audits`]: cheating nodes among honest replicas, caught by audits and excluded.
//! - [`doubts`]: a trusted gateway's doubts move a spare beside the doubted node.
//!
//! After every attack a fresh client generates through the node and must get exactly what the
//! model generates in this process ([`support::assert_serves`]).
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

mod announcements;
mod audits;
mod doubts;
mod frames;
mod lying;
mod receipts;
mod requests;
mod support;
