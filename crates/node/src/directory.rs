//! The directory: the latest verified announcement of every peer, dropped when it expires.
//! Feeds routing ([`crate::route`]) and placement ([`crate::placement`]).

use plexus_core::announce::{
    Announcement, ModelOffer, SignedAnnouncement, VerifyAnnouncementError,
};
use plexus_core::Digest;
use plexus_net::PeerId;
use std::collections::HashMap;

/// Verified announcements by peer.
#[derive(Default, Debug, Clone)]
pub struct Directory {
    peers: HashMap<PeerId, Announcement>,
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
}

impl Directory {
    /// Verifies and stores an announcement. `source` is the gossip author the transport
    /// authenticated, when known: it must be the announcing peer.
    pub fn admit(
        &mut self,
        bytes: &[u8],
        source: Option<PeerId>,
        now_ms: u64,
    ) -> Result<PeerId, AdmitError> {
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
        self.peers.insert(peer, a);
        Ok(peer)
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
        self.peers.get(peer)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &Announcement)> {
        self.peers.iter()
    }

    /// Every live offer of `model`, with its announcement.
    pub fn offers(&self, model: &Digest) -> Vec<(PeerId, &Announcement, &ModelOffer)> {
        let mut out: Vec<_> = self
            .peers
            .iter()
            .flat_map(|(p, a)| {
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
