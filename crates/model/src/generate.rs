//! Autoregressive generation over a chain of stages (one stage = the whole model): chunked
//! prefill, KV-cached decode, seeded sampling, streaming text, and stopping at EOS, stop strings,
//! the token budget or the end of the context.

use crate::sampler::{sample_scored, SamplingParams, TokenLogprobs};
use crate::stage::{forward_chain, ForwardError, Logits, Stage};
use crate::tokenizer::{TextStream, Tokenizer, TokenizerError};
use crate::KvCache;
use std::collections::VecDeque;
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
    /// The log-probabilities of the tokens of `text` (a token is counted when any of its text
    /// is), when the sampling params asked for them; else empty.
    pub logprobs: Vec<TokenLogprobs>,
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
/// [`PREFILL_CHUNK`] and then one token at a time. Bits do not depend on the chunking, but they
/// do on the attention kernel of each position: an implementation's `feed_prompt` must declare
/// the prompt's positions ([`crate::KvCache::set_prompt`], or `Forward::prompt_len` on the
/// network) before feeding it; the default [`feed_in_chunks`] declares none (every position a
/// decode step).
pub trait TokenChain {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The context length in positions.
    fn context(&self) -> usize;

    /// Appends `tokens` to the sequence and returns the token sampled at the next position:
    /// `sample(logits, every token fed so far, params, position)`.
    fn feed(&mut self, tokens: &[u32]) -> Result<u32, Self::Error>;

    /// Feeds the whole prompt and returns the token sampled after it. The default feeds it in
    /// chunks of [`PREFILL_CHUNK`]; a chain that schedules its own chunks (the batching
    /// engine, [`crate::serve`]) overrides it.
    fn feed_prompt(&mut self, prompt: &[u32]) -> Result<u32, Self::Error> {
        feed_in_chunks(self, prompt)
    }

    /// The log-probabilities of the token the last [`TokenChain::feed`] returned, when the
    /// sampling params ask for them (`None` otherwise, or when already taken).
    fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        None
    }
}

/// Feeds `tokens` in chunks of [`PREFILL_CHUNK`] (what [`TokenChain::feed_prompt`] does by
/// default); the token sampled after the last.
pub fn feed_in_chunks<C: TokenChain + ?Sized>(
    chain: &mut C,
    tokens: &[u32],
) -> Result<u32, C::Error> {
    let mut next = 0;
    for chunk in tokens.chunks(PREFILL_CHUNK) {
        next = chain.feed(chunk)?;
    }
    Ok(next)
}

/// The whole model (or a chain of stages) in this process.
pub struct LocalChain<'a> {
    stages: &'a [Stage],
    caches: Vec<KvCache>,
    history: Vec<u32>,
    params: SamplingParams,
    scores: Option<TokenLogprobs>,
    /// The logits of the last position fed.
    logits: Vec<f32>,
}

impl<'a> LocalChain<'a> {
    pub fn new(stages: &'a [Stage], params: SamplingParams) -> Self {
        Self {
            stages,
            caches: stages.iter().map(Stage::new_cache).collect(),
            history: Vec::new(),
            params,
            scores: None,
            logits: Vec::new(),
        }
    }

    /// Rolls the sequence back to its first `len` tokens.
    fn rewind(&mut self, len: usize) {
        self.history.truncate(len);
        for c in &mut self.caches {
            c.truncate(len);
        }
    }

    /// Samples the last position again from its kept logits (with the current params).
    fn resample(&mut self) -> u32 {
        let position = self.history.len() as u64;
        let (token, scores) = sample_scored(&self.logits, &self.history, &self.params, position);
        self.scores = scores;
        token
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
        self.logits = logits.to_vec1()?;
        Ok(self.resample())
    }

    /// Feeds the prompt in chunks, its rows taking the attention kernels llama.cpp gives a
    /// prompt fed at once ([`crate::attention::kernel_at`]).
    fn feed_prompt(&mut self, prompt: &[u32]) -> Result<u32, ForwardError> {
        let start = self.history.len();
        for c in &mut self.caches {
            c.set_prompt(start..start + prompt.len());
        }
        feed_in_chunks(self, prompt)
    }

    fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.scores.take()
    }
}

impl crate::constraint::Maskable for LocalChain<'_> {
    fn set_mask(&mut self, mask: Option<Vec<u32>>) {
        self.params.allowed = mask;
    }
}

/// A piece of generated text, with the log-probabilities of the tokens it completes (empty
/// unless asked for).
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    pub text: &'a str,
    pub logprobs: &'a [TokenLogprobs],
}

impl<'a> Piece<'a> {
    /// Text without log-probabilities.
    pub fn plain(text: &'a str) -> Self {
        Self {
            text,
            logprobs: &[],
        }
    }
}

/// Hands out token log-probabilities in step with the text they produced: a token is released
/// once all of its text has been emitted (text held back as a possible stop-string prefix or
/// as an incomplete UTF-8 character holds its token back too).
#[derive(Default)]
struct Scores {
    /// Tokens not released yet: (scores, start byte, end byte; `usize::MAX` while the token's
    /// text is still incomplete).
    pending: VecDeque<(TokenLogprobs, usize, usize)>,
    decoded: usize,
    emitted: usize,
}

impl Scores {
    fn push(&mut self, scores: TokenLogprobs) {
        let start = self
            .pending
            .back()
            .map_or(self.decoded, |p| p.2.min(self.decoded));
        self.pending.push_back((scores, start, usize::MAX));
    }

    /// The token stream produced `len` more bytes of text.
    fn decoded(&mut self, len: usize) {
        self.decoded += len;
        for p in self.pending.iter_mut().filter(|p| p.2 == usize::MAX) {
            p.2 = self.decoded;
        }
    }

    /// `len` more bytes were emitted; returns the tokens now complete (with `cut`, also those
    /// whose text merely starts before the end of the emitted text).
    fn emitted(&mut self, len: usize, cut: bool) -> Vec<TokenLogprobs> {
        self.emitted += len;
        let mut out = Vec::new();
        while let Some(p) = self.pending.front() {
            let done = p.2 <= self.emitted || (cut && p.1 < self.emitted);
            if !done {
                break;
            }
            out.extend(self.pending.pop_front().map(|p| p.0));
        }
        if cut {
            self.pending.clear();
        }
        out
    }

    fn rest(&mut self) -> Vec<TokenLogprobs> {
        self.pending.drain(..).map(|p| p.0).collect()
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
    on_text: impl FnMut(&Piece) -> Flow,
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
    on_text: impl FnMut(&Piece) -> Flow,
) -> Result<Completion, GenerateError<C::Error>> {
    let started = Instant::now();
    let first = prefill(chain, req)?;
    decode(chain, tokenizer, req, first, started.elapsed(), on_text)
}

/// Checks the prompt against the context and feeds it in chunks of [`PREFILL_CHUNK`]; returns
/// the token sampled after it.
fn prefill<C: TokenChain>(
    chain: &mut C,
    req: &GenerateRequest,
) -> Result<u32, GenerateError<C::Error>> {
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
    chain.feed_prompt(prompt).map_err(GenerateError::Forward)
}

/// The seed of choice `index` of a request with `seed` (OpenAI's `n`): choice 0 uses the seed
/// itself, so `n = 1` and the first of `n` choices agree; choice `i > 0` uses 64 bits of the
/// counter-based generator at `(seed, Sampling, position u64::MAX, index i)`, a position no
/// generation reaches.
pub fn choice_seed(seed: u64, index: u32) -> u64 {
    if index == 0 {
        return seed;
    }
    let b = plexus_core::rng::bits(seed, plexus_core::rng::Stream::Sampling, u64::MAX, index);
    u64::from(b[0]) | (u64::from(b[1]) << 32)
}

/// Generates `n` choices of `req` through `stages` in this process, sharing the prompt: it is
/// prefilled once, and each choice continues from the prompt's KV cache (rolled back to the
/// prompt after each choice) with the seed [`choice_seed`]`(req.sampling.seed, i)`. Choices
/// run one after the other; `on_text` gets the choice index with each piece.
pub fn generate_choices(
    stages: &[Stage],
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    n: usize,
    mut on_text: impl FnMut(usize, &Piece) -> Flow,
) -> Result<Vec<Completion>, GenerateError> {
    let started = Instant::now();
    let mut chain = LocalChain::new(stages, req.sampling.clone());
    let mut first = prefill(&mut chain, req)?;
    let prefill_time = started.elapsed();
    let prompt_logits = chain.logits.clone();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut req_i = req.clone();
        req_i.sampling.seed = choice_seed(req.sampling.seed, i as u32);
        if i > 0 {
            chain.rewind(req.prompt_tokens.len());
            chain.params = req_i.sampling.clone();
            chain.logits.clone_from(&prompt_logits);
            first = chain.resample();
        }
        let c = decode(&mut chain, tokenizer, &req_i, first, prefill_time, |p| {
            on_text(i, p)
        })?;
        let cancelled = c.finish == FinishReason::Cancelled;
        out.push(c);
        if cancelled {
            break;
        }
    }
    Ok(out)
}

/// The decode loop after [`prefill`]: `first` is the token sampled after the prompt.
fn decode<C: TokenChain>(
    chain: &mut C,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    first: u32,
    prefill_time: Duration,
    mut on_text: impl FnMut(&Piece) -> Flow,
) -> Result<Completion, GenerateError<C::Error>> {
    let context = chain.context();
    let prompt = &req.prompt_tokens;
    let mut next = Some(first);
    let want_scores = req.sampling.logprobs.is_some();
    let mut scores = Scores::default();
    let mut logprobs = Vec::new();
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
        if want_scores {
            if let Some(s) = chain.take_logprobs() {
                scores.push(s);
            }
        }
        if let Some(piece) = stream.push(token)? {
            scores.decoded(piece.len());
            let (emit, stopped) = stops.push(&piece);
            let done = scores.emitted(emit.len(), stopped);
            if !emit.is_empty() || !done.is_empty() {
                text.push_str(&emit);
                logprobs.extend_from_slice(&done);
                let piece = Piece {
                    text: &emit,
                    logprobs: &done,
                };
                if on_text(&piece) == Flow::Stop {
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
    let done = scores.rest();
    if (!tail.is_empty() || !done.is_empty()) && finish != FinishReason::Cancelled {
        text.push_str(&tail);
        logprobs.extend_from_slice(&done);
        on_text(&Piece {
            text: &tail,
            logprobs: &done,
        });
    }
    Ok(Completion {
        tokens: out,
        text,
        finish,
        logprobs,
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
