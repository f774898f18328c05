//! A remote chain that reports its providers' running work while it generates: after every
//! [`Metering::every`] sampled tokens it hands [`Metering::progress`] the request's sampled
//! tokens so far and its usage so far (the finished chains' plus this chain's receipts), so
//! the gateway can pay providers during a stream instead of only at its end.

use crate::backend::Metering;
use plexus_model::constraint::Maskable;
use plexus_model::generate::TokenChain;
use plexus_model::sampler::TokenLogprobs;
use plexus_node::client::{ChainError, RemoteChain};

/// A [`RemoteChain`] counting the tokens it samples (one per `feed_prompt` and per `feed`).
pub struct Live<'m, 'p> {
    chain: RemoteChain,
    metering: &'m mut Metering<'p>,
    /// Sampled tokens of the request so far (earlier choices included).
    sampled: usize,
    /// Sampled since the last report.
    since: usize,
}

impl<'m, 'p> Live<'m, 'p> {
    /// `chain` for a request that has sampled `sampled` tokens in earlier choices.
    pub fn new(chain: RemoteChain, metering: &'m mut Metering<'p>, sampled: usize) -> Self {
        Self {
            chain,
            metering,
            sampled,
            since: 0,
        }
    }

    pub fn chain(&self) -> &RemoteChain {
        &self.chain
    }

    /// The chain, taken out (to fork the next choice from it).
    pub fn into_chain(self) -> RemoteChain {
        self.chain
    }

    fn sampled_one(&mut self) {
        self.sampled += 1;
        self.since += 1;
        let m = &mut *self.metering;
        if m.every == 0 || self.since < m.every {
            return;
        }
        self.since = 0;
        if let Some(progress) = m.progress.as_mut() {
            let mut running = m.usage.clone();
            running.merge(self.chain.usage());
            progress(self.sampled, &running);
        }
    }
}

impl TokenChain for Live<'_, '_> {
    type Error = ChainError;

    fn context(&self) -> usize {
        self.chain.context()
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<u32, ChainError> {
        let token = self.chain.feed(tokens)?;
        self.sampled_one();
        Ok(token)
    }

    fn feed_prompt(&mut self, prompt: &[u32]) -> Result<u32, ChainError> {
        let token = self.chain.feed_prompt(prompt)?;
        self.sampled_one();
        Ok(token)
    }

    fn take_logprobs(&mut self) -> Option<TokenLogprobs> {
        self.chain.take_logprobs()
    }
}

impl Maskable for Live<'_, '_> {
    fn set_mask(&mut self, mask: Option<Vec<u32>>) {
        self.chain.set_mask(mask);
    }
}
