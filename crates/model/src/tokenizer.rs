//! Tokenizers: byte-level BPE built from GGUF metadata (`tokenizer.ggml.*`) or loaded from a
//! Hugging Face `tokenizer.json`, both as a `tokenizers::Tokenizer` so that encoding follows the
//! reference implementation exactly. Special (control) tokens in the text are matched as single
//! tokens, as llama.cpp does when it parses a rendered chat template.

use crate::gguf::{GgufFile, Value};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "the model file has no tokenizer (no tokenizer.ggml.tokens metadata and no tokenizer.json)"
    )]
    Missing,
    #[error("tokenizer model {0:?} is not supported (supported: gpt2 byte-level BPE)")]
    UnsupportedModel(String),
    #[error("tokenizer metadata is invalid: {0}")]
    Invalid(String),
    #[error("tokenizer failed: {0}")]
    Library(String),
}

fn lib(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(e.to_string())
}

// Pre-tokenizer regexes, as llama.cpp's llama-vocab.cpp lists them per `tokenizer.ggml.pre`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A text tokenizer with the model's special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    eos: Vec<u32>,
    /// Control tokens: never printed, and end generation when they are EOS/EOT.
    special: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let model = g
            .get_str("tokenizer.ggml.model")
            .ok_or(TokenizerError::Missing)?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.into()));
        }
        let tokens = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or(TokenizerError::Missing)?;
        let tokens: Vec<&str> = tokens
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| TokenizerError::Invalid("non-string token".into()))
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let merges = g
            .get("tokenizer.ggml.merges")
            .and_then(Value::as_array)
            .ok_or_else(|| TokenizerError::Invalid("byte-level BPE without merges".into()))?;
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.as_str()
                    .and_then(|s| s.split_once(' '))
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| TokenizerError::Invalid(format!("bad merge {m:?}")))
            })
            .collect::<Result<_, _>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(false)
            .build()
            .map_err(lib)?;
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level = ByteLevel::new(false, false, true);
        let split = |re: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            Ok(Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(lib)?
            .into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" | "codeshell" | "falcon" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => Sequence::new(vec![
                split(LLAMA3_SPLIT)?,
                ByteLevel::new(false, false, false).into(),
            ])
            .into(),
            "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![
                split(QWEN2_SPLIT)?,
                ByteLevel::new(false, false, false).into(),
            ])
            .into(),
            other => {
                tracing::warn!(pre = other, "unknown pre-tokenizer, using GPT-2's");
                byte_level.into()
            }
        };
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let mut special = Vec::new();
        let mut added = Vec::new();
        for (i, (&t, &ty)) in tokens.iter().zip(types.iter()).enumerate() {
            // 3 = CONTROL, 4 = USER_DEFINED (llama_token_type).
            if ty == 3 || ty == 4 {
                added.push(AddedToken::from(t.to_owned(), true));
                if ty == 3 {
                    special.push(i as u32);
                }
            }
        }
        inner.add_special_tokens(added).map_err(lib)?;
        let id = |k: &str| g.get_u64(k).ok().map(|x| x as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = [
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.eot_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        eos.dedup();
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Self {
            inner,
            bos,
            add_bos,
            eos,
            special,
        })
    }

    /// Loads `tokenizer.json` (and the special-token settings of `tokenizer_config.json` when
    /// given) from a Hugging Face directory.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&serde_json::Value>,
        eos_ids: &[u32],
    ) -> Result<Self, TokenizerError> {
        if !tokenizer_json.exists() {
            return Err(TokenizerError::Missing);
        }
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(lib)?;
        let token_str = |k: &str| -> Option<String> {
            let v = tokenizer_config?.get(k)?;
            v.as_str()
                .map(str::to_owned)
                .or_else(|| v.get("content")?.as_str().map(str::to_owned))
        };
        let bos = token_str("bos_token").and_then(|t| inner.token_to_id(&t));
        let mut eos: Vec<u32> = token_str("eos_token")
            .and_then(|t| inner.token_to_id(&t))
            .into_iter()
            .chain(eos_ids.iter().copied())
            .collect();
        eos.sort_unstable();
        eos.dedup();
        // Does the post-processor add BOS? Then we add it ourselves (encoding always runs without
        // the post-processor so that chat templates that already contain BOS are not doubled).
        let probe = inner.encode("", true).map_err(lib)?;
        let add_bos = tokenizer_config
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or_else(|| bos.is_some() && probe.get_ids().first() == bos.as_ref());
        let special = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        Ok(Self {
            inner,
            bos,
            add_bos,
            eos,
            special,
        })
    }

    /// Wraps a tokenizer built elsewhere (training's task tokenizer).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        add_bos: bool,
        eos: Vec<u32>,
    ) -> Self {
        let special = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect();
        Self {
            inner,
            bos,
            add_bos,
            eos,
            special,
        }
    }

    /// Token ids of `text`; special-token text is matched as special tokens. Adds BOS when the
    /// model asks for it and `add_bos` is set.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(lib)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The characters of `text` (each once, in order of appearance) that encode to no token at
    /// all, so `encode` drops them silently: e.g. capitals for a trained task model whose
    /// vocabulary is lower-case letters and digits. Empty for byte-level tokenizers.
    pub fn untokenizable(&self, text: &str) -> Vec<char> {
        let mut seen = std::collections::HashSet::new();
        let mut buf = [0u8; 4];
        text.chars()
            .filter(|c| seen.insert(*c))
            .filter(|c| {
                self.inner
                    .encode(&*c.encode_utf8(&mut buf), false)
                    .is_ok_and(|e| e.get_ids().is_empty())
            })
            .collect()
    }

    /// Text of `ids`, special tokens included (they are part of what the model said).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(lib)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    pub fn eos(&self) -> &[u32] {
        &self.eos
    }

    /// The tokens that end a generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes token `id` stands for in decoded text (OpenAI's `bytes` of a log-probability,
    /// the alphabet of a grammar engine). A byte-level BPE token that is part of a multi-byte
    /// character gives that part; `<0xNN>` byte-fallback tokens give their byte; special tokens
    /// give their text. Empty for ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.is_special(id) {
            return piece.into_bytes();
        }
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
            if let (2, Ok(b)) = (hex.len(), u8::from_str_radix(hex, 16)) {
                return vec![b];
            }
        }
        if let Ok(text) = self.inner.decode(&[id], false) {
            if !text.contains('\u{FFFD}') {
                return text.into_bytes();
            }
        }
        // Part of a character: undo GPT-2's byte-to-character map.
        piece
            .chars()
            .map(|c| byte_of_char(c).unwrap_or(b'?'))
            .collect()
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// GPT-2's byte-level alphabet backwards: the byte a character of a token stands for.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let c = c as u32;
    if c < 256 && printable(c) {
        return u8::try_from(c).ok();
    }
    // The other bytes map, in order, onto U+0100 and up.
    let k = c.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(k as usize)
        .and_then(|b| u8::try_from(b).ok())
}

/// Turns a stream of token ids into text pieces, emitting only complete UTF-8: a multi-byte
/// character split across tokens is held back until its last byte arrives.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Text already emitted, measured on `decode(ids[start..])`.
    start: usize,
    emitted: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            start: 0,
            emitted: 0,
        }
    }

    /// Adds one token; returns the new complete text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids[self.start..])?;
        if text.len() > self.emitted && !text.ends_with('\u{FFFD}') {
            let piece = text[self.emitted..].to_owned();
            // Re-anchor so decoding cost stays proportional to a few tokens, not the whole reply.
            if self.ids.len() - self.start > 8 {
                self.start = self.ids.len() - 4;
                self.emitted = self.tokenizer.decode(&self.ids[self.start..])?.len();
            } else {
                self.emitted = text.len();
            }
            return Ok(Some(piece));
        }
        Ok(None)
    }

    /// All text so far, including any incomplete tail.
    pub fn text(&self) -> Result<String, TokenizerError> {
        self.tokenizer.decode(&self.ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untokenizable_names_the_characters_encode_drops() {
        let t = Tokenizer::from_parts(
            crate::train::task::task_tokenizer().unwrap(),
            None,
            false,
            vec![1],
        );
        assert_eq!(t.untokenizable("HELLO|"), vec!['H', 'E', 'L', 'O']);
        assert_eq!(
            t.encode("HELLO|", false).unwrap().len(),
            1,
            "only '|' is kept"
        );
        assert!(t.untokenizable("hello|").is_empty());
    }
}
