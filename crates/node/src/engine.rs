//! The engine actor: one thread that owns this node's [`Stage`] and the KV caches of every
//! session, and runs stage calls one after another (the kernels use all cores for each call).
//!
//! ```text
//! service ──Job (bounded)──▶ EngineActor thread ──(Reply, Response)──▶ service ──▶ peer
//! ```
//!
//! Sessions are keyed by (caller, session id), hold at most the model's context, expire after
//! `session_ttl` without use, and are capped in number: when a new one would exceed the cap,
//! the peer holding the most sessions loses its least recently used one, so a peer that opens
//! sessions in bulk evicts its own rather than everyone else's.

use plexus_core::wire::{Activations, ErrorCode, Forward, Response, SessionId};
use plexus_core::Digest;
use plexus_model::sampler::sample_scored;
use plexus_model::stage::ForwardError;
use plexus_model::{KvCache, Logits, Stage, StageInput, StageOutput};
use plexus_net::{PeerId, Reply};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// A stage call waiting for the engine.
pub struct Job {
    pub peer: PeerId,
    pub work: Work,
    /// Where the answer goes (`None` for local work such as a swap).
    pub reply: Option<Reply>,
}

pub enum Work {
    Forward(Box<Forward>),
    Close(SessionId),
    /// Serve another span from now on (placement moved this node); open sessions are dropped.
    Swap(Arc<Stage>),
}

/// Limits of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_sessions: usize,
    pub session_ttl: Duration,
    pub queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            session_ttl: Duration::from_secs(300),
            queue: 64,
        }
    }
}

/// Shared gauges the service reads for announcements and metrics.
#[derive(Debug, Default)]
pub struct EngineGauges {
    pub sessions: AtomicU32,
    pub queued: AtomicU32,
}

/// The sending side of the engine's inbox.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    pub gauges: Arc<EngineGauges>,
}

impl EngineHandle {
    /// Hands the engine a new stage (waits for room in the queue).
    pub async fn swap(&self, peer: PeerId, stage: Arc<Stage>) {
        let jobs = self.jobs.clone();
        let job = Job {
            peer,
            work: Work::Swap(stage),
            reply: None,
        };
        self.gauges.queued.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || jobs.send(job)).await;
    }

    /// Queues a job; gives it back when the queue is full or the engine stopped.
    pub fn try_submit(&self, job: Job) -> Result<(), Job> {
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.gauges.queued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => Err(job),
        }
    }
}

struct Session {
    cache: KvCache,
    history: Vec<u32>,
    last_used: Instant,
}

/// Owns the stage and the sessions; see the module docs.
pub struct EngineActor {
    stage: Arc<Stage>,
    model: Digest,
    config: EngineConfig,
    sessions: HashMap<(PeerId, SessionId), Session>,
    gauges: Arc<EngineGauges>,
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
        let actor = EngineActor {
            stage,
            model,
            config,
            sessions: HashMap::new(),
            gauges: Arc::clone(&gauges),
        };
        std::thread::Builder::new()
            .name("plexus-engine".into())
            .spawn(move || actor.run(rx, replies))
            .expect("spawning the engine thread");
        EngineHandle { jobs: tx, gauges }
    }

    fn run(mut self, jobs: Receiver<Job>, replies: mpsc::Sender<(Reply, Response)>) {
        loop {
            match jobs.recv_timeout(Duration::from_secs(1)) {
                Ok(job) => {
                    self.gauges.queued.fetch_sub(1, Ordering::Relaxed);
                    let response = match job.work {
                        Work::Forward(f) => self.forward(job.peer, &f),
                        Work::Close(session) => {
                            self.sessions.remove(&(job.peer, session));
                            Response::Closed
                        }
                        Work::Swap(stage) => {
                            self.stage = stage;
                            self.sessions.clear();
                            Response::Closed
                        }
                    };
                    if let Some(reply) = job.reply {
                        if replies.blocking_send((reply, response)).is_err() {
                            break;
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.expire();
        }
        debug!("engine stopped");
    }

    fn expire(&mut self) {
        let ttl = self.config.session_ttl;
        self.sessions.retain(|_, s| s.last_used.elapsed() < ttl);
        self.gauges
            .sessions
            .store(self.sessions.len() as u32, Ordering::Relaxed);
    }

    fn forward(&mut self, peer: PeerId, f: &Forward) -> Response {
        let started = Instant::now();
        let span = self.stage.span();
        if f.model != self.model || f.start as usize != span.start || f.end as usize != span.end {
            return error(
                ErrorCode::UnknownModel,
                format!(
                    "this node serves layers {span} of {}, not {}..{} of {}",
                    self.model.short(),
                    f.start,
                    f.end,
                    f.model.short()
                ),
            );
        }
        if self.stage.is_first() != f.hidden.is_none() {
            return error(
                ErrorCode::BadRequest,
                if self.stage.is_first() {
                    "the first stage takes token ids, not activations"
                } else {
                    "this stage needs the previous stage's activations"
                },
            );
        }
        if let Some(h) = &f.hidden {
            if h.cols as usize != self.stage.config().hidden_size {
                return error(
                    ErrorCode::BadRequest,
                    format!(
                        "activations are {} wide, the model's hidden size is {}",
                        h.cols,
                        self.stage.config().hidden_size
                    ),
                );
            }
        }
        let vocab = self.stage.config().vocab_size;
        if let Some(&id) = f.tokens.iter().find(|&&id| id as usize >= vocab) {
            return error(
                ErrorCode::BadRequest,
                format!("token id {id} is outside the vocabulary of {vocab}"),
            );
        }
        if self.stage.is_last() && f.sampling.is_none() {
            return error(
                ErrorCode::BadRequest,
                "the last stage needs sampling params",
            );
        }
        let key = (peer, f.session);
        if f.position == 0 {
            self.sessions.remove(&key);
            if self.sessions.len() >= self.config.max_sessions {
                self.evict_for_new();
            }
            self.sessions.insert(
                key,
                Session {
                    cache: self.stage.new_cache(),
                    history: Vec::new(),
                    last_used: Instant::now(),
                },
            );
        }
        let Some(mut session) = self.sessions.remove(&key) else {
            return error(
                ErrorCode::UnknownSession,
                format!("no session {} (expired or never opened)", f.session),
            );
        };
        if session.cache.len() != f.position as usize {
            let held = session.cache.len();
            self.sessions.insert(key, session);
            return error(
                ErrorCode::PositionMismatch,
                format!(
                    "session {} holds {held} positions, not {}",
                    f.session, f.position
                ),
            );
        }
        // Refuse before computing anything: the stage would only notice at the chunk that
        // overflows, after embedding the whole call and running the chunks before it.
        let needed = session.cache.len() + f.tokens.len();
        if needed > session.cache.max_len() {
            let max = session.cache.max_len();
            self.sessions.insert(key, session);
            return error(
                ErrorCode::ContextOverflow,
                ForwardError::ContextOverflow { needed, max }.to_string(),
            );
        }
        let result = self.run_chunks(&mut session, f);
        session.last_used = Instant::now();
        let response = match result {
            Ok(out) => out,
            Err(e) => {
                // Roll back so the caller can retry from the same position.
                session.cache.truncate(f.position as usize);
                session.history.truncate(f.position as usize);
                let code = match e {
                    ForwardError::ContextOverflow { .. } => ErrorCode::ContextOverflow,
                    ForwardError::BadToken { .. } | ForwardError::WrongInput { .. } => {
                        ErrorCode::BadRequest
                    }
                    ForwardError::Tensor(_) => ErrorCode::Internal,
                };
                warn!(%peer, session = %f.session, "stage call failed: {e}");
                error(code, e.to_string())
            }
        };
        self.sessions.insert(key, session);
        self.gauges
            .sessions
            .store(self.sessions.len() as u32, Ordering::Relaxed);
        match response {
            Response::Hidden { hidden, .. } => Response::Hidden {
                hidden,
                compute_us: started.elapsed().as_micros() as u64,
            },
            Response::Token { token, .. } => Response::Token {
                token,
                compute_us: started.elapsed().as_micros() as u64,
            },
            Response::Scored {
                token, logprobs, ..
            } => Response::Scored {
                token,
                compute_us: started.elapsed().as_micros() as u64,
                logprobs,
            },
            other => other,
        }
    }

    /// Makes room for one more session: the peer holding the most sessions gives up its least
    /// recently used one (the oldest such session on a tie). One peer opening many sessions
    /// thus evicts its own, not everyone else's.
    fn evict_for_new(&mut self) {
        let mut holders: HashMap<PeerId, (usize, Instant, SessionId)> = HashMap::new();
        for ((peer, id), s) in &self.sessions {
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
        if let Some(key) = victim {
            debug!(peer = %key.0, session = %key.1, "evicting a session to make room");
            self.sessions.remove(&key);
        }
    }

    fn run_chunks(&self, session: &mut Session, f: &Forward) -> Result<Response, ForwardError> {
        let hidden_size = self.stage.config().hidden_size;
        let inputs = f.hidden.as_ref().map(Activations::to_f32);
        let sizes = f.chunk_sizes();
        let mut start = 0;
        let mut rows_out: Vec<f32> = Vec::new();
        let mut last_logits = None;
        let mut final_rows = 0;
        for (i, &n) in sizes.iter().enumerate() {
            let tokens = &f.tokens[start..start + n];
            let input = match &inputs {
                None => StageInput::Tokens(tokens),
                Some(x) => StageInput::Hidden(candle_tensor(
                    &x[start * hidden_size..(start + n) * hidden_size],
                    n,
                    hidden_size,
                )?),
            };
            let out = self
                .stage
                .forward(input, &mut session.cache, Logits::Last)?;
            session.history.extend_from_slice(tokens);
            let is_final = i + 1 == sizes.len();
            match out {
                StageOutput::Hidden(h) => {
                    if f.all_rows || is_final {
                        rows_out.extend(h.flatten_all()?.to_vec1::<f32>()?);
                    }
                }
                StageOutput::Logits(l) => {
                    if is_final {
                        last_logits = Some(l.to_vec1::<f32>()?);
                    }
                }
            }
            if is_final {
                final_rows = n;
            }
            start += n;
        }
        if let Some(logits) = last_logits {
            let params = f.sampling.as_deref().cloned().unwrap_or_default();
            let position = session.history.len() as u64;
            let (token, scores) = sample_scored(&logits, &session.history, &params, position);
            return Ok(match scores {
                Some(logprobs) => Response::Scored {
                    token,
                    compute_us: 0,
                    logprobs,
                },
                None => Response::Token {
                    token,
                    compute_us: 0,
                },
            });
        }
        let rows = if f.all_rows {
            f.tokens.len()
        } else {
            final_rows
        };
        Ok(Response::Hidden {
            hidden: Activations::encode(&rows_out, rows, hidden_size, f.reply_dtype),
            compute_us: 0,
        })
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
