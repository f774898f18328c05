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
    /// How [`Self::untokenizable`] finds the characters the vocabulary has no token for:
    /// decided once, when the tokenizer is built.
    coverage: Coverage,
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
            coverage: Coverage::of(&inner),
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
            coverage: Coverage::of(&inner),
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
            coverage: Coverage::of(&inner),
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
    /// vocabulary is lower-case letters and digits. Empty at once for tokenizers that cover
    /// every text ([`Self::covers_every_text`]).
    pub fn untokenizable(&self, text: &str) -> Vec<char> {
        let mut seen = std::collections::HashSet::new();
        let mut buf = [0u8; 4];
        let chars = text.chars().filter(|c| seen.insert(*c));
        match &self.coverage {
            Coverage::Every => Vec::new(),
            Coverage::BytesMissing(missing) => chars
                .filter(|c| {
                    c.encode_utf8(&mut buf)
                        .bytes()
                        .any(|b| missing[usize::from(b)])
                })
                .collect(),
            Coverage::PerChar => chars
                .filter(|c| {
                    self.inner
                        .encode(&*c.encode_utf8(&mut buf), false)
                        .is_ok_and(|e| e.get_ids().is_empty())
                })
                .collect(),
        }
    }

    /// Whether every text encodes without loss: a byte-level BPE whose vocabulary holds the
    /// symbol of every byte valid UTF-8 uses, or a BPE with byte fallback and its `<0xNN>`
    /// tokens. SmolLM2's lacks six control characters (U+0004, for one); a vocabulary of some
    /// characters only (a task model `plexus train` wrote) lacks most.
    pub fn covers_every_text(&self) -> bool {
        matches!(self.coverage, Coverage::Every)
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

/// How a tokenizer's vocabulary covers text (see [`Tokenizer::untokenizable`]).
#[derive(Clone, Debug)]
enum Coverage {
    /// Every text encodes.
    Every,
    /// A byte-level BPE: the bytes whose symbol its vocabulary lacks (a character with one of
    /// them in its UTF-8 is dropped, wholly or in part).
    BytesMissing(Box<[bool; 256]>),
    /// Anything else: each character is encoded alone to see whether it gives a token.
    PerChar,
}

impl Coverage {
    fn of(inner: &tokenizers::Tokenizer) -> Self {
        let has = |t: &str| inner.token_to_id(t).is_some();
        // Bytes that valid UTF-8 never holds: no text needs their symbols.
        let in_utf8 = |b: u8| !matches!(b, 0xC0 | 0xC1 | 0xF5..=0xFF);
        // Pre-tokenizers are enums nested in sequences: their serialised form names each part.
        let byte_level = inner
            .get_pre_tokenizer()
            .and_then(|p| serde_json::to_string(p).ok())
            .is_some_and(|j| j.contains("\"type\":\"ByteLevel\""));
        if byte_level {
            let mut missing = Box::new([false; 256]);
            for b in (0..=255u8).filter(|b| in_utf8(*b)) {
                missing[usize::from(b)] = !has(&byte_symbol(b).to_string());
            }
            return if missing.iter().any(|m| *m) {
                Coverage::BytesMissing(missing)
            } else {
                Coverage::Every
            };
        }
        let fallback = matches!(inner.get_model(), tokenizers::ModelWrapper::BPE(b) if b.byte_fallback)
            && (0..=255u8)
                .filter(|b| in_utf8(*b))
                .all(|b| has(&format!("<0x{b:02X}>")));
        if fallback {
            Coverage::Every
        } else {
            Coverage::PerChar
        }
    }
}

/// The character GPT-2's byte-level alphabet writes byte `b` as: printable Latin-1 bytes as
/// themselves, the others as U+0100 onwards in byte order.
fn byte_symbol(b: u8) -> char {
    let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + n).expect("below U+0200")
}

/// `chars` as an error message names them: quoted, the first 16, then how many more.
pub fn name_chars(chars: &[char]) -> String {
    let list: Vec<String> = chars.iter().take(16).map(|c| format!("{c:?}")).collect();
    match chars.len().saturating_sub(list.len()) {
        0 => list.join(", "),
        more => format!("{} and {more} more characters", list.join(", ")),
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
        assert!(matches!(t.coverage, Coverage::PerChar));
    }

    #[test]
    fn byte_symbols_are_gpt2_s_alphabet() {
        let mine: std::collections::HashSet<char> = (0..=255u8).map(byte_symbol).collect();
        let theirs: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(mine, theirs);
        assert_eq!(byte_symbol(b' '), '\u{120}');
        assert_eq!(byte_symbol(4), '\u{104}');
    }

    /// The byte-level shortcut finds exactly the characters that encoding each alone drops.
    #[test]
    fn a_byte_level_vocabulary_names_what_it_drops_without_encoding() {
        let g = crate::gguf::GgufFile::open(&plexus_testkit::real_model()).unwrap();
        let t = Tokenizer::from_gguf(&g).unwrap();
        assert!(matches!(t.coverage, Coverage::BytesMissing(_)));
        assert!(!t.covers_every_text());
        assert!(t.untokenizable("Hello, Ж 😀 \t\n").is_empty());
        assert_eq!(t.untokenizable("a\u{4}b\u{6}\u{4}"), vec!['\u{4}', '\u{6}']);
        let slow = Tokenizer {
            coverage: Coverage::PerChar,
            ..t.clone()
        };
        let text: String = (0..0x800u32)
            .chain(0x1F600..0x1F650)
            .filter_map(char::from_u32)
            .collect();
        assert_eq!(t.untokenizable(&text), slow.untokenizable(&text));
    }

    #[test]
    fn chars_are_named_sixteen_at_most() {
        assert_eq!(name_chars(&['A', '\'']), "'A', '\\''");
        let many: Vec<char> = ('a'..='z').collect();
        assert!(name_chars(&many).ends_with("'p' and 10 more characters"));
    }
}
