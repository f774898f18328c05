//! Delivery of vouchers to providers: during a stream and after its settlement the gateway
//! sends each provider's node its signed cumulative voucher (`Request::Voucher`); the node
//! verifies it and keeps the latest (`plexus_node::vouchers`).
//!
//! ```text
//! generation thread ─ post (try_send, never blocks) ─▶ bounded queue (QUEUE)
//!   ─▶ worker: at most CONCURRENCY deliveries at once, one at a time per (provider, request),
//!      in nonce order; a voucher superseded while it waited is not sent (the later one is):
//!      [`crate::delivery::Schedule`]
//!        provider account ─▶ peer (directory: the peer whose announced key is the account)
//!        ─▶ call(peer, Request::Voucher) ─▶ VoucherKept | Error (refused, logged) | timeout
//! ```
//!
//! Delivery is best effort: vouchers are recorded (during a stream) or paid by the settlement
//! before they are posted, so a lost voucher costs the provider only its own signed copy
//! (counted in `plexus_vouchers_{kept,refused,failed,dropped,superseded}_total`).

use crate::delivery::{key, Key, Offer, Schedule};
use plexus_core::wire::{Request, Response};
use plexus_ledger::SignedVoucher;
use plexus_node::client::NetworkClient;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

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
    /// A later voucher for the same provider and request was posted before it was sent.
    pub superseded: AtomicU64,
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
        let mut worker = Worker {
            client,
            counters: counters.clone(),
            schedule: Schedule::new(CONCURRENCY, QUEUE),
            tasks: JoinSet::new(),
            running: HashMap::new(),
        };
        rt.spawn(async move {
            let mut open = true;
            while open || !worker.tasks.is_empty() {
                tokio::select! {
                    v = rx.recv(), if open => match v {
                        Some(v) => worker.offer(v),
                        None => open = false,
                    },
                    Some(done) = worker.tasks.join_next_with_id(), if !worker.tasks.is_empty() => {
                        match done {
                            Ok((id, ())) => worker.finished(id),
                            Err(e) => {
                                tracing::error!("a voucher delivery task failed: {e}");
                                worker.finished(e.id());
                            }
                        }
                    }
                }
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
            (
                "superseded",
                "Vouchers not sent because a later one for the same provider and request was.",
                &c.superseded,
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

/// The delivery worker: the [`Schedule`] and the deliveries it started.
struct Worker {
    client: NetworkClient,
    counters: Arc<Counters>,
    schedule: Schedule,
    tasks: JoinSet<()>,
    /// The key of each running delivery task.
    running: HashMap<tokio::task::Id, Key>,
}

impl Worker {
    fn offer(&mut self, v: SignedVoucher) {
        match self.schedule.offer(v) {
            Offer::Start(v) => self.start(v),
            Offer::Waiting => {}
            Offer::Superseded => {
                self.counters.superseded.fetch_add(1, Ordering::Relaxed);
            }
            Offer::Dropped => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("voucher delivery queue full; a voucher was dropped");
            }
        }
    }

    fn start(&mut self, v: SignedVoucher) {
        let key = key(&v);
        let (client, c) = (self.client.clone(), self.counters.clone());
        let task = self
            .tasks
            .spawn(async move { deliver(&client, &c, v).await });
        self.running.insert(task.id(), key);
    }

    /// A delivery task ended (or failed: its key is free again either way).
    fn finished(&mut self, id: tokio::task::Id) {
        if let Some(key) = self.running.remove(&id) {
            for v in self.schedule.finished(key) {
                self.start(v);
            }
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
