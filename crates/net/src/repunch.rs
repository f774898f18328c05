//! When to dial a fresh circuit for another hole punch, per peer reached only through a relayed
//! connection this side dialed. DCUtR runs once per relayed connection, with the addresses
//! known when it opened, and only the side that accepted the circuit learns that its direct
//! dials all failed; so the dialing side re-punches when DCUtR reports an error to it, or when
//! no direct connection has appeared [`PUNCH_WAIT`] after its circuit opened: the first
//! [`MAX_REPUNCHES`] fresh circuits a little later each, for punches lost to timing; then
//! [`SLOW_REPUNCHES`] more, [`SLOW_REPUNCH`] apart and doubling. A punch that failed on a TCP
//! simultaneous open can leave its address pair in TIME_WAIT on either host (60 s on Linux),
//! and every punch on that pair fails until it expires; without the slow ones such a link
//! stayed relayed until its circuit ended (10 minutes at the relay's default limit). They stop
//! after that: a link no punch can open (a symmetric NAT, a firewall) stays relayed rather
//! than hold calls while each fresh circuit retires the last one, for good.
//! Pure state: time is passed in; the swarm actor dials and reports back.

use libp2p::swarm::ConnectionId;
use std::time::{Duration, Instant};

/// Quick re-punches (fresh relayed connections a few seconds apart) per connected episode of
/// a peer; slow ones follow.
pub const MAX_REPUNCHES: u8 = 3;
/// Slow re-punches after the quick ones, each waiting twice as long as the one before.
pub const SLOW_REPUNCHES: u8 = 3;
/// The wait before the first slow re-punch: past Linux's TIME_WAIT (60 s), so an address pair
/// a failed simultaneous open left behind is free again.
pub const SLOW_REPUNCH: Duration = Duration::from_secs(65);
/// How long a circuit may stay without a direct connection beside it before a re-punch.
pub const PUNCH_WAIT: Duration = Duration::from_secs(10);
/// The wait before a re-punch after a reported failure; the n-th waits n times as long.
pub const REPUNCH_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A re-punch is due at this time (unless a direct connection opens first).
    Waiting(Instant),
    /// A fresh circuit is being dialed on this connection.
    Dialing(ConnectionId),
}

/// One peer's re-punch state (the peer has no direct connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repunch {
    tries: u8,
    state: State,
}

impl Repunch {
    /// A circuit to the peer opened at `now` and no direct connection is open.
    pub fn new(now: Instant) -> Self {
        Self {
            tries: 0,
            state: State::Waiting(now + PUNCH_WAIT),
        }
    }

    /// When the next re-punch is due after a failure at `now`: the n-th quick one n delays
    /// later, a slow one [`SLOW_REPUNCH`] later, twice that for each slow one before it.
    fn backoff(&self, now: Instant) -> Instant {
        now + match self.tries.checked_sub(MAX_REPUNCHES) {
            None => REPUNCH_DELAY * (u32::from(self.tries) + 1),
            Some(slow) => SLOW_REPUNCH * (1 << slow.min(SLOW_REPUNCHES)),
        }
    }

    /// Another circuit to the peer opened (the one this state dialed, or any other): DCUtR
    /// gets [`PUNCH_WAIT`] on it; after the quick re-punches the next one waits its backoff.
    pub fn circuit_opened(&mut self, now: Instant) {
        self.state = State::Waiting(if self.tries < MAX_REPUNCHES {
            now + PUNCH_WAIT
        } else {
            self.backoff(now)
        });
    }

    /// DCUtR reported a failure: re-punch after the backoff, if that is sooner than planned
    /// (not while a fresh circuit is being dialed, whose own punch has not run yet).
    pub fn punch_failed(&mut self, now: Instant) {
        if let State::Waiting(due) = self.state {
            self.state = State::Waiting(due.min(self.backoff(now)));
        }
    }

    /// A dial failed: when it was this state's fresh circuit, try again later.
    pub fn dial_failed(&mut self, conn: ConnectionId, now: Instant) {
        if self.state == State::Dialing(conn) {
            self.state = State::Waiting(self.backoff(now));
        }
    }

    /// Whether a fresh circuit should be dialed now (tries left and the wait over). The caller
    /// dials and reports the connection with [`Repunch::dialing`].
    pub fn due(&self, now: Instant) -> bool {
        matches!(self.state, State::Waiting(t) if t <= now)
            && self.tries < MAX_REPUNCHES + SLOW_REPUNCHES
    }

    /// A fresh circuit is being dialed on `conn`.
    pub fn dialing(&mut self, conn: ConnectionId) {
        self.tries += 1;
        self.state = State::Dialing(conn);
    }

    /// Re-punches dialed so far.
    pub fn tries(&self) -> u8 {
        self.tries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_circuit_is_repunched_after_the_wait_and_a_reported_failure_sooner() {
        let t0 = Instant::now();
        let mut r = Repunch::new(t0);
        assert!(!r.due(t0 + PUNCH_WAIT - Duration::from_millis(1)));
        assert!(
            r.due(t0 + PUNCH_WAIT),
            "no direct connection and no report: re-punch"
        );
        r.punch_failed(t0 + Duration::from_secs(2));
        assert!(
            r.due(t0 + Duration::from_secs(3)),
            "a failure brings it forward"
        );
        assert!(!r.due(t0 + Duration::from_millis(2999)));
    }

    #[test]
    fn failures_while_dialing_do_not_stack_and_a_failed_dial_is_retried_later() {
        let t0 = Instant::now();
        let mut r = Repunch::new(t0);
        r.punch_failed(t0);
        assert!(r.due(t0 + REPUNCH_DELAY));
        let conn = ConnectionId::new_unchecked(7);
        r.dialing(conn);
        assert_eq!(r.tries(), 1);
        r.punch_failed(t0 + REPUNCH_DELAY);
        assert!(
            !r.due(t0 + Duration::from_secs(3600)),
            "an old circuit's failure while dialing"
        );
        r.dial_failed(ConnectionId::new_unchecked(8), t0);
        assert!(
            !r.due(t0 + Duration::from_secs(3600)),
            "another connection's dial failure"
        );
        r.dial_failed(conn, t0 + Duration::from_secs(5));
        assert!(!r.due(t0 + Duration::from_secs(6)));
        assert!(
            r.due(t0 + Duration::from_secs(7)),
            "the n-th waits n delays"
        );
    }

    #[test]
    fn quick_tries_then_slow_ones_past_time_wait_doubling_then_none() {
        let t0 = Instant::now();
        let mut r = Repunch::new(t0);
        let mut now = t0;
        for i in 0..MAX_REPUNCHES {
            r.punch_failed(now);
            now += REPUNCH_DELAY * u32::from(i + 1);
            assert!(r.due(now), "try {i}");
            r.dialing(ConnectionId::new_unchecked(usize::from(i)));
            r.circuit_opened(now);
            assert!(!r.due(now + PUNCH_WAIT - Duration::from_millis(1)));
        }
        assert_eq!(r.tries(), MAX_REPUNCHES);
        // The quick tries are spent: the next waits out TIME_WAIT, failure reported or not.
        r.punch_failed(now);
        assert!(!r.due(now + Duration::from_secs(60)), "within TIME_WAIT");
        assert!(r.due(now + SLOW_REPUNCH));
        let mut waits = vec![SLOW_REPUNCH];
        for i in 0..SLOW_REPUNCHES {
            now += *waits.last().unwrap();
            assert!(r.due(now), "slow try {i}");
            r.dialing(ConnectionId::new_unchecked(100 + usize::from(i)));
            r.circuit_opened(now);
            // No report: the wait after the fresh circuit is the backoff, not PUNCH_WAIT.
            let wait = (1..=3600)
                .map(Duration::from_secs)
                .find(|w| r.due(now + *w))
                .unwrap_or(Duration::MAX);
            waits.push(wait);
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [65, 130, 260, u64::MAX], "the last: no tries left");
        assert_eq!(r.tries(), MAX_REPUNCHES + SLOW_REPUNCHES);
    }
}
