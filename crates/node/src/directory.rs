//! The directory: the latest verified announcement of every peer, dropped when it expires.
//! Feeds routing ([`crate::route`]) and placement ([`crate::placement`]).

use plexus_core::announce::{
    Announcement, ModelOffer, SignedAnnouncement, VerifyAnnouncementError,
};
use plexus_core::Digest;
use plexus_net::PeerId;
use std::collections::HashMap;
use std::sync::Arc;

/// Verified announcements by peer. Announcements are shared, so a snapshot for readers copies
/// pointers, not strings and address lists.
#[derive(Default, Debug, Clone)]
pub struct Directory {
    peers: HashMap<PeerId, Arc<Announcement>>,
}

/// Why an announcement did not enter the directory.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Verify(#[from] VerifyAnnouncementError),
    #[error("announced by {claimed} but relayed as from {source_peer}")]
    WrongSource {
        claimed: String,
        source_peer: PeerId,
    },
    #[error("an announcement of {peer} issued later is already known")]
    Stale { peer: PeerId },
    #[error("the directory is full and this announcement expires before every kept one")]
    Full,
}

/// Most peers kept. Gossip relays announcements from authors we are not connected to, so valid
/// announcements from many fresh keys could otherwise grow the directory without bound; when
/// full, the announcement that expires first makes room (or the newcomer is dropped).
pub const MAX_PEERS: usize = 4096;

impl Directory {
    /// Verifies and stores an announcement. `source` is the gossip author the transport
    /// authenticated, when known: it must be the announcing peer.
    pub fn admit(
        &mut self,
        bytes: &[u8],
        source: Option<PeerId>,
        now_ms: u64,
    ) -> Result<PeerId, AdmitError> {
        self.admit_changed(bytes, source, now_ms)
            .map(|(peer, _)| peer)
    }

    /// [`Self::admit`], also telling whether the peer's announced addresses are new (its first
    /// announcement, or different from the one it replaces).
    pub fn admit_changed(
        &mut self,
        bytes: &[u8],
        source: Option<PeerId>,
        now_ms: u64,
    ) -> Result<(PeerId, bool), AdmitError> {
        let signed = SignedAnnouncement::decode(bytes)?;
        let a = signed.verify(now_ms)?;
        let peer = a
            .peer_id()
            .ok_or_else(|| VerifyAnnouncementError::WrongKey(a.peer.clone()))?;
        if let Some(source) = source {
            if source != peer {
                return Err(AdmitError::WrongSource {
                    claimed: a.peer.clone(),
                    source_peer: source,
                });
            }
        }
        if let Some(old) = self.peers.get(&peer) {
            if old.issued_at_ms > a.issued_at_ms {
                return Err(AdmitError::Stale { peer });
            }
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            let (&oldest, kept) = self
                .peers
                .iter()
                .min_by_key(|(p, a)| (a.expires_at_ms(), p.to_bytes()))
                .ok_or(AdmitError::Full)?;
            if kept.expires_at_ms() >= a.expires_at_ms() {
                return Err(AdmitError::Full);
            }
            self.peers.remove(&oldest);
        }
        let changed = self.peers.get(&peer).is_none_or(|old| old.addrs != a.addrs);
        self.peers.insert(peer, Arc::new(a));
        Ok((peer, changed))
    }

    /// Drops expired announcements.
    pub fn prune(&mut self, now_ms: u64) {
        self.peers.retain(|_, a| a.expires_at_ms() > now_ms);
    }

    /// Forgets a peer (it left or failed).
    pub fn remove(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    pub fn get(&self, peer: &PeerId) -> Option<&Announcement> {
        self.peers.get(peer).map(|a| &**a)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &Announcement)> {
        self.peers.iter().map(|(p, a)| (p, &**a))
    }

    /// Every live offer of `model`, with its announcement.
    pub fn offers(&self, model: &Digest) -> Vec<(PeerId, &Announcement, &ModelOffer)> {
        let mut out: Vec<_> = self
            .peers
            .iter()
            .flat_map(|(p, a)| {
                let a: &Announcement = a;
                a.models
                    .iter()
                    .filter(move |o| &o.model == model)
                    .map(move |o| (*p, a, o))
            })
            .collect();
        out.sort_by_key(|(p, _, o)| (o.start, p.to_bytes()));
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use plexus_core::announce::Announcement;
    use plexus_core::keys::NodeKey;

    /// An announcement of `key` issued at `issued` (30 s to live) offering nothing.
    pub(crate) fn bare(key: &NodeKey, issued: u64) -> Announcement {
        Announcement {
            public_key: key.public().encode_protobuf(),
            peer: key.peer_id().to_string(),
            issued_at_ms: issued,
            ttl_ms: 30_000,
            version: "test".into(),
            addrs: Vec::new(),
            threads: 1,
            free_memory: 0,
            sessions: 0,
            max_sessions: 1,
            queue: 0,
            price: 0,
            models: Vec::new(),
            observed: Vec::new(),
            convicted: Vec::new(),
            doubted: Vec::new(),
        }
    }

    fn announce(key: &NodeKey, issued: u64) -> Vec<u8> {
        bare(key, issued).sign(key).encode()
    }

    #[test]
    fn a_full_directory_keeps_the_freshest_announcements() {
        let mut dir = Directory::default();
        for i in 0..MAX_PEERS as u64 {
            let key = NodeKey::generate();
            dir.admit(&announce(&key, 1_000 + i), None, 1_000 + i)
                .unwrap();
        }
        assert_eq!(dir.len(), MAX_PEERS);
        // Older than everything kept: refused.
        let late = NodeKey::generate();
        assert!(matches!(
            dir.admit(&announce(&late, 500), None, 1_000),
            Err(AdmitError::Full)
        ));
        // Fresher: replaces the one that expires first, the size stays capped.
        let fresh = NodeKey::generate();
        let now = 1_000 + MAX_PEERS as u64;
        let peer = dir.admit(&announce(&fresh, now), None, now).unwrap();
        assert_eq!(dir.len(), MAX_PEERS);
        assert!(dir.get(&peer).is_some());
    }
}
