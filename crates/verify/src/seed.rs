//! The sampling seed of a request, fixed by the protocol so that sampled tokens are evidence.
//!
//! A provider that could choose its own seed could pick, among many, one whose draws land on
//! the tokens it wants (or hide a cheaper model's tokens behind "a different seed"). So the seed
//! is derived from two values the provider does not control:
//!
//! - the request id (assigned by the gateway when the request arrives), and
//! - the gateway's commitment for the request (the sha256 of a secret the gateway draws and
//!   reveals with the audit, so the client cannot grind the seed either).
//!
//! `seed = u64_le(sha256("plexus/sampling-seed/v1" || request_id || commitment)[..8])`.
//!
//! A client that sends its own `seed` (OpenAI's reproducibility parameter) gets exactly that
//! seed: the verifier still knows it, so tokens stay checkable.

use plexus_core::Digest;
use sha2::{Digest as _, Sha256};

const DOMAIN: &[u8] = b"plexus/sampling-seed/v1";

/// Where a request's sampling seed comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedSource {
    /// The client asked for this seed.
    Client(u64),
    /// Derived by the protocol from the request id and the gateway's commitment.
    Protocol {
        request: [u8; 32],
        commitment: Digest,
    },
}

impl SeedSource {
    /// The seed every party (provider, auditor, referee) uses for the request.
    pub fn seed(&self) -> u64 {
        match *self {
            SeedSource::Client(seed) => seed,
            SeedSource::Protocol {
                request,
                commitment,
            } => protocol_seed(&request, &commitment),
        }
    }
}

/// The protocol seed for `request` under the gateway's `commitment`.
pub fn protocol_seed(request: &[u8; 32], commitment: &Digest) -> u64 {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(request);
    h.update(commitment.as_bytes());
    let out: [u8; 32] = h.finalize().into();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_le_bytes(first)
}

/// What a gateway draws for one request: the request's id and the secret behind its seed
/// commitment. The id and the commitment are published with the response (and the id is the
/// escrow's request id); the secret is kept to be revealed with an audit, so that anyone can
/// then check the seed was fixed before the provider answered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestSeal {
    request: [u8; 32],
    secret: [u8; 32],
}

impl RequestSeal {
    /// A seal from the gateway's fresh random `request` id and `secret`.
    pub const fn new(request: [u8; 32], secret: [u8; 32]) -> Self {
        Self { request, secret }
    }

    pub fn request(&self) -> [u8; 32] {
        self.request
    }

    /// The gateway's commitment ([`commit_secret`] of the secret).
    pub fn commitment(&self) -> Digest {
        commit_secret(&self.secret)
    }

    /// The secret, revealed with an audit.
    pub fn secret(&self) -> [u8; 32] {
        self.secret
    }

    /// Where the request's seed comes from: the client's own `seed` when it sent one (the
    /// verifier knows it too), else the protocol's.
    pub fn source(&self, client: Option<u64>) -> SeedSource {
        match client {
            Some(seed) => SeedSource::Client(seed),
            None => SeedSource::Protocol {
                request: self.request,
                commitment: self.commitment(),
            },
        }
    }

    /// The protocol seed of the request (what it samples with unless the client chose one).
    pub fn protocol_seed(&self) -> u64 {
        self.source(None).seed()
    }
}

/// The secret stays out of logs and debug output.
impl std::fmt::Debug for RequestSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSeal")
            .field("request", &Digest(self.request))
            .field("commitment", &self.commitment())
            .finish_non_exhaustive()
    }
}

/// Whether a revealed `secret` matches the published `commitment` and gives `seed` for
/// `request` (what a client or referee checks after an audit reveals the secret).
pub fn check_reveal(request: &[u8; 32], commitment: &Digest, secret: &[u8; 32], seed: u64) -> bool {
    commit_secret(secret) == *commitment && protocol_seed(request, commitment) == seed
}

/// The gateway's commitment to its per-request secret: `sha256(domain || secret)`. The secret
/// is revealed with the audit so anyone can check the seed was not chosen after the fact.
pub fn commit_secret(secret: &[u8; 32]) -> Digest {
    let mut h = Sha256::new();
    h.update(b"plexus/seed-secret/v1");
    h.update(secret);
    Digest(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn client_seed_is_kept() {
        assert_eq!(SeedSource::Client(42).seed(), 42);
    }

    #[test]
    fn known_vector() {
        // Pinned (and checked with Python hashlib) so a change of the derivation is seen.
        let seed = protocol_seed(&[0u8; 32], &commit_secret(&[1u8; 32]));
        assert_eq!(format!("{seed:016x}"), "9a64f88c37b5922f");
    }

    #[test]
    fn a_seal_gives_the_protocol_seed_unless_the_client_chose_one() {
        let seal = RequestSeal::new([5; 32], [6; 32]);
        let seed = seal.protocol_seed();
        assert_eq!(seed, protocol_seed(&[5; 32], &commit_secret(&[6; 32])));
        assert_eq!(RequestSeal::new([5; 32], [6; 32]).protocol_seed(), seed);
        assert_eq!(seal.source(Some(9)).seed(), 9);
        assert!(check_reveal(
            &seal.request(),
            &seal.commitment(),
            &seal.secret(),
            seed
        ));
        assert!(!check_reveal(
            &seal.request(),
            &seal.commitment(),
            &[7; 32],
            seed
        ));
        assert!(!check_reveal(
            &seal.request(),
            &seal.commitment(),
            &seal.secret(),
            seed ^ 1
        ));
        let shown = format!("{seal:?}");
        assert!(!shown.contains(&Digest([6; 32]).to_string()), "{shown}");
    }

    proptest! {
        #[test]
        fn seed_depends_on_both_inputs(req in any::<[u8; 32]>(), a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            prop_assume!(a != b);
            let (ca, cb) = (commit_secret(&a), commit_secret(&b));
            prop_assert_ne!(protocol_seed(&req, &ca), protocol_seed(&req, &cb));
            let mut other = req;
            other[0] ^= 1;
            prop_assert_ne!(protocol_seed(&req, &ca), protocol_seed(&other, &ca));
            let s = SeedSource::Protocol { request: req, commitment: ca };
            prop_assert_eq!(s.seed(), protocol_seed(&req, &ca));
        }
    }
}
