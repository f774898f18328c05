//! The prompt (prefix) cache of the batching engine ([`crate::serve`]): the KV caches of
//! finished generations, kept so that a new prompt sharing a prefix with one of them (the same
//! system prompt, a multi-turn chat resent with one more message) starts after that prefix
//! instead of recomputing it, as llama-server reuses a slot's cache.
//!
//! - Bit-identical: the key and value rows of position `p` depend only on the tokens `0..=p`
//!   (causal attention, every row computed from its own inputs), so the rows of a shared
//!   prefix are those the new prompt would compute, and prefilling its rest after them is the
//!   same as prefilling in two chunks cut there, which gives the one-shot bits.
//! - Bounded: at most `capacity` entries, each holding the KV reservation of the generation it
//!   came from, from the same budget as running generations; a generation that does not fit
//!   evicts entries (least recently stored first) before it is refused. A reused entry leaves
//!   the cache (its rows move into the new generation, whose own reservation then covers them).
//! - At least one prompt position is always computed: the last one's logits are needed.

use crate::batch::KvReservation;
use crate::KvCache;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

/// One finished generation's cache: `cache` holds the rows of `tokens`.
pub(crate) struct Entry {
    pub tokens: Vec<u32>,
    pub cache: KvCache,
    pub reservation: KvReservation,
}

/// See the module docs.
pub struct PrefixCache {
    entries: VecDeque<Entry>,
    capacity: usize,
    /// Prompt positions taken from the cache instead of computed, since start.
    reused: AtomicU64,
}

impl PrefixCache {
    /// A cache of at most `capacity` entries (0: off).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity,
            reused: AtomicU64::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Prompt positions reused since start.
    pub fn reused_positions(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    /// Bytes of KV budget the entries hold.
    pub fn reserved_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.reservation.bytes()).sum()
    }

    /// Keeps a finished generation's cache (the newest entry; the oldest goes past capacity).
    pub(crate) fn store(&mut self, entry: Entry) {
        if self.capacity == 0 || entry.tokens.is_empty() {
            return;
        }
        debug_assert_eq!(entry.cache.len(), entry.tokens.len());
        while self.entries.len() >= self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    /// Drops the oldest entry (giving its reservation back); `false` when there was none.
    pub fn evict_oldest(&mut self) -> bool {
        self.entries.pop_front().is_some()
    }

    /// The entry sharing the longest prefix with `prompt`, truncated to it (at most
    /// `prompt.len() - 1` positions), out of the cache; `None` when none shares a token.
    pub(crate) fn take_longest(&mut self, prompt: &[u32]) -> Option<(usize, KvCache)> {
        let limit = prompt.len().saturating_sub(1);
        let (at, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(i, n)| (n, i))?;
        if shared == 0 {
            return None;
        }
        let mut entry = self.entries.remove(at)?;
        entry.cache.truncate(shared);
        self.reused.fetch_add(shared as u64, Ordering::Relaxed);
        Some((shared, entry.cache))
    }
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::KvBudget;

    fn entry(budget: &KvBudget, tokens: &[u32]) -> Entry {
        let mut cache = KvCache::new(1, 2, 100);
        cache.append(
            0,
            &vec![1.0; 2 * tokens.len()],
            &vec![1.0; 2 * tokens.len()],
        );
        cache.advance(tokens.len());
        Entry {
            tokens: tokens.to_vec(),
            cache,
            reservation: budget.reserve(tokens.len(), 10).unwrap(),
        }
    }

    #[test]
    fn takes_the_longest_shared_prefix_and_keeps_one_position_to_compute() {
        let budget = KvBudget::new(10_000);
        let mut c = PrefixCache::new(4);
        c.store(entry(&budget, &[1, 2, 3, 4, 5]));
        c.store(entry(&budget, &[1, 2, 9]));
        assert_eq!(budget.used(), 80);
        assert!(c.take_longest(&[7, 1, 2]).is_none());
        let (n, cache) = c.take_longest(&[1, 2, 3, 8]).unwrap();
        assert_eq!((n, cache.len()), (3, 3));
        // The taken entry left the cache and gave its reservation back.
        assert_eq!((c.len(), budget.used()), (1, 30));
        // The same prompt again: all but its last position.
        c.store(entry(&budget, &[1, 2, 3, 4]));
        let (n, _) = c.take_longest(&[1, 2, 3, 4]).unwrap();
        assert_eq!(n, 3);
        assert_eq!(c.reused_positions(), 6);
    }

    #[test]
    fn holds_at_most_capacity_entries_and_evicts_the_oldest() {
        let budget = KvBudget::new(10_000);
        let mut c = PrefixCache::new(2);
        for t in 1..=3u32 {
            c.store(entry(&budget, &[t, t]));
        }
        assert_eq!((c.len(), budget.used()), (2, 40));
        assert!(c.evict_oldest());
        assert!(c.take_longest(&[2, 2, 2]).is_none());
        assert!(c.take_longest(&[3, 3, 3]).is_some());
        assert!(!c.evict_oldest());
        assert_eq!(budget.used(), 0);
        let mut off = PrefixCache::new(0);
        off.store(entry(&budget, &[1, 2]));
        assert!(off.is_empty());
    }
}
