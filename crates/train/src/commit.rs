//! Signed round commitments: what a worker binds itself to when it sends a pseudo-gradient, and
//! all an auditor needs to re-execute the round and compare bytes.
//!
//! The signed bytes are `"plexus-train-commitment-v3" || postcard(commitment)`, signed with the
//! worker's node key (secp256k1, the same key as its libp2p identity). A commitment names its
//! worker by peer id and carries the public key; [`Signed::verify`] checks that the key hashes
//! to that peer id and that the signature holds, so a forged or altered commitment is refused.

use plexus_core::keys::NodeKey;
use plexus_core::Digest;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const DOMAIN: &[u8] = b"plexus-train-commitment-v3";

/// One worker's claims about one round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    /// Identity of the run (digest of its spec).
    pub run: Digest,
    pub round: u64,
    /// The worker's peer id bytes.
    pub worker: Vec<u8>,
    /// Digest of the global weights the round started from.
    pub start_weights: Digest,
    /// Digest of the worker's inner optimizer state at the start: a fresh one
    /// ([`crate::worker::fresh_digests`]), or the one its commitment to the round before ended
    /// in ([`Self::end_optimizer`]): an auditor checks which ([`crate::audit::check_start`]).
    pub start_optimizer: Digest,
    /// Digest of the worker's error-feedback residual at the start (zeros without feedback),
    /// fresh or where its last round ended, as the optimizer state.
    pub start_residual: Digest,
    /// Digest of the example ids trained on, in order.
    pub examples: Digest,
    pub seed: u64,
    /// Step of the learning-rate schedule the round started at.
    pub first_step: u64,
    pub inner_steps: u32,
    pub batch_size: u32,
    /// Digest of the inner hyperparameters and the codec.
    pub hyper: Digest,
    /// Digest and length of the encoded pseudo-gradient.
    pub payload: Digest,
    pub payload_len: u64,
    /// Digests of the optimizer state and residual the round ended in: what the worker's
    /// next round may start from. A re-execution checks them too, so a worker cannot claim
    /// an end state (and then start its next round from it) that its round did not compute.
    pub end_optimizer: Digest,
    pub end_residual: Digest,
    /// The worker's sealed audit nonce for the round ([`crate::reveal::sealed`]), told only
    /// once the round's set is fixed.
    pub reveal: Digest,
}

/// Why a signed commitment was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("the public key does not decode")]
    BadKey,
    #[error("the public key does not belong to the named worker")]
    WrongWorker,
    #[error("the signature does not verify")]
    BadSignature,
}

/// A commitment with its worker's key and signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub commitment: Commitment,
    /// Protobuf encoding of the libp2p public key.
    pub public_key: Vec<u8>,
    pub signature: Vec<u8>,
}

impl Commitment {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut out = DOMAIN.to_vec();
        // Serializing a plain struct into a Vec cannot fail.
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Digest of the signed bytes: the commitment's identity.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.signed_bytes())
    }
}

impl Signed {
    /// Signs `commitment` with `key` (whose peer id must be `commitment.worker`).
    pub fn sign(key: &NodeKey, commitment: Commitment) -> Self {
        let signature = key.sign(&commitment.signed_bytes());
        Self {
            commitment,
            public_key: key.public().encode_protobuf(),
            signature,
        }
    }

    pub fn verify(&self) -> Result<(), VerifyError> {
        let key = libp2p_identity::PublicKey::try_decode_protobuf(&self.public_key)
            .map_err(|_| VerifyError::BadKey)?;
        if key.to_peer_id().to_bytes() != self.commitment.worker {
            return Err(VerifyError::WrongWorker);
        }
        if !key.verify(&self.commitment.signed_bytes(), &self.signature) {
            return Err(VerifyError::BadSignature);
        }
        Ok(())
    }
}

/// A pseudo-gradient as it travels: the signed commitment and the payload it commits to.
///
/// The payload is shared, not copied, between the holders of a contribution in one process
/// (the round machine that aggregates it, the store that relays it to peers): on the wire it
/// is the same byte sequence a `Vec<u8>` would be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contribution {
    pub signed: Signed,
    pub payload: Arc<[u8]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commitment(worker: Vec<u8>) -> Commitment {
        Commitment {
            run: Digest::of(b"run"),
            round: 3,
            worker,
            start_weights: Digest::of(b"w"),
            start_optimizer: Digest::of(b"o"),
            start_residual: Digest::of(b"r"),
            examples: Digest::of(b"e"),
            seed: 1,
            first_step: 30,
            inner_steps: 10,
            batch_size: 8,
            hyper: Digest::of(b"h"),
            payload: Digest::of(b"p"),
            payload_len: 1,
            end_optimizer: Digest::of(b"eo"),
            end_residual: Digest::of(b"er"),
            reveal: Digest::of(b"n"),
        }
    }

    #[test]
    fn signatures_bind_every_field_and_the_worker() {
        let key = NodeKey::from_secret([7; 32]).unwrap();
        let other = NodeKey::from_secret([8; 32]).unwrap();
        let s = Signed::sign(&key, commitment(key.peer_id().to_bytes()));
        assert_eq!(s.verify(), Ok(()));
        let mut altered = s.clone();
        altered.commitment.round = 4;
        assert_eq!(altered.verify(), Err(VerifyError::BadSignature));
        // Someone else's key, re-signed, still names the victim as worker.
        let forged = Signed::sign(&other, commitment(key.peer_id().to_bytes()));
        assert_eq!(forged.verify(), Err(VerifyError::WrongWorker));
        let mut bad_key = s.clone();
        bad_key.public_key = vec![1, 2, 3];
        assert_eq!(bad_key.verify(), Err(VerifyError::BadKey));
        assert_ne!(s.commitment.digest(), altered.commitment.digest());
    }
}
