//! What the gateway serves from: a [`Backend`] runs generations for the models it lists.
//!
//! - [`crate::local::LocalBackend`]: the engine in this process (one model, like llama-server).
//! - the network backend (in `plexus-node`'s client): a chain of stage nodes over libp2p.
//!
//! The gateway owns everything HTTP (parsing, templates, limits, SSE); a backend only turns
//! prompt tokens into text. `generate` is blocking and CPU- or network-bound: the gateway calls
//! it from a blocking thread, never on the async runtime.

use plexus_model::chat::ChatTemplate;
use plexus_model::constraint::SharedGrammar;
use plexus_model::generate::{choice_seed, Completion, FinishReason, Flow, GenerateRequest, Piece};
use plexus_model::Tokenizer;
use std::sync::Arc;

pub use plexus_node::metering::Usage;

/// The hook a running generation reports its usage to: `(sampled tokens so far, usage so far)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, &Usage);

/// What a metered generation reports of its providers' work: the work of its finished chains
/// in `usage`, and, while a chain runs, the running total (finished chains and the running
/// one) every `every` sampled tokens to `progress` with the request's sampled tokens so far
/// (the gateway signs vouchers from it during a stream).
pub struct Metering<'a> {
    pub usage: Usage,
    /// Sampled tokens between two `progress` reports (0: none).
    pub every: usize,
    pub progress: Option<Progress<'a>>,
}

impl Metering<'_> {
    /// Only the total, no progress reports.
    pub fn total() -> Self {
        Self {
            usage: Usage::default(),
            every: 0,
            progress: None,
        }
    }
}

/// A model a backend can serve.
#[derive(Clone)]
pub struct ModelEntry {
    /// The id clients put in `"model"` (e.g. `SmolLM2-135M-Instruct`).
    pub id: String,
    /// The model's identity (sha256 of its weights, hex).
    pub identity: String,
    /// Context length in positions.
    pub context: usize,
    pub tokenizer: Arc<Tokenizer>,
    /// `None` when the model has no chat template (then only `/v1/completions` works).
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// Unix seconds, for `/v1/models`' `created`.
    pub created: u64,
}

/// Why a backend could not finish a generation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No capacity right now (no chain covers the model, all stages busy): 429/503 upstream.
    #[error("no capacity to serve {model}: {reason}")]
    Unavailable { model: String, reason: String },
    /// This server has no room for the request now (its KV memory budget or its engine
    /// queue is full): 429 `server_overloaded`, retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The request can never succeed (context overflow found late, bad token).
    #[error("{0}")]
    Invalid(String),
    /// Anything else; the message is logged, not sent to clients.
    #[error("{0}")]
    Internal(String),
}

/// Runs generations. Implementations are shared across request handlers: `generate` may be
/// called from several blocking threads at once (up to the gateway's `max_concurrent`).
pub trait Backend: Send + Sync + 'static {
    /// The models this backend can serve now.
    fn models(&self) -> Vec<ModelEntry>;

    /// Generates a completion of `req` with model `model_id`, calling `on_text` with each new
    /// piece of text (and the log-probabilities of its tokens when `req.sampling` asks); when `on_text` returns [`Flow::Stop`] (the client went away) the backend
    /// stops and releases the work on every machine involved. Blocking.
    fn generate(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&Piece) -> Flow,
    ) -> Result<Completion, BackendError>;

    /// Generates `n` choices of `req` (OpenAI's `n`), choice `i` with the seed
    /// [`choice_seed`]`(req.sampling.seed, i)`; `on_text` gets the choice index with each
    /// piece. Stops after a cancelled choice. The default runs [`Backend::generate`] once per
    /// choice; a backend that can share the prompt's KV cache between choices overrides it.
    fn generate_choices(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
    ) -> Result<Vec<Completion>, BackendError> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut r = req.clone();
            r.sampling.seed = choice_seed(req.sampling.seed, i as u32);
            let c = self.generate(model_id, &r, &mut |p| on_text(i, p))?;
            let cancelled = c.finish == FinishReason::Cancelled;
            out.push(c);
            if cancelled {
                break;
            }
        }
        Ok(out)
    }

    /// [`Backend::generate_choices`], also reporting to `metering` the work each provider did,
    /// as checked against its signed receipts (see `plexus_node::metering`). The default (a
    /// backend whose work is all done by this gateway, like the local engine) reports nothing:
    /// the pay for its tokens goes to the gateway's own account.
    fn generate_metered(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
        metering: &mut Metering<'_>,
    ) -> Result<Vec<Completion>, BackendError> {
        let _ = metering;
        self.generate_choices(model_id, req, n, on_text)
    }

    /// [`Backend::generate_metered`] with every sampled token of every choice obeying
    /// `grammar` (structured outputs, tool calls): each choice starts its own
    /// [`plexus_model::constraint::Grammar::start`] and the mask is applied where its tokens
    /// are sampled. The default refuses, since a backend that ignored the grammar would
    /// silently answer unconstrained text.
    fn generate_guided(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        grammar: &SharedGrammar,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
        metering: &mut Metering<'_>,
    ) -> Result<Vec<Completion>, BackendError> {
        let _ = (model_id, req, n, grammar, on_text, metering);
        Err(BackendError::Invalid(
            "this server's backend cannot constrain decoding (`response_format`, `tools`)".into(),
        ))
    }

    /// Appends the backend's own metrics to the gateway's `/metrics` page, in the OpenMetrics
    /// text format (`# HELP`, `# TYPE`, then samples; counter samples end in `_total`; no
    /// `# EOF`, the gateway writes it). Called on every scrape, so keep it cheap.
    fn render_metrics(&self, _out: &mut String) {}

    /// Hands a settled request's provider vouchers over for delivery to the providers (the
    /// network backend sends each to its node, see [`crate::payments`]). Must not block: it
    /// runs on a generation thread. The default has no providers to deliver to.
    fn deliver_vouchers(&self, vouchers: Vec<plexus_ledger::SignedVoucher>) {
        if !vouchers.is_empty() {
            tracing::debug!(
                count = vouchers.len(),
                "vouchers without a way to deliver them"
            );
        }
    }
}
