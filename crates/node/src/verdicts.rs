//! The audit verdicts of the gateways a node trusts (`--trust-verdicts`): the peers they
//! announce as convicted, which placement leaves out, and those they doubt, beside which
//! placement puts a spare (see `Node::rebalance`).
//!
//! Each trusted gateway's latest lists are kept until its announcement expires, whether or not
//! the directory still holds it: the directory forgets a gateway that disconnects (or evicts
//! its short-lived announcement under a flood), and a verdict that came and went would make
//! placement move nodes back and forth. Announcements of gateways not trusted are ignored.

use crate::directory::Directory;
use plexus_net::PeerId;
use std::collections::{HashMap, HashSet};

/// See the module docs.
#[derive(Debug, Default)]
pub struct TrustedVerdicts {
    trusted: Vec<PeerId>,
    /// Per trusted gateway: the peers it convicted and doubts, and when that announcement was
    /// issued and expires (unix ms).
    kept: HashMap<PeerId, Kept>,
}

#[derive(Debug)]
struct Kept {
    peers: HashSet<PeerId>,
    doubted: HashSet<PeerId>,
    issued: u64,
    expires: u64,
}

/// What the trusted gateways say, together.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Standing {
    /// Convicted by any of them.
    pub convicted: HashSet<PeerId>,
    /// Doubted by any of them, and convicted by none.
    pub doubted: HashSet<PeerId>,
}

impl TrustedVerdicts {
    pub fn new(trusted: Vec<PeerId>) -> Self {
        Self {
            trusted,
            kept: HashMap::new(),
        }
    }

    /// Takes in what `dir` holds of the trusted gateways and returns every peer they convicted
    /// in announcements still alive at `now` (unix ms).
    pub fn convicted(&mut self, dir: &Directory, now: u64) -> HashSet<PeerId> {
        self.standing(dir, now).convicted
    }

    /// Takes in what `dir` holds of the trusted gateways and returns the peers they convicted
    /// and those they doubt, in announcements still alive at `now` (unix ms).
    pub fn standing(&mut self, dir: &Directory, now: u64) -> Standing {
        let parse = |list: &[String]| -> HashSet<PeerId> {
            list.iter().filter_map(|p| p.parse().ok()).collect()
        };
        for t in &self.trusted {
            let Some(a) = dir.get(t) else { continue };
            if self.kept.get(t).is_none_or(|k| a.issued_at_ms >= k.issued) {
                let kept = Kept {
                    peers: parse(&a.convicted),
                    doubted: parse(&a.doubted),
                    issued: a.issued_at_ms,
                    expires: a.expires_at_ms(),
                };
                self.kept.insert(*t, kept);
            }
        }
        self.kept.retain(|_, k| k.expires > now);
        let convicted: HashSet<PeerId> = self
            .kept
            .values()
            .flat_map(|k| k.peers.iter().copied())
            .collect();
        let doubted = self
            .kept
            .values()
            .flat_map(|k| k.doubted.iter().copied())
            .filter(|p| !convicted.contains(p))
            .collect();
        Standing { convicted, doubted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::keys::NodeKey;

    fn verdict(dir: &mut Directory, gateway: &NodeKey, convicted: &[PeerId], issued: u64) {
        doubt(dir, gateway, convicted, &[], issued);
    }

    fn doubt(
        dir: &mut Directory,
        gateway: &NodeKey,
        convicted: &[PeerId],
        doubted: &[PeerId],
        issued: u64,
    ) {
        let mut a = crate::directory::tests::bare(gateway, issued);
        a.convicted = convicted.iter().map(|p| p.to_string()).collect();
        a.doubted = doubted.iter().map(|p| p.to_string()).collect();
        dir.admit(&a.sign(gateway).encode(), None, issued).unwrap();
    }

    #[test]
    fn doubts_are_kept_like_convictions_and_a_conviction_elsewhere_overrides_them() {
        let (g1, g2, other) = (
            NodeKey::generate(),
            NodeKey::generate(),
            NodeKey::generate(),
        );
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut dir = Directory::default();
        let mut v = TrustedVerdicts::new(vec![g1.peer_id(), g2.peer_id()]);
        doubt(&mut dir, &g1, &[], &[a, b], 1_000);
        doubt(&mut dir, &other, &[], &[PeerId::random()], 1_000);
        let s = v.standing(&dir, 1_000);
        assert_eq!(s.doubted, HashSet::from([a, b]));
        assert!(s.convicted.is_empty());
        // Another trusted gateway convicted b: excluded, no longer merely doubted.
        doubt(&mut dir, &g2, &[b], &[], 1_000);
        let s = v.standing(&dir, 2_000);
        assert_eq!(s.doubted, HashSet::from([a]));
        assert_eq!(s.convicted, HashSet::from([b]));
        // g1's doubts cleared: its next announcement says so at once.
        doubt(&mut dir, &g1, &[], &[], 3_000);
        assert!(v.standing(&dir, 3_000).doubted.is_empty());
    }

    #[test]
    fn trusted_verdicts_outlive_the_directory_entry_until_they_expire_and_others_count_not() {
        let (trusted, other) = (NodeKey::generate(), NodeKey::generate());
        let (cheat, framed) = (PeerId::random(), PeerId::random());
        let mut dir = Directory::default();
        let mut v = TrustedVerdicts::new(vec![trusted.peer_id()]);
        assert!(v.convicted(&dir, 1_000).is_empty());
        verdict(&mut dir, &trusted, &[cheat], 1_000);
        verdict(&mut dir, &other, &[framed], 1_000);
        assert_eq!(v.convicted(&dir, 1_000), HashSet::from([cheat]));
        // The gateway disconnected: the directory forgot it, its verdict stands (30 s TTL).
        dir.remove(&trusted.peer_id());
        assert_eq!(v.convicted(&dir, 20_000), HashSet::from([cheat]));
        assert!(v.convicted(&dir, 31_000).is_empty(), "expired");
        // A later announcement replaces the list; an older one does not.
        verdict(&mut dir, &trusted, &[cheat, framed], 40_000);
        assert_eq!(v.convicted(&dir, 40_000).len(), 2);
        let mut stale = Directory::default();
        verdict(&mut stale, &trusted, &[], 35_000);
        assert_eq!(v.convicted(&stale, 40_000).len(), 2);
    }
}
