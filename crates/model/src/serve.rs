//! The batching generation engine: one thread that owns a whole-model [`Stage`] and runs the
//! decode steps of every open generation as one batched forward, with prompt chunks mixed in
//! (continuous batching, see [`crate::batch`]).
//!
//! ```text
//! caller thread: BatchHandle::open ─(KV reservation, bounded inbox)─▶ engine thread
//! engine thread: plan ─▶ Stage::forward_many ─▶ sample per sequence ─▶ bounded token channel
//! caller thread: generate_with(BatchStream) ◀─ tokens (text, stop strings, cancellation)
//! ```
//!
//! - Sequences join at any step and leave when they finish or their caller goes away (a
//!   dropped [`BatchStream`] cancels its sequence, queued or running).
//! - The engine samples on its own thread (the sampler is a pure function of logits, history,
//!   params and position), so a sequence decodes without waiting for its caller, at most
//!   [`ServeConfig::run_ahead`] tokens ahead of what the caller has read.
//! - Each sequence's tokens equal its solo run bit for bit: the batched forward computes every
//!   row from its own inputs, and the engine stops a sequence exactly where
//!   [`crate::generate::generate_with`] stops feeding it (EOS, `max_tokens`, the context).
//! - A sequence with a grammar ([`BatchHandle::open_guided`]) gets its mask from its
//!   [`Constraint`] before each of its tokens is sampled, on the engine thread, and the
//!   constraint follows the token sampled (see [`crate::constraint`]).
//! - KV memory: a sequence reserves the positions it may reach (prompt + `max_tokens`, at most
//!   the context) from a [`KvBudget`] before it is queued, so running sequences never run out
//!   and a sequence that does not fit is refused at once ([`OpenError::Budget`]) after the
//!   prefix cache gave back what it holds.
//! - Prefix cache ([`crate::prefix`]): a finished or cancelled sequence's KV rows are kept; a
//!   new prompt that shares a prefix with one of them starts after it, with the same bits.
//! - Shared prompts (the `n` choices of one request): a sequence whose prompt equals that of
//!   a running one waits for it to compute all but the prompt's last position, takes a copy
//!   of those rows and computes only the last one, so the prompt is prefilled once. Exact for
//!   the same reason as the prefix cache, and only where that is on.

use crate::batch::{plan, BudgetError, KvBudget, KvReservation, Want, STEP_POSITIONS};
use crate::constraint::{follow, next_mask, Constraint, ConstraintError};
use crate::generate::TokenChain;
use crate::prefix::{Entry, PrefixCache};
use crate::sampler::{sample_scored, SamplingParams, TokenLogprobs};
use crate::stage::{BatchItem, ForwardError, Logits, Stage, StageInput, StageOutput};
use crate::KvCache;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tracing::{debug, warn};

/// Limits of the engine.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// KV cache memory for all sequences, in bytes.
    pub kv_budget: u64,
    /// Positions per batched step (decodes plus prompt chunks).
    pub step_positions: usize,
    /// Sequences waiting to be picked up by the engine thread (the inbox bound).
    pub queue: usize,
    /// Tokens a sequence may compute ahead of its reader.
    pub run_ahead: usize,
    /// Finished sequences whose KV rows the prefix cache keeps (0: no prefix cache).
    pub prefix_entries: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            kv_budget: 4 << 30,
            step_positions: STEP_POSITIONS,
            queue: 256,
            run_ahead: 4,
            prefix_entries: 16,
        }
    }
}

/// Why a generation was not started.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error("{waiting} generations are already waiting for the engine")]
    QueueFull { waiting: usize },
    #[error("the engine thread stopped")]
    Stopped,
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context holds {context}")]
    PromptTooLong { prompt: usize, context: usize },
}

/// Why a running generation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("forward pass failed: {0}")]
    Forward(String),
    #[error("the engine thread stopped")]
    Stopped,
    #[error("the engine finished this sequence: nothing more to feed")]
    Finished,
    #[error("fed tokens the engine did not sample (a batched stream continues itself)")]
    Diverged,
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
}

/// What the engine sends a caller: the next sampled token.
type Sampled = Result<(u32, Option<TokenLogprobs>), StreamError>;

/// A generation handed to the engine.
struct Opening {
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    eos: Arc<HashSet<u32>>,
    out: SyncSender<Sampled>,
    unread: Arc<AtomicUsize>,
    cancelled: Arc<AtomicBool>,
    reservation: KvReservation,
    /// The grammar the sampled tokens obey, if any.
    constraint: Option<Box<dyn Constraint>>,
}

/// The cloneable sending side of the engine.
#[derive(Clone)]
pub struct BatchHandle {
    inbox: SyncSender<Opening>,
    budget: KvBudget,
    bytes_per_position: u64,
    context: usize,
    run_ahead: usize,
    queue: usize,
    eos: Arc<HashSet<u32>>,
    alive: Arc<AtomicBool>,
    prefix: Arc<Mutex<PrefixCache>>,
    /// Prompt positions copied from a running sequence with the same prompt, since start.
    shared: Arc<AtomicU64>,
}

/// One generation's side of the engine; a [`TokenChain`] for
/// [`crate::generate::generate_with`]. Dropping it cancels the sequence.
pub struct BatchStream {
    rx: Receiver<Sampled>,
    unread: Arc<AtomicUsize>,
    cancelled: Arc<AtomicBool>,
    prompt: Vec<u32>,
    context: usize,
    /// The last token handed out, which the engine feeds itself.
    last: Option<u32>,
    scores: Option<TokenLogprobs>,
}

impl BatchHandle {
    /// Starts the engine thread over `stage` (a whole model: embedding to head). `eos` are the
    /// tokens that end a generation (the tokenizer's).
    pub fn start(stage: Arc<Stage>, eos: HashSet<u32>, config: ServeConfig) -> Self {
        let (tx, rx) = mpsc::sync_channel(config.queue.max(1));
        let alive = Arc::new(AtomicBool::new(true));
        // A cached prefix is exact only when splitting a prompt's positions into calls gives
        // the same bits (see `Stage::split_invariant`); otherwise the cache stays off.
        let entries = if stage.split_invariant() {
            config.prefix_entries
        } else {
            0
        };
        let prefix = Arc::new(Mutex::new(PrefixCache::new(entries)));
        let shared = Arc::new(AtomicU64::new(0));
        let handle = Self {
            inbox: tx,
            budget: KvBudget::new(config.kv_budget),
            bytes_per_position: stage.kv_bytes_per_position(),
            context: stage.config().max_position_embeddings,
            run_ahead: config.run_ahead.max(1),
            queue: config.queue.max(1),
            eos: Arc::new(eos),
            alive: Arc::clone(&alive),
            prefix: Arc::clone(&prefix),
            shared: Arc::clone(&shared),
        };
        let actor = BatchActor {
            share_prompts: entries > 0,
            stage,
            step_positions: config.step_positions.max(1),
            run_ahead: config.run_ahead.max(1),
            seqs: Vec::new(),
            prefix,
            shared,
            next_id: 0,
        };
        let spawned = std::thread::Builder::new()
            .name("plexus-batch".into())
            .spawn(move || {
                let _alive = AliveGuard(alive);
                actor.run(rx)
            });
        if let Err(e) = spawned {
            warn!("cannot start the batch engine thread: {e}");
        }
        handle
    }

    /// The KV budget (for gauges).
    pub fn budget(&self) -> &KvBudget {
        &self.budget
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// KV bytes reserved by generations (queued or running), not by the prefix cache.
    pub fn running_kv_bytes(&self) -> u64 {
        let prefix = lock(&self.prefix);
        self.budget.used().saturating_sub(prefix.reserved_bytes())
    }

    /// Prompt positions the prefix cache saved from being computed, since start.
    pub fn prefix_reused_positions(&self) -> u64 {
        lock(&self.prefix).reused_positions()
    }

    /// Prompt positions copied from a running sequence with the same prompt (the choices of
    /// one request) instead of computed, since start.
    pub fn shared_prompt_positions(&self) -> u64 {
        self.shared.load(Ordering::Relaxed)
    }

    /// Reserves `positions`, evicting prefix-cache entries (oldest first) while that is
    /// what stands in the way.
    fn reserve(&self, positions: usize) -> Result<KvReservation, BudgetError> {
        loop {
            match self.budget.reserve(positions, self.bytes_per_position) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    if !lock(&self.prefix).evict_oldest() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Queues a generation of at most `max_tokens` tokens after `prompt`. Refused at once
    /// when its KV cache (prompt + `max_tokens` positions, at most the context) does not fit
    /// in the budget, or the queue is full.
    pub fn open(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        max_tokens: usize,
    ) -> Result<BatchStream, OpenError> {
        self.open_guided(prompt, params, max_tokens, None)
    }

    /// [`BatchHandle::open`], every sampled token obeying `constraint` (when given).
    pub fn open_guided(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        max_tokens: usize,
        constraint: Option<Box<dyn Constraint>>,
    ) -> Result<BatchStream, OpenError> {
        if prompt.is_empty() {
            return Err(OpenError::EmptyPrompt);
        }
        if prompt.len() >= self.context {
            return Err(OpenError::PromptTooLong {
                prompt: prompt.len(),
                context: self.context,
            });
        }
        let positions = prompt.len().saturating_add(max_tokens).min(self.context);
        let reservation = self.reserve(positions)?;
        let (out, rx) = mpsc::sync_channel(self.run_ahead + 1);
        let unread = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicBool::new(false));
        let opening = Opening {
            prompt: prompt.to_vec(),
            params: params.clone(),
            max_tokens,
            eos: Arc::clone(&self.eos),
            out,
            unread: Arc::clone(&unread),
            cancelled: Arc::clone(&cancelled),
            reservation,
            constraint,
        };
        match self.inbox.try_send(opening) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(OpenError::QueueFull {
                    waiting: self.queue,
                })
            }
            Err(TrySendError::Disconnected(_)) => return Err(OpenError::Stopped),
        }
        Ok(BatchStream {
            rx,
            unread,
            cancelled,
            prompt: prompt.to_vec(),
            context: self.context,
            last: None,
            scores: None,
        })
    }
}

impl BatchStream {
    fn next(&mut self) -> Result<u32, StreamError> {
        let got = self.rx.recv().map_err(|_| StreamError::Finished)?;
        self.unread.fetch_sub(1, Ordering::AcqRel);
        let (token, scores) = got?;
        self.last = Some(token);
        self.scores = scores;
        Ok(token)
    }
}

impl TokenChain for BatchStream {
    type Error = StreamError;

    fn context(&self) -> usize {
        self.context
    }

    /// The prompt was handed over at [`BatchHandle::open`]; this waits for the token after it.
    fn feed_prompt(&mut self, prompt: &[u32]) -> Result<u32, StreamError> {
        if prompt != self.prompt || self.last.is_some() {
            return Err(StreamError::Diverged);
        }
        self.next()
    }

    /// The engine feeds each sampled token itself: `tokens` must be the last one handed out.
    fn feed(&mut self, tokens: &[u32]) -> Result<u32, StreamError> {
        match self.last {
            Some(t) if tokens == [t] => self.next(),
            None if tokens == self.prompt.as_slice() => self.next(),
            _ => Err(StreamError::Diverged),
        }
    }

    fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.scores.take()
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Release);
    }
}

/// Marks the engine dead when its thread ends, by return or by panic.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One sequence inside the engine.
struct Seq {
    /// Unique within the engine (what a sequence waiting for a shared prompt names).
    id: u64,
    /// A running sequence with the same prompt whose rows this one will copy (see the module
    /// docs); it runs nothing until then.
    waits_for: Option<u64>,
    open: Opening,
    cache: KvCache,
    /// Every token fed so far (prompt, then sampled tokens).
    history: Vec<u32>,
    /// Prompt positions fed so far.
    prefilled: usize,
    /// Tokens sampled so far.
    produced: usize,
    /// The sampled token to feed next (decoding).
    next: Option<u32>,
}

impl Seq {
    fn decoding(&self) -> bool {
        self.prefilled == self.open.prompt.len()
    }

    /// Positions this sequence can run now.
    fn ready(&self, run_ahead: usize) -> usize {
        if self.waits_for.is_some() {
            0
        } else if !self.decoding() {
            self.open.prompt.len() - self.prefilled
        } else if self.next.is_some() && self.open.unread.load(Ordering::Acquire) < run_ahead {
            1
        } else {
            0
        }
    }

    /// Whether `generate_with` would feed the token just sampled (the same conditions, in
    /// the same order, as its decode loop).
    fn wants_more(&self, token: u32) -> bool {
        !self.open.eos.contains(&token)
            && self.produced < self.open.max_tokens
            && self.open.prompt.len() + self.produced < self.cache.max_len()
    }

    /// Hands a token (or an error) to the caller; `false` when the caller went away.
    fn send(&self, sampled: Sampled) -> bool {
        self.open.unread.fetch_add(1, Ordering::AcqRel);
        match self.open.out.try_send(sampled) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            // Cannot happen (the channel holds run_ahead + 1 and a sequence runs only below
            // run_ahead unread); treat it as a caller that stopped reading.
            Err(TrySendError::Full(_)) => false,
        }
    }
}

/// The engine thread's state; see the module docs.
struct BatchActor {
    stage: Arc<Stage>,
    step_positions: usize,
    run_ahead: usize,
    /// Sequences in arrival order (the planner serves prompts oldest first).
    seqs: Vec<Seq>,
    prefix: Arc<Mutex<PrefixCache>>,
    /// Whether sequences with the same prompt share its rows (the stage is split-invariant).
    share_prompts: bool,
    shared: Arc<AtomicU64>,
    next_id: u64,
}

fn lock(prefix: &Mutex<PrefixCache>) -> MutexGuard<'_, PrefixCache> {
    prefix.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts `s` (nothing computed yet) after the longest prefix of its prompt the prefix cache
/// holds, if any.
fn start_from_prefix_cache(prefix: &Mutex<PrefixCache>, s: &mut Seq) {
    let declared = 0..s.open.prompt.len();
    if let Some((prefilled, mut cache)) = lock(prefix).take_longest(&s.open.prompt, &declared) {
        cache.limit_growth(s.open.reservation.positions());
        s.cache = cache;
        s.history.extend_from_slice(&s.open.prompt[..prefilled]);
        s.prefilled = prefilled;
    }
}

impl BatchActor {
    fn run(mut self, inbox: Receiver<Opening>) {
        loop {
            if self.seqs.is_empty() {
                crate::kernels::release_helpers();
                match inbox.recv() {
                    Ok(o) => self.admit(o),
                    Err(_) => break,
                }
            }
            loop {
                match inbox.try_recv() {
                    Ok(o) => self.admit(o),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.seqs.is_empty() => {
                        debug!("batch engine stopped");
                        return;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            for i in (0..self.seqs.len()).rev() {
                if self.seqs[i].open.cancelled.load(Ordering::Acquire) {
                    let s = self.seqs.remove(i);
                    self.keep(s);
                }
            }
            if !self.step() {
                // Everyone is waiting for their readers: wait for a reader or a newcomer.
                match inbox.recv_timeout(Duration::from_millis(1)) {
                    Ok(o) => self.admit(o),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) if self.seqs.is_empty() => break,
                    Err(RecvTimeoutError::Disconnected) => {}
                }
            }
        }
        debug!("batch engine stopped");
    }

    fn admit(&mut self, open: Opening) {
        if open.cancelled.load(Ordering::Acquire) {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        // A running sequence with the same prompt (another choice of the same request): copy
        // its rows once it has them, rather than computing them again.
        let leader = self
            .share_prompts
            .then(|| {
                self.seqs
                    .iter()
                    .find(|s| s.waits_for.is_none() && s.open.prompt == open.prompt)
                    .map(|s| s.id)
            })
            .flatten()
            .filter(|_| open.prompt.len() > 1);
        let mut cache = self.stage.new_cache();
        cache.limit_growth(open.reservation.positions());
        let mut seq = Seq {
            id,
            waits_for: leader,
            cache,
            history: Vec::with_capacity(open.reservation.positions()),
            prefilled: 0,
            produced: 0,
            next: None,
            open,
        };
        if leader.is_none() {
            start_from_prefix_cache(&self.prefix, &mut seq);
        }
        self.seqs.push(seq);
        self.share_ready();
    }

    /// Sequences waiting for a shared prompt whose leader now holds all but its last
    /// position take a copy of those rows; those whose leader left prefill on their own (from
    /// the prefix cache, where the leader's rows may have gone).
    fn share_ready(&mut self) {
        for i in 0..self.seqs.len() {
            let Some(leader) = self.seqs[i].waits_for else {
                continue;
            };
            let keep = self.seqs[i].open.prompt.len() - 1;
            match self.seqs.iter().find(|s| s.id == leader) {
                Some(l) if l.cache.len() < keep => {}
                Some(l) => {
                    let mut cache = l.cache.prefix(keep);
                    let s = &mut self.seqs[i];
                    cache.limit_growth(s.open.reservation.positions());
                    s.cache = cache;
                    s.history.clear();
                    s.history.extend_from_slice(&s.open.prompt[..keep]);
                    s.prefilled = keep;
                    s.waits_for = None;
                    self.shared.fetch_add(keep as u64, Ordering::Relaxed);
                }
                None => {
                    let s = &mut self.seqs[i];
                    s.waits_for = None;
                    start_from_prefix_cache(&self.prefix, s);
                }
            }
        }
    }

    /// Hands a sequence that left (finished or cancelled) to the prefix cache.
    fn keep(&mut self, s: Seq) {
        let Seq {
            open,
            cache,
            history,
            ..
        } = s;
        if cache.len() == history.len() {
            lock(&self.prefix).store(Entry {
                tokens: history,
                cache,
                reservation: open.reservation,
            });
        }
    }

    /// Runs one batched step; `false` when no sequence could run.
    fn step(&mut self) -> bool {
        self.share_ready();
        let wants: Vec<Want> = self
            .seqs
            .iter()
            .map(|s| Want {
                ready: s.ready(self.run_ahead),
                decoding: s.decoding(),
            })
            .collect();
        let sizes = plan(&wants, self.step_positions);
        if sizes.iter().all(|&n| n == 0) {
            return false;
        }
        // The positions each running sequence feeds this step.
        let mut feeds: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, (s, &n)) in self.seqs.iter().zip(&sizes).enumerate() {
            if n == 0 {
                continue;
            }
            let tokens = match s.next {
                Some(t) if s.decoding() => vec![t],
                _ => s.open.prompt[s.prefilled..s.prefilled + n].to_vec(),
            };
            feeds.push((i, tokens));
        }
        let result = {
            let mut items: Vec<BatchItem> = Vec::with_capacity(feeds.len());
            let mut fi = feeds.iter().peekable();
            for (i, s) in self.seqs.iter_mut().enumerate() {
                let Some((_, tokens)) = fi.next_if(|(j, _)| *j == i) else {
                    continue;
                };
                let last = s.decoding() || s.prefilled + tokens.len() == s.open.prompt.len();
                // The prompt's rows take the kernels of a fresh llama.cpp run of it.
                s.cache.set_prompt(0..s.open.prompt.len());
                items.push(BatchItem {
                    input: StageInput::Tokens(tokens),
                    cache: &mut s.cache,
                    logits: last.then_some(Logits::Last),
                });
            }
            self.stage.forward_many(&mut items)
        };
        match result {
            Ok(outs) => {
                let mut gone = Vec::new();
                for ((i, tokens), out) in feeds.iter().zip(outs) {
                    if !self.finish(*i, tokens, out) {
                        gone.push(*i);
                    }
                }
                for i in gone.into_iter().rev() {
                    let s = self.seqs.remove(i);
                    self.keep(s);
                }
            }
            Err(e) => self.fail(&feeds, e),
        }
        true
    }

    /// Records what sequence `i` fed and samples its next token when the step gave logits;
    /// `false` when it is done (finished, or its caller went away).
    fn finish(&mut self, i: usize, tokens: &[u32], out: StageOutput) -> bool {
        let s = &mut self.seqs[i];
        s.history.extend_from_slice(tokens);
        if !s.decoding() {
            s.prefilled += tokens.len();
        }
        let StageOutput::Logits(logits) = out else {
            return true; // a prompt chunk before the last
        };
        let logits = match logits.to_vec1::<f32>() {
            Ok(l) => l,
            Err(e) => {
                s.send(Err(StreamError::Forward(e.to_string())));
                return false;
            }
        };
        let position = s.history.len() as u64;
        if let Some(c) = s.open.constraint.as_mut() {
            match next_mask(c.as_mut()) {
                Ok(mask) => s.open.params.allowed = Some(mask),
                Err(e) => {
                    s.send(Err(e.into()));
                    return false;
                }
            }
        }
        let (token, scores) = sample_scored(&logits, &s.history, &s.open.params, position);
        if let (Some(c), Some(mask)) = (s.open.constraint.as_mut(), &s.open.params.allowed) {
            if let Err(e) = follow(c.as_mut(), mask, token) {
                s.send(Err(e.into()));
                return false;
            }
        }
        s.produced += 1;
        if !s.send(Ok((token, scores))) {
            return false;
        }
        if s.wants_more(token) {
            s.next = Some(token);
            true
        } else {
            false
        }
    }

    /// A failed step: every sequence in it gets the error and leaves (the others go on).
    fn fail(&mut self, feeds: &[(usize, Vec<u32>)], e: ForwardError) {
        warn!("batched step failed: {e}");
        for &(i, _) in feeds.iter().rev() {
            let s = self.seqs.remove(i);
            s.send(Err(StreamError::Forward(e.to_string())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_refuses_what_does_not_fit_before_queueing() {
        // No model needed: a handle whose engine never runs.
        let (tx, _rx) = mpsc::sync_channel(1);
        let h = BatchHandle {
            inbox: tx,
            budget: KvBudget::new(1000),
            bytes_per_position: 10,
            context: 200,
            run_ahead: 4,
            queue: 1,
            eos: Arc::default(),
            alive: Arc::new(AtomicBool::new(true)),
            prefix: Arc::new(Mutex::new(PrefixCache::new(4))),
            shared: Arc::default(),
        };
        let p = SamplingParams::default();
        assert!(matches!(h.open(&[], &p, 5), Err(OpenError::EmptyPrompt)));
        assert!(matches!(
            h.open(&[1; 200], &p, 5),
            Err(OpenError::PromptTooLong { .. })
        ));
        // 10 + 100 positions x 10 bytes > 1000.
        assert!(matches!(
            h.open(&[1; 10], &p, 100),
            Err(OpenError::Budget(_))
        ));
        let a = h.open(&[1; 10], &p, 40).unwrap();
        assert_eq!(h.budget().used(), 500);
        // The queue of one is full now.
        assert!(matches!(
            h.open(&[1; 10], &p, 10),
            Err(OpenError::QueueFull { .. })
        ));
        drop(a);
    }
}
