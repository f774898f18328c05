//! Keeps a [`Directory`] current from network events: gossip announcements, a direct
//! `Describe` call to every newly connected peer (so a fresh process does not wait for the
//! next gossip round), and removal of peers that disconnect. Readers get snapshots through a
//! `watch` channel; the keeper is owned by one event loop (node or client).
//!
//! - Snapshots are coalesced: the first admission after a quiet spell publishes at once, later
//!   ones within [`PUBLISH_EVERY`] wait for [`DirectoryKeeper::flush`] (the owning loop calls
//!   it at [`DirectoryKeeper::flush_at`]), so a burst of announcements at the peer cap costs a
//!   few snapshots, not one per announcement. Removals publish at once (routing needs them).
//! - The addresses a peer announces are handed to the transport, so a peer known only from
//!   relayed gossip can still be dialed.

use crate::directory::{AdmitError, Directory};
use plexus_core::announce::VerifyAnnouncementError;
use plexus_core::wire::{Request, Response};
use plexus_net::{NetHandle, PeerId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
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
    /// Directory snapshots published to readers.
    pub snapshots: AtomicU64,
}

/// Shortest spacing of directory snapshots during a burst of admissions.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// Most announced addresses handed to the transport per peer.
pub const MAX_DIAL_ADDRS: usize = 8;

/// Owns the directory of one process.
pub struct DirectoryKeeper {
    dir: Directory,
    counters: Arc<DiscoveryCounters>,
    tx: watch::Sender<Arc<Directory>>,
    described_tx: mpsc::Sender<(PeerId, Vec<u8>)>,
    /// Announcements fetched by `Describe`, for the owning loop to [`Self::admit`].
    pub described: mpsc::Receiver<(PeerId, Vec<u8>)>,
    handle: NetHandle,
    /// Admissions not yet in a published snapshot.
    dirty: bool,
    last_publish: Option<Instant>,
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
                dirty: false,
                last_publish: None,
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

    fn publish(&mut self) {
        self.tx.send_replace(Arc::new(self.dir.clone()));
        self.counters.snapshots.fetch_add(1, Ordering::Relaxed);
        self.dirty = false;
        self.last_publish = Some(Instant::now());
    }

    /// When the owning loop should call [`Self::flush`]; `None` when nothing waits.
    pub fn flush_at(&self) -> Option<Instant> {
        self.dirty.then(|| {
            self.last_publish
                .map_or_else(Instant::now, |t| t + PUBLISH_EVERY)
        })
    }

    /// Publishes admissions held back by coalescing.
    pub fn flush(&mut self) {
        if self.dirty {
            self.publish();
        }
    }

    fn publish_soon(&mut self) {
        let quiet = self
            .last_publish
            .is_none_or(|t| t.elapsed() >= PUBLISH_EVERY);
        if quiet {
            self.publish();
        } else {
            self.dirty = true;
        }
    }

    /// Verifies an announcement; forged ones get their sender disconnected.
    pub async fn admit(&mut self, data: &[u8], source: Option<PeerId>) {
        match self.dir.admit_changed(data, source, now_ms()) {
            Ok((peer, addrs_changed)) => {
                debug!(%peer, "announcement admitted");
                self.counters.admitted.fetch_add(1, Ordering::Relaxed);
                if addrs_changed {
                    self.learn_addrs(peer).await;
                }
                self.publish_soon();
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

    /// Hands the addresses `peer` announced to the transport (at most [`MAX_DIAL_ADDRS`];
    /// unparsable ones and ones naming another peer are skipped).
    async fn learn_addrs(&self, peer: PeerId) {
        let Some(a) = self.dir.get(&peer) else {
            return;
        };
        self.handle
            .add_addresses(peer, dial_addrs(peer, &a.addrs))
            .await;
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
        if self.dir.len() != before || self.dirty {
            self.publish();
        }
    }
}

/// Resolves at `at`, never if `None` (for a `select!` arm on [`DirectoryKeeper::flush_at`]).
pub async fn until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The dialable addresses among those `peer` announced: direct ones naming no other peer, and
/// relayed ones (`.../p2p/<relay>/p2p-circuit/p2p/<peer>`), of which up to half the places are
/// kept so a long list of direct addresses never crowds out the way to a node behind NAT.
pub fn dial_addrs(peer: PeerId, announced: &[String]) -> Vec<plexus_net::Multiaddr> {
    use plexus_net::{nat, Multiaddr};
    let valid: Vec<Multiaddr> = announced
        .iter()
        .filter_map(|s| s.parse::<Multiaddr>().ok())
        .filter(|a| {
            // After the last /p2p-circuit only `peer` may be named; before it, the relay.
            let tail = a
                .iter()
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .take_while(|p| *p != plexus_net::Protocol::P2pCircuit)
                .collect::<Vec<_>>();
            tail.iter().all(|p| match p {
                plexus_net::Protocol::P2p(id) => *id == peer,
                _ => true,
            }) && (!nat::is_relayed(a) || nat::peer_of(a) == Some(peer))
        })
        .collect();
    let (relayed, direct): (Vec<Multiaddr>, Vec<Multiaddr>) =
        valid.into_iter().partition(nat::is_relayed);
    let keep_relayed = relayed.len().min(MAX_DIAL_ADDRS / 2);
    let keep_direct = direct.len().min(MAX_DIAL_ADDRS - keep_relayed);
    direct
        .into_iter()
        .take(keep_direct)
        .chain(relayed.into_iter().take(keep_relayed))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::announce::Announcement;
    use plexus_core::keys::NodeKey;
    use plexus_net::{NetConfig, NetEvent};

    fn announcement(key: &NodeKey, addrs: Vec<String>) -> Vec<u8> {
        Announcement {
            addrs,
            ..crate::directory::tests::bare(key, now_ms())
        }
        .sign(key)
        .encode()
    }

    fn lone_handle(serve: bool, listen: bool) -> (NetHandle, mpsc::Receiver<NetEvent>) {
        let listen = if listen {
            vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]
        } else {
            Vec::new()
        };
        plexus_net::start(
            NetConfig::new(NodeKey::generate())
                .with_listen(listen)
                .with_serve(serve),
        )
        .unwrap()
    }

    /// Issue 7: every admitted announcement used to clone the whole directory for readers
    /// (quadratic at the 4096-peer cap). A burst now costs a few snapshots.
    #[tokio::test]
    async fn a_burst_of_announcements_costs_a_few_snapshots_issue_7() {
        let (handle, _events) = lone_handle(false, false);
        let (mut keeper, rx) = DirectoryKeeper::new(handle);
        let keys: Vec<NodeKey> = (0..500).map(|_| NodeKey::generate()).collect();
        let bytes: Vec<Vec<u8>> = keys.iter().map(|k| announcement(k, Vec::new())).collect();
        let started = Instant::now();
        for b in &bytes {
            keeper.admit(b, None).await;
        }
        // At most one snapshot per PUBLISH_EVERY, whatever the speed of this machine.
        let windows = (started.elapsed().as_millis() / PUBLISH_EVERY.as_millis()) as u64;
        let snapshots = keeper.counters().snapshots.load(Ordering::Relaxed);
        assert!(
            snapshots <= windows + 2,
            "{snapshots} snapshots for 500 admissions in {:?}",
            started.elapsed()
        );
        assert!(snapshots < 500);
        // Readers see everything once the loop flushes.
        let at = keeper.flush_at().expect("admissions wait for a flush");
        until(Some(at)).await;
        keeper.flush();
        assert_eq!(rx.borrow().len(), 500);
        assert!(keeper.flush_at().is_none());
    }

    /// Issue 7: announced addresses were never used for dialing, so a peer known only from
    /// relayed gossip could not be called. Now they reach the transport.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn announced_addresses_are_dialed_issue_7() {
        let server_key = NodeKey::generate();
        let (server, mut server_events) = plexus_net::start(
            NetConfig::new(server_key.clone())
                .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
                .with_serve(true),
        )
        .unwrap();
        let addr = loop {
            match server_events.recv().await {
                Some(NetEvent::Listening(a)) => break a,
                Some(_) => {}
                None => panic!("the server stopped"),
            }
        };
        let srv = server.clone();
        tokio::spawn(async move {
            while let Some(e) = server_events.recv().await {
                if let NetEvent::Request { reply, .. } = e {
                    srv.respond(reply, Response::Closed).await;
                }
            }
        });
        let (client, _client_events) = lone_handle(false, false);
        let (mut keeper, _rx) = DirectoryKeeper::new(client.clone());
        let other = NodeKey::generate().peer_id();
        keeper
            .admit(
                &announcement(
                    &server_key,
                    vec![
                        "not an address".into(),
                        format!("/ip4/127.0.0.1/tcp/1/p2p/{other}"),
                        addr.to_string(),
                    ],
                ),
                None,
            )
            .await;
        let reply = tokio::time::timeout(
            Duration::from_secs(20),
            client.call(
                server.peer_id(),
                Request::Close {
                    session: plexus_core::wire::SessionId([0; 16]),
                },
            ),
        )
        .await
        .expect("the call hung");
        assert!(matches!(reply, Ok(Response::Closed)), "{reply:?}");
    }

    #[test]
    fn only_this_peers_parsable_addresses_are_kept() {
        let me = NodeKey::generate().peer_id();
        let other = NodeKey::generate().peer_id();
        let announced: Vec<String> = [
            "garbage".to_string(),
            format!("/ip4/10.0.0.1/tcp/1/p2p/{other}"),
            format!("/ip4/10.0.0.2/tcp/2/p2p/{me}"),
            "/ip4/10.0.0.3/tcp/3".to_string(),
        ]
        .into_iter()
        .chain((0..20).map(|i| format!("/ip4/10.0.1.{i}/tcp/4")))
        .collect();
        let got = dial_addrs(me, &announced);
        assert_eq!(got.len(), MAX_DIAL_ADDRS);
        assert_eq!(got[0].to_string(), format!("/ip4/10.0.0.2/tcp/2/p2p/{me}"));
        assert_eq!(got[1].to_string(), "/ip4/10.0.0.3/tcp/3");
    }

    #[test]
    fn relayed_addresses_of_this_peer_are_kept_behind_many_direct_ones() {
        let me = NodeKey::generate().peer_id();
        let relay = NodeKey::generate().peer_id();
        let other = NodeKey::generate().peer_id();
        let circuit = format!("/ip4/10.0.0.9/tcp/9/p2p/{relay}/p2p-circuit/p2p/{me}");
        let announced: Vec<String> = (0..20)
            .map(|i| format!("/ip4/10.0.1.{i}/tcp/4"))
            .chain([
                // Relayed addresses of another peer, or naming no peer after the circuit.
                format!("/ip4/10.0.0.9/tcp/9/p2p/{relay}/p2p-circuit/p2p/{other}"),
                format!("/ip4/10.0.0.9/tcp/9/p2p/{relay}/p2p-circuit"),
                format!("/ip4/10.0.0.9/tcp/9/p2p/{other}/p2p/{me}"),
                circuit.clone(),
            ])
            .collect();
        let got: Vec<String> = dial_addrs(me, &announced)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got.len(), MAX_DIAL_ADDRS);
        assert_eq!(got.last(), Some(&circuit));
        assert_eq!(got.iter().filter(|a| a.contains("p2p-circuit")).count(), 1);
    }
}
