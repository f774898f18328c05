//! The composed libp2p behaviour of a Plexus peer.
//!
//! - `stage`: request/response stage calls ([`crate::codec::StageCodec`]).
//! - `gossip`: gossipsub, topic [`ANNOUNCE_TOPIC`]: signed announcements.
//! - `kad`: Kademlia peer routing from bootstrap peers; `identify` feeds it addresses.
//! - `mdns`: LAN discovery (optional); `ping`: round-trip times for routing;
//!   `limits`: caps on connections, so a flood of dials cannot exhaust the node.
//! - `relay_client`: dial and listen through circuit relay v2; `relay`: serve as a relay
//!   (optional, bounded by [`crate::RelayLimits`]); `autonat`: learn whether this node can be
//!   dialed; `dcutr`: upgrade relayed connections to direct ones (hole punching).

use crate::codec::StageCodec;
use crate::RelayLimits;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, ping, relay,
    request_response, StreamProtocol,
};
use plexus_core::wire::STAGE_PROTOCOL;
use std::time::Duration;

/// The gossipsub topic of announcements.
pub const ANNOUNCE_TOPIC: &str = "plexus/announce/1";
/// The identify protocol version; peers with another major version are not ours.
pub const IDENTIFY_VERSION: &str = "/plexus/1.0.0";
const KAD_PROTOCOL: &str = "/plexus/kad/1.0.0";
/// How long an AutoNAT probe may take, on the client and on the server: a dial-back to two or
/// three silent addresses, one after another (see [`build`]).
const AUTONAT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub limits: connection_limits::Behaviour,
    pub stage: request_response::Behaviour<StageCodec>,
    pub gossip: gossipsub::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub relay_client: relay::client::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
    pub autonat: autonat::Behaviour,
    pub dcutr: dcutr::Behaviour,
}

/// Settings the behaviour is built from (a subset of [`crate::NetConfig`]).
pub(crate) struct BehaviourSettings {
    pub serve: bool,
    pub mdns: bool,
    pub request_timeout: Duration,
    pub max_streams: usize,
    pub max_connections: u32,
    pub codec: StageCodec,
    pub relay: Option<RelayLimits>,
}

pub(crate) fn build(
    key: &libp2p::identity::Keypair,
    relay_client: relay::client::Behaviour,
    s: BehaviourSettings,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let support = if s.serve {
        request_response::ProtocolSupport::Full
    } else {
        request_response::ProtocolSupport::Outbound
    };
    let stage = request_response::Behaviour::with_codec(
        s.codec,
        [(StreamProtocol::new(STAGE_PROTOCOL), support)],
        request_response::Config::default()
            .with_request_timeout(s.request_timeout)
            .with_max_concurrent_streams(s.max_streams),
    );
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .max_transmit_size(plexus_core::announce::MAX_ANNOUNCEMENT_BYTES + 1024)
        // Small networks: publish to every subscribed peer, not just the mesh.
        .flood_publish(true)
        .build()?;
    let mut gossip = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_config,
    )?;
    gossip.subscribe(&gossipsub::IdentTopic::new(ANNOUNCE_TOPIC))?;
    let mut kad = kad::Behaviour::with_config(
        peer_id,
        kad::store::MemoryStore::new(peer_id),
        kad::Config::new(StreamProtocol::new(KAD_PROTOCOL)),
    );
    kad.set_mode(Some(if s.serve {
        kad::Mode::Server
    } else {
        kad::Mode::Client
    }));
    let identify = identify::Behaviour::new(identify::Config::new(
        IDENTIFY_VERSION.to_string(),
        key.public(),
    ));
    let ping = ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5)));
    let mdns = if s.mdns {
        Some(mdns::tokio::Behaviour::new(
            mdns::Config::default(),
            peer_id,
        )?)
    } else {
        None
    };
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(s.max_connections))
            .with_max_established_per_peer(Some(4))
            .with_max_pending_incoming(Some(64)),
    );
    let relay = s.relay.map(|l| {
        let mut server = relay::Behaviour::new(
            peer_id,
            relay::Config {
                max_reservations: l.max_reservations,
                max_circuits: l.max_circuits,
                max_circuits_per_peer: l.max_circuits_per_peer,
                max_circuit_duration: l.max_circuit_duration,
                max_circuit_bytes: l.max_circuit_bytes,
                ..relay::Config::default()
            },
        );
        // The operator says this node is reachable (`--relay`): advertise the hop protocol
        // without waiting for AutoNAT to confirm an address.
        server.set_status(Some(relay::Status::Enable));
        server
    });
    // Quick verdicts: a node learns within seconds of joining whether it needs a relay.
    // Servers dial back only the IP they saw the client at (never a third party), so private
    // addresses are allowed (home networks and test namespaces use them).
    //
    // The timeout bounds both sides of a probe, and must outlast the server's dial-back: it
    // dials the client's addresses one at a time, and behind a NAT that drops packets silently
    // each one fails only when the swarm's connection timeout (10 s) or QUIC's handshake
    // timeout (5 s) runs out. With 10 s here the server gave up on the request before its own
    // dial failed, so a private verdict came only when a late dial error happened to meet the
    // next probe: 6 s to over 70 s on a busy machine.
    let autonat = autonat::Behaviour::new(
        peer_id,
        autonat::Config {
            boot_delay: Duration::from_secs(1),
            retry_interval: Duration::from_secs(5),
            refresh_interval: Duration::from_secs(60),
            throttle_server_period: Duration::from_secs(5),
            timeout: AUTONAT_TIMEOUT,
            // Dialed back one at a time, each up to 10 s: three keep a probe inside the timeout.
            max_peer_addresses: 3,
            only_global_ips: false,
            ..autonat::Config::default()
        },
    );
    Ok(Behaviour {
        limits,
        stage,
        gossip,
        kad,
        identify,
        ping,
        mdns: Toggle::from(mdns),
        relay_client,
        relay: Toggle::from(relay),
        autonat,
        dcutr: dcutr::Behaviour::new(peer_id),
    })
}
