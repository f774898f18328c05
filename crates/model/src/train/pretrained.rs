//! An existing model to fine-tune: a GGUF file (any quantization, dequantized to f32) or a
//! Hugging Face checkpoint directory, read as trainable [`Params`] with its own config and
//! tokenizer.
//!
//! Training computes in the Hugging Face convention: a GGUF's Q and K rows are stored in
//! llama.cpp's interleaved rope order, so they are permuted back to the half-split order
//! (`convert_hf_to_gguf.py`'s `permute`, inverted) and the config says half-split; the
//! checkpoint a run saves is then an ordinary Hugging Face one.
//!
//! [`Pretrained::digest`] pins the files, not the parsed values: the sha256 of every file the
//! model is read from (a GGUF; or `config.json`, the tokenizer files and the safetensors of a
//! directory), each with its name and length, so every worker of a run starts from the same
//! bytes.

use super::{Params, TrainError};
use crate::config::{ModelConfig, RopeLayout};
use crate::load::{ModelFiles, ModelFormat};
use crate::tokenizer::Tokenizer;
use crate::weights::{HfTensors, LayerWeight, Weight, WeightSource};
use candle_core::Tensor;
use plexus_core::{Digest, Sha256Stream};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model read for training.
pub struct Pretrained {
    pub path: PathBuf,
    /// The model's config, in the half-split rope convention.
    pub config: Arc<ModelConfig>,
    pub params: Params,
    pub tokenizer: Tokenizer,
    /// The chat template the model came with, kept in the checkpoints it is saved to.
    pub chat_template: Option<String>,
    pub digest: Digest,
}

impl Pretrained {
    /// Reads the model at `path` (a `.gguf` file or a checkpoint directory).
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        Self::read(path, None, true)
    }

    /// [`Self::open`], refused right after hashing (before any weight is read) unless the
    /// files' digest is `expected`.
    pub fn open_checked(path: &Path, expected: Digest) -> Result<Self, TrainError> {
        Self::read(path, Some(expected), true)
    }

    /// [`Self::open`] without the weights (see [`Self::describe_checked`]).
    pub fn describe(path: &Path) -> Result<Self, TrainError> {
        Self::read(path, None, false)
    }

    /// [`Self::open_checked`] without the weights (as [`Self::without_params`] gives): the
    /// digest, configuration and tokenizer, to check a run's files before its workers load
    /// the model (no weight is read or dequantized).
    pub fn describe_checked(path: &Path, expected: Digest) -> Result<Self, TrainError> {
        Self::read(path, Some(expected), false)
    }

    fn read(path: &Path, expected: Option<Digest>, weights: bool) -> Result<Self, TrainError> {
        let bad = |e: &dyn std::error::Error| {
            let mut msg = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                msg = format!("{msg}: {c}");
                cause = c.source();
            }
            TrainError::Config(format!("cannot read the model {}: {msg}", path.display()))
        };
        let files = ModelFiles::open(path).map_err(|e| bad(&e))?;
        let digest = files_digest(&files)?;
        if let Some(expected) = expected.filter(|e| *e != digest) {
            return Err(TrainError::Config(format!(
                "the model {} has digest {digest}, not {expected}",
                path.display()
            )));
        }
        let tokenizer = files.tokenizer().map_err(|e| bad(&e))?;
        let chat_template = files.chat_template_source();
        let mut config = files.config.clone();
        if !weights {
            if config.rope_layout == RopeLayout::Interleaved {
                config.rope_layout = RopeLayout::HalfSplit;
            }
            return Ok(Self {
                path: path.to_owned(),
                params: Params::default(),
                config: Arc::new(config),
                tokenizer,
                chat_template,
                digest,
            });
        }
        let mut map = match files.gguf() {
            Some(g) => WeightSource::Gguf(g).dense_map(&config)?,
            None => WeightSource::Hf(&HfTensors::open(&files.weight_files)?).dense_map(&config)?,
        };
        if config.rope_layout == RopeLayout::Interleaved {
            to_half_split(&mut map, &config)?;
            config.rope_layout = RopeLayout::HalfSplit;
        }
        Ok(Self {
            path: path.to_owned(),
            params: Params::from_tensors(&map)?,
            config: Arc::new(config),
            tokenizer,
            chat_template,
            digest,
        })
    }

    /// The model without its weights (what a run keeps once its state holds them).
    pub fn without_params(&self) -> Self {
        Self {
            path: self.path.clone(),
            config: self.config.clone(),
            params: Params::default(),
            tokenizer: self.tokenizer.clone(),
            chat_template: self.chat_template.clone(),
            digest: self.digest,
        }
    }

    /// The `tokenizer_config.json` of checkpoints trained from this model: its BOS, EOS and
    /// chat template.
    pub fn tokenizer_config(&self) -> serde_json::Value {
        let t = &self.tokenizer;
        let text = |id: Option<u32>| id.and_then(|id| t.inner().id_to_token(id));
        let mut c = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": t.adds_bos(),
            "model_max_length": self.config.max_position_embeddings,
        });
        if let Some(bos) = text(t.bos()) {
            c["bos_token"] = bos.into();
        }
        if let Some(eos) = text(t.eos().first().copied()) {
            c["eos_token"] = eos.into();
        }
        if let Some(template) = &self.chat_template {
            c["chat_template"] = template.clone().into();
        }
        c
    }
}

/// The sha256 of the files `files` reads, each with its name and length.
fn files_digest(files: &ModelFiles) -> Result<Digest, TrainError> {
    let mut paths = match files.format {
        ModelFormat::Gguf => vec![files.path.clone()],
        ModelFormat::HuggingFace => {
            let mut p = vec![files.path.join("config.json")];
            for name in ["tokenizer.json", "tokenizer_config.json"] {
                let f = files.path.join(name);
                if f.exists() {
                    p.push(f);
                }
            }
            p.extend(files.weight_files.iter().cloned());
            p
        }
    };
    paths.dedup();
    let mut h = Sha256Stream::new();
    h.update(b"plexus-pretrained-v1");
    let mut buf = vec![0u8; 1 << 20];
    for p in &paths {
        let io = |source| TrainError::Io {
            path: p.clone(),
            source,
        };
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        let mut f = std::fs::File::open(p).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&len.to_le_bytes());
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finish())
}

/// Reorders the rows of every Q and K weight (and bias) from llama.cpp's interleaved rope
/// order to the half-split order: within each head, row `2j + s` moves to `s * d/2 + j`.
fn to_half_split(
    map: &mut std::collections::HashMap<String, Tensor>,
    cfg: &ModelConfig,
) -> Result<(), TrainError> {
    use LayerWeight::{KBias, QBias, Q};
    for l in 0..cfg.num_layers {
        for w in [Q, LayerWeight::K, QBias, KBias] {
            let name = Weight::Layer(l, w).hf_name();
            let Some(t) = map.get(&name) else { continue };
            let heads = if matches!(w, Q | QBias) {
                cfg.num_heads
            } else {
                cfg.num_kv_heads
            };
            let dims = t.dims().to_vec();
            let cols: usize = dims[1..].iter().product();
            let half = cfg.head_dim / 2;
            if dims[0] != heads * cfg.head_dim || !cfg.head_dim.is_multiple_of(2) {
                return Err(TrainError::Config(format!(
                    "{name} has {} rows, not {heads} heads of {}",
                    dims[0], cfg.head_dim
                )));
            }
            let permuted = t
                .reshape((heads, half, 2, cols))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape(dims.as_slice())?;
            map.insert(name, permuted);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn interleaved_rows_move_to_half_split_order() {
        // One head of 4 dims, 1 column: interleaved rows (x0, y0, x1, y1) become (x0, x1, y0, y1).
        let mut cfg = crate::train::small_llama_config(32, 1, 8, 8).unwrap();
        cfg.num_heads = 1;
        cfg.num_kv_heads = 1;
        cfg.head_dim = 4;
        let name = Weight::Layer(0, LayerWeight::Q).hf_name();
        let t = Tensor::from_vec(vec![0f32, 10., 1., 11.], (4, 1), &Device::Cpu).unwrap();
        let mut map = std::collections::HashMap::from([(name.clone(), t)]);
        to_half_split(&mut map, &cfg).unwrap();
        let got = map[&name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, vec![0., 1., 10., 11.]);
    }
}
