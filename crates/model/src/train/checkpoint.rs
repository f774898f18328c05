//! Checkpoints in Hugging Face layout: `model.safetensors`, `config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, plus `plexus_train.json` with the run's settings and metrics.
//!
//! Every file is written to a temporary name and renamed into place, so an interrupted save
//! never leaves a truncated file under a real name.

use super::TrainError;
use crate::config::{HfConfig, ModelConfig};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

fn write_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), TrainError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let io = |source| TrainError::Io {
        path: path.clone(),
        source,
    };
    if let Err(message) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(std::io::Error::other(message)));
    }
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

fn json(value: &impl serde::Serialize) -> impl FnOnce(&Path) -> Result<(), String> + '_ {
    move |p: &Path| {
        let s = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
        std::fs::write(p, s).map_err(|e| e.to_string())
    }
}

/// Saves a checkpoint that [`crate::load`] (and `transformers`) can read, with the
/// `tokenizer_config.json` of a model trained from scratch (the tasks' and texts' EOS and pad).
pub fn save(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: &tokenizers::Tokenizer,
    run: serde_json::Value,
) -> Result<(), TrainError> {
    save_with(
        dir,
        cfg,
        weights,
        tokenizer,
        scratch_tokenizer_config(cfg),
        run,
    )
}

/// The `tokenizer_config.json` of a model trained from scratch on a task or a text.
pub fn scratch_tokenizer_config(cfg: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": super::task::EOS,
        "pad_token": super::task::PAD,
        "add_bos_token": false,
        "model_max_length": cfg.max_position_embeddings,
    })
}

/// [`save`] with the given `tokenizer_config.json` (a fine-tuned model keeps its own:
/// [`super::pretrained::Pretrained::tokenizer_config`]).
pub fn save_with(
    dir: &Path,
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: &tokenizers::Tokenizer,
    tokenizer_config: serde_json::Value,
    run: serde_json::Value,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
        path: dir.to_owned(),
        source,
    })?;
    write_atomic(dir, "model.safetensors", |p| {
        candle_core::safetensors::save(weights, p).map_err(|e| e.to_string())
    })?;
    write_atomic(dir, "config.json", json(&HfConfig::from_config(cfg)))?;
    write_atomic(dir, "tokenizer.json", |p| {
        tokenizer.save(p, true).map_err(|e| e.to_string())
    })?;
    write_atomic(dir, "tokenizer_config.json", json(&tokenizer_config))?;
    write_atomic(dir, "plexus_train.json", json(&run))?;
    Ok(())
}
