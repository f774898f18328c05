//! Continuous batching, the pure part: which positions of which sequences run in the next
//! batched step ([`plan`]), and the KV memory a sequence may hold ([`KvBudget`]).
//!
//! A step runs every decoding sequence's one position plus prompt (or long call) chunks that
//! fill the step's position budget, oldest first: a long prompt is cut into chunks that run
//! beside the decodes, so no running stream waits more than one chunk for it. Because
//! [`crate::Stage::forward_many`] computes every row from its own inputs, neither the batch a
//! sequence lands in nor the cut of its prompt changes a single bit of its output.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Positions per batched step (decodes plus prompt chunks) unless configured otherwise. Long
/// enough that a prompt chunk keeps the kernels' weight tiles busy, short enough that a chunk
/// delays the running streams by one prefill of this many positions at most.
pub const STEP_POSITIONS: usize = 256;

/// The prompt chunk a step always gives the oldest waiting prompt, however many sequences
/// decode: prompts make progress even when decodes alone fill the budget.
pub const MIN_CHUNK: usize = 16;

/// One sequence's work as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// Positions it has ready to run (1 for a decode step).
    pub ready: usize,
    /// Whether it is decoding (one position per step, runs every step) rather than working
    /// through a prompt or a multi-position call.
    pub decoding: bool,
}

/// Positions each sequence runs in the next step (0: not this step), for `wants` in arrival
/// order and a step budget of `budget` positions. Every decoding sequence runs; the remaining
/// budget (at least [`MIN_CHUNK`] positions) goes to the others, oldest first.
pub fn plan(wants: &[Want], budget: usize) -> Vec<usize> {
    let decodes: usize = wants.iter().filter(|w| w.decoding).map(|w| w.ready).sum();
    let mut left = budget.saturating_sub(decodes).max(MIN_CHUNK);
    wants
        .iter()
        .map(|w| {
            if w.decoding {
                w.ready
            } else {
                let n = w.ready.min(left);
                left -= n;
                n
            }
        })
        .collect()
}

/// Why a sequence was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error(
        "the KV cache budget is exhausted: this sequence needs {need} bytes ({positions} \
         positions), {free} of {budget} bytes are free; retry later"
    )]
    Exhausted {
        need: u64,
        positions: usize,
        free: u64,
        budget: u64,
    },
}

/// A node's KV memory in bytes, shared by the sequences it holds: each takes a
/// [`KvReservation`] for the most positions it may reach before it starts, so a running
/// sequence never runs out of room and memory never goes over the budget.
#[derive(Clone, Debug)]
pub struct KvBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    budget: u64,
    used: AtomicU64,
}

impl KvBudget {
    pub fn new(budget: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                budget,
                used: AtomicU64::new(0),
            }),
        }
    }

    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Acquire)
    }

    pub fn free(&self) -> u64 {
        self.budget().saturating_sub(self.used())
    }

    /// Reserves `positions` positions of `bytes_per_position` each, or says why not.
    pub fn reserve(
        &self,
        positions: usize,
        bytes_per_position: u64,
    ) -> Result<KvReservation, BudgetError> {
        let need = positions as u64 * bytes_per_position;
        let budget = self.inner.budget;
        self.inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + need <= budget).then_some(used + need)
            })
            .map_err(|used| BudgetError::Exhausted {
                need,
                positions,
                free: budget.saturating_sub(used),
                budget,
            })?;
        Ok(KvReservation {
            budget: self.clone(),
            bytes: need,
            positions,
        })
    }
}

/// Bytes held for one sequence; released when dropped.
#[derive(Debug)]
pub struct KvReservation {
    budget: KvBudget,
    bytes: u64,
    positions: usize,
}

impl KvReservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The positions the sequence may hold.
    pub fn positions(&self) -> usize {
        self.positions
    }
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        self.budget
            .inner
            .used
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_run_and_prompts_fill_the_rest_oldest_first() {
        let d = Want {
            ready: 1,
            decoding: true,
        };
        let p = |n| Want {
            ready: n,
            decoding: false,
        };
        assert_eq!(plan(&[d, p(300), d, p(50)], 256), vec![1, 254, 1, 0]);
        assert_eq!(plan(&[p(10), p(500), d], 256), vec![10, 245, 1]);
        // Decodes alone over the budget: the oldest prompt still gets a chunk.
        let many = vec![d; 300];
        let mut wants = many.clone();
        wants.push(p(40));
        let got = plan(&wants, 256);
        assert_eq!(got[300], MIN_CHUNK);
    }

    #[test]
    fn reservations_refuse_beyond_the_budget_and_release_on_drop() {
        let b = KvBudget::new(1000);
        let a = b.reserve(6, 100).unwrap();
        assert_eq!(b.used(), 600);
        let err = b.reserve(5, 100).unwrap_err();
        assert!(
            err.to_string().contains("400 of 1000 bytes are free"),
            "{err}"
        );
        drop(a);
        assert_eq!(b.used(), 0);
        assert!(b.reserve(10, 100).is_ok());
    }

    proptest! {
        /// Every decode runs, no prompt gets more than it has ready, and prompts together
        /// stay within the budget left by the decodes (or the minimum chunk).
        #[test]
        fn plans_respect_the_budget(
            wants in proptest::collection::vec((1usize..600, any::<bool>()), 0..40),
            budget in 1usize..1024,
        ) {
            let wants: Vec<Want> = wants
                .into_iter()
                .map(|(n, decoding)| Want { ready: if decoding { 1 } else { n }, decoding })
                .collect();
            let got = plan(&wants, budget);
            let decodes = wants.iter().filter(|w| w.decoding).count();
            let mut prompts = 0;
            let mut starved = false;
            for (w, &n) in wants.iter().zip(&got) {
                prop_assert!(n <= w.ready);
                if w.decoding {
                    prop_assert_eq!(n, 1);
                } else {
                    // Oldest first: once a prompt is cut short, younger ones get nothing.
                    if starved { prop_assert_eq!(n, 0); }
                    if n < w.ready { starved = true; }
                    prompts += n;
                }
            }
            prop_assert!(prompts <= budget.saturating_sub(decodes).max(MIN_CHUNK));
        }
    }
}
