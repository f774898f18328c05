//! The node daemon: loads its span of a model, measures itself, joins the network, announces
//! what it serves, and answers stage calls through the engine actor.
//!
//! ```text
//! NetEvent::Request ─▶ EngineHandle::try_submit ─▶ engine thread ─▶ replies ─▶ NetHandle::respond
//! announce timer ─▶ signed Announcement ─▶ gossipsub (and Describe answers)
//! Forward ─▶ receipt draft (claims, input digest) ─┐
//! engine answer ─▶ output digest, EIP-712 signature ┴▶ Response::Receipted
//! ```
//!
//! Every computed answer carries a receipt signed with the node key (its ledger account):
//! the gateway checks it against what it sent and pays this node for its span at its
//! announced `price` (see `plexus_core::receipt`). Hashing the call's bytes and signing run
//! on the event loop: about 2 ms per MB of activations plus ~0.1 ms, against the forward pass
//! of those same positions on the engine thread.

use crate::checks::{Checks, Hold};
use crate::directory::Directory;
use crate::discovery::{now_ms, DirectoryKeeper, DiscoveryCounters};
use crate::engine::{EngineActor, EngineConfig, EngineHandle, Job, SubmitError, Work};
use crate::measure::{free_memory, measure, Speed};
use crate::placement::{covers, doubts_by_span, keep_spans, plan, plan_doubting, NodeCapacity};
use crate::probe::{checked_speed, observed_speeds, probe_peer, ProbeFailure, Probes};
use crate::verdicts::TrustedVerdicts;
use plexus_core::announce::{limits, Announcement, ModelOffer, Observation};
use plexus_core::keys::NodeKey;
use plexus_core::receipt::Receipt;
use plexus_core::wire::{ErrorCode, Request, Response, SessionId};
use plexus_core::Digest;
use plexus_model::layers::Mode;
use plexus_model::load::ModelFiles;
use plexus_model::{LayerSpan, Stage};
use plexus_net::{Multiaddr, NetConfig, NetEvent, NetHandle, PeerId, StartNetError};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub model: PathBuf,
    /// Layers to serve; `None` serves the whole model.
    pub span: Option<LayerSpan>,
    pub net: NetConfig,
    pub engine: EngineConfig,
    /// Where model identities are cached.
    pub cache_dir: Option<PathBuf>,
    pub announce_every: Duration,
    pub announce_ttl: Duration,
    /// Asking price, micro-PLX per 1000 positions per layer (announced and signed into every
    /// receipt).
    pub price: u64,
    /// The EIP-712 chain id receipts are signed for (the ledger's; 31337 in local mode).
    pub chain_id: u64,
    /// Move to the span placement assigns as peers come and go (`--span auto`).
    pub auto: Option<AutoPlacement>,
    /// Where the payers' vouchers for this node are kept (JSON lines; `None`: in memory).
    pub vouchers: Option<PathBuf>,
    /// Tests only: announce this decode speed (seconds per layer per token) instead of the
    /// measured one: a node lying about its speed, for placement's check ([`crate::probe`]).
    pub claim_decode_s_per_layer: Option<f64>,
    /// Load spans this node does not serve to check other nodes' work (audits of spans
    /// nobody else serves; see [`crate::checks`]), as many layers per span as its free memory
    /// holds beyond its unused KV budget, shared by the check stages it may keep.
    pub checks: bool,
    /// Gateways whose verdicts this node trusts: peers they announce as convicted are left
    /// out of placement, and those they doubt get a spare beside them (see `rebalance`).
    pub trust_verdicts: Vec<PeerId>,
}

/// How long a node with automatic placement keeps its span at start-up while no plan has seen
/// every layer of its model served (see `rebalance`).
pub const ASSEMBLY_GRACE: Duration = Duration::from_secs(30);

/// Settings of automatic placement.
#[derive(Clone, Debug)]
pub struct AutoPlacement {
    /// Stages per chain (default: the fewest whose memory holds the model; never more than
    /// the nodes there are, so survivors of a failure re-plan over fewer stages).
    pub stages: Option<usize>,
    /// How often the plan is recomputed; a move happens when two plans in a row ask for it,
    /// or at once when some layer has no server (a take-over: nothing to flap against). A
    /// peer serving the model disconnecting re-plans at once too.
    pub every: Duration,
    /// Plan as if every node were as fast as every other (nodes on one machine, as `plexus
    /// up` starts them): measurement noise then never moves a node.
    pub equal_speeds: bool,
}

impl Default for AutoPlacement {
    fn default() -> Self {
        Self {
            stages: None,
            every: Duration::from_millis(500),
            equal_speeds: false,
        }
    }
}

impl NodeConfig {
    pub fn new(model: PathBuf, key: NodeKey) -> Self {
        Self {
            model,
            span: None,
            net: NetConfig::new(key),
            engine: EngineConfig::default(),
            cache_dir: None,
            announce_every: Duration::from_secs(2),
            announce_ttl: Duration::from_secs(30),
            price: 0,
            chain_id: DEFAULT_CHAIN_ID,
            auto: None,
            vouchers: None,
            claim_decode_s_per_layer: None,
            checks: false,
            trust_verdicts: Vec::new(),
        }
    }
}

/// The chain id of local-mode ledgers (`plexus_ledger::Config::default`).
pub const DEFAULT_CHAIN_ID: u64 = 31_337;

/// Receipt drafts kept for calls the engine has not answered yet (more than its queue and
/// sessions can hold at once; the oldest is dropped beyond it).
const MAX_DRAFTS: usize = 4096;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartNodeError {
    #[error(transparent)]
    Load(#[from] plexus_model::LoadModelError),
    #[error("cannot hash the model's weights")]
    Identity(#[from] plexus_model::identity::IdentityError),
    #[error("layers {span} are outside the model's {layers} layers")]
    BadSpan { span: LayerSpan, layers: usize },
    #[error("cannot measure the stage")]
    Measure(#[from] plexus_model::stage::ForwardError),
    #[error(transparent)]
    Net(#[from] StartNetError),
    #[error("the loading task failed: {0}")]
    Join(String),
    #[error("the node key is not a secp256k1 key, so it cannot sign receipts")]
    NotSecp256k1,
    #[error("price {0} is above the most a node may announce ({max})", max = plexus_core::announce::limits::MAX_PRICE)]
    Price(u64),
    #[error(transparent)]
    Vouchers(#[from] crate::vouchers::LogError),
}

/// What a loaded node serves.
pub struct Served {
    pub files: Arc<ModelFiles>,
    pub model: Digest,
    pub name: String,
    pub stage: Arc<Stage>,
    pub speed: Speed,
    pub layer_bytes: u64,
}

/// A running node (call [`Node::run`]).
pub struct Node {
    config: NodeConfig,
    served: Served,
    handle: NetHandle,
    events: mpsc::Receiver<NetEvent>,
    engine: EngineHandle,
    replies: mpsc::Receiver<(plexus_net::Reply, Response)>,
    keeper: DirectoryKeeper,
    directory: watch::Receiver<Arc<Directory>>,
    listen: Vec<Multiaddr>,
    current: Vec<u8>,
    /// A span placement asked for once; taken if asked again on the next tick.
    pending: Option<LayerSpan>,
    /// Stage loads for a placement move finish here (they run off the event loop).
    loaded_tx: mpsc::Sender<Loaded>,
    loaded: mpsc::Receiver<Loaded>,
    /// A placement move is loading.
    loading: bool,
    /// Some plan saw every layer served: a gap after that is a loss (a take-over), not a
    /// network still assembling at start-up.
    seen_covered: bool,
    /// When this node started: until some plan sees every layer served, it keeps its span for
    /// [`ASSEMBLY_GRACE`] while its peers load theirs and announce.
    started: std::time::Instant,
    /// Signs receipts (the node key as a k256 key).
    signer: k256::ecdsa::SigningKey,
    /// Receipts of calls waiting for the engine, by reply id.
    drafts: BTreeMap<u64, Receipt>,
    /// The latest voucher per request that payers sent for this node's work.
    vouchers: crate::vouchers::VoucherLog,
    /// What this node measured of its peers' speeds (automatic placement), the measurements
    /// its last announcement carried, and how many probes are under way.
    probes: Probes,
    observed: Vec<Observation>,
    probing: usize,
    probed_tx: mpsc::Sender<(PeerId, ModelOffer, Result<f64, ProbeFailure>)>,
    probed: mpsc::Receiver<(PeerId, ModelOffer, Result<f64, ProbeFailure>)>,
    /// Stages of other spans loaded to check other nodes' work, and calls waiting for them.
    checks: Checks,
    /// Layers of another span this node loads to check it, as last announced.
    check_room: usize,
    /// The convictions announced by the gateways this node trusts.
    verdicts: TrustedVerdicts,
    check_tx: mpsc::Sender<CheckDone>,
    check_done: mpsc::Receiver<CheckDone>,
}

/// A finished load of a new span: the engine already serves it when `Ok`.
struct Loaded {
    from: LayerSpan,
    to: LayerSpan,
    /// How long building the new stage took.
    took: Duration,
    result: Result<Arc<Stage>, String>,
}

/// Why a node stopped serving on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunNodeError {
    #[error("the engine thread stopped (it panicked); this node no longer serves")]
    EngineStopped,
}

fn load(config: &NodeConfig) -> Result<Served, StartNodeError> {
    let files = ModelFiles::open(&config.model)?;
    let layers = files.config.num_layers;
    let span = config.span.unwrap_or(LayerSpan::full(layers));
    if span.end > layers || span.is_empty() {
        return Err(StartNodeError::BadSpan { span, layers });
    }
    let model = plexus_model::identity::identity(
        &files.weight_files,
        config.cache_dir.as_deref(),
        |_, _| {},
    )?;
    let layer_bytes =
        plexus_model::identity::total_size(&files.weight_files) / layers.max(1) as u64;
    let stage = files.stage(Some(span), Mode::Infer)?;
    let mut speed = measure(&stage)?;
    if let Some(claim) = config.claim_decode_s_per_layer {
        speed.decode_s_per_layer = claim;
    }
    let name = config
        .model
        .file_stem()
        .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
    Ok(Served {
        files: Arc::new(files),
        model,
        name,
        stage: Arc::new(stage),
        speed,
        layer_bytes,
    })
}

/// Reports a check load's end to the event loop exactly once, an error if the loading
/// thread panicked before reporting.
struct CheckReport(Option<(mpsc::Sender<CheckDone>, LayerSpan)>);

/// A check load's end: its span, and the spans the engine keeps afterwards.
type CheckDone = (LayerSpan, Result<Vec<LayerSpan>, String>);

impl CheckReport {
    fn send(mut self, result: Result<Vec<LayerSpan>, String>) {
        if let Some((tx, span)) = self.0.take() {
            let _ = tx.blocking_send((span, result));
        }
    }
}

impl Drop for CheckReport {
    fn drop(&mut self) {
        if let Some((tx, span)) = self.0.take() {
            let _ = tx.try_send((span, Err("the loading thread panicked".into())));
        }
    }
}

/// The addresses to announce: relayed ones first (a node behind NAT is reached only through
/// them), at most as many as an announcement may carry.
/// KV positions of the served span the budget holds and the ones not reserved, as announced
/// (capped at what receivers accept).
fn kv_room(gauges: &crate::engine::EngineGauges, bytes_per_position: u64) -> (u32, u32) {
    let budget = gauges.kv_budget.load(Ordering::Relaxed);
    let used = gauges.kv_used.load(Ordering::Relaxed).min(budget);
    let positions = |bytes: u64| {
        (bytes / bytes_per_position.max(1)).min(u64::from(limits::MAX_KV_POSITIONS)) as u32
    };
    let total = positions(budget);
    (total, positions(budget - used).min(total))
}

fn announced_addrs(listen: &[Multiaddr]) -> Vec<String> {
    let (relayed, direct): (Vec<&Multiaddr>, Vec<&Multiaddr>) =
        listen.iter().partition(|a| plexus_net::nat::is_relayed(a));
    relayed
        .into_iter()
        .chain(direct)
        .map(|a| a.to_string())
        .filter(|a| a.len() <= plexus_core::announce::limits::MAX_ADDR_CHARS)
        .take(plexus_core::announce::limits::MAX_ADDRS)
        .collect()
}

impl Node {
    /// Loads the model span, starts the engine and the network, and waits (up to 5 s) until
    /// the node listens.
    pub async fn start(config: NodeConfig) -> Result<Self, StartNodeError> {
        if config.price > plexus_core::announce::limits::MAX_PRICE {
            return Err(StartNodeError::Price(config.price));
        }
        let signer = plexus_ledger::receipt::signing_key(&config.net.key)
            .ok_or(StartNodeError::NotSecp256k1)?;
        let me = plexus_ledger::address_of(&config.net.key.public())
            .ok_or(StartNodeError::NotSecp256k1)?;
        let vouchers = match &config.vouchers {
            Some(path) => crate::vouchers::VoucherLog::open(path, me, config.chain_id, now_ms())?,
            None => crate::vouchers::VoucherLog::in_memory(me, config.chain_id),
        };
        let cfg = config.clone();
        let served = tokio::task::spawn_blocking(move || load(&cfg))
            .await
            .map_err(|e| StartNodeError::Join(e.to_string()))??;
        info!(
            model = %served.model.short(),
            span = %served.stage.span(),
            decode_ms_per_layer = served.speed.decode_s_per_layer * 1e3,
            "stage loaded"
        );
        let (handle, mut events) = plexus_net::start(config.net.clone().with_serve(true))?;
        let (reply_tx, replies) = mpsc::channel(256);
        let engine = EngineActor::start(
            Arc::clone(&served.stage),
            served.model,
            config.engine.clone(),
            reply_tx,
        );
        let (keeper, directory) = DirectoryKeeper::new(handle.clone());
        let (loaded_tx, loaded) = mpsc::channel(1);
        let (probed_tx, probed) = mpsc::channel(crate::probe::MAX_IN_FLIGHT);
        let (check_tx, check_done) = mpsc::channel(4);
        // Collect the first listen addresses; keep any other early event for `run`.
        let mut listen = Vec::new();
        let mut early = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while listen.len() < config.net.listen.len() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(NetEvent::Listening(a))) => listen.push(a),
                Ok(Some(other)) => early.push(other),
                Ok(None) | Err(_) => break,
            }
        }
        let mut node = Node {
            config,
            served,
            handle,
            events,
            engine,
            replies,
            keeper,
            directory,
            listen,
            current: Vec::new(),
            pending: None,
            loaded_tx,
            loaded,
            loading: false,
            seen_covered: false,
            started: std::time::Instant::now(),
            signer,
            drafts: BTreeMap::new(),
            vouchers,
            probes: Probes::default(),
            observed: Vec::new(),
            probing: 0,
            probed_tx,
            probed,
            checks: Checks::default(),
            check_room: 0,
            verdicts: TrustedVerdicts::default(),
            check_tx,
            check_done,
        };
        node.check_room = node.check_layers();
        node.verdicts = TrustedVerdicts::new(node.config.trust_verdicts.clone());
        node.current = node.announcement().sign(&node.config.net.key).encode();
        for e in early {
            node.on_event(e).await;
        }
        Ok(node)
    }

    pub fn peer_id(&self) -> PeerId {
        self.handle.peer_id()
    }

    /// Addresses other processes can dial, with this node's `/p2p/` suffix.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen
            .iter()
            .map(|a| a.clone().with_p2p(self.peer_id()).unwrap_or_else(|a| a))
            .collect()
    }

    pub fn served(&self) -> &Served {
        &self.served
    }

    /// The peers this node knows from verified announcements; stays current while the node
    /// runs.
    pub fn directory(&self) -> watch::Receiver<Arc<Directory>> {
        self.directory.clone()
    }

    /// Announcements admitted, refused and ignored so far.
    pub fn discovery_counters(&self) -> Arc<DiscoveryCounters> {
        self.keeper.counters()
    }

    fn announcement(&self) -> Announcement {
        let key = &self.config.net.key;
        let span = self.served.stage.span();
        let cfg = self.served.stage.config();
        let (kv_positions, kv_free_positions) = kv_room(
            &self.engine.gauges,
            self.served.stage.kv_bytes_per_position(),
        );
        Announcement {
            public_key: key.public().encode_protobuf(),
            peer: key.peer_id().to_string(),
            issued_at_ms: now_ms(),
            ttl_ms: self.config.announce_ttl.as_millis() as u64,
            version: self.config.engine.arithmetic.version(),
            addrs: announced_addrs(&self.listen_addrs()),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            free_memory: free_memory().unwrap_or(0),
            sessions: self.engine.gauges.sessions.load(Ordering::Relaxed),
            max_sessions: self.config.engine.max_sessions as u32,
            queue: self.engine.gauges.queued.load(Ordering::Relaxed),
            price: self.config.price,
            models: vec![ModelOffer {
                model: self.served.model,
                name: self.served.name.clone(),
                num_layers: cfg.num_layers as u32,
                start: span.start as u32,
                end: span.end as u32,
                hidden: cfg.hidden_size as u32,
                decode_s_per_layer: self.served.speed.decode_s_per_layer as f32,
                prefill_s_per_layer: self.served.speed.prefill_s_per_layer as f32,
                layer_bytes: self.served.layer_bytes,
                kv_positions,
                kv_free_positions,
                check_layers: self.check_room as u32,
            }],
            observed: self.observed.clone(),
            convicted: Vec::new(),
            doubted: Vec::new(),
        }
    }

    /// Layers of another span this node loads to check it (0 when checks are off): what its
    /// free memory holds beyond the KV budget it has not used yet, shared by the
    /// [`crate::engine::MAX_CHECK_STAGES`] stages it may keep. Measured at each announcement.
    fn check_layers(&self) -> usize {
        if !self.config.checks {
            return 0;
        }
        let layers = self.served.stage.config().num_layers;
        let gauges = &self.engine.gauges;
        let kv_unused = gauges
            .kv_budget
            .load(Ordering::Relaxed)
            .saturating_sub(gauges.kv_used.load(Ordering::Relaxed));
        // The check stages already kept count as room: the next load may replace them.
        let kept = self.checks.kept_layers() as u64 * self.served.layer_bytes;
        let room = free_memory()
            .unwrap_or(0)
            .saturating_add(kept)
            .saturating_sub(kv_unused)
            / self.served.layer_bytes.max(1)
            / crate::engine::MAX_CHECK_STAGES as u64;
        room.min(layers as u64) as usize
    }

    /// Starts loading `span` to check with after `after`, off the event loop; the engine
    /// keeps it before [`Self::on_check_loaded`] hears of it, which it always does (a load
    /// that panics reports an error).
    fn load_check(&self, span: LayerSpan, after: Duration) {
        let files = Arc::clone(&self.served.files);
        let engine = self.engine.clone();
        let report = CheckReport(Some((self.check_tx.clone(), span)));
        let me = self.peer_id();
        // The kept span a guess is to replace, if one must go.
        let instead = self.checks.replacing();
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(after);
            info!(%span, "loading a span to check another node's work");
            let result = files
                .stage(Some(span), Mode::Infer)
                .map_err(|e| e.to_string())
                .and_then(|stage| {
                    engine
                        .check_blocking(me, Arc::new(stage), instead)
                        .map_err(|e| e.to_string())
                });
            report.send(result);
        });
    }

    /// Loads ahead the next span a single other node serves (audits of it come to nodes that
    /// load it, see [`crate::checks`]), when this node checks, has a stage slot to spare (or
    /// keeps a stage of a span that has since gained another server: the load replaces it)
    /// and room for the span: the one nearest after its own span first, so nodes spread over
    /// the sole servers. One load at a time; the next tick takes the next span.
    fn prefetch_checks(&mut self) {
        // Not while placement moves this node (both loads would compete for memory).
        if !self.config.checks || self.loading {
            return;
        }
        let me = self.peer_id();
        let served = self.served.stage.span();
        let layers = self.served.stage.config().num_layers;
        // Convicted servers are on their way out (their spans are taken over).
        let convicted = self.verdicts.convicted(self.keeper.directory(), now_ms());
        let mut servers: std::collections::BTreeMap<(usize, usize), usize> = Default::default();
        for (peer, _, o) in self.keeper.directory().offers(&self.served.model) {
            if peer != me
                && !convicted.contains(&peer)
                && o.start < o.end
                && o.end as usize <= layers
            {
                *servers
                    .entry((o.start as usize, o.end as usize))
                    .or_default() += 1;
            }
        }
        let needed: Vec<LayerSpan> = servers
            .into_iter()
            .filter(|(_, n)| *n == 1)
            .map(|((a, b), _)| LayerSpan::new(a, b))
            .collect();
        let mut sole: Vec<LayerSpan> = needed
            .iter()
            .copied()
            .filter(|s| s.len() <= self.check_room)
            .collect();
        sole.sort_by_key(|s| (s.start + layers - served.end % layers) % layers);
        let now = std::time::Instant::now();
        for span in sole {
            if self.checks.prefetch(span, served, now, &needed) {
                self.load_check(span, Duration::ZERO);
                return;
            }
        }
    }

    /// A check stage loaded (or failed to): the calls that waited for it go to the engine (or
    /// are refused), and the next span waited for starts loading.
    async fn on_check_loaded(&mut self, span: LayerSpan, result: Result<Vec<LayerSpan>, String>) {
        if let Err(e) = &result {
            warn!(%span, "cannot load a span to check: {e}");
        }
        let now = std::time::Instant::now();
        let (held, next) = self.checks.loaded(span, result.clone().ok(), now);
        // The engine answers the span it keeps, or serves (placement may have moved this
        // node onto it meanwhile); it refuses a new span while both its check stages are in
        // use by audits.
        let answered = self.checks.keeps(span) || self.served.stage.span() == span;
        for h in held {
            if answered {
                self.draft(h.reply.id(), &h.forward);
                self.submit(h.peer, Work::Forward(h.forward), h.reply).await;
                continue;
            }
            let (code, message) = match &result {
                Err(e) => (
                    ErrorCode::Internal,
                    format!("cannot load layers {span} to check them: {e}"),
                ),
                Ok(_) => (
                    ErrorCode::Busy,
                    "every check stage of this node is in use".to_string(),
                ),
            };
            self.handle
                .respond(h.reply, Response::Error { code, message })
                .await;
        }
        if let Some((next, after)) = next {
            self.load_check(next, after);
        }
    }

    /// Queues `work` on the engine, or answers at once why it cannot take it.
    async fn submit(&mut self, peer: PeerId, work: Work, reply: plexus_net::Reply) {
        let job = Job {
            peer,
            work,
            reply: Some(reply),
        };
        let (job, code, message) = match self.engine.try_submit(job) {
            Ok(()) => return,
            Err(SubmitError::Full(job)) => (job, ErrorCode::Busy, "the engine queue is full"),
            // Callers fail over on Internal; the event loop stops announcing this node at its
            // next tick.
            Err(SubmitError::Stopped(job)) => (job, ErrorCode::Internal, "the engine stopped"),
        };
        if let Some(reply) = job.reply {
            self.drafts.remove(&reply.id());
            self.handle
                .respond(
                    reply,
                    Response::Error {
                        code,
                        message: message.into(),
                    },
                )
                .await;
        }
    }

    async fn announce(&mut self) {
        self.observed = self.probes.observations(self.served.model, now_ms());
        self.check_room = self.check_layers();
        self.current = self.announcement().sign(&self.config.net.key).encode();
        if let Err(e) = self.handle.publish(self.current.clone()).await {
            debug!("announcement not published: {e}");
        }
    }

    async fn on_event(&mut self, event: NetEvent) {
        match event {
            NetEvent::Request {
                peer,
                request,
                reply,
            } => {
                let work = match request {
                    Request::Describe => {
                        // Fresh load figures: signing is cheap next to a round trip.
                        self.current = self.announcement().sign(&self.config.net.key).encode();
                        self.handle
                            .respond(reply, Response::Described(self.current.clone()))
                            .await;
                        return;
                    }
                    Request::Forward(f) => {
                        let stage = &self.served.stage;
                        let now = std::time::Instant::now();
                        if let Some(span) = self.checks.needs_stage(
                            &f,
                            &self.served.model,
                            (stage.span(), stage.config().num_layers),
                            self.check_room,
                            now,
                        ) {
                            match self.checks.hold(peer, Box::new(f), reply, span, now) {
                                Hold::Load(span, after) => self.load_check(span, after),
                                Hold::Queued => {}
                                Hold::Full(reply) => {
                                    let response = Response::Error {
                                        code: ErrorCode::Busy,
                                        message: "too many checks wait for their layers".into(),
                                    };
                                    self.handle.respond(reply, response).await;
                                }
                            }
                            return;
                        }
                        self.draft(reply.id(), &f);
                        Work::Forward(Box::new(f))
                    }
                    Request::Close { session } => Work::Close(session),
                    Request::Fork {
                        from,
                        to,
                        positions,
                    } => Work::Fork(Box::new(crate::engine::Fork {
                        from,
                        to,
                        positions,
                    })),
                    Request::Train { .. } => {
                        let response = Response::Error {
                            code: ErrorCode::BadRequest,
                            message: "this node serves stage calls, not training".into(),
                        };
                        self.handle.respond(reply, response).await;
                        return;
                    }
                    Request::Voucher { voucher } => {
                        let response = match self.vouchers.offer_bytes(&voucher, now_ms()) {
                            Ok(cumulative) => Response::VoucherKept { cumulative },
                            Err(e) => {
                                debug!(%peer, "voucher refused: {e}");
                                Response::Error {
                                    code: ErrorCode::BadRequest,
                                    message: format!("voucher refused: {e}"),
                                }
                            }
                        };
                        self.handle.respond(reply, response).await;
                        return;
                    }
                };
                self.submit(peer, work, reply).await;
            }
            NetEvent::Announcement { source, data } => self.keeper.admit(&data, source).await,
            NetEvent::Connected(peer) => self.keeper.describe(peer),
            NetEvent::Disconnected(peer) => {
                // A server of our model gone (killed, crashed, cut off): re-plan now, not at
                // the next tick; when its layers have no other server the move happens at once.
                let served = self.config.auto.is_some()
                    && self
                        .keeper
                        .directory()
                        .get(&peer)
                        .is_some_and(|a| a.models.iter().any(|o| o.model == self.served.model));
                self.keeper.remove(&peer);
                if served {
                    self.rebalance().await;
                }
            }
            NetEvent::Listening(addr) => {
                if !self.listen.contains(&addr) {
                    self.listen.push(addr);
                }
            }
            NetEvent::ListenExpired(addr) => self.listen.retain(|a| *a != addr),
        }
    }

    /// Notes what a call claims before the engine takes it (its bytes move to the engine).
    fn draft(&mut self, id: u64, f: &plexus_core::wire::Forward) {
        if self.drafts.len() >= MAX_DRAFTS {
            self.drafts.pop_first();
        }
        let receipt = Receipt::for_call(f, self.config.price, Digest([0; 32]));
        self.drafts.insert(id, receipt);
    }

    /// The engine's answer to call `id`, with its signed receipt when it computed something.
    fn receipted(&mut self, id: u64, response: Response) -> Response {
        // The engine hands a computed answer over with the call's commitment in a draft.
        let (response, draft) = response.into_parts();
        let Some(mut receipt) = self.drafts.remove(&id) else {
            return response;
        };
        let Some(output) = plexus_core::receipt::output_digest(&response) else {
            return response;
        };
        receipt.output = output;
        receipt.commitment = draft.map_or([0; 32], |d| d.commitment);
        plexus_ledger::receipt::sign(&mut receipt, self.config.chain_id, &self.signer);
        Response::Receipted {
            response: Box::new(response),
            receipt: Box::new(receipt),
        }
    }

    /// With automatic placement: computes the plan over every node announcing this model
    /// (and this one) and moves to the span it assigns, once the same move has been asked on
    /// two ticks in a row (so a passing announcement does not make nodes flap). When a span
    /// loses its last server, this is how the survivors take it over: the plan over fewer
    /// nodes gives them wider spans, loaded from the model file they hold.
    async fn rebalance(&mut self) {
        let Some(auto) = self.config.auto.clone() else {
            return;
        };
        let me = self.peer_id();
        let cfg = self.served.stage.config();
        let layers = cfg.num_layers;
        let span = self.served.stage.span();
        let layer_bytes = self.served.layer_bytes.max(1);
        let cap = |free: u64, held: usize| {
            // Announced figures are claims: saturate rather than overflow.
            (free.saturating_add(layer_bytes.saturating_mul(held as u64)) / layer_bytes)
                .min(layers as u64) as usize
        };
        let model = self.served.model;
        let standing = self.verdicts.standing(self.keeper.directory(), now_ms());
        let convicted = &standing.convicted;
        if convicted.contains(&me) {
            // Nobody trusting the same gateways routes to this node or counts it: moving
            // would only take layers from the nodes that replace it.
            return;
        }
        let (current, nodes, probed) = {
            let mut offers = self.keeper.directory().offers(&model);
            // Convicted nodes still announce their spans, but the gateways whose verdicts
            // this node trusts never route to them: plan as if they were gone, so the layers
            // they served alone are taken over.
            offers.retain(|(p, _, _)| !convicted.contains(p));
            // A node's speed is its claim checked against what the others measured of it (this
            // node's own measurements as its last announcement told them): see `crate::probe`.
            let observed = observed_speeds(
                offers
                    .iter()
                    .filter(|(p, _, _)| *p != me)
                    .map(|(p, a, _)| (*p, a.observed.as_slice()))
                    .chain(std::iter::once((me, self.observed.as_slice()))),
                model,
            );
            let speed = |peer: PeerId, claim: f64| {
                if auto.equal_speeds {
                    return 1e-3;
                }
                checked_speed(claim, observed.get(&peer).cloned().unwrap_or_default())
            };
            let mut current = vec![(me, (span.start, span.end))];
            let mut nodes = vec![NodeCapacity {
                peer: me,
                decode_s_per_layer: speed(me, self.served.speed.decode_s_per_layer),
                max_layers: cap(free_memory().unwrap_or(0), span.len()),
            }];
            for (peer, a, o) in &offers {
                if *peer != me {
                    current.push((*peer, (o.start as usize, o.end as usize)));
                    nodes.push(NodeCapacity {
                        peer: *peer,
                        decode_s_per_layer: speed(*peer, o.decode_s_per_layer as f64),
                        max_layers: cap(a.free_memory, (o.end - o.start) as usize),
                    });
                }
            }
            let probed: Vec<(PeerId, ModelOffer)> = offers
                .iter()
                .filter(|(p, _, _)| *p != me)
                .map(|(p, _, o)| (*p, (*o).clone()))
                .collect();
            (current, nodes, probed)
        };
        if !auto.equal_speeds {
            self.probe_next(probed);
        }
        // The stages of nodes the trusted gateways doubt get a spare beside them (chains
        // stay as they are: see `crate::placement`). Between interchangeable nodes the plan's
        // peers are labels: the doubt goes with the span the doubted node holds.
        let Ok(mut plan) = plan(&nodes, layers, auto.stages) else {
            return;
        };
        let doubted = if auto.equal_speeds {
            doubts_by_span(&plan, &current, &standing.doubted)
        } else {
            standing.doubted.clone()
        };
        if !doubted.is_empty() {
            let Ok(doubting) = plan_doubting(&nodes, layers, auto.stages, &doubted) else {
                return;
            };
            plan = doubting;
        }
        let assigned = if auto.equal_speeds {
            keep_spans(&plan.spans(), &current)
                .into_iter()
                .find(|(p, _)| *p == me)
                .map(|(_, s)| s)
        } else {
            plan.assignment(&me).map(|a| (a.start, a.end))
        };
        // Some layer lost its last server: a take-over, so move now (chains are waiting on
        // it). Otherwise wait for the next plan to ask the same, so a passing announcement
        // does not make nodes flap (nor a node that has not met its peers yet).
        let covered = covers(&current.iter().map(|(_, s)| *s).collect::<Vec<_>>(), layers);
        self.seen_covered |= covered;
        let gap = !covered && self.seen_covered;
        let Some((start, end)) = assigned else {
            return;
        };
        let want = LayerSpan::new(start, end);
        // Still assembling (no plan has seen every layer served yet, and the grace is not
        // over): peers started beside this node may still be loading their spans, and a plan
        // over the few already seen would have this node load layers it is about to give
        // back (under `plexus up`, node 0 took the whole model before its peers announced).
        let assembling = !self.seen_covered && self.started.elapsed() < ASSEMBLY_GRACE;
        if want == span || assembling {
            self.pending = None;
            return;
        }
        if self.pending != Some(want) && !gap {
            self.pending = Some(want);
            return;
        }
        self.pending = None;
        if self.loading {
            return;
        }
        self.loading = true;
        // Load and hand over off the event loop: replies and announcements go on meanwhile.
        let files = Arc::clone(&self.served.files);
        let engine = self.engine.clone();
        let tx = self.loaded_tx.clone();
        let from = span;
        info!(from = %from, to = %want, take_over = gap, "placement moves this node");
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = files
                .stage(Some(want), Mode::Infer)
                .map_err(|e| e.to_string())
                .and_then(|stage| {
                    let stage = Arc::new(stage);
                    engine
                        .swap_blocking(me, Arc::clone(&stage))
                        .map(|()| stage)
                        .map_err(|e| e.to_string())
                });
            let _ = tx.blocking_send(Loaded {
                from,
                to: want,
                took: started.elapsed(),
                result,
            });
        });
    }

    /// Starts a probe of the peer serving this node's model that is due one, if fewer than
    /// [`crate::probe::MAX_IN_FLIGHT`] are under way (off the event loop; the answer comes
    /// back to [`Self::on_probed`]).
    fn probe_next(&mut self, offers: Vec<(PeerId, ModelOffer)>) {
        if self.probing >= crate::probe::MAX_IN_FLIGHT {
            return;
        }
        let model = self.served.model;
        let peers: Vec<PeerId> = offers.iter().map(|(p, _)| *p).collect();
        let now = now_ms();
        let Some(peer) = self.probes.due(model, &peers, now) else {
            return;
        };
        let Some(offer) = offers.into_iter().find(|(p, _)| *p == peer).map(|(_, o)| o) else {
            return;
        };
        self.probes.tried(model, peer, now);
        self.probing += 1;
        let (net, tx) = (self.handle.clone(), self.probed_tx.clone());
        let session = SessionId(crate::client::rand_session());
        tokio::spawn(async move {
            let result = probe_peer(&net, peer, &offer, session).await;
            let _ = tx.send((peer, offer, result)).await;
        });
    }

    /// A probe finished: its measurement is kept for the next announcement.
    fn on_probed(&mut self, peer: PeerId, offer: ModelOffer, result: Result<f64, ProbeFailure>) {
        self.probing = self.probing.saturating_sub(1);
        let layers = offer.end - offer.start;
        match result {
            Ok(s) => {
                debug!(%peer, measured_ms_per_layer = s * 1e3, claimed_ms_per_layer = f64::from(offer.decode_s_per_layer) * 1e3, "probed a peer's speed");
                self.probes.record(offer.model, peer, s, layers, now_ms());
            }
            Err(ProbeFailure::Stalled(why)) => {
                warn!(%peer, "a probe of the peer's speed stalled ({why}): taken as a timed-out call");
                let slow = crate::probe::stalled_speed(layers);
                self.probes
                    .record(offer.model, peer, slow, layers, now_ms());
            }
            Err(ProbeFailure::Gone(why)) => debug!(%peer, "probe not made: {why}"),
        }
    }

    /// A placement move finished: announce the new span only if the engine took it.
    async fn on_loaded(&mut self, done: Loaded) {
        self.loading = false;
        match done.result {
            Ok(stage) => {
                self.checks.serving(stage.span());
                self.checks.leave(done.from, std::time::Instant::now());
                self.served.stage = stage;
                info!(
                    from = %done.from,
                    to = %done.to,
                    load_ms = done.took.as_secs_f64() * 1e3,
                    "placement moved this node"
                );
                self.announce().await;
            }
            Err(e) => warn!("cannot move to layers {}: {e}", done.to),
        }
    }

    /// Serves until `shutdown` resolves, or until the engine thread dies (then it stops
    /// announcing at once and returns [`RunNodeError::EngineStopped`]: callers fail over).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), RunNodeError> {
        let mut announce = tokio::time::interval(self.config.announce_every);
        // Re-planning runs on its own, faster clock: when a span loses its last server the
        // survivors must notice, agree and load it within a couple of seconds.
        let replan_every = self
            .config
            .auto
            .as_ref()
            .map_or(Duration::from_secs(3600), |a| a.every);
        let mut replan = tokio::time::interval(replan_every);
        replan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let result = loop {
            let flush_at = self.keeper.flush_at();
            tokio::select! {
                _ = crate::discovery::until(flush_at) => self.keeper.flush(),
                _ = &mut shutdown => break Ok(()),
                Some(event) = self.events.recv() => self.on_event(event).await,
                Some((reply, response)) = self.replies.recv() => {
                    let response = self.receipted(reply.id(), response);
                    self.handle.respond(reply, response).await;
                }
                Some((peer, bytes)) = self.keeper.described.recv() => {
                    self.keeper.admit(&bytes, Some(peer)).await;
                }
                Some(done) = self.loaded.recv() => self.on_loaded(done).await,
                Some((span, result)) = self.check_done.recv() => self.on_check_loaded(span, result).await,
                Some((peer, offer, result)) = self.probed.recv() => self.on_probed(peer, offer, result),
                _ = replan.tick(), if self.config.auto.is_some() => self.rebalance().await,
                _ = announce.tick() => {
                    if !self.engine.is_alive() {
                        break Err(RunNodeError::EngineStopped);
                    }
                    self.keeper.prune();
                    self.announce().await;
                    self.prefetch_checks();
                }
            }
        };
        match &result {
            Ok(()) => info!("node stopped"),
            Err(e) => tracing::error!("{e}"),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 8: the announced KV room is the budget's unreserved part in positions of the
    /// served span, capped at what receivers accept, and never more than the whole.
    #[test]
    fn kv_room_is_announced_in_positions_within_limits_issue_8() {
        let g = crate::engine::EngineGauges::default();
        g.kv_budget.store(1000 * 100, Ordering::Relaxed);
        g.kv_used.store(300 * 100 + 50, Ordering::Relaxed);
        assert_eq!(kv_room(&g, 100), (1000, 699));
        g.kv_used.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(kv_room(&g, 100), (1000, 0));
        g.kv_budget.store(u64::MAX, Ordering::Relaxed);
        g.kv_used.store(0, Ordering::Relaxed);
        let (total, free) = kv_room(&g, 1);
        assert_eq!(
            (total, free),
            (limits::MAX_KV_POSITIONS, limits::MAX_KV_POSITIONS)
        );
    }

    /// Issue 7: after the engine thread dies the node used to keep announcing itself healthy.
    /// Now `run` stops (before its next announcement) with `EngineStopped`, and the process
    /// exits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_engine_stops_the_node_issue_7() {
        let path = plexus_testkit::real_model();
        let cache = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::new(path, NodeKey::generate());
        config.span = Some(LayerSpan::new(0, 2));
        config.cache_dir = Some(cache.path().to_path_buf());
        config.announce_every = Duration::from_millis(100);
        config.net = config
            .net
            .clone()
            .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]);
        let node = Node::start(config).await.unwrap();
        let panic = Job {
            peer: node.peer_id(),
            work: Work::Panic,
            reply: None,
        };
        assert!(node.engine.try_submit(panic).is_ok());
        let result =
            tokio::time::timeout(Duration::from_secs(20), node.run(std::future::pending()))
                .await
                .expect("the node kept running with a dead engine");
        assert!(
            matches!(result, Err(RunNodeError::EngineStopped)),
            "{result:?}"
        );
    }
}
