//! [`LocalBackend`]: one model run by the engine in this process, like llama-server.
//!
//! Generations are serialized by a mutex around the stage. Running two at once on one
//! [`Stage`] would be memory-safe (`Stage::forward` takes `&self`, each generation has its own
//! KV cache, kernel scratch is thread-local), but not faster: the engine already uses every
//! core for one sequence, and its matmuls hand chunks to rayon workers kept polling by one
//! caller at a time (`kernels/crew.rs`); a second concurrent caller falls back to
//! `rayon::join`, whose wake-ups cost more than a decode mat-vec. Measured on SmolLM2-135M
//! Q4_1, 2 cores (busy machine), two greedy 96-token generations: 37-40 tok/s in total one
//! after the other, 36-47 tok/s at once, with the same tokens; so running them together gains
//! nothing reliable and doubles the first one's latency. Each request waits its turn here
//! (admitted requests beyond the first wait on the mutex, counted in the gateway's
//! `in_flight`) and each generation runs at full speed.

use crate::backend::{Backend, BackendError, ModelEntry};
use plexus_model::generate::{
    generate, generate_choices, Completion, Flow, GenerateError, GenerateRequest, Piece,
};
use plexus_model::identity::{identity, IdentityError};
use plexus_model::{LoadModelError, ModelFiles, Stage};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
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
    stage: Mutex<Stage>,
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
        Ok(Self {
            entry,
            stage: Mutex::new(model.stage),
        })
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
        // A panic in an earlier generation leaves the stage intact (it is only read), so a
        // poisoned lock is still usable.
        let stage = self.stage.lock().unwrap_or_else(PoisonError::into_inner);
        generate(
            std::slice::from_ref(&*stage),
            &self.entry.tokenizer,
            req,
            on_text,
        )
        .map_err(engine_error)
    }

    /// The prompt is prefilled once; each choice continues from its KV cache.
    fn generate_choices(
        &self,
        model_id: &str,
        req: &GenerateRequest,
        n: usize,
        on_text: &mut dyn FnMut(usize, &Piece) -> Flow,
    ) -> Result<Vec<Completion>, BackendError> {
        if model_id != self.entry.id {
            return Err(BackendError::Invalid(format!("unknown model {model_id}")));
        }
        let stage = self.stage.lock().unwrap_or_else(PoisonError::into_inner);
        generate_choices(
            std::slice::from_ref(&*stage),
            &self.entry.tokenizer,
            req,
            n,
            on_text,
        )
        .map_err(engine_error)
    }
}

fn engine_error(e: GenerateError) -> BackendError {
    match e {
        GenerateError::EmptyPrompt | GenerateError::PromptTooLong { .. } => {
            BackendError::Invalid(e.to_string())
        }
        GenerateError::Forward(e) => BackendError::Internal(format!("forward pass: {e}")),
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
