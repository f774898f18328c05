//! What a stage call commits to: its output fingerprint and, for a last stage, the tokens it
//! sampled. [`Commitment::digest`] is the 32-byte `commitment` field of the stage call's signed
//! receipt (settlement); the gateway's audit draw is keyed on it.

use crate::fingerprint::Fingerprint;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// One stage call's (or session's) commitment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    pub fingerprint: Fingerprint,
    /// The tokens sampled (last stage only), in order.
    pub tokens: Vec<u32>,
}

impl Commitment {
    /// `sha256("plexus/commitment/v1" || fingerprint digest || n || tokens (u32 LE))`.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"plexus/commitment/v1");
        h.update(self.fingerprint.digest());
        h.update((self.tokens.len() as u64).to_le_bytes());
        for t in &self.tokens {
            h.update(t.to_le_bytes());
        }
        h.finalize().into()
    }

    /// Bytes the commitment costs on top of the output (the fingerprint's data; sampled
    /// tokens are the output itself).
    pub fn bytes(&self) -> usize {
        self.fingerprint.data_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::{fingerprint, Scheme};

    #[test]
    fn digest_binds_tokens_and_fingerprint() {
        let rows: Vec<f32> = (0..40 * 4).map(|i| i as f32).collect();
        let f = fingerprint(Scheme::DEFAULT, 4, 0, &rows).unwrap();
        let a = Commitment {
            fingerprint: f.clone(),
            tokens: vec![1, 2],
        };
        let b = Commitment {
            fingerprint: f.clone(),
            tokens: vec![1, 3],
        };
        let c = Commitment {
            fingerprint: fingerprint(Scheme::DEFAULT, 4, 1, &rows).unwrap(),
            tokens: vec![1, 2],
        };
        assert_ne!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        assert_eq!(a.digest(), a.clone().digest());
        assert_eq!(a.bytes(), 2 * 32);
    }
}
