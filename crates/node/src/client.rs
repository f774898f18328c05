//! The client side of the network: a [`NetworkClient`] joins the swarm without serving, keeps
//! a directory of who serves what, and opens [`RemoteChain`]s that run a generation through a
//! chain of stage nodes, with failover.
//!
//! The chain itself (what to call, how to fail over) is the state machine of [`crate::chain`];
//! this module is its network transport: stage calls through libp2p, routes from the
//! directory, with the client's measurements ([`crate::scoreboard`]) in place of the nodes'
//! claims.

use crate::audit::ChainAudits;
use crate::chain::{drive, CallFailed, Chain, ChainConfig, Transport};
use crate::directory::Directory;
use crate::discovery::{now_ms, DirectoryKeeper};
use crate::metering::{check, ReceiptError, Usage};
use crate::route::{best_route, price_s, Candidate, Hop};
use crate::scoreboard::Scoreboard;
use plexus_core::receipt::Receipt;
use plexus_core::wire::{DType, ErrorCode, Forward, Request, Response, SessionId};
use plexus_core::Digest;
use plexus_model::generate::TokenChain;
use plexus_model::sampler::TokenLogprobs;
use plexus_model::SamplingParams;
use plexus_net::{CallError, NetConfig, NetEvent, NetHandle, PeerId, StartNetError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How the client behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub net: NetConfig,
    /// Element type of activations the stages send each other. Default f32: exact, a chain
    /// gives the tokens of the single-process engine.
    pub wire: DType,
    /// Replacements one generation may need before it gives up.
    pub max_failovers: usize,
    /// How long to wait for a replacement to appear in the directory (survivors that take
    /// over a lost span need a few seconds to notice, load it and announce it).
    pub reroute_wait: Duration,
    /// The EIP-712 chain id stage receipts must be signed for (the ledger's).
    pub chain_id: u64,
    /// Nodes announcing a price above this (micro-PLX per 1000 positions per layer) are never
    /// routed to; `None`: no limit.
    pub max_price: Option<u64>,
    /// Micro-PLX one second of latency per token is worth: how routing weighs price against
    /// speed (see [`crate::route`]); 0 ignores price.
    pub time_value: f64,
    /// Proof-of-Sampling audits of the stages' answers (see [`crate::audit`]).
    pub audit: crate::audit::AuditConfig,
}

impl ClientConfig {
    pub fn new(net: NetConfig) -> Self {
        Self {
            net: net.with_serve(false),
            wire: DType::F32,
            max_failovers: 4,
            reroute_wait: Duration::from_secs(20),
            chain_id: crate::service::DEFAULT_CHAIN_ID,
            max_price: None,
            time_value: DEFAULT_TIME_VALUE,
            audit: crate::audit::AuditConfig::new(),
        }
    }
}

/// Default [`ClientConfig::time_value`]: 1000 micro-PLX (0.001 PLX) per second, so a node
/// must be 1 ms a token faster for each micro-PLX a token it asks more.
pub const DEFAULT_TIME_VALUE: f64 = 1000.0;

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClientMetrics {
    pub tokens: AtomicU64,
    pub stage_calls: AtomicU64,
    pub stage_call_micros: AtomicU64,
    pub failovers: AtomicU64,
    pub replayed_positions: AtomicU64,
    pub chains_opened: AtomicU64,
    /// Stage calls whose receipt was accepted, and refused (missing, forged or false).
    pub receipts: AtomicU64,
    pub receipts_refused: AtomicU64,
    /// Bytes of commitments in accepted receipts (32 a stage call).
    pub commitment_bytes: AtomicU64,
    /// Jobs (one provider's part of one generation) drawn for audit; of those, how many found
    /// no auditor (no other node serves the span), and how many were audited by a node of
    /// another build (compared within the published band).
    pub audits: AtomicU64,
    pub audits_unavailable: AtomicU64,
    pub audits_cross_build: AtomicU64,
    /// Audited stage calls whose auditor's answer agreed (the same commitment on one build,
    /// within the band across builds).
    pub audit_calls_passed: AtomicU64,
    /// Across builds: comparisons made (windows of rows, or tokens) and misses the referees
    /// confirmed (they count towards a statistical conviction).
    pub audit_band_comparisons: AtomicU64,
    pub audit_band_misses: AtomicU64,
    /// Across builds: last-stage tokens that differed from the checker's but were near ties
    /// under its draw (`plexus_verify::near_tie`), so passed.
    pub audit_token_near_ties: AtomicU64,
    /// Of those, near ties that needed more than the narrow slack
    /// (`plexus_verify::near_tie::NARROW_NEAR_TIE_NATS`).
    pub audit_token_wide_near_ties: AtomicU64,
    /// Providers convicted because their near ties were improbable for an honest node
    /// (`plexus_verify::ties`); also counted in the convictions.
    pub audit_near_tie_convictions: AtomicU64,
    /// Across builds: last-stage tokens that differed where the checker's draw could not judge
    /// (temperature above 1 without top-k), so passed.
    pub audit_token_undecided: AtomicU64,
    /// Calls the referees rejected across builds without convicting: their work not paid.
    pub audit_unpaid_calls: AtomicU64,
    /// Audited calls whose commitments differed (sent to referees), and the convictions.
    pub audit_disputes: AtomicU64,
    pub audit_convictions: AtomicU64,
    /// Chains forked from another generation's (choices sharing a prompt), the prompt
    /// positions they did not compute again, and forks a stage refused (the choice then
    /// opened a chain of its own).
    pub forks: AtomicU64,
    pub forked_positions: AtomicU64,
    pub forks_refused: AtomicU64,
}

pub use crate::chain::ChainError;

/// A handle to the client's network side; cheap to clone.
#[derive(Clone)]
pub struct NetworkClient {
    pub(crate) handle: NetHandle,
    directory: watch::Receiver<Arc<Directory>>,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) config: ClientConfig,
    pub(crate) metrics: Arc<ClientMetrics>,
    /// What this client measured of each peer (replaces their claims in routing).
    scores: Arc<Mutex<Scoreboard>>,
    /// Convictions, reputation and stakes (see [`crate::audit`]).
    book: Arc<Mutex<crate::audit::AuditBook>>,
    /// When each peer last connected (see [`Links`]).
    links: Arc<Mutex<Links>>,
    /// Where the book is kept, once [`Self::keep_book`] was called.
    kept: Arc<std::sync::OnceLock<Arc<crate::audit::BookFile>>>,
}

/// Connection sequence numbers: every new connection to a peer gets the next number. A chain
/// that lost a peer's connection notes the number then; a higher one later means the peer
/// came back (a restarted process with the same key), so it may be routed to again, with a
/// fresh session, instead of staying excluded for the rest of the generation.
#[derive(Debug, Default)]
pub struct Links {
    seq: u64,
    last: std::collections::HashMap<PeerId, u64>,
}

/// Peers whose last connection [`Links`] remembers (beyond it, peers no longer in the
/// directory are forgotten).
const MAX_LINKS: usize = 8192;

impl Links {
    /// The sequence number now (a failure noted with it is older than any later connection).
    pub fn now(&self) -> u64 {
        self.seq
    }

    pub fn connected(&mut self, peer: PeerId, dir: &Directory) {
        if self.last.len() >= MAX_LINKS {
            self.last.retain(|p, _| dir.get(p).is_some());
        }
        self.seq += 1;
        self.last.insert(peer, self.seq);
    }

    /// Whether `peer` connected again after `since`.
    pub fn back_since(&self, peer: &PeerId, since: u64) -> bool {
        self.last.get(peer).is_some_and(|&s| s > since)
    }
}

/// How long a shadowed call's auditor may answer after the provider did (`provider`: the
/// provider's time): three times that, at least [`MIN_AUDITOR_GRACE`]. An honest auditor
/// computes the same call at the same time; one of another build, or loading the span only to
/// check it, may be slower, not by this much.
pub fn auditor_grace(provider: Duration) -> Duration {
    (provider * 3).max(MIN_AUDITOR_GRACE)
}

pub const MIN_AUDITOR_GRACE: Duration = Duration::from_secs(2);

/// The failure of a call to a convicted node: the chain fails over.
fn convicted(peer: &PeerId) -> CallFailed {
    CallFailed {
        retryable: true,
        message: format!("{peer} was convicted by audit"),
    }
}

/// How often a gateway that has convicted or doubted nodes announces them (its announcement
/// lives [`VERDICTS_TTL`]: nodes trusting its verdicts forget them soon after it stops).
pub const VERDICTS_EVERY: Duration = Duration::from_secs(2);
pub const VERDICTS_TTL: Duration = Duration::from_secs(30);

/// A gateway's verdicts: the peers it convicted (oldest first) and those it doubts
/// ([`crate::audit::AuditBook::doubted`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdicts {
    pub convicted: Vec<PeerId>,
    pub doubted: Vec<PeerId>,
}

impl Verdicts {
    pub fn is_empty(&self) -> bool {
        self.convicted.is_empty() && self.doubted.is_empty()
    }
}

/// A gateway's announcement of its verdicts: no models, the peers it convicted (the latest
/// [`limits::MAX_VERDICTS`](plexus_core::announce::limits::MAX_VERDICTS)) and those it doubts
/// (the first as many: [`crate::audit::AuditBook::doubted`] ranks the most suspicious
/// first), its listen addresses.
pub fn verdict_announcement(
    key: &plexus_core::keys::NodeKey,
    verdicts: &Verdicts,
    listen: &[plexus_net::Multiaddr],
    now_ms: u64,
) -> plexus_core::announce::Announcement {
    use plexus_core::announce::limits;
    plexus_core::announce::Announcement {
        public_key: key.public().encode_protobuf(),
        peer: key.peer_id().to_string(),
        issued_at_ms: now_ms,
        ttl_ms: VERDICTS_TTL.as_millis() as u64,
        version: env!("CARGO_PKG_VERSION").to_string(),
        addrs: listen
            .iter()
            .map(|a| a.to_string())
            .filter(|a| a.len() <= limits::MAX_ADDR_CHARS)
            .take(limits::MAX_ADDRS)
            .collect(),
        threads: 1,
        free_memory: 0,
        sessions: 0,
        max_sessions: 0,
        queue: 0,
        price: 0,
        models: Vec::new(),
        observed: Vec::new(),
        convicted: verdicts
            .convicted
            .iter()
            .rev()
            .take(limits::MAX_VERDICTS)
            .rev()
            .map(|p| p.to_string())
            .collect(),
        doubted: verdicts
            .doubted
            .iter()
            .take(limits::MAX_VERDICTS)
            .map(|p| p.to_string())
            .collect(),
    }
}

impl NetworkClient {
    /// Joins the network (on the current runtime) and starts tracking announcements.
    pub fn start(config: ClientConfig) -> Result<Self, StartNetError> {
        let (handle, mut events) = plexus_net::start(config.net.clone())?;
        let (mut keeper, directory) = DirectoryKeeper::new(handle.clone());
        let links: Arc<Mutex<Links>> = Arc::default();
        let links_ = Arc::clone(&links);
        let book: Arc<Mutex<crate::audit::AuditBook>> = Arc::default();
        let (book_, handle_, key) = (Arc::clone(&book), handle.clone(), config.net.key.clone());
        tokio::spawn(async move {
            let mut prune = tokio::time::interval(Duration::from_secs(1));
            let mut verdicts = tokio::time::interval(VERDICTS_EVERY);
            // Whether the last verdicts announced were not empty: a gateway whose doubts
            // cleared announces that once more, so nodes need not wait for the old list to
            // expire.
            let mut announced = false;
            loop {
                let flush_at = keeper.flush_at();
                tokio::select! {
                    _ = crate::discovery::until(flush_at) => keeper.flush(),
                    event = events.recv() => match event {
                        Some(NetEvent::Announcement { source, data }) => keeper.admit(&data, source).await,
                        Some(NetEvent::Connected(peer)) => {
                            links_
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .connected(peer, keeper.directory());
                            keeper.describe(peer);
                        }
                        Some(NetEvent::Disconnected(peer)) => keeper.remove(&peer),
                        Some(_) => {}
                        None => break,
                    },
                    Some((peer, bytes)) = keeper.described.recv() => keeper.admit(&bytes, Some(peer)).await,
                    _ = prune.tick() => keeper.prune(),
                    _ = verdicts.tick() => {
                        let mut v = {
                            let book = book_.lock().unwrap_or_else(|e| e.into_inner());
                            Verdicts { convicted: book.verdicts(), doubted: book.doubted() }
                        };
                        // Doubts of nodes gone from the directory move nobody: announce
                        // those still there, the most suspicious first.
                        v.doubted.retain(|p| keeper.directory().get(p).is_some());
                        let limit = plexus_core::announce::limits::MAX_VERDICTS;
                        if v.doubted.len() > limit {
                            tracing::warn!(doubted = v.doubted.len(), announced = limit, "more nodes doubted than one announcement lists: the most suspicious are announced");
                        }
                        let was = std::mem::replace(&mut announced, !v.is_empty());
                        if !v.is_empty() || was {
                            let listen = handle_.listen_addrs().await;
                            let a = verdict_announcement(&key, &v, &listen, now_ms());
                            if let Err(e) = handle_.publish(a.sign(&key).encode()).await {
                                tracing::debug!("verdicts not published: {e}");
                            }
                        }
                    }
                }
            }
        });
        Ok(Self {
            handle,
            directory,
            runtime: tokio::runtime::Handle::current(),
            config,
            metrics: Arc::new(ClientMetrics::default()),
            scores: Arc::default(),
            book,
            links,
            kept: Arc::default(),
        })
    }

    /// Keeps the audit book in `file` from now on (see [`crate::audit::book_file`]): `book`
    /// (what [`crate::audit::BookFile::load`] read from it) replaces this client's (stakes
    /// are kept), and a saver writes it back soon after every verdict and every
    /// [`SAVE_RECORDS_EVERY`](crate::audit::book_file::SAVE_RECORDS_EVERY) for records;
    /// [`Self::save_book`] saves it once more before the process stops. Call it before
    /// serving: what the book learnt before is replaced.
    pub fn keep_book(
        &self,
        file: crate::audit::BookFile,
        mut book: crate::audit::AuditBook,
    ) -> Result<(), crate::audit::BookFileError> {
        let file = Arc::new(file);
        if let Err(file) = self.kept.set(Arc::clone(&file)) {
            return Err(crate::audit::BookFileError::AlreadyKept {
                path: file.path().to_path_buf(),
            });
        }
        let mut saved = {
            let mut current = self.book();
            book.set_stakes(std::mem::take(current.stakes_mut()));
            *current = book;
            current.changes()
        };
        let shared = Arc::clone(&self.book);
        self.runtime.spawn(async move {
            use crate::audit::book_file::{due, SAVE_CHECK_EVERY};
            let mut tick = tokio::time::interval(SAVE_CHECK_EVERY);
            let mut last = Instant::now();
            let mut failing = false;
            loop {
                tick.tick().await;
                // A copy under the lock (the maps only: peers are 38-byte ids); encoded and
                // written off it.
                let copy = {
                    let book = shared.lock().unwrap_or_else(|e| e.into_inner());
                    if !due(saved, book.changes(), last.elapsed()) {
                        continue;
                    }
                    book.clone()
                };
                let now = copy.changes();
                let file = Arc::clone(&file);
                match tokio::task::spawn_blocking(move || file.save(&copy)).await {
                    Ok(Ok(())) => {
                        if failing {
                            tracing::info!("the audit book is saved again");
                        }
                        (saved, last, failing) = (now, Instant::now(), false);
                    }
                    Ok(Err(e)) if !failing => {
                        failing = true;
                        tracing::warn!("{e}; retrying every second");
                    }
                    Ok(Err(_)) => {}
                    Err(e) => tracing::warn!("the audit book saver failed: {e}"),
                }
            }
        });
        Ok(())
    }

    /// Saves the audit book now, if it is kept ([`Self::keep_book`]): for a gateway that is
    /// stopping.
    pub async fn save_book(&self) -> Result<(), crate::audit::BookFileError> {
        let Some(file) = self.kept.get().cloned() else {
            return Ok(());
        };
        let (copy, path) = (self.book().clone(), file.path().to_path_buf());
        tokio::task::spawn_blocking(move || file.save(&copy))
            .await
            .unwrap_or_else(|e| {
                Err(crate::audit::BookFileError::Write {
                    path,
                    source: std::io::Error::other(e),
                })
            })
    }

    pub fn handle(&self) -> &NetHandle {
        &self.handle
    }

    pub fn metrics(&self) -> &ClientMetrics {
        &self.metrics
    }

    /// The published reputation of every peer in the directory
    /// ([`crate::reputation::published`]).
    pub fn reputations(&self) -> Vec<(PeerId, f64)> {
        let peers: Vec<PeerId> = self.directory().iter().map(|(p, _)| *p).collect();
        let scores = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        crate::reputation::published(&self.book(), &scores, &peers)
    }

    /// What audits have taught this client (convictions, reputation, stakes).
    pub fn book(&self) -> std::sync::MutexGuard<'_, crate::audit::AuditBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stakes of node accounts (micro-PLX, from the gateway's ledger): a provider's audit
    /// probability falls as its stake grows.
    pub fn set_stakes(&self, stakes: std::collections::HashMap<plexus_ledger::Address, u64>) {
        self.book().set_stakes(stakes);
    }

    /// The current directory.
    pub fn directory(&self) -> Arc<Directory> {
        Arc::clone(&self.directory.borrow())
    }

    /// Routing candidates for `model` with their measured round trips (async: asks the network
    /// task for ping times).
    pub async fn candidates(&self, model: &Digest) -> Vec<Candidate> {
        let dir = self.directory();
        let mut out = Vec::new();
        for (peer, a, o) in dir.offers(model) {
            if !self.affordable(a.price) {
                continue;
            }
            let rtt = self.handle.rtt(peer).await;
            let sessions = if a.max_sessions == 0 {
                1.0
            } else {
                (a.sessions as f64 + a.queue as f64) / a.max_sessions as f64
            };
            // KV memory taken counts as load too; a node without room for a new session is
            // routed to only when no other route exists (see `route`).
            let kv = if o.kv_positions == 0 {
                1.0
            } else {
                1.0 - o.kv_free_positions as f64 / o.kv_positions as f64
            };
            let load = sessions.max(kv);
            out.push(Candidate {
                peer,
                start: o.start as usize,
                end: o.end as usize,
                compute_s: o.decode_s_per_layer as f64 * (o.end - o.start) as f64,
                rtt,
                load,
                price_s: price_s(a.price, (o.end - o.start) as usize, self.config.time_value),
                full: o.kv_free_positions < crate::route::NEW_SESSION_POSITIONS,
            });
        }
        let scores = self.scores.lock().unwrap_or_else(|e| e.into_inner());
        out.iter_mut().for_each(|c| scores.adjust(c));
        // Convicted nodes are never routed to; reputation (audits, answered calls, measured
        // latency) scales a node's expected compute: a new node's 0.5 doubles it, a long
        // honest, available and fast record brings it near 1.
        crate::reputation::weigh(&self.book(), &scores, &mut out);
        out
    }

    /// How long a chain waits for a route when none covers the model (a take-over under way).
    pub fn reroute_wait(&self) -> Duration {
        self.config.reroute_wait
    }

    /// Whether a node asking `price` may be routed to (at most `max_price`).
    pub fn affordable(&self, price: u64) -> bool {
        self.config.max_price.is_none_or(|m| price <= m)
    }

    /// Waits until some chain covers all `num_layers` layers of `model`.
    pub async fn wait_for_route(
        &self,
        model: &Digest,
        num_layers: usize,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut rx = self.directory.clone();
        loop {
            let cands = self.candidates(model).await;
            if best_route(&cands, 0, num_layers, &[]).is_some() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return false;
            }
        }
    }

    /// Opens a chain for one generation. Blocking: call it from a blocking thread.
    pub fn open_chain(
        &self,
        model: Digest,
        num_layers: usize,
        context: usize,
        params: SamplingParams,
    ) -> Result<RemoteChain, ChainError> {
        let mut cands = self.runtime.block_on(self.candidates(&model));
        if best_route(&cands, 0, num_layers, &[]).is_none() {
            // A node died just before this request: wait, as a running chain does, for the
            // survivors to take its layers over.
            self.runtime.block_on(self.wait_for_route(
                &model,
                num_layers,
                self.config.reroute_wait,
            ));
            cands = self.runtime.block_on(self.candidates(&model));
        }
        let (route, _) = best_route(&cands, 0, num_layers, &[]).ok_or(ChainError::NoRoute {
            model: model.short(),
            from: 0,
            to: num_layers,
        })?;
        self.metrics.chains_opened.fetch_add(1, Ordering::Relaxed);
        let config = ChainConfig {
            model,
            num_layers,
            hidden: hidden_width(&self.directory(), &model),
            params,
            wire: self.config.wire,
            session: SessionId(rand_session()),
            max_failovers: self.config.max_failovers,
        };
        Ok(RemoteChain {
            transport: NetTransport::new(self.clone(), model, ChainAudits::default()),
            chain: Chain::new(config, route),
            context,
            held: Vec::new(),
        })
    }
}

/// The hidden width most nodes announce for `model` (all honest ones announce the same).
/// Replies of another width are failed over rather than passed to the next stage, which would
/// refuse them as a bad request.
fn hidden_width(dir: &Directory, model: &Digest) -> u32 {
    let mut counts: Vec<(u32, usize)> = Vec::new();
    for (_, _, o) in dir.offers(model) {
        match counts.iter_mut().find(|(w, _)| *w == o.hidden) {
            Some((_, n)) => *n += 1,
            None => counts.push((o.hidden, 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(w, n)| (n, std::cmp::Reverse(w)))
        .map_or(0, |(w, _)| w)
}

pub(crate) fn rand_session() -> [u8; 16] {
    // Unique enough and unpredictable to other peers: a hash of time, a counter and the
    // process id (sessions are also keyed by our peer id on every node).
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = format!(
        "{:?}{}{}",
        Instant::now(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    );
    let d = Digest::of(seed.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.0[..16]);
    out
}

/// One generation's chain of remote stages (a [`Chain`] driven over the network). Dropping
/// it closes the sessions on every stage.
pub struct RemoteChain {
    transport: NetTransport,
    chain: Chain,
    context: usize,
    /// A forked chain's shared prompt positions, held by its stages before the first feed:
    /// the prompt it is fed must start with them, and only the rest is sent.
    held: Vec<u32>,
}

impl RemoteChain {
    /// A chain for another generation with the same prompt (the next of `n` choices),
    /// sampling with `params`: every stage copies the first `prompt.len() - 1` positions of
    /// its session of this chain, so the new chain computes only the prompt's last position
    /// before it samples. The stages' refusal (a stage whose weights would not give the same
    /// bits that way, a full node, a lost session) or a prompt this chain was not fed comes
    /// back as the reason; the caller then opens a chain of its own.
    pub fn fork(&mut self, prompt: &[u32], params: SamplingParams) -> Result<RemoteChain, String> {
        let keep = prompt.len().saturating_sub(1);
        if keep == 0 || self.chain.tokens().get(..keep) != Some(&prompt[..keep]) {
            return Err("this chain was not fed that prompt".into());
        }
        let client = self.transport.client.clone();
        let m = &client.metrics;
        let session = SessionId(rand_session());
        let child =
            match crate::chain::fork(&self.chain, keep, session, params, &mut self.transport) {
                Ok(child) => child,
                Err(why) => {
                    m.forks_refused.fetch_add(1, Ordering::Relaxed);
                    return Err(why);
                }
            };
        m.forks.fetch_add(1, Ordering::Relaxed);
        m.forked_positions.fetch_add(keep as u64, Ordering::Relaxed);
        let shared = child
            .hops()
            .iter()
            .map(|h| {
                let log = crate::audit::CallLog::shared(child.tokens(), h.inputs.first().cloned());
                (h.hop.peer, log)
            })
            .collect();
        Ok(RemoteChain {
            transport: NetTransport::new(
                client.clone(),
                self.transport.model,
                ChainAudits::forked(shared),
            ),
            chain: child,
            context: self.context,
            held: prompt[..keep].to_vec(),
        })
    }

    /// The peers of the current chain, first stage first.
    pub fn route(&self) -> Vec<Hop> {
        self.chain.route()
    }

    pub fn failovers(&self) -> usize {
        self.chain.failovers()
    }

    /// The work each provider did for this generation so far, checked against its receipts.
    pub fn usage(&self) -> &Usage {
        &self.transport.usage
    }
}

impl plexus_model::constraint::Maskable for RemoteChain {
    /// The last stage samples: the mask goes with every call to it.
    fn set_mask(&mut self, mask: Option<Vec<u32>>) {
        self.chain.set_mask(mask);
    }
}

impl TokenChain for RemoteChain {
    type Error = ChainError;

    fn context(&self) -> usize {
        self.context
    }

    /// A forked chain sends only the prompt positions its stages do not hold.
    fn feed_prompt(&mut self, prompt: &[u32]) -> Result<u32, ChainError> {
        let held = std::mem::take(&mut self.held);
        if !held.is_empty() && (prompt.len() <= held.len() || !prompt.starts_with(&held)) {
            return Err(ChainError::ForkDiverged);
        }
        // The prompt's kernels, declared while the stages hold nothing but the shared part of
        // this same prompt (a fresh or forked chain): positions already computed keep theirs.
        // (`generate_with` feeds one prompt per chain; a second prompt on a chain that holds
        // more would keep the first's declaration, where `LocalChain` declares the new one.)
        if self.chain.tokens().len() == held.len() {
            self.chain
                .set_prompt_len(u32::try_from(prompt.len()).unwrap_or(u32::MAX));
        }
        plexus_model::generate::feed_in_chunks(self, &prompt[held.len()..])
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<u32, ChainError> {
        if !self.held.is_empty() {
            return Err(ChainError::ForkDiverged);
        }
        let before = self.chain.failovers();
        let token = drive(&mut self.chain, tokens, &mut self.transport)?;
        let m = &self.transport.client.metrics;
        m.tokens.fetch_add(1, Ordering::Relaxed);
        m.failovers
            .fetch_add((self.chain.failovers() - before) as u64, Ordering::Relaxed);
        Ok(token)
    }

    fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.chain.take_logprobs()
    }
}

impl Drop for RemoteChain {
    fn drop(&mut self) {
        for (peer, session) in self.chain.sessions() {
            self.transport.close(peer, session);
        }
        self.transport.end_audits();
    }
}

/// The network side of a chain: stage calls through libp2p, routes from the directory.
pub(crate) struct NetTransport {
    pub(crate) client: NetworkClient,
    model: Digest,
    /// When the last route wait ended empty.
    gave_up: Option<Instant>,
    /// Peers whose connection failed a call, with the [`Links`] number at the time (bounded
    /// by the failovers a chain allows).
    lost: Vec<(PeerId, u64)>,
    /// Peers that refused a call for a span they no longer serve (they moved; our directory
    /// had not heard yet), with that span: routable again once they announce another one.
    moved: Vec<(PeerId, u32, u32)>,
    /// Accepted receipts of this chain's calls.
    pub(crate) usage: Usage,
    /// The audits of this chain's providers.
    pub(crate) audits: crate::audit::ChainAudits,
    /// How long the provider of the call being audited took ([`auditor_grace`]).
    pub(crate) provider_took: Duration,
}

impl NetTransport {
    fn new(client: NetworkClient, model: Digest, audits: ChainAudits) -> Self {
        Self {
            client,
            model,
            gave_up: None,
            lost: Vec::new(),
            moved: Vec::new(),
            usage: Usage::default(),
            audits,
            provider_took: Duration::ZERO,
        }
    }

    /// Meters one answered call: accepted receipts add the peer's work, anything else is
    /// counted and logged (the call was computed but is not paid). The answer, and the
    /// commitment of an accepted receipt.
    pub(crate) fn meter(
        &mut self,
        peer: PeerId,
        expected: Option<Receipt>,
        answer: Response,
    ) -> (Response, Option<[u8; 32]>) {
        let (answer, receipt) = answer.into_parts();
        let Some(mut expected) = expected else {
            return (answer, None); // not a computing call
        };
        if let Some(r) = &receipt {
            expected.commitment = crate::audit::expected_commitment(
                expected.position,
                expected.positions,
                &answer,
                r.commitment,
            );
        }
        let m = &self.client.metrics;
        let account = self
            .client
            .directory()
            .get(&peer)
            .and_then(|a| libp2p_identity::PublicKey::try_decode_protobuf(&a.public_key).ok())
            .and_then(|k| plexus_ledger::address_of(&k));
        let verdict = match (&receipt, account) {
            (None, _) => Err(ReceiptError::Missing),
            (Some(_), None) => Err(ReceiptError::NoAccount),
            (Some(r), Some(account)) => {
                check(&expected, r, &answer, account, self.client.config.chain_id).map(|()| account)
            }
        };
        let mut committed = None;
        // A node convicted while this generation ran (as provider of another hop) is paid
        // nothing more in it, its answers as an auditor included.
        let verdict = verdict.and_then(|account| {
            if self.client.book().is_convicted(&peer) {
                Err(ReceiptError::Convicted)
            } else {
                Ok(account)
            }
        });
        match (verdict, receipt) {
            (Ok(account), Some(r)) => {
                self.usage.record(account, &r);
                m.receipts.fetch_add(1, Ordering::Relaxed);
                m.commitment_bytes.fetch_add(
                    plexus_verify::commitment::CALL_COMMITMENT_BYTES as u64,
                    Ordering::Relaxed,
                );
                committed = Some(r.commitment);
            }
            (Err(e), _) => {
                self.usage.refused += 1;
                m.receipts_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "stage call not paid: {e}");
            }
            (Ok(_), None) => {}
        }
        (answer, committed)
    }
}

/// Whether `peer`, which refused calls for the spans recorded in `moved` (spans it had left),
/// now announces a span it did not refuse (`announced`: its spans in the directory): it
/// serves elsewhere and may be routed to again. A peer that never refused is not "moved on".
fn moved_on(
    peer: &PeerId,
    moved: &[(PeerId, u32, u32)],
    mut announced: impl Iterator<Item = (u32, u32)>,
) -> bool {
    moved.iter().any(|(q, ..)| q == peer)
        && announced.any(|(start, end)| !moved.contains(&(*peer, start, end)))
}

impl NetTransport {
    /// `exclude` without the peers whose connection failed and that have connected again
    /// since (restarted: a new session there is as good as anywhere).
    /// A peer that refused for a span it had left stays excluded only while the directory
    /// still shows it on that span.
    fn still_excluded(&self, exclude: &[PeerId]) -> Vec<PeerId> {
        let links = self.client.links.lock().unwrap_or_else(|e| e.into_inner());
        let directory = self.client.directory();
        let offers = directory.offers(&self.model);
        exclude
            .iter()
            .filter(|p| {
                let latest = self
                    .lost
                    .iter()
                    .filter(|(q, _)| q == *p)
                    .map(|(_, at)| *at)
                    .max();
                let back = latest.is_some_and(|at| links.back_since(p, at));
                let spans = offers
                    .iter()
                    .filter(|(q, ..)| q == *p)
                    .map(|(_, _, o)| (o.start, o.end));
                !(back || moved_on(p, &self.moved, spans))
            })
            .copied()
            .collect()
    }
}

impl Transport for NetTransport {
    fn call(&mut self, peer: PeerId, f: Forward) -> Result<Response, CallFailed> {
        // A node convicted meanwhile (by another chain, or as an auditor in this one) is
        // failed over at once, as at its conviction: its answers are not used.
        if self.client.book().is_convicted(&peer) {
            return Err(convicted(&peer));
        }
        let started = Instant::now();
        let (layers, positions) = ((f.end - f.start) as usize, f.tokens.len());
        if f.position == 0 && !f.chunks.is_empty() {
            self.client
                .metrics
                .replayed_positions
                .fetch_add(positions as u64, Ordering::Relaxed);
        }
        // What we send is what we pay for: the receipt must claim exactly this, at the price
        // the peer announced (a peer without a live announcement is not paid).
        let price = self.client.directory().get(&peer).map(|a| a.price);
        let expected = price.map(|p| Receipt::for_call(&f, p, Digest([0; 32])));
        let client = self.client.clone();
        // A shadowed provider's call goes to its auditor too, at the same time.
        let planned = self.shadow_call(&peer, &f);
        let sent = f.clone();
        // The provider's own time is what it is measured by; the auditor gets a bounded wait
        // after it (`auditor_grace`), so a slow or stalling auditor neither holds the stream
        // nor is blamed on the provider: past it the audit is abandoned (`AuditorLost`).
        let (result, shadow_reply, elapsed) = client.runtime.block_on(async {
            let provider = client.handle.call(peer, Request::Forward(f));
            let Some((a, g)) = &planned else {
                let result = provider.await;
                return (result, None, started.elapsed());
            };
            let audit = client.handle.call(*a, Request::Forward(g.clone()));
            tokio::pin!(provider, audit);
            let mut early = None;
            let result = tokio::select! {
                r = &mut provider => r,
                reply = &mut audit => {
                    early = Some(reply);
                    provider.await
                }
            };
            let elapsed = started.elapsed();
            let reply = match early {
                Some(reply) => reply,
                // The provider failed: its call fails over, nothing to compare.
                None if result.is_err() => Err(CallError::Timeout(*a)),
                None => tokio::time::timeout(auditor_grace(elapsed), audit)
                    .await
                    .unwrap_or(Err(CallError::Timeout(*a))),
            };
            (result, Some(reply), elapsed)
        });
        let shadow = planned
            .zip(shadow_reply)
            .map(|((a, g), reply)| (a, g, reply));
        self.provider_took = elapsed;
        let m = &client.metrics;
        m.stage_calls.fetch_add(1, Ordering::Relaxed);
        m.stage_call_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(resp) => {
                if matches!(
                    resp,
                    Response::Error {
                        code: ErrorCode::UnknownModel,
                        ..
                    }
                ) && self.moved.len() < 64
                {
                    self.moved.push((peer, sent.start, sent.end));
                }
                let rtt = if positions == 1 {
                    client.runtime.block_on(client.handle.rtt(peer))
                } else {
                    None
                };
                client
                    .scores
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record_call(peer, layers, positions, elapsed, rtt);
                let expected = expected.or_else(|| {
                    // Computed, but for a peer we hold no announcement (so no price) of.
                    m.receipts_refused.fetch_add(1, Ordering::Relaxed);
                    self.usage.refused += 1;
                    None
                });
                client.book().on_call(peer, true);
                match self.meter(peer, expected, resp) {
                    (answer, Some(commitment)) => {
                        self.audit(peer, &sent, answer, commitment, shadow)
                    }
                    // Convicted while the call ran: not paid, not used.
                    (_, None) if client.book().is_convicted(&peer) => Err(convicted(&peer)),
                    // Computed, without a receipt this chain accepted (none, a false one, or
                    // from a peer whose announcement lapsed): nothing commits the node to it,
                    // so no audit could check it. Not used: the call fails over (a node
                    // could otherwise drop the receipt of any answer it altered, or of its
                    // first call, and never be audited).
                    (
                        Response::Hidden { .. } | Response::Token { .. } | Response::Scored { .. },
                        None,
                    ) => Err(CallFailed {
                        retryable: true,
                        message: format!(
                            "{peer} answered without a receipt this gateway accepts: not \
                                 paid, and its answer, which no audit could check, not used"
                        ),
                    }),
                    (answer, None) => Ok(answer),
                }
            }
            Err(e) => {
                client.book().on_call(peer, false);
                if self.lost.len() < 64 {
                    let now = client.links.lock().unwrap_or_else(|e| e.into_inner()).now();
                    self.lost.push((peer, now));
                }
                Err(CallFailed {
                    retryable: !matches!(e, CallError::Stopped),
                    message: e.to_string(),
                })
            }
        }
    }

    fn route(
        &mut self,
        from: usize,
        to: usize,
        exclude: &[PeerId],
        wait: bool,
    ) -> Option<Vec<Hop>> {
        // Right after a wait that found nothing, the machine's retry from layer 0 looks once.
        let wait = match self.gave_up {
            _ if !wait => Duration::ZERO,
            Some(t) if t.elapsed() < Duration::from_secs(1) => Duration::ZERO,
            _ => self.client.config.reroute_wait,
        };
        let deadline = Instant::now() + wait;
        loop {
            // Again on every look: a lost peer that restarts meanwhile is routable again.
            let exclude = &self.still_excluded(exclude);
            let cands = self
                .client
                .runtime
                .block_on(self.client.candidates(&self.model));
            // Survivors that take over the lost layers announce new spans: a route from the
            // failed stage's first layer may never come back, one from layer 0 does.
            let found = best_route(&cands, from, to, exclude)
                .or_else(|| best_route(&cands, 0, to, exclude).filter(|_| from > 0));
            if let Some((route, _)) = found {
                self.gave_up = None;
                return Some(route);
            }
            if Instant::now() >= deadline {
                self.gave_up = Some(Instant::now());
                return None;
            }
            let mut rx = self.client.directory.clone();
            rx.borrow_and_update();
            let _ = self.client.runtime.block_on(async {
                tokio::time::timeout(Duration::from_millis(200), rx.changed()).await
            });
        }
    }

    /// Sent in the background: the chain never calls a session again once it closed it
    /// (every replay opens a fresh one), so a close may land whenever it does.
    fn close(&mut self, peer: PeerId, session: SessionId) {
        let handle = self.client.handle.clone();
        self.client.runtime.spawn(async move {
            let _ = handle.call(peer, Request::Close { session }).await;
        });
    }

    fn blame(&mut self, peer: PeerId) {
        self.client
            .scores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record_failure(peer);
    }

    fn fork(
        &mut self,
        peer: PeerId,
        from: SessionId,
        to: SessionId,
        positions: usize,
    ) -> Result<(), String> {
        let request = Request::Fork {
            from,
            to,
            positions: u32::try_from(positions).map_err(|e| e.to_string())?,
        };
        let client = &self.client;
        match client.runtime.block_on(client.handle.call(peer, request)) {
            Ok(Response::Forked { positions: n }) if n as usize == positions => Ok(()),
            Ok(Response::Error { code, message }) => Err(format!("{code:?}: {message}")),
            Ok(_) => Err("an unexpected answer".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer lost at sequence `at` counts as back only after a later connection; the map
    /// stays bounded by forgetting peers no longer in the directory.
    #[test]
    fn links_tell_a_reconnected_peer_and_stay_bounded() {
        let dir = Directory::default();
        let mut links = Links::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        links.connected(a, &dir);
        links.connected(b, &dir);
        let lost_at = links.now();
        assert!(!links.back_since(&a, lost_at));
        assert!(!links.back_since(&PeerId::random(), 0));
        links.connected(a, &dir);
        assert!(links.back_since(&a, lost_at));
        assert!(!links.back_since(&b, lost_at));
        for _ in 0..MAX_LINKS + 10 {
            links.connected(PeerId::random(), &dir);
        }
        assert!(links.last.len() <= MAX_LINKS);
    }

    /// A peer that refused a call for 0..15 (it had moved back to 0..10) is routable again once
    /// the directory shows it on 0..10, not while it still shows 0..15; a peer that never
    /// refused is not "moved on" whatever it announces.
    #[test]
    fn a_peer_that_refused_for_a_span_it_left_is_back_once_it_announces_another() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let moved = vec![(a, 0, 15)];
        assert!(!moved_on(&a, &moved, [(0, 15)].into_iter()));
        assert!(!moved_on(&a, &moved, std::iter::empty()));
        assert!(moved_on(&a, &moved, [(0, 10)].into_iter()));
        assert!(moved_on(&a, &moved, [(0, 15), (15, 30)].into_iter()));
        assert!(!moved_on(&b, &moved, [(0, 10)].into_iter()));
    }
}
