//! The prompt (prefix) cache of the batching engine ([`crate::serve`]): the KV caches of
//! finished generations, kept so that a new prompt sharing a prefix with one of them (the same
//! system prompt, a multi-turn chat resent with one more message) starts after that prefix
//! instead of recomputing it, as llama-server reuses a slot's cache.
//!
//! - Bit-identical: the key and value rows of position `p` depend only on the tokens `0..=p`
//!   and the attention kernels of positions `0..=p` (causal attention, every row computed
//!   from its own inputs), so the rows of a shared
//!   prefix are those the new prompt would compute, and prefilling its rest after them is the
//!   same as prefilling in two chunks cut there, which gives the one-shot bits. Rows count as
//!   shared only as far as they were computed with the attention kernels the new prompt takes
//!   (llama.cpp's tiled kernel for prompts of 64 tokens or more, its split-KV path for rows
//!   alone in their ubatch from position 256, see [`crate::attention::kernel_at`]): the output is always that of the prompt run
//!   alone on a fresh cache, never something that depends on what ran before.
//! - Bounded: at most `capacity` entries, each holding the KV reservation of the generation it
//!   came from, from the same budget as running generations; a generation that does not fit
//!   evicts entries (least recently stored first) before it is refused. A reused entry leaves
//!   the cache (its rows move into the new generation, whose own reservation then covers them).
//! - At least one prompt position is always computed: the last one's logits are needed.

use crate::attention::{kernel_at, kernel_cuts};
use crate::batch::KvReservation;
use crate::KvCache;
use std::collections::VecDeque;
use std::ops::Range;
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
    /// Shared rows count only as far as the entry computed them with the attention kernels
    /// `prompt` takes (`declared`: the positions [`KvCache::set_prompt`] declares for it): a
    /// row's bits depend on the kernels of every row before it.
    pub(crate) fn take_longest(
        &mut self,
        prompt: &[u32],
        declared: &Range<usize>,
    ) -> Option<(usize, KvCache)> {
        let limit = prompt.len().saturating_sub(1);
        let (at, shared) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let same = common_prefix(&e.tokens, prompt).min(limit);
                (i, same_kernels_until(&e.cache.prompt(), declared, same))
            })
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

/// The first position before `limit` where a sequence whose latest prompt was fed as `a`
/// computes a row with another attention kernel than one whose prompt is `b`
/// ([`kernel_at`]), or `limit` when they agree on all of `0..limit`.
fn same_kernels_until(a: &Range<usize>, b: &Range<usize>, limit: usize) -> usize {
    let mut cuts: Vec<usize> = kernel_cuts(a).into_iter().chain(kernel_cuts(b)).collect();
    cuts.sort_unstable();
    // The kernels change only at the cuts: compare at 0 and at each cut.
    std::iter::once(0)
        .chain(cuts)
        .filter(|&p| p < limit)
        .find(|&p| kernel_at(a, p) != kernel_at(b, p))
        .unwrap_or(limit)
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
        assert!(c.take_longest(&[7, 1, 2], &(0..0)).is_none());
        let (n, cache) = c.take_longest(&[1, 2, 3, 8], &(0..0)).unwrap();
        assert_eq!((n, cache.len()), (3, 3));
        // The taken entry left the cache and gave its reservation back.
        assert_eq!((c.len(), budget.used()), (1, 30));
        // The same prompt again: all but its last position.
        c.store(entry(&budget, &[1, 2, 3, 4]));
        let (n, _) = c.take_longest(&[1, 2, 3, 4], &(0..0)).unwrap();
        assert_eq!(n, 3);
        assert_eq!(c.reused_positions(), 6);
    }

    #[test]
    fn rows_are_shared_only_as_far_as_their_kernels_agree() {
        assert_eq!(same_kernels_until(&(0..0), &(0..0), 50), 50);
        assert_eq!(same_kernels_until(&(0..100), &(0..100), 70), 70);
        // A 100-token prompt (tiled) against a 30-token one (not): nothing in common.
        assert_eq!(same_kernels_until(&(0..100), &(0..30), 30), 0);
        // Both tiled, to different ends: up to the shorter.
        assert_eq!(same_kernels_until(&(0..100), &(0..180), 150), 100);
        // 512 tiled rows, then a decode step (split-KV) against a last ubatch of 8 rows.
        assert_eq!(same_kernels_until(&(0..512), &(0..520), 515), 512);
        // A last ubatch of one row is alone: split-KV, as a decode step is.
        assert_eq!(same_kernels_until(&(0..513), &(0..512), 600), 600);
        assert_eq!(same_kernels_until(&(0..513), &(0..600), 599), 512);
        // Short prompts: decode steps from 256 on take the split-KV path in both.
        assert_eq!(same_kernels_until(&(0..10), &(0..30), 400), 400);
        let budget = KvBudget::new(10_000);
        let mut c = PrefixCache::new(4);
        let mut e = entry(&budget, &[1, 2, 3, 4, 5]);
        // Fed after 3 positions as a 64-row prompt: tiled from position 3.
        e.cache.set_prompt(3..67);
        c.store(e);
        let (n, _) = c.take_longest(&[1, 2, 3, 4, 5, 6], &(0..6)).unwrap();
        assert_eq!(n, 3);
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
        assert!(c.take_longest(&[2, 2, 2], &(0..0)).is_none());
        assert!(c.take_longest(&[3, 3, 3], &(0..0)).is_some());
        assert!(!c.evict_oldest());
        assert_eq!(budget.used(), 0);
        let mut off = PrefixCache::new(0);
        off.store(entry(&budget, &[1, 2]));
        assert!(off.is_empty());
    }
}
