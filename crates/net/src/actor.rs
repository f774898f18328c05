//! The task that owns the swarm: turns [`Command`]s into swarm calls and swarm events into
//! [`NetEvent`]s, keeps round-trip times, and polices peers that send malformed frames.
//!
//! NAT traversal: AutoNAT verdicts and relay-capable peers feed the [`NatPolicy`], whose
//! actions open and close relayed listeners. Once a peer has a direct connection (dialed, or
//! punched by DCUtR) beside a relayed one, the relayed ones this side dialed are closed as soon
//! as no stage call is in flight with that peer (request/response spreads calls over every
//! connection), so stage calls go direct. Only the dialer of a relayed connection closes it:
//! the listener cannot see the calls its caller has sent and it has not read yet, and closing
//! between two of its answers would cut them. The dialer waits [`RETIRE_GRACE`] (or two round
//! trips) after the direct connection opened, so calls its peer sent before seeing it arrive
//! and are counted, then closes once no call is in flight. New calls to a peer are held during
//! that grace and while its retired connections close (request/response spreads calls
//! round-robin, and would send them on a closing one), and on the listener's side while the
//! dialer has yet to close a relayed connection it superseded; held calls go out once the
//! connections are gone, or after [`HOLD_LIMIT`] whatever the state, and fail if the peer
//! disconnects. A request still being read when the dialer closes (larger than the grace lets
//! through a slow relay) is lost: the caller sees `ConnectionClosed` and fails over.
//!
//! A failed hole punch is tried again on a fresh relayed connection ([`crate::repunch`]): DCUtR
//! runs once per relayed connection, with the observed addresses known when it opened, so a
//! circuit opened before identify had told this side its address (or a punch lost to timing)
//! would otherwise stay relayed for good; quick re-punches first, then a few slow ones. The
//! older relayed connection is retired once the new one is open.

use crate::behaviour::{self, Behaviour, BehaviourEvent, BehaviourSettings, ANNOUNCE_TOPIC};
use crate::codec::StageCodec;
use crate::nat::{is_relayed, peer_of, NatAction, NatPolicy, Reachability};
use crate::repunch::Repunch;
use crate::strikes::{Strikes, Verdict};
use crate::{
    CallError, Command, Link, NatStatus, NetConfig, NetEvent, NetHandle, PublishError, Reply,
    StartNetError,
};
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    autonat, dcutr, gossipsub, identify, kad, mdns, noise, ping, relay, tcp, yamux, Multiaddr,
    PeerId, Swarm,
};
use plexus_core::wire::{DecodeError, ErrorCode, Request, Response};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

const COMMAND_QUEUE: usize = 256;
const EVENT_QUEUE: usize = 256;
/// Connected peers beyond which discovery stops dialing new ones.
const TARGET_PEERS: usize = 64;
/// How long a failed relay reservation waits before it is tried again.
const RELAY_BACKOFF: Duration = Duration::from_secs(5);
/// How long a relayed connection is kept after a direct one opens beside it, at least (twice
/// the measured round trip when that is longer).
pub const RETIRE_GRACE: Duration = Duration::from_millis(300);
/// The longest a call is held back while a peer's relayed connections are retired.
pub const HOLD_LIMIT: Duration = Duration::from_secs(5);

/// Owns the swarm; see the crate docs.
pub struct NetActor {
    swarm: Swarm<Behaviour>,
    config: NetConfig,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    pending: HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<Response, CallError>>)>,
    rtts: HashMap<PeerId, Duration>,
    strikes: Strikes,
    topic: gossipsub::IdentTopic,
    /// Inbound calls so far (each [`Reply`] gets the next number as its id).
    replies: u64,
    nat: NatPolicy,
    /// Relayed listeners, by the relay they go through.
    relay_listeners: HashMap<ListenerId, PeerId>,
    /// Open connections per peer: relayed or not, and the address dialed for outbound ones.
    conns: HashMap<PeerId, HashMap<ConnectionId, Conn>>,
    /// Peers with a direct connection beside relayed ones, to close once no call is in flight.
    /// (The value: not before then. Calls the peer sent on the relayed connection before it saw
    /// the direct one are still on their way; they are counted once read.)
    retire: HashMap<PeerId, Instant>,
    /// Inbound stage calls not answered yet, per peer.
    inbound: HashMap<PeerId, u32>,
    /// Relayed connections asked to close and not closed yet, per peer.
    closing: HashMap<PeerId, HashSet<ConnectionId>>,
    /// Calls to a peer held while its relayed connections are retired, since when.
    held: HashMap<PeerId, (Instant, Vec<HeldCall>)>,
    /// Peers whose dialer left a relayed connection open past [`HOLD_LIMIT`]: calls to them
    /// are no longer held for it (until they disconnect).
    unheld: HashSet<PeerId>,
    /// Peers reached only through relayed connections this side dialed: when to dial a fresh
    /// circuit for another hole punch. Connected peers only.
    repunch: HashMap<PeerId, Repunch>,
    /// Peers DCUtR punched a hole to (bounded by the connections there can be).
    punched: HashSet<PeerId>,
    /// Addresses of each peer a dial is under way on (until it connects or the dial fails):
    /// a new address of the peer is dialed, one already being dialed is not again (kad
    /// reports every address added, one at a time, and announcements repeat).
    dialing: HashMap<PeerId, HashSet<Multiaddr>>,
}

type HeldCall = (Request, oneshot::Sender<Result<Response, CallError>>);

#[derive(Clone, Debug)]
struct Conn {
    relayed: bool,
    /// This side dialed the connection (through a relay or not).
    outbound: bool,
    /// The address dialed, for outbound connections (a `/p2p-circuit` one when relayed).
    dialed: Option<Multiaddr>,
}

impl Conn {
    /// A relayed connection this side may close once a direct one (or a newer relayed one it
    /// dialed) is open.
    fn retirable(&self) -> bool {
        self.relayed && self.outbound
    }
}

/// Whether the peer dialed a relayed connection of `conns` that it is about to retire: one
/// beside a direct connection or beside a newer relayed one it dialed (a re-punch's circuit).
fn awaits_dialer(conns: &HashMap<ConnectionId, Conn>) -> bool {
    let inbound_relayed = conns.values().filter(|c| c.relayed && !c.outbound).count();
    inbound_relayed > 0 && (inbound_relayed > 1 || conns.values().any(|c| !c.relayed))
}

/// The connections among `conns` to retire: every relayed one this side dialed when a direct
/// one is open, else all of those but the newest (connection ids grow as connections are
/// opened).
fn stale(conns: &HashMap<ConnectionId, Conn>) -> Vec<ConnectionId> {
    let mut retirable: Vec<ConnectionId> = conns
        .iter()
        .filter(|(_, c)| c.retirable())
        .map(|(id, _)| *id)
        .collect();
    retirable.sort_unstable();
    if !conns.values().any(|c| !c.relayed) {
        retirable.pop();
    }
    retirable
}

/// The circuit this side dialed last to a peer it reaches through relays only (none when a
/// direct connection is open): where a re-punch dials.
fn newest_circuit(conns: &HashMap<ConnectionId, Conn>) -> Option<&Multiaddr> {
    if conns.values().any(|c| !c.relayed) {
        return None;
    }
    conns
        .iter()
        .filter(|(_, c)| c.retirable())
        .max_by_key(|(id, _)| **id)
        .and_then(|(_, c)| c.dialed.as_ref())
}

impl NetActor {
    pub(crate) fn start(
        config: NetConfig,
    ) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), StartNetError> {
        let codec = StageCodec::default();
        let counters = Arc::clone(&codec.counters);
        let settings = BehaviourSettings {
            serve: config.serve,
            mdns: config.mdns,
            request_timeout: config.request_timeout,
            max_streams: config.max_streams,
            max_connections: config.max_connections,
            codec,
            relay: config.relay.clone(),
        };
        let max_auto = if config.serve {
            config.max_auto_relays
        } else {
            0
        };
        let nat = NatPolicy::new(&config.relay_via, max_auto, RELAY_BACKOFF)?;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(config.key.keypair().clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| StartNetError::Transport(e.to_string()))?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| StartNetError::Transport(e.to_string()))?
            .with_behaviour(|key, relay_client| behaviour::build(key, relay_client, settings))
            .map_err(|e| StartNetError::Behaviour(e.to_string()))?
            .with_swarm_config(|c| {
                // Each stage call opens a substream; plain multistream-select waits a round
                // trip for the protocol to be confirmed before the request goes out, which
                // doubled the per-stage cost on a 40 ms link (crates/plexus/tests/slow_link.rs).
                // Lazy negotiation sends the request with the protocol name; every behaviour
                // here proposes the protocols its peers (this same build) speak.
                c.with_idle_connection_timeout(Duration::from_secs(300))
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
            })
            .build();
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| StartNetError::Listen {
                    addr: addr.clone(),
                    message: e.to_string(),
                })?;
        }
        for addr in &config.bootstrap {
            if let Some(peer) = peer_of(addr) {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            if let Err(e) = swarm.dial(addr.clone()) {
                warn!(%addr, "cannot dial bootstrap peer: {e}");
            }
        }
        if !config.bootstrap.is_empty() {
            let _ = swarm.behaviour_mut().kad.bootstrap();
        }
        let peer_id = *swarm.local_peer_id();
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let strikes = Strikes::new(config.max_strikes, config.ban);
        let actor = NetActor {
            swarm,
            config,
            commands: cmd_rx,
            events: ev_tx,
            pending: HashMap::new(),
            rtts: HashMap::new(),
            strikes,
            topic: gossipsub::IdentTopic::new(ANNOUNCE_TOPIC),
            replies: 0,
            nat,
            relay_listeners: HashMap::new(),
            conns: HashMap::new(),
            retire: HashMap::new(),
            inbound: HashMap::new(),
            closing: HashMap::new(),
            held: HashMap::new(),
            unheld: HashSet::new(),
            repunch: HashMap::new(),
            punched: HashSet::new(),
            dialing: HashMap::new(),
        };
        tokio::spawn(actor.run());
        Ok((
            NetHandle {
                commands: cmd_tx,
                peer_id,
                counters,
            },
            ev_rx,
        ))
    }

    /// Runs until every [`NetHandle`] is dropped.
    async fn run(mut self) {
        let mut nat_tick = tokio::time::interval(Duration::from_secs(1));
        let mut retire_tick = tokio::time::interval(Duration::from_millis(100));
        retire_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = retire_tick.tick(), if !self.retire.is_empty() => {
                    let due: Vec<PeerId> = self.retire.keys().copied().collect();
                    for peer in due {
                        self.maybe_retire(&peer);
                        // Past the grace, calls held for it go out even if calls are still
                        // in flight (the relayed connection then goes when they are done).
                        self.release_held(peer);
                    }
                }
                _ = nat_tick.tick() => {
                    let actions = self.nat.tick(Instant::now());
                    self.apply(actions);
                    self.repunch_due(Instant::now());
                    self.release_overdue(Instant::now());
                }
            }
        }
        debug!("network task stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Call {
                peer,
                request,
                reply,
            } => {
                if self.holds_calls(&peer) {
                    self.held
                        .entry(peer)
                        .or_insert_with(|| (Instant::now(), Vec::new()))
                        .1
                        .push((request, reply));
                } else {
                    self.send_call(peer, request, reply);
                }
            }
            Command::Respond { reply, response } => {
                // Fails only if the peer went away; nothing to do then.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .stage
                    .send_response(reply.0, response);
            }
            Command::Publish { data, reply } => {
                let result = match self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .publish(self.topic.clone(), data)
                {
                    Ok(_) => Ok(()),
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                        Err(PublishError::NoPeers)
                    }
                    Err(gossipsub::PublishError::Duplicate) => Ok(()),
                    Err(e) => Err(PublishError::Other(e.to_string())),
                };
                let _ = reply.send(result);
            }
            Command::Dial(addr) => {
                if let Some(peer) = peer_of(&addr) {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                }
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    debug!(%addr, "dial failed: {e}");
                }
            }
            Command::AddAddresses(peer, addrs) => {
                for addr in &addrs {
                    self.swarm.add_peer_address(peer, addr.clone());
                }
                // Connect to announced peers directly (bounded by TARGET_PEERS): gossip
                // relayed through a third node dies with it, and a direct connection is how
                // a peer's death is noticed at once (its announcement would linger for its
                // TTL otherwise).
                self.dial_if_new(peer, addrs);
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Connected(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Rtt(peer, reply) => {
                let _ = reply.send(self.rtts.get(&peer).copied());
            }
            Command::Links(reply) => {
                let links = self
                    .conns
                    .iter()
                    .map(|(peer, conns)| {
                        let relayed = conns.values().filter(|c| c.relayed).count();
                        Link {
                            peer: *peer,
                            direct: conns.len() - relayed,
                            relayed,
                            hole_punched: self.punched.contains(peer),
                        }
                    })
                    .collect();
                let _ = reply.send(links);
            }
            Command::Nat(reply) => {
                let _ = reply.send(NatStatus {
                    reachability: self.nat.reachability(),
                    relays: self.nat.listening().collect(),
                });
            }
        }
    }

    /// Carries out what the NAT policy decided.
    fn apply(&mut self, actions: Vec<NatAction>) {
        for action in actions {
            match action {
                NatAction::Listen { relay, addr } => {
                    let circuit = addr.clone().with(Protocol::P2pCircuit);
                    match self.swarm.listen_on(circuit) {
                        Ok(id) => {
                            info!(%addr, "asking relay for a reservation");
                            self.relay_listeners.insert(id, relay);
                        }
                        Err(e) => {
                            warn!(%addr, "cannot listen through relay: {e}");
                            let again = self.nat.on_listener_closed(&relay, Instant::now());
                            // Backing off: `again` cannot ask for this relay before the next tick.
                            self.apply(again);
                        }
                    }
                }
                NatAction::Stop { relay } => {
                    let ids: Vec<ListenerId> = self
                        .relay_listeners
                        .iter()
                        .filter(|(_, r)| **r == relay)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in ids {
                        info!(%relay, "letting a relay reservation go");
                        self.swarm.remove_listener(id);
                    }
                }
            }
        }
    }

    fn send_call(
        &mut self,
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, CallError>>,
    ) {
        let id = self
            .swarm
            .behaviour_mut()
            .stage
            .send_request(&peer, Ok(request));
        self.pending.insert(id, (peer, reply));
    }

    /// Whether new calls to `peer` wait: relayed connections of it are to be retired or
    /// closing (this side dialed them), or it dialed a relayed connection that a direct one
    /// now stands beside (its dialer will close it).
    fn holds_calls(&self, peer: &PeerId) -> bool {
        if self.closing.contains_key(peer) {
            return true;
        }
        // During the grace only: calls in flight then drain so the retirement can go ahead,
        // and a long call in flight never makes new ones wait longer than the grace.
        if self
            .retire
            .get(peer)
            .is_some_and(|after| Instant::now() < *after)
        {
            return true;
        }
        !self.unheld.contains(peer) && self.conns.get(peer).is_some_and(awaits_dialer)
    }

    /// Sends `peer`'s held calls once nothing holds them.
    fn release_held(&mut self, peer: PeerId) {
        if self.holds_calls(&peer) {
            return;
        }
        self.send_held(peer);
    }

    fn send_held(&mut self, peer: PeerId) {
        for (request, reply) in self.held.remove(&peer).map(|h| h.1).unwrap_or_default() {
            if !reply.is_closed() {
                self.send_call(peer, request, reply);
            }
        }
    }

    /// Calls held longer than [`HOLD_LIMIT`] go out whatever the connections' state (a close
    /// that stalls, a dialer that never retires its relayed connection).
    fn release_overdue(&mut self, now: Instant) {
        let overdue: Vec<PeerId> = self
            .held
            .iter()
            .filter(|(_, (since, _))| now.duration_since(*since) >= HOLD_LIMIT)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in overdue {
            debug!(%peer, "held calls go out after {HOLD_LIMIT:?}");
            if !self.closing.contains_key(&peer) && !self.retire.contains_key(&peer) {
                self.unheld.insert(peer);
            }
            self.send_held(peer);
        }
    }

    /// Notes that `conn` of `peer` closed; once none of the peer's retired connections is
    /// left, the calls held for them go out (while the peer is still connected: held calls to
    /// a peer that went away fail with it).
    fn on_closed(&mut self, peer: PeerId, conn: ConnectionId) {
        if let Some(closing) = self.closing.get_mut(&peer) {
            closing.remove(&conn);
            if closing.is_empty() {
                self.closing.remove(&peer);
            }
        }
        if let Some(conns) = self.conns.get(&peer) {
            if !awaits_dialer(conns) {
                self.unheld.remove(&peer);
            }
            self.release_held(peer);
        }
    }

    /// Dials a fresh circuit to each peer whose re-punch is due, on the circuit its newest
    /// relayed connection was dialed on.
    fn repunch_due(&mut self, now: Instant) {
        use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
        let due: Vec<PeerId> = self
            .repunch
            .iter()
            .filter(|(_, r)| r.due(now))
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            let circuit = self.conns.get(&peer).and_then(newest_circuit).cloned();
            let Some(circuit) = circuit else {
                self.repunch.remove(&peer);
                continue;
            };
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::Always)
                .addresses(vec![circuit])
                .build();
            let conn = opts.connection_id();
            let Some(r) = self.repunch.get_mut(&peer) else {
                continue;
            };
            r.dialing(conn);
            info!(%peer, tries = r.tries(), "dialing a fresh relayed connection for another hole punch");
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, "re-punch dial failed: {e}");
                if let Some(r) = self.repunch.get_mut(&peer) {
                    r.dial_failed(conn, now);
                }
            }
        }
    }

    /// Stage calls in flight with `peer`, either way.
    fn in_flight(&self, peer: &PeerId) -> usize {
        self.pending.values().filter(|(p, _)| p == peer).count()
            + self.inbound.get(peer).copied().unwrap_or(0) as usize
    }

    /// Closes `peer`'s relayed connections if a direct one is open and no call is in flight.
    fn maybe_retire(&mut self, peer: &PeerId) {
        let Some(&after) = self.retire.get(peer) else {
            return;
        };
        if Instant::now() < after || self.in_flight(peer) > 0 {
            return;
        }
        self.retire.remove(peer);
        let Some(conns) = self.conns.get(peer) else {
            return;
        };
        for id in stale(conns) {
            debug!(%peer, "closing a relayed connection: a direct or newer one is open");
            if self.swarm.close_connection(id) {
                self.closing.entry(*peer).or_default().insert(id);
            }
        }
        self.release_held(*peer);
    }

    fn inbound_done(&mut self, peer: &PeerId) {
        if let Some(n) = self.inbound.get_mut(peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inbound.remove(peer);
            }
        }
        self.maybe_retire(peer);
    }

    /// A connected peer told us (identify) what it speaks: a relay is a NAT candidate.
    fn on_identified(&mut self, peer: PeerId, info: &identify::Info) {
        if !info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            return;
        }
        // An address known to work (we dialed it), else one it listens on.
        let dialed = self.conns.get(&peer).and_then(|c| {
            c.values()
                .filter(|c| !c.relayed)
                .find_map(|c| c.dialed.clone())
        });
        let addr = dialed.or_else(|| {
            info.listen_addrs
                .iter()
                .find(|a| !is_relayed(a) && !is_loopback(a))
                .cloned()
        });
        if let Some(addr) = addr {
            let actions = self.nat.on_relay_found(peer, addr, Instant::now());
            self.apply(actions);
        }
    }

    fn emit(&mut self, event: NetEvent) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            match event {
                NetEvent::Request { reply, .. } => {
                    let _ = self.swarm.behaviour_mut().stage.send_response(
                        reply.0,
                        Response::Error {
                            code: ErrorCode::Busy,
                            message: "the node's queue is full".into(),
                        },
                    );
                }
                other => debug!("event queue full, dropping {other:?}"),
            }
        }
    }

    /// Counts an offence by `peer`; past the limit it is disconnected and refused for a while.
    fn strike(&mut self, peer: PeerId, why: &str, severe: bool) {
        match self.strikes.strike(peer, severe, Instant::now()) {
            Verdict::Warned(strikes) => {
                warn!(%peer, strikes, "malformed input from peer: {why}");
            }
            Verdict::Banned(_) => {
                warn!(%peer, "malformed input from peer: {why}");
                warn!(%peer, "disconnecting and refusing peer for {:?}", self.config.ban);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Whether a relay should hand out `addr` as its own: concrete addresses, loopback only
    /// when every configured listen address is loopback (tests on one machine).
    fn public_candidate(&self, addr: &Multiaddr) -> bool {
        if is_relayed(addr) {
            return false;
        }
        !is_loopback(addr) || self.config.listen.iter().all(is_loopback)
    }

    fn is_banned(&mut self, peer: &PeerId) -> bool {
        self.strikes.is_banned(peer, Instant::now())
    }

    /// Remembers `addrs` for `peer` and, when it is not connected (and the target peer count
    /// is not reached), dials it on all of them at once: the first that connects wins. Dialing
    /// one address at a time let an unreachable first address (a home node's LAN or loopback
    /// address) hold up its relayed one until the next announcement, or for good.
    fn dial_if_new(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        for addr in &addrs {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
        if peer != *self.swarm.local_peer_id()
            && !addrs.is_empty()
            && !self.swarm.is_connected(&peer)
            && self.swarm.connected_peers().count() < TARGET_PEERS
            && !self.is_banned(&peer)
        {
            use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
            if !self.dialing.contains_key(&peer) && self.dialing.len() >= 4 * TARGET_PEERS {
                return;
            }
            let pending = self.dialing.entry(peer).or_default();
            let addrs: Vec<Multiaddr> =
                addrs.into_iter().filter(|a| !pending.contains(a)).collect();
            if addrs.is_empty() {
                return;
            }
            pending.extend(addrs.iter().cloned());
            // Not `DisconnectedAndNotDialing`: a dial already under way may be on the
            // unreachable addresses alone; only addresses not being dialed yet are tried.
            // From a fresh port, not the listening one: a dial to a NATed peer hangs until
            // its timeout, and were it bound to the listening port it would hold the very
            // address pair a hole punch then uses. The peer's punch then lands in this dial's
            // socket, both sides run the handshake as its initiator and fail, and the
            // sockets' TIME_WAIT spoils the re-punches on that pair for a minute.
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::Disconnected)
                .addresses(addrs)
                .allocate_new_port()
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, "dial failed: {e}");
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                let r = match &new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                info!(status = ?new, "AutoNAT");
                let actions = self.nat.on_reachability(r, Instant::now());
                self.apply(actions);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    info!(peer = %remote_peer_id, "hole punched: direct connection");
                    self.punched.insert(remote_peer_id);
                    self.repunch.remove(&remote_peer_id);
                }
                Err(e) => {
                    info!(peer = %remote_peer_id, "hole punch failed: {e}");
                    if let Some(r) = self.repunch.get_mut(&remote_peer_id) {
                        r.punch_failed(Instant::now());
                    }
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => match e {
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. } => {
                    info!(relay = %relay_peer_id, "relay reservation accepted");
                }
                other => debug!(?other, "relay client"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => debug!(?e, "relay server"),
            SwarmEvent::Behaviour(BehaviourEvent::Stage(e)) => self.on_stage_event(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                message,
                ..
            })) => self.emit(NetEvent::Announcement {
                source: message.source,
                data: message.data,
            }),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocol_version != behaviour::IDENTIFY_VERSION {
                    debug!(%peer_id, version = info.protocol_version, "not a plexus peer");
                    return;
                }
                self.on_identified(peer_id, &info);
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                addresses,
                ..
            })) => {
                self.dial_if_new(peer, addresses.into_vec());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.dial_if_new(peer, vec![addr]);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.rtts.insert(peer, rtt);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.dialing.remove(&peer_id);
                let relayed = endpoint.is_relayed();
                let dialed = match &endpoint {
                    libp2p::core::ConnectedPoint::Dialer { address, .. } => Some(address.clone()),
                    _ => None,
                };
                info!(
                    peer = %peer_id,
                    kind = if relayed { "relayed" } else { "direct" },
                    remote = %endpoint.get_remote_address(),
                    "connection established"
                );
                let conns = self.conns.entry(peer_id).or_default();
                let outbound = endpoint.is_dialer();
                conns.insert(
                    connection_id,
                    Conn {
                        relayed,
                        outbound,
                        dialed,
                    },
                );
                let circuit_only = newest_circuit(conns).is_some();
                if !stale(conns).is_empty() {
                    // The peer's calls sent on the relayed connection before it saw the direct
                    // one arrive within a one-way trip; they must be read (and counted) first.
                    let rtt = self.rtts.get(&peer_id).copied().unwrap_or_default();
                    let after = Instant::now() + RETIRE_GRACE.max(2 * rtt);
                    self.retire.entry(peer_id).or_insert(after);
                    self.maybe_retire(&peer_id);
                }
                if !relayed {
                    self.repunch.remove(&peer_id);
                } else if outbound && circuit_only {
                    let now = Instant::now();
                    self.repunch
                        .entry(peer_id)
                        .or_insert_with(|| Repunch::new(now))
                        .circuit_opened(now);
                }
                if self.is_banned(&peer_id) {
                    debug!(%peer_id, "refusing a banned peer");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                } else if num_established.get() == 1 {
                    self.emit(NetEvent::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(conns) = self.conns.get_mut(&peer_id) {
                    conns.remove(&connection_id);
                    if conns.is_empty() {
                        self.conns.remove(&peer_id);
                    }
                }
                if self.conns.get(&peer_id).is_none_or(|c| stale(c).is_empty()) {
                    // Nothing left to retire (the direct connection went first).
                    self.retire.remove(&peer_id);
                }
                if self.conns.get(&peer_id).and_then(newest_circuit).is_some() {
                    // The direct connection went: back to relayed only, re-punch again.
                    let now = Instant::now();
                    self.repunch
                        .entry(peer_id)
                        .or_insert_with(|| Repunch::new(now));
                }
                self.on_closed(peer_id, connection_id);
                if num_established == 0 {
                    self.rtts.remove(&peer_id);
                    self.repunch.remove(&peer_id);
                    self.closing.remove(&peer_id);
                    self.unheld.remove(&peer_id);
                    // Sending them would dial the peer again (a banned one too): they fail.
                    for (_, reply) in self.held.remove(&peer_id).map(|h| h.1).unwrap_or_default() {
                        let _ = reply.send(Err(CallError::ConnectionClosed(peer_id)));
                    }
                    self.inbound.remove(&peer_id);
                    self.punched.remove(&peer_id);
                    let actions = self.nat.on_disconnected(&peer_id, Instant::now());
                    self.apply(actions);
                    self.emit(NetEvent::Disconnected(peer_id));
                }
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if let Some(relay) = self.relay_listeners.get(&listener_id).copied() {
                    info!(%address, "listening through relay");
                    self.nat.on_listening(&relay);
                } else {
                    info!(%address, "listening");
                    if self.config.relay.is_some() && self.public_candidate(&address) {
                        // A relay's reservations hand out its external addresses.
                        self.swarm.add_external_address(address.clone());
                    }
                }
                self.emit(NetEvent::Listening(address));
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                connection_id,
                error,
            } => {
                debug!(peer = ?peer_id, "dial failed: {error}");
                if let Some(peer) = peer_id {
                    self.dialing.remove(&peer);
                    if let Some(r) = self.repunch.get_mut(&peer) {
                        r.dial_failed(connection_id, Instant::now());
                    }
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.emit(NetEvent::ListenExpired(address));
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                for a in addresses {
                    self.emit(NetEvent::ListenExpired(a));
                }
                if let Some(relay) = self.relay_listeners.remove(&listener_id) {
                    match reason {
                        Ok(()) => info!(%relay, "relayed listener closed"),
                        Err(e) => warn!(%relay, "relayed listener closed: {e}"),
                    }
                    let actions = self.nat.on_listener_closed(&relay, Instant::now());
                    self.apply(actions);
                }
            }
            _ => {}
        }
    }

    fn on_stage_event(
        &mut self,
        event: request_response::Event<
            Result<plexus_core::wire::Request, plexus_core::wire::DecodeError>,
            Response,
        >,
    ) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                Ok(request) => {
                    // Answered (or dropped) later: ResponseSent / InboundFailure count it down.
                    *self.inbound.entry(peer).or_default() += 1;
                    self.replies += 1;
                    let reply = Reply(channel, self.replies);
                    self.emit(NetEvent::Request {
                        peer,
                        request,
                        reply,
                    })
                }
                Err(e) => {
                    *self.inbound.entry(peer).or_default() += 1;
                    let _ = self.swarm.behaviour_mut().stage.send_response(
                        channel,
                        Response::Error {
                            code: ErrorCode::BadRequest,
                            message: e.to_string(),
                        },
                    );
                    // Announcing a frame over the limit is never an honest mistake.
                    let severe = matches!(e, DecodeError::TooLarge(_));
                    self.strike(peer, &e.to_string(), severe);
                }
            },
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((_, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
                self.maybe_retire(&peer);
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let error = match error {
                    OutboundFailure::DialFailure => CallError::Unreachable(peer),
                    OutboundFailure::Timeout => CallError::Timeout(peer),
                    OutboundFailure::ConnectionClosed => CallError::ConnectionClosed(peer),
                    OutboundFailure::UnsupportedProtocols => CallError::Unsupported(peer),
                    OutboundFailure::Io(e) => CallError::Io {
                        peer,
                        message: e.to_string(),
                    },
                };
                if let Some((_, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(error));
                }
                self.maybe_retire(&peer);
            }
            // Streams that end early or stall are dropped without an event from libp2p; the
            // rest (a response that could not be written) are the peer's loss, not an offence.
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound stage call failed: {error}");
                self.inbound_done(&peer);
            }
            request_response::Event::ResponseSent { peer, .. } => self.inbound_done(&peer),
        }
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(relayed: bool, outbound: bool) -> Conn {
        Conn {
            relayed,
            outbound,
            dialed: None,
        }
    }

    fn conns(list: &[(usize, Conn)]) -> HashMap<ConnectionId, Conn> {
        list.iter()
            .map(|(id, c)| (ConnectionId::new_unchecked(*id), c.clone()))
            .collect()
    }

    fn ids(mut v: Vec<ConnectionId>) -> Vec<ConnectionId> {
        v.sort_unstable();
        v
    }

    #[test]
    fn relayed_connections_this_side_dialed_go_once_a_direct_one_is_open() {
        let c = conns(&[
            (1, conn(true, true)),
            (2, conn(true, false)),
            (3, conn(false, false)),
        ]);
        // The inbound relayed one is its dialer's to close.
        assert_eq!(stale(&c), vec![ConnectionId::new_unchecked(1)]);
        let c = conns(&[(1, conn(true, true)), (2, conn(true, true))]);
        let c2 = conns(&[
            (1, conn(true, true)),
            (2, conn(true, true)),
            (3, conn(false, true)),
        ]);
        // Without a direct one the newest relayed one stays (a re-punch's fresh circuit).
        assert_eq!(stale(&c), vec![ConnectionId::new_unchecked(1)]);
        assert_eq!(
            ids(stale(&c2)),
            vec![
                ConnectionId::new_unchecked(1),
                ConnectionId::new_unchecked(2)
            ]
        );
        assert!(stale(&conns(&[(1, conn(true, true))])).is_empty());
    }

    #[test]
    fn the_listener_waits_for_its_dialer_to_close_a_relayed_connection_it_superseded() {
        // Beside a direct connection, or beside a newer circuit of the same dialer.
        assert!(awaits_dialer(&conns(&[
            (1, conn(true, false)),
            (2, conn(false, true))
        ])));
        assert!(awaits_dialer(&conns(&[
            (1, conn(true, false)),
            (2, conn(true, false))
        ])));
        // Alone, or dialed by this side (then this side retires it), nothing to wait for.
        assert!(!awaits_dialer(&conns(&[(1, conn(true, false))])));
        assert!(!awaits_dialer(&conns(&[
            (1, conn(true, true)),
            (2, conn(false, true))
        ])));
        assert!(!awaits_dialer(&conns(&[(1, conn(false, false))])));
        assert!(stale(&conns(&[(1, conn(true, false)), (2, conn(false, true))])).is_empty());
    }
}
