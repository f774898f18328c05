//! Grammars for constrained decoding, compiled by llguidance (the grammar engine llama.cpp and
//! vLLM use): JSON schemas (`response_format`) and the Lark grammars of tool calls
//! ([`crate::api::tools`]).
//!
//! - [`Grammars`] keeps one llguidance `ParserFactory` per model (its token trie, built from
//!   the model's own tokenizer: each token's bytes as [`Tokenizer::token_bytes`] gives them,
//!   special tokens marked so that no text rule can produce them; the tokenizer's EOS tokens
//!   end the output when the grammar is complete).
//! - [`Grammars::compile`] turns a grammar into a [`plexus_model::constraint::Grammar`]; a
//!   grammar llguidance refuses is a request error naming the parameter it came from.
//! - Each generation gets its own llguidance `Matcher` ([`Grammar::start`]), whose mask the
//!   sampler applies at every step (see [`plexus_model::constraint`]).

use crate::error::ApiError;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use plexus_model::constraint::{Constraint, ConstraintError, Grammar, SharedGrammar};
use plexus_model::Tokenizer;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Masks computed and the time spent computing them, for `/metrics` (the constrained
/// decoding overhead per token, whatever backend samples).
static MASKS: AtomicU64 = AtomicU64::new(0);
static MASK_MICROS: AtomicU64 = AtomicU64::new(0);

/// Appends the grammar counters to a `/metrics` page.
pub fn render_metrics(out: &mut String) {
    for (name, help, v) in [
        (
            "plexus_grammar_masks",
            "Token masks computed for constrained decoding.",
            &MASKS,
        ),
        (
            "plexus_grammar_mask_microseconds",
            "Time spent computing token masks.",
            &MASK_MICROS,
        ),
    ] {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name}_total {}\n",
            v.load(Ordering::Relaxed)
        );
    }
}

/// How JSON is laid out under a grammar: one line, `json.dumps`' separators. Free whitespace
/// would let a small model pad its output with newlines until `max_tokens`.
pub fn json_options() -> Value {
    json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// `schema` with Plexus's layout options (kept when the schema sets its own `x-guidance`).
pub fn with_json_options(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(json_options);
    }
    schema
}

/// A model's tokens as llguidance sees them.
struct Alphabet {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Alphabet {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The token trie of `tokenizer`: each token's bytes, special tokens behind llguidance's
/// marker byte.
fn alphabet(tokenizer: &Arc<Tokenizer>) -> Result<TokEnv, String> {
    let vocab = tokenizer.vocab_size();
    let words: Vec<Vec<u8>> = (0..vocab as u32)
        .map(|id| {
            let bytes = tokenizer.token_bytes(id);
            if tokenizer.is_special(id) {
                let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                marked.extend_from_slice(&bytes);
                marked
            } else {
                bytes
            }
        })
        .collect();
    let eos = tokenizer.eos_ids();
    let first = *eos
        .first()
        .ok_or("the model's tokenizer has no end-of-sequence token")?;
    let info = TokRxInfo::new(vocab as u32, first);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
    Ok(Arc::new(Alphabet {
        trie,
        tokenizer: tokenizer.clone(),
    }))
}

/// One parser factory per model (keyed by the model's identity), built on first use.
#[derive(Default)]
pub struct Grammars {
    factories: Mutex<HashMap<String, Arc<ParserFactory>>>,
}

impl Grammars {
    fn factory(
        &self,
        identity: &str,
        tokenizer: &Arc<Tokenizer>,
    ) -> Result<Arc<ParserFactory>, String> {
        let mut map = self.factories.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get(identity) {
            return Ok(f.clone());
        }
        let env = alphabet(tokenizer)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        let factory = Arc::new(factory);
        map.insert(identity.to_owned(), factory.clone());
        Ok(factory)
    }

    /// Compiles `grammar` for the model `identity`; a grammar llguidance refuses is a 400
    /// naming `param`.
    pub fn compile(
        &self,
        identity: &str,
        tokenizer: &Arc<Tokenizer>,
        grammar: TopLevelGrammar,
        param: &'static str,
    ) -> Result<SharedGrammar, ApiError> {
        let factory = self
            .factory(identity, tokenizer)
            .map_err(|e| ApiError::Internal(format!("grammar engine: {e}")))?;
        let parser = factory.create_parser(grammar).map_err(|e| {
            ApiError::invalid(format!("`{param}` cannot be enforced: {e}"), Some(param))
        })?;
        Ok(Arc::new(Compiled {
            parser: Mutex::new(parser),
        }))
    }
}

/// A compiled grammar: a parser at the start of the output, cloned for each generation.
struct Compiled {
    parser: Mutex<TokenParser>,
}

impl Grammar for Compiled {
    fn start(&self) -> Box<dyn Constraint> {
        let parser = self
            .parser
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .deep_clone();
        Box::new(Matching(Matcher::new(Ok(parser))))
    }
}

/// One generation's llguidance matcher.
struct Matching(Matcher);

impl Constraint for Matching {
    fn mask(&mut self) -> Result<Vec<u32>, ConstraintError> {
        let started = Instant::now();
        let mask = self
            .0
            .compute_mask_or_eos()
            .map(|m| m.as_slice().to_vec())
            .map_err(|e| ConstraintError::Grammar(e.to_string()));
        MASKS.fetch_add(1, Ordering::Relaxed);
        MASK_MICROS.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        mask
    }

    fn advance(&mut self, token: u32) -> Result<(), ConstraintError> {
        // A finished grammar allowed only end-of-sequence, which ends the generation.
        if self.0.is_stopped() && !self.0.is_error() {
            return Ok(());
        }
        self.0
            .consume_token(token)
            .map_err(|e| ConstraintError::Grammar(e.to_string()))
    }
}
