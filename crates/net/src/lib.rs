//! placeholder (the lead is writing this crate)
use futures as _;
use libp2p as _;
use plexus_core as _;
use serde as _;
use thiserror as _;
use tokio as _;
use tracing as _;
