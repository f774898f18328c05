//! The chain driver as a state machine: which stage to call next with what, and what to do
//! when a call fails. No I/O, no clock: a [`Transport`] performs the calls and route look-ups
//! the machine asks for, so tests drive it in memory with faults injected anywhere.
//!
//! ```text
//!            feed(tokens)
//!                 │
//!                 ▼
//!   ┌──▶ Forward { k, input } ──reply ok, not last──▶ Forward { k+1, out }
//!   │         │ reply ok, last ──▶ token (done)
//!   │         │ reply failed (retryable)
//!   │         ▼
//!   │    Reroute { k, replay }  ── no route ──▶ error
//!   │         │ route from layer `from`
//!   │         ▼
//!   │    Replay { k, route, j, input } ──ok, not last──▶ Replay { j+1 }
//!   │         │ route[j] is a later stage of the old chain: rejoin
//!   └─────────┤
//!             │ ok, last ──▶ token (done)
//!             │ failed ──▶ Reroute (again, from layer `from`)
//! ```
//!
//! The chain keeps, per stage, everything that stage was fed, and the size of every call. A
//! failed stage `k` is routed around from its first layer `from`: the replacement stages get
//! the whole log (tokens, and the activations that entered layer `from`) in the original call
//! sizes, so their KV caches hold what the lost stage's held, and the last stage samples the
//! token of the interrupted step. Greedy and seeded generations give the undisturbed text.
//!
//! Every replay opens its stage under a session id of its own ([`HopState::session`],
//! derived from the chain's), never reused: a close of an abandoned session, which goes out
//! in the background and may land late, can only ever free that session, not one the chain
//! opened since on the same peer.

use crate::route::Hop;
use plexus_core::wire::{Activations, DType, ErrorCode, Forward, Response, SessionId};
use plexus_core::Digest;
use plexus_model::sampler::TokenLogprobs;
use plexus_model::SamplingParams;
use plexus_net::PeerId;
use tracing::{info, warn};

/// Why a generation through the network failed.
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
    /// Every route left was refused for lack of room (a node's KV budget or session slots are
    /// taken by running work): the request may succeed later, a 429 upstream.
    #[error("every node that could serve model {model} is busy: {message}")]
    Busy { model: String, message: String },
    #[error("stage {peer} sent an unexpected answer")]
    Protocol { peer: PeerId },
    /// A forked chain was fed a prompt that does not continue the positions it holds.
    #[error("a forked chain was fed a prompt other than the one it shares")]
    ForkDiverged,
}

/// A call that got no answer (transport failure). `retryable: false` when the caller itself
/// is shutting down.
#[derive(Debug)]
pub struct CallFailed {
    pub retryable: bool,
    pub message: String,
}

/// What performs the machine's requests: stage calls, route look-ups, session closes.
pub trait Transport {
    /// One stage call.
    fn call(&mut self, peer: PeerId, forward: Forward) -> Result<Response, CallFailed>;
    /// The best route over `from..to` avoiding `exclude` (or, when none exists, one over
    /// `0..to`: the chain then replays from the first layer), waiting a bounded time for one
    /// to appear when `wait`, else looking once; `None` when none was found.
    fn route(&mut self, from: usize, to: usize, exclude: &[PeerId], wait: bool)
        -> Option<Vec<Hop>>;
    /// Frees a session on a peer (best effort, in the background).
    fn close(&mut self, peer: PeerId, session: SessionId);
    /// `peer` failed a call or answered nonsense (for the scoreboard).
    fn blame(&mut self, peer: PeerId);
    /// Opens session `to` on `peer` with a copy of the first `positions` positions of its
    /// session `from` (see [`fork`]); the refusal's reason otherwise.
    fn fork(
        &mut self,
        peer: PeerId,
        from: SessionId,
        to: SessionId,
        positions: usize,
    ) -> Result<(), String>;
}

/// What the machine wants done next.
#[derive(Debug)]
pub enum Next {
    Call(PeerId, Box<Forward>),
    /// A route from layer `from`; `wait`: for one to appear (a node died and survivors may
    /// take its layers over), not when the stage that failed was only busy.
    Route {
        from: usize,
        wait: bool,
    },
    Token(u32),
    Failed(ChainError),
}

/// One stage of the chain and what it holds.
#[derive(Clone, Debug)]
pub struct HopState {
    pub hop: Hop,
    /// The session the stage holds this chain's positions under on its peer: the chain's
    /// own for the stages it started with, a fresh one for each stage a failover replayed.
    pub session: SessionId,
    /// Positions the stage holds for this session.
    pub position: usize,
    /// What the stage was fed (activations; empty for the first stage), all positions.
    pub inputs: Vec<Activations>,
}

impl HopState {
    fn new(hop: Hop, session: SessionId) -> Self {
        Self {
            hop,
            session,
            position: 0,
            inputs: Vec::new(),
        }
    }
}

/// The session id of the `n`th stage a chain under `base` replays (`n` from 1): distinct for
/// every `n`, and from every other chain's (the base ids are random).
fn reopened_session(base: SessionId, n: u32) -> SessionId {
    let mut bytes = base.0.to_vec();
    bytes.extend_from_slice(b"/replay/");
    bytes.extend_from_slice(&n.to_le_bytes());
    let digest = Digest::of(&bytes).0;
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    SessionId(id)
}

/// What a failover replays to the replacement stages.
#[derive(Clone, Debug)]
struct Replay {
    /// First layer of the failed stage.
    from: usize,
    /// Everything layer `from` was fed, this call included (`None` when `from` is 0).
    layer_in: Option<Activations>,
    tokens: Vec<u32>,
    chunks: Vec<u32>,
}

#[derive(Debug)]
enum Phase {
    Idle,
    Forward {
        k: usize,
        input: Option<Activations>,
    },
    Reroute {
        k: usize,
        replay: Replay,
    },
    Replay {
        k: usize,
        replay: Replay,
        route: Vec<Hop>,
        j: usize,
        /// Activations entering `route[j]`, all positions.
        input: Option<Activations>,
        /// The fresh session `route[j]` is replayed under.
        session: SessionId,
        replayed: Vec<HopState>,
    },
}

/// Settings of one chain.
#[derive(Clone, Debug)]
pub struct ChainConfig {
    pub model: Digest,
    pub num_layers: usize,
    /// Width of the activations between stages.
    pub hidden: u32,
    pub params: SamplingParams,
    pub wire: DType,
    pub session: SessionId,
    pub max_failovers: usize,
}

/// One generation's chain; see the module docs.
#[derive(Debug)]
pub struct Chain {
    config: ChainConfig,
    hops: Vec<HopState>,
    /// Every token fed so far, and the size of every feed.
    tokens: Vec<u32>,
    calls: Vec<u32>,
    exclude: Vec<PeerId>,
    failovers: usize,
    phase: Phase,
    /// The current feed.
    feed: Vec<u32>,
    /// Sessions to free (abandoned stages), as peer and session.
    to_close: Vec<(PeerId, SessionId)>,
    to_blame: Vec<PeerId>,
    /// The log-probabilities the last stage sent with its latest token (when asked for).
    scores: Option<TokenLogprobs>,
    /// The refusal of the latest stage that failed for lack of room (`Busy`), while the chain
    /// is looking for a route around it: when none is left, the generation fails as
    /// [`ChainError::Busy`] rather than as a missing route.
    busy: Option<String>,
    /// The session's prompt length: it picks every position's attention kernel
    /// ([`Forward::prompt_len`], sent with every call).
    prompt_len: u32,
    /// Sessions opened by replays so far (each replay's session id derives from it).
    reopened: u32,
    /// Sessions closed before the failover under way commits: the failed stages' (old
    /// ones, and replays of this failover that failed) and the old stages on every peer
    /// a replay went to. No stage of these is rejoined, nor closed again at the commit.
    released: Vec<(PeerId, SessionId)>,
}

/// Whether a refusal is worth routing around (the node is gone or lost our session) rather
/// than an error in the request itself.
fn retryable(code: ErrorCode) -> bool {
    !matches!(code, ErrorCode::BadRequest | ErrorCode::ContextOverflow)
}

impl Chain {
    pub fn new(config: ChainConfig, route: Vec<Hop>) -> Self {
        let session = config.session;
        Self {
            config,
            hops: route
                .into_iter()
                .map(|h| HopState::new(h, session))
                .collect(),
            tokens: Vec::new(),
            calls: Vec::new(),
            exclude: Vec::new(),
            failovers: 0,
            phase: Phase::Idle,
            feed: Vec::new(),
            to_close: Vec::new(),
            to_blame: Vec::new(),
            scores: None,
            prompt_len: 0,
            busy: None,
            reopened: 0,
            released: Vec::new(),
        }
    }

    /// The log-probabilities of the last token, when the sampling params asked for them.
    pub fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.scores.take()
    }

    /// The grammar mask the last stage applies to the next sampled token (`None`: any token),
    /// sent with every call to it; a token outside it is a faulty stage's (failed over).
    pub fn set_mask(&mut self, mask: Option<Vec<u32>>) {
        self.config.params.allowed = mask;
    }

    /// Declares the session's prompt length (the whole prompt's, from position 0): it picks
    /// every position's attention kernel. Set before the prompt is fed; every call and replay
    /// carries it.
    pub fn set_prompt_len(&mut self, len: u32) {
        self.prompt_len = len;
    }

    /// Whether the mask in force allows `token`.
    fn allows(&self, token: u32) -> bool {
        self.config
            .params
            .allowed
            .as_deref()
            .is_none_or(|m| plexus_model::sampler::mask_allows(m, token))
    }

    pub fn route(&self) -> Vec<Hop> {
        self.hops.iter().map(|h| h.hop.clone()).collect()
    }

    pub fn hops(&self) -> &[HopState] {
        &self.hops
    }

    pub fn failovers(&self) -> usize {
        self.failovers
    }

    /// Peers routing must avoid (they failed this chain).
    pub fn excluded(&self) -> &[PeerId] {
        &self.exclude
    }

    /// Sessions to free, as peer and session; the driver sends the closes.
    pub fn take_closes(&mut self) -> Vec<(PeerId, SessionId)> {
        std::mem::take(&mut self.to_close)
    }

    /// Peers that failed since the last call.
    pub fn take_blamed(&mut self) -> Vec<PeerId> {
        std::mem::take(&mut self.to_blame)
    }

    /// Every peer holding a session of this chain, with that session (to close when it
    /// ends); not those a failover that never committed closed already.
    pub fn sessions(&self) -> Vec<(PeerId, SessionId)> {
        self.hops
            .iter()
            .map(|h| (h.hop.peer, h.session))
            .filter(|key| !self.released.contains(key))
            .collect()
    }

    /// The chain of another generation continuing from this one's first `keep` positions
    /// (the prompt shared by the `n` choices of a request): the same stages, each holding
    /// those positions under `session` once [`fork`] has copied them there, and the log a
    /// failover replays (the tokens, and every stage's inputs, of those positions, as one
    /// call: the stages that agreed to fork give the same bits for any split). `None` when a
    /// call is in flight or a stage holds fewer positions.
    pub fn forked(&self, session: SessionId, params: SamplingParams, keep: usize) -> Option<Chain> {
        if !matches!(self.phase, Phase::Idle)
            || !self.released.is_empty()
            || keep == 0
            || self.tokens.len() < keep
            || self.hops.iter().any(|h| h.position < keep)
        {
            return None;
        }
        let hops = self
            .hops
            .iter()
            .map(|h| {
                let inputs = if h.hop.start == 0 {
                    Vec::new()
                } else {
                    let fed = Activations::concat(&h.inputs)?;
                    if (fed.rows as usize) < keep {
                        return None;
                    }
                    vec![fed.head_rows(keep)]
                };
                Some(HopState {
                    hop: h.hop.clone(),
                    session,
                    position: keep,
                    inputs,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let mut config = self.config.clone();
        config.session = session;
        config.params = params;
        let mut child = Chain::new(config, Vec::new());
        child.hops = hops;
        child.tokens = self.tokens[..keep].to_vec();
        child.calls = vec![keep as u32];
        child.prompt_len = self.prompt_len;
        // Nothing excluded: a peer that failed this chain may be back (a fresh chain would
        // route to it too), and the transport that knows is the new chain's.
        Some(child)
    }

    /// The tokens this chain's stages hold (every feed so far).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Starts feeding `tokens`: the first request.
    pub fn start(&mut self, tokens: &[u32]) -> Next {
        self.feed = tokens.to_vec();
        self.forward_to(0, None)
    }

    /// The answer to the last [`Next::Call`].
    pub fn on_reply(&mut self, reply: Result<Response, CallFailed>) -> Next {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Forward { k, input } => self.forward_reply(k, input, reply),
            Phase::Replay {
                k,
                replay,
                route,
                j,
                input,
                session,
                replayed,
            } => self.replay_reply(k, replay, route, (j, session), input, replayed, reply),
            phase @ (Phase::Idle | Phase::Reroute { .. }) => {
                self.phase = phase;
                Next::Failed(ChainError::NoRoute {
                    model: self.config.model.short(),
                    from: 0,
                    to: self.config.num_layers,
                })
            }
        }
    }

    /// The answer to the last [`Next::Route`].
    pub fn on_route(&mut self, route: Option<Vec<Hop>>) -> Next {
        let Phase::Reroute { k, replay } = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return self.no_route(0);
        };
        // A chain names each peer once (audits, blame and exclusion are per peer): a route
        // naming a peer twice is no route.
        let distinct = |r: &Vec<Hop>| {
            r.iter()
                .enumerate()
                .all(|(i, h)| r[..i].iter().all(|g| g.peer != h.peer))
        };
        // A route from layer 0 also does when none from `from` exists (survivors re-planned
        // and now serve other spans): the whole log is replayed from the first layer.
        if let Some(r) = route
            .as_ref()
            .filter(|r| replay.from > 0 && self.is_cover(r, 0) && distinct(r))
        {
            let r = r.clone();
            let replay = Replay {
                from: 0,
                layer_in: None,
                ..replay
            };
            info!("no route from the failed stage; replaying from layer 0");
            return self.replay_step(0, replay, r, 0, None, Vec::new());
        }
        // The stages before `k` stay in the chain; a replacement on one of the same peers (a
        // survivor that took the lost span over next to its own) would name that peer twice
        // in the chain. Such a route is refused: the whole chain is replaced from layer 0
        // instead.
        let kept_peer = |r: &Vec<Hop>| {
            r.iter()
                .any(|h| self.hops[..k].iter().any(|s| s.hop.peer == h.peer))
        };
        let Some(route) =
            route.filter(|r| self.is_cover(r, replay.from) && !kept_peer(r) && distinct(r))
        else {
            if replay.from == 0 {
                return self.no_route(0);
            }
            // No route from the failed stage's first layer: replay everything from layer 0
            // (the chain holds every token), replacing the whole chain if need be.
            warn!(
                from = replay.from,
                "no route from the failed stage; replaying from layer 0"
            );
            self.phase = Phase::Reroute {
                k: 0,
                replay: Replay {
                    from: 0,
                    layer_in: None,
                    ..replay
                },
            };
            return Next::Route {
                from: 0,
                wait: self.busy.is_none(),
            };
        };
        info!(route = ?route.iter().map(|h| (h.peer.to_string(), h.start, h.end)).collect::<Vec<_>>(), "replaying to replacement stages");
        let input = replay.layer_in.clone();
        self.replay_step(k, replay, route, 0, input, Vec::new())
    }

    fn is_cover(&self, route: &[Hop], from: usize) -> bool {
        route.first().is_some_and(|h| h.start == from)
            && route
                .last()
                .is_some_and(|h| h.end == self.config.num_layers)
            && route.windows(2).all(|w| w[0].end == w[1].start)
            && route.iter().all(|h| h.start < h.end)
    }

    fn no_route(&self, from: usize) -> Next {
        if let Some(message) = &self.busy {
            return Next::Failed(ChainError::Busy {
                model: self.config.model.short(),
                message: message.clone(),
            });
        }
        Next::Failed(ChainError::NoRoute {
            model: self.config.model.short(),
            from,
            to: self.config.num_layers,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        hop: &Hop,
        session: SessionId,
        position: usize,
        tokens: Vec<u32>,
        hidden: Option<Activations>,
        chunks: Vec<u32>,
        all_rows: bool,
    ) -> Box<Forward> {
        Box::new(Forward {
            session,
            model: self.config.model,
            start: hop.start as u32,
            end: hop.end as u32,
            position: position as u32,
            tokens,
            hidden,
            chunks,
            sampling: (hop.end == self.config.num_layers)
                .then(|| Box::new(self.config.params.clone())),
            reply_dtype: self.config.wire,
            all_rows,
            prompt_len: self.prompt_len,
        })
    }

    /// Calls hop `k` with the current feed.
    fn forward_to(&mut self, k: usize, input: Option<Activations>) -> Next {
        let Some(state) = self.hops.get(k) else {
            return self.no_route(0);
        };
        let hop = state.hop.clone();
        let f = self.request(
            &hop,
            state.session,
            state.position,
            self.feed.clone(),
            input.clone(),
            Vec::new(),
            false,
        );
        self.phase = Phase::Forward { k, input };
        Next::Call(hop.peer, f)
    }

    /// Interprets a reply: `Ok(Some(hidden))`, `Ok(None)` with a token in `token`, or the
    /// error and whether to fail over.
    fn interpret(
        &mut self,
        peer: PeerId,
        is_last: bool,
        rows: usize,
        reply: Result<Response, CallFailed>,
    ) -> Result<Outcome, (bool, ChainError)> {
        match reply {
            Ok(Response::Hidden { hidden, .. }) if !is_last => {
                if hidden.rows as usize != rows || hidden.cols != self.config.hidden {
                    // The next stage would refuse these as a bad request, and the user would
                    // get an error instead of a failover.
                    warn!(%peer, rows = hidden.rows, cols = hidden.cols, want_rows = rows, want_cols = self.config.hidden, "stage answered activations of the wrong shape");
                    return Err((true, ChainError::Protocol { peer }));
                }
                if hidden.dtype != self.config.wire {
                    // Rows of another type than asked could not be joined to the next stage's
                    // log, so its failover and referee replays would go without activations.
                    warn!(%peer, got = ?hidden.dtype, want = ?self.config.wire, "stage answered activations of another type than asked");
                    return Err((true, ChainError::Protocol { peer }));
                }
                Ok(Outcome::Hidden(hidden))
            }
            // Asked-for log-probabilities that are missing or malformed: a faulty stage.
            Ok(Response::Token { token, .. })
                if is_last && self.config.params.logprobs.is_none() && self.allows(token) =>
            {
                Ok(Outcome::Token(token))
            }
            Ok(Response::Scored {
                token, logprobs, ..
            }) if is_last => match self.config.params.logprobs {
                Some(n) if logprobs.is_plausible(n, token, usize::MAX) && self.allows(token) => {
                    self.scores = Some(logprobs);
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
            Err(CallFailed { retryable, message }) => {
                warn!(%peer, "stage call failed: {message}");
                Err((
                    retryable,
                    ChainError::Refused {
                        peer,
                        code: ErrorCode::Internal,
                        message,
                    },
                ))
            }
        }
    }

    fn forward_reply(
        &mut self,
        k: usize,
        input: Option<Activations>,
        reply: Result<Response, CallFailed>,
    ) -> Next {
        let n = self.feed.len();
        let hop = self.hops[k].hop.clone();
        let is_last = hop.end == self.config.num_layers;
        match self.interpret(hop.peer, is_last, n, reply) {
            Ok(Outcome::Hidden(out)) => {
                let state = &mut self.hops[k];
                state.position += n;
                state.inputs.extend(input);
                self.forward_to(k + 1, Some(out))
            }
            Ok(Outcome::Token(token)) => {
                let state = &mut self.hops[k];
                state.position += n;
                state.inputs.extend(input);
                self.finish(token)
            }
            Err((false, e)) => Next::Failed(e),
            Err((true, e)) => self.fail_over(k, input, e),
        }
    }

    /// Hop `k` failed on the current feed: log what layer `from` must be replayed, exclude the
    /// peer and ask for a route.
    fn fail_over(&mut self, k: usize, input: Option<Activations>, why: ChainError) -> Next {
        let from = self.hops[k].hop.start;
        let layer_in = if from == 0 {
            None
        } else {
            let mut parts = self.hops[k].inputs.clone();
            parts.extend(input);
            Activations::concat(&parts)
        };
        let mut tokens = self.tokens.clone();
        tokens.extend_from_slice(&self.feed);
        let mut chunks = self.calls.clone();
        chunks.push(self.feed.len() as u32);
        let replay = Replay {
            from,
            layer_in,
            tokens,
            chunks,
        };
        let failed = (self.hops[k].hop.clone(), self.hops[k].session);
        self.reroute(k, replay, failed, why)
    }

    /// Excludes `failed` (a stage and its session) and asks for a route from `replay.from`.
    /// A stage that refused for lack of room (`Busy`) is routed around like a failed one, but
    /// not blamed (a full node is not a faulty one), and the route is looked for once rather
    /// than waited for (a busy node is not being replaced).
    fn reroute(
        &mut self,
        k: usize,
        replay: Replay,
        (failed, session): (Hop, SessionId),
        why: ChainError,
    ) -> Next {
        if !self.exclude.contains(&failed.peer) {
            self.exclude.push(failed.peer);
        }
        self.busy = match &why {
            ChainError::Refused {
                code: ErrorCode::Busy,
                message,
                ..
            } => Some(message.clone()),
            _ => {
                self.to_blame.push(failed.peer);
                None
            }
        };
        self.release((failed.peer, session));
        self.failovers += 1;
        if self.failovers > self.config.max_failovers {
            warn!("giving up: {why}");
            if self.busy.is_some() {
                return self.no_route(replay.from);
            }
            return Next::Failed(ChainError::TooManyFailovers(self.failovers - 1));
        }
        warn!(failed = %failed.peer, layers = %format!("{}..{}", failed.start, failed.end), "stage failed ({why}); rerouting");
        let from = replay.from;
        self.phase = Phase::Reroute { k, replay };
        Next::Route {
            from,
            wait: self.busy.is_none(),
        }
    }

    /// Replays to `route[j]`, or rejoins the old chain if `route[j]` is one of its later
    /// stages.
    fn replay_step(
        &mut self,
        k: usize,
        replay: Replay,
        route: Vec<Hop>,
        j: usize,
        input: Option<Activations>,
        replayed: Vec<HopState>,
    ) -> Next {
        let Some(hop) = route.get(j).cloned() else {
            return self.no_route(replay.from);
        };
        // Only onto a stage that has not taken the current feed yet (one after the stage that
        // failed: a replay from layer 0 may pass stages before it), and only when every stage
        // kept from there on is still good: not on a peer this chain excluded (a failed peer
        // the transport routes to again, reconnected, or a dead one), not released (its
        // session closed: a replay of this failover went to its peer), and not on a peer
        // this route replayed to (the chain names each peer once: audits, blame and
        // exclusion are per peer).
        let rejoin = (k + 1..self.hops.len()).find(|&m| {
            self.hops[m].hop == hop
                && self.hops[m].position == self.tokens.len()
                && self.hops[m..].iter().all(|h| {
                    !self.exclude.contains(&h.hop.peer)
                        && !self.released.contains(&(h.hop.peer, h.session))
                        && !replayed.iter().any(|r| r.hop.peer == h.hop.peer)
                })
        });
        if let Some(m) = rejoin {
            // Rejoin: the old stages between the failed one and `m` are no longer used.
            let Some(next_input) = input.as_ref().map(|a| a.tail_rows(self.feed.len())) else {
                self.to_close
                    .extend(replayed.iter().map(|r| (r.hop.peer, r.session)));
                return Next::Failed(ChainError::Protocol { peer: hop.peer });
            };
            let at = k + replayed.len();
            let mut hops: Vec<HopState> = self.hops[..k].to_vec();
            hops.extend(replayed);
            hops.extend(self.hops[m..].iter().cloned());
            self.commit(hops);
            return self.forward_to(at, Some(next_input));
        }
        // The old stages on this peer (a survivor that took the lost layers over next to its
        // own, before or after the failed stage) are not rejoined: their closes go out now,
        // before the replay reserves room for another, so the peer holds two KV caches of
        // this chain at most until they land, not until the failover ends. (`hops[..k]` is never on a replacement's peer: `on_route` refuses
        // such routes.)
        let superseded: Vec<(PeerId, SessionId)> = self.hops[k..]
            .iter()
            .filter(|h| h.hop.peer == hop.peer)
            .map(|h| (h.hop.peer, h.session))
            .collect();
        superseded.into_iter().for_each(|s| self.release(s));
        let is_last = hop.end == self.config.num_layers;
        self.reopened += 1;
        let session = reopened_session(self.config.session, self.reopened);
        let f = self.request(
            &hop,
            session,
            0,
            replay.tokens.clone(),
            input.clone(),
            replay.chunks.clone(),
            !is_last,
        );
        let peer = hop.peer;
        self.phase = Phase::Replay {
            k,
            replay,
            route,
            j,
            input,
            session,
            replayed,
        };
        Next::Call(peer, f)
    }

    #[allow(clippy::too_many_arguments)]
    fn replay_reply(
        &mut self,
        k: usize,
        replay: Replay,
        route: Vec<Hop>,
        (j, session): (usize, SessionId),
        input: Option<Activations>,
        mut replayed: Vec<HopState>,
        reply: Result<Response, CallFailed>,
    ) -> Next {
        let hop = route[j].clone();
        let is_last = hop.end == self.config.num_layers;
        let positions = replay.tokens.len();
        match self.interpret(hop.peer, is_last, positions, reply) {
            Ok(out) => {
                replayed.push(HopState {
                    hop,
                    session,
                    position: positions,
                    inputs: input.into_iter().collect(),
                });
                match out {
                    Outcome::Hidden(out) => {
                        self.replay_step(k, replay, route, j + 1, Some(out), replayed)
                    }
                    Outcome::Token(token) => {
                        let mut hops: Vec<HopState> = self.hops[..k].to_vec();
                        hops.extend(replayed);
                        self.commit(hops);
                        self.finish(token)
                    }
                }
            }
            Err((false, e)) => {
                // The generation ends here: what this failover opened goes too.
                self.to_close
                    .extend(replayed.iter().map(|r| (r.hop.peer, r.session)));
                self.to_close.push((hop.peer, session));
                Next::Failed(e)
            }
            Err((true, e)) => {
                // A replacement failed too: drop what was replayed (sessions of their own,
                // whatever else the chain holds on those peers), route again from `from`.
                self.to_close
                    .extend(replayed.iter().map(|r| (r.hop.peer, r.session)));
                self.reroute(k, replay, (hop, session), e)
            }
        }
    }

    /// Closes an old stage's session before the failover commits (see `released`).
    fn release(&mut self, key: (PeerId, SessionId)) {
        if !self.released.contains(&key) {
            self.released.push(key);
            self.to_close.push(key);
        }
    }

    /// Makes `hops` the chain; old stages no longer in it get their sessions closed (those
    /// released already were).
    fn commit(&mut self, hops: Vec<HopState>) {
        for old in &self.hops {
            let key = (old.hop.peer, old.session);
            if !hops.iter().any(|h| (h.hop.peer, h.session) == key) && !self.released.contains(&key)
            {
                self.to_close.push(key);
            }
        }
        self.hops = hops;
        self.released.clear();
    }

    fn finish(&mut self, token: u32) -> Next {
        self.tokens.extend_from_slice(&self.feed);
        self.calls.push(self.feed.len() as u32);
        self.phase = Phase::Idle;
        self.busy = None;
        Next::Token(token)
    }
}

enum Outcome {
    Hidden(Activations),
    Token(u32),
}

/// Forks `chain` after its first `keep` positions into a new chain under `session` sampling
/// with `params` ([`Chain::forked`]): every stage copies those positions of its session. When
/// any stage refuses, the copies already made are closed and the reason is returned: the
/// caller then opens a chain from position 0.
pub fn fork(
    chain: &Chain,
    keep: usize,
    session: SessionId,
    params: SamplingParams,
    transport: &mut impl Transport,
) -> Result<Chain, String> {
    let child = chain
        .forked(session, params, keep)
        .ok_or_else(|| format!("the chain does not hold {keep} positions to share"))?;
    let mut done: Vec<PeerId> = Vec::new();
    for (peer, from) in chain.sessions() {
        if let Err(why) = transport.fork(peer, from, session, keep) {
            // The refusing peer too: a lost answer may hide a fork that was made.
            for p in done.into_iter().chain([peer]) {
                transport.close(p, session);
            }
            return Err(format!("stage {peer} did not fork: {why}"));
        }
        done.push(peer);
    }
    Ok(child)
}

/// Runs one feed to its end through `transport`.
pub fn drive(
    chain: &mut Chain,
    tokens: &[u32],
    transport: &mut impl Transport,
) -> Result<u32, ChainError> {
    let mut next = chain.start(tokens);
    loop {
        for (peer, session) in chain.take_closes() {
            transport.close(peer, session);
        }
        for peer in chain.take_blamed() {
            transport.blame(peer);
        }
        next = match next {
            Next::Call(peer, f) => {
                let reply = transport.call(peer, *f);
                chain.on_reply(reply)
            }
            Next::Route { from, wait } => {
                let route = transport.route(from, chain.config.num_layers, chain.excluded(), wait);
                chain.on_route(route)
            }
            Next::Token(t) => return Ok(t),
            Next::Failed(e) => return Err(e),
        };
    }
}

#[cfg(test)]
mod tests {
    //! The machine driven in memory: real stages behind an in-memory transport that kills a
    //! peer or loses a reply at any chosen call, checked against the whole model. The
    //! exhaustive sweeps use the tiny 2-layer fixture model (two hops, fast); a few cases use
    //! SmolLM2 split in three, for the middle stage.

    use super::*;
    use crate::engine::EngineActor;
    use crate::route::{best_route, Candidate};
    use plexus_model::generate::{LocalChain, TokenChain};
    use plexus_model::layers::Mode;
    use plexus_model::load::ModelFiles;
    use plexus_model::{LayerSpan, Stage};
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    const STEPS: usize = 5;
    const MODEL: Digest = Digest([7; 32]);

    /// A model, its split, and a prompt.
    #[derive(Clone)]
    struct Fixture {
        path: PathBuf,
        layers: usize,
        hidden: u32,
        /// Servers: span and claimed cost. Two per stage and one slow whole-model node, so
        /// any two failures leave a route.
        servers: Vec<((usize, usize), f64)>,
        prompt: Vec<u32>,
    }

    impl Fixture {
        fn stages(&self) -> usize {
            self.servers.iter().filter(|(_, c)| *c < 1.0).count() / 2
        }
    }

    fn tiny() -> Fixture {
        Fixture {
            path: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/tiny/llama2/model-q4_1.gguf"),
            layers: 2,
            hidden: 64,
            servers: vec![
                ((0, 1), 1e-3),
                ((0, 1), 1e-3),
                ((1, 2), 1e-3),
                ((1, 2), 1e-3),
                ((0, 2), 1.0),
            ],
            prompt: vec![0, 17, 42, 99],
        }
    }

    fn smol() -> Fixture {
        Fixture {
            path: plexus_testkit::real_model(),
            layers: 30,
            hidden: 576,
            servers: vec![
                ((0, 10), 1e-3),
                ((0, 10), 1e-3),
                ((10, 20), 1e-3),
                ((10, 20), 1e-3),
                ((20, 30), 1e-3),
                ((20, 30), 1e-3),
                ((0, 30), 1.0),
            ],
            prompt: vec![1, 504, 3458, 314],
        }
    }

    fn stage(path: &std::path::Path, span: (usize, usize)) -> Arc<Stage> {
        type Cache = Mutex<HashMap<(PathBuf, (usize, usize)), Arc<Stage>>>;
        static STAGES: OnceLock<Cache> = OnceLock::new();
        let mut stages = STAGES.get_or_init(Default::default).lock().unwrap();
        Arc::clone(stages.entry((path.to_path_buf(), span)).or_insert_with(|| {
            let files = ModelFiles::open(path).unwrap();
            Arc::new(
                files
                    .stage(Some(LayerSpan::new(span.0, span.1)), Mode::Infer)
                    .unwrap(),
            )
        }))
    }

    /// The tokens of the whole model, fed as the chain feeds them.
    fn reference(fx: &Fixture) -> Vec<u32> {
        let files = ModelFiles::open(&fx.path).unwrap();
        let whole = [files.stage(None, Mode::Infer).unwrap()];
        let mut local = LocalChain::new(&whole, SamplingParams::greedy());
        let mut out = vec![local.feed(&fx.prompt).unwrap()];
        while out.len() < STEPS {
            let last = *out.last().unwrap();
            out.push(local.feed(&[last]).unwrap());
        }
        out
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fault {
        /// The callee dies before computing.
        KillBefore,
        /// The callee computes, then dies: the reply is lost.
        KillAfter,
        /// The reply is lost; the callee lives on (with its cache advanced).
        LoseReply,
        /// The callee answers activations one column too wide.
        WrongWidth,
        /// The callee answers its activations in f16 where f32 was asked.
        WrongType,
        /// The last stage answers the token after the one it sampled (outside the mask).
        OffMask,
        /// The callee refuses for lack of room (as a node whose KV budget is taken).
        Busy,
    }

    struct MemPeer {
        id: PeerId,
        span: (usize, usize),
        cost: f64,
        engine: EngineActor,
        alive: bool,
        /// Another span the peer answers (a check stage its engine keeps) and lists at this
        /// cost.
        extra: Option<((usize, usize), f64)>,
        /// Listed by the directory from this call number on (a node that takes layers over
        /// announces them late).
        listed_from: usize,
    }

    /// Stage calls as function calls; `faults` fire at the given call numbers (0-based).
    struct Mem {
        fx: Fixture,
        me: PeerId,
        peers: Vec<MemPeer>,
        faults: Vec<(usize, Fault)>,
        calls: usize,
        /// Positions sent in all calls.
        positions: usize,
        blamed: Vec<PeerId>,
        closed: Vec<(PeerId, SessionId)>,
        /// Closes sent and not landed yet: each lands on its peer right after that peer's
        /// next call (a close goes out in the background and may arrive after a later call).
        in_flight: Vec<(PeerId, SessionId)>,
        /// Every call as peer, session and position.
        sessions_called: Vec<(PeerId, SessionId, u32)>,
        /// Every close with the number of calls made before it.
        closed_after: Vec<(PeerId, SessionId, usize)>,
        /// The `wait` of every route look-up.
        waits: Vec<bool>,
    }

    impl Mem {
        fn new(fx: &Fixture, faults: Vec<(usize, Fault)>) -> Self {
            let peers = fx
                .servers
                .iter()
                .map(|&(span, cost)| MemPeer {
                    id: PeerId::random(),
                    span,
                    cost,
                    engine: EngineActor::local(stage(&fx.path, span), MODEL),
                    alive: true,
                    extra: None,
                    listed_from: 0,
                })
                .collect();
            Self {
                fx: fx.clone(),
                me: PeerId::random(),
                peers,
                faults,
                calls: 0,
                positions: 0,
                blamed: Vec::new(),
                closed: Vec::new(),
                in_flight: Vec::new(),
                sessions_called: Vec::new(),
                closed_after: Vec::new(),
                waits: Vec::new(),
            }
        }
    }

    impl Mem {
        /// One call as the peer answers it, faults included.
        fn answer(&mut self, peer: PeerId, f: Forward) -> Result<Response, CallFailed> {
            let n = self.calls;
            self.calls += 1;
            self.positions += f.tokens.len();
            let fault = self.faults.iter().find(|(at, _)| *at == n).map(|(_, f)| *f);
            let me = self.me;
            let p = self.peers.iter_mut().find(|p| p.id == peer).unwrap();
            let lost = || CallFailed {
                retryable: true,
                message: "connection closed".into(),
            };
            if !p.alive || fault == Some(Fault::KillBefore) {
                p.alive = false;
                return Err(lost());
            }
            if fault == Some(Fault::Busy) {
                return Ok(Response::Error {
                    code: ErrorCode::Busy,
                    message: "the KV cache budget is taken".into(),
                });
            }
            let mut reply = p.engine.serve(me, &f);
            match fault {
                Some(Fault::KillAfter) => {
                    p.alive = false;
                    Err(lost())
                }
                Some(Fault::LoseReply) => Err(lost()),
                Some(Fault::WrongWidth) => {
                    if let Response::Hidden { hidden, .. } = &mut reply {
                        let (rows, cols) = (hidden.rows as usize, hidden.cols as usize + 1);
                        *hidden =
                            Activations::encode(&vec![0.0; rows * cols], rows, cols, DType::F32);
                    }
                    Ok(reply)
                }
                Some(Fault::WrongType) => {
                    if let Response::Hidden { hidden, .. } = &mut reply {
                        let (rows, cols) = (hidden.rows as usize, hidden.cols as usize);
                        *hidden = Activations::encode(&hidden.to_f32(), rows, cols, DType::F16);
                    }
                    Ok(reply)
                }
                Some(Fault::OffMask) => {
                    if let Response::Token { token, .. } = &mut reply {
                        *token += 1;
                    }
                    Ok(reply)
                }
                _ => Ok(reply),
            }
        }
    }

    impl Transport for Mem {
        fn call(&mut self, peer: PeerId, f: Forward) -> Result<Response, CallFailed> {
            assert!(
                !self.closed.contains(&(peer, f.session)),
                "call {} goes to a session the chain closed on {peer}",
                self.calls
            );
            self.sessions_called.push((peer, f.session, f.position));
            let reply = self.answer(peer, f);
            // The closes sent to this peer land now, after this call.
            let me = self.me;
            let landing: Vec<SessionId> = self
                .in_flight
                .extract_if(.., |(p, _)| *p == peer)
                .map(|(_, s)| s)
                .collect();
            let p = self.peers.iter_mut().find(|p| p.id == peer).unwrap();
            for session in landing {
                p.engine.close(me, session);
            }
            reply
        }

        fn route(
            &mut self,
            from: usize,
            to: usize,
            exclude: &[PeerId],
            wait: bool,
        ) -> Option<Vec<Hop>> {
            self.waits.push(wait);
            // Dead peers stay listed (a directory learns of deaths late).
            let cands: Vec<Candidate> = self
                .peers
                .iter()
                .filter(|p| p.listed_from <= self.calls)
                .flat_map(|p| {
                    std::iter::once((p.span, p.cost))
                        .chain(p.extra)
                        .map(|(span, cost)| Candidate {
                            peer: p.id,
                            start: span.0,
                            end: span.1,
                            compute_s: cost,
                            rtt: Some(Duration::from_millis(1)),
                            load: 0.0,
                            price_s: 0.0,
                            full: false,
                        })
                })
                .collect();
            best_route(&cands, from, to, exclude).map(|(r, _)| r)
        }

        fn close(&mut self, peer: PeerId, session: SessionId) {
            self.closed.push((peer, session));
            self.in_flight.push((peer, session));
            self.closed_after.push((peer, session, self.calls));
        }

        fn blame(&mut self, peer: PeerId) {
            self.blamed.push(peer);
        }

        fn fork(
            &mut self,
            peer: PeerId,
            from: SessionId,
            to: SessionId,
            positions: usize,
        ) -> Result<(), String> {
            let me = self.me;
            let p = self.peers.iter_mut().find(|p| p.id == peer).unwrap();
            if !p.alive {
                return Err("connection closed".into());
            }
            match p.engine.fork(me, from, to, positions) {
                Response::Forked { positions: n } if n as usize == positions => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    }

    /// Generates `STEPS` tokens through `mem`; the tokens and the chain.
    fn generate(mem: &mut Mem) -> (Result<Vec<u32>, ChainError>, Chain) {
        let fx = mem.fx.clone();
        let route = mem.route(0, fx.layers, &[], false).unwrap();
        let mut c = Chain::new(
            ChainConfig {
                model: MODEL,
                num_layers: fx.layers,
                hidden: fx.hidden,
                params: SamplingParams::greedy(),
                wire: DType::F32,
                session: SessionId([1; 16]),
                max_failovers: 4,
            },
            route,
        );
        let mut out = Vec::new();
        let mut feed = fx.prompt.clone();
        while out.len() < STEPS {
            match drive(&mut c, &feed, mem) {
                Ok(t) => {
                    out.push(t);
                    feed = vec![t];
                }
                Err(e) => return (Err(e), c),
            }
        }
        (Ok(out), c)
    }

    /// A replay to a peer that holds a later stage of the chain closes that stage first and
    /// never rejoins it, even when its route fails. The chain is A (0..1), C (1..2); A dies on
    /// the second token. The first route from layer 0 replays to C's check stage of 0..1
    /// (closing C's stage 1..2 first: C never holds two KV caches of the chain) and then to
    /// W, a node that just announced 1..2, which dies too. The next route is Y (0..1) and C
    /// (1..2): C is replayed under a fresh session, not rejoined (its old session is closed).
    #[test]
    fn a_replay_to_a_later_stages_peer_closes_that_stage_first_and_never_rejoins_it() {
        let fx = tiny();
        let mut mem = Mem::new(
            &Fixture {
                servers: vec![((0, 1), 1.0), ((1, 2), 1.0), ((1, 2), 0.5), ((0, 1), 1.5)],
                ..fx.clone()
            },
            vec![(2, Fault::KillBefore), (4, Fault::KillBefore)],
        );
        let check = stage(&fx.path, (0, 1));
        let c = &mut mem.peers[1];
        c.engine.keep_check(check);
        c.extra = Some(((0, 1), 2.0));
        mem.peers[2].listed_from = 3;
        mem.peers[3].listed_from = 5;
        let (got, chain) = generate(&mut mem);
        assert_eq!(got.unwrap(), reference(&fx));
        let (a, c, w, y) = (
            mem.peers[0].id,
            mem.peers[1].id,
            mem.peers[2].id,
            mem.peers[3].id,
        );
        assert_eq!(chain.excluded(), &[a, w]);
        assert_eq!(chain.failovers(), 2);
        assert_eq!(
            chain.route().iter().map(|h| h.peer).collect::<Vec<_>>(),
            vec![y, c]
        );
        // C: its old session closed before its first replay; two replays (0..1, then 1..2)
        // under sessions of their own, the first closed; the chain holds the second.
        let base = SessionId([1; 16]);
        let replays: Vec<usize> = (0..mem.sessions_called.len())
            .filter(|&i| {
                let (p, s, at) = mem.sessions_called[i];
                p == c && s != base && at == 0
            })
            .collect();
        assert_eq!(replays.len(), 2);
        let closed_base = mem
            .closed_after
            .iter()
            .find(|&&(p, s, _)| p == c && s == base)
            .unwrap()
            .2;
        assert!(closed_base <= replays[0]);
        let (first, second) = (
            mem.sessions_called[replays[0]].1,
            mem.sessions_called[replays[1]].1,
        );
        assert!(mem.closed.contains(&(c, first)));
        assert_eq!(chain.sessions()[1], (c, second));
    }

    /// A close that lands late cannot touch the stage that replaced the session it frees.
    /// The chain is A (0..1), B (1..2); A dies on the second token. The first route replays
    /// to X (0..1) and W (1..2, just announced), which dies: X's replayed session is closed.
    /// The next route goes back to X (and rejoins B); that close reaches X only after X's new
    /// replay (the in-memory transport lands every close after the peer's next call). X
    /// holds the new replay under another session id, so the generation goes on undisturbed
    /// (with one session id per chain, the close would have wiped the new replay).
    #[test]
    fn a_late_close_never_frees_a_session_the_chain_uses() {
        let fx = tiny();
        let mut mem = Mem::new(
            &Fixture {
                servers: vec![((0, 1), 1.0), ((1, 2), 1.0), ((0, 1), 1.5), ((1, 2), 0.5)],
                ..fx.clone()
            },
            vec![(2, Fault::KillBefore), (4, Fault::KillBefore)],
        );
        mem.peers[2].listed_from = 3;
        mem.peers[3].listed_from = 3;
        let (got, chain) = generate(&mut mem);
        assert_eq!(got.unwrap(), reference(&fx));
        let (a, b, x, w) = (
            mem.peers[0].id,
            mem.peers[1].id,
            mem.peers[2].id,
            mem.peers[3].id,
        );
        assert_eq!(chain.excluded(), &[a, w]);
        assert_eq!(chain.failovers(), 2);
        assert_eq!(
            chain.route().iter().map(|h| h.peer).collect::<Vec<_>>(),
            vec![x, b]
        );
        // X was replayed twice, under two sessions; the first is closed, the second is the
        // chain's stage there.
        let replays: Vec<SessionId> = mem
            .sessions_called
            .iter()
            .filter(|&&(p, _, at)| p == x && at == 0)
            .map(|&(_, s, _)| s)
            .collect();
        assert_eq!(replays.len(), 2);
        assert_ne!(replays[0], replays[1]);
        assert!(mem.closed.contains(&(x, replays[0])));
        assert_eq!(chain.sessions()[0], (x, replays[1]));
        // Every session id the chain opened on a peer is its own: no two replays share one.
        let mut opened: Vec<(PeerId, SessionId)> = mem
            .sessions_called
            .iter()
            .filter(|(.., at)| *at == 0)
            .map(|&(p, s, _)| (p, s))
            .collect();
        let n = opened.len();
        opened.sort_by_key(|(p, s)| (p.to_bytes(), s.0));
        opened.dedup();
        assert_eq!(opened.len(), n);
    }

    /// A replay from layer 0 passes stages before the failed one, which already took the
    /// current feed: it must replay them too, never rejoin them. The chain is A (0..10),
    /// B (10..20), C (20..30); C dies on the second token. The only route from layer 20 is A's
    /// check stage of 20..30, refused (A holds the chain's first stage), so the chain routes
    /// from layer 0: Y (a node that just announced 0..10), B, A (20..30). B, already fed this
    /// token, is replayed from position 0 (continued, it would take the token twice).
    #[test]
    fn a_replay_from_layer_0_never_rejoins_a_stage_that_took_the_feed() {
        let fx = smol();
        let mut mem = Mem::new(
            &Fixture {
                servers: vec![
                    ((0, 10), 1.0),
                    ((10, 20), 1.0),
                    ((20, 30), 1.0),
                    ((0, 10), 0.5),
                ],
                ..fx.clone()
            },
            vec![(5, Fault::KillBefore)],
        );
        mem.peers[0].engine.keep_check(stage(&fx.path, (20, 30)));
        mem.peers[0].extra = Some(((20, 30), 2.0));
        mem.peers[3].listed_from = 6;
        let (got, chain) = generate(&mut mem);
        assert_eq!(got.unwrap(), reference(&fx));
        let (a, b, y) = (mem.peers[0].id, mem.peers[1].id, mem.peers[3].id);
        assert_eq!(chain.failovers(), 1);
        assert_eq!(
            chain
                .route()
                .iter()
                .map(|h| (h.peer, h.start))
                .collect::<Vec<_>>(),
            vec![(y, 0), (b, 10), (a, 20)]
        );
        // A's and B's old sessions (which took the feed) were closed before their replays,
        // so neither peer holds two KV caches of this chain; each closed once.
        let base = SessionId([1; 16]);
        for peer in [a, b] {
            let replay = mem
                .sessions_called
                .iter()
                .position(|&(p, s, at)| p == peer && s != base && at == 0)
                .unwrap();
            let closes: Vec<usize> = mem
                .closed_after
                .iter()
                .filter(|&&(p, s, _)| p == peer && s == base)
                .map(|&(.., n)| n)
                .collect();
            assert_eq!(closes.len(), 1, "{peer}");
            assert!(closes[0] <= replay, "{peer}: closed after its replay");
        }
    }

    /// A route that replays to a peer holding a later stage of the old chain does not rejoin
    /// the old chain before that stage: the chain would name the peer twice. The chain is A
    /// (0..10), B (10..20), X (20..30); A dies on the first token. The route from layer 0 is
    /// X's check stage of 0..10, B, and Y (20..30, just announced): B (not yet fed the token)
    /// is replayed rather than rejoined, since rejoining it would keep X's old stage too.
    #[test]
    fn a_rejoin_never_keeps_a_stage_on_a_peer_the_route_replayed_to() {
        let fx = smol();
        let mut mem = Mem::new(
            &Fixture {
                servers: vec![
                    ((0, 10), 1.0),
                    ((10, 20), 1.0),
                    ((20, 30), 1.0),
                    ((20, 30), 0.5),
                ],
                ..fx.clone()
            },
            vec![(3, Fault::KillBefore)],
        );
        mem.peers[2].engine.keep_check(stage(&fx.path, (0, 10)));
        mem.peers[2].extra = Some(((0, 10), 2.0));
        mem.peers[3].listed_from = 4;
        let (got, chain) = generate(&mut mem);
        assert_eq!(got.unwrap(), reference(&fx));
        let (b, x, y) = (mem.peers[1].id, mem.peers[2].id, mem.peers[3].id);
        assert_eq!(chain.failovers(), 1);
        assert_eq!(
            chain
                .route()
                .iter()
                .map(|h| (h.peer, h.start))
                .collect::<Vec<_>>(),
            vec![(x, 0), (b, 10), (y, 20)]
        );
        // Every stage under a replay's session; X's and B's old sessions closed.
        let base = SessionId([1; 16]);
        assert!(chain.sessions().iter().all(|(_, s)| *s != base));
        assert!(mem.closed.contains(&(x, base)) && mem.closed.contains(&(b, base)));
    }

    /// Two routes in one failover: stages the first route's replays released are never kept
    /// by a rejoin in the second. The chain is A (0..8), C (8..16), P (16..24), Q (24..30), Q
    /// also holding a check stage of 0..16; A dies on the first token. Route 1 is Q (0..16),
    /// P, and Z (24..30, just announced), which dies: the replays to Q and P closed their old
    /// stages. Route 2 is X (0..8), C, Y (16..30): C, not yet fed the token, would be a rejoin
    /// point, but the stages after it (P, Q) were released, so C is replayed too.
    #[test]
    fn a_rejoin_never_keeps_a_stage_an_earlier_route_released() {
        let fx = smol();
        let mut mem = Mem::new(
            &Fixture {
                servers: vec![
                    ((0, 8), 1.0),
                    ((8, 16), 1.0),
                    ((16, 24), 1.0),
                    ((24, 30), 1.0),
                    ((24, 30), 0.5),
                    ((0, 8), 0.5),
                    ((16, 30), 0.5),
                ],
                ..fx.clone()
            },
            vec![(4, Fault::KillBefore), (7, Fault::KillBefore)],
        );
        mem.peers[3].engine.keep_check(stage(&fx.path, (0, 16)));
        mem.peers[3].extra = Some(((0, 16), 2.5));
        mem.peers[4].listed_from = 5;
        mem.peers[5].listed_from = 8;
        mem.peers[6].listed_from = 8;
        let (got, chain) = generate(&mut mem);
        assert_eq!(got.unwrap(), reference(&fx));
        let id = |i: usize| mem.peers[i].id;
        assert_eq!(chain.excluded(), &[id(0), id(4)]);
        assert_eq!(chain.failovers(), 2);
        assert_eq!(
            chain.route().iter().map(|h| h.peer).collect::<Vec<_>>(),
            vec![id(5), id(1), id(6)]
        );
        // Every old session closed once (A's, the failed one, included).
        let base = SessionId([1; 16]);
        for i in 0..4 {
            let n = mem.closed.iter().filter(|c| **c == (id(i), base)).count();
            assert_eq!(n, 1, "peer {i}");
        }
    }

    #[test]
    fn an_undisturbed_chain_gives_the_whole_models_tokens() {
        for fx in [tiny(), smol()] {
            let mut mem = Mem::new(&fx, Vec::new());
            let (got, c) = generate(&mut mem);
            assert_eq!(got.unwrap(), reference(&fx));
            assert_eq!(c.failovers(), 0);
            assert_eq!(c.route().len(), fx.stages());
            // One call per stage per feed.
            assert_eq!(mem.calls, fx.stages() * STEPS);
        }
    }

    fn sampled(seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            seed,
            ..SamplingParams::greedy()
        }
    }

    /// Feeds `first`, then every sampled token, until `STEPS` tokens.
    fn run(c: &mut Chain, mem: &mut Mem, first: &[u32]) -> Result<Vec<u32>, ChainError> {
        let mut out = Vec::new();
        let mut feed = first.to_vec();
        while out.len() < STEPS {
            let t = drive(c, &feed, mem)?;
            out.push(t);
            feed = vec![t];
        }
        Ok(out)
    }

    fn fresh(mem: &mut Mem, params: SamplingParams, session: u8) -> Chain {
        let fx = mem.fx.clone();
        let route = mem.route(0, fx.layers, &[], false).unwrap();
        Chain::new(
            ChainConfig {
                model: MODEL,
                num_layers: fx.layers,
                hidden: fx.hidden,
                params,
                wire: DType::F32,
                session: SessionId([session; 16]),
                max_failovers: 4,
            },
            route,
        )
    }

    /// Issue 9: the second choice of a request, forked from the first's chain after all but
    /// the prompt's last position, samples the tokens a fresh chain with its seed samples,
    /// and computes only the prompt's last position again; with a stage killed or a reply
    /// lost at any of its calls, the failover replays the shared positions from the fork's
    /// log and the text is still the fresh chain's.
    #[test]
    fn a_forked_chain_gives_a_fresh_chains_tokens_and_replays_the_shared_prompt_issue_9() {
        for fx in [tiny(), smol()] {
            let mut mem = Mem::new(&fx, Vec::new());
            let mut c = fresh(&mut mem, sampled(11), 2);
            let want = run(&mut c, &mut mem, &fx.prompt).unwrap();
            let mut parent = fresh(&mut mem, sampled(10), 3);
            let first = run(&mut parent, &mut mem, &fx.prompt).unwrap();
            assert_ne!(first, want, "the seeds should sample differently");
            let keep = fx.prompt.len() - 1;
            let before = mem.positions;
            let mut child = fork(&parent, keep, SessionId([4; 16]), sampled(11), &mut mem).unwrap();
            assert_eq!(child.tokens(), &fx.prompt[..keep]);
            let got = run(&mut child, &mut mem, &fx.prompt[keep..]).unwrap();
            assert_eq!(got, want);
            // One position per stage per token: the shared prompt was not computed again.
            assert_eq!(mem.positions - before, fx.stages() * STEPS);

            let stages = fx.stages();
            for fault in [Fault::KillBefore, Fault::LoseReply] {
                for at in 0..stages * 2 {
                    let mut mem = Mem::new(&fx, Vec::new());
                    let mut parent = fresh(&mut mem, sampled(10), 3);
                    run(&mut parent, &mut mem, &fx.prompt).unwrap();
                    let mut child =
                        fork(&parent, keep, SessionId([4; 16]), sampled(11), &mut mem).unwrap();
                    mem.faults = vec![(mem.calls + at, fault)];
                    let got = run(&mut child, &mut mem, &fx.prompt[keep..]);
                    assert_eq!(got.unwrap(), want, "{fault:?} at the fork's call {at}");
                    assert_eq!(child.failovers(), 1, "{fault:?} at the fork's call {at}");
                }
            }
        }
    }

    /// A stage that cannot fork (dead, or its session gone) fails the fork as a whole, and
    /// the copies the others made are closed; a chain that holds fewer positions than asked
    /// is not forked.
    #[test]
    fn a_fork_refused_by_any_stage_is_no_fork_issue_9() {
        let fx = tiny();
        let mut mem = Mem::new(&fx, Vec::new());
        let mut parent = fresh(&mut mem, sampled(10), 3);
        run(&mut parent, &mut mem, &fx.prompt).unwrap();
        let held = fx.prompt.len() + STEPS - 1;
        assert!(fork(&parent, held + 1, SessionId([4; 16]), sampled(1), &mut mem).is_err());
        let [(first, _), (last, _)] = parent.sessions()[..] else {
            panic!("two stages")
        };
        mem.peers.iter_mut().find(|p| p.id == last).unwrap().alive = false;
        mem.closed.clear();
        let err = fork(&parent, 3, SessionId([4; 16]), sampled(1), &mut mem).unwrap_err();
        assert!(err.contains("did not fork"), "{err}");
        // The first stage's copy is freed (and the refusing stage told to free any it made).
        let child = SessionId([4; 16]);
        assert_eq!(mem.closed, vec![(first, child), (last, child)]);
    }

    /// Runs with one fault at call `at` and checks the text and the failover count.
    fn check_single(fx: &Fixture, want: &[u32], at: usize, fault: Fault) {
        let mut mem = Mem::new(fx, vec![(at, fault)]);
        let (got, c) = generate(&mut mem);
        let last_stage = at % fx.stages() == fx.stages() - 1;
        if matches!(fault, Fault::WrongWidth | Fault::WrongType) && last_stage {
            // The last stage answers a token; there is no width or type to get wrong.
            assert_eq!(c.failovers(), 0);
        } else {
            assert_eq!(c.failovers(), 1, "{fault:?} at call {at}");
            assert_eq!(mem.blamed.len(), 1, "{fault:?} at call {at}");
        }
        assert_eq!(
            got.as_deref().ok(),
            Some(want),
            "{fault:?} at call {at}: {got:?}"
        );
    }

    /// Every call of the undisturbed run (each hop, prefill included) fails once, in each way:
    /// the text never changes and the culprit is blamed.
    #[test]
    fn any_single_fault_at_any_call_leaves_the_text_unchanged() {
        let fx = tiny();
        let want = reference(&fx);
        for fault in [
            Fault::KillBefore,
            Fault::KillAfter,
            Fault::LoseReply,
            Fault::WrongWidth,
            Fault::WrongType,
        ] {
            for at in 0..fx.stages() * STEPS {
                check_single(&fx, &want, at, fault);
            }
        }
    }

    /// The middle of three stages fails, in prefill and in decode: the route from layer 10
    /// replays to its replica and rejoins the old last stage.
    #[test]
    fn a_middle_stage_fault_rejoins_the_old_chain() {
        let fx = smol();
        let want = reference(&fx);
        for (at, fault) in [
            (1, Fault::KillBefore),
            (7, Fault::KillAfter),
            (10, Fault::WrongWidth),
        ] {
            check_single(&fx, &want, at, fault);
        }
    }

    /// Stage 10..20 of three fails and the only route from layer 10 goes through the first
    /// stage's peer (it took the lost span over beside its own): replaying to it would name
    /// that peer twice in the chain, so the chain replays from layer 0 instead.
    #[test]
    fn a_replacement_on_a_kept_stages_peer_replays_from_layer_0() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let hop = |peer, start, end| Hop { peer, start, end };
        let config = ChainConfig {
            model: MODEL,
            num_layers: 30,
            hidden: 4,
            params: SamplingParams::greedy(),
            wire: DType::F32,
            session: SessionId([1; 16]),
            max_failovers: 4,
        };
        let mut chain = Chain::new(config, vec![hop(a, 0, 10), hop(b, 10, 20), hop(c, 20, 30)]);
        assert!(matches!(chain.start(&[5, 6]), Next::Call(p, _) if p == a));
        let hidden = Activations::encode(&[0.5; 8], 2, 4, DType::F32);
        let next = chain.on_reply(Ok(Response::Hidden {
            hidden,
            compute_us: 1,
        }));
        assert!(matches!(next, Next::Call(p, _) if p == b));
        let lost = CallFailed {
            retryable: true,
            message: "connection closed".into(),
        };
        assert!(matches!(
            chain.on_reply(Err(lost)),
            Next::Route { from: 10, .. }
        ));
        let next = chain.on_route(Some(vec![hop(a, 10, 20), hop(c, 20, 30)]));
        assert!(matches!(next, Next::Route { from: 0, .. }), "{next:?}");
        // From layer 0 the same peer is fine: every stage is replaced and replayed.
        let next = chain.on_route(Some(vec![hop(a, 0, 20), hop(c, 20, 30)]));
        assert!(
            matches!(&next, Next::Call(p, f) if *p == a && f.position == 0 && f.start == 0),
            "{next:?}"
        );
    }

    /// A fault, then another on the very next call (the first replay call, or the
    /// continuation of the chain): the chain routes again and the text is still unchanged.
    #[test]
    fn two_faults_in_a_row_leave_the_text_unchanged() {
        let fx = tiny();
        let want = reference(&fx);
        for at in 0..fx.stages() * STEPS {
            for (first, second) in [
                (Fault::KillBefore, Fault::KillBefore),
                (Fault::KillAfter, Fault::LoseReply),
            ] {
                let mut mem = Mem::new(&fx, vec![(at, first), (at + 1, second)]);
                let (got, c) = generate(&mut mem);
                assert_eq!(c.failovers(), 2, "{first:?}+{second:?} at call {at}");
                assert_eq!(
                    got.as_deref().ok(),
                    Some(&want[..]),
                    "{first:?}+{second:?} at call {at}: {got:?}"
                );
            }
        }
    }

    /// Both servers of the middle span die (the second while it is being replayed to): no
    /// route from layer 10 is left, so the chain replays everything from layer 0 to the slow
    /// whole-model node, and the text is unchanged.
    #[test]
    fn with_no_partial_route_the_chain_replays_from_the_first_layer() {
        let fx = smol();
        // Call 4 is the middle stage on the second feed; call 5 the replay to its replica.
        let mut mem = Mem::new(&fx, vec![(4, Fault::KillBefore), (5, Fault::KillAfter)]);
        let (got, c) = generate(&mut mem);
        assert_eq!(got.unwrap(), reference(&fx));
        assert_eq!(c.failovers(), 2);
        let whole = mem.peers.iter().find(|p| p.span == (0, 30)).unwrap().id;
        assert_eq!(
            c.route().iter().map(|h| h.peer).collect::<Vec<_>>(),
            vec![whole]
        );
    }

    #[test]
    fn more_failures_than_allowed_give_up() {
        let faults = (0..20).map(|i| (i, Fault::LoseReply)).collect();
        let mut mem = Mem::new(&tiny(), faults);
        let (got, _) = generate(&mut mem);
        assert!(
            matches!(
                got,
                Err(ChainError::TooManyFailovers(4)) | Err(ChainError::NoRoute { .. })
            ),
            "{got:?}"
        );
    }

    /// A busy stage is routed around (the text is unchanged) without blame and without
    /// waiting for a replacement.
    #[test]
    fn a_busy_stage_is_routed_around_unblamed_issue_8() {
        let fx = tiny();
        let want = reference(&fx);
        for at in 0..fx.stages() * STEPS {
            let mut mem = Mem::new(&fx, vec![(at, Fault::Busy)]);
            let (got, c) = generate(&mut mem);
            assert_eq!(got.as_deref().ok(), Some(&want[..]), "busy at call {at}");
            assert_eq!(c.failovers(), 1);
            assert!(mem.blamed.is_empty(), "busy at call {at}: {:?}", mem.blamed);
            assert_eq!(mem.waits[1..], [false], "busy at call {at}");
        }
    }

    /// When every route left is busy the generation fails as `Busy` (a 429 at the gateway),
    /// not as a missing route, and nobody is blamed.
    #[test]
    fn when_every_stage_is_busy_the_chain_fails_busy_issue_8() {
        let faults = (0..20).map(|i| (i, Fault::Busy)).collect();
        let mut mem = Mem::new(&tiny(), faults);
        let (got, _) = generate(&mut mem);
        match got {
            Err(ChainError::Busy { message, .. }) => {
                assert!(message.contains("KV cache budget"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(mem.blamed.is_empty());
        assert!(mem.waits[1..].iter().all(|w| !w), "{:?}", mem.waits);
    }

    #[test]
    fn a_bad_request_is_not_failed_over() {
        let fx = tiny();
        let mut mem = Mem::new(&fx, Vec::new());
        let (_, mut c) = {
            let route = mem.route(0, fx.layers, &[], false).unwrap();
            (
                (),
                Chain::new(
                    ChainConfig {
                        model: MODEL,
                        num_layers: fx.layers,
                        hidden: fx.hidden,
                        params: SamplingParams::greedy(),
                        wire: DType::F32,
                        session: SessionId([1; 16]),
                        max_failovers: 4,
                    },
                    route,
                ),
            )
        };
        // A token outside the vocabulary: every replica would refuse it the same way.
        let got = drive(&mut c, &[u32::MAX - 1], &mut mem);
        assert!(
            matches!(
                got,
                Err(ChainError::Refused {
                    code: ErrorCode::BadRequest,
                    ..
                })
            ),
            "{got:?}"
        );
        assert_eq!(c.failovers(), 0);
    }

    #[test]
    fn the_last_stage_samples_under_the_mask_and_a_token_outside_it_is_failed_over() {
        let fx = tiny();
        // Call 1 is the last stage's answer to the prompt: it ignores the mask.
        let mut mem = Mem::new(&fx, vec![(1, Fault::OffMask)]);
        let route = mem.route(0, fx.layers, &[], false).unwrap();
        let mut c = Chain::new(
            ChainConfig {
                model: MODEL,
                num_layers: fx.layers,
                hidden: fx.hidden,
                params: SamplingParams::greedy(),
                wire: DType::F32,
                session: SessionId([1; 16]),
                max_failovers: 4,
            },
            route,
        );
        // Only token 5 is allowed; the whole model's greedy token is another.
        assert_ne!(reference(&fx)[0], 5);
        c.set_mask(Some(vec![1 << 5]));
        assert_eq!(drive(&mut c, &fx.prompt, &mut mem).unwrap(), 5);
        assert_eq!(c.failovers(), 1);
        assert_eq!(mem.blamed.len(), 1);
    }
}
