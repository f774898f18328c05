//! Opening a model from disk: a `.gguf` file or a Hugging Face directory (`config.json`,
//! `tokenizer.json`, `tokenizer_config.json`, one or sharded `*.safetensors`), into a stage over
//! the requested layers plus its tokenizer and chat template.

use crate::chat::{ChatTemplate, ChatTemplateError};
use crate::config::{ConfigError, HfConfig, ModelConfig};
use crate::gguf::{GgufError, GgufFile};
use crate::layers::Mode;
use crate::stage::{LayerSpan, Stage};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::weights::{HfTensors, LoadWeightsError, WeightSource};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The on-disk format of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    HuggingFace,
}

/// Why a model could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LoadModelError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is neither a .gguf file nor a directory with config.json")]
    UnknownFormat(PathBuf),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("invalid model configuration")]
    Config(#[from] ConfigError),
    #[error("no *.safetensors weights in {0}")]
    NoWeights(PathBuf),
    #[error("cannot load the weights")]
    Weights(#[from] LoadWeightsError),
    #[error("cannot load the tokenizer")]
    Tokenizer(#[from] TokenizerError),
    #[error("cannot use the chat template")]
    ChatTemplate(#[from] ChatTemplateError),
}

/// A model's description without its weights: what `plexus models inspect` shows and what
/// loading starts from.
pub struct ModelFiles {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: ModelConfig,
    /// Files whose bytes are the weights (hashed for the identity).
    pub weight_files: Vec<PathBuf>,
    gguf: Option<GgufFile>,
    hf_tokenizer_config: Option<serde_json::Value>,
}

/// A loaded model: one stage (the whole model unless a span was asked for) plus tokenizer.
pub struct LoadedModel {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: Arc<ModelConfig>,
    pub stage: Stage,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub weight_files: Vec<PathBuf>,
}

fn read_json(path: &Path) -> Result<serde_json::Value, LoadModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadModelError::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

impl ModelFiles {
    /// Parses metadata only (fast; no tensor data is read).
    pub fn open(path: &Path) -> Result<Self, LoadModelError> {
        if !path.exists() {
            return Err(LoadModelError::NotFound(path.to_owned()));
        }
        if path.is_file() {
            let g = GgufFile::open(path)?;
            let config = g.model_config()?;
            return Ok(Self {
                path: path.to_owned(),
                format: ModelFormat::Gguf,
                config,
                weight_files: vec![path.to_owned()],
                gguf: Some(g),
                hf_tokenizer_config: None,
            });
        }
        let config_path = path.join("config.json");
        if !config_path.exists() {
            return Err(LoadModelError::UnknownFormat(path.to_owned()));
        }
        let raw: HfConfig =
            serde_json::from_value(read_json(&config_path)?).map_err(|e| LoadModelError::Json {
                path: config_path.clone(),
                message: e.to_string(),
            })?;
        let config = raw.into_config()?;
        let mut weight_files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|source| LoadModelError::Io {
                path: path.to_owned(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        weight_files.sort();
        if weight_files.is_empty() {
            return Err(LoadModelError::NoWeights(path.to_owned()));
        }
        let tc = path.join("tokenizer_config.json");
        let hf_tokenizer_config = tc.exists().then(|| read_json(&tc)).transpose()?;
        Ok(Self {
            path: path.to_owned(),
            format: ModelFormat::HuggingFace,
            config,
            weight_files,
            gguf: None,
            hf_tokenizer_config,
        })
    }

    pub fn gguf(&self) -> Option<&GgufFile> {
        self.gguf.as_ref()
    }

    pub fn tokenizer(&self) -> Result<Tokenizer, LoadModelError> {
        Ok(match &self.gguf {
            Some(g) => Tokenizer::from_gguf(g)?,
            None => Tokenizer::from_hf_files(
                &self.path.join("tokenizer.json"),
                self.hf_tokenizer_config.as_ref(),
                &self.config.eos_token_ids,
            )?,
        })
    }

    /// The chat template source, if the model has one.
    pub fn chat_template_source(&self) -> Option<String> {
        match &self.gguf {
            Some(g) => g.get_str("tokenizer.chat_template").map(str::to_owned),
            None => {
                let v = self.hf_tokenizer_config.as_ref()?.get("chat_template")?;
                match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    // A list of named templates: take "default".
                    serde_json::Value::Array(a) => a
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
                    _ => None,
                }
            }
        }
    }

    /// Builds the stage for `span` (the whole model when `None`).
    pub fn stage(&self, span: Option<LayerSpan>, mode: Mode) -> Result<Stage, LoadModelError> {
        let cfg = Arc::new(self.config.clone());
        let span = span.unwrap_or(LayerSpan::full(cfg.num_layers));
        Ok(match &self.gguf {
            Some(g) => WeightSource::Gguf(g).build_stage(cfg, span, mode)?,
            None => {
                let t = HfTensors::open(&self.weight_files)?;
                WeightSource::Hf(&t).build_stage(cfg, span, mode)?
            }
        })
    }

    /// The model's chat template with `tokenizer`'s BOS and EOS texts, if it has one.
    pub fn chat_template(
        &self,
        tokenizer: &Tokenizer,
    ) -> Result<Option<ChatTemplate>, LoadModelError> {
        let Some(src) = self.chat_template_source() else {
            return Ok(None);
        };
        let piece = |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
        let bos = piece(tokenizer.bos());
        let eos = piece(tokenizer.eos().first().copied());
        Ok(Some(ChatTemplate::new(&src, &bos, &eos)?))
    }

    /// Loads the model (or the span of it) with its tokenizer and chat template.
    pub fn load(self, span: Option<LayerSpan>) -> Result<LoadedModel, LoadModelError> {
        let tokenizer = self.tokenizer()?;
        let chat_template = self.chat_template(&tokenizer)?;
        let stage = self.stage(span, Mode::Infer)?;
        Ok(LoadedModel {
            path: self.path,
            format: self.format,
            config: Arc::new(self.config),
            stage,
            tokenizer,
            chat_template,
            weight_files: self.weight_files,
        })
    }
}

/// Opens and loads the whole model at `path`.
pub fn load(path: &Path) -> Result<LoadedModel, LoadModelError> {
    ModelFiles::open(path)?.load(None)
}
