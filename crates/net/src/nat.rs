//! Which relays a node listens through: a pure state machine, driven by the swarm actor
//! ([`crate::actor`]) with the time passed in.
//!
//! A node that cannot be dialed (AutoNAT says private) or that is told to (`--relay-via`)
//! listens on a relayed `/p2p-circuit` address: the relay holds a reservation for it and
//! forwards inbound connections, which DCUtR then tries to upgrade to direct ones.
//!
//! - Explicit relays (`--relay-via ADDR`) are always wanted, whatever AutoNAT says.
//! - While AutoNAT says private, up to `max_auto` relays are picked among connected peers
//!   that advertise the circuit relay v2 hop protocol (oldest known first, so a pick is
//!   stable).
//! - A reservation that fails or closes is retried after `backoff`; an automatic relay whose
//!   connection is gone is forgotten (another is picked), an explicit one is retried.
//! - When AutoNAT says public again, automatic relays are let go (explicit ones stay).

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What AutoNAT last concluded about this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reachability {
    Unknown,
    Public,
    Private,
}

/// What the actor must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatAction {
    /// Listen on `relay_addr/p2p-circuit` (the address ends in the relay's `/p2p/` id).
    Listen { relay: PeerId, addr: Multiaddr },
    /// Close the relayed listener through `relay`.
    Stop { relay: PeerId },
}

#[derive(Clone, Debug)]
struct Relay {
    addr: Multiaddr,
    explicit: bool,
    /// Order in which it became known (picks prefer the oldest).
    seq: u64,
    state: State,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Listening,
    /// Failed; not tried again before this instant.
    Backoff(Instant),
}

/// See the module docs.
#[derive(Debug)]
pub struct NatPolicy {
    relays: BTreeMap<PeerId, Relay>,
    reachability: Reachability,
    max_auto: usize,
    backoff: Duration,
    seq: u64,
}

/// The peer `addr` names: its last `/p2p/` component (before it, a relayed address names its
/// relay).
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter()
        .filter_map(|p| match p {
            Protocol::P2p(peer) => Some(peer),
            _ => None,
        })
        .last()
}

/// Whether `addr` goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// Why a `--relay-via` address is unusable.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RelayAddrError {
    #[error("relay address {0} does not end in /p2p/<relay peer id>")]
    NoPeer(Multiaddr),
    #[error("relay address {0} is itself relayed (/p2p-circuit)")]
    Relayed(Multiaddr),
}

impl NatPolicy {
    /// A policy with the explicit relays `via` (each ending in `/p2p/<relay id>`), picking
    /// at most `max_auto` more while private, and retrying failed reservations after
    /// `backoff`.
    pub fn new(
        via: &[Multiaddr],
        max_auto: usize,
        backoff: Duration,
    ) -> Result<Self, RelayAddrError> {
        let mut policy = NatPolicy {
            relays: BTreeMap::new(),
            reachability: Reachability::Unknown,
            max_auto,
            backoff,
            seq: 0,
        };
        for addr in via {
            if is_relayed(addr) {
                return Err(RelayAddrError::Relayed(addr.clone()));
            }
            let peer = match addr.iter().last() {
                Some(Protocol::P2p(peer)) => peer,
                _ => return Err(RelayAddrError::NoPeer(addr.clone())),
            };
            policy.seq += 1;
            policy.relays.insert(
                peer,
                Relay {
                    addr: addr.clone(),
                    explicit: true,
                    seq: policy.seq,
                    state: State::Idle,
                },
            );
        }
        Ok(policy)
    }

    pub fn reachability(&self) -> Reachability {
        self.reachability
    }

    /// Relays with a reservation (listening through them).
    pub fn listening(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.relays
            .iter()
            .filter(|(_, r)| r.state == State::Listening)
            .map(|(p, _)| *p)
    }

    /// Whether `peer` is a relay this node asked for (explicitly or automatically).
    pub fn is_relay(&self, peer: &PeerId) -> bool {
        self.relays.contains_key(peer)
    }

    /// AutoNAT changed its mind.
    pub fn on_reachability(&mut self, r: Reachability, now: Instant) -> Vec<NatAction> {
        self.reachability = r;
        self.plan(now)
    }

    /// A connected peer advertises the hop protocol and can be reached at `addr`.
    pub fn on_relay_found(
        &mut self,
        peer: PeerId,
        addr: Multiaddr,
        now: Instant,
    ) -> Vec<NatAction> {
        if is_relayed(&addr) {
            return Vec::new();
        }
        let addr = match addr.iter().last() {
            Some(Protocol::P2p(p)) if p == peer => addr,
            Some(Protocol::P2p(_)) => return Vec::new(),
            _ => addr.with(Protocol::P2p(peer)),
        };
        match self.relays.get_mut(&peer) {
            Some(r) => {
                if !r.explicit {
                    r.addr = addr;
                }
            }
            None => {
                self.seq += 1;
                self.relays.insert(
                    peer,
                    Relay {
                        addr,
                        explicit: false,
                        seq: self.seq,
                        state: State::Idle,
                    },
                );
            }
        }
        self.plan(now)
    }

    /// The connection to `peer` is gone: an automatic relay is forgotten and another picked
    /// (its listener closes with the connection); an explicit one waits for its listener to
    /// close and is retried.
    pub fn on_disconnected(&mut self, peer: &PeerId, now: Instant) -> Vec<NatAction> {
        if self.relays.get(peer).is_some_and(|r| !r.explicit) {
            self.relays.remove(peer);
        }
        self.plan(now)
    }

    /// The reservation through `relay` was accepted.
    pub fn on_listening(&mut self, relay: &PeerId) {
        if let Some(r) = self.relays.get_mut(relay) {
            r.state = State::Listening;
        }
    }

    /// The listener through `relay` closed (reservation refused or lost, relay gone, or
    /// stopped by us): try again after the backoff if it is still wanted.
    pub fn on_listener_closed(&mut self, relay: &PeerId, now: Instant) -> Vec<NatAction> {
        if let Some(r) = self.relays.get_mut(relay) {
            r.state = State::Backoff(now + self.backoff);
        }
        self.plan(now)
    }

    /// Periodic: retries relays whose backoff ended.
    pub fn tick(&mut self, now: Instant) -> Vec<NatAction> {
        self.plan(now)
    }

    /// The relays that should have a listener now.
    fn wanted(&self) -> Vec<PeerId> {
        let mut wanted: Vec<PeerId> = self
            .relays
            .iter()
            .filter(|(_, r)| r.explicit)
            .map(|(p, _)| *p)
            .collect();
        if self.reachability == Reachability::Private {
            let mut auto: Vec<(&PeerId, &Relay)> =
                self.relays.iter().filter(|(_, r)| !r.explicit).collect();
            // Keep relays already in use, then the oldest known.
            auto.sort_by_key(|(_, r)| (r.state != State::Listening, r.seq));
            wanted.extend(auto.into_iter().take(self.max_auto).map(|(p, _)| *p));
        }
        wanted
    }

    fn plan(&mut self, now: Instant) -> Vec<NatAction> {
        let wanted = self.wanted();
        let mut actions = Vec::new();
        for (peer, r) in self.relays.iter_mut() {
            let want = wanted.contains(peer);
            match r.state {
                State::Listening if !want => {
                    r.state = State::Idle;
                    actions.push(NatAction::Stop { relay: *peer });
                }
                State::Idle if want => {
                    r.state = State::Listening;
                    actions.push(NatAction::Listen {
                        relay: *peer,
                        addr: r.addr.clone(),
                    });
                }
                State::Backoff(until) if want && now >= until => {
                    r.state = State::Listening;
                    actions.push(NatAction::Listen {
                        relay: *peer,
                        addr: r.addr.clone(),
                    });
                }
                State::Backoff(until) if !want && now >= until => r.state = State::Idle,
                _ => {}
            }
        }
        actions
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    fn addr(p: PeerId, port: u16) -> Multiaddr {
        format!("/ip4/10.0.0.1/tcp/{port}/p2p/{p}").parse().unwrap()
    }

    const BACKOFF: Duration = Duration::from_secs(10);

    #[test]
    fn explicit_relays_are_listened_on_at_once_whatever_autonat_says() {
        let r = peer();
        let mut p = NatPolicy::new(&[addr(r, 1)], 2, BACKOFF).unwrap();
        let now = Instant::now();
        assert_eq!(
            p.tick(now),
            vec![NatAction::Listen {
                relay: r,
                addr: addr(r, 1)
            }]
        );
        assert!(p.tick(now).is_empty(), "asked once");
        assert!(p.on_reachability(Reachability::Public, now).is_empty());
        p.on_listening(&r);
        assert_eq!(p.listening().collect::<Vec<_>>(), vec![r]);
    }

    #[test]
    fn relay_addresses_must_name_the_relay_and_not_be_relayed() {
        let bare: Multiaddr = "/ip4/10.0.0.1/tcp/1".parse().unwrap();
        assert_eq!(
            NatPolicy::new(std::slice::from_ref(&bare), 2, BACKOFF).unwrap_err(),
            RelayAddrError::NoPeer(bare)
        );
        let r = peer();
        let circuit = addr(r, 1).with(Protocol::P2pCircuit);
        assert_eq!(
            NatPolicy::new(std::slice::from_ref(&circuit), 2, BACKOFF).unwrap_err(),
            RelayAddrError::Relayed(circuit)
        );
    }

    #[test]
    fn private_nodes_pick_up_to_max_auto_relays_and_public_ones_let_them_go() {
        let mut p = NatPolicy::new(&[], 2, BACKOFF).unwrap();
        let now = Instant::now();
        let (a, b, c) = (peer(), peer(), peer());
        for (i, r) in [a, b, c].iter().enumerate() {
            assert!(p.on_relay_found(*r, addr(*r, i as u16), now).is_empty());
        }
        let listen = p.on_reachability(Reachability::Private, now);
        let mut got: Vec<PeerId> = listen
            .iter()
            .map(|x| match x {
                NatAction::Listen { relay, addr: a } => {
                    assert_eq!(peer_of(a), Some(*relay));
                    *relay
                }
                other => panic!("{other:?}"),
            })
            .collect();
        got.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(got, want, "the two oldest");
        let stop = p.on_reachability(Reachability::Public, now);
        assert_eq!(stop.len(), 2);
        assert!(stop.iter().all(|x| matches!(x, NatAction::Stop { .. })));
    }

    #[test]
    fn a_lost_relay_is_replaced_and_a_refused_reservation_waits_for_the_backoff() {
        let mut p = NatPolicy::new(&[], 1, BACKOFF).unwrap();
        let t0 = Instant::now();
        let (a, b) = (peer(), peer());
        p.on_relay_found(a, addr(a, 1), t0);
        p.on_relay_found(b, addr(b, 2), t0);
        assert_eq!(
            p.on_reachability(Reachability::Private, t0),
            vec![NatAction::Listen {
                relay: a,
                addr: addr(a, 1)
            }]
        );
        p.on_listening(&a);
        // a's connection dies (its listener closes with it): b takes over.
        assert_eq!(
            p.on_disconnected(&a, t0),
            vec![NatAction::Listen {
                relay: b,
                addr: addr(b, 2)
            }]
        );
        assert!(p.on_listener_closed(&a, t0).is_empty());
        assert!(!p.is_relay(&a));
        // b refuses the reservation: nothing else to try until the backoff ends.
        assert!(p.on_listener_closed(&b, t0).is_empty());
        assert!(p.tick(t0 + BACKOFF / 2).is_empty());
        assert_eq!(
            p.tick(t0 + BACKOFF),
            vec![NatAction::Listen {
                relay: b,
                addr: addr(b, 2)
            }]
        );
    }

    #[test]
    fn an_explicit_relay_is_retried_after_it_goes_away() {
        let r = peer();
        let mut p = NatPolicy::new(&[addr(r, 1)], 0, BACKOFF).unwrap();
        let t0 = Instant::now();
        p.tick(t0);
        p.on_listening(&r);
        assert!(p.on_disconnected(&r, t0).is_empty());
        assert!(p.on_listener_closed(&r, t0).is_empty());
        assert!(p.is_relay(&r), "explicit relays are kept");
        assert_eq!(p.tick(t0 + BACKOFF).len(), 1);
    }

    #[test]
    fn relayed_or_foreign_relay_addresses_are_ignored() {
        let mut p = NatPolicy::new(&[], 2, BACKOFF).unwrap();
        let now = Instant::now();
        p.on_reachability(Reachability::Private, now);
        let (r, other) = (peer(), peer());
        assert!(p.on_relay_found(r, addr(other, 1), now).is_empty());
        assert!(p
            .on_relay_found(r, addr(other, 1).with(Protocol::P2pCircuit), now)
            .is_empty());
        let bare: Multiaddr = "/ip4/10.0.0.1/tcp/7".parse().unwrap();
        assert_eq!(
            p.on_relay_found(r, bare.clone(), now),
            vec![NatAction::Listen {
                relay: r,
                addr: bare.with(Protocol::P2p(r))
            }]
        );
    }
}
