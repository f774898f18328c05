//! The Plexus model engine: Llama-family models (Llama 2/3, SmolLM2, Mistral, Qwen2) on candle,
//! for inference and training, CPU first.
//!
//! - [`load`] opens GGUF files and Hugging Face directories ([`gguf`], [`weights`]).
//! - [`stage`] is the one model definition, run as a span of layers; the whole model is the span
//!   of all layers.
//! - [`tokenizer`] and [`chat`] turn text and conversations into tokens.
//! - [`sampler`] picks tokens as a pure function of (logits, history, params, seed, position);
//!   [`constraint`] masks them with a grammar (structured outputs, tool calls).
//! - [`generate`] drives prefill and decode; [`identity`] hashes weights; [`train`] trains.
//! - [`kernels`] multiplies by Q4_0/Q4_1/Q8_0 weights the way llama.cpp does, for [`layers`].
//!
//! The engine is synchronous and CPU-bound; async callers reach it from a dedicated thread.

/// The identity of this build's arithmetic: a digest of this crate's sources (`build.rs`).
/// Engines announcing the same one compute the same bits; others may differ slightly.
pub const ARITHMETIC_ID: &str = env!("PLEXUS_ARITHMETIC_ID");

pub mod attention;
pub mod batch;
pub mod chat;
pub mod config;
pub mod constraint;
pub mod generate;
pub mod gguf;
pub mod identity;
pub mod kernels;
pub mod kv_cache;
pub mod layers;
pub mod load;
pub mod numerics;
pub mod prefix;
pub mod requant;
pub mod sampler;
pub mod serve;
pub mod stage;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use kv_cache::KvCache;
pub use load::{load, LoadModelError, LoadedModel, ModelFiles, ModelFormat};
pub use sampler::SamplingParams;
pub use stage::{LayerSpan, Logits, Stage, StageInput, StageOutput};
pub use tokenizer::Tokenizer;
