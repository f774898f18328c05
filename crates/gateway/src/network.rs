//! The network backend: generations run through a chain of stage nodes found on the Plexus
//! network ([`plexus_node::client`]), with failover. The gateway keeps the tokenizer and chat
//! template of each model it offers (from a local copy of the model) and matches the model's
//! identity against what nodes announce.

use crate::backend::{Backend, BackendError, Metering, ModelEntry, Usage};
use crate::live::Live;
use crate::local::{model_id, LoadError};
use plexus_core::wire::ErrorCode;
use plexus_core::Digest;
use plexus_model::constraint::{Guided, GuidedError, SharedGrammar};
use plexus_model::generate::{
    choice_seed, generate_with, Completion, FinishReason, Flow, GenerateError, GenerateRequest,
    Piece,
};
use plexus_model::identity::identity;
use plexus_model::ModelFiles;
use plexus_node::client::{ChainError, NetworkClient, RemoteChain};
use plexus_node::route::best_route;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

struct NetModel {
    entry: ModelEntry,
    digest: Digest,
    num_layers: usize,
    /// When a full route was last seen: a model whose node just died stays listed while the
    /// survivors take its layers over (the chain waits for them as it does mid-stream).
    last_covered: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Serves models through remote stage chains.
pub struct NetworkBackend {
    client: NetworkClient,
    models: Vec<NetModel>,
    /// Delivers providers' vouchers (started when created inside a tokio runtime).
    post: Option<crate::payments::VoucherPost>,
    /// Every provider's accepted work since start (`plexus_provider_work_total`).
    work: std::sync::Mutex<Usage>,
}

impl NetworkBackend {
    pub fn new(client: NetworkClient) -> Self {
        let post = crate::payments::VoucherPost::start(client.clone());
        Self {
            client,
            models: Vec::new(),
            post,
            work: std::sync::Mutex::new(Usage::default()),
        }
    }

    /// Offers the model at `path` (its tokenizer and template are read here; its layers are
    /// served by nodes announcing the same identity).
    pub fn add_model(
        &mut self,
        path: &Path,
        cache_dir: Option<&Path>,
    ) -> Result<&ModelEntry, LoadError> {
        let files = ModelFiles::open(path)?;
        let digest = identity(&files.weight_files, cache_dir, |_, _| {})?;
        let num_layers = files.config.num_layers;
        let context = files.config.max_position_embeddings;
        let tokenizer = files.tokenizer()?;
        let chat_template = files.chat_template(&tokenizer)?.map(Arc::new);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.models.push(NetModel {
            entry: ModelEntry {
                id: model_id(path),
                identity: digest.to_string(),
                context,
                tokenizer: Arc::new(tokenizer),
                chat_template,
                created,
            },
            digest,
            num_layers,
            last_covered: std::sync::Mutex::new(None),
        });
        Ok(&self.models[self.models.len() - 1].entry)
    }

    pub fn client(&self) -> &NetworkClient {
        &self.client
    }

    /// Waits until some chain covers every offered model (false at `timeout`). A model seen
    /// covered here stays listed while its route is briefly missing (a node restarting or
    /// moving its span right after start), as one seen covered by a request does.
    pub async fn wait_for_routes(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for m in &self.models {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !self
                .client
                .wait_for_route(&m.digest, m.num_layers, left)
                .await
            {
                return false;
            }
            *m.last_covered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now());
        }
        true
    }

    fn covered(&self, m: &NetModel) -> bool {
        let dir = self.client.directory();
        let cands: Vec<_> = dir
            .offers(&m.digest)
            .into_iter()
            .filter(|(_, a, _)| self.client.affordable(a.price))
            .map(|(peer, _, o)| plexus_node::route::Candidate {
                peer,
                start: o.start as usize,
                end: o.end as usize,
                compute_s: 0.0,
                rtt: None,
                load: 0.0,
                price_s: 0.0,
                full: false,
            })
            .collect();
        let now = std::time::Instant::now();
        let mut last = m
            .last_covered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if best_route(&cands, 0, m.num_layers, &[]).is_some() {
            *last = Some(now);
            return true;
        }
        last.is_some_and(|t| now.duration_since(t) < self.client.reroute_wait())
    }
}

fn map_error(e: GenerateError<ChainError>) -> BackendError {
    match e {
        GenerateError::EmptyPrompt | GenerateError::PromptTooLong { .. } => {
            BackendError::Invalid(e.to_string())
        }
        GenerateError::Forward(ChainError::Refused {
            code: ErrorCode::BadRequest | ErrorCode::ContextOverflow,
            ref message,
            ..
        }) => BackendError::Invalid(message.clone()),
        GenerateError::Forward(ChainError::NoRoute { ref model, .. }) => {
            BackendError::Unavailable {
                model: model.clone(),
                reason: e.to_string(),
            }
        }
        // Every node with the layers is full now: 429 `server_overloaded`, retry later.
        GenerateError::Forward(ChainError::Busy { .. }) => BackendError::Overloaded(e.to_string()),
        GenerateError::Forward(ChainError::TooManyFailovers(_)) => BackendError::Unavailable {
            model: String::new(),
            reason: e.to_string(),
        },
        other => BackendError::Internal(other.to_string()),
    }
}

impl Backend for NetworkBackend {
    fn models(&self) -> Vec<ModelEntry> {
        self.models
            .iter()
            .filter(|m| self.covered(m))
            .map(|m| m.entry.clone())
            .collect()
    }

    fn generate(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&Piece) -> Flow,
    ) -> Result<Completion, BackendError> {
        let mut one = |_: usize, p: &Piece| on_text(p);
        let mut c = self.choices(model_id, req, 1, None, &mut one, &mut Metering::total())?;
        c.pop()
            .ok_or_else(|| BackendError::Internal("no choice generated".into()))
    }

    fn generate_metered(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
        metering: &mut Metering<'_>,
    ) -> Result<Vec<Completion>, BackendError> {
        self.choices(model_id, req, n, None, on_text, metering)
    }

    /// The last stage of the chain samples: the grammar's mask for each position goes with
    /// every call to it, and the token it answers is checked against the mask.
    fn generate_guided(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        grammar: &SharedGrammar,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
        metering: &mut Metering<'_>,
    ) -> Result<Vec<Completion>, BackendError> {
        self.choices(model_id, req, n, Some(grammar), on_text, metering)
    }

    fn deliver_vouchers(&self, vouchers: Vec<plexus_ledger::SignedVoucher>) {
        match &self.post {
            Some(post) => post.post(vouchers),
            None => tracing::warn!(
                count = vouchers.len(),
                "no voucher delivery (the backend was built outside a runtime)"
            ),
        }
    }

    fn render_metrics(&self, out: &mut String) {
        let dir = self.client.directory();
        let _ = write!(
            out,
            "# HELP plexus_directory_peers Peers with a live announcement.\n# TYPE plexus_directory_peers gauge\nplexus_directory_peers {}\n",
            dir.len()
        );
        let m = self.client.metrics();
        let c = self.client.handle().counters();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}_total {v}\n"
            );
        };
        counter(
            "plexus_chain_tokens",
            "Tokens generated through remote chains.",
            m.tokens.load(Ordering::Relaxed),
        );
        counter(
            "plexus_stage_calls",
            "Stage calls made.",
            m.stage_calls.load(Ordering::Relaxed),
        );
        counter(
            "plexus_stage_call_microseconds",
            "Time spent in stage calls.",
            m.stage_call_micros.load(Ordering::Relaxed),
        );
        counter(
            "plexus_chain_failovers",
            "Stages replaced mid-generation.",
            m.failovers.load(Ordering::Relaxed),
        );
        counter(
            "plexus_chain_replayed_positions",
            "Positions replayed to replacement stages.",
            m.replayed_positions.load(Ordering::Relaxed),
        );
        counter(
            "plexus_stage_receipts",
            "Stage calls whose signed receipt was accepted (metered for pay).",
            m.receipts.load(Ordering::Relaxed),
        );
        counter(
            "plexus_stage_receipts_refused",
            "Stage calls whose receipt was missing, forged or false (not paid).",
            m.receipts_refused.load(Ordering::Relaxed),
        );
        counter(
            "plexus_commitment_bytes",
            "Bytes of activation-fingerprint commitments in accepted receipts (32 a stage call).",
            m.commitment_bytes.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audits",
            "Provider jobs drawn for audit (Proof of Sampling).",
            m.audits.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audits_unavailable",
            "Jobs drawn for audit that found no auditor (no other node serves the span).",
            m.audits_unavailable.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audits_cross_build",
            "Jobs audited by a node of another build (compared within the published band).",
            m.audits_cross_build.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_calls_passed",
            "Audited stage calls whose auditor's answer agreed (same commitment, or within the band across builds).",
            m.audit_calls_passed.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_band_comparisons",
            "Cross-build audit comparisons (windows of activation rows, or sampled tokens).",
            m.audit_band_comparisons.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_band_misses",
            "Cross-build comparisons outside the band that the referees confirmed.",
            m.audit_band_misses.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_token_near_ties",
            "Cross-build audits of a last stage whose token differed from the checker's but was a near tie under its draw (passed).",
            m.audit_token_near_ties.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_token_wide_near_ties",
            "Of the near ties, those that needed more than the narrow slack (0.1 nats).",
            m.audit_token_wide_near_ties.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_near_tie_convictions",
            "Last stages convicted because their near ties were improbable for an honest node (crate plexus_verify::ties).",
            m.audit_near_tie_convictions.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_token_undecided",
            "Cross-build audits of a last stage whose token differed where the checker's draw could not judge (temperature above 1 without top-k; passed).",
            m.audit_token_undecided.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_unpaid_calls",
            "Stage calls the referees rejected across builds without a conviction: not paid.",
            m.audit_unpaid_calls.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_disputes",
            "Audited stage calls whose answers disagreed (sent to referees).",
            m.audit_disputes.load(Ordering::Relaxed),
        );
        counter(
            "plexus_audit_convictions",
            "Nodes convicted by referees (excluded from routing and slashed).",
            m.audit_convictions.load(Ordering::Relaxed),
        );
        counter(
            "plexus_chains_opened",
            "Chains opened from position 0.",
            m.chains_opened.load(Ordering::Relaxed),
        );
        counter(
            "plexus_chain_forks",
            "Chains forked from the chain of the choice before (n > 1: the prompt is shared).",
            m.forks.load(Ordering::Relaxed),
        );
        counter(
            "plexus_chain_forked_positions",
            "Prompt positions forked chains did not compute again.",
            m.forked_positions.load(Ordering::Relaxed),
        );
        counter(
            "plexus_chain_forks_refused",
            "Forks a stage refused (the choice opened its own chain).",
            m.forks_refused.load(Ordering::Relaxed),
        );
        counter(
            "plexus_wire_sent_bytes",
            "Bytes sent on stage streams.",
            c.sent.load(Ordering::Relaxed),
        );
        counter(
            "plexus_wire_received_bytes",
            "Bytes received on stage streams.",
            c.received.load(Ordering::Relaxed),
        );
        counter(
            "plexus_wire_rejected_frames",
            "Frames refused as oversized or undecodable.",
            c.rejected.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP plexus_provider_work Position-layers of accepted receipts, per provider account and price (micro-PLX per 1000).\n# TYPE plexus_provider_work counter"
        );
        if let Ok(work) = self.work.lock() {
            for ((account, price), w) in &work.providers {
                let _ = writeln!(
                    out,
                    "plexus_provider_work_total{{account=\"{account}\",price=\"{price}\"}} {}",
                    w.work
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP plexus_node_reputation Published reputation of each known node: trust x availability x speed from audits, answered calls and the decode latency this gateway measured (0: convicted).\n# TYPE plexus_node_reputation gauge"
        );
        for (peer, score) in self.client.reputations() {
            let _ = writeln!(out, "plexus_node_reputation{{peer=\"{peer}\"}} {score:.4}");
        }
        let _ = writeln!(
            out,
            "# HELP plexus_node_doubted Nodes this gateway doubts (referee-confirmed audit misses improbable for an honest node, short of a conviction; announced, so that nodes trusting its verdicts put a spare beside them).\n# TYPE plexus_node_doubted gauge"
        );
        for peer in self.client.book().doubted() {
            let _ = writeln!(out, "plexus_node_doubted{{peer=\"{peer}\"}} 1");
        }
        if let Some(post) = &self.post {
            post.render(out);
        }
    }
}

impl NetworkBackend {
    /// `n` choices one after the other. The first opens a chain; each next one forks the
    /// chain of the one before after all but the prompt's last position (its stages copy
    /// those positions, see [`RemoteChain::fork`]), so the prompt is computed once. A choice
    /// whose fork a stage refused opens a chain of its own.
    fn choices(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        grammar: Option<&SharedGrammar>,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
        metering: &mut Metering<'_>,
    ) -> Result<Vec<Completion>, BackendError> {
        let m = self
            .models
            .iter()
            .find(|m| m.entry.id == model_id)
            .ok_or_else(|| BackendError::Invalid(format!("unknown model {model_id}")))?;
        let mut out: Vec<Completion> = Vec::with_capacity(n);
        let mut before: Option<RemoteChain> = None;
        // After one refusal (weights that are not split-invariant refuse every fork), the
        // remaining choices open their own chains.
        let mut fork_refused = false;
        for i in 0..n {
            let mut r = req.clone();
            r.sampling.seed = choice_seed(req.sampling.seed, i as u32);
            let forked = before
                .take()
                .map(|mut b| b.fork(&r.prompt_tokens, r.sampling.clone()));
            let chain = match forked {
                Some(Ok(chain)) => chain,
                Some(Err(why)) => {
                    tracing::info!(choice = i, "the prompt is computed again: {why}");
                    fork_refused = true;
                    self.open(m, &r)?
                }
                None => self.open(m, &r)?,
            };
            let sampled = out.iter().map(|c| c.tokens.len()).sum();
            let (c, chain) = self.generate_on(
                chain,
                m,
                &r,
                grammar,
                &mut |p| on_text(i, p),
                metering,
                sampled,
            );
            let c = c?;
            let cancelled = c.finish == FinishReason::Cancelled;
            out.push(c);
            if cancelled {
                break;
            }
            if i + 1 < n && !fork_refused && r.prompt_tokens.len() > 1 {
                before = Some(chain);
            }
        }
        Ok(out)
    }

    fn open(&self, m: &NetModel, req: &GenerateRequest) -> Result<RemoteChain, BackendError> {
        self.client
            .open_chain(
                m.digest,
                m.num_layers,
                m.entry.context,
                req.sampling.clone(),
            )
            .map_err(|e| BackendError::Unavailable {
                model: m.entry.id.clone(),
                reason: e.to_string(),
            })
    }

    /// One generation through `chain`, after `sampled` tokens of earlier choices; the chain's
    /// metered work is reported to `metering` as it runs and added to its usage whether it
    /// finished, was cancelled or failed (work done is paid). The chain comes back (its
    /// sessions open until it is dropped).
    #[allow(clippy::too_many_arguments)]
    fn generate_on(
        &self,
        chain: RemoteChain,
        m: &NetModel,
        req: &GenerateRequest,
        grammar: Option<&SharedGrammar>,
        on_text: &mut dyn FnMut(&Piece) -> Flow,
        metering: &mut Metering<'_>,
        sampled: usize,
    ) -> (Result<Completion, BackendError>, RemoteChain) {
        let tokenizer = &m.entry.tokenizer;
        let Some(grammar) = grammar else {
            let mut live = Live::new(chain, metering, sampled);
            let result =
                generate_with(&mut live, tokenizer, req, |t| on_text(t)).map_err(map_error);
            let chain = live.into_chain();
            self.meter(&mut metering.usage, chain.usage());
            return (result, chain);
        };
        let mut guided = Guided::new(Live::new(chain, metering, sampled), grammar.start());
        let result =
            generate_with(&mut guided, tokenizer, req, |t| on_text(t)).map_err(|e| match e {
                GenerateError::Forward(GuidedError::Constraint(c)) => {
                    BackendError::Internal(format!("constrained decoding: {c}"))
                }
                GenerateError::Forward(GuidedError::Chain(c)) => {
                    map_error(GenerateError::Forward(c))
                }
                GenerateError::EmptyPrompt => map_error(GenerateError::EmptyPrompt),
                GenerateError::PromptTooLong { prompt, context } => {
                    map_error(GenerateError::PromptTooLong { prompt, context })
                }
                GenerateError::Tokenizer(t) => map_error(GenerateError::Tokenizer(t)),
            });
        let chain = guided.into_inner().into_chain();
        self.meter(&mut metering.usage, chain.usage());
        (result, chain)
    }

    /// Adds a chain's metered work to the request's `usage` and to every provider's total
    /// (the work only: verdicts stay with the request that settles them).
    fn meter(&self, usage: &mut Usage, chain: &Usage) {
        usage.merge(chain);
        if let Ok(mut work) = self.work.lock() {
            work.merge(&Usage {
                providers: chain.providers.clone(),
                ..Usage::default()
            });
        }
    }
}
