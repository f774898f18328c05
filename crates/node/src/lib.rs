//! placeholder (the lead is writing this crate)
use futures as _;
use half as _;
use plexus_core as _;
use plexus_model as _;
use plexus_net as _;
use serde as _;
use serde_json as _;
use thiserror as _;
use tokio as _;
use tracing as _;
