//! The node daemon: loads its span of a model, measures itself, joins the network, announces
//! what it serves, and answers stage calls through the engine actor.
//!
//! ```text
//! NetEvent::Request ─▶ EngineHandle::try_submit ─▶ engine thread ─▶ replies ─▶ NetHandle::respond
//! announce timer ─▶ signed Announcement ─▶ gossipsub (and Describe answers)
//! ```

use crate::directory::Directory;
use crate::discovery::{now_ms, DirectoryKeeper, DiscoveryCounters};
use crate::engine::{EngineActor, EngineConfig, EngineHandle, Job, Work};
use crate::measure::{free_memory, measure, Speed};
use crate::placement::{plan, NodeCapacity};
use plexus_core::announce::{Announcement, ModelOffer};
use plexus_core::keys::NodeKey;
use plexus_core::wire::{ErrorCode, Request, Response};
use plexus_core::Digest;
use plexus_model::layers::Mode;
use plexus_model::load::ModelFiles;
use plexus_model::{LayerSpan, Stage};
use plexus_net::{Multiaddr, NetConfig, NetEvent, NetHandle, PeerId, StartNetError};
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
    /// Micro-credits per 1000 tokens per layer.
    pub price: u64,
    /// Move to the span placement assigns as peers come and go (`--span auto`).
    pub auto: Option<AutoPlacement>,
}

/// Settings of automatic placement.
#[derive(Clone, Debug, Default)]
pub struct AutoPlacement {
    /// Stages per chain (default: the fewest whose memory holds the model).
    pub stages: Option<usize>,
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
            auto: None,
        }
    }
}

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
    let speed = measure(&stage)?;
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

impl Node {
    /// Loads the model span, starts the engine and the network, and waits (up to 5 s) until
    /// the node listens.
    pub async fn start(config: NodeConfig) -> Result<Self, StartNodeError> {
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
        };
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
        Announcement {
            public_key: key.public().encode_protobuf(),
            peer: key.peer_id().to_string(),
            issued_at_ms: now_ms(),
            ttl_ms: self.config.announce_ttl.as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
            addrs: self.listen_addrs().iter().map(|a| a.to_string()).collect(),
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
            }],
        }
    }

    async fn announce(&mut self) {
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
                    Request::Forward(f) => Work::Forward(Box::new(f)),
                    Request::Close { session } => Work::Close(session),
                };
                let job = Job {
                    peer,
                    work,
                    reply: Some(reply),
                };
                if let Err(Job {
                    reply: Some(reply), ..
                }) = self.engine.try_submit(job)
                {
                    self.handle
                        .respond(
                            reply,
                            Response::Error {
                                code: ErrorCode::Busy,
                                message: "the engine queue is full".into(),
                            },
                        )
                        .await;
                }
            }
            NetEvent::Announcement { source, data } => self.keeper.admit(&data, source).await,
            NetEvent::Connected(peer) => self.keeper.describe(peer),
            NetEvent::Disconnected(peer) => self.keeper.remove(&peer),
            NetEvent::Listening(addr) => {
                if !self.listen.contains(&addr) {
                    self.listen.push(addr);
                }
            }
        }
    }

    /// With automatic placement: computes the plan over every node announcing this model
    /// (and this one) and moves to the span it assigns, once the same move has been asked on
    /// two ticks in a row (so a passing announcement does not make nodes flap).
    async fn rebalance(&mut self) {
        let Some(auto) = &self.config.auto else {
            return;
        };
        let me = self.peer_id();
        let cfg = self.served.stage.config();
        let layers = cfg.num_layers;
        let span = self.served.stage.span();
        let layer_bytes = self.served.layer_bytes.max(1);
        let cap = |free: u64, held: usize| {
            ((free + layer_bytes * held as u64) / layer_bytes).min(layers as u64) as usize
        };
        let mut nodes = vec![NodeCapacity {
            peer: me,
            decode_s_per_layer: self.served.speed.decode_s_per_layer,
            max_layers: cap(free_memory().unwrap_or(0), span.len()),
        }];
        for (peer, a, o) in self.keeper.directory().offers(&self.served.model) {
            if peer != me {
                nodes.push(NodeCapacity {
                    peer,
                    decode_s_per_layer: o.decode_s_per_layer as f64,
                    max_layers: cap(a.free_memory, (o.end - o.start) as usize),
                });
            }
        }
        let Ok(plan) = plan(&nodes, layers, auto.stages) else {
            return;
        };
        let Some(a) = plan.assignment(&me) else {
            return;
        };
        let want = LayerSpan::new(a.start, a.end);
        if want == span {
            self.pending = None;
            return;
        }
        if self.pending != Some(want) {
            self.pending = Some(want);
            return;
        }
        self.pending = None;
        let files = Arc::clone(&self.served.files);
        let built = tokio::task::spawn_blocking(move || files.stage(Some(want), Mode::Infer)).await;
        match built {
            Ok(Ok(stage)) => {
                let stage = Arc::new(stage);
                self.engine.swap(me, Arc::clone(&stage)).await;
                self.served.stage = stage;
                info!(from = %span, to = %want, nodes = nodes.len(), "placement moved this node");
            }
            Ok(Err(e)) => warn!("cannot load layers {want}: {e}"),
            Err(e) => warn!("loading layers {want} failed: {e}"),
        }
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut announce = tokio::time::interval(self.config.announce_every);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(event) = self.events.recv() => self.on_event(event).await,
                Some((reply, response)) = self.replies.recv() => {
                    self.handle.respond(reply, response).await;
                }
                Some((peer, bytes)) = self.keeper.described.recv() => {
                    self.keeper.admit(&bytes, Some(peer)).await;
                }
                _ = announce.tick() => {
                    self.keeper.prune();
                    self.rebalance().await;
                    self.announce().await;
                }
            }
        }
        info!("node stopped");
    }
}
