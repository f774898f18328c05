//! What a stage call commits to: its output fingerprint and, for a last stage, the tokens it
//! sampled. [`Commitment::digest`] is the 32-byte `commitment` field of the stage call's signed
//! receipt (settlement); the gateway's audit draw is keyed on it.

use crate::fingerprint::{Fingerprint, Fingerprinter, Scheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::sync::Mutex;

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

/// Bytes a stage call's commitment adds to its receipt on the wire (the digest).
pub const CALL_COMMITMENT_BYTES: usize = 32;

/// Widths whose sketch directions are kept built (hidden size and vocabulary of a few models).
const CACHED_WIDTHS: usize = 8;

/// Fingerprinters of [`Scheme::DEFAULT`] with their directions built, by width: building the
/// directions of a 49,152-wide vocabulary takes longer than fingerprinting one row with them.
static TEMPLATES: Mutex<Vec<Fingerprinter>> = Mutex::new(Vec::new());

fn fingerprinter(width: usize) -> Option<Fingerprinter> {
    let mut cache = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = cache.iter().find(|f| f.width() == width) {
        return Some(f.clone());
    }
    let f = Fingerprinter::new(Scheme::DEFAULT, width).ok()?;
    if cache.len() >= CACHED_WIDTHS {
        cache.remove(0);
    }
    cache.push(f.clone());
    Some(f)
}

/// The [`Scheme::DEFAULT`] fingerprint of a stage call's output rows (row-major, `width`
/// wide, the first at absolute position `first`), with the directions of `width` kept built:
/// what [`call_commitment`] commits to, and what an audit across builds compares. `None` for
/// rows that cannot be fingerprinted (non-finite values, a ragged or zero width).
pub fn call_fingerprint(width: usize, first: u64, rows: &[f32]) -> Option<Fingerprint> {
    let mut f = fingerprinter(width)?;
    f.push(first, rows).ok()?;
    Some(f.finish())
}

/// The commitment of one stage call: the [`Scheme::DEFAULT`] fingerprint of the output rows it
/// returned or sampled from (`rows`, row-major, `width` wide, the first at absolute position
/// `first`) and the tokens it sampled ([`Commitment::digest`]). A node signs it into the call's
/// receipt; a gateway recomputes it from the activations it received, and an auditor's or
/// referee's recomputation of the same call on the same build gives the same 32 bytes.
///
/// Rows that cannot be fingerprinted (non-finite values, a ragged or zero width) commit to
/// their raw bytes instead, so the function is total and still the same on both sides.
pub fn call_commitment(width: usize, first: u64, rows: &[f32], tokens: &[u32]) -> [u8; 32] {
    match call_fingerprint(width, first, rows) {
        Some(fingerprint) => Commitment {
            fingerprint,
            tokens: tokens.to_vec(),
        }
        .digest(),
        None => {
            let mut h = Sha256::new();
            h.update(b"plexus/commitment/raw/v1");
            h.update((width as u64).to_le_bytes());
            h.update(first.to_le_bytes());
            h.update((rows.len() as u64).to_le_bytes());
            for v in rows {
                h.update(v.to_bits().to_le_bytes());
            }
            for t in tokens {
                h.update(t.to_le_bytes());
            }
            h.finalize().into()
        }
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

    #[test]
    fn call_commitments_bind_rows_positions_and_tokens_and_are_total() {
        let rows: Vec<f32> = (0..3 * 8).map(|i| (i as f32 * 0.3).sin()).collect();
        let c = call_commitment(8, 5, &rows, &[]);
        assert_eq!(c, call_commitment(8, 5, &rows, &[]));
        let f = fingerprint(Scheme::DEFAULT, 8, 5, &rows).unwrap();
        let whole = Commitment {
            fingerprint: f,
            tokens: vec![],
        };
        assert_eq!(c, whole.digest());
        assert_ne!(c, call_commitment(8, 37, &rows, &[]));
        assert_ne!(c, call_commitment(8, 5, &rows, &[1]));
        let mut other = rows.clone();
        other[4] += 1e-3;
        assert_ne!(c, call_commitment(8, 5, &other, &[]));
        // Not fingerprintable: still a deterministic commitment to the bytes.
        let mut nan = rows.clone();
        nan[0] = f32::NAN;
        assert_eq!(
            call_commitment(8, 5, &nan, &[]),
            call_commitment(8, 5, &nan, &[])
        );
        assert_ne!(call_commitment(8, 5, &nan, &[]), c);
        assert_ne!(call_commitment(0, 5, &rows, &[]), c);
        assert_ne!(call_commitment(7, 5, &rows, &[]), c);
    }
}
