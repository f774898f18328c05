//! The engine actor: one thread that owns this node's [`Stage`] and the KV caches of every
//! session, and runs the stage calls of different sessions that are ready together as one
//! batched forward pass (continuous batching, [`plexus_model::batch`]).
//!
//! ```text
//! service ──Job (bounded)──▶ EngineActor thread ──(Reply, Response)──▶ service ──▶ peer
//!                              │ each step: take every queued job, then plan: all one-position
//!                              │ calls (decodes) + chunks of longer calls (prompts, replays),
//!                              │ oldest first, within `step_positions`; Stage::forward_many
//! ```
//!
//! - A call joins the batch at the next step after it arrives and leaves when its last
//!   position ran; a long call is cut into chunks, so it delays the running decodes by one
//!   chunk at most. Every row is computed from its own inputs, so a call's answer is the
//!   same bit for bit whatever it was batched with and however it was cut.
//! - KV memory: sessions hold reservations from a byte budget, grown in steps as they get
//!   longer; a call whose session cannot grow evicts idle sessions (least recently used first,
//!   never one with a running call) and is refused with `Busy` when that is not enough.
//! - A call whose caller went away (its reply stream closed), or whose session is closed, is
//!   dropped, queued or running.
//! - Coming back from idle, the engine waits briefly (bounded) for the other sessions the last
//!   step answered, so one round of decodes runs as one step ([`crate::gather`]).
//!
//! Sessions are keyed by (caller, session id), hold at most the model's context, expire after
//! `session_ttl` without use, and are capped in number: when a new one would exceed the cap,
//! the peer holding the most sessions loses its least recently used one, so a peer that opens
//! sessions in bulk evicts its own rather than everyone else's.

use plexus_core::receipt::Receipt;
use plexus_core::wire::{Activations, ErrorCode, Forward, Response, SessionId};
use plexus_core::Digest;
use plexus_model::batch::{plan, KvBudget, KvReservation, Want, STEP_POSITIONS};
use plexus_model::sampler::sample_scored;
use plexus_model::stage::{BatchItem, ForwardError};
use plexus_model::{KvCache, LayerSpan, Logits, Stage, StageInput, StageOutput};
use plexus_net::{PeerId, Reply};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::gather::Gather;

/// A stage call waiting for the engine.
pub struct Job {
    pub peer: PeerId,
    pub work: Work,
    /// Where the answer goes (`None` for local work such as a swap).
    pub reply: Option<Reply>,
}

/// A [`Work::Fork`]: session `to` gets the first `positions` positions of session `from`.
pub struct Fork {
    pub from: SessionId,
    pub to: SessionId,
    pub positions: u32,
}

pub enum Work {
    Forward(Box<Forward>),
    Close(SessionId),
    /// Open a session with a copy of another's first positions (both the caller's): see
    /// [`plexus_core::wire::Request::Fork`].
    Fork(Box<Fork>),
    /// Serve another span to new sessions from now on (placement moved this node); open
    /// sessions keep the stage they were opened on until they end or expire.
    Swap(Arc<Stage>),
    /// Keep this stage (another span of the same model) to check other nodes' work with: new
    /// sessions asking for its span open on it; when a kept one must go, the one of the given
    /// span if no session uses it. The spans kept afterwards go back on the channel (see
    /// [`EngineActor::keep_check_instead`]).
    Check(Box<CheckLoad>),
    /// Tests: make the engine thread panic.
    #[cfg(test)]
    Panic,
}

/// A [`Work::Check`]: the stage, the kept span to drop for it when one must go, and where
/// the spans kept afterwards go.
pub struct CheckLoad {
    stage: Arc<Stage>,
    instead: Option<LayerSpan>,
    kept: std::sync::mpsc::SyncSender<Vec<LayerSpan>>,
}

/// Stages of spans this node does not serve that the engine keeps for checks (audits of a
/// span nobody else serves).
pub const MAX_CHECK_STAGES: usize = 2;

/// Limits of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_sessions: usize,
    pub session_ttl: Duration,
    pub queue: usize,
    /// KV cache memory of all sessions, in bytes.
    pub kv_budget: u64,
    /// Positions per batched step (decodes plus chunks of longer calls).
    pub step_positions: usize,
    /// Most positions one call may carry; a longer one is refused.
    pub max_call_positions: usize,
    /// A session used within this long is taken to be in a running generation (between two
    /// of its calls) and is not evicted for KV room: a new session is refused `Busy` instead,
    /// so running streams finish.
    pub kv_evict_idle_after: Duration,
    /// Tests only (`plexus node --cheat`): corrupt every answer (see [`crate::cheat`]).
    pub cheat: Option<crate::cheat::Cheat>,
    /// Tests only (`plexus node --arithmetic`): the arithmetic prompts are computed with.
    pub arithmetic: Arithmetic,
}

/// A digest of the node code on the compute path of a stage call (`build.rs` names the files):
/// part of the announced build identity, since a change there may change the bits.
pub const NODE_COMPUTE_ID: &str = env!("PLEXUS_NODE_COMPUTE_ID");

/// The attention arithmetic of a node: the current build's, or an honest older one whose bits
/// differ, so audits across builds (`crate::audit`) are tested against a real difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arithmetic {
    /// llama.cpp's kernels for each position, as the caller's declared prompt picks them.
    #[default]
    Current,
    /// Every prompt row on the one-chunk kernel, as builds before the tiled prompt-attention
    /// kernel (4321ffc) computed them: honest, not bit-identical (up to a few % relative
    /// difference in the activations, `plexus-verify`'s `tests/cross_build.rs`).
    Untiled,
}

impl Arithmetic {
    /// The build identity a node announces: the package version, the engine's
    /// [`plexus_model::ARITHMETIC_ID`] and [`NODE_COMPUTE_ID`], marked when the arithmetic
    /// differs from this build's (auditors compare bit for bit only within one identity).
    pub fn version(self) -> String {
        let base = format!(
            "{}+{}.{NODE_COMPUTE_ID}",
            env!("CARGO_PKG_VERSION"),
            plexus_model::ARITHMETIC_ID
        );
        match self {
            Arithmetic::Current => base,
            Arithmetic::Untiled => format!("{base}.untiled"),
        }
    }
}

impl std::str::FromStr for Arithmetic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "current" => Ok(Arithmetic::Current),
            "untiled" => Ok(Arithmetic::Untiled),
            _ => Err(format!("unknown arithmetic {s:?} (current or untiled)")),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            session_ttl: Duration::from_secs(300),
            queue: 64,
            kv_budget: 4 << 30,
            step_positions: STEP_POSITIONS,
            max_call_positions: plexus_core::wire::MAX_POSITIONS,
            kv_evict_idle_after: KV_EVICT_IDLE_AFTER,
            cheat: None,
            arithmetic: Arithmetic::Current,
        }
    }
}

/// Sessions' reservations grow by this many positions at a time.
const RESERVE_STEP: usize = 256;

/// Default [`EngineConfig::kv_evict_idle_after`]: a generation calls its stages every few
/// milliseconds (a token) to a few seconds (a stalled reader, a take-over elsewhere).
pub const KV_EVICT_IDLE_AFTER: Duration = Duration::from_secs(30);

/// Shared gauges the service reads for announcements and metrics.
#[derive(Debug, Default)]
pub struct EngineGauges {
    pub sessions: AtomicU32,
    pub queued: AtomicU32,
    /// Calls in the batch now.
    pub running: AtomicU32,
    /// KV bytes reserved by sessions, and the budget.
    pub kv_used: AtomicU64,
    pub kv_budget: AtomicU64,
}

/// The sending side of the engine's inbox.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    pub gauges: Arc<EngineGauges>,
    alive: Arc<AtomicBool>,
}

/// Why the engine did not take a job; the job comes back.
pub enum SubmitError {
    /// The queue is full: the caller may retry later or elsewhere.
    Full(Job),
    /// The engine thread is gone (it panicked): this node cannot serve any more.
    Stopped(Job),
}

impl SubmitError {
    pub fn into_job(self) -> Job {
        match self {
            SubmitError::Full(j) | SubmitError::Stopped(j) => j,
        }
    }
}

/// Why a swap did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("the engine thread stopped")]
    Stopped,
}

impl EngineHandle {
    /// Whether the engine thread still runs. `false` once it stopped, panicking included: the
    /// node must then stop announcing itself.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Hands the engine a new stage, waiting for room in the queue. Blocking: call it from a
    /// blocking thread. `Err` if the engine is gone, so the caller must not announce the span.
    pub fn swap_blocking(&self, peer: PeerId, stage: Arc<Stage>) -> Result<(), SwapError> {
        self.send_blocking(peer, Work::Swap(stage))
    }

    /// Hands the engine a stage to check another span with ([`Work::Check`]; `instead`: the
    /// kept span to drop for it, when one must go) and waits for the spans it keeps
    /// afterwards (the new one among them unless it refused it). Blocking, as
    /// [`Self::swap_blocking`].
    pub fn check_blocking(
        &self,
        peer: PeerId,
        stage: Arc<Stage>,
        instead: Option<LayerSpan>,
    ) -> Result<Vec<LayerSpan>, SwapError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let load = CheckLoad {
            stage,
            instead,
            kept: tx,
        };
        self.send_blocking(peer, Work::Check(Box::new(load)))?;
        rx.recv().map_err(|_| SwapError::Stopped)
    }

    fn send_blocking(&self, peer: PeerId, work: Work) -> Result<(), SwapError> {
        let job = Job {
            peer,
            work,
            reply: None,
        };
        // Count before sending: the engine decrements when it takes the job.
        self.gauges.queued.fetch_add(1, Ordering::AcqRel);
        if self.jobs.send(job).is_err() {
            self.gauges.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SwapError::Stopped);
        }
        Ok(())
    }

    /// Queues a job; gives it back when the queue is full or the engine stopped.
    pub fn try_submit(&self, job: Job) -> Result<(), SubmitError> {
        // Count before sending: the engine may take the job (and decrement) before `try_send`
        // returns, which used to wrap the gauge to ~4e9 for a moment (and announce it).
        self.gauges.queued.fetch_add(1, Ordering::AcqRel);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.gauges.queued.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(job) => SubmitError::Full(job),
                    TrySendError::Disconnected(job) => SubmitError::Stopped(job),
                })
            }
        }
    }
}

/// Marks the engine dead when its thread ends, by return or by panic.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

struct Session {
    /// The stage the session was opened on: after a swap, open sessions go on with the span
    /// they started with (a rebalance never breaks a running stream).
    stage: Arc<Stage>,
    cache: KvCache,
    history: Vec<u32>,
    last_used: Instant,
    /// The KV bytes this session may hold.
    reservation: Option<KvReservation>,
}

type Key = (PeerId, SessionId);

/// A call in the batch: its session is out of the map until the call ends.
struct Call {
    key: Key,
    session: Session,
    forward: Box<Forward>,
    /// The previous stage's activations as f32 (not for the first stage).
    inputs: Option<Vec<f32>>,
    /// Positions run so far.
    done: usize,
    /// The first position the reply covers (the final chunk's, or 0 with `all_rows`).
    reply_from: usize,
    rows_out: Vec<f32>,
    logits: Option<Vec<f32>>,
    reply: Option<Reply>,
    started: Instant,
}

impl Call {
    fn len(&self) -> usize {
        self.forward.tokens.len()
    }
}

/// Owns the stage and the sessions; see the module docs.
pub struct EngineActor {
    stage: Arc<Stage>,
    /// Stages kept to check other spans with ([`Work::Check`]), oldest first.
    checks: Vec<Arc<Stage>>,
    model: Digest,
    config: EngineConfig,
    sessions: HashMap<Key, Session>,
    /// Calls in the batch, in arrival order.
    running: Vec<Call>,
    budget: KvBudget,
    gauges: Arc<EngineGauges>,
    /// The sessions expected back after the last step.
    gather: Gather,
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

impl EngineActor {
    /// Starts the engine thread. Answers go to `replies`.
    pub fn start(
        stage: Arc<Stage>,
        model: Digest,
        config: EngineConfig,
        replies: mpsc::Sender<(Reply, Response)>,
    ) -> EngineHandle {
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue);
        let gauges = Arc::new(EngineGauges::default());
        gauges.kv_budget.store(config.kv_budget, Ordering::Relaxed);
        let actor = EngineActor {
            stage,
            checks: Vec::new(),
            model,
            budget: KvBudget::new(config.kv_budget),
            config,
            sessions: HashMap::new(),
            running: Vec::new(),
            gauges: Arc::clone(&gauges),
            gather: Gather::default(),
        };
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(Arc::clone(&alive));
        std::thread::Builder::new()
            .name("plexus-engine".into())
            .spawn(move || {
                let _alive = guard;
                actor.run(rx, replies)
            })
            .expect("spawning the engine thread");
        EngineHandle {
            jobs: tx,
            gauges,
            alive,
        }
    }

    /// An engine without a thread, for in-memory transports in tests.
    #[cfg(test)]
    pub(crate) fn local(stage: Arc<Stage>, model: Digest) -> Self {
        Self::local_with(stage, model, EngineConfig::default())
    }

    #[cfg(test)]
    pub(crate) fn local_with(stage: Arc<Stage>, model: Digest, config: EngineConfig) -> Self {
        EngineActor {
            stage,
            checks: Vec::new(),
            model,
            budget: KvBudget::new(config.kv_budget),
            config,
            sessions: HashMap::new(),
            running: Vec::new(),
            gauges: Arc::default(),
            gather: Gather::default(),
        }
    }

    /// Runs one forward call in the caller's thread (tests).
    #[cfg(test)]
    pub(crate) fn serve(&mut self, peer: PeerId, f: &Forward) -> Response {
        self.forward(peer, f)
    }

    /// Frees `peer`'s session as a [`Work::Close`] does (tests).
    #[cfg(test)]
    pub(crate) fn close(&mut self, peer: PeerId, session: SessionId) {
        let key = (peer, session);
        self.sessions.remove(&key);
        self.gather.closed(&key);
    }

    /// Runs one call to its end, alone (tests).
    #[cfg(test)]
    fn forward(&mut self, peer: PeerId, f: &Forward) -> Response {
        let mut done = self.serve_batch(vec![(peer, f.clone())]);
        done.pop()
            .map_or(Response::Closed, |(_, r)| r.into_parts().0)
    }

    /// Admits the calls together and steps until all are answered; the answers in call order
    /// (tests: what a batch of calls arriving at once gets).
    #[cfg(test)]
    pub(crate) fn serve_batch(&mut self, calls: Vec<(PeerId, Forward)>) -> Vec<(usize, Response)> {
        let mut answers: Vec<(usize, Response)> = Vec::new();
        let mut order = Vec::new();
        for (i, (peer, f)) in calls.into_iter().enumerate() {
            match self.admit(peer, Box::new(f)) {
                Ok(call) => {
                    order.push((call.key, i));
                    self.running.push(call);
                }
                Err(r) => answers.push((i, r)),
            }
        }
        while !self.running.is_empty() {
            for (key, response, _) in self.step() {
                if let Some(&(_, i)) = order.iter().find(|(k, _)| *k == key) {
                    // Without the commitment the engine hands the service for the receipt.
                    answers.push((i, response.into_parts().0));
                }
            }
        }
        answers.sort_by_key(|(i, _)| *i);
        answers
    }

    fn run(mut self, jobs: Receiver<Job>, replies: mpsc::Sender<(Reply, Response)>) {
        loop {
            // Idle: wait for work (waking now and then to expire sessions). Busy: take what
            // is queued without waiting, so new calls join at the next step.
            let mut woke = None;
            if self.running.is_empty() {
                plexus_model::kernels::release_helpers();
                match jobs.recv_timeout(Duration::from_secs(1)) {
                    Ok(job) => {
                        woke = Some(Instant::now());
                        if !self.take(job, &replies) {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            let mut open = true;
            loop {
                match jobs.try_recv() {
                    Ok(job) => {
                        if !self.take(job, &replies) {
                            open = false;
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = self.running.is_empty();
                        break;
                    }
                }
            }
            if !open {
                break;
            }
            if let Some(woke) = woke {
                if !self.gather_awaited(&jobs, &replies, woke) {
                    break;
                }
            }
            self.drop_abandoned();
            if !self.running.is_empty() {
                let started = Instant::now();
                let finished = self.step();
                self.gather.stepped(
                    finished
                        .iter()
                        .filter(|(_, r, _)| !matches!(r, Response::Error { .. }))
                        .map(|(key, _, _)| *key),
                    started.elapsed(),
                );
                for (_, response, reply) in finished {
                    if let Some(reply) = reply {
                        if replies.blocking_send((reply, response)).is_err() {
                            return;
                        }
                    }
                }
            }
            self.expire();
        }
        debug!("engine stopped");
    }

    /// Takes jobs until the sessions the last step answered are back in the batch or the
    /// gather's bound passed ([`Gather::wait_until`], counted from `woke`); `false` when the
    /// engine should stop.
    fn gather_awaited(
        &mut self,
        jobs: &Receiver<Job>,
        replies: &mpsc::Sender<(Reply, Response)>,
        woke: Instant,
    ) -> bool {
        while let Some(until) = self
            .gather
            .wait_until(self.running.iter().map(|c| &c.key), woke)
        {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match jobs.recv_timeout(left) {
                Ok(job) => {
                    if !self.take(job, replies) {
                        return false;
                    }
                }
                Err(RecvTimeoutError::Timeout) => break,
                // Run what is in hand; the loop stops once it is done.
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        true
    }

    /// Handles one job from the inbox; `false` when the replies channel closed.
    fn take(&mut self, job: Job, replies: &mpsc::Sender<(Reply, Response)>) -> bool {
        self.gauges.queued.fetch_sub(1, Ordering::AcqRel);
        let Job { peer, work, reply } = job;
        let answer = match work {
            Work::Forward(f) => match self.admit(peer, f) {
                Ok(mut call) => {
                    call.reply = reply;
                    self.running.push(call);
                    self.gauges
                        .running
                        .store(self.running.len() as u32, Ordering::Relaxed);
                    return true;
                }
                Err(response) => response,
            },
            Work::Close(session) => {
                let key = (peer, session);
                self.sessions.remove(&key);
                self.gather.closed(&key);
                // A running call of a closed session is dropped; its caller learns why.
                if let Some(at) = self.running.iter().position(|c| c.key == key) {
                    let call = self.running.remove(at);
                    if let Some(reply) = call.reply {
                        let gone = error(ErrorCode::UnknownSession, "the session was closed");
                        if replies.blocking_send((reply, gone)).is_err() {
                            return false;
                        }
                    }
                }
                Response::Closed
            }
            Work::Fork(f) => self.fork(peer, f.from, f.to, f.positions as usize),
            Work::Swap(stage) => {
                self.checks.retain(|c| c.span() != stage.span());
                self.stage = stage;
                Response::Closed
            }
            Work::Check(load) => {
                let CheckLoad {
                    stage,
                    instead,
                    kept,
                } = *load;
                self.keep_check_instead(stage, instead);
                let _ = kept.send(self.checks.iter().map(|c| c.span()).collect());
                Response::Closed
            }
            #[cfg(test)]
            Work::Panic => panic!("injected engine failure"),
        };
        match reply {
            Some(reply) => replies.blocking_send((reply, answer)).is_ok(),
            None => true,
        }
    }

    /// Keeps `stage` to check its span with ([`Work::Check`]), at most [`MAX_CHECK_STAGES`]
    /// stages: beyond them the oldest that no session uses goes. A stage some session uses
    /// is never dropped (an audit keeps its session for a whole generation), so when every
    /// kept stage is in use the new one is refused, as is one of the served span or of a
    /// span already kept. So at most that many check stages are ever alive: only kept stages
    /// open sessions, and a kept stage in use stays kept.
    #[cfg(test)]
    pub(crate) fn keep_check(&mut self, stage: Arc<Stage>) {
        self.keep_check_instead(stage, None);
    }

    /// [`Self::keep_check`], but when one must go and `instead` names a span, only the stage
    /// of that span may go (a stage loaded ahead for a span no single other node serves any
    /// more: audits of it no longer come here); while a session uses it, the new stage is
    /// refused (a guess never evicts another).
    pub(crate) fn keep_check_instead(&mut self, stage: Arc<Stage>, instead: Option<LayerSpan>) {
        let span = stage.span();
        if span == self.stage.span() || self.checks.iter().any(|c| c.span() == span) {
            return;
        }
        if self.checks.len() >= MAX_CHECK_STAGES {
            let used = |c: &Arc<Stage>| {
                self.sessions.values().any(|s| Arc::ptr_eq(&s.stage, c))
                    || self
                        .running
                        .iter()
                        .any(|r| Arc::ptr_eq(&r.session.stage, c))
            };
            let free = match instead {
                Some(i) => self.checks.iter().position(|c| c.span() == i && !used(c)),
                None => self.checks.iter().position(|c| !used(c)),
            };
            let Some(free) = free else {
                return;
            };
            self.checks.remove(free);
        }
        self.checks.push(stage);
    }

    /// Drops the calls whose callers went away: nobody would read the answer.
    fn drop_abandoned(&mut self) {
        let before = self.running.len();
        self.running
            .retain(|c| c.reply.as_ref().is_none_or(Reply::is_open));
        if self.running.len() != before {
            debug!(
                dropped = before - self.running.len(),
                "dropped calls whose callers went away"
            );
        }
    }

    fn expire(&mut self) {
        let ttl = self.config.session_ttl;
        self.sessions.retain(|_, s| s.last_used.elapsed() < ttl);
        self.gauges
            .sessions
            .store(self.held_sessions() as u32, Ordering::Relaxed);
        // Closed, expired and evicted sessions gave their reservations back.
        self.gauges
            .kv_used
            .store(self.budget.used(), Ordering::Relaxed);
    }

    /// Checks a call and takes its session out of the map into a [`Call`], or answers it at
    /// once (refusal).
    fn admit(&mut self, peer: PeerId, f: Box<Forward>) -> Result<Call, Response> {
        let started = Instant::now();
        let key = (peer, f.session);
        if self.running.iter().any(|c| c.key == key) {
            return Err(error(
                ErrorCode::BadRequest,
                format!("a call for session {} is already running", f.session),
            ));
        }
        if f.tokens.len() > self.config.max_call_positions {
            return Err(error(
                ErrorCode::BadRequest,
                format!(
                    "a call carries at most {} positions, this one {}",
                    self.config.max_call_positions,
                    f.tokens.len()
                ),
            ));
        }
        if f.tokens.is_empty() {
            return Err(error(ErrorCode::BadRequest, "a call without positions"));
        }
        let sizes = f.chunk_sizes();
        if sizes.iter().sum::<usize>() != f.tokens.len() || sizes.contains(&0) {
            return Err(error(
                ErrorCode::BadRequest,
                "chunk sizes must be positive and sum to the call's positions",
            ));
        }
        // New sessions open on the current stage, or on a check stage of the span they ask
        // for; open ones continue on their own.
        let asked = (f.start as usize, f.end as usize);
        let stage = match self.sessions.get(&key) {
            Some(s) if f.position != 0 => Arc::clone(&s.stage),
            _ => self
                .checks
                .iter()
                .find(|c| (c.span().start, c.span().end) == asked)
                .filter(|_| (self.stage.span().start, self.stage.span().end) != asked)
                .unwrap_or(&self.stage)
                .clone(),
        };
        let span = stage.span();
        if f.model != self.model || f.start as usize != span.start || f.end as usize != span.end {
            let current = self.stage.span();
            return Err(error(
                ErrorCode::UnknownModel,
                format!(
                    "this node serves layers {current} of {}, not {}..{} of {}",
                    self.model.short(),
                    f.start,
                    f.end,
                    f.model.short()
                ),
            ));
        }
        if stage.is_first() != f.hidden.is_none() {
            return Err(error(
                ErrorCode::BadRequest,
                if stage.is_first() {
                    "the first stage takes token ids, not activations"
                } else {
                    "this stage needs the previous stage's activations"
                },
            ));
        }
        let hidden_size = stage.config().hidden_size;
        if let Some(h) = &f.hidden {
            if h.cols as usize != hidden_size {
                return Err(error(
                    ErrorCode::BadRequest,
                    format!(
                        "activations are {} wide, the model's hidden size is {hidden_size}",
                        h.cols,
                    ),
                ));
            }
            if h.rows as usize != f.tokens.len() {
                return Err(error(
                    ErrorCode::BadRequest,
                    format!(
                        "{} rows of activations for {} positions",
                        h.rows,
                        f.tokens.len()
                    ),
                ));
            }
        }
        let vocab = stage.config().vocab_size;
        if let Some(&id) = f.tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(error(
                ErrorCode::BadRequest,
                format!("token id {id} is outside the vocabulary of {vocab}"),
            ));
        }
        if stage.is_last() && f.sampling.is_none() {
            return Err(error(
                ErrorCode::BadRequest,
                "the last stage needs sampling params",
            ));
        }
        if f.position == 0 {
            self.sessions.remove(&key);
            // Sessions in a running call are out of the map but still held: count them, so
            // the node never holds (nor announces) more than `max_sessions`.
            if !self.make_slot(None) {
                return Err(error(
                    ErrorCode::Busy,
                    format!(
                        "all {} session slots are in running calls",
                        self.config.max_sessions
                    ),
                ));
            }
            self.sessions.insert(
                key,
                Session {
                    stage: Arc::clone(&stage),
                    cache: stage.new_cache(),
                    history: Vec::new(),
                    last_used: Instant::now(),
                    reservation: None,
                },
            );
        }
        let Some(mut session) = self.sessions.remove(&key) else {
            return Err(error(
                ErrorCode::UnknownSession,
                format!("no session {} (expired or never opened)", f.session),
            ));
        };
        if session.cache.len() != f.position as usize {
            let held = session.cache.len();
            self.sessions.insert(key, session);
            return Err(error(
                ErrorCode::PositionMismatch,
                format!(
                    "session {} holds {held} positions, not {}",
                    f.session, f.position
                ),
            ));
        }
        // Refuse before computing anything: the stage would only notice at the chunk that
        // overflows, after running the chunks before it.
        let needed = session.cache.len() + f.tokens.len();
        if needed > session.cache.max_len() {
            let max = session.cache.max_len();
            self.sessions.insert(key, session);
            return Err(error(
                ErrorCode::ContextOverflow,
                ForwardError::ContextOverflow { needed, max }.to_string(),
            ));
        }
        if let Err(message) = self.reserve(&key, &mut session, needed) {
            if f.position == 0 {
                // A session that never held anything is not kept.
                drop(session);
            } else {
                self.sessions.insert(key, session);
            }
            return Err(error(ErrorCode::Busy, message));
        }
        let inputs = f.hidden.as_ref().map(Activations::to_f32);
        let reply_from = if f.all_rows {
            0
        } else {
            f.tokens.len() - sizes.last().copied().unwrap_or(f.tokens.len())
        };
        Ok(Call {
            key,
            session,
            forward: f,
            inputs,
            done: 0,
            reply_from,
            rows_out: Vec::new(),
            logits: None,
            reply: None,
            started,
        })
    }

    /// Opens the caller's session `to` holding a copy of the first `positions` positions of
    /// its session `from`: the prompt the `n` choices of a request share. Refused when `from`
    /// is unknown or in a running call, holds fewer positions, or its stage is not
    /// split-invariant (the copied rows then need not be the bits a fresh session computing
    /// the same positions in other calls would hold); and, like a new session, when no slot
    /// or KV room can be made.
    pub(crate) fn fork(
        &mut self,
        peer: PeerId,
        from: SessionId,
        to: SessionId,
        positions: usize,
    ) -> Response {
        let (src, dst) = ((peer, from), (peer, to));
        if self.running.iter().any(|c| c.key == dst || c.key == src) {
            return error(
                ErrorCode::BadRequest,
                "a fork of or onto a session with a running call",
            );
        }
        let Some(source) = self.sessions.get(&src) else {
            return error(
                ErrorCode::UnknownSession,
                format!("no session {from} to fork (expired or never opened)"),
            );
        };
        if source.cache.len() < positions {
            return error(
                ErrorCode::PositionMismatch,
                format!(
                    "session {from} holds {} positions, fewer than the {positions} to fork",
                    source.cache.len()
                ),
            );
        }
        if !source.stage.split_invariant() {
            return error(
                ErrorCode::BadRequest,
                "this node's weights are not split-invariant: a forked session would not be \
                 exact (open the session from position 0)",
            );
        }
        let stage = Arc::clone(&source.stage);
        // The source is in use (not idle for the KV eviction in `reserve`), and never the
        // session evicted to make room for its fork.
        if let Some(s) = self.sessions.get_mut(&src) {
            s.last_used = Instant::now();
        }
        self.sessions.remove(&dst);
        if !self.make_slot(Some(&src)) {
            return error(
                ErrorCode::Busy,
                format!("all {} session slots are taken", self.config.max_sessions),
            );
        }
        // Room first, then the copy of only the rows asked for.
        let mut session = Session {
            stage: Arc::clone(&stage),
            cache: stage.new_cache(),
            history: Vec::new(),
            last_used: Instant::now(),
            reservation: None,
        };
        if let Err(message) = self.reserve(&dst, &mut session, positions) {
            return error(ErrorCode::Busy, message);
        }
        let Some(source) = self.sessions.get(&src) else {
            return error(
                ErrorCode::UnknownSession,
                format!("session {from} was evicted to make room for its fork"),
            );
        };
        let limit = session
            .reservation
            .as_ref()
            .map_or(positions, KvReservation::positions);
        session.cache = source.cache.prefix(positions);
        session.cache.limit_growth(limit);
        session.history = source.history[..positions.min(source.history.len())].to_vec();
        self.sessions.insert(dst, session);
        self.gauges
            .sessions
            .store(self.held_sessions() as u32, Ordering::Relaxed);
        Response::Forked {
            positions: positions as u32,
        }
    }

    /// Grows `session`'s KV reservation to hold `positions`, evicting idle sessions (least
    /// recently used first; never one in a running call nor one used within
    /// `kv_evict_idle_after`) when the budget is short.
    fn reserve(
        &mut self,
        key: &Key,
        session: &mut Session,
        positions: usize,
    ) -> Result<(), String> {
        let held = session
            .reservation
            .as_ref()
            .map_or(0, KvReservation::positions);
        if positions <= held {
            return Ok(());
        }
        let want = positions
            .next_multiple_of(RESERVE_STEP)
            .min(session.cache.max_len())
            .max(positions);
        let bpp = session.stage.kv_bytes_per_position();
        // The engine thread alone reserves, so what the old reservation frees is there to take.
        session.reservation = None;
        loop {
            match self.budget.reserve(want, bpp) {
                Ok(r) => {
                    session.cache.limit_growth(want);
                    session.reservation = Some(r);
                    self.gauges
                        .kv_used
                        .store(self.budget.used(), Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    let grace = self.config.kv_evict_idle_after;
                    let idle = self
                        .sessions
                        .iter()
                        .filter(|(k, s)| *k != key && s.last_used.elapsed() >= grace)
                        .min_by_key(|(_, s)| s.last_used)
                        .map(|(k, _)| *k);
                    match idle {
                        Some(victim) => {
                            debug!(peer = %victim.0, session = %victim.1, "evicting an idle session for KV room");
                            self.sessions.remove(&victim);
                        }
                        None => {
                            session.reservation = self.budget.reserve(held, bpp).ok();
                            return Err(e.to_string());
                        }
                    }
                }
            }
        }
    }

    /// Runs one batched step over the running calls; returns the calls that finished, with
    /// their answers.
    fn step(&mut self) -> Vec<(Key, Response, Option<Reply>)> {
        let wants: Vec<Want> = self
            .running
            .iter()
            .map(|c| Want {
                ready: c.len() - c.done,
                decoding: c.len() == 1,
            })
            .collect();
        let sizes = plan(&wants, self.config.step_positions);
        // One forward_many per stage (sessions opened before a swap keep their stage).
        let mut groups: Vec<(Arc<Stage>, Vec<usize>)> = Vec::new();
        for (i, c) in self.running.iter().enumerate() {
            if sizes[i] == 0 {
                continue;
            }
            match groups
                .iter_mut()
                .find(|(s, _)| Arc::ptr_eq(s, &c.session.stage))
            {
                Some((_, members)) => members.push(i),
                None => groups.push((Arc::clone(&c.session.stage), vec![i])),
            }
        }
        // Calls of a failed group: (index, code, message).
        let mut failed: Vec<(usize, ErrorCode, String)> = Vec::new();
        for (stage, members) in groups {
            if let Err(e) = self.run_group(&stage, &members, &sizes) {
                warn!("batched step failed: {e}");
                let code = match e {
                    ForwardError::ContextOverflow { .. } => ErrorCode::ContextOverflow,
                    ForwardError::BadToken { .. } | ForwardError::WrongInput { .. } => {
                        ErrorCode::BadRequest
                    }
                    ForwardError::Tensor(_) => ErrorCode::Internal,
                };
                failed.extend(members.iter().map(|&i| (i, code, e.to_string())));
            }
        }
        let mut finished = Vec::new();
        let mut keep = Vec::with_capacity(self.running.len());
        for (i, mut call) in std::mem::take(&mut self.running).into_iter().enumerate() {
            if let Some((_, code, message)) = failed.iter().find(|(j, _, _)| *j == i) {
                // Roll back so the caller can retry from the same position.
                call.session.cache.truncate(call.forward.position as usize);
                call.session
                    .history
                    .truncate(call.forward.position as usize);
                warn!(peer = %call.key.0, session = %call.key.1, "stage call failed: {message}");
                let reply = call.reply.take();
                let key = call.key;
                self.end(call);
                finished.push((key, error(*code, message.clone()), reply));
            } else if call.done == call.len() {
                let (key, response, reply) = self.answer(call);
                finished.push((key, response, reply));
            } else {
                keep.push(call);
            }
        }
        self.running = keep;
        self.gauges
            .running
            .store(self.running.len() as u32, Ordering::Relaxed);
        self.gauges
            .sessions
            .store(self.held_sessions() as u32, Ordering::Relaxed);
        finished
    }

    /// One forward_many over the members' next chunks.
    fn run_group(
        &mut self,
        stage: &Stage,
        members: &[usize],
        sizes: &[usize],
    ) -> Result<(), ForwardError> {
        let hidden = stage.config().hidden_size;
        let mut inputs: Vec<(usize, usize)> = Vec::with_capacity(members.len());
        let hidden_in: Vec<Option<candle_core::Tensor>> = members
            .iter()
            .map(|&i| {
                let c = &self.running[i];
                let (a, n) = (c.done, sizes[i]);
                c.inputs
                    .as_ref()
                    .map(|x| candle_tensor(&x[a * hidden..(a + n) * hidden], n, hidden))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let outs = {
            let mut items: Vec<BatchItem> = Vec::with_capacity(members.len());
            let mut hidden_in = hidden_in.into_iter();
            let mut next = members.iter().peekable();
            for (i, c) in self.running.iter_mut().enumerate() {
                if next.next_if(|&&j| j == i).is_none() {
                    continue;
                }
                let (a, n) = (c.done, sizes[i]);
                inputs.push((a, n));
                let last = a + n == c.forward.tokens.len();
                // The caller declares the session's prompt: it picks the attention kernels.
                let prompt = match self.config.arithmetic {
                    Arithmetic::Current => c.forward.prompt_len as usize,
                    Arithmetic::Untiled => 0,
                };
                c.session.cache.set_prompt(0..prompt);
                let input = match hidden_in.next().flatten() {
                    Some(h) => StageInput::Hidden(h),
                    None => StageInput::Tokens(&c.forward.tokens[a..a + n]),
                };
                items.push(BatchItem {
                    input,
                    cache: &mut c.session.cache,
                    logits: last.then_some(Logits::Last),
                });
            }
            stage.forward_many(&mut items)?
        };
        for ((&i, (a, n)), out) in members.iter().zip(inputs).zip(outs) {
            let c = &mut self.running[i];
            c.session
                .history
                .extend_from_slice(&c.forward.tokens[a..a + n]);
            c.done = a + n;
            match out {
                StageOutput::Hidden(h) => {
                    // Keep only the rows the reply covers.
                    let rows: Vec<f32> = h.flatten_all()?.to_vec1()?;
                    let from = c.reply_from.max(a) - a;
                    if a + n > c.reply_from {
                        c.rows_out.extend_from_slice(&rows[from * hidden..]);
                    }
                }
                StageOutput::Logits(l) => c.logits = Some(l.to_vec1()?),
            }
        }
        Ok(())
    }

    /// The answer of a call whose positions all ran; its session goes back to the map. A
    /// computed answer comes as [`Response::Receipted`] with an unsigned draft holding only
    /// the call's `commitment` ([`plexus_verify::commitment::call_commitment`] of the rows it
    /// returns, or of the logits row it sampled from and the token): the service signs the
    /// real receipt with it.
    fn answer(&mut self, mut call: Call) -> (Key, Response, Option<Reply>) {
        let compute_us = call.started.elapsed().as_micros() as u64;
        let logits = call.logits.take();
        let f = &call.forward;
        let salt = u64::from(f.position)
            ^ u64::from_le_bytes([
                f.session.0[0],
                f.session.0[1],
                f.session.0[2],
                f.session.0[3],
                f.session.0[4],
                f.session.0[5],
                f.session.0[6],
                f.session.0[7],
            ]);
        let (response, commitment) = match logits {
            Some(mut logits) => {
                if let Some(cheat) = self.config.cheat {
                    let width = logits.len();
                    cheat.apply(&mut logits, width, salt);
                }
                let params = f.sampling.as_deref().cloned().unwrap_or_default();
                let position = call.session.history.len() as u64;
                let (mut token, scores) =
                    sample_scored(&logits, &call.session.history, &params, position);
                if let Some(cheat) = self.config.cheat {
                    token = cheat.token(token, &logits);
                }
                let commitment = plexus_verify::commitment::call_commitment(
                    logits.len(),
                    position.saturating_sub(1),
                    &logits,
                    &[token],
                );
                let response = match scores {
                    Some(logprobs) => Response::Scored {
                        token,
                        compute_us,
                        logprobs,
                    },
                    None => Response::Token { token, compute_us },
                };
                (response, commitment)
            }
            None => {
                let hidden = call.session.stage.config().hidden_size;
                if let Some(cheat) = self.config.cheat {
                    cheat.apply(&mut call.rows_out, hidden, salt);
                }
                let rows = call.rows_out.len() / hidden.max(1);
                let encoded = Activations::encode(&call.rows_out, rows, hidden, f.reply_dtype);
                let first = u64::from(f.position) + call.reply_from as u64;
                let commitment = plexus_verify::commitment::call_commitment(
                    hidden,
                    first,
                    &encoded.to_f32(),
                    &[],
                );
                let response = Response::Hidden {
                    hidden: encoded,
                    compute_us,
                };
                (response, commitment)
            }
        };
        let draft = Receipt {
            session: f.session,
            model: f.model,
            start: f.start,
            end: f.end,
            position: f.position,
            positions: f.tokens.len() as u32,
            price: 0,
            input: Digest([0; 32]),
            output: Digest([0; 32]),
            commitment,
            signature: Vec::new(),
        };
        let response = Response::Receipted {
            response: Box::new(response),
            receipt: Box::new(draft),
        };
        let reply = call.reply.take();
        let key = call.key;
        self.end(call);
        (key, response, reply)
    }

    /// Puts a call's session back into the map.
    fn end(&mut self, call: Call) {
        let mut session = call.session;
        session.last_used = Instant::now();
        self.sessions.insert(call.key, session);
        self.gauges
            .sessions
            .store(self.held_sessions() as u32, Ordering::Relaxed);
        self.gauges
            .kv_used
            .store(self.budget.used(), Ordering::Relaxed);
    }

    /// Sessions this node holds: those idle in the map and those out of it in a running call.
    fn held_sessions(&self) -> usize {
        self.sessions.len() + self.running.len()
    }

    /// Evicts idle sessions until one more fits under `max_sessions` (sessions in a running
    /// call count too), never `spare`; `false` when no session is left to evict.
    fn make_slot(&mut self, spare: Option<&Key>) -> bool {
        while self.held_sessions() >= self.config.max_sessions {
            if !self.evict_for_new(spare) {
                return false;
            }
        }
        true
    }

    /// Makes room for one more session: the peer holding the most sessions gives up its least
    /// recently used one (the oldest such session on a tie), other than `spare`. One peer
    /// opening many sessions thus evicts its own, not everyone else's. `false` when there was
    /// none to evict.
    fn evict_for_new(&mut self, spare: Option<&Key>) -> bool {
        let mut holders: HashMap<PeerId, (usize, Instant, SessionId)> = HashMap::new();
        for ((peer, id), s) in self.sessions.iter().filter(|(k, _)| Some(*k) != spare) {
            let h = holders.entry(*peer).or_insert((0, s.last_used, *id));
            h.0 += 1;
            if s.last_used < h.1 {
                (h.1, h.2) = (s.last_used, *id);
            }
        }
        let victim = holders
            .into_iter()
            .max_by(|(_, a), (_, b)| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(peer, (_, _, id))| (peer, id));
        let Some(key) = victim else {
            return false;
        };
        debug!(peer = %key.0, session = %key.1, "evicting a session to make room");
        self.sessions.remove(&key);
        true
    }
}

fn candle_tensor(
    values: &[f32],
    rows: usize,
    cols: usize,
) -> Result<candle_core::Tensor, ForwardError> {
    Ok(candle_core::Tensor::from_slice(
        values,
        (1, rows, cols),
        &candle_core::Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_announce_their_arithmetic() {
        let (current, untiled) = (Arithmetic::Current.version(), Arithmetic::Untiled.version());
        assert!(current.starts_with(env!("CARGO_PKG_VERSION")));
        let ids = format!("+{}.{NODE_COMPUTE_ID}", plexus_model::ARITHMETIC_ID);
        assert!(current.ends_with(&ids), "{current}");
        assert_eq!(plexus_model::ARITHMETIC_ID.len(), 12);
        assert_eq!(NODE_COMPUTE_ID.len(), 8);
        assert_ne!(current, untiled);
        assert!(untiled.starts_with(&current));
        assert!(current.chars().count() <= plexus_core::announce::limits::MAX_NAME_CHARS);
        assert_eq!("untiled".parse::<Arithmetic>(), Ok(Arithmetic::Untiled));
        assert!("tiled".parse::<Arithmetic>().is_err());
    }
    use plexus_model::layers::Mode;
    use plexus_model::load::ModelFiles;

    /// The spans of the check stages `e` keeps, oldest first.
    fn spans(e: &EngineActor) -> Vec<(usize, usize)> {
        e.checks
            .iter()
            .map(|c| (c.span().start, c.span().end))
            .collect()
    }

    fn layers(start: usize, end: usize) -> Arc<Stage> {
        let path = plexus_testkit::real_model();
        let files = ModelFiles::open(&path).unwrap();
        Arc::new(
            files
                .stage(Some(LayerSpan::new(start, end)), Mode::Infer)
                .unwrap(),
        )
    }

    fn one_layer() -> Arc<Stage> {
        layers(0, 1)
    }

    fn call(session: u8, end: u32, position: u32, tokens: &[u32]) -> Forward {
        Forward {
            session: SessionId([session; 16]),
            model: Digest([0; 32]),
            start: 0,
            end,
            position,
            tokens: tokens.to_vec(),
            hidden: None,
            chunks: Vec::new(),
            sampling: None,
            reply_dtype: plexus_core::wire::DType::F32,
            all_rows: false,
            prompt_len: 0,
        }
    }

    /// Issue 11: a node checks a span it does not serve (an audit of a span nobody else
    /// serves) on a check stage: new sessions for that span open on it and compute what a
    /// node serving the span computes; sessions of the served span are untouched, and a span
    /// with no stage is still refused.
    #[test]
    fn a_check_stage_answers_new_sessions_of_its_span_as_a_server_of_it_would() {
        let peer = PeerId::random();
        let mut engine = EngineActor::local(layers(0, 2), Digest([0; 32]));
        let mut server = EngineActor::local(layers(0, 1), Digest([0; 32]));
        let mut whole = EngineActor::local(layers(0, 2), Digest([0; 32]));
        let refused = engine.forward(peer, &call(1, 1, 0, &[1, 2, 3]));
        assert!(
            matches!(
                refused,
                Response::Error {
                    code: ErrorCode::UnknownModel,
                    ..
                }
            ),
            "{refused:?}"
        );
        engine.keep_check(layers(0, 1));
        for (session, pos, tokens) in [(1, 0, &[1u32, 2, 3][..]), (1, 3, &[4][..])] {
            let got = engine.forward(peer, &call(session, 1, pos, tokens));
            let want = server.forward(peer, &call(session, 1, pos, tokens));
            match (got, want) {
                (Response::Hidden { hidden: a, .. }, Response::Hidden { hidden: b, .. }) => {
                    assert_eq!(a, b, "the check computes what the span's server computes")
                }
                other => panic!("{other:?}"),
            }
        }
        let got = engine.forward(peer, &call(2, 2, 0, &[1, 2]));
        let want = whole.forward(peer, &call(2, 2, 0, &[1, 2]));
        match (got, want) {
            (Response::Hidden { hidden: a, .. }, Response::Hidden { hidden: b, .. }) => {
                assert_eq!(a, b, "the served span is unchanged")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Check stages never take sessions with them: a kept stage in use stays, a new span is
    /// refused while every kept stage is in use, and replaces the oldest free one otherwise;
    /// the served span and a span already kept are never loaded twice.
    #[test]
    fn check_stages_in_use_are_kept_and_no_span_is_held_twice() {
        let peer = PeerId::random();
        let mut engine = EngineActor::local(layers(2, 3), Digest([0; 32]));
        engine.keep_check(layers(2, 3));
        assert!(engine.checks.is_empty(), "the served span");
        engine.keep_check(layers(0, 1));
        engine.keep_check(layers(0, 1));
        assert_eq!(spans(&engine), [(0, 1)], "no second copy");
        engine.keep_check(layers(0, 2));
        for (session, end) in [(1, 1), (2, 2)] {
            let r = engine.forward(peer, &call(session, end, 0, &[1, 2]));
            assert!(matches!(r, Response::Hidden { .. }), "{r:?}");
        }
        engine.keep_check(layers(0, 3));
        assert_eq!(spans(&engine), [(0, 1), (0, 2)], "both in use: refused");
        let r = engine.forward(peer, &call(1, 1, 2, &[3]));
        assert!(
            matches!(r, Response::Hidden { .. }),
            "the session goes on: {r:?}"
        );
        engine.sessions.retain(|(_, s), _| *s != SessionId([1; 16]));
        engine.keep_check(layers(0, 3));
        assert_eq!(spans(&engine), [(0, 2), (0, 3)], "the free one replaced");
    }

    /// A load may name the kept stage it replaces (one loaded ahead for a span that has
    /// gained a server since): that one goes rather than the oldest; while a session uses
    /// it, the new stage is refused and the others stay.
    #[test]
    fn a_check_stage_named_to_go_goes_unless_in_use() {
        let peer = PeerId::random();
        let mut engine = EngineActor::local(layers(2, 3), Digest([0; 32]));
        engine.keep_check(layers(0, 1));
        engine.keep_check(layers(0, 2));
        engine.keep_check_instead(layers(0, 3), Some(LayerSpan::new(0, 2)));
        assert_eq!(spans(&engine), [(0, 1), (0, 3)], "the named one went");
        let r = engine.forward(peer, &call(1, 3, 0, &[1, 2]));
        assert!(matches!(r, Response::Hidden { .. }), "{r:?}");
        engine.keep_check_instead(layers(1, 3), Some(LayerSpan::new(0, 3)));
        assert_eq!(
            spans(&engine),
            [(0, 1), (0, 3)],
            "in use: refused, nothing else went"
        );
    }

    /// Issue 7: a swap used to drop every open session, breaking the streams running through
    /// the node. Open sessions now go on with the span they started on; new ones get the new
    /// span.
    #[test]
    fn open_sessions_survive_a_swap_issue_7() {
        let peer = PeerId::random();
        let mut engine = EngineActor::local(layers(0, 1), Digest([0; 32]));
        let mut reference = EngineActor::local(layers(0, 1), Digest([0; 32]));
        let first = engine.forward(peer, &call(1, 1, 0, &[1, 2, 3]));
        assert!(matches!(first, Response::Hidden { .. }), "{first:?}");
        reference.forward(peer, &call(1, 1, 0, &[1, 2, 3]));
        engine.stage = layers(0, 2);
        let (got, want) = (
            engine.forward(peer, &call(1, 1, 3, &[4])),
            reference.forward(peer, &call(1, 1, 3, &[4])),
        );
        match (got, want) {
            (Response::Hidden { hidden: a, .. }, Response::Hidden { hidden: b, .. }) => {
                assert_eq!(a, b, "the old session computes what it would have")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            engine.forward(peer, &call(2, 1, 0, &[1])),
            Response::Error {
                code: ErrorCode::UnknownModel,
                ..
            }
        ));
        assert!(matches!(
            engine.forward(peer, &call(2, 2, 0, &[1])),
            Response::Hidden { .. }
        ));
    }

    /// Issue 9: a forked session holds the source's first positions and continues exactly as
    /// a session fed the same positions does; the source goes on unchanged. Forks of an
    /// unknown session, of more positions than it holds, and on weights that are not
    /// split-invariant are refused by name.
    #[test]
    fn a_forked_session_continues_as_a_fresh_one_issue_9() {
        let peer = PeerId::random();
        let stage = layers(0, 2);
        let mut engine = EngineActor::local(Arc::clone(&stage), Digest([0; 32]));
        let mut fresh = EngineActor::local(stage, Digest([0; 32]));
        let prompt: Vec<u32> = (0..40).map(|t| 200 + 3 * t).collect();
        engine.forward(peer, &call(1, 2, 0, &prompt));
        engine.forward(peer, &call(1, 2, 40, &[7]));
        let forked = engine.fork(peer, SessionId([1; 16]), SessionId([2; 16]), 39);
        assert_eq!(forked, Response::Forked { positions: 39 });
        fresh.forward(peer, &call(3, 2, 0, &prompt[..39]));
        let got = engine.forward(peer, &call(2, 2, 39, &prompt[39..]));
        let want = fresh.forward(peer, &call(3, 2, 39, &prompt[39..]));
        assert_eq!(hidden_of(&got), hidden_of(&want));
        // The source still holds its 41 positions.
        let next = engine.forward(peer, &call(1, 2, 41, &[8]));
        assert!(matches!(next, Response::Hidden { .. }), "{next:?}");
        let refused = |r: Response, want: ErrorCode| match r {
            Response::Error { code, message } => {
                assert_eq!(code, want, "{message}");
                message
            }
            other => panic!("{other:?}"),
        };
        refused(
            engine.fork(peer, SessionId([9; 16]), SessionId([8; 16]), 3),
            ErrorCode::UnknownSession,
        );
        // Another caller cannot fork this caller's session.
        refused(
            engine.fork(PeerId::random(), SessionId([1; 16]), SessionId([8; 16]), 3),
            ErrorCode::UnknownSession,
        );
        refused(
            engine.fork(peer, SessionId([1; 16]), SessionId([8; 16]), 43),
            ErrorCode::PositionMismatch,
        );
        let f32_model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tiny/smollm2/model-f32.gguf");
        let files = ModelFiles::open(&f32_model).unwrap();
        let whole = Arc::new(files.stage(None, Mode::Infer).unwrap());
        assert!(!whole.split_invariant());
        let end = whole.span().end as u32;
        let mut f32_engine = EngineActor::local(whole, Digest([0; 32]));
        let mut open = call(1, end, 0, &[1, 2, 3]);
        open.sampling = Some(Box::default());
        assert!(!matches!(
            f32_engine.forward(peer, &open),
            Response::Error { .. }
        ));
        let message = refused(
            f32_engine.fork(peer, SessionId([1; 16]), SessionId([2; 16]), 2),
            ErrorCode::BadRequest,
        );
        assert!(message.contains("split-invariant"), "{message}");
    }

    /// Issue 9: a fork takes a session slot like a new session: with every slot held, the
    /// caller's least recently used other session makes room, never the source.
    #[test]
    fn a_fork_makes_room_without_evicting_its_source_issue_9() {
        let peer = PeerId::random();
        let config = EngineConfig {
            max_sessions: 2,
            ..EngineConfig::default()
        };
        let mut engine = EngineActor::local_with(layers(0, 1), Digest([0; 32]), config);
        let prompt: Vec<u32> = (0..12).map(|t| 300 + t).collect();
        engine.forward(peer, &call(1, 1, 0, &prompt));
        std::thread::sleep(Duration::from_millis(5));
        engine.forward(peer, &call(2, 1, 0, &prompt));
        // Session 1 is the least recently used; forking it evicts session 2 instead.
        let forked = engine.fork(peer, SessionId([1; 16]), SessionId([3; 16]), 11);
        assert_eq!(forked, Response::Forked { positions: 11 });
        assert!(engine.sessions.contains_key(&(peer, SessionId([1; 16]))));
        assert!(engine.sessions.contains_key(&(peer, SessionId([3; 16]))));
        assert!(!engine.sessions.contains_key(&(peer, SessionId([2; 16]))));
        let next = engine.forward(peer, &call(3, 1, 11, &prompt[11..]));
        assert!(matches!(next, Response::Hidden { .. }), "{next:?}");
    }

    fn hidden_of(r: &Response) -> Vec<u32> {
        match r {
            Response::Hidden { hidden, .. } => {
                hidden.to_f32().iter().map(|x| x.to_bits()).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    /// Issue 8: calls of different sessions served as one batch (a long prompt cut into chunks
    /// beside one-position decodes) answer exactly what each gets alone.
    #[test]
    fn batched_calls_answer_what_each_gets_alone_issue_8() {
        let peer = PeerId::random();
        let stage = layers(0, 3);
        let config = EngineConfig {
            step_positions: 16,
            ..EngineConfig::default()
        };
        let mut batched = EngineActor::local_with(Arc::clone(&stage), Digest([0; 32]), config);
        let mut alone = EngineActor::local(stage, Digest([0; 32]));
        let prompts: Vec<Vec<u32>> = (0..4u32)
            .map(|i| (0..(5 + 23 * i)).map(|t| 100 + t * 7 + i).collect())
            .collect();
        let mut first = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            first.push((peer, call(i as u8, 3, 0, p)));
        }
        // A replay-style call with chunks and all rows, too.
        let mut replay = call(9, 3, 0, &prompts[3]);
        replay.chunks = vec![10, 30, prompts[3].len() as u32 - 40];
        replay.all_rows = true;
        first.push((peer, replay.clone()));
        let got = batched.serve_batch(first.clone());
        assert_eq!(got.len(), first.len());
        for ((_, f), (_, r)) in first.iter().zip(&got) {
            assert_eq!(hidden_of(r), hidden_of(&alone.serve(peer, f)));
        }
        // Then decodes of all of them together.
        let decodes: Vec<(PeerId, Forward)> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (peer, call(i as u8, 3, p.len() as u32, &[42])))
            .collect();
        let got = batched.serve_batch(decodes.clone());
        for ((_, f), (_, r)) in decodes.iter().zip(&got) {
            assert_eq!(hidden_of(r), hidden_of(&alone.serve(peer, f)));
        }
    }

    /// Issue 8: a session whose KV cache does not fit is refused as busy, idle sessions are
    /// evicted first, and a running call is never a victim.
    #[test]
    fn the_kv_budget_evicts_idle_sessions_then_refuses_issue_8() {
        let peer = PeerId::random();
        let stage = layers(0, 1);
        let bpp = stage.kv_bytes_per_position();
        let config = EngineConfig {
            kv_budget: 2 * RESERVE_STEP as u64 * bpp,
            kv_evict_idle_after: Duration::ZERO,
            ..EngineConfig::default()
        };
        let mut engine = EngineActor::local_with(stage, Digest([0; 32]), config);
        assert!(matches!(
            engine.serve(peer, &call(1, 1, 0, &[1; 10])),
            Response::Hidden { .. }
        ));
        assert!(matches!(
            engine.serve(peer, &call(2, 1, 0, &[1; 10])),
            Response::Hidden { .. }
        ));
        // A third evicts the least recently used (session 1).
        assert!(matches!(
            engine.serve(peer, &call(3, 1, 0, &[1; 10])),
            Response::Hidden { .. }
        ));
        assert!(matches!(
            engine.serve(peer, &call(1, 1, 10, &[1])),
            Response::Error {
                code: ErrorCode::UnknownSession,
                ..
            }
        ));
        // Two calls at once that need the whole budget each: the first runs (evicting the idle
        // ones), the second cannot evict a running call and is refused.
        let big = |s: u8| (peer, call(s, 1, 0, &[1; 2 * RESERVE_STEP - 1]));
        let got = engine.serve_batch(vec![big(4), big(5)]);
        assert!(
            matches!(got[0].1, Response::Hidden { .. }),
            "{:?}",
            got[0].1
        );
        match &got[1].1 {
            Response::Error {
                code: ErrorCode::Busy,
                message,
            } => {
                assert!(message.contains("KV cache budget"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(engine.budget.used() <= engine.budget.budget());
    }

    /// Issue 8: a session used moments ago belongs to a running generation (between its
    /// calls): a new session that needs its KV room is refused `Busy`, and the old one goes on.
    #[test]
    fn a_recently_used_session_is_not_evicted_for_kv_room_issue_8() {
        let peer = PeerId::random();
        let stage = layers(0, 1);
        let bpp = stage.kv_bytes_per_position();
        let config = EngineConfig {
            kv_budget: RESERVE_STEP as u64 * bpp,
            ..EngineConfig::default()
        };
        let mut engine = EngineActor::local_with(stage, Digest([0; 32]), config);
        assert!(matches!(
            engine.serve(peer, &call(1, 1, 0, &[1; 10])),
            Response::Hidden { .. }
        ));
        match engine.serve(peer, &call(2, 1, 0, &[1; 10])) {
            Response::Error {
                code: ErrorCode::Busy,
                message,
            } => assert!(message.contains("KV cache budget"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            engine.serve(peer, &call(1, 1, 10, &[1])),
            Response::Hidden { .. }
        ));
        assert!(engine.budget.used() <= engine.budget.budget());
    }

    /// Sessions in a running call count against `max_sessions`: a batch of more new sessions
    /// than slots never makes the node hold (and announce) more sessions than its capacity,
    /// which discovery refuses as implausible. Found by the hostile flood test after batching
    /// landed (announced `(65, 64)`).
    #[test]
    fn running_sessions_count_against_the_session_cap() {
        let peer = PeerId::random();
        let config = EngineConfig {
            max_sessions: 2,
            ..EngineConfig::default()
        };
        let mut engine = EngineActor::local_with(one_layer(), Digest([0; 32]), config);
        let calls: Vec<(PeerId, Forward)> = (1..=3u8)
            .map(|s| (peer, call(s, 1, 0, &[1, 2, 3])))
            .collect();
        let got = engine.serve_batch(calls);
        assert!(
            matches!(got[0].1, Response::Hidden { .. }),
            "{:?}",
            got[0].1
        );
        assert!(
            matches!(got[1].1, Response::Hidden { .. }),
            "{:?}",
            got[1].1
        );
        assert!(
            matches!(
                got[2].1,
                Response::Error {
                    code: ErrorCode::Busy,
                    ..
                }
            ),
            "{:?}",
            got[2].1
        );
        assert_eq!(engine.held_sessions(), 2);
        assert_eq!(engine.gauges.sessions.load(Ordering::Relaxed), 2);
        // Idle now: a new session evicts one of them instead of being refused.
        assert!(matches!(
            engine.serve(peer, &call(4, 1, 0, &[1])),
            Response::Hidden { .. }
        ));
        assert_eq!(engine.held_sessions(), 2);
    }

    /// Issue 8: a long call runs in chunks beside the others, and closing its session drops
    /// it mid-way (the work of a caller that went away is not finished).
    #[test]
    fn closing_a_session_drops_its_running_call_issue_8() {
        let peer = PeerId::random();
        let mut engine = EngineActor::local(layers(0, 1), Digest([0; 32]));
        let long = engine
            .admit(peer, Box::new(call(1, 1, 0, &[7; 600])))
            .unwrap_or_else(|r| panic!("{r:?}"));
        engine.running.push(long);
        assert!(
            engine.step().is_empty(),
            "600 positions take more than one step"
        );
        assert_eq!(engine.running[0].done, STEP_POSITIONS);
        let (replies, _rx) = mpsc::channel(1);
        let close = Job {
            peer,
            work: Work::Close(SessionId([1; 16])),
            reply: None,
        };
        assert!(engine.take(close, &replies));
        assert!(engine.running.is_empty());
        assert!(engine.sessions.is_empty());
    }

    fn start(queue: usize) -> EngineHandle {
        let (replies, _rx) = mpsc::channel(1);
        let config = EngineConfig {
            queue,
            ..EngineConfig::default()
        };
        EngineActor::start(one_layer(), Digest([0; 32]), config, replies)
    }

    fn close_job() -> Job {
        Job {
            peer: PeerId::random(),
            work: Work::Close(SessionId([0; 16])),
            reply: None,
        }
    }

    /// Issue 7: a panic in the engine thread was silent and `try_submit` called it "queue
    /// full". Now the handle knows the engine is gone, submissions say Stopped and a swap fails
    /// (so the node does not announce a span nobody serves).
    #[test]
    fn a_panicking_engine_is_reported_stopped_issue_7() {
        let engine = start(4);
        assert!(engine.is_alive());
        let panic = Job {
            peer: PeerId::random(),
            work: Work::Panic,
            reply: None,
        };
        assert!(engine.try_submit(panic).is_ok());
        let started = Instant::now();
        while engine.is_alive() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "engine still alive"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(
            engine.try_submit(close_job()),
            Err(SubmitError::Stopped(_))
        ));
        assert!(engine.swap_blocking(PeerId::random(), one_layer()).is_err());
        assert_eq!(engine.gauges.queued.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_full_queue_is_reported_full() {
        // Queue of one, engine busy swapping: submissions beyond it come back as Full.
        let engine = start(1);
        let mut full = 0;
        for _ in 0..1000 {
            match engine.try_submit(close_job()) {
                Err(SubmitError::Full(_)) => full += 1,
                Err(SubmitError::Stopped(_)) => panic!("the engine is alive"),
                Ok(()) => {}
            }
        }
        assert!(engine.is_alive());
        let _ = full; // how many depends on scheduling; none must be Stopped
    }

    /// Issue 7: the queued gauge was incremented after `try_send`, so the engine could
    /// decrement first and the gauge wrapped to ~4e9 (and was announced).
    #[test]
    fn the_queued_gauge_never_wraps_issue_7() {
        let engine = start(64);
        let gauges = Arc::clone(&engine.gauges);
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut worst = 0;
                while !stop.load(Ordering::Acquire) {
                    worst = worst.max(gauges.queued.load(Ordering::Acquire));
                }
                worst
            })
        };
        for _ in 0..200_000 {
            let _ = engine.try_submit(close_job());
        }
        stop.store(true, Ordering::Release);
        let worst = watcher.join().unwrap();
        // At most the 64 queued, plus the job the engine has received but not yet counted
        // out (`take`), plus the submission being tried: never a wrapped ~4e9.
        assert!(worst <= 66, "queued gauge reached {worst}");
    }
}
