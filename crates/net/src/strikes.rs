//! Strikes and bans: who sent malformed input, and who is refused until when.
//!
//! A peer earns a strike per malformed frame (all of them at once for a frame no honest peer
//! sends); at `max_strikes` it is banned for `ban`. Both tables are bounded: identities cost an
//! attacker nothing, so a table keyed by peer id must not grow with them. Expired bans are
//! dropped as new ones arrive, and past [`MAX_TRACKED`] peers with strikes the oldest strikes
//! are forgotten (a forgiven peer only gets `max_strikes` more chances).
//!
//! Time is passed in, so the policy is a pure function of its inputs.

use libp2p::PeerId;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Most peers with strikes, and most bans, held at once.
pub const MAX_TRACKED: usize = 4096;

/// The strike and ban tables of one swarm.
#[derive(Debug)]
pub struct Strikes {
    max_strikes: u32,
    ban: Duration,
    strikes: HashMap<PeerId, u32>,
    /// The peers of `strikes`, first struck first.
    order: VecDeque<PeerId>,
    banned: HashMap<PeerId, Instant>,
}

/// What a strike did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The peer now has this many strikes.
    Warned(u32),
    /// The peer reached the limit and is banned until the instant.
    Banned(Instant),
}

impl Strikes {
    pub fn new(max_strikes: u32, ban: Duration) -> Self {
        Self {
            max_strikes: max_strikes.max(1),
            ban,
            strikes: HashMap::new(),
            order: VecDeque::new(),
            banned: HashMap::new(),
        }
    }

    /// Counts an offence by `peer` at `now`; `severe` uses up all its strikes at once.
    pub fn strike(&mut self, peer: PeerId, severe: bool, now: Instant) -> Verdict {
        let count = match self.strikes.get_mut(&peer) {
            Some(n) => n,
            None => {
                while self.strikes.len() >= MAX_TRACKED {
                    match self.order.pop_front() {
                        Some(old) => {
                            self.strikes.remove(&old);
                        }
                        None => break,
                    }
                }
                self.order.push_back(peer);
                self.strikes.entry(peer).or_insert(0)
            }
        };
        *count = count.saturating_add(if severe { self.max_strikes } else { 1 });
        if *count < self.max_strikes {
            return Verdict::Warned(*count);
        }
        self.strikes.remove(&peer);
        self.order.retain(|p| *p != peer);
        self.banned.retain(|_, until| *until > now);
        if self.banned.len() >= MAX_TRACKED {
            // Every slot holds a live ban: drop the one that ends first.
            if let Some(first) = self.banned.iter().min_by_key(|(_, u)| **u).map(|(p, _)| *p) {
                self.banned.remove(&first);
            }
        }
        let until = now + self.ban;
        self.banned.insert(peer, until);
        Verdict::Banned(until)
    }

    /// Whether `peer` is refused at `now`.
    pub fn is_banned(&mut self, peer: &PeerId, now: Instant) -> bool {
        match self.banned.get(peer) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.banned.remove(peer);
                false
            }
            None => false,
        }
    }

    /// Peers with strikes and bans held (for tests and metrics).
    pub fn tracked(&self) -> (usize, usize) {
        (self.strikes.len(), self.banned.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strikes_add_up_to_a_ban_that_expires() {
        let mut s = Strikes::new(3, Duration::from_secs(60));
        let p = PeerId::random();
        let t = Instant::now();
        assert_eq!(s.strike(p, false, t), Verdict::Warned(1));
        assert_eq!(s.strike(p, false, t), Verdict::Warned(2));
        assert!(!s.is_banned(&p, t));
        assert_eq!(
            s.strike(p, false, t),
            Verdict::Banned(t + Duration::from_secs(60))
        );
        assert!(s.is_banned(&p, t + Duration::from_secs(59)));
        assert!(!s.is_banned(&p, t + Duration::from_secs(60)));
        // A fresh start after the ban.
        assert_eq!(
            s.strike(p, false, t + Duration::from_secs(61)),
            Verdict::Warned(1)
        );
    }

    #[test]
    fn a_severe_offence_bans_at_once() {
        let mut s = Strikes::new(3, Duration::from_secs(5));
        let p = PeerId::random();
        let t = Instant::now();
        assert!(matches!(s.strike(p, true, t), Verdict::Banned(_)));
        assert!(s.is_banned(&p, t));
    }

    #[test]
    fn the_tables_stay_bounded_however_many_identities_offend() {
        let mut s = Strikes::new(3, Duration::from_secs(60));
        let t = Instant::now();
        for _ in 0..3 * MAX_TRACKED {
            s.strike(PeerId::random(), false, t);
        }
        assert_eq!(s.tracked(), (MAX_TRACKED, 0));
        // Live bans are capped too, and expired ones are dropped as new ones come.
        for i in 0..2 * MAX_TRACKED {
            s.strike(PeerId::random(), true, t + Duration::from_millis(i as u64));
        }
        let (_, bans) = s.tracked();
        assert_eq!(bans, MAX_TRACKED);
        assert_eq!(s.order.len(), s.strikes.len());
        s.strike(PeerId::random(), true, t + Duration::from_secs(3600));
        assert_eq!(s.tracked().1, 1);
    }

    #[test]
    fn a_forgotten_offender_starts_again_from_one() {
        let mut s = Strikes::new(3, Duration::from_secs(60));
        let t = Instant::now();
        let p = PeerId::random();
        s.strike(p, false, t);
        s.strike(p, false, t);
        for _ in 0..MAX_TRACKED {
            s.strike(PeerId::random(), false, t);
        }
        assert_eq!(s.strike(p, false, t), Verdict::Warned(1));
    }
}
