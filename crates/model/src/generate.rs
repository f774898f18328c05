//! Autoregressive generation over a chain of stages (one stage = the whole model): chunked
//! prefill, KV-cached decode, seeded sampling, streaming text, and stopping at EOS, stop strings,
//! the token budget or the end of the context.

use crate::sampler::{sample, SamplingParams};
use crate::stage::{forward_chain, ForwardError, Logits, Stage};
use crate::tokenizer::{TextStream, Tokenizer, TokenizerError};
use crate::KvCache;
use std::time::{Duration, Instant};

/// Positions fed to the model per prefill call: bounds the activation memory of long prompts.
pub const PREFILL_CHUNK: usize = 256;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Why generation failed. `E` is the error of the [`TokenChain`] that ran the model.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError<E: std::error::Error + 'static = ForwardError> {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context holds {context}")]
    PromptTooLong { prompt: usize, context: usize },
    #[error(transparent)]
    Forward(E),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// A model that extends one token sequence: the whole model in this process ([`LocalChain`]) or
/// a chain of stages on other machines. [`generate_with`] feeds it the prompt in chunks of
/// [`PREFILL_CHUNK`] and then one token at a time; implementations must keep that chunking so a
/// split model computes exactly what the whole model computes.
pub trait TokenChain {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The context length in positions.
    fn context(&self) -> usize;

    /// Appends `tokens` to the sequence and returns the token sampled at the next position:
    /// `sample(logits, every token fed so far, params, position)`.
    fn feed(&mut self, tokens: &[u32]) -> Result<u32, Self::Error>;
}

/// The whole model (or a chain of stages) in this process.
pub struct LocalChain<'a> {
    stages: &'a [Stage],
    caches: Vec<KvCache>,
    history: Vec<u32>,
    params: SamplingParams,
}

impl<'a> LocalChain<'a> {
    pub fn new(stages: &'a [Stage], params: SamplingParams) -> Self {
        Self {
            stages,
            caches: stages.iter().map(Stage::new_cache).collect(),
            history: Vec::new(),
            params,
        }
    }
}

impl TokenChain for LocalChain<'_> {
    type Error = ForwardError;

    fn context(&self) -> usize {
        self.stages
            .first()
            .map_or(0, |s| s.config().max_position_embeddings)
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<u32, ForwardError> {
        let logits = forward_chain(self.stages, &mut self.caches, tokens, Logits::Last)?;
        self.history.extend_from_slice(tokens);
        let logits: Vec<f32> = logits.to_vec1()?;
        let position = self.history.len() as u64;
        Ok(sample(&logits, &self.history, &self.params, position))
    }
}

/// Whether the caller wants more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Holds back text that may be the start of a stop string, and finds complete stop strings.
struct StopMatcher<'a> {
    stops: &'a [String],
    pending: String,
}

impl<'a> StopMatcher<'a> {
    /// Adds `piece`; returns the text safe to emit and whether a stop string completed.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (out, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Runs `req` through `stages` in this process, calling `on_text` with each new piece of text.
pub fn generate(
    stages: &[Stage],
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    on_text: impl FnMut(&str) -> Flow,
) -> Result<Completion, GenerateError> {
    let mut chain = LocalChain::new(stages, req.sampling.clone());
    generate_with(&mut chain, tokenizer, req, on_text)
}

/// Runs `req` through `chain`, calling `on_text` with each new piece of text.
///
/// Each generated token at absolute position `p` is `sample(logits_p, tokens before p, params,
/// p)`, so any single token can be re-derived by a verifier.
pub fn generate_with<C: TokenChain>(
    chain: &mut C,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str) -> Flow,
) -> Result<Completion, GenerateError<C::Error>> {
    let context = chain.context();
    let prompt = &req.prompt_tokens;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() >= context {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            context,
        });
    }
    let started = Instant::now();
    let mut next = None;
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        next = Some(chain.feed(chunk).map_err(GenerateError::Forward)?);
    }
    let prefill_time = started.elapsed();
    let decode_started = Instant::now();

    let mut fed = prompt.len();
    let mut out = Vec::new();
    let mut stream = TextStream::new(tokenizer);
    let mut stops = StopMatcher {
        stops: &req.stop,
        pending: String::new(),
    };
    let mut text = String::new();
    let mut finish = FinishReason::Length;
    while let Some(token) = next.take() {
        if out.len() >= req.max_tokens {
            break;
        }
        if tokenizer.is_eos(token) {
            finish = FinishReason::Stop;
            break;
        }
        out.push(token);
        fed += 1;
        if let Some(piece) = stream.push(token)? {
            let (emit, stopped) = stops.push(&piece);
            if !emit.is_empty() {
                text.push_str(&emit);
                if on_text(&emit) == Flow::Stop {
                    finish = FinishReason::Cancelled;
                    break;
                }
            }
            if stopped {
                finish = FinishReason::Stop;
                break;
            }
        }
        if fed >= context || out.len() >= req.max_tokens {
            break;
        }
        next = Some(chain.feed(&[token]).map_err(GenerateError::Forward)?);
    }
    // Text held back as a possible stop-string prefix belongs to the answer unless the caller
    // cancelled (a completed stop string already cleared it).
    let tail = stops.flush();
    if !tail.is_empty() && finish != FinishReason::Cancelled {
        text.push_str(&tail);
        on_text(&tail);
    }
    Ok(Completion {
        tokens: out,
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: decode_started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_prefixes() {
        let stops = vec!["</s>".to_string()];
        let mut m = StopMatcher {
            stops: &stops,
            pending: String::new(),
        };
        assert_eq!(m.push("hello <"), ("hello ".into(), false));
        assert_eq!(m.push("/"), ("".into(), false));
        assert_eq!(m.push("x"), ("</x".into(), false));
        assert_eq!(m.push("ab</s>cd"), ("ab".into(), true));
    }
}
