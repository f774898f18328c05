//! Which examples a worker trains on in a round: a pure function of the run seed, the round and
//! the worker's peer id, so anyone can recompute (and audit) a worker's batches.
//!
//! Id `j` of worker `w` in round `r` is the first 8 bytes (LE) of
//! `sha256("plexus-assign-v1" || seed || r || len(w) || w || j)`: independent streams per
//! worker, no coordination, no overlap in practice (64-bit ids), and a newcomer's ids do not
//! depend on who else is in the round. A shard maps the id onto its examples.

use plexus_core::{Digest, Sha256Stream};

/// The `count` example ids of `worker` in `round`.
pub fn example_ids(seed: u64, round: u64, worker: &[u8], count: usize) -> Vec<u64> {
    let mut base = Sha256Stream::new();
    base.update(b"plexus-assign-v1");
    base.update(&seed.to_le_bytes());
    base.update(&round.to_le_bytes());
    base.update(&(worker.len() as u64).to_le_bytes());
    base.update(worker);
    (0..count as u64)
        .map(|j| {
            let mut h = base.clone();
            h.update(&j.to_le_bytes());
            let d = h.finish();
            let mut b = [0u8; 8];
            b.copy_from_slice(&d.0[..8]);
            u64::from_le_bytes(b)
        })
        .collect()
}

/// Hash of a list of example ids (what a commitment carries).
pub fn ids_digest(ids: &[u64]) -> Digest {
    let mut h = Sha256Stream::new();
    h.update(b"plexus-example-ids-v1");
    h.update(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        h.update(&id.to_le_bytes());
    }
    h.finish()
}

/// The held-out ids every worker scores contributions of `round` on: `count` consecutive
/// held-out indices starting at a seed- and round-dependent offset.
pub fn score_ids(seed: u64, round: u64, count: usize) -> Vec<u64> {
    let d = Digest::of(
        &[
            b"plexus-score-v1".as_slice(),
            &seed.to_le_bytes(),
            &round.to_le_bytes(),
        ]
        .concat(),
    );
    let mut b = [0u8; 4];
    b.copy_from_slice(&d.0[..4]);
    let start = u64::from(u32::from_le_bytes(b)) << 8;
    (start..start + count as u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_reproducible_and_distinct() {
        let a = example_ids(1, 3, b"alice", 64);
        assert_eq!(a, example_ids(1, 3, b"alice", 64));
        assert_eq!(&a[..10], &example_ids(1, 3, b"alice", 10)[..]);
        let b = example_ids(1, 3, b"bob", 64);
        let c = example_ids(1, 4, b"alice", 64);
        let d = example_ids(2, 3, b"alice", 64);
        for other in [&b, &c, &d] {
            assert!(a.iter().all(|x| !other.contains(x)));
        }
        assert_ne!(ids_digest(&a), ids_digest(&b));
        assert_eq!(score_ids(1, 3, 4), score_ids(1, 3, 4));
        assert_ne!(score_ids(1, 3, 4), score_ids(1, 4, 4));
    }
}
