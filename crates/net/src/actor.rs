//! The task that owns the swarm: turns [`Command`]s into swarm calls and swarm events into
//! [`NetEvent`]s, keeps round-trip times, and polices peers that send malformed frames.

use crate::behaviour::{self, Behaviour, BehaviourEvent, BehaviourSettings, ANNOUNCE_TOPIC};
use crate::codec::StageCodec;
use crate::strikes::{Strikes, Verdict};
use crate::{
    CallError, Command, NetConfig, NetEvent, NetHandle, PublishError, Reply, StartNetError,
};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, kad, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, Swarm};
use plexus_core::wire::{DecodeError, ErrorCode, Response};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

const COMMAND_QUEUE: usize = 256;
const EVENT_QUEUE: usize = 256;
/// Connected peers beyond which discovery stops dialing new ones.
const TARGET_PEERS: usize = 64;

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
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
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
        };
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(config.key.keypair().clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| StartNetError::Transport(e.to_string()))?
            .with_quic()
            .with_behaviour(|key| behaviour::build(key, settings))
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
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
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
                let id = self
                    .swarm
                    .behaviour_mut()
                    .stage
                    .send_request(&peer, Ok(request));
                self.pending.insert(id, (peer, reply));
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
            Command::AddAddress(peer, addr) => {
                self.swarm.add_peer_address(peer, addr.clone());
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
                // Connect to announced peers directly (bounded by TARGET_PEERS): gossip
                // relayed through a third node dies with it, and a direct connection is how
                // a peer's death is noticed at once (its announcement would linger for its
                // TTL otherwise).
                if peer != *self.swarm.local_peer_id()
                    && !self.swarm.is_connected(&peer)
                    && self.swarm.connected_peers().count() < TARGET_PEERS
                    && !self.is_banned(&peer)
                {
                    use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
                    let opts = DialOpts::peer_id(peer)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .addresses(vec![addr])
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%peer, "dial failed: {e}");
                    }
                }
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

    fn is_banned(&mut self, peer: &PeerId) -> bool {
        self.strikes.is_banned(peer, Instant::now())
    }

    fn dial_if_new(&mut self, peer: PeerId, addr: Multiaddr) {
        self.swarm
            .behaviour_mut()
            .kad
            .add_address(&peer, addr.clone());
        if peer != *self.swarm.local_peer_id()
            && !self.swarm.is_connected(&peer)
            && self.swarm.connected_peers().count() < TARGET_PEERS
            && !self.is_banned(&peer)
        {
            let _ = self.swarm.dial(addr);
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
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
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                addresses,
                ..
            })) => {
                if let Some(addr) = addresses.iter().next().cloned() {
                    self.dial_if_new(peer, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.dial_if_new(peer, addr);
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
                num_established,
                ..
            } => {
                if self.is_banned(&peer_id) {
                    debug!(%peer_id, "refusing a banned peer");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                } else if num_established.get() == 1 {
                    self.emit(NetEvent::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.rtts.remove(&peer_id);
                self.emit(NetEvent::Disconnected(peer_id));
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.emit(NetEvent::Listening(address));
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
                    self.replies += 1;
                    let reply = Reply(channel, self.replies);
                    self.emit(NetEvent::Request {
                        peer,
                        request,
                        reply,
                    })
                }
                Err(e) => {
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
            }
            // Streams that end early or stall are dropped without an event from libp2p; the
            // rest (a response that could not be written) are the peer's loss, not an offence.
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound stage call failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}
