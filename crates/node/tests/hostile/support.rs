//! The harness of the hostile-input tests: a real [`Node`] on loopback serving a tiny
//! random-weight model, the attackers (a raw-bytes stage client and a gossip publisher), a
//! well-behaved caller, the local reference the answers are checked against, and a log capture.
//!
//! Every wait is on an event (a swarm event, a channel, a log line) under a deadline.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, noise, request_response, tcp, yamux, StreamProtocol, Swarm};
use plexus_core::announce::{Announcement, ModelOffer};
use plexus_core::keys::NodeKey;
use plexus_core::wire::{
    decode_response, frame_len, Activations, DType, DecodeError, Forward, Request, Response,
    SessionId, STAGE_PROTOCOL,
};
use plexus_core::Digest;
use plexus_model::generate::{
    generate, generate_with, Flow, GenerateRequest, LocalChain, TokenChain,
};
use plexus_model::{
    LayerSpan, LoadedModel, Logits, SamplingParams, Stage, StageInput, StageOutput,
};
use plexus_net::{Multiaddr, NetConfig, NetEvent, NetHandle, PeerId};
use plexus_node::client::{ClientConfig, NetworkClient};
use plexus_node::directory::Directory;
use plexus_node::discovery::{now_ms, DiscoveryCounters};
use plexus_node::{Node, NodeConfig};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Most any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// Fails the test if `fut` takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

// ---------------------------------------------------------------------------------------------
// Logs: every line goes to stderr (shown when a test fails) and into a buffer tests can wait on.

pub struct Logs {
    text: Mutex<String>,
    lines: watch::Sender<usize>,
}

#[derive(Clone)]
struct LogSink(Arc<Logs>);

impl io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let s = String::from_utf8_lossy(buf);
        eprint!("{s}");
        self.0.text.lock().unwrap().push_str(&s);
        self.0.lines.send_modify(|n| *n += 1);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;
    fn make_writer(&'a self) -> LogSink {
        self.clone()
    }
}

/// The process-wide log capture (installed on first use).
pub fn logs() -> Arc<Logs> {
    static LOGS: OnceLock<Arc<Logs>> = OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let logs = Arc::new(Logs {
            text: Mutex::new(String::new()),
            lines: watch::channel(0).0,
        });
        // RUST_LOG adds directives (e.g. `libp2p_request_response=debug`) to the defaults.
        let extra = std::env::var("RUST_LOG").unwrap_or_default();
        let filter = tracing_subscriber::EnvFilter::new(format!(
            "warn,plexus_net=debug,plexus_node=debug,libp2p_request_response=error,libp2p_request_response::handler=warn,{extra}"
        ));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(LogSink(Arc::clone(&logs)))
            .try_init();
        logs
    }))
}

impl Logs {
    /// Whether some line contains every one of `parts`.
    pub fn has_line(&self, parts: &[&str]) -> bool {
        self.text
            .lock()
            .unwrap()
            .lines()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }

    /// Waits until some line contains every one of `parts`.
    pub async fn wait_for(&self, parts: &[&str]) {
        let mut rx = self.lines.subscribe();
        within(WAIT, &format!("a log line with {parts:?}"), async {
            while !self.has_line(parts) {
                rx.changed().await.unwrap();
            }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The node and the reference.

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Tiny llama (2 layers, hidden 64, vocab 400, context 256) with Q4_1 weights, so the
/// quantized kernels see whatever the attackers send.
pub fn model_path() -> PathBuf {
    workspace().join("tests/fixtures/tiny/llama2/model-q4_1.gguf")
}

pub const LAYERS: usize = 2;
pub const HIDDEN: usize = 64;
pub const VOCAB: u32 = 400;
pub const CONTEXT: usize = 256;

/// A node running in this process until [`TestNode::stop`] or drop.
pub struct TestNode {
    pub peer: PeerId,
    /// Its TCP address with the `/p2p/` suffix.
    pub addr: Multiaddr,
    pub model: Digest,
    pub span: LayerSpan,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub counters: Arc<DiscoveryCounters>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), plexus_node::service::RunNodeError>>>,
    _cache: tempfile::TempDir,
}

/// Starts a node serving `span` (the whole model if `None`) on 127.0.0.1; `tweak` adjusts its
/// config (ban length, strikes, timeouts) first.
pub async fn start_node(span: Option<LayerSpan>, tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
    logs();
    let cache = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(model_path(), NodeKey::generate());
    config.span = span;
    config.cache_dir = Some(cache.path().to_path_buf());
    config.net = config
        .net
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]);
    tweak(&mut config);
    let node = within(WAIT, "node start", Node::start(config))
        .await
        .unwrap();
    let addr = node
        .listen_addrs()
        .into_iter()
        .next()
        .expect("the node listens");
    let (stop, stopped) = oneshot::channel::<()>();
    let mut out = TestNode {
        peer: node.peer_id(),
        addr,
        model: node.served().model,
        span: node.served().stage.span(),
        directory: node.directory(),
        counters: node.discovery_counters(),
        stop: Some(stop),
        task: None,
        _cache: cache,
    };
    out.task = Some(tokio::spawn(node.run(async move {
        let _ = stopped.await;
    })));
    out
}

impl TestNode {
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    pub fn ignored(&self) -> u64 {
        self.counters.ignored.load(Ordering::Relaxed)
    }

    pub fn knows(&self, peer: &PeerId) -> bool {
        self.directory.borrow().get(peer).is_some()
    }

    /// Stops the node and waits for its task: a panic inside it fails the test here.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            within(WAIT, "node shutdown", task)
                .await
                .expect("the node task panicked")
                .expect("the node stopped serving");
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The same model in this process: what a correct node answers.
pub struct Reference {
    pub model: LoadedModel,
    pub first: Stage,
}

impl Reference {
    pub fn load() -> Self {
        let model = plexus_model::load(&model_path()).unwrap();
        let first = plexus_model::ModelFiles::open(&model_path())
            .unwrap()
            .stage(
                Some(LayerSpan::new(0, 1)),
                plexus_model::layers::Mode::Infer,
            )
            .unwrap();
        Self { model, first }
    }

    /// The greedy token after `tokens`.
    pub fn next_token(&self, tokens: &[u32]) -> u32 {
        let stages = std::slice::from_ref(&self.model.stage);
        LocalChain::new(stages, SamplingParams::greedy())
            .feed(tokens)
            .unwrap()
    }

    /// Layer 0's output for `tokens` (what a stage serving 1..2 is fed).
    pub fn hidden_after_first(&self, tokens: &[u32]) -> Vec<f32> {
        let mut cache = self.first.new_cache();
        match self
            .first
            .forward(StageInput::Tokens(tokens), &mut cache, Logits::Last)
            .unwrap()
        {
            StageOutput::Hidden(h) => h.flatten_all().unwrap().to_vec1().unwrap(),
            StageOutput::Logits(_) => unreachable!("stage 0..1 is not the last"),
        }
    }

    /// A greedy generation in this process.
    pub fn generate(&self, req: &GenerateRequest) -> Vec<u32> {
        generate(
            std::slice::from_ref(&self.model.stage),
            &self.model.tokenizer,
            req,
            |_| Flow::Continue,
        )
        .unwrap()
        .tokens
    }
}

pub const PROMPT: [u32; 6] = [0, 17, 42, 99, 123, 7];

pub fn greedy_request() -> GenerateRequest {
    GenerateRequest {
        prompt_tokens: PROMPT.to_vec(),
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
    }
}

/// A fresh client joins, finds a chain through `nodes` and generates through it exactly what
/// the model generates in this process: the nodes still serve, and serve correctly.
pub async fn assert_serves(nodes: &[&TestNode], reference: &Reference) {
    let net = NetConfig::new(NodeKey::generate())
        .with_listen(Vec::new())
        .with_bootstrap(nodes.iter().map(|n| n.addr.clone()).collect());
    let node = nodes[0];
    let client = NetworkClient::start(ClientConfig::new(net)).unwrap();
    assert!(
        client.wait_for_route(&node.model, LAYERS, WAIT).await,
        "the node did not announce a route to its client"
    );
    let req = greedy_request();
    let want = reference.generate(&req);
    let tokenizer = reference.model.tokenizer.clone();
    let model = node.model;
    let got = within(
        WAIT,
        "a generation through the node",
        tokio::task::spawn_blocking(move || {
            let mut chain = client
                .open_chain(model, LAYERS, CONTEXT, req.sampling.clone())
                .unwrap();
            generate_with(&mut chain, &tokenizer, &req, |_| Flow::Continue)
                .unwrap()
                .tokens
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        got, want,
        "the node's generation differs from the local one"
    );
}

// ---------------------------------------------------------------------------------------------
// A well-behaved caller: a plexus_net handle that only makes stage calls.

pub struct Caller {
    pub handle: NetHandle,
    pub node: PeerId,
}

pub async fn caller(node: &TestNode) -> Caller {
    let (handle, mut events) = plexus_net::start(
        NetConfig::new(NodeKey::generate())
            .with_listen(Vec::new())
            .with_serve(false)
            .with_request_timeout(Duration::from_secs(20))
            .with_bootstrap(vec![node.addr.clone()]),
    )
    .unwrap();
    let peer = node.peer;
    within(WAIT, "the caller connects", async {
        loop {
            match events.recv().await {
                Some(NetEvent::Connected(p)) if p == peer => break,
                Some(_) => {}
                None => panic!("the caller's network stopped"),
            }
        }
    })
    .await;
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    Caller { handle, node: peer }
}

impl Caller {
    /// The node's answer without its receipt (see [`Caller::call_receipted`]).
    pub async fn call(&self, request: Request) -> Response {
        self.call_receipted(request).await.into_parts().0
    }

    /// The node's answer as it came, receipt included.
    pub async fn call_receipted(&self, request: Request) -> Response {
        within(WAIT, "a stage call", self.handle.call(self.node, request))
            .await
            .expect("the call fails at the transport")
    }

    pub async fn forward(&self, f: Forward) -> Response {
        self.call(Request::Forward(f)).await
    }
}

pub fn session(n: u8) -> SessionId {
    SessionId([n; 16])
}

/// A well-formed Forward for `node`: token ids for a first stage, layer 0's output otherwise.
pub fn forward(
    node: &TestNode,
    reference: &Reference,
    session: SessionId,
    position: u32,
    tokens: &[u32],
) -> Forward {
    let hidden = (node.span.start > 0).then(|| {
        Activations::encode(
            &reference.hidden_after_first(tokens),
            tokens.len(),
            HIDDEN,
            DType::F32,
        )
    });
    Forward {
        session,
        model: node.model,
        start: node.span.start as u32,
        end: node.span.end as u32,
        position,
        tokens: tokens.to_vec(),
        hidden,
        chunks: Vec::new(),
        sampling: (node.span.end == LAYERS).then(|| Box::new(SamplingParams::greedy())),
        reply_dtype: DType::F32,
        all_rows: false,
        prompt_len: 0,
    }
}

#[track_caller]
pub fn assert_error(resp: &Response, want: plexus_core::wire::ErrorCode) {
    match resp {
        Response::Error { code, .. } if *code == want => {}
        other => panic!("expected a {want:?} error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The raw attacker: request/response on the stage protocol with a codec that sends whatever
// bytes it is given (length prefix included) and returns whatever bytes come back.

/// Bytes to write on one stream, then wait `stall` before closing the write side.
#[derive(Clone, Debug)]
pub struct RawFrame {
    pub bytes: Vec<u8>,
    pub stall: Duration,
}

impl RawFrame {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            stall: Duration::ZERO,
        }
    }

    /// A well-framed body.
    pub fn body(body: &[u8]) -> Self {
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        Self::new(bytes)
    }
}

#[derive(Clone, Default)]
pub struct RawCodec;

const RAW_READ_LIMIT: u64 = 64 << 20;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = RawFrame;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<RawFrame> {
        let mut bytes = Vec::new();
        io.take(RAW_READ_LIMIT).read_to_end(&mut bytes).await?;
        Ok(RawFrame::new(bytes))
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        io.take(RAW_READ_LIMIT).read_to_end(&mut bytes).await?;
        Ok(bytes)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        frame: RawFrame,
    ) -> io::Result<()> {
        io.write_all(&frame.bytes).await?;
        io.flush().await?;
        if !frame.stall.is_zero() {
            tokio::time::sleep(frame.stall).await;
        }
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        bytes: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&bytes).await?;
        io.close().await
    }
}

/// What came back for one raw call.
#[derive(Debug)]
pub enum RawReply {
    /// The bytes the node wrote before closing the stream (empty: it closed without answering).
    Bytes(Vec<u8>),
    /// The stream or connection failed (the reason shows in assertion messages).
    Failed(#[allow(dead_code)] String),
}

impl RawReply {
    /// The node's answer (without its receipt), if it wrote a whole frame.
    pub fn response(&self) -> Option<Result<Response, DecodeError>> {
        let RawReply::Bytes(b) = self else {
            return None;
        };
        let len = frame_len(b.get(..4)?.try_into().ok()?).ok()?;
        let body = b.get(4..4 + len)?;
        Some(decode_response(body).map(|r| r.into_parts().0))
    }

    /// The node answered `BadRequest`.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self.response(),
            Some(Ok(Response::Error {
                code: plexus_core::wire::ErrorCode::BadRequest,
                ..
            }))
        )
    }
}

pub struct RawPeer {
    pub swarm: Swarm<request_response::Behaviour<RawCodec>>,
    connections: HashMap<PeerId, usize>,
    replies: HashMap<OutboundRequestId, RawReply>,
}

fn tcp_swarm<B: libp2p::swarm::NetworkBehaviour>(
    key: &NodeKey,
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> Swarm<B> {
    libp2p::SwarmBuilder::with_existing_identity(key.keypair().clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|k| behaviour(k))
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build()
}

impl RawPeer {
    /// A raw client allowing `max_streams` concurrent streams per connection.
    pub fn new(max_streams: usize) -> Self {
        let swarm = tcp_swarm(&NodeKey::generate(), |_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    StreamProtocol::new(STAGE_PROTOCOL),
                    request_response::ProtocolSupport::Outbound,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(20))
                    .with_max_concurrent_streams(max_streams),
            )
        });
        Self {
            swarm,
            connections: HashMap::new(),
            replies: HashMap::new(),
        }
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.connections.get(peer).copied().unwrap_or(0) > 0
    }

    /// Keeps connection counts and replies from one swarm event.
    fn handle(&mut self, event: SwarmEvent<request_response::Event<RawFrame, Vec<u8>>>) {
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                *self.connections.entry(peer_id).or_default() += 1;
            }
            SwarmEvent::ConnectionClosed { peer_id, .. } => {
                let n = self.connections.entry(peer_id).or_default();
                *n = n.saturating_sub(1);
            }
            SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            }) => {
                self.replies.insert(request_id, RawReply::Bytes(response));
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) => {
                self.replies
                    .insert(request_id, RawReply::Failed(error.to_string()));
            }
            _ => {}
        }
    }

    /// Dials `addr`; true once a connection is established, false if the dial fails.
    pub async fn connect(&mut self, addr: &Multiaddr) -> bool {
        self.swarm.dial(addr.clone()).unwrap();
        within(WAIT, "a raw dial", async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::OutgoingConnectionError { .. } => return false,
                    e @ SwarmEvent::ConnectionEstablished { .. } => {
                        self.handle(e);
                        return true;
                    }
                    e => self.handle(e),
                }
            }
        })
        .await
    }

    /// Opens a stream and sends `frame` on it; [`Self::reply`] waits for the outcome.
    pub fn send(&mut self, peer: PeerId, frame: RawFrame) -> OutboundRequestId {
        self.swarm.behaviour_mut().send_request(&peer, frame)
    }

    /// Drives the swarm until the call `id` has an outcome.
    pub async fn reply(&mut self, id: OutboundRequestId) -> RawReply {
        within(Duration::from_secs(30), "a raw call resolves", async {
            loop {
                if let Some(r) = self.replies.remove(&id) {
                    return r;
                }
                let event = self.swarm.select_next_some().await;
                self.handle(event);
            }
        })
        .await
    }

    /// Sends every frame on its own stream at once and waits for every outcome.
    pub async fn call_many(&mut self, peer: PeerId, frames: Vec<RawFrame>) -> Vec<RawReply> {
        let ids: Vec<_> = frames.into_iter().map(|f| self.send(peer, f)).collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.reply(id).await);
        }
        out
    }

    pub async fn call(&mut self, peer: PeerId, frame: RawFrame) -> RawReply {
        let id = self.send(peer, frame);
        self.reply(id).await
    }

    /// Keeps the swarm going for `d` (between retries).
    pub async fn idle(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle(event),
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Drives the swarm until no connection to `peer` is left.
    pub async fn wait_disconnected(&mut self, peer: PeerId) {
        within(WAIT, "the node closes the connection", async {
            while self.is_connected(&peer) {
                let event = self.swarm.select_next_some().await;
                self.handle(event);
            }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The gossip attacker: gossipsub alone, publishing whatever bytes it likes on the
// announcement topic (signed, as gossipsub's strict mode demands, by its own key).

pub struct GossipPeer {
    pub key: NodeKey,
    pub swarm: Swarm<gossipsub::Behaviour>,
    connected: bool,
}

impl GossipPeer {
    pub fn new() -> Self {
        let key = NodeKey::generate();
        let swarm = tcp_swarm(&key, |k| {
            let config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(200))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .build()
                .unwrap();
            let mut g = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(k.clone()),
                config,
            )
            .unwrap();
            g.subscribe(&topic()).unwrap();
            g
        });
        Self {
            key,
            swarm,
            connected: false,
        }
    }

    pub fn peer_id(&self) -> PeerId {
        self.key.peer_id()
    }

    /// Connects and waits until the node's subscription to announcements arrives, so a
    /// publish reaches it.
    pub async fn join(&mut self, node: &TestNode) {
        self.swarm.dial(node.addr.clone()).unwrap();
        let peer = node.peer;
        within(WAIT, "the node subscribes to announcements", async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => self.connected = true,
                    SwarmEvent::Behaviour(gossipsub::Event::Subscribed { peer_id, .. })
                        if peer_id == peer =>
                    {
                        return;
                    }
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        panic!("cannot dial the node: {error}")
                    }
                    _ => {}
                }
            }
        })
        .await;
    }

    pub fn publish(&mut self, data: Vec<u8>) {
        self.swarm
            .behaviour_mut()
            .publish(topic(), data)
            .expect("the node is subscribed");
    }

    /// Drives the swarm (so the published bytes go out) until `done` holds or the node closes
    /// the connection; returns whether the connection is still open.
    pub async fn drive_until(&mut self, mut done: impl FnMut() -> bool) -> bool {
        within(WAIT, "the node reacts to the announcement", async {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                if done() {
                    return self.connected;
                }
                tokio::select! {
                    event = self.swarm.select_next_some() => {
                        if let SwarmEvent::ConnectionClosed { num_established: 0, .. } = event {
                            self.connected = false;
                        }
                    }
                    _ = tick.tick() => {}
                }
            }
        })
        .await
    }

    /// Drives the swarm until the node closes the connection.
    pub async fn wait_disconnected(&mut self) {
        within(WAIT, "the node disconnects the gossip sender", async {
            while self.connected {
                if let SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } = self.swarm.select_next_some().await
                {
                    self.connected = false;
                }
            }
        })
        .await;
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }
}

fn topic() -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(plexus_net::behaviour::ANNOUNCE_TOPIC)
}

/// A raw `plexus_net` peer with `key` that serves stage calls (a scripted liar answers them
/// itself), listening on loopback: its handle, its events and the address it listens on.
pub async fn serving_peer(
    key: &NodeKey,
) -> (NetHandle, tokio::sync::mpsc::Receiver<NetEvent>, Multiaddr) {
    let (handle, mut events) = plexus_net::start(
        NetConfig::new(key.clone())
            .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
            .with_serve(true),
    )
    .unwrap();
    let addr = within(WAIT, "the peer listens", async {
        loop {
            if let Some(NetEvent::Listening(a)) = events.recv().await {
                break a;
            }
        }
    })
    .await;
    (handle, events, addr)
}

/// What a scripted peer (a liar, a staller) announces it serves: `start..end` of the test
/// model `model`, claiming no compute time and room for any session.
pub fn scripted_offer(model: Digest, name: &str, start: u32, end: u32) -> ModelOffer {
    ModelOffer {
        model,
        name: name.into(),
        num_layers: LAYERS as u32,
        start,
        end,
        hidden: HIDDEN as u32,
        decode_s_per_layer: 0.0,
        prefill_s_per_layer: 0.0,
        layer_bytes: 1,
        kv_positions: 100_000,
        kv_free_positions: 100_000,
        check_layers: 0,
    }
}

/// A well-formed announcement of `key`'s node, issued now.
pub fn announcement(key: &NodeKey) -> Announcement {
    Announcement {
        public_key: key.public().encode_protobuf(),
        peer: key.peer_id().to_string(),
        issued_at_ms: now_ms(),
        ttl_ms: 30_000,
        version: "0.1.0".into(),
        addrs: vec!["/ip4/127.0.0.1/tcp/9".into()],
        threads: 1,
        free_memory: 1 << 30,
        sessions: 0,
        max_sessions: 64,
        queue: 0,
        price: 1,
        models: vec![ModelOffer {
            model: Digest::of(b"some model"),
            name: "forged".into(),
            num_layers: 2,
            start: 0,
            end: 2,
            hidden: 64,
            decode_s_per_layer: 1e-6,
            prefill_s_per_layer: 1e-7,
            layer_bytes: 1,
            kv_positions: 100_000,
            kv_free_positions: 100_000,
            check_layers: 0,
        }],
        observed: Vec::new(),
        convicted: Vec::new(),
        doubted: Vec::new(),
    }
}

/// A deterministic generator for test bytes (splitmix64), seeded and printed by its users.
pub struct Bytes(pub u64);

impl Bytes {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// The seed of a test's random bytes: `SEED` from the environment or `default`, printed.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("seed {seed} (SEED={seed} reproduces)");
    seed
}

/// Frames of the kept wire corpus (`crates/core/tests/corpus/wire`) whose name starts with
/// `prefix`.
pub fn corpus(prefix: &str) -> Vec<(String, Vec<u8>)> {
    let dir = workspace().join("crates/core/tests/corpus/wire");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            name.starts_with(prefix)
                .then(|| (name, std::fs::read(&p).unwrap()))
        })
        .collect();
    out.sort();
    out
}
