//! The journal: an append-only chain of entries, each naming the operation that caused it, the
//! time it was given, its double-entry postings and the hash of the entry before it.
//!
//! `hash = sha256("plexus-ledger-entry-v1" || postcard(seq, time, op, postings, prev))`. The
//! first entry's `prev` is all zeros. Balances are the sum of postings, so anyone holding the
//! journal can re-derive them (see [`derive_balances`]) and re-execute every operation to check
//! the postings follow from the rules ([`crate::Ledger::replay`]).

use crate::op::Op;
use crate::types::{Bucket, Posting, Timestamp};
use plexus_core::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `prev` of the first entry.
pub const GENESIS: Digest = Digest([0; 32]);

/// One journal entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the journal, from 0.
    pub seq: u64,
    /// The time the operation was executed at (milliseconds since the Unix epoch).
    pub time: Timestamp,
    pub op: Op,
    pub postings: Vec<Posting>,
    /// The hash of the entry before (or [`GENESIS`]).
    pub prev: Digest,
    pub hash: Digest,
}

impl Entry {
    /// The hash this entry's contents call for.
    pub fn compute_hash(
        seq: u64,
        time: Timestamp,
        op: &Op,
        postings: &[Posting],
        prev: &Digest,
    ) -> Digest {
        // Serialising plain data to a Vec cannot fail; an empty body would still be caught by
        // verification (the hash would differ from the one recorded).
        let body = postcard::to_allocvec(&(seq, time, op, postings, prev)).unwrap_or_default();
        let mut stream = plexus_core::Sha256Stream::new();
        stream.update(b"plexus-ledger-entry-v1");
        stream.update(&body);
        stream.finish()
    }

    /// Whether the recorded hash matches the contents.
    pub fn hash_is_valid(&self) -> bool {
        Self::compute_hash(self.seq, self.time, &self.op, &self.postings, &self.prev) == self.hash
    }
}

/// Where a journal's hash chain breaks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("journal entry {found} is where entry {expected} belongs")]
    Gap { expected: u64, found: u64 },
    #[error("journal entry {seq} does not link to the entry before it")]
    Unlinked { seq: u64 },
    #[error("journal entry {seq} has been altered: its hash does not match its contents")]
    Altered { seq: u64 },
}

/// Checks a journal's sequence numbers, links and hashes; returns the head hash.
pub fn verify_chain<'a>(
    entries: impl IntoIterator<Item = &'a Entry>,
) -> Result<Digest, ChainError> {
    let mut head = GENESIS;
    for (i, e) in entries.into_iter().enumerate() {
        check_link(i as u64, &head, e)?;
        head = e.hash;
    }
    Ok(head)
}

pub(crate) fn check_link(expected: u64, head: &Digest, e: &Entry) -> Result<(), ChainError> {
    if e.seq != expected {
        return Err(ChainError::Gap {
            expected,
            found: e.seq,
        });
    }
    if e.prev != *head {
        return Err(ChainError::Unlinked { seq: e.seq });
    }
    if !e.hash_is_valid() {
        return Err(ChainError::Altered { seq: e.seq });
    }
    Ok(())
}

/// Balances as the sum of postings (signed: [`Bucket::World`] goes negative by everything
/// deposited). Buckets that net to zero are left out.
pub fn derive_balances<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> BTreeMap<Bucket, i128> {
    let mut out: BTreeMap<Bucket, i128> = BTreeMap::new();
    for e in entries {
        for p in &e.postings {
            *out.entry(p.from).or_default() -= i128::from(p.amount);
            *out.entry(p.to).or_default() += i128::from(p.amount);
        }
    }
    out.retain(|_, v| *v != 0);
    out
}
