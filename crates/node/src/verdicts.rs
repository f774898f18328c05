//! The audit verdicts of the gateways a node trusts (`--trust-verdicts`): the peers they
//! announce as convicted, which placement leaves out (see `Node::rebalance`).
//!
//! Each trusted gateway's latest list is kept until its announcement expires, whether or not
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
    /// Per trusted gateway: the peers it convicted, and when that announcement was issued and
    /// expires (unix ms).
    kept: HashMap<PeerId, Kept>,
}

#[derive(Debug)]
struct Kept {
    peers: HashSet<PeerId>,
    issued: u64,
    expires: u64,
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
        for t in &self.trusted {
            let Some(a) = dir.get(t) else { continue };
            if self.kept.get(t).is_none_or(|k| a.issued_at_ms >= k.issued) {
                let kept = Kept {
                    peers: a.convicted.iter().filter_map(|p| p.parse().ok()).collect(),
                    issued: a.issued_at_ms,
                    expires: a.expires_at_ms(),
                };
                self.kept.insert(*t, kept);
            }
        }
        self.kept.retain(|_, k| k.expires > now);
        self.kept
            .values()
            .flat_map(|k| k.peers.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::keys::NodeKey;

    fn verdict(dir: &mut Directory, gateway: &NodeKey, convicted: &[PeerId], issued: u64) {
        let mut a = crate::directory::tests::bare(gateway, issued);
        a.convicted = convicted.iter().map(|p| p.to_string()).collect();
        dir.admit(&a.sign(gateway).encode(), None, issued).unwrap();
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
