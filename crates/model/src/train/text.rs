//! Text data: a UTF-8 file tokenized with a character-level tokenizer built from the file (one
//! token per distinct character, plus `<|pad|>` = 0 and `<|endoftext|>` = 1; a BPE without
//! merges, saved as an ordinary `tokenizer.json` like the tasks' tokenizer), or, to fine-tune a
//! model, with that model's own tokenizer ([`TextShard::open_with`]), cut into non-overlapping
//! windows of `seq_len + 1` tokens.
//!
//! A window is held out when the first byte of the sha256 of its tokens is below 16 (1/16 of
//! the windows; the rule of the synthetic tasks): repeated passages land on the same side, so
//! the held-out loss measures generalisation. Training example id `i` is train window
//! `i mod train_windows`, scored on every next-token prediction; held-out example `i` is
//! held-out window `i mod held_out_windows`.

use super::shard::{HeldOut, Sequence, Shard};
use super::task::{EOS, PAD};
use super::TrainError;
use plexus_core::Digest;
use std::collections::BTreeSet;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::BPE;
use tokenizers::AddedToken;

/// Fewest windows on each side of the split a corpus must give.
pub const MIN_WINDOWS: usize = 8;

/// A tokenized text corpus split into train and held-out windows.
pub struct TextShard {
    tokenizer: tokenizers::Tokenizer,
    tokens: Vec<u32>,
    /// Window starts (token offsets) of each split.
    train: Vec<usize>,
    held_out: Vec<usize>,
    seq_len: usize,
    digest: Digest,
}

impl TextShard {
    /// Reads `path` (UTF-8) and splits it into sequences of `seq_len` predictions.
    pub fn open(path: &std::path::Path, seq_len: usize) -> Result<Self, TrainError> {
        Self::from_text(&read_utf8(path)?, seq_len)
    }

    /// [`Self::open`] with a model's own tokenizer (fine-tuning): a text with characters the
    /// vocabulary has no token for is refused, naming them.
    pub fn open_with(
        path: &std::path::Path,
        seq_len: usize,
        tokenizer: &crate::tokenizer::Tokenizer,
    ) -> Result<Self, TrainError> {
        Self::from_text_with(&read_utf8(path)?, seq_len, tokenizer)
    }

    /// [`Self::from_text`] with a model's own tokenizer.
    pub fn from_text_with(
        text: &str,
        seq_len: usize,
        tokenizer: &crate::tokenizer::Tokenizer,
    ) -> Result<Self, TrainError> {
        let missing = tokenizer.untokenizable(text);
        if !missing.is_empty() {
            let shown: String = missing.iter().take(16).collect();
            return Err(TrainError::Config(format!(
                "the model's vocabulary has no token for {} character(s) of the text: {shown:?}",
                missing.len()
            )));
        }
        // A tokenizer.json may carry a truncation or padding setting for its model's inputs:
        // off, or the whole text would be cut to its first max_length tokens.
        let mut t = tokenizer.inner().clone();
        t.with_truncation(None)
            .map_err(|e| TrainError::Config(format!("cannot use the model's tokenizer: {e}")))?;
        t.with_padding(None);
        Self::split(text, seq_len, t)
    }

    /// Tokenizes `text` with a character tokenizer built from it and splits it into sequences
    /// of `seq_len` predictions.
    pub fn from_text(text: &str, seq_len: usize) -> Result<Self, TrainError> {
        Self::split(text, seq_len, char_tokenizer(text)?)
    }

    fn split(
        text: &str,
        seq_len: usize,
        tokenizer: tokenizers::Tokenizer,
    ) -> Result<Self, TrainError> {
        if seq_len < 2 {
            return Err(TrainError::Config(format!(
                "text sequence length {seq_len} must be at least 2"
            )));
        }
        let tokens = tokenizer
            .encode(text, false)
            .map_err(|e| TrainError::Config(format!("cannot tokenize the text: {e}")))?
            .get_ids()
            .to_vec();
        let window = seq_len + 1;
        let (mut train, mut held_out) = (Vec::new(), Vec::new());
        for start in (0..tokens.len().saturating_sub(window - 1)).step_by(window) {
            let w = &tokens[start..start + window];
            let bytes: Vec<u8> = w.iter().flat_map(|t| t.to_le_bytes()).collect();
            if Digest::of(&bytes).0[0] < 16 {
                held_out.push(start);
            } else {
                train.push(start);
            }
        }
        if train.len() < MIN_WINDOWS || held_out.len() < MIN_WINDOWS {
            return Err(TrainError::Config(format!(
                "the text gives {} train and {} held-out windows of {window} tokens; at least {MIN_WINDOWS} of each are needed (a longer text or shorter sequences)",
                train.len(),
                held_out.len()
            )));
        }
        Ok(Self {
            tokenizer,
            digest: Digest::of(text.as_bytes()),
            tokens,
            train,
            held_out,
            seq_len,
        })
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Predictions per sequence (tokens per sequence minus one).
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Digest of the text.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn train_windows(&self) -> usize {
        self.train.len()
    }

    pub fn held_out_windows(&self) -> usize {
        self.held_out.len()
    }

    /// Tokens of the whole text.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    fn window(&self, start: usize) -> Sequence {
        Sequence {
            tokens: self.tokens[start..start + self.seq_len + 1].to_vec(),
            scored_from: 1,
        }
    }

    /// Mean next-token cross-entropy (nats) of the train windows' unigram distribution on the
    /// held-out windows' predictions: what a model that ignores context at best reaches.
    pub fn unigram_loss(&self) -> f64 {
        let vocab = self.tokenizer.get_vocab_size(true);
        let mut counts = vec![1f64; vocab];
        for &s in &self.train {
            for &t in &self.tokens[s + 1..s + self.seq_len + 1] {
                counts[t as usize] += 1.0;
            }
        }
        let total: f64 = counts.iter().sum();
        let (mut nll, mut n) = (0f64, 0usize);
        for &s in &self.held_out {
            for &t in &self.tokens[s + 1..s + self.seq_len + 1] {
                nll -= (counts[t as usize] / total).ln();
                n += 1;
            }
        }
        nll / n.max(1) as f64
    }
}

impl Shard for TextShard {
    fn example(&self, id: u64) -> Result<Sequence, TrainError> {
        Ok(self.window(self.train[(id % self.train.len() as u64) as usize]))
    }
}

impl HeldOut for TextShard {
    fn held_out(&self, i: u64) -> Result<Sequence, TrainError> {
        Ok(self.window(self.held_out[(i % self.held_out.len() as u64) as usize]))
    }
}

fn read_utf8(path: &std::path::Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        TrainError::Config(format!(
            "{} is not UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// One token per distinct character of `text` (in code point order), after `<|pad|>` (0) and
/// `<|endoftext|>` (1).
fn char_tokenizer(text: &str) -> Result<tokenizers::Tokenizer, TrainError> {
    let chars: BTreeSet<char> = text.chars().collect();
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    vocab.insert(PAD.into(), 0);
    vocab.insert(EOS.into(), 1);
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), i as u32 + 2);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| TrainError::Config(format!("cannot build the text tokenizer: {e}")))?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_decoder(Some(Fuse::new()));
    t.add_special_tokens([AddedToken::from(PAD, true), AddedToken::from(EOS, true)])
        .map_err(|e| TrainError::Config(format!("cannot build the text tokenizer: {e}")))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> String {
        (0..400)
            .map(|i| {
                format!(
                    "Line {i}: the quick brown fox — jumps over {} lazy dogs.\n",
                    i * 7
                )
            })
            .collect()
    }

    #[test]
    fn windows_split_by_hash_and_decode_back_to_the_text() {
        let text = corpus();
        let s = TextShard::from_text(&text, 31).unwrap();
        assert_eq!(s.token_count(), text.chars().count());
        let windows = s.train_windows() + s.held_out_windows();
        assert_eq!(windows, text.chars().count() / 32);
        assert!(s.held_out_windows() >= MIN_WINDOWS && s.held_out_windows() < windows / 4);
        // Train and held-out windows never share a start, and ids wrap.
        assert!(s.train.iter().all(|t| !s.held_out.contains(t)));
        assert_eq!(
            s.example(3).unwrap(),
            s.example(3 + s.train_windows() as u64).unwrap()
        );
        let w = s.held_out(0).unwrap();
        assert_eq!((w.tokens.len(), w.scored_from), (32, 1));
        let decoded = s.tokenizer().decode(&w.tokens, false).unwrap();
        assert!(text.contains(&decoded), "{decoded:?}");
        assert!(
            s.unigram_loss() > 1.0 && s.unigram_loss() < 4.0,
            "{}",
            s.unigram_loss()
        );
    }

    #[test]
    fn short_or_invalid_text_is_refused() {
        assert!(matches!(
            TextShard::from_text("too short", 8),
            Err(TrainError::Config(_))
        ));
        assert!(TextShard::from_text(&corpus(), 1).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("latin1.txt");
        std::fs::write(&p, b"caf\xe9").unwrap();
        let e = TextShard::open(&p, 8).err().unwrap().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }
}
