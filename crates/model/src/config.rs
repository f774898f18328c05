//! The runtime description of a Llama-family model, and the serde mirror of Hugging Face's
//! `config.json` that becomes it (`HfConfig::into_config`). GGUF metadata becomes the same struct
//! in [`crate::gguf`].

use serde::{Deserialize, Serialize};

/// Architectures the single model definition covers. They differ only in the flags of
/// [`ModelConfig`] (biases, rotary layout, tied output, RoPE scaling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM, TinyLlama, and Mistral-style models (GGUF `llama`).
    Llama,
    /// Mistral (Hugging Face `mistral`; GGUF converts it to `llama`).
    Mistral,
    /// Qwen2 / Qwen2.5: QKV bias, NeoX rotary.
    Qwen2,
}

impl Architecture {
    /// Parses a Hugging Face `model_type` or a GGUF `general.architecture`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How the rotary embedding pairs up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)`: what llama.cpp uses for GGUF `llama` tensors, whose Q/K rows the
    /// converter permuted.
    Interleaved,
    /// Pairs `(i, i + d/2)` (GPT-NeoX): Hugging Face checkpoints and GGUF `qwen2`.
    HalfSplit,
}

/// Llama 3's frequency-dependent RoPE scaling.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// How the rotary frequencies are scaled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    None,
    Llama3(Llama3RopeScaling),
    /// Per-frequency divisors as stored in GGUF's `rope_freqs.weight` (llama.cpp writes Llama 3's
    /// scaling this way).
    Factors(Vec<f32>),
}

/// The validated description the model is built from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_layout: RopeLayout,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Why a model description is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnknownArchitecture(String),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ModelConfig {
    /// Checks the shape relations the model relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("layers, hidden size and vocabulary must be positive".into());
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even", self.head_dim));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling {
            if f.len() != self.head_dim / 2 {
                return bad(format!(
                    "rope_freqs has {} factors, expected {}",
                    f.len(),
                    self.head_dim / 2
                ));
            }
        }
        if self.max_position_embeddings == 0 {
            return bad("context length must be positive".into());
        }
        Ok(())
    }

    /// Bytes of K and V cache per token for all layers at f32.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * 4
    }
}

/// Serde mirror of a Hugging Face `config.json` for the supported architectures.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub torch_dtype: Option<String>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    pub fn into_config(self) -> Result<ModelConfig, ConfigError> {
        let type_name = self
            .model_type
            .clone()
            .ok_or(ConfigError::Missing("model_type"))?;
        let architecture =
            Architecture::parse(&type_name).ok_or(ConfigError::UnknownArchitecture(type_name))?;
        let rope_scaling = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => RopeScaling::None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
                match kind {
                    "llama3" => RopeScaling::Llama3(Llama3RopeScaling {
                        factor: num("factor").ok_or(ConfigError::Missing("rope_scaling.factor"))?,
                        low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: num("original_max_position_embeddings")
                            .unwrap_or(8192.0)
                            as usize,
                    }),
                    "default" => RopeScaling::None,
                    other => {
                        return Err(ConfigError::Invalid(format!(
                            "unsupported rope_scaling type {other:?} (supported: llama3)"
                        )))
                    }
                }
            }
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_layout: RopeLayout::HalfSplit,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => self.attention_bias.unwrap_or(false),
            },
            bos_token_id: token_ids(&self.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&self.eos_token_id),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The `config.json` a checkpoint of `cfg` is saved with (loadable by `transformers`).
    pub fn from_config(cfg: &ModelConfig) -> Self {
        let (model_type, class) = match cfg.architecture {
            Architecture::Llama => ("llama", "LlamaForCausalLM"),
            Architecture::Mistral => ("mistral", "MistralForCausalLM"),
            Architecture::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        };
        let rope_scaling = match &cfg.rope_scaling {
            RopeScaling::Llama3(s) => Some(serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            })),
            _ => None,
        };
        Self {
            model_type: Some(model_type.into()),
            architectures: vec![class.into()],
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_hidden_layers: cfg.num_layers,
            num_attention_heads: cfg.num_heads,
            num_key_value_heads: Some(cfg.num_kv_heads),
            head_dim: Some(cfg.head_dim),
            rms_norm_eps: cfg.rms_norm_eps,
            rope_theta: cfg.rope_theta,
            rope_scaling,
            max_position_embeddings: cfg.max_position_embeddings,
            tie_word_embeddings: cfg.tie_word_embeddings,
            attention_bias: Some(cfg.qkv_bias),
            bos_token_id: cfg.bos_token_id.map(|b| b.into()),
            // Every end token (an instruct model's end of text and end of turn): a list when
            // there is more than one, as Hugging Face configs write it.
            eos_token_id: match cfg.eos_token_ids.as_slice() {
                [] => None,
                [one] => Some((*one).into()),
                many => Some(many.to_vec().into()),
            },
            torch_dtype: Some("float32".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_config() {
        let json = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":64},
            "eos_token_id":[3,4]}"#;
        let cfg: HfConfig = serde_json::from_str(json).unwrap();
        let cfg = cfg.into_config().unwrap();
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.eos_token_ids, vec![3, 4]);
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3(_)));
        // Written back, every end token survives (a fine-tuned instruct model stops at both).
        let json = serde_json::to_string(&HfConfig::from_config(&cfg)).unwrap();
        let back: HfConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.into_config().unwrap().eos_token_ids, vec![3, 4]);
    }

    #[test]
    fn rejects_unknown_architecture() {
        let json = r#"{"model_type":"gpt_neox","vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#;
        let cfg: HfConfig = serde_json::from_str(json).unwrap();
        let err = cfg.into_config().unwrap_err().to_string();
        assert!(err.contains("gpt_neox"), "{err}");
    }

    #[test]
    fn rejects_bad_heads() {
        let json = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":3,
            "num_key_value_heads":2}"#;
        let cfg: HfConfig = serde_json::from_str(json).unwrap();
        assert!(cfg.into_config().is_err());
    }
}
