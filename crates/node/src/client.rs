//! The client side of the network: a [`NetworkClient`] joins the swarm without serving, keeps
//! a directory of who serves what, and opens [`RemoteChain`]s that run a generation through a
//! chain of stage nodes, with failover.
//!
//! A chain keeps, for every stage, the log of what it was fed (token ids, and activations for
//! stages after the first) and the sizes of the calls. If a stage stops answering, the chain
//! routes around it from that stage's first layer, replays the log to the replacement stages
//! with the same call sizes (so they compute exactly what the lost stage computed), rejoins the
//! old chain where the new route meets it, and goes on. Greedy and seeded sampling therefore
//! give the same text as a run without the failure.

use crate::directory::Directory;
use crate::discovery::DirectoryKeeper;
use crate::route::{best_route, Candidate, Hop};
use plexus_core::wire::{Activations, DType, ErrorCode, Forward, Request, Response, SessionId};
use plexus_core::Digest;
use plexus_model::generate::TokenChain;
use plexus_model::sampler::TokenLogprobs;
use plexus_model::SamplingParams;
use plexus_net::{CallError, NetConfig, NetEvent, NetHandle, PeerId, StartNetError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

/// How the client behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub net: NetConfig,
    /// Element type of activations the stages send each other.
    pub wire: DType,
    /// Replacements one generation may need before it gives up.
    pub max_failovers: usize,
    /// How long to wait for a replacement to appear in the directory.
    pub reroute_wait: Duration,
}

impl ClientConfig {
    pub fn new(net: NetConfig) -> Self {
        Self {
            net: net.with_serve(false),
            wire: DType::F16,
            max_failovers: 4,
            reroute_wait: Duration::from_secs(10),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClientMetrics {
    pub tokens: AtomicU64,
    pub stage_calls: AtomicU64,
    pub stage_call_micros: AtomicU64,
    pub failovers: AtomicU64,
    pub replayed_positions: AtomicU64,
    pub chains_opened: AtomicU64,
}

/// Why a remote generation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("no chain of nodes covers layers {from}..{to} of model {model}")]
    NoRoute {
        model: String,
        from: usize,
        to: usize,
    },
    #[error("stage {peer} refused the call ({code:?}): {message}")]
    Refused {
        peer: PeerId,
        code: ErrorCode,
        message: String,
    },
    #[error("gave up after {0} failovers")]
    TooManyFailovers(usize),
    #[error("stage {peer} sent an unexpected answer")]
    Protocol { peer: PeerId },
}

/// A handle to the client's network side; cheap to clone.
#[derive(Clone)]
pub struct NetworkClient {
    handle: NetHandle,
    directory: watch::Receiver<Arc<Directory>>,
    runtime: tokio::runtime::Handle,
    config: ClientConfig,
    metrics: Arc<ClientMetrics>,
}

impl NetworkClient {
    /// Joins the network (on the current runtime) and starts tracking announcements.
    pub fn start(config: ClientConfig) -> Result<Self, StartNetError> {
        let (handle, mut events) = plexus_net::start(config.net.clone())?;
        let (mut keeper, directory) = DirectoryKeeper::new(handle.clone());
        tokio::spawn(async move {
            let mut prune = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Some(NetEvent::Announcement { source, data }) => keeper.admit(&data, source).await,
                        Some(NetEvent::Connected(peer)) => keeper.describe(peer),
                        Some(NetEvent::Disconnected(peer)) => keeper.remove(&peer),
                        Some(_) => {}
                        None => break,
                    },
                    Some((peer, bytes)) = keeper.described.recv() => keeper.admit(&bytes, Some(peer)).await,
                    _ = prune.tick() => keeper.prune(),
                }
            }
        });
        Ok(Self {
            handle,
            directory,
            runtime: tokio::runtime::Handle::current(),
            config,
            metrics: Arc::new(ClientMetrics::default()),
        })
    }

    pub fn handle(&self) -> &NetHandle {
        &self.handle
    }

    pub fn metrics(&self) -> &ClientMetrics {
        &self.metrics
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
            let rtt = self.handle.rtt(peer).await;
            let load = if a.max_sessions == 0 {
                1.0
            } else {
                (a.sessions as f64 + a.queue as f64) / a.max_sessions as f64
            };
            out.push(Candidate {
                peer,
                start: o.start as usize,
                end: o.end as usize,
                compute_s: o.decode_s_per_layer as f64 * (o.end - o.start) as f64,
                rtt,
                load,
            });
        }
        out
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
        let cands = self.runtime.block_on(self.candidates(&model));
        let (route, _) = best_route(&cands, 0, num_layers, &[]).ok_or(ChainError::NoRoute {
            model: model.short(),
            from: 0,
            to: num_layers,
        })?;
        self.metrics.chains_opened.fetch_add(1, Ordering::Relaxed);
        Ok(RemoteChain {
            client: self.clone(),
            model,
            num_layers,
            context,
            params,
            session: SessionId(rand_session()),
            hops: route.into_iter().map(HopState::new).collect(),
            tokens: Vec::new(),
            calls: Vec::new(),
            exclude: Vec::new(),
            failovers: 0,
            scores: Mutex::new(None),
        })
    }
}

fn rand_session() -> [u8; 16] {
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

struct HopState {
    hop: Hop,
    /// Positions the stage holds for this session.
    position: usize,
    /// What the stage was fed (activations; empty for the first stage), all positions.
    inputs: Vec<Activations>,
}

impl HopState {
    fn new(hop: Hop) -> Self {
        Self {
            hop,
            position: 0,
            inputs: Vec::new(),
        }
    }
}

/// One generation's chain of remote stages. Dropping it closes the sessions on every stage.
pub struct RemoteChain {
    client: NetworkClient,
    model: Digest,
    num_layers: usize,
    context: usize,
    params: SamplingParams,
    session: SessionId,
    hops: Vec<HopState>,
    /// Every token fed so far, and the size of every feed.
    tokens: Vec<u32>,
    calls: Vec<u32>,
    exclude: Vec<PeerId>,
    failovers: usize,
    /// The log-probabilities the last stage sent with its latest token (when asked for).
    scores: Mutex<Option<TokenLogprobs>>,
}

enum Outcome {
    Hidden(Activations),
    Token(u32),
}

/// Whether a failed call is worth routing around (the node is gone or lost our session)
/// rather than an error in the request itself.
fn retryable(code: ErrorCode) -> bool {
    !matches!(code, ErrorCode::BadRequest | ErrorCode::ContextOverflow)
}

impl RemoteChain {
    /// The peers of the current chain, first stage first.
    pub fn route(&self) -> Vec<Hop> {
        self.hops.iter().map(|h| h.hop.clone()).collect()
    }

    pub fn failovers(&self) -> usize {
        self.failovers
    }

    fn forward(
        &self,
        hop: &Hop,
        position: usize,
        tokens: Vec<u32>,
        hidden: Option<Activations>,
        chunks: Vec<u32>,
        all_rows: bool,
    ) -> Forward {
        Forward {
            session: self.session,
            model: self.model,
            start: hop.start as u32,
            end: hop.end as u32,
            position: position as u32,
            tokens,
            hidden,
            chunks,
            sampling: (hop.end == self.num_layers).then(|| Box::new(self.params.clone())),
            reply_dtype: self.client.config.wire,
            all_rows,
        }
    }

    /// One stage call; `Err` carries whether to fail over.
    fn call(&self, peer: PeerId, f: Forward) -> Result<Outcome, (bool, ChainError)> {
        let started = Instant::now();
        let result = self
            .client
            .runtime
            .block_on(self.client.handle.call(peer, Request::Forward(f)));
        let m = &self.client.metrics;
        m.stage_calls.fetch_add(1, Ordering::Relaxed);
        m.stage_call_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(Response::Hidden { hidden, .. }) => Ok(Outcome::Hidden(hidden)),
            // Asked-for log-probabilities that are missing or malformed: a faulty stage.
            Ok(Response::Token { .. }) if self.params.logprobs.is_some() => {
                Err((true, ChainError::Protocol { peer }))
            }
            Ok(Response::Token { token, .. }) => Ok(Outcome::Token(token)),
            Ok(Response::Scored {
                token, logprobs, ..
            }) => match self.params.logprobs {
                Some(n) if logprobs.is_plausible(n, token, usize::MAX) => {
                    *self.scores.lock().unwrap_or_else(PoisonError::into_inner) = Some(logprobs);
                    Ok(Outcome::Token(token))
                }
                _ => Err((true, ChainError::Protocol { peer })),
            },
            Ok(Response::Error { code, message }) => Err((
                retryable(code),
                ChainError::Refused {
                    peer,
                    code,
                    message,
                },
            )),
            Ok(_) => Err((true, ChainError::Protocol { peer })),
            Err(e) => {
                warn!(%peer, "stage call failed: {e}");
                Err((
                    !matches!(e, CallError::Stopped),
                    ChainError::Refused {
                        peer,
                        code: ErrorCode::Internal,
                        message: e.to_string(),
                    },
                ))
            }
        }
    }

    fn close_session(&self, peer: PeerId) {
        let handle = self.client.handle.clone();
        let session = self.session;
        self.client.runtime.spawn(async move {
            let _ = handle.call(peer, Request::Close { session }).await;
        });
    }

    /// Routes around hop `k` and replays; returns the token if the new route reached the
    /// end, or the index of the old hop to continue at with its input.
    fn fail_over(
        &mut self,
        k: usize,
        tokens: &[u32],
        input: Option<Activations>,
        why: ChainError,
    ) -> Result<Result<u32, (usize, Activations)>, ChainError> {
        let n = tokens.len();
        let from = self.hops[k].hop.start;
        // Everything layer `from` has been fed, plus the current call.
        let mut all_in = if from == 0 {
            None
        } else {
            let mut parts = self.hops[k].inputs.clone();
            parts.extend(input);
            Activations::concat(&parts)
        };
        let layer_in = all_in.clone();
        let mut all_tokens = self.tokens.clone();
        all_tokens.extend_from_slice(tokens);
        let mut chunks = self.calls.clone();
        chunks.push(n as u32);
        let mut why = why;
        loop {
            let failed = self.hops[k].hop.peer;
            if !self.exclude.contains(&failed) {
                self.exclude.push(failed);
            }
            self.failovers += 1;
            self.client
                .metrics
                .failovers
                .fetch_add(1, Ordering::Relaxed);
            if self.failovers > self.client.config.max_failovers {
                warn!("giving up: {why}");
                return Err(ChainError::TooManyFailovers(self.failovers - 1));
            }
            warn!(%failed, layers = %format!("{from}..{}", self.hops[k].hop.end), "stage failed ({why}); rerouting");
            self.close_session(failed);
            let route = self.reroute(from)?;
            info!(route = ?route.iter().map(|h| (h.peer.to_string(), h.start, h.end)).collect::<Vec<_>>(), "replaying to replacement stages");
            let mut replayed: Vec<HopState> = Vec::new();
            let mut failed_at = None;
            for hop in route {
                // Rejoin the old chain where the new route meets it.
                if let Some(m) = (k + 1..self.hops.len()).find(|&m| self.hops[m].hop == hop) {
                    for old in &self.hops[k + 1..m] {
                        self.close_session(old.hop.peer);
                    }
                    let next_input = all_in
                        .as_ref()
                        .map(|a| a.tail_rows(n))
                        .ok_or(ChainError::Protocol { peer: hop.peer })?;
                    let rest: Vec<HopState> = self.hops.drain(m..).collect();
                    self.hops.truncate(k);
                    let at = self.hops.len() + replayed.len();
                    self.hops.extend(replayed);
                    self.hops.extend(rest);
                    return Ok(Err((at, next_input)));
                }
                let is_last = hop.end == self.num_layers;
                let f = self.forward(
                    &hop,
                    0,
                    all_tokens.clone(),
                    all_in.clone(),
                    chunks.clone(),
                    !is_last,
                );
                self.client
                    .metrics
                    .replayed_positions
                    .fetch_add(all_tokens.len() as u64, Ordering::Relaxed);
                let expected = all_tokens.len();
                let result = match self.call(hop.peer, f) {
                    Ok(Outcome::Hidden(out)) if out.rows as usize != expected => {
                        Err((true, ChainError::Protocol { peer: hop.peer }))
                    }
                    other => other,
                };
                match result {
                    Ok(Outcome::Hidden(out)) if !is_last => {
                        let mut state = HopState::new(hop);
                        state.position = all_tokens.len();
                        state.inputs = all_in.take().into_iter().collect();
                        replayed.push(state);
                        all_in = Some(out);
                    }
                    Ok(Outcome::Token(token)) if is_last => {
                        let mut state = HopState::new(hop);
                        state.position = all_tokens.len();
                        state.inputs = all_in.take().into_iter().collect();
                        replayed.push(state);
                        for old in &self.hops[k + 1..] {
                            self.close_session(old.hop.peer);
                        }
                        self.hops.truncate(k);
                        self.hops.extend(replayed);
                        return Ok(Ok(token));
                    }
                    Ok(_) => return Err(ChainError::Protocol { peer: hop.peer }),
                    Err((true, e)) => {
                        failed_at = Some((hop, e));
                        break;
                    }
                    Err((false, e)) => return Err(e),
                }
            }
            // A replacement failed too: drop what was replayed and route again from `from`.
            let Some((hop, e)) = failed_at else {
                return Err(ChainError::Protocol { peer: failed });
            };
            for r in &replayed {
                self.close_session(r.hop.peer);
            }
            // The next attempt starts again from the inputs of layer `from`.
            all_in = layer_in.clone();
            self.hops[k].hop = hop;
            why = e;
        }
    }

    /// A route from layer `from` to the end that avoids failed peers, waiting a little for
    /// one to appear.
    fn reroute(&self, from: usize) -> Result<Vec<Hop>, ChainError> {
        let deadline = Instant::now() + self.client.config.reroute_wait;
        loop {
            let cands = self
                .client
                .runtime
                .block_on(self.client.candidates(&self.model));
            if let Some((route, _)) = best_route(&cands, from, self.num_layers, &self.exclude) {
                return Ok(route);
            }
            if Instant::now() >= deadline {
                return Err(ChainError::NoRoute {
                    model: self.model.short(),
                    from,
                    to: self.num_layers,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl TokenChain for RemoteChain {
    type Error = ChainError;

    fn context(&self) -> usize {
        self.context
    }

    fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.scores
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<u32, ChainError> {
        let n = tokens.len();
        let mut input: Option<Activations> = None;
        let mut k = 0;
        let token = loop {
            let Some(state) = self.hops.get(k) else {
                return Err(ChainError::NoRoute {
                    model: self.model.short(),
                    from: 0,
                    to: self.num_layers,
                });
            };
            let hop = state.hop.clone();
            let f = self.forward(
                &hop,
                state.position,
                tokens.to_vec(),
                input.clone(),
                Vec::new(),
                false,
            );
            // A stage that answers with the wrong number of rows is treated as failed.
            let result = match self.call(hop.peer, f) {
                Ok(Outcome::Hidden(out)) if out.rows as usize != n => {
                    Err((true, ChainError::Protocol { peer: hop.peer }))
                }
                other => other,
            };
            match result {
                Ok(Outcome::Hidden(out)) if hop.end < self.num_layers => {
                    let state = &mut self.hops[k];
                    state.position += n;
                    state.inputs.extend(input.take());
                    input = Some(out);
                    k += 1;
                }
                Ok(Outcome::Token(token)) if hop.end == self.num_layers => {
                    let state = &mut self.hops[k];
                    state.position += n;
                    state.inputs.extend(input.take());
                    break token;
                }
                Ok(_) => return Err(ChainError::Protocol { peer: hop.peer }),
                Err((false, e)) => return Err(e),
                Err((true, e)) => match self.fail_over(k, tokens, input.take(), e)? {
                    Ok(token) => break token,
                    Err((at, next_input)) => {
                        k = at;
                        input = Some(next_input);
                    }
                },
            }
        };
        self.tokens.extend_from_slice(tokens);
        self.calls.push(n as u32);
        self.client.metrics.tokens.fetch_add(1, Ordering::Relaxed);
        Ok(token)
    }
}

impl Drop for RemoteChain {
    fn drop(&mut self) {
        for h in &self.hops {
            self.close_session(h.hop.peer);
        }
    }
}
