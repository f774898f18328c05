//! Plexus networking on rust-libp2p: one swarm per process, owned by a [`actor::NetActor`]
//! task; everything else holds a cloneable [`NetHandle`] and reads [`NetEvent`]s.
//!
//! ```text
//!  NetHandle ──Command──▶ NetActor (owns the Swarm) ──NetEvent──▶ node / gateway
//!      ▲                        │
//!      └──── oneshot replies ◀──┘
//! ```
//!
//! Transports: TCP and QUIC, noise, yamux, and circuit relay v2 (dialing and listening through
//! relays). Discovery: Kademlia from bootstrap peers, identify, optional mDNS. Announcements
//! ride gossipsub; stage calls are request/response streams with length-prefixed frames
//! ([`codec`]). Every channel is bounded; peers that send malformed frames are answered
//! `BadRequest`, then disconnected and refused for a while ([`strikes`]).
//!
//! NAT: AutoNAT tells a node whether it can be dialed; one that cannot (or is told to with
//! [`NetConfig::relay_via`]) listens through relays ([`nat`]), and DCUtR upgrades relayed
//! connections to direct ones where a hole can be punched. A node started with
//! [`NetConfig::relay`] serves as a relay for others, within [`RelayLimits`].

pub mod actor;
pub mod behaviour;
pub mod codec;
pub mod nat;
pub mod repunch;
pub mod strikes;

pub use codec::WireCounters;
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};

use libp2p::request_response::ResponseChannel;
use plexus_core::keys::NodeKey;
use plexus_core::wire::{Request, Response};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How to run the network side of a process.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub key: NodeKey,
    /// Addresses to listen on. Default: TCP and QUIC on all interfaces, ports chosen by the OS.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through (`/ip4/.../tcp/.../p2p/<peer id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Accept stage calls (a node) or only make them (a gateway).
    pub serve: bool,
    /// How long a stage call may take before it fails.
    pub request_timeout: Duration,
    /// Concurrent inbound plus outbound stage streams per connection.
    pub max_streams: usize,
    /// Established connections in total.
    pub max_connections: u32,
    /// Malformed frames a peer may send before it is disconnected and refused.
    pub max_strikes: u32,
    /// How long a disconnected offender stays refused.
    pub ban: Duration,
    /// Serve as a circuit relay v2 for peers that cannot be dialed, within these bounds
    /// (`plexus node --relay`). The node's listen addresses count as publicly reachable.
    pub relay: Option<RelayLimits>,
    /// Relays to listen through whatever AutoNAT says (`--relay-via`), each ending in
    /// `/p2p/<relay peer id>`.
    pub relay_via: Vec<Multiaddr>,
    /// Relays picked among connected ones while AutoNAT says this node is private (serving
    /// nodes only; a gateway dials out and needs none).
    pub max_auto_relays: usize,
}

/// Bounds of a relay server: what one node lends to peers behind NAT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    /// Peers holding a reservation (a relayed listen address) at once.
    pub max_reservations: usize,
    /// Relayed connections at once, in total and per peer (either end).
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    /// A relayed connection is closed after this long...
    pub max_circuit_duration: Duration,
    /// ...or after this many bytes (both directions); the peers dial again, directly if DCUtR
    /// punched a hole meanwhile.
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_circuits: 64,
            max_circuits_per_peer: 8,
            max_circuit_duration: Duration::from_secs(600),
            max_circuit_bytes: 256 << 20,
        }
    }
}

impl NetConfig {
    pub fn new(key: NodeKey) -> Self {
        Self {
            key,
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("valid multiaddr"),
            ],
            bootstrap: Vec::new(),
            mdns: false,
            serve: true,
            request_timeout: Duration::from_secs(60),
            max_streams: 64,
            max_connections: 256,
            max_strikes: 3,
            ban: Duration::from_secs(60),
            relay: None,
            relay_via: Vec::new(),
            max_auto_relays: 2,
        }
    }

    /// Serve as a relay within `limits` (`None`: do not relay).
    pub fn with_relay(mut self, limits: Option<RelayLimits>) -> Self {
        self.relay = limits;
        self
    }

    /// Listen through these relays whatever AutoNAT says.
    pub fn with_relay_via(mut self, via: Vec<Multiaddr>) -> Self {
        self.relay_via = via;
        self
    }

    pub fn with_listen(mut self, listen: Vec<Multiaddr>) -> Self {
        self.listen = listen;
        self
    }

    pub fn with_bootstrap(mut self, bootstrap: Vec<Multiaddr>) -> Self {
        self.bootstrap = bootstrap;
        self
    }

    pub fn with_mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }

    pub fn with_serve(mut self, serve: bool) -> Self {
        self.serve = serve;
        self
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// What the network tells its owner.
#[derive(Debug)]
pub enum NetEvent {
    /// A well-formed stage call; answer it with [`NetHandle::respond`].
    Request {
        peer: PeerId,
        request: Request,
        reply: Reply,
    },
    /// Bytes published on the announcement topic by `source` (not yet verified).
    Announcement {
        source: Option<PeerId>,
        data: Vec<u8>,
    },
    Connected(PeerId),
    Disconnected(PeerId),
    Listening(Multiaddr),
    /// An address this process listened on is gone (a relay reservation lost, an interface
    /// down): stop announcing it.
    ListenExpired(Multiaddr),
}

/// Where the answer to an inbound stage call goes.
#[derive(Debug)]
pub struct Reply(pub(crate) ResponseChannel<Response>, pub(crate) u64);

impl Reply {
    /// A number unique to this call within the process (the owner matches what it learnt when
    /// the call arrived, such as a receipt to sign, with the answer the engine gives later).
    pub fn id(&self) -> u64 {
        self.1
    }
}

impl Reply {
    /// Whether the caller still waits for the answer (`false` once its stream closed: the
    /// engine drops the work of a caller that went away).
    pub fn is_open(&self) -> bool {
        self.0.is_open()
    }
}

/// Why a stage call failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("cannot reach peer {0}")]
    Unreachable(PeerId),
    #[error("peer {0} did not answer in time")]
    Timeout(PeerId),
    #[error("the connection to {0} closed")]
    ConnectionClosed(PeerId),
    #[error("peer {0} does not serve stage calls")]
    Unsupported(PeerId),
    #[error("stream to {peer} failed: {message}")]
    Io { peer: PeerId, message: String },
    #[error("the network task has stopped")]
    Stopped,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no peer subscribes to announcements yet")]
    NoPeers,
    #[error("publish failed: {0}")]
    Other(String),
    #[error("the network task has stopped")]
    Stopped,
}

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartNetError {
    #[error("cannot build the libp2p behaviour: {0}")]
    Behaviour(String),
    #[error("cannot set up transports: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: Multiaddr, message: String },
    #[error(transparent)]
    Relay(#[from] nat::RelayAddrError),
}

/// How this process is connected to one peer ([`NetHandle::links`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub peer: PeerId,
    /// Open connections that go straight to the peer.
    pub direct: usize,
    /// Open connections through a relay.
    pub relayed: usize,
    /// DCUtR upgraded a relayed connection to this peer to a direct one.
    pub hole_punched: bool,
}

/// What this process knows of its own reachability ([`NetHandle::nat`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatStatus {
    pub reachability: nat::Reachability,
    /// Relays holding a reservation for this process.
    pub relays: Vec<PeerId>,
}

pub(crate) enum Command {
    Call {
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, CallError>>,
    },
    Respond {
        reply: Reply,
        response: Response,
    },
    Publish {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), PublishError>>,
    },
    Dial(Multiaddr),
    AddAddresses(PeerId, Vec<Multiaddr>),
    Disconnect(PeerId),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Connected(oneshot::Sender<Vec<PeerId>>),
    Rtt(PeerId, oneshot::Sender<Option<Duration>>),
    Links(oneshot::Sender<Vec<Link>>),
    Nat(oneshot::Sender<NatStatus>),
}

/// A cloneable handle to the network task. Every method is cancel-safe: dropping a call's
/// future abandons the wait (the peer may still process the request).
#[derive(Clone)]
pub struct NetHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) peer_id: PeerId,
    pub(crate) counters: Arc<WireCounters>,
}

impl NetHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Bytes on stage streams so far.
    pub fn counters(&self) -> &WireCounters {
        &self.counters
    }

    /// Sends a stage call and waits for the answer.
    pub async fn call(&self, peer: PeerId, request: Request) -> Result<Response, CallError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Call {
                peer,
                request,
                reply: tx,
            })
            .await
            .map_err(|_| CallError::Stopped)?;
        rx.await.map_err(|_| CallError::Stopped)?
    }

    /// Answers an inbound stage call.
    pub async fn respond(&self, reply: Reply, response: Response) {
        let _ = self
            .commands
            .send(Command::Respond { reply, response })
            .await;
    }

    /// Publishes bytes on the announcement topic.
    pub async fn publish(&self, data: Vec<u8>) -> Result<(), PublishError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Publish { data, reply: tx })
            .await
            .map_err(|_| PublishError::Stopped)?;
        rx.await.map_err(|_| PublishError::Stopped)?
    }

    pub async fn dial(&self, addr: Multiaddr) {
        let _ = self.commands.send(Command::Dial(addr)).await;
    }

    /// Remembers an address of `peer` (from its announcement) so calls can reach it, and
    /// connects to the peer if not connected yet (bounded by the target peer count).
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) {
        self.add_addresses(peer, vec![addr]).await;
    }

    /// [`NetHandle::add_address`] for every address `peer` announced at once: one dial tries
    /// them all (a node behind NAT announces unreachable direct addresses beside its relayed
    /// one, and the relayed one must not wait for those to fail).
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if addrs.is_empty() {
            return;
        }
        let _ = self.commands.send(Command::AddAddresses(peer, addrs)).await;
    }

    pub async fn disconnect(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Disconnect(peer)).await;
    }

    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::ListenAddrs(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub async fn connected_peers(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Connected(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The latest ping round trip to `peer`.
    pub async fn rtt(&self, peer: PeerId) -> Option<Duration> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Rtt(peer, tx)).await.ok()?;
        rx.await.ok().flatten()
    }
}

impl NetHandle {
    /// How this process is connected to each peer: directly, through a relay, hole-punched.
    pub async fn links(&self) -> Vec<Link> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Links(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// AutoNAT's verdict and the relays this process listens through.
    pub async fn nat(&self) -> Option<NatStatus> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Nat(tx)).await.ok()?;
        rx.await.ok()
    }
}

/// Starts the network task on the current tokio runtime.
pub fn start(config: NetConfig) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), StartNetError> {
    actor::NetActor::start(config)
}
