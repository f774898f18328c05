//! Arbitration of a disputed audit, as an explicit state machine (time passed in).
//!
//! ```text
//! audit outcome ──┬─ passes ───────────────────────────────► nothing (earnings unlock)
//!                 ├─ marginal tolerance miss ──► MissRecord ─► Convicted when the binomial
//!                 │                                            tail < 1e-6 (crate::stats)
//!                 └─ mismatch (exact, or far outside band) ──► Case::open(k referees)
//!                        AwaitingReferees ── vote()* / tick(now >= deadline) ──► Decided
//! ```
//!
//! Each referee recomputes the job (not told either fingerprint) and the gateway compares its
//! fingerprint with the provider's and the accuser's: a [`Vote`]. A strict majority of the `k`
//! referees decides as soon as it exists: for the accuser the provider is slashed
//! ([`Verdict::ProviderCheated`]), for the provider the accuser is ([`Verdict::FalseAccusation`]).
//! Referees who matched the losing side's wrong answer are named in the verdict (colluders:
//! their fingerprint reproduced a computation the majority did not). With no majority by the
//! deadline the case is [`Verdict::Inconclusive`] and nobody is slashed; the caller may open a
//! new case with fresh referees.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;

/// What one referee's recomputation agreed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vote {
    /// Matched the provider's fingerprint, not the accuser's.
    Provider,
    /// Matched the accuser's, not the provider's.
    Accuser,
    /// Matched neither (it counts for no side).
    Neither,
}

/// How a case ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict<N> {
    /// Slash `provider`; `challenger` (the accuser) is paid its share.
    ProviderCheated {
        provider: N,
        challenger: N,
        colluders: Vec<N>,
    },
    /// Slash `accuser` for a false accusation; the provider keeps its pay.
    FalseAccusation { accuser: N, colluders: Vec<N> },
    /// No majority by the deadline.
    Inconclusive,
}

/// Where a case is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State<N> {
    AwaitingReferees { deadline: u64 },
    Decided(Verdict<N>),
}

/// A refused arbitration step.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArbitrationError {
    #[error("a case needs an odd number of referees, at least 1 (got {0})")]
    RefereeCount(usize),
    #[error("a referee cannot be the provider or the accuser, nor named twice")]
    Conflicted,
    #[error("the accuser cannot be the provider")]
    SelfAccusation,
    #[error("this node is not a referee of the case")]
    NotAReferee,
    #[error("this referee has already voted")]
    AlreadyVoted,
    #[error("the case is already decided")]
    Decided,
}

/// One disputed job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case<N: Ord> {
    pub job: [u8; 32],
    pub provider: N,
    pub accuser: N,
    referees: Vec<N>,
    votes: BTreeMap<N, Vote>,
    state: State<N>,
}

impl<N: Clone + Ord + Debug> Case<N> {
    /// Opens a case at `now`; referees have until `now + timeout` to vote.
    pub fn open(
        job: [u8; 32],
        provider: N,
        accuser: N,
        referees: Vec<N>,
        now: u64,
        timeout: u64,
    ) -> Result<Self, ArbitrationError> {
        if referees.is_empty() || referees.len().is_multiple_of(2) {
            return Err(ArbitrationError::RefereeCount(referees.len()));
        }
        if provider == accuser {
            return Err(ArbitrationError::SelfAccusation);
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &referees {
            if *r == provider || *r == accuser || !seen.insert(r.clone()) {
                return Err(ArbitrationError::Conflicted);
            }
        }
        Ok(Self {
            job,
            provider,
            accuser,
            referees,
            votes: BTreeMap::new(),
            state: State::AwaitingReferees {
                deadline: now.saturating_add(timeout),
            },
        })
    }

    pub fn state(&self) -> &State<N> {
        &self.state
    }

    pub fn referees(&self) -> &[N] {
        &self.referees
    }

    /// Records a referee's vote; returns the verdict once a majority exists.
    pub fn vote(
        &mut self,
        referee: N,
        vote: Vote,
    ) -> Result<Option<&Verdict<N>>, ArbitrationError> {
        if matches!(self.state, State::Decided(_)) {
            return Err(ArbitrationError::Decided);
        }
        if !self.referees.contains(&referee) {
            return Err(ArbitrationError::NotAReferee);
        }
        if self.votes.contains_key(&referee) {
            return Err(ArbitrationError::AlreadyVoted);
        }
        self.votes.insert(referee, vote);
        let majority = self.referees.len() / 2 + 1;
        let count = |v: Vote| self.votes.values().filter(|&&x| x == v).count();
        if count(Vote::Accuser) >= majority {
            self.decide(Vote::Accuser);
        } else if count(Vote::Provider) >= majority {
            self.decide(Vote::Provider);
        } else if self.votes.len() == self.referees.len() {
            self.state = State::Decided(Verdict::Inconclusive);
        }
        Ok(match &self.state {
            State::Decided(v) => Some(v),
            State::AwaitingReferees { .. } => None,
        })
    }

    /// Advances time: at the deadline, missing votes abstain and the case is decided with
    /// what arrived (a majority of all `k` is still required).
    pub fn tick(&mut self, now: u64) -> Option<&Verdict<N>> {
        if let State::AwaitingReferees { deadline } = self.state {
            if now >= deadline {
                self.state = State::Decided(Verdict::Inconclusive);
            }
        }
        match &self.state {
            State::Decided(v) => Some(v),
            State::AwaitingReferees { .. } => None,
        }
    }

    fn decide(&mut self, winner: Vote) {
        let losers: Vec<N> = self
            .votes
            .iter()
            .filter(|(_, &v)| v != winner && v != Vote::Neither)
            .map(|(n, _)| n.clone())
            .collect();
        self.state = State::Decided(match winner {
            Vote::Accuser => Verdict::ProviderCheated {
                provider: self.provider.clone(),
                challenger: self.accuser.clone(),
                colluders: losers,
            },
            _ => Verdict::FalseAccusation {
                accuser: self.accuser.clone(),
                colluders: losers,
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn case(k: u8) -> Case<u8> {
        Case::open([0; 32], 100, 101, (0..k).collect(), 1_000, 500).unwrap()
    }

    #[test]
    fn majority_for_the_accuser_convicts_the_provider() {
        let mut c = case(3);
        assert_eq!(c.vote(0, Vote::Accuser).unwrap(), None);
        assert_eq!(c.vote(1, Vote::Provider).unwrap(), None);
        let v = c.vote(2, Vote::Accuser).unwrap().cloned();
        assert_eq!(
            v,
            Some(Verdict::ProviderCheated {
                provider: 100,
                challenger: 101,
                colluders: vec![1]
            })
        );
        assert_eq!(c.vote(1, Vote::Accuser), Err(ArbitrationError::Decided));
    }

    #[test]
    fn majority_for_the_provider_convicts_the_accuser_early() {
        let mut c = case(3);
        c.vote(2, Vote::Provider).unwrap();
        let v = c.vote(0, Vote::Provider).unwrap().cloned();
        assert_eq!(
            v,
            Some(Verdict::FalseAccusation {
                accuser: 101,
                colluders: vec![]
            })
        );
    }

    #[test]
    fn deadline_without_majority_is_inconclusive() {
        let mut c = case(3);
        c.vote(0, Vote::Accuser).unwrap();
        assert_eq!(c.tick(1_499), None);
        assert_eq!(c.tick(1_500), Some(&Verdict::Inconclusive));
        let mut c = case(3);
        c.vote(0, Vote::Neither).unwrap();
        c.vote(1, Vote::Neither).unwrap();
        assert_eq!(
            c.vote(2, Vote::Accuser).unwrap(),
            Some(&Verdict::Inconclusive)
        );
    }

    #[test]
    fn refuses_bad_cases_and_votes() {
        assert_eq!(
            Case::open([0; 32], 1u8, 2, vec![3, 4], 0, 1).unwrap_err(),
            ArbitrationError::RefereeCount(2)
        );
        assert_eq!(
            Case::open([0; 32], 1u8, 2, vec![1], 0, 1).unwrap_err(),
            ArbitrationError::Conflicted
        );
        assert_eq!(
            Case::open([0; 32], 1u8, 2, vec![3, 3, 4], 0, 1).unwrap_err(),
            ArbitrationError::Conflicted
        );
        assert_eq!(
            Case::open([0; 32], 1u8, 1, vec![3], 0, 1).unwrap_err(),
            ArbitrationError::SelfAccusation
        );
        let mut c = case(3);
        assert_eq!(c.vote(9, Vote::Accuser), Err(ArbitrationError::NotAReferee));
        c.vote(0, Vote::Accuser).unwrap();
        assert_eq!(
            c.vote(0, Vote::Provider),
            Err(ArbitrationError::AlreadyVoted)
        );
    }

    proptest! {
        /// Whatever the votes, a side is convicted only with a strict majority of all referees.
        #[test]
        fn verdicts_need_a_majority(k in (0usize..4).prop_map(|i| 2 * i + 1), votes in proptest::collection::vec(0u8..3, 0..9)) {
            let mut c = Case::open([0; 32], 100u8, 101, (0..k as u8).collect(), 0, 10).unwrap();
            let mut cast = Vec::new();
            for (r, v) in votes.iter().enumerate().take(k) {
                let v = [Vote::Provider, Vote::Accuser, Vote::Neither][usize::from(*v)];
                if c.vote(r as u8, v).is_err() { break; }
                cast.push(v);
            }
            c.tick(10);
            let n = |x: Vote| cast.iter().filter(|&&v| v == x).count();
            match c.state() {
                State::Decided(Verdict::ProviderCheated { .. }) => prop_assert!(n(Vote::Accuser) > k / 2),
                State::Decided(Verdict::FalseAccusation { .. }) => prop_assert!(n(Vote::Provider) > k / 2),
                State::Decided(Verdict::Inconclusive) => prop_assert!(n(Vote::Accuser) <= k / 2 && n(Vote::Provider) <= k / 2),
                State::AwaitingReferees { .. } => prop_assert!(false, "the deadline passed"),
            }
        }
    }
}
