//! Running one generation for a handler, off the async runtime.
//!
//! ```text
//! handler ──start(job)──> find model ─> admit (slot or queue or 429)
//!                             │
//!                 spawn_blocking: render + tokenize + check context ── Err(400) ──> handler
//!                             │── backend.generate(on_text)
//!                             │     first piece: ready Ok(prompt tokens) ──> handler answers
//!                             │     then Event::Piece (bounded channel)
//!                             │   (no piece: ready Ok at the end, or Err(429/503/500) as status)
//!                             └── Event::Done(completion or error)
//! ```
//!
//! - The slot moves into the blocking task and is freed when the backend returns.
//! - `on_text` never blocks the engine on a slow client: when the channel is full, pieces are
//!   merged and sent with the next one (the text is bounded by the context anyway).
//! - Cancellation: when the client goes away the receiver is dropped (the SSE body or the
//!   non-stream handler future), the channel closes, and `on_text` answers [`Flow::Stop`] at
//!   the next piece; so does [`AppState::cancel_all`] at shutdown.

use crate::backend::{BackendError, ModelEntry};
use crate::error::ApiError;
use crate::metrics::RouteLabels;
use crate::state::AppState;
use plexus_model::chat::Message;
use plexus_model::constraint::SharedGrammar;
use plexus_model::generate::{Completion, FinishReason, Flow, GenerateRequest, Piece};
use plexus_model::sampler::TokenLogprobs;
use plexus_model::{SamplingParams, Tokenizer};
use plexus_verify::seed::RequestSeal;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

/// What the prompt is made of.
pub enum Prompt {
    /// A conversation and the tools the model may call, rendered with the model's chat
    /// template (tools in Plexus's format when the template has none, see [`super::tools`]).
    Chat(Vec<Message>, Vec<serde_json::Value>),
    /// Raw text.
    Text(String),
}

impl Prompt {
    /// The request field a context error points at.
    fn param(&self) -> &'static str {
        match self {
            Prompt::Chat(..) => "messages",
            Prompt::Text(_) => "prompt",
        }
    }
}

/// One generation asked for by a handler.
pub struct Job {
    /// The request's id (also its escrow's) and the gateway's seed commitment; the sampling
    /// seed is derived from them unless the client chose one ([`plexus_verify::seed`]).
    pub seal: RequestSeal,
    /// The route, for metrics.
    pub route: &'static str,
    pub model: String,
    pub prompt: Prompt,
    /// `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Whether text pieces are wanted as they come (else only the final completion).
    pub stream: bool,
    /// The account charged (when the gateway has a ledger), see [`crate::accounts`].
    pub payer: Option<plexus_ledger::Address>,
    /// How many choices (OpenAI's `n`), at least 1.
    pub n: usize,
    /// The grammar every choice obeys (structured outputs, tool calls), if any.
    pub grammar: Option<GrammarRequest>,
}

/// A grammar a request asks for, and the parameter it came from (named when it is refused).
#[derive(Debug)]
pub struct GrammarRequest {
    pub grammar: llguidance::api::TopLevelGrammar,
    pub param: &'static str,
}

/// What a running generation reports after it started.
pub enum Event {
    /// New text of one choice and the log-probabilities of its tokens (when asked for).
    Piece {
        choice: usize,
        text: String,
        logprobs: Vec<TokenLogprobs>,
    },
    /// Every choice, in order.
    Done(Result<Vec<Completion>, ApiError>),
}

/// Pieces the channel had no room for yet, merged per choice (at most one entry per choice
/// in a row, so bounded by the text itself).
#[derive(Default)]
struct Pending(Vec<(usize, String, Vec<TokenLogprobs>)>);

impl Pending {
    fn push(&mut self, choice: usize, piece: &Piece) {
        match self.0.last_mut() {
            Some((c, text, scores)) if *c == choice => {
                text.push_str(piece.text);
                scores.extend_from_slice(piece.logprobs);
            }
            _ => self
                .0
                .push((choice, piece.text.to_owned(), piece.logprobs.to_vec())),
        }
    }

    /// Sends what fits; `false` when the receiver is gone.
    fn flush(&mut self, tx: &mpsc::Sender<Event>) -> bool {
        while !self.0.is_empty() {
            let (choice, text, logprobs) = self.0.remove(0);
            match tx.try_send(Event::Piece {
                choice,
                text,
                logprobs,
            }) {
                Ok(()) => {}
                Err(TrySendError::Full(Event::Piece {
                    choice,
                    text,
                    logprobs,
                })) => {
                    self.0.insert(0, (choice, text, logprobs));
                    return true;
                }
                Err(_) => return false,
            }
        }
        true
    }
}

/// A generation that passed every check and is running.
pub struct Running {
    /// The served model's id (the `model` of responses).
    pub model: String,
    /// The model's identity, for `system_fingerprint`.
    pub identity: String,
    pub prompt_tokens: usize,
    pub seed: u64,
    /// The request's id and seed commitment, reported with the seed.
    pub seal: RequestSeal,
    /// The model's tokenizer, to render log-probabilities.
    pub tokenizer: Arc<Tokenizer>,
    pub events: mpsc::Receiver<Event>,
}

/// Admits and starts `job`; returns once the backend has admitted it (its first piece of
/// text) or it ended, so that every request error, a backend's refusal included (a full KV
/// budget, no route), is still an HTTP status. Cancel-safe: dropping the future while queued
/// gives the place back; dropping it later stops the generation at its next piece of text.
pub async fn start(state: &AppState, job: Job) -> Result<Running, ApiError> {
    let arrived = Instant::now();
    let entry = state
        .find_model(&job.model)
        .ok_or_else(|| ApiError::ModelNotFound(job.model.clone()))?;
    let meter = crate::accounts::hold_for(state, &job, entry.context).await?;
    let slot = state.limits().admit().await?;
    let (tx, events) = mpsc::channel(state.config().stream_buffer.max(2));
    let (ready_tx, ready) = oneshot::channel();
    let model = state.served_name(&entry.id).to_owned();
    let identity = entry.identity.clone();
    let tokenizer = entry.tokenizer.clone();
    let seed = job.sampling.seed;
    let seal = job.seal;
    let task = Task {
        state: state.clone(),
        runtime: tokio::runtime::Handle::current(),
        entry,
        job,
        arrived,
        tx,
        meter,
    };
    tokio::task::spawn_blocking(move || task.run(slot, ready_tx));
    match ready.await {
        Ok(Ok(prompt_tokens)) => Ok(Running {
            model,
            identity,
            prompt_tokens,
            seed,
            seal,
            tokenizer,
            events,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::Internal(
            "the generation task ended before it started".into(),
        )),
    }
}

/// Waits for the end of a generation started without streaming.
pub async fn finish(mut running: Running) -> Result<Vec<Completion>, ApiError> {
    while let Some(event) = running.events.recv().await {
        if let Event::Done(result) = event {
            return result;
        }
    }
    Err(ApiError::Internal(
        "the generation task ended without a result".into(),
    ))
}

/// The blocking half of a generation.
struct Task {
    state: AppState,
    runtime: tokio::runtime::Handle,
    entry: ModelEntry,
    job: Job,
    arrived: Instant,
    tx: mpsc::Sender<Event>,
    meter: Option<crate::accounts::Meter>,
}

impl Task {
    fn run(mut self, slot: crate::limits::Slot, ready: oneshot::Sender<Result<usize, ApiError>>) {
        let (req, grammar) = match self.prepare().and_then(|req| Ok((req, self.grammar()?))) {
            Ok(ready) => ready,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let prompt_tokens = req.prompt_tokens.len();
        if ready.is_closed() {
            return; // The client left while the prompt was prepared.
        }
        // The response starts (a 200, and for a stream its headers) once the backend has
        // admitted the generation: at its first piece of text, or at its end. A refusal before
        // that (a full KV budget: 429 `server_overloaded`; no route) is still an HTTP status,
        // not an error event after a 200.
        let mut ready = Some(ready);
        let metrics = self.state.metrics();
        metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        let mut pending = Pending::default();
        let mut first = true;
        let mut on_text = |choice: usize, piece: &Piece| -> Flow {
            if first {
                first = false;
                metrics
                    .time_to_first_token
                    .observe(self.arrived.elapsed().as_secs_f64());
                if self.state.is_cancelled() {
                    return Flow::Stop; // Shutting down: the status says so (below).
                }
                if ready
                    .take()
                    .is_some_and(|r| r.send(Ok(prompt_tokens)).is_err())
                {
                    return Flow::Stop; // The client left during the prefill.
                }
            }
            if self.state.is_cancelled() || self.tx.is_closed() {
                return Flow::Stop;
            }
            if !self.job.stream {
                return Flow::Continue;
            }
            pending.push(choice, piece);
            if pending.flush(&self.tx) {
                Flow::Continue
            } else {
                Flow::Stop
            }
        };
        let backend = self.state.backend();
        let mut meter = self.meter.take();
        // During the stream: the providers' vouchers every `VOUCHER_EVERY` sampled tokens.
        let runtime = self.runtime.clone();
        let mut progress = |sampled: usize, running: &crate::backend::Usage| {
            if let Some(m) = meter.as_mut() {
                let vouchers = m.checkpoint_blocking(&runtime, sampled, running);
                if !vouchers.is_empty() {
                    backend.deliver_vouchers(vouchers);
                }
            }
        };
        let mut metering = crate::backend::Metering {
            usage: crate::backend::Usage::default(),
            every: crate::accounts::VOUCHER_EVERY,
            progress: Some(&mut progress),
        };
        let result = match &grammar {
            Some(g) => backend.generate_guided(
                &self.entry.id,
                &req,
                self.job.n,
                g,
                &mut on_text,
                &mut metering,
            ),
            None => backend.generate_metered(
                &self.entry.id,
                &req,
                self.job.n,
                &mut on_text,
                &mut metering,
            ),
        };
        let usage = metering.usage;
        drop(slot);
        if let Some(meter) = meter.take() {
            // Charged for what was produced (every choice), cancelled streams included; before
            // the client sees the end, so its next look at the account shows the charge. The
            // providers are paid from it for the work their receipts prove.
            let tokens = result
                .as_ref()
                .map_or(0, |cs| cs.iter().map(|c| c.tokens.len()).sum());
            let vouchers = meter.finish_blocking(&self.runtime, tokens, &usage);
            if !vouchers.is_empty() {
                self.state.backend().deliver_vouchers(vouchers);
            }
        }
        if let Ok(cs) = &result {
            // Counted even when cancelled: the engine did the work.
            let n: usize = cs.iter().map(|c| c.tokens.len()).sum();
            metrics.completion_tokens.inc_by(n as u64);
        }
        let result = match result {
            Ok(cs)
                if cs.len() < self.job.n
                    || cs.iter().any(|c| c.finish == FinishReason::Cancelled) =>
            {
                if self.state.is_cancelled() {
                    Err(ApiError::Unavailable("the server is shutting down".into()))
                } else {
                    tracing::debug!("generation cancelled: the client went away");
                    return;
                }
            }
            Ok(c) => {
                metrics
                    .request_duration
                    .get_or_create(&RouteLabels {
                        route: self.job.route,
                    })
                    .observe(self.arrived.elapsed().as_secs_f64());
                Ok(c)
            }
            Err(e) => Err(backend_error(e)),
        };
        if let Some(ready) = ready.take() {
            // Nothing was sent yet: a failure is the response's status.
            if let Err(e) = result {
                let _ = ready.send(Err(e));
                return;
            }
            if ready.send(Ok(prompt_tokens)).is_err() {
                return;
            }
        }
        // The engine is free; hand over what is left, waiting a bounded time for a stalled
        // client.
        let tx = self.tx;
        let deliver = async move {
            for (choice, text, logprobs) in pending.0 {
                tx.send(Event::Piece {
                    choice,
                    text,
                    logprobs,
                })
                .await
                .ok()?;
            }
            tx.send(Event::Done(result)).await.ok()
        };
        let stall = self.state.config().stall_timeout;
        if self
            .runtime
            .block_on(tokio::time::timeout(stall, deliver))
            .is_err()
        {
            tracing::debug!("gave up delivering the end of a generation to a stalled client");
        }
    }

    /// Compiles the job's grammar for the model (a grammar the engine refuses is a 400).
    fn grammar(&self) -> Result<Option<SharedGrammar>, ApiError> {
        let Some(g) = &self.job.grammar else {
            return Ok(None);
        };
        self.state
            .grammars()
            .compile(
                &self.entry.identity,
                &self.entry.tokenizer,
                g.grammar.clone(),
                g.param,
            )
            .map(Some)
    }

    /// Renders and tokenizes the prompt and checks it against the context.
    fn prepare(&self) -> Result<GenerateRequest, ApiError> {
        let tok = &self.entry.tokenizer;
        let encoded = encode(&self.entry, &self.job.prompt)?;
        let vocab = tok.vocab_size();
        if let Some(&(id, _)) = self
            .job
            .sampling
            .logit_bias
            .iter()
            .find(|b| b.0 as usize >= vocab)
        {
            return Err(ApiError::invalid(
                format!("`logit_bias` names token {id}, outside the vocabulary of {vocab} tokens"),
                Some("logit_bias"),
            ));
        }
        let param = self.job.prompt.param();
        let context = self.entry.context;
        let n = encoded.len();
        if n == 0 {
            return Err(ApiError::invalid("the prompt is empty", Some(param)));
        }
        if n >= context {
            return Err(ApiError::ContextLengthExceeded {
                message: format!(
                    "This model's maximum context length is {context} tokens. However, your \
                     {param} resulted in {n} tokens. Please reduce the length of the {param}."
                ),
                param,
            });
        }
        let max_tokens = match self.job.max_tokens {
            Some(m) if m.saturating_add(n) > context => {
                return Err(ApiError::ContextLengthExceeded {
                    message: format!(
                        "This model's maximum context length is {context} tokens. However, you \
                         requested {} tokens ({n} in the {param}, {m} in the completion). \
                         Please reduce the length of the {param} or completion.",
                        m.saturating_add(n)
                    ),
                    param,
                })
            }
            Some(m) => m,
            None => context - n,
        };
        Ok(GenerateRequest {
            prompt_tokens: encoded,
            max_tokens,
            sampling: self.job.sampling.clone(),
            stop: self.job.stop.clone(),
        })
    }
}

/// Renders `prompt` for `entry` (its chat template, tools in Plexus's format when the
/// template has none) and tokenizes it. Blocking: templates and tokenizers are CPU work.
pub fn encode(entry: &ModelEntry, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
    let tok = &entry.tokenizer;
    match prompt {
        Prompt::Chat(messages, tools) => {
            let template = entry.chat_template.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    format!(
                        "the model `{}` has no chat template; use /v1/completions",
                        entry.id
                    ),
                    Some("model"),
                )
            })?;
            let rendered = if template.supports_tools() {
                template.render_with_tools(messages, tools, true)
            } else {
                template.render(&super::tools::plain_messages(messages.clone(), tools), true)
            };
            let text = rendered.map_err(|e| {
                ApiError::invalid(
                    format!("cannot apply the chat template: {e}"),
                    Some("messages"),
                )
            })?;
            // Templates that write the BOS token themselves must not get a second one.
            let bos_in_text = tok
                .bos()
                .and_then(|b| tok.token_text(b))
                .is_some_and(|b| !b.is_empty() && text.starts_with(&b));
            refuse_untokenizable(entry, &text, "messages")?;
            tok.encode(&text, !bos_in_text)
        }
        Prompt::Text(text) => {
            refuse_untokenizable(entry, text, "prompt")?;
            tok.encode(text, true)
        }
    }
    .map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))
}

/// Refuses `text` when the model's vocabulary has no token for some of its characters (a
/// character-level checkpoint `plexus train` wrote knows only its task's characters): its
/// tokenizer would leave them out without a word. Byte-level vocabularies cover every text
/// (decided once per model: [`plexus_model::Tokenizer::covers_every_text`]).
fn refuse_untokenizable(
    entry: &ModelEntry,
    text: &str,
    param: &'static str,
) -> Result<(), ApiError> {
    let missing = entry.tokenizer.untokenizable(text);
    if missing.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(
        format!(
            "the vocabulary of `{}` has no token for {}: such characters cannot be given to the model",
            entry.id,
            plexus_model::tokenizer::name_chars(&missing)
        ),
        Some(param),
    ))
}

fn backend_error(e: BackendError) -> ApiError {
    match e {
        BackendError::Unavailable { model, reason } => {
            tracing::warn!(%model, %reason, "backend unavailable");
            ApiError::Unavailable(format!("no capacity to serve `{model}` right now"))
        }
        BackendError::Overloaded(message) => ApiError::ServerOverloaded(message),
        BackendError::Invalid(message) => ApiError::invalid(message, None),
        BackendError::Internal(cause) => ApiError::Internal(cause),
    }
}
