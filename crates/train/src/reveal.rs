//! Commit-reveal of per-worker randomness for the round audits' draw.
//!
//! The draw must be unknown to a worker when it commits, or a worker that waits for the others
//! could try payloads until it is not drawn. Keying it by the round's set of commitments alone
//! is not enough: the last worker to commit knows every other commitment, so it can compute
//! the draw for each payload it tries. So:
//!
//! ```text
//! commit   a worker's signed commitment carries sealed(nonce), so the nonce is fixed before
//!          anything else of the round is known (an honest worker derives it from its key,
//!          the run and the round, so it is the same after a restart)
//! fix      each worker fixes the round's set (after the sync) and only then tells its nonce
//!          (a worker whose set is fixed takes no more contributions to the round)
//! reveal   workers collect the nonces of the set's members from each other; a nonce counts
//!          only if it opens the member's sealed value
//! drop     a member whose nonce did not come is dropped from the round (not convicted: it
//!          may have crashed), so withholding buys nothing and costs nobody a re-execution
//! draw     key = sha256(digest of the remaining set, every (worker, nonce) in worker order)
//! ```
//!
//! Any contribution in a worker's set reached it before that worker told its nonce, so its
//! author could not know that nonce when it committed, and without every member's nonce the
//! draw is a coin it cannot compute. What is left: members may withhold their nonces, each
//! dropping its own contribution; k colluders doing so after seeing the others' nonces choose
//! among 2^k draws for a colluder still in the set. And a nonce told to some honest workers
//! and not others by their deadline gives them different sets (they keep asking each other, so
//! this needs the nonce to come at the very end); the next round's vote on the state to hold
//! settles it, as for a start state that reaches some auditors and not others.

use crate::audit::drawn;
use plexus_core::keys::NodeKey;
use plexus_core::{Digest, Sha256Stream};
use std::collections::BTreeMap;

/// A worker's nonce for `round` of `run`: secret, and the same after a restart.
pub fn nonce(key: &NodeKey, run: Digest, round: u64) -> [u8; 32] {
    let mut label = b"plexus-train-audit-nonce-v1".to_vec();
    label.extend_from_slice(run.as_bytes());
    label.extend_from_slice(&round.to_le_bytes());
    key.derive_secret(&label)
}

/// What a commitment carries of a nonce: `sha256("plexus-train-reveal-v1" || nonce)`.
pub fn sealed(nonce: &[u8; 32]) -> Digest {
    let mut h = Sha256Stream::new();
    h.update(b"plexus-train-reveal-v1");
    h.update(nonce);
    h.finish()
}

/// The key of the draw of a set with digest `set`, from the nonces revealed for it.
pub fn draw_key(set: Digest, revealed: &BTreeMap<Vec<u8>, [u8; 32]>) -> Digest {
    let mut h = Sha256Stream::new();
    h.update(b"plexus-train-draw-v2");
    h.update(set.as_bytes());
    for (worker, nonce) in revealed {
        h.update(&(worker.len() as u64).to_le_bytes());
        h.update(worker);
        h.update(nonce);
    }
    h.finish()
}

/// Whether member `worker`'s contribution is re-executed: the coin of `rate` keyed by
/// [`draw_key`]. Members whose nonce was not revealed are dropped before the draw; asked
/// about one, this says no.
pub fn drawn_revealed(
    set: Digest,
    revealed: &BTreeMap<Vec<u8>, [u8; 32]>,
    worker: &[u8],
    rate: f64,
) -> bool {
    revealed.contains_key(worker) && drawn(draw_key(set, revealed), worker, rate)
}

/// The delegated auditors of `worker`'s drawn contribution: the `k` other members whose
/// `sha256("plexus-train-auditor-v1" || key || worker || member)` is smallest, with `key` the
/// round's [`draw_key`] (so, like the draw, unknown to anyone when they commit). Every worker
/// holding the same set and nonces names the same ones.
pub fn committee<'a>(
    key: Digest,
    worker: &[u8],
    members: impl IntoIterator<Item = &'a Vec<u8>>,
    k: usize,
) -> Vec<Vec<u8>> {
    let rank = |member: &[u8]| {
        let mut h = Sha256Stream::new();
        h.update(b"plexus-train-auditor-v1");
        h.update(key.as_bytes());
        h.update(&(worker.len() as u64).to_le_bytes());
        h.update(worker);
        h.update(member);
        h.finish()
    };
    let mut ranked: Vec<(Digest, &Vec<u8>)> = members
        .into_iter()
        .filter(|m| m.as_slice() != worker)
        .map(|m| (rank(m), m))
        .collect();
    ranked.sort();
    ranked.into_iter().take(k).map(|(_, m)| m.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_per_key_run_and_round_and_sealed_values_open_only_to_them() {
        let (a, b) = (
            NodeKey::from_secret([1; 32]).unwrap(),
            NodeKey::from_secret([2; 32]).unwrap(),
        );
        let run = Digest::of(b"run");
        let n = nonce(&a, run, 3);
        assert_eq!(n, nonce(&a, run, 3), "the same after a restart");
        for other in [
            nonce(&a, run, 4),
            nonce(&a, Digest::of(b"other"), 3),
            nonce(&b, run, 3),
        ] {
            assert_ne!(n, other);
            assert_ne!(sealed(&n), sealed(&other));
        }
    }

    #[test]
    fn committees_are_k_other_members_spread_over_the_set_and_redrawn_by_the_key() {
        let members: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 4]).collect();
        let key = Digest::of(b"key");
        let mut load = [0usize; 8];
        for w in &members {
            let c = committee(key, w, &members, 2);
            assert_eq!(c.len(), 2);
            assert!(!c.contains(w));
            assert_eq!(c, committee(key, w, members.iter().rev(), 2), "order-free");
            for m in &c {
                load[m[0] as usize] += 1;
            }
        }
        // 16 seats over 8 members: nobody audits everyone.
        assert!(load.iter().all(|l| *l < 7), "{load:?}");
        let other = Digest::of(b"other key");
        assert!(members
            .iter()
            .any(|w| committee(key, w, &members, 2) != committee(other, w, &members, 2)));
        // Fewer members than seats: all the others.
        assert_eq!(
            committee(key, &members[0], &members[..2], 3),
            vec![members[1].clone()]
        );
    }

    #[test]
    fn the_draw_needs_every_nonce_and_one_changed_redraws_everyone() {
        let set = Digest::of(b"set");
        let workers: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 8]).collect();
        let all: BTreeMap<Vec<u8>, [u8; 32]> =
            workers.iter().map(|w| (w.clone(), [w[0]; 32])).collect();
        let draws = |revealed: &BTreeMap<Vec<u8>, [u8; 32]>| -> Vec<bool> {
            workers
                .iter()
                .map(|w| drawn_revealed(set, revealed, w, 0.5))
                .collect()
        };
        let full = draws(&all);
        let hits = full.iter().filter(|d| **d).count();
        assert!((16..=48).contains(&hits), "{hits}");
        // One nonce changed: another draw for (about half of) everyone.
        let mut changed = all.clone();
        changed.insert(workers[5].clone(), [0xee; 32]);
        let differ = full
            .iter()
            .zip(draws(&changed))
            .filter(|(a, b)| **a != *b)
            .count();
        assert!(differ > 10, "{differ}");
        // A member without a nonce is not in the draw (the caller dropped it).
        let mut withheld = all.clone();
        withheld.remove(&workers[9]);
        assert!(!drawn_revealed(set, &withheld, &workers[9], 1.0));
        // Rate 1 draws every member, rate 0 none.
        assert!(workers.iter().all(|w| drawn_revealed(set, &all, w, 1.0)));
        assert!(workers.iter().all(|w| !drawn_revealed(set, &all, w, 0.0)));
    }
}
