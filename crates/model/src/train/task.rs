//! Synthetic tasks with exact answers, generated from a seed, a character tokenizer for them, and
//! a train / held-out split that never overlaps.
//!
//! - `addition`: `"047+385="` -> `"0432"` (operands zero-padded to `size` digits, the sum to
//!   `size + 1`), so every example of a task has the same length.
//! - `reverse`: `"hbdfa|"` -> `"afdbh"` over `size` letters.
//! - `sort`: `"hbdfa|"` -> `"abdfh"` over `size` letters.
//!
//! Example `i` is a pure function of `(seed, i)` (counter-based draws). An example is held out
//! when the first byte of the sha256 of its prompt is below 16 (1/16 of the problem space);
//! training skips held-out problems, so held-out accuracy measures generalisation.

use plexus_core::rng::{CounterRng, Stream};
use plexus_core::Digest;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::BPE;
use tokenizers::AddedToken;

/// End-of-answer token text.
pub const EOS: &str = "<|endoftext|>";
/// Padding token text.
pub const PAD: &str = "<|pad|>";
/// Every character the task tokenizer has a token for.
pub const CHARS: &str = "0123456789+=|abcdefghijklmnopqrstuvwxyz";
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// A synthetic task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Addition { digits: usize },
    Reverse { len: usize },
    Sort { len: usize },
}

/// Why a task name is not usable.
#[derive(Debug, thiserror::Error)]
#[error("unknown task {name:?} with size {size} (tasks: addition (1-9 digits), reverse, sort (2-26 letters))")]
pub struct TaskError {
    name: String,
    size: usize,
}

/// One problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub prompt: String,
    pub answer: String,
}

impl Task {
    pub fn parse(name: &str, size: usize) -> Result<Self, TaskError> {
        let err = || TaskError {
            name: name.into(),
            size,
        };
        match name {
            "addition" if (1..=9).contains(&size) => Ok(Task::Addition { digits: size }),
            "reverse" if (2..=26).contains(&size) => Ok(Task::Reverse { len: size }),
            "sort" if (2..=26).contains(&size) => Ok(Task::Sort { len: size }),
            _ => Err(err()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Task::Addition { .. } => "addition",
            Task::Reverse { .. } => "reverse",
            Task::Sort { .. } => "sort",
        }
    }

    /// The size parameter the task was parsed with.
    pub fn size(&self) -> usize {
        match *self {
            Task::Addition { digits } => digits,
            Task::Reverse { len } | Task::Sort { len } => len,
        }
    }

    /// Prompt and answer lengths in characters (= tokens).
    pub fn lengths(&self) -> (usize, usize) {
        match *self {
            Task::Addition { digits } => (2 * digits + 2, digits + 1),
            Task::Reverse { len } | Task::Sort { len } => (len + 1, len),
        }
    }

    fn draw(&self, rng: &mut CounterRng) -> Example {
        match *self {
            Task::Addition { digits } => {
                let max = 10u64.pow(digits as u32);
                let (a, b) = (rng.below(max), rng.below(max));
                Example {
                    prompt: format!("{a:0digits$}+{b:0digits$}="),
                    answer: format!("{:0w$}", a + b, w = digits + 1),
                }
            }
            Task::Reverse { len } | Task::Sort { len } => {
                let s: Vec<u8> = (0..len)
                    .map(|_| LETTERS[rng.below(LETTERS.len() as u64) as usize])
                    .collect();
                let mut t = s.clone();
                if matches!(self, Task::Reverse { .. }) {
                    t.reverse();
                } else {
                    t.sort_unstable();
                }
                Example {
                    prompt: format!("{}|", String::from_utf8_lossy(&s)),
                    answer: String::from_utf8_lossy(&t).into_owned(),
                }
            }
        }
    }

    /// Whether `prompt` belongs to the held-out split.
    pub fn is_held_out(prompt: &str) -> bool {
        Digest::of(prompt.as_bytes()).0[0] < 16
    }

    /// The `i`-th training example (never a held-out problem).
    pub fn train_example(&self, seed: u64, i: u64) -> Example {
        let mut rng = CounterRng::new(seed, Stream::Data, i);
        loop {
            let e = self.draw(&mut rng);
            if !Self::is_held_out(&e.prompt) {
                return e;
            }
        }
    }

    /// The `i`-th held-out example. The stream is independent of `seed`, so every run of a task
    /// is scored on the same problems.
    pub fn held_out_example(&self, i: u64) -> Example {
        let mut rng = CounterRng::new(0x4845_4c44, Stream::Data, i | 1 << 63);
        loop {
            let e = self.draw(&mut rng);
            if Self::is_held_out(&e.prompt) {
                return e;
            }
        }
    }
}

/// The character-level tokenizer of the tasks: one token per character plus `<|pad|>` (0) and
/// `<|endoftext|>` (1). A byte-level-free BPE with no merges, saved as an ordinary
/// `tokenizer.json`.
pub fn task_tokenizer() -> Result<tokenizers::Tokenizer, String> {
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    vocab.insert(PAD.into(), 0);
    vocab.insert(EOS.into(), 1);
    for (i, c) in CHARS.chars().enumerate() {
        vocab.insert(c.to_string(), i as u32 + 2);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| e.to_string())?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_decoder(Some(Fuse::new()));
    t.add_special_tokens([AddedToken::from(PAD, true), AddedToken::from(EOS, true)])
        .map_err(|e| e.to_string())?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addition_examples_are_right_and_fixed_length() {
        let t = Task::Addition { digits: 3 };
        for i in 0..100 {
            let e = t.train_example(1, i);
            let (p, a) = t.lengths();
            assert_eq!((e.prompt.len(), e.answer.len()), (p, a));
            let (x, y) = e.prompt.trim_end_matches('=').split_once('+').unwrap();
            let sum: u64 = x.parse::<u64>().unwrap() + y.parse::<u64>().unwrap();
            assert_eq!(e.answer.parse::<u64>().unwrap(), sum);
        }
    }

    #[test]
    fn splits_are_disjoint_and_deterministic() {
        let t = Task::Reverse { len: 5 };
        for i in 0..200 {
            assert!(!Task::is_held_out(&t.train_example(3, i).prompt));
            assert!(Task::is_held_out(&t.held_out_example(i).prompt));
            assert_eq!(t.train_example(3, i), t.train_example(3, i));
        }
        let s = Task::Sort { len: 4 }.train_example(0, 0);
        let mut c: Vec<char> = s.prompt.trim_end_matches('|').chars().collect();
        c.sort_unstable();
        assert_eq!(s.answer, c.into_iter().collect::<String>());
    }

    #[test]
    fn tokenizer_is_one_token_per_char() {
        let t = task_tokenizer().unwrap();
        let enc = t.encode("12+9=", false).unwrap();
        assert_eq!(enc.get_ids().len(), 5);
        assert_eq!(t.decode(enc.get_ids(), false).unwrap(), "12+9=");
        assert_eq!(t.token_to_id(EOS), Some(1));
        assert!(Task::parse("bogus", 3).is_err());
    }
}
