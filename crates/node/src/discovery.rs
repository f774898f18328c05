//! Keeps a [`Directory`] current from network events: gossip announcements, a direct
//! `Describe` call to every newly connected peer (so a fresh process does not wait for the
//! next gossip round), and removal of peers that disconnect. Readers get snapshots through a
//! `watch` channel; the keeper is owned by one event loop (node or client).

use crate::directory::{AdmitError, Directory};
use plexus_core::announce::VerifyAnnouncementError;
use plexus_core::wire::{Request, Response};
use plexus_net::{NetHandle, PeerId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

/// Unix milliseconds now (the only clock read of discovery; verification takes it as input).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What became of the announcements a keeper saw (for metrics and tests).
#[derive(Debug, Default)]
pub struct DiscoveryCounters {
    /// Verified and stored.
    pub admitted: AtomicU64,
    /// Forged, malformed or relayed by the wrong peer (the sender is disconnected).
    pub refused: AtomicU64,
    /// Expired or older than one already known (dropped quietly: clocks and gossip lag).
    pub ignored: AtomicU64,
}

/// Owns the directory of one process.
pub struct DirectoryKeeper {
    dir: Directory,
    counters: Arc<DiscoveryCounters>,
    tx: watch::Sender<Arc<Directory>>,
    described_tx: mpsc::Sender<(PeerId, Vec<u8>)>,
    /// Announcements fetched by `Describe`, for the owning loop to [`Self::admit`].
    pub described: mpsc::Receiver<(PeerId, Vec<u8>)>,
    handle: NetHandle,
}

impl DirectoryKeeper {
    pub fn new(handle: NetHandle) -> (Self, watch::Receiver<Arc<Directory>>) {
        let (tx, rx) = watch::channel(Arc::new(Directory::default()));
        let (described_tx, described) = mpsc::channel(64);
        (
            Self {
                dir: Directory::default(),
                counters: Arc::default(),
                tx,
                described_tx,
                described,
                handle,
            },
            rx,
        )
    }

    pub fn directory(&self) -> &Directory {
        &self.dir
    }

    pub fn counters(&self) -> Arc<DiscoveryCounters> {
        Arc::clone(&self.counters)
    }

    fn publish(&self) {
        self.tx.send_replace(Arc::new(self.dir.clone()));
    }

    /// Verifies an announcement; forged ones get their sender disconnected.
    pub async fn admit(&mut self, data: &[u8], source: Option<PeerId>) {
        match self.dir.admit(data, source, now_ms()) {
            Ok(peer) => {
                debug!(%peer, "announcement admitted");
                self.counters.admitted.fetch_add(1, Ordering::Relaxed);
                self.publish();
            }
            Err(e @ AdmitError::Stale { .. })
            | Err(e @ AdmitError::Verify(VerifyAnnouncementError::Expired(_))) => {
                debug!(source = ?source, "ignored an announcement: {e}");
                self.counters.ignored.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(source = ?source, "refused an announcement: {e}");
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(peer) = source {
                    self.handle.disconnect(peer).await;
                }
            }
        }
    }

    /// Asks a newly connected peer for its announcement (in the background).
    pub fn describe(&self, peer: PeerId) {
        let handle = self.handle.clone();
        let tx = self.described_tx.clone();
        tokio::spawn(async move {
            if let Ok(Response::Described(bytes)) = handle.call(peer, Request::Describe).await {
                let _ = tx.try_send((peer, bytes));
            }
        });
    }

    pub fn remove(&mut self, peer: &PeerId) {
        self.dir.remove(peer);
        self.publish();
    }

    pub fn prune(&mut self) {
        let before = self.dir.len();
        self.dir.prune(now_ms());
        if self.dir.len() != before {
            self.publish();
        }
    }
}
