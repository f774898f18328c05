//! The ledger's vocabulary: amounts, time, account addresses, request ids and the buckets money
//! sits in.
//!
//! **Unit.** Every [`Amount`] counts *micro-PLX*: one PLX is [`UNITS_PER_PLX`] = 1,000,000 units.
//! Amounts are unsigned integers, never floats, and never exceed [`MAX_AMOUNT`] (`i64::MAX`, so
//! every balance fits a signed 64-bit SQL integer on SQLite and PostgreSQL alike).
//!
//! **Time.** A [`Timestamp`] is milliseconds since the Unix epoch, always passed in by the caller.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub use alloy_primitives::Address;

/// An amount of micro-PLX.
pub type Amount = u64;

/// Milliseconds since the Unix epoch.
pub type Timestamp = u64;

/// One PLX in ledger units.
pub const UNITS_PER_PLX: Amount = 1_000_000;

/// The largest amount any balance (and the total supply) may reach.
pub const MAX_AMOUNT: Amount = i64::MAX as u64;

/// The Ethereum address of a secp256k1 public key: the last 20 bytes of the keccak-256 of the
/// 64-byte uncompressed point. A node's account is the address of its node key.
pub fn address_of(public: &libp2p_identity::PublicKey) -> Option<Address> {
    let key = public.clone().try_into_secp256k1().ok()?;
    let uncompressed = key.to_bytes_uncompressed();
    Some(Address::from_raw_public_key(&uncompressed[1..]))
}

/// The account of a peer id given as bytes: the address of the secp256k1 key the id inlines
/// (identity multihash: code 0, one length byte, the protobuf-encoded key). `None` for ids
/// that hash their key (long keys) or whose key is not secp256k1.
pub fn address_of_peer(peer: &[u8]) -> Option<Address> {
    let (&code, rest) = peer.split_first()?;
    let (&len, key) = rest.split_first()?;
    if code != 0 || len >= 0x80 || usize::from(len) != key.len() {
        return None;
    }
    let key = libp2p_identity::PublicKey::try_decode_protobuf(key).ok()?;
    address_of(&key)
}

/// The identity of one request (or lease) whose payment an escrow holds: 32 bytes, the
/// `bytes32 requestId` of a voucher. Displays as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub [u8; 32]);

impl RequestId {
    /// The request id derived from an arbitrary label (for example a gateway's
    /// `chatcmpl-...` id): its sha256.
    pub fn from_label(label: &str) -> Self {
        Self(plexus_core::Digest::of(label.as_bytes()).0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", hex::encode(&self.0[..6]))
    }
}

/// Text that is not 64 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not a 32-byte id in hex")]
pub struct ParseIdError {
    pub text: String,
}

impl FromStr for RequestId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
            .map_err(|_| ParseIdError { text: s.to_owned() })?;
        Ok(Self(out))
    }
}

/// Where money sits. Every posting moves an amount from one bucket to another, so the sum over
/// all buckets is always zero: [`Bucket::World`] is the contra account of everything deposited
/// and not yet withdrawn, and is the only bucket whose balance is negative.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Bucket {
    /// Outside the ledger: deposits come from here, withdrawals go here.
    World,
    /// Slashed funds not paid to a challenger or refunded.
    Treasury,
    /// Spendable funds of an account.
    Available(Address),
    /// Bonded stake of a provider (slashable).
    Staked(Address),
    /// Stake on its way out: slashable until its release time, then claimable.
    Unbonding(Address),
    /// Funds held for one request until it settles.
    Escrow(RequestId),
    /// A provider's earnings inside their challenge window (slashable, claimable after it).
    Locked(Address),
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bucket::World => f.write_str("world"),
            Bucket::Treasury => f.write_str("treasury"),
            Bucket::Available(a) => write!(f, "available:{a}"),
            Bucket::Staked(a) => write!(f, "staked:{a}"),
            Bucket::Unbonding(a) => write!(f, "unbonding:{a}"),
            Bucket::Escrow(r) => write!(f, "escrow:{r}"),
            Bucket::Locked(a) => write!(f, "locked:{a}"),
        }
    }
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Text that does not name a bucket.
#[derive(Debug, thiserror::Error)]
#[error("{text:?} does not name a ledger bucket")]
pub struct ParseBucketError {
    pub text: String,
}

impl FromStr for Bucket {
    type Err = ParseBucketError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseBucketError { text: s.to_owned() };
        let addr = |t: &str| Address::from_str(t).map_err(|_| bad());
        Ok(match s.split_once(':') {
            None if s == "world" => Bucket::World,
            None if s == "treasury" => Bucket::Treasury,
            Some(("available", a)) => Bucket::Available(addr(a)?),
            Some(("staked", a)) => Bucket::Staked(addr(a)?),
            Some(("unbonding", a)) => Bucket::Unbonding(addr(a)?),
            Some(("locked", a)) => Bucket::Locked(addr(a)?),
            Some(("escrow", r)) => Bucket::Escrow(RequestId::from_str(r).map_err(|_| bad())?),
            _ => return Err(bad()),
        })
    }
}

/// One leg of a journal entry: `amount` leaves `from` and arrives in `to`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Posting {
    pub from: Bucket,
    pub to: Bucket,
    pub amount: Amount,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_through_text() {
        let a = Address::repeat_byte(0xab);
        let r = RequestId([7; 32]);
        for b in [
            Bucket::World,
            Bucket::Treasury,
            Bucket::Available(a),
            Bucket::Staked(a),
            Bucket::Unbonding(a),
            Bucket::Escrow(r),
            Bucket::Locked(a),
        ] {
            assert_eq!(b.to_string().parse::<Bucket>().unwrap(), b);
        }
        assert!("available:xyz".parse::<Bucket>().is_err());
        assert!("nothing".parse::<Bucket>().is_err());
    }

    #[test]
    fn node_key_address_matches_k256() {
        let key = plexus_core::keys::NodeKey::from_secret([3; 32]).unwrap();
        let sk = k256::ecdsa::SigningKey::from_slice(&[3; 32]).unwrap();
        let expected = Address::from_private_key(&sk);
        assert_eq!(address_of(&key.public()), Some(expected));
    }
}
