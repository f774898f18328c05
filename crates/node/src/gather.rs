//! Batch forming for a stage node: after a step, the engine expects the sessions it just
//! answered to call again, and when the first of them comes back it waits a little for the
//! others before the next step, so their decodes run as one batch.
//!
//! ```text
//! step answers A B C D ─▶ (other stages, the gateway) ─▶ A returns ─▶ wait ≤ bound for B C D
//!                                                                   ─▶ step A B C D together
//! ```
//!
//! Without it a node stepped with whatever had arrived: the calls of one round of tokens come
//! back spread over a fraction of a millisecond (the gateway relays them one by one), so a
//! round of 8 decodes ran as 2-4 smaller steps, each reading every weight of the span again.
//! In one process the batch engine sees all its sequences at every step and has no such gap.
//!
//! The wait is bounded by [`MAX_WAIT`] and by the last step's own duration (waiting longer
//! than a step costs more than a second step would), and a session that does not come back
//! (its stream ended, its caller is slow) is awaited at most once: the next step's answers
//! replace the list. Batching never changes an answer's bits (see the engine), only when it
//! is computed. Time is passed in, so the policy is tested without threads.

use plexus_core::wire::SessionId;
use plexus_net::PeerId;
use std::time::{Duration, Instant};

/// Longest a node holds a step back for the sessions it expects.
pub const MAX_WAIT: Duration = Duration::from_millis(2);

type Key = (PeerId, SessionId);

/// The sessions a node expects back and how long it may wait for them.
#[derive(Debug, Default)]
pub struct Gather {
    /// Sessions answered by the last step that ran decodes (their next token's call is due).
    awaited: Vec<Key>,
    /// How long that step took.
    last_step: Duration,
}

impl Gather {
    /// Records a step: the sessions whose calls it answered and how long it ran.
    pub fn stepped(&mut self, answered: impl IntoIterator<Item = Key>, took: Duration) {
        self.awaited.clear();
        self.awaited.extend(answered);
        self.last_step = took;
    }

    /// A session closed: nothing more will come from it.
    pub fn closed(&mut self, key: &Key) {
        self.awaited.retain(|k| k != key);
    }

    /// Until when to wait for more calls, given the calls already in hand (`present`) and
    /// the moment the first of them arrived; `None` when nothing is missing (or nothing was
    /// awaited), so the step runs at once.
    pub fn wait_until<'a>(
        &self,
        mut present: impl Iterator<Item = &'a Key> + Clone,
        first_arrived: Instant,
    ) -> Option<Instant> {
        let missing = self
            .awaited
            .iter()
            .any(|k| !present.clone().any(|p| p == k));
        // Nothing in hand yet is the idle case: the engine blocks for work, not here.
        if !missing || present.next().is_none() {
            return None;
        }
        Some(first_arrived + self.last_step.min(MAX_WAIT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> Key {
        (PeerId::random(), SessionId([i; 16]))
    }

    #[test]
    fn waits_only_while_an_awaited_session_is_missing() {
        let (a, b, c) = (key(1), key(2), key(3));
        let mut g = Gather::default();
        let t0 = Instant::now();
        // Nothing awaited (first step, or a single stream): no wait.
        assert_eq!(g.wait_until([a].iter(), t0), None);
        g.stepped([a, b, c], Duration::from_millis(5));
        // One of three back: wait, bounded by MAX_WAIT (the step took longer).
        assert_eq!(g.wait_until([a].iter(), t0), Some(t0 + MAX_WAIT));
        // All back: step now.
        assert_eq!(g.wait_until([c, a, b].iter(), t0), None);
        // Nothing in hand: the idle case is not a gather.
        assert_eq!(g.wait_until([].iter(), t0), None);
    }

    #[test]
    fn a_short_step_bounds_the_wait_and_closed_sessions_are_not_awaited() {
        let (a, b) = (key(1), key(2));
        let mut g = Gather::default();
        let t0 = Instant::now();
        g.stepped([a, b], Duration::from_micros(300));
        assert_eq!(
            g.wait_until([a].iter(), t0),
            Some(t0 + Duration::from_micros(300))
        );
        g.closed(&b);
        assert_eq!(g.wait_until([a].iter(), t0), None);
    }

    #[test]
    fn a_session_that_does_not_return_is_awaited_for_one_step_only() {
        let (a, b) = (key(1), key(2));
        let mut g = Gather::default();
        let t0 = Instant::now();
        g.stepped([a, b], Duration::from_millis(1));
        assert!(g.wait_until([a].iter(), t0).is_some());
        // b never came; the next step answered a alone.
        g.stepped([a], Duration::from_millis(1));
        assert_eq!(g.wait_until([a].iter(), t0), None);
    }
}
