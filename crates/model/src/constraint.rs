//! Constrained decoding: a grammar gives, before each sampled position, the set of tokens that
//! keep the output inside the language (structured outputs, tool calls), and follows each token
//! sampled. The mask goes into [`SamplingParams::allowed`], so the sampler turns every other
//! token into `-inf` after `logit_bias` and the penalties and before the filters and the draw:
//! seeded sampling stays a pure function of (logits, history, params, position), and a remote
//! last stage applies a mask it is sent exactly as the engine in this process does.
//!
//! - [`Grammar`] is a compiled grammar; [`Grammar::start`] gives a fresh [`Constraint`] per
//!   generation (each of `n` choices has its own).
//! - The batching engine ([`crate::serve`]) asks its sequence's constraint on the engine thread;
//!   a chain that samples elsewhere (a split network) is wrapped in [`Guided`], which sets the
//!   mask before each feed and checks the token that comes back.
//!
//! The grammar engine itself (llguidance) lives in the gateway; this crate only knows the two
//! calls above.

use crate::generate::TokenChain;
use crate::sampler::{mask_allows, TokenLogprobs};
use std::sync::Arc;

/// Why a constraint could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The grammar engine failed (its message).
    #[error("grammar: {0}")]
    Grammar(String),
    /// The grammar allows no token at all here.
    #[error("the grammar allows no token at this position")]
    Empty,
    /// A token came back that the mask did not allow (a faulty sampler or stage).
    #[error("token {0} was sampled but the grammar does not allow it")]
    Disallowed(u32),
}

/// One generation's grammar state.
pub trait Constraint: Send {
    /// The tokens allowed at the next position, as a bitset in the layout of
    /// [`SamplingParams::allowed`](crate::SamplingParams::allowed).
    fn mask(&mut self) -> Result<Vec<u32>, ConstraintError>;

    /// Follows the token sampled at that position.
    fn advance(&mut self, token: u32) -> Result<(), ConstraintError>;
}

/// A compiled grammar, shared by the choices of one request.
pub trait Grammar: Send + Sync {
    /// A constraint at the start of the output.
    fn start(&self) -> Box<dyn Constraint>;
}

/// A shareable compiled grammar.
pub type SharedGrammar = Arc<dyn Grammar>;

/// The next mask of `c`, refused when it allows nothing.
pub fn next_mask(c: &mut dyn Constraint) -> Result<Vec<u32>, ConstraintError> {
    let mask = c.mask()?;
    if mask.iter().all(|&w| w == 0) {
        return Err(ConstraintError::Empty);
    }
    Ok(mask)
}

/// Checks `token` against `mask` and advances `c` past it.
pub fn follow(c: &mut dyn Constraint, mask: &[u32], token: u32) -> Result<(), ConstraintError> {
    if !mask_allows(mask, token) {
        return Err(ConstraintError::Disallowed(token));
    }
    c.advance(token)
}

/// A chain whose sampler takes a mask from its caller (a remote last stage, or the whole model
/// in this process).
pub trait Maskable: TokenChain {
    /// The mask the next sampled position obeys (`None`: every token).
    fn set_mask(&mut self, mask: Option<Vec<u32>>);
}

/// Why a [`Guided`] chain failed.
#[derive(Debug, thiserror::Error)]
pub enum GuidedError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Chain(E),
    #[error(transparent)]
    Constraint(#[from] ConstraintError),
}

/// A chain whose every sampled token obeys a grammar: the mask is set before each feed (the
/// prompt's last chunk too, since it samples the first token) and the token that comes back
/// is checked and followed.
pub struct Guided<C> {
    chain: C,
    constraint: Box<dyn Constraint>,
}

impl<C: Maskable> Guided<C> {
    pub fn new(chain: C, constraint: Box<dyn Constraint>) -> Self {
        Self { chain, constraint }
    }

    /// The chain inside.
    pub fn inner(&self) -> &C {
        &self.chain
    }

    /// The chain inside, taken out.
    pub fn into_inner(self) -> C {
        self.chain
    }

    fn step(
        &mut self,
        feed: impl FnOnce(&mut C) -> Result<u32, C::Error>,
    ) -> Result<u32, GuidedError<C::Error>> {
        let mask = next_mask(self.constraint.as_mut())?;
        self.chain.set_mask(Some(mask.clone()));
        let token = feed(&mut self.chain).map_err(GuidedError::Chain)?;
        follow(self.constraint.as_mut(), &mask, token)?;
        Ok(token)
    }
}

impl<C: Maskable> TokenChain for Guided<C> {
    type Error = GuidedError<C::Error>;

    fn context(&self) -> usize {
        self.chain.context()
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<u32, Self::Error> {
        self.step(|c| c.feed(tokens))
    }

    fn feed_prompt(&mut self, prompt: &[u32]) -> Result<u32, Self::Error> {
        self.step(|c| c.feed_prompt(prompt))
    }

    fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.chain.take_logprobs()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A grammar over token ids: the output must be the tokens of `word` in order, then `eos`.
    pub struct Word {
        pub word: Vec<u32>,
        pub eos: u32,
        pub vocab: usize,
    }

    struct WordState {
        word: Vec<u32>,
        eos: u32,
        vocab: usize,
        at: usize,
    }

    impl Grammar for Word {
        fn start(&self) -> Box<dyn Constraint> {
            Box::new(WordState {
                word: self.word.clone(),
                eos: self.eos,
                vocab: self.vocab,
                at: 0,
            })
        }
    }

    impl Constraint for WordState {
        fn mask(&mut self) -> Result<Vec<u32>, ConstraintError> {
            let mut m = vec![0u32; self.vocab.div_ceil(32)];
            let t = self.word.get(self.at).copied().unwrap_or(self.eos);
            m[t as usize / 32] |= 1 << (t % 32);
            Ok(m)
        }

        fn advance(&mut self, token: u32) -> Result<(), ConstraintError> {
            if self.word.get(self.at) != Some(&token) && token != self.eos {
                return Err(ConstraintError::Disallowed(token));
            }
            self.at += 1;
            Ok(())
        }
    }

    #[test]
    fn empty_masks_and_disallowed_tokens_are_refused() {
        struct Nothing;
        impl Constraint for Nothing {
            fn mask(&mut self) -> Result<Vec<u32>, ConstraintError> {
                Ok(vec![0; 4])
            }
            fn advance(&mut self, _: u32) -> Result<(), ConstraintError> {
                Ok(())
            }
        }
        assert!(matches!(
            next_mask(&mut Nothing),
            Err(ConstraintError::Empty)
        ));
        let g = Word {
            word: vec![5],
            eos: 0,
            vocab: 64,
        };
        let mut c = g.start();
        let m = next_mask(c.as_mut()).unwrap();
        assert!(matches!(
            follow(c.as_mut(), &m, 6),
            Err(ConstraintError::Disallowed(6))
        ));
        follow(c.as_mut(), &m, 5).unwrap();
    }
}
