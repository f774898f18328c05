//! EIP-712 stage receipts: a provider's signed account of one stage call
//! ([`plexus_core::receipt::Receipt`]), in the same domain as vouchers so a contract can check
//! both with one domain separator.
//!
//! ```text
//! EIP712Domain(string name,string version,uint256 chainId)   name "Plexus", version "1"
//! StageReceipt(bytes16 session,bytes32 model,uint32 start,uint32 end,uint32 position,
//!              uint32 positions,uint64 price,bytes32 input,bytes32 output,bytes32 commitment)
//! ```
//!
//! The signer is the provider's node key; its Ethereum address is its ledger account.
//! Signatures are 65 bytes `r || s || v` (`v` 27 or 28, low `s`), like vouchers.

use crate::types::Address;
use crate::voucher::{DOMAIN_NAME, DOMAIN_VERSION};
use alloy_primitives::FixedBytes;
use alloy_sol_types::{eip712_domain, SolStruct};
use k256::ecdsa::{RecoveryId, Signature, SigningKey, VerifyingKey};
use plexus_core::receipt::{Receipt, SIGNATURE_BYTES};

mod typed {
    alloy_sol_types::sol! {
        /// The EIP-712 struct.
        struct StageReceipt {
            bytes16 session;
            bytes32 model;
            uint32 start;
            uint32 end;
            uint32 position;
            uint32 positions;
            uint64 price;
            bytes32 input;
            bytes32 output;
            bytes32 commitment;
        }
    }
}

/// Why a receipt's signature is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptSignatureError {
    #[error("the receipt's signature is not 65 bytes r||s||v with v 27 or 28 and a low s")]
    Malformed,
}

/// The 32-byte EIP-712 digest of `r` (its signature excluded) for a ledger on `chain_id`.
pub fn digest(r: &Receipt, chain_id: u64) -> [u8; 32] {
    let domain = eip712_domain! {
        name: DOMAIN_NAME,
        version: DOMAIN_VERSION,
        chain_id: chain_id,
    };
    let typed = typed::StageReceipt {
        session: FixedBytes(r.session.0),
        model: FixedBytes(r.model.0),
        start: r.start,
        end: r.end,
        position: r.position,
        positions: r.positions,
        price: r.price,
        input: FixedBytes(r.input.0),
        output: FixedBytes(r.output.0),
        commitment: FixedBytes(r.commitment),
    };
    typed.eip712_signing_hash(&domain).0
}

/// Signs `r` in place for `chain_id` with the provider's key.
pub fn sign(r: &mut Receipt, chain_id: u64, key: &SigningKey) {
    let d = digest(r, chain_id);
    // Signing a 32-byte prehash with a valid key does not fail; an empty signature would be
    // refused as malformed by every verifier rather than panic here.
    r.signature = match key.sign_prehash_recoverable(&d) {
        Ok((sig, recid)) => {
            let mut out = sig.to_bytes().to_vec();
            out.push(27 + recid.to_byte());
            out
        }
        Err(_) => Vec::new(),
    };
}

/// The address that signed `r` for `chain_id`.
pub fn signer(r: &Receipt, chain_id: u64) -> Result<Address, ReceiptSignatureError> {
    let bytes = &r.signature;
    if bytes.len() != SIGNATURE_BYTES {
        return Err(ReceiptSignatureError::Malformed);
    }
    let sig = Signature::from_slice(&bytes[..64]).map_err(|_| ReceiptSignatureError::Malformed)?;
    if sig.normalize_s().is_some() {
        return Err(ReceiptSignatureError::Malformed);
    }
    let recid = match bytes[64] {
        27 | 28 => RecoveryId::from_byte(bytes[64] - 27).ok_or(ReceiptSignatureError::Malformed)?,
        _ => return Err(ReceiptSignatureError::Malformed),
    };
    let key = VerifyingKey::recover_from_prehash(&digest(r, chain_id), &sig, recid)
        .map_err(|_| ReceiptSignatureError::Malformed)?;
    Ok(Address::from_public_key(&key))
}

/// The k256 signing key of a node key (its account's key).
pub fn signing_key(key: &plexus_core::keys::NodeKey) -> Option<SigningKey> {
    let kp = key.keypair().clone().try_into_secp256k1().ok()?;
    SigningKey::from_slice(&kp.secret().to_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::keys::NodeKey;
    use plexus_core::wire::SessionId;
    use plexus_core::Digest;

    fn receipt() -> Receipt {
        Receipt {
            session: SessionId([1; 16]),
            model: Digest::of(b"model"),
            start: 0,
            end: 10,
            position: 0,
            positions: 7,
            price: 25,
            input: Digest::of(b"in"),
            output: Digest::of(b"out"),
            commitment: [0; 32],
            signature: Vec::new(),
        }
    }

    #[test]
    fn the_node_key_signs_as_its_account_and_every_claim_is_covered() {
        let node = NodeKey::from_secret([7; 32]).unwrap();
        let key = signing_key(&node).unwrap();
        let account = crate::address_of(&node.public()).unwrap();
        let mut r = receipt();
        sign(&mut r, 31_337, &key);
        assert_eq!(signer(&r, 31_337), Ok(account));
        // Another chain id, or any changed claim, recovers someone else.
        assert_ne!(signer(&r, 1), Ok(account));
        let tweaks: [fn(&mut Receipt); 10] = [
            |r| r.session.0[0] ^= 1,
            |r| r.model.0[0] ^= 1,
            |r| r.start += 1,
            |r| r.end += 1,
            |r| r.position += 1,
            |r| r.positions += 1,
            |r| r.price += 1,
            |r| r.input.0[0] ^= 1,
            |r| r.output.0[0] ^= 1,
            |r| r.commitment[0] ^= 1,
        ];
        for (i, t) in tweaks.iter().enumerate() {
            let mut m = r.clone();
            t(&mut m);
            assert_ne!(signer(&m, 31_337), Ok(account), "claim {i} is not signed");
        }
        let mut m = r.clone();
        m.signature[64] = 3;
        assert_eq!(signer(&m, 31_337), Err(ReceiptSignatureError::Malformed));
        m.signature.truncate(64);
        assert_eq!(signer(&m, 31_337), Err(ReceiptSignatureError::Malformed));
    }
}
