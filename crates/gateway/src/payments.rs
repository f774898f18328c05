//! Delivery of vouchers to providers: after a settlement the gateway sends each provider's
//! node its signed cumulative voucher (`Request::Voucher`); the node verifies it and keeps the
//! latest (`plexus_node::vouchers`).
//!
//! ```text
//! generation thread ─ post (try_send, never blocks) ─▶ bounded queue (QUEUE)
//!   ─▶ worker: at most CONCURRENCY deliveries at once
//!        provider account ─▶ peer (directory: the peer whose announced key is the account)
//!        ─▶ call(peer, Request::Voucher) ─▶ VoucherKept | Error (refused, logged) | timeout
//! ```
//!
//! Delivery is best effort: the settlement has already paid the provider the same amount on
//! the ledger, so a lost voucher costs the provider only its own signed copy (counted in
//! `plexus_vouchers_{kept,refused,failed,dropped}_total`).

use plexus_core::wire::{Request, Response};
use plexus_ledger::SignedVoucher;
use plexus_node::client::NetworkClient;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// Vouchers waiting for delivery at most; beyond, new ones are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Deliveries in flight at most.
pub const CONCURRENCY: usize = 32;
/// How long one delivery may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// What happened to delivered vouchers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Kept by the provider's node.
    pub kept: AtomicU64,
    /// Refused by the node (its reason is logged).
    pub refused: AtomicU64,
    /// No peer with the provider's account, a failed call, or a timeout.
    pub failed: AtomicU64,
    /// The queue was full.
    pub dropped: AtomicU64,
}

/// The sending half of the delivery queue.
pub struct VoucherPost {
    tx: mpsc::Sender<SignedVoucher>,
    counters: Arc<Counters>,
}

impl VoucherPost {
    /// Starts the delivery worker on the current tokio runtime (`None` outside one).
    pub fn start(client: NetworkClient) -> Option<Self> {
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let (tx, mut rx) = mpsc::channel::<SignedVoucher>(QUEUE);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        rt.spawn(async move {
            let slots = Arc::new(Semaphore::new(CONCURRENCY));
            while let Some(v) = rx.recv().await {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (client, c) = (client.clone(), c.clone());
                tokio::spawn(async move {
                    deliver(&client, &c, v).await;
                    drop(permit);
                });
            }
        });
        Some(Self { tx, counters })
    }

    /// Queues vouchers for delivery without waiting.
    pub fn post(&self, vouchers: Vec<SignedVoucher>) {
        for v in vouchers {
            if self.tx.try_send(v).is_err() {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("voucher delivery queue full; a voucher was dropped");
            }
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The counters in the OpenMetrics text format.
    pub fn render(&self, out: &mut String) {
        let c = &self.counters;
        for (name, help, v) in [
            (
                "kept",
                "Vouchers delivered to and kept by providers' nodes.",
                &c.kept,
            ),
            ("refused", "Vouchers a provider's node refused.", &c.refused),
            (
                "failed",
                "Vouchers not delivered (no peer for the account, call failed or timed out).",
                &c.failed,
            ),
            (
                "dropped",
                "Vouchers dropped because the delivery queue was full.",
                &c.dropped,
            ),
        ] {
            let _ = write!(
                out,
                "# HELP plexus_vouchers_{name} {help}\n# TYPE plexus_vouchers_{name} counter\nplexus_vouchers_{name}_total {}\n",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

async fn deliver(client: &NetworkClient, c: &Counters, v: SignedVoucher) {
    let provider = v.voucher.provider;
    let request = v.voucher.request;
    let Some(peer) = plexus_node::vouchers::peer_of(&client.directory(), provider) else {
        c.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%provider, %request, "no peer announces this provider's account; voucher not delivered");
        return;
    };
    let bytes = match serde_json::to_vec(&v) {
        Ok(b) => b,
        Err(e) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("cannot encode a voucher: {e}");
            return;
        }
    };
    let call = client
        .handle()
        .call(peer, Request::Voucher { voucher: bytes });
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(Ok(Response::VoucherKept { .. })) => {
            c.kept.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Ok(Response::Error { message, .. })) => {
            c.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%provider, %request, "voucher refused: {message}");
        }
        Ok(Ok(other)) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%provider, %request, "unexpected answer to a voucher: {other:?}");
        }
        Ok(Err(e)) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%provider, %request, "voucher not delivered: {e}");
        }
        Err(_) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%provider, %request, "voucher delivery timed out");
        }
    }
}
