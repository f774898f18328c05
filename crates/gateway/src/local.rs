//! [`LocalBackend`]: one model run by the engine in this process, like llama-server.
//!
//! Generations go through the batching engine ([`plexus_model::serve`]): one engine thread runs
//! the decode steps of every running generation as one batched forward pass, with prompts cut
//! into chunks mixed in, while each request's blocking thread turns tokens into text, stop
//! strings and SSE. Each generation's tokens are those it would get alone. A generation whose
//! KV cache (prompt + `max_tokens` positions) does not fit in the KV budget is refused with
//! [`BackendError::Overloaded`] (429 `server_overloaded`), never by evicting a running one; a
//! client that goes away cancels its generation, queued or running.

use crate::backend::{Backend, BackendError, ModelEntry};
use plexus_model::constraint::SharedGrammar;
use plexus_model::generate::{
    choice_seed, generate_with, Completion, FinishReason, Flow, GenerateError, GenerateRequest,
    Piece,
};
use plexus_model::identity::{identity, IdentityError};
use plexus_model::serve::{BatchHandle, OpenError, ServeConfig, StreamError};
use plexus_model::{LoadModelError, ModelFiles};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a local model could not be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] LoadModelError),
    #[error("cannot compute the model's identity")]
    Identity(#[from] IdentityError),
}

/// The engine in this process serving one model.
pub struct LocalBackend {
    entry: ModelEntry,
    engine: BatchHandle,
}

/// Quantization suffixes of GGUF file names (`model.Q4_1.gguf`, `model-q8_0.gguf`, ...).
fn is_quant_suffix(s: &str) -> bool {
    let s = s.to_ascii_uppercase();
    ["F32", "F16", "BF16"].contains(&s.as_str())
        || ((s.starts_with('Q') || s.starts_with("IQ"))
            && s.chars().any(|c| c.is_ascii_digit())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

/// The id clients use for the model at `path`: the file (or directory) name without `.gguf`
/// and without a trailing quantization tag (`SmolLM2-135M-Instruct.Q4_1.gguf` ->
/// `SmolLM2-135M-Instruct`).
pub fn model_id(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    let name = name.map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned());
    match name.rfind(['.', '-']) {
        Some(at) if at > 0 && is_quant_suffix(&name[at + 1..]) => name[..at].to_owned(),
        _ => name,
    }
}

impl LocalBackend {
    /// Loads the model at `path` (a `.gguf` file or a Hugging Face directory) and hashes its
    /// weights for its identity, cached under `cache_dir` (see [`plexus_model::identity`]).
    pub fn load(path: &Path, cache_dir: Option<&Path>) -> Result<Self, LoadError> {
        let config = ServeConfig {
            kv_budget: plexus_node::measure::default_kv_budget(),
            ..ServeConfig::default()
        };
        Self::load_with(path, cache_dir, config)
    }

    /// [`LocalBackend::load`] with the engine's limits (KV budget, step size) given.
    pub fn load_with(
        path: &Path,
        cache_dir: Option<&Path>,
        config: ServeConfig,
    ) -> Result<Self, LoadError> {
        let files = ModelFiles::open(path)?;
        let digest = identity(&files.weight_files, cache_dir, |_, _| {})?;
        let model = files.load(None)?;
        let created = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| SystemTime::now())
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let entry = ModelEntry {
            id: model_id(path),
            identity: digest.to_string(),
            context: model.config.max_position_embeddings,
            tokenizer: Arc::new(model.tokenizer),
            chat_template: model.chat_template.map(Arc::new),
            created,
        };
        let eos = entry.tokenizer.eos_ids().iter().copied().collect();
        let engine = BatchHandle::start(Arc::new(model.stage), eos, config);
        Ok(Self { entry, engine })
    }

    /// Overrides the id clients use (default: [`model_id`] of the path).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.entry.id = id.into();
        self
    }

    /// The served model.
    pub fn entry(&self) -> &ModelEntry {
        &self.entry
    }
}

impl Backend for LocalBackend {
    fn models(&self) -> Vec<ModelEntry> {
        vec![self.entry.clone()]
    }

    fn generate(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&Piece) -> Flow,
    ) -> Result<Completion, BackendError> {
        if model_id != self.entry.id {
            return Err(BackendError::Invalid(format!("unknown model {model_id}")));
        }
        let mut stream = self
            .engine
            .open(&req.prompt_tokens, &req.sampling, req.max_tokens)
            .map_err(open_error)?;
        generate_with(&mut stream, &self.entry.tokenizer, req, on_text).map_err(engine_error)
    }

    /// All `n` choices are admitted at once and run in the batch together; they are read
    /// (and streamed) one after the other, each choice's engine work pausing a few tokens
    /// ahead of its reader.
    fn generate_choices(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
    ) -> Result<Vec<Completion>, BackendError> {
        self.choices(model_id, req, n, None, on_text)
    }

    /// The grammar's mask is computed and applied on the engine thread, where each token is
    /// sampled ([`BatchHandle::open_guided`]).
    fn generate_guided(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        grammar: &SharedGrammar,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
        _metering: &mut crate::backend::Metering<'_>,
    ) -> Result<Vec<Completion>, BackendError> {
        self.choices(model_id, req, n, Some(grammar), on_text)
    }
}

impl LocalBackend {
    /// `n` choices, each obeying `grammar` when given.
    fn choices(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        grammar: Option<&SharedGrammar>,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
    ) -> Result<Vec<Completion>, BackendError> {
        if model_id != self.entry.id {
            return Err(BackendError::Invalid(format!("unknown model {model_id}")));
        }
        let reqs: Vec<GenerateRequest> = (0..n)
            .map(|i| {
                let mut r = req.clone();
                r.sampling.seed = choice_seed(req.sampling.seed, i as u32);
                r
            })
            .collect();
        let mut streams = reqs
            .iter()
            .map(|r| {
                self.engine
                    .open_guided(
                        &r.prompt_tokens,
                        &r.sampling,
                        r.max_tokens,
                        grammar.map(|g| g.start()),
                    )
                    .map_err(open_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(n);
        for (i, (stream, r)) in streams.iter_mut().zip(&reqs).enumerate() {
            let c = generate_with(stream, &self.entry.tokenizer, r, |p: &Piece| on_text(i, p))
                .map_err(engine_error)?;
            let cancelled = c.finish == FinishReason::Cancelled;
            out.push(c);
            if cancelled {
                break;
            }
        }
        Ok(out)
    }
}

fn open_error(e: OpenError) -> BackendError {
    match e {
        OpenError::Budget(_) | OpenError::QueueFull { .. } => {
            BackendError::Overloaded(e.to_string())
        }
        OpenError::EmptyPrompt | OpenError::PromptTooLong { .. } => {
            BackendError::Invalid(e.to_string())
        }
        OpenError::Stopped => BackendError::Internal(e.to_string()),
    }
}

fn engine_error(e: GenerateError<StreamError>) -> BackendError {
    match e {
        GenerateError::EmptyPrompt | GenerateError::PromptTooLong { .. } => {
            BackendError::Invalid(e.to_string())
        }
        GenerateError::Forward(StreamError::Constraint(e)) => {
            BackendError::Internal(format!("constrained decoding: {e}"))
        }
        GenerateError::Forward(e) => BackendError::Internal(format!("batched engine: {e}")),
        GenerateError::Tokenizer(e) => BackendError::Internal(format!("tokenizer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_drop_the_quant_tag() {
        let id = |p: &str| model_id(Path::new(p));
        assert_eq!(
            id("/m/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(id("/m/llama-7b.Q4_K_M.gguf"), "llama-7b");
        assert_eq!(id("/m/tiny-f16.gguf"), "tiny");
        assert_eq!(id("/m/model-f32.gguf"), "model");
        assert_eq!(id("/m/Qwen2.5-0.5B.gguf"), "Qwen2.5-0.5B");
        assert_eq!(id("/m/plain.gguf"), "plain");
    }
}
