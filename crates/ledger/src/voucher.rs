//! EIP-712 vouchers: a payer's signed promise that a provider has earned, in total, a cumulative
//! amount for one request. A provider redeems only the latest voucher; each one supersedes the
//! ones before (like Golem's cumulative debit notes), so a lost voucher loses nothing.
//!
//! The typed data an EVM contract verifies unchanged:
//!
//! ```text
//! EIP712Domain(string name,string version,uint256 chainId)   name "Plexus", version "1"
//! Voucher(address payer,address provider,bytes32 requestId,uint256 cumulativeAmount,
//!         uint64 nonce,uint64 expiry)
//! ```
//!
//! `expiry` is in seconds since the Unix epoch (like `block.timestamp`); `cumulativeAmount` is in
//! ledger units (micro-PLX). Signatures are 65 bytes `r || s || v` with `v` in {27, 28} and a low
//! `s`, as `eth_signTypedData_v4` and `eth-account` produce them.

use crate::types::{Address, Amount, RequestId, Timestamp};
use alloy_primitives::{FixedBytes, U256};
use alloy_sol_types::{eip712_domain, SolStruct};
use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

mod typed {
    alloy_sol_types::sol! {
        /// The EIP-712 struct.
        struct Voucher {
            address payer;
            address provider;
            bytes32 requestId;
            uint256 cumulativeAmount;
            uint64 nonce;
            uint64 expiry;
        }
    }
}

/// The name in the EIP-712 domain.
pub const DOMAIN_NAME: &str = "Plexus";
/// The version in the EIP-712 domain.
pub const DOMAIN_VERSION: &str = "1";

/// What a voucher says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Voucher {
    pub payer: Address,
    pub provider: Address,
    pub request: RequestId,
    /// Everything the provider has earned on this request so far.
    pub cumulative: Amount,
    /// Strictly increasing per (request, provider): a later voucher has a higher nonce.
    pub nonce: u64,
    /// Last second (Unix time) the voucher may be redeemed.
    pub expiry: u64,
}

impl Voucher {
    /// The 32-byte EIP-712 digest (`keccak256("\x19\x01" || domainSeparator || structHash)`)
    /// that is signed, for a ledger on `chain_id`.
    pub fn digest(&self, chain_id: u64) -> [u8; 32] {
        let domain = eip712_domain! {
            name: DOMAIN_NAME,
            version: DOMAIN_VERSION,
            chain_id: chain_id,
        };
        let typed = typed::Voucher {
            payer: self.payer,
            provider: self.provider,
            requestId: FixedBytes(self.request.0),
            cumulativeAmount: U256::from(self.cumulative),
            nonce: self.nonce,
            expiry: self.expiry,
        };
        typed.eip712_signing_hash(&domain).0
    }

    /// Signs the voucher for `chain_id` with the payer's key.
    pub fn sign(&self, chain_id: u64, key: &SigningKey) -> SignedVoucher {
        let digest = self.digest(chain_id);
        // Signing a 32-byte prehash with a valid key does not fail (the only error is for
        // digests shorter than the curve order's half); keep the signature empty if it did, so
        // verification refuses it as malformed rather than panicking.
        let signature = match key.sign_prehash_recoverable(&digest) {
            Ok((sig, recid)) => {
                let mut out = sig.to_bytes().to_vec();
                out.push(27 + recid.to_byte());
                out
            }
            Err(_) => Vec::new(),
        };
        SignedVoucher {
            voucher: *self,
            chain_id,
            signature: Sig(signature),
        }
    }
}

/// A 65-byte signature `r || s || v`, hex on the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Sig(pub Vec<u8>);

impl std::fmt::Debug for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{}", hex::encode(&self.0))
    }
}

impl From<Sig> for String {
    fn from(s: Sig) -> String {
        format!("0x{}", hex::encode(s.0))
    }
}

impl TryFrom<String> for Sig {
    type Error = hex::FromHexError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        hex::decode(s.trim_start_matches("0x")).map(Sig)
    }
}

/// A voucher with the chain id it was signed for and its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedVoucher {
    pub voucher: Voucher,
    pub chain_id: u64,
    pub signature: Sig,
}

/// Why a voucher's signature is refused (before any ledger state is looked at).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the voucher is for chain id {got}, this ledger is chain id {expected}")]
    WrongChain { expected: u64, got: u64 },
    #[error("the voucher expired at {expiry} s (Unix time); it is now {now} s")]
    Expired { expiry: u64, now: u64 },
    #[error("the voucher's signature is not 65 bytes r||s||v with v 27 or 28 and a low s")]
    Malformed,
    #[error("forged voucher: it names payer {claimed} but was signed by {recovered}")]
    Forged {
        claimed: Address,
        recovered: Address,
    },
}

impl SignedVoucher {
    /// The address that signed this voucher for its chain id.
    pub fn signer(&self) -> Result<Address, SignatureError> {
        let bytes = &self.signature.0;
        if bytes.len() != 65 {
            return Err(SignatureError::Malformed);
        }
        let sig = Signature::from_slice(&bytes[..64]).map_err(|_| SignatureError::Malformed)?;
        if sig.normalize_s().is_some() {
            // A high-s twin of a valid signature: refused so a signature has one form only.
            return Err(SignatureError::Malformed);
        }
        let recid = match bytes[64] {
            27 | 28 => RecoveryId::from_byte(bytes[64] - 27).ok_or(SignatureError::Malformed)?,
            _ => return Err(SignatureError::Malformed),
        };
        let digest = self.voucher.digest(self.chain_id);
        let key = VerifyingKey::recover_from_prehash(&digest, &sig, recid)
            .map_err(|_| SignatureError::Malformed)?;
        Ok(Address::from_public_key(&key))
    }

    /// Checks chain id, expiry and that the payer signed it, at time `now` (milliseconds).
    pub fn verify(&self, chain_id: u64, now: Timestamp) -> Result<(), SignatureError> {
        if self.chain_id != chain_id {
            return Err(SignatureError::WrongChain {
                expected: chain_id,
                got: self.chain_id,
            });
        }
        let now_s = now / 1000;
        if now_s > self.voucher.expiry {
            return Err(SignatureError::Expired {
                expiry: self.voucher.expiry,
                now: now_s,
            });
        }
        let recovered = self.signer()?;
        if recovered != self.voucher.payer {
            return Err(SignatureError::Forged {
                claimed: self.voucher.payer,
                recovered,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_slice(&[b; 32]).unwrap()
    }

    fn voucher(payer: &SigningKey) -> Voucher {
        Voucher {
            payer: Address::from_private_key(payer),
            provider: Address::repeat_byte(0x22),
            request: RequestId([9; 32]),
            cumulative: 1_500,
            nonce: 1,
            expiry: 2_000_000_000,
        }
    }

    #[test]
    fn signed_voucher_verifies_and_tampering_is_named() {
        let k = key(1);
        let v = voucher(&k);
        let s = v.sign(31_337, &k);
        assert_eq!(s.signature.0.len(), 65);
        s.verify(31_337, 1_000).unwrap();
        assert_eq!(
            s.verify(1, 1_000),
            Err(SignatureError::WrongChain {
                expected: 1,
                got: 31_337
            })
        );
        assert!(matches!(
            s.verify(31_337, 2_000_000_001_000),
            Err(SignatureError::Expired { .. })
        ));
        let mut t = s.clone();
        t.voucher.cumulative += 1;
        assert!(matches!(
            t.verify(31_337, 1_000),
            Err(SignatureError::Forged { .. })
        ));
        // Signed by someone else, claiming to be the payer.
        let f = v.sign(31_337, &key(2));
        assert!(matches!(
            f.verify(31_337, 1_000),
            Err(SignatureError::Forged { .. })
        ));
        let mut m = s.clone();
        m.signature.0[64] = 5;
        assert_eq!(m.verify(31_337, 1_000), Err(SignatureError::Malformed));
        m.signature.0.truncate(10);
        assert_eq!(m.verify(31_337, 1_000), Err(SignatureError::Malformed));
    }

    #[test]
    fn signature_round_trips_through_json() {
        let k = key(1);
        let s = voucher(&k).sign(5, &k);
        let text = serde_json::to_string(&s).unwrap();
        let back: SignedVoucher = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        back.verify(5, 0).unwrap();
    }
}
