//! Signed announcements: what a node offers, published on gossip with a time to live.
//!
//! A node signs the postcard bytes of its [`Announcement`] with its [`NodeKey`]; a receiver
//! accepts it only if the embedded public key hashes to the claimed peer id, the signature
//! verifies, and `issued_at + ttl` is still ahead of the receiver's clock (passed in, so the
//! check is a pure function).

use crate::keys::NodeKey;
use crate::Digest;
use libp2p_identity::{PeerId, PublicKey};
use serde::{Deserialize, Serialize};

/// Longest time to live a receiver accepts.
pub const MAX_TTL_MS: u64 = 10 * 60 * 1000;
/// How far in the future an announcement may claim to be issued (clock skew between nodes).
pub const MAX_SKEW_MS: u64 = 30 * 1000;
/// Largest encoded announcement a receiver decodes.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 64 * 1024;

/// Bounds every number and list in an announcement must respect (see [`Announcement::check`]).
/// A node's figures are claims: out-of-range ones are refused outright, so no later
/// arithmetic (costs, memory, placement) sees a NaN, a negative time or an overflow.
pub mod limits {
    /// Layers of one model.
    pub const MAX_LAYERS: u32 = 4096;
    /// Width of the hidden state (the wire's own limit).
    pub const MAX_HIDDEN: u32 = crate::wire::MAX_HIDDEN as u32;
    /// Seconds per layer per token, decode or prefill: an hour is no node.
    pub const MAX_SECONDS_PER_LAYER: f32 = 60.0;
    /// Bytes of weights per layer (1 TiB).
    pub const MAX_LAYER_BYTES: u64 = 1 << 40;
    /// Models offered by one node.
    pub const MAX_MODELS: usize = 16;
    /// Listen addresses, and characters of one address.
    pub const MAX_ADDRS: usize = 16;
    pub const MAX_ADDR_CHARS: usize = 256;
    /// Characters of the version and of a model name.
    pub const MAX_NAME_CHARS: usize = 128;
    /// Sessions a node accepts, threads it has, jobs it queues.
    pub const MAX_SESSIONS: u32 = 1 << 16;
    pub const MAX_THREADS: u32 = 1 << 12;
    pub const MAX_QUEUE: u32 = 1 << 16;
    /// Asking price, micro-PLX per 1000 positions through one layer (1,000 PLX: far above any
    /// honest price, and low enough that positions x layers x price never overflows a u128).
    pub const MAX_PRICE: u64 = 1_000_000_000;
    /// Positions of KV cache one offer's budget may claim (2^28: terabytes for any model).
    pub const MAX_KV_POSITIONS: u32 = 1 << 28;
    /// Peers' speeds one announcement reports as measured.
    pub const MAX_OBSERVATIONS: usize = 64;
    /// Convicted peers one announcement lists, and doubted peers.
    pub const MAX_VERDICTS: usize = 256;
}

/// One model a node serves: which layers, how fast.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelOffer {
    /// The model's identity: sha256 of its weight files.
    pub model: Digest,
    /// A human name (`SmolLM2-135M-Instruct`), for listings only.
    pub name: String,
    pub num_layers: u32,
    /// The span of layers served: `start..end`.
    pub start: u32,
    pub end: u32,
    /// Width of the hidden state passed between stages.
    pub hidden: u32,
    /// Measured seconds per layer per token: decode (one position) and prefill (per position
    /// of a long chunk).
    pub decode_s_per_layer: f32,
    pub prefill_s_per_layer: f32,
    /// Bytes of weights per layer (memory needed to take more layers).
    pub layer_bytes: u64,
    /// KV cache positions of this span the node's budget holds, and how many of them no
    /// session has reserved now (a claim: routing sends new sessions to nodes with room, and a
    /// node that claims room it has not refuses them `Busy` and is routed around). At most
    /// [`limits::MAX_KV_POSITIONS`], free at most all.
    pub kv_positions: u32,
    pub kv_free_positions: u32,
    /// Layers of this model the node loads besides its span to check other nodes' work: an
    /// audit of a span nobody else serves goes to a node that loads it for the audit (0: the
    /// node checks no other span). At most `num_layers`.
    pub check_layers: u32,
}

/// What a node publishes about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// The protobuf-encoded public key; its peer id must be `peer`.
    pub public_key: Vec<u8>,
    pub peer: String,
    /// Unix milliseconds when signed.
    pub issued_at_ms: u64,
    pub ttl_ms: u64,
    /// Software build: the package version and the engine's arithmetic identity
    /// (`0.1.0+<id>`); audits compare answers bit for bit only between equal builds.
    pub version: String,
    /// Multiaddrs the node listens on.
    pub addrs: Vec<String>,
    pub threads: u32,
    /// Bytes of memory available for more layers and sessions.
    pub free_memory: u64,
    /// Sessions open and the most this node accepts.
    pub sessions: u32,
    pub max_sessions: u32,
    /// Requests waiting for the engine.
    pub queue: u32,
    /// Asking price in ledger units (micro-PLX) per 1000 positions through one layer: a stage
    /// call of `n` new positions over `l` layers costs `n * l * price / 1000`. Signed into
    /// every receipt of a stage call ([`crate::wire::Receipt`]); at most
    /// [`limits::MAX_PRICE`].
    pub price: u64,
    pub models: Vec<ModelOffer>,
    /// The decode speeds this node measured of peers serving its model (placement's input:
    /// a peer's announced speed is a claim, these are the measurements that check it; see
    /// `plexus_node::probe`). At most [`limits::MAX_OBSERVATIONS`].
    pub observed: Vec<Observation>,
    /// Peers the announcer convicted by audit (a gateway's verdicts, newest last): nodes that
    /// trust the announcer's verdicts plan placement without them. At most
    /// [`limits::MAX_VERDICTS`].
    pub convicted: Vec<String>,
    /// Peers the announcer doubts (a gateway's audits confirmed misses improbable for an
    /// honest node, short of a conviction): nodes that trust the announcer's verdicts place a
    /// spare beside each. At most [`limits::MAX_VERDICTS`]. Appended last: postcard ignores
    /// trailing bytes, so earlier builds still read this build's announcements (without it),
    /// while this build refuses theirs as malformed (one release of a network at a time).
    pub doubted: Vec<String>,
}

/// One peer's decode speed on one model, as the announcing node measured it (stage calls it
/// timed itself, the round trip taken off).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// The measured peer's id, as text.
    pub peer: String,
    pub model: Digest,
    /// Measured seconds per layer per decoded token: a decode call's time, less the round
    /// trip, over the layers it ran.
    pub decode_s_per_layer: f32,
    /// The layers of the peer's span when it was measured.
    pub layers: u32,
}

/// An announcement with its signature, as it travels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why an announcement was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyAnnouncementError {
    #[error("the announcement is {0} bytes, more than {MAX_ANNOUNCEMENT_BYTES}")]
    TooLarge(usize),
    #[error("the announcement does not decode: {0}")]
    Malformed(String),
    #[error("the public key does not belong to peer {0}")]
    WrongKey(String),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the announcement expired {0} ms ago")]
    Expired(u64),
    #[error("the announcement claims a time {0} ms in the future")]
    FromTheFuture(u64),
    #[error("the time to live {0} ms is longer than {MAX_TTL_MS}")]
    TtlTooLong(u64),
    #[error("implausible {field}: {value}")]
    Implausible { field: &'static str, value: String },
}

impl Announcement {
    /// Signs this announcement with `key` (whose public key and peer id it must carry).
    pub fn sign(&self, key: &NodeKey) -> SignedAnnouncement {
        let body = postcard::to_allocvec(self).unwrap_or_default();
        let signature = key.sign(&body);
        SignedAnnouncement { body, signature }
    }

    pub fn peer_id(&self) -> Option<PeerId> {
        self.peer.parse().ok()
    }

    /// Checks every number and list against [`limits`]: finite, non-negative, bounded, spans
    /// with `start < end <= num_layers`, at most as many sessions open as accepted.
    pub fn check(&self) -> Result<(), VerifyAnnouncementError> {
        use limits::*;
        fn bad(field: &'static str, value: impl std::fmt::Debug) -> VerifyAnnouncementError {
            VerifyAnnouncementError::Implausible {
                field,
                value: format!("{value:?}"),
            }
        }
        if self.version.chars().count() > MAX_NAME_CHARS {
            return Err(bad("version length", self.version.len()));
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(bad("address count", self.addrs.len()));
        }
        if let Some(a) = self.addrs.iter().find(|a| a.len() > MAX_ADDR_CHARS) {
            return Err(bad("address length", a.len()));
        }
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(bad("threads", self.threads));
        }
        if self.max_sessions > MAX_SESSIONS {
            return Err(bad("max_sessions", self.max_sessions));
        }
        if self.sessions > self.max_sessions {
            return Err(bad("sessions", (self.sessions, self.max_sessions)));
        }
        if self.queue > MAX_QUEUE {
            return Err(bad("queue", self.queue));
        }
        if self.price > MAX_PRICE {
            return Err(bad("price", self.price));
        }
        if self.models.len() > MAX_MODELS {
            return Err(bad("model count", self.models.len()));
        }
        for o in &self.models {
            if o.name.chars().count() > MAX_NAME_CHARS {
                return Err(bad("model name length", o.name.len()));
            }
            if o.num_layers == 0 || o.num_layers > MAX_LAYERS {
                return Err(bad("num_layers", o.num_layers));
            }
            if o.start >= o.end || o.end > o.num_layers {
                return Err(bad("span", (o.start, o.end, o.num_layers)));
            }
            if o.hidden == 0 || o.hidden > MAX_HIDDEN {
                return Err(bad("hidden", o.hidden));
            }
            for (field, v) in [
                ("decode_s_per_layer", o.decode_s_per_layer),
                ("prefill_s_per_layer", o.prefill_s_per_layer),
            ] {
                if !(0.0..=MAX_SECONDS_PER_LAYER).contains(&v) {
                    return Err(bad(field, v));
                }
            }
            if o.layer_bytes > MAX_LAYER_BYTES {
                return Err(bad("layer_bytes", o.layer_bytes));
            }
            if o.kv_positions > MAX_KV_POSITIONS || o.kv_free_positions > o.kv_positions {
                return Err(bad("kv positions", (o.kv_free_positions, o.kv_positions)));
            }
            if o.check_layers > o.num_layers {
                return Err(bad("check_layers", (o.check_layers, o.num_layers)));
            }
        }
        if self.observed.len() > MAX_OBSERVATIONS {
            return Err(bad("observation count", self.observed.len()));
        }
        for o in &self.observed {
            if o.peer.parse::<PeerId>().is_err() {
                return Err(bad("observed peer", &o.peer));
            }
            if !(o.decode_s_per_layer > 0.0 && o.decode_s_per_layer <= MAX_SECONDS_PER_LAYER) {
                return Err(bad("observed decode_s_per_layer", o.decode_s_per_layer));
            }
            if o.layers == 0 || o.layers > MAX_LAYERS {
                return Err(bad("observed layers", o.layers));
            }
        }
        if self.convicted.len() > MAX_VERDICTS {
            return Err(bad("convicted count", self.convicted.len()));
        }
        if let Some(p) = self.convicted.iter().find(|p| p.parse::<PeerId>().is_err()) {
            return Err(bad("convicted peer", p));
        }
        if self.doubted.len() > MAX_VERDICTS {
            return Err(bad("doubted count", self.doubted.len()));
        }
        if let Some(p) = self.doubted.iter().find(|p| p.parse::<PeerId>().is_err()) {
            return Err(bad("doubted peer", p));
        }
        Ok(())
    }

    /// When this announcement stops being valid (unix ms).
    pub fn expires_at_ms(&self) -> u64 {
        self.issued_at_ms.saturating_add(self.ttl_ms)
    }
}

impl SignedAnnouncement {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes the outer envelope (not yet verified).
    pub fn decode(bytes: &[u8]) -> Result<Self, VerifyAnnouncementError> {
        if bytes.len() > MAX_ANNOUNCEMENT_BYTES {
            return Err(VerifyAnnouncementError::TooLarge(bytes.len()));
        }
        postcard::from_bytes(bytes).map_err(|e| VerifyAnnouncementError::Malformed(e.to_string()))
    }

    /// Checks the signature and validity window against `now_ms` and returns the contents.
    pub fn verify(&self, now_ms: u64) -> Result<Announcement, VerifyAnnouncementError> {
        if self.body.len() > MAX_ANNOUNCEMENT_BYTES {
            return Err(VerifyAnnouncementError::TooLarge(self.body.len()));
        }
        let a: Announcement = postcard::from_bytes(&self.body)
            .map_err(|e| VerifyAnnouncementError::Malformed(e.to_string()))?;
        let key = PublicKey::try_decode_protobuf(&a.public_key)
            .map_err(|e| VerifyAnnouncementError::Malformed(e.to_string()))?;
        if a.peer_id() != Some(key.to_peer_id()) {
            return Err(VerifyAnnouncementError::WrongKey(a.peer.clone()));
        }
        if !key.verify(&self.body, &self.signature) {
            return Err(VerifyAnnouncementError::BadSignature);
        }
        if a.ttl_ms > MAX_TTL_MS {
            return Err(VerifyAnnouncementError::TtlTooLong(a.ttl_ms));
        }
        if a.issued_at_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(VerifyAnnouncementError::FromTheFuture(
                a.issued_at_ms - now_ms,
            ));
        }
        if a.expires_at_ms() <= now_ms {
            return Err(VerifyAnnouncementError::Expired(now_ms - a.expires_at_ms()));
        }
        a.check()?;
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(key: &NodeKey, now: u64) -> Announcement {
        Announcement {
            public_key: key.public().encode_protobuf(),
            peer: key.peer_id().to_string(),
            issued_at_ms: now,
            ttl_ms: 30_000,
            version: "0.1.0".into(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            threads: 2,
            free_memory: 1 << 30,
            sessions: 0,
            max_sessions: 64,
            queue: 0,
            price: 10,
            models: vec![ModelOffer {
                model: Digest::of(b"weights"),
                name: "m".into(),
                num_layers: 30,
                start: 0,
                end: 10,
                hidden: 576,
                decode_s_per_layer: 1e-4,
                prefill_s_per_layer: 2e-5,
                layer_bytes: 3 << 20,
                kv_positions: 100_000,
                kv_free_positions: 60_000,
                check_layers: 30,
            }],
            observed: vec![Observation {
                peer: NodeKey::generate().peer_id().to_string(),
                model: Digest::of(b"weights"),
                decode_s_per_layer: 2e-4,
                layers: 10,
            }],
            convicted: vec![NodeKey::generate().peer_id().to_string()],
            doubted: vec![NodeKey::generate().peer_id().to_string()],
        }
    }

    #[test]
    fn signed_announcement_verifies_until_it_expires() {
        let key = NodeKey::generate();
        let a = sample(&key, 1_000_000);
        let signed = SignedAnnouncement::decode(&a.sign(&key).encode()).unwrap();
        assert_eq!(signed.verify(1_000_000).unwrap(), a);
        assert_eq!(signed.verify(1_029_999).unwrap(), a);
        assert_eq!(
            signed.verify(1_030_000),
            Err(VerifyAnnouncementError::Expired(0))
        );
        assert!(matches!(
            signed.verify(900_000),
            Err(VerifyAnnouncementError::FromTheFuture(_))
        ));
    }

    #[test]
    fn forged_announcements_are_refused() {
        let key = NodeKey::generate();
        let other = NodeKey::generate();
        let a = sample(&key, 1_000);
        // Signed by someone else.
        let mut forged = a.sign(&other);
        assert_eq!(
            forged.verify(1_000),
            Err(VerifyAnnouncementError::BadSignature)
        );
        // Claims another peer's id.
        let mut b = a.clone();
        b.peer = other.peer_id().to_string();
        assert!(matches!(
            b.sign(&key).verify(1_000),
            Err(VerifyAnnouncementError::WrongKey(_))
        ));
        // Body altered after signing.
        forged = a.sign(&key);
        let last = forged.body.len() - 1;
        forged.body[last] ^= 1;
        assert!(forged.verify(1_000).is_err());
        // Too long a TTL.
        let mut c = a.clone();
        c.ttl_ms = MAX_TTL_MS + 1;
        assert!(matches!(
            c.sign(&key).verify(1_000),
            Err(VerifyAnnouncementError::TtlTooLong(_))
        ));
    }

    #[test]
    fn implausible_numbers_are_refused() {
        let key = NodeKey::generate();
        type Tweak = Box<dyn Fn(&mut Announcement)>;
        let cases: Vec<(&str, Tweak)> = vec![
            (
                "NaN speed",
                Box::new(|a| a.models[0].decode_s_per_layer = f32::NAN),
            ),
            (
                "negative speed",
                Box::new(|a| a.models[0].decode_s_per_layer = -1.0),
            ),
            (
                "infinite prefill",
                Box::new(|a| a.models[0].prefill_s_per_layer = f32::INFINITY),
            ),
            (
                "empty span",
                Box::new(|a| a.models[0].end = a.models[0].start),
            ),
            ("span past the model", Box::new(|a| a.models[0].end = 31)),
            ("no layers", Box::new(|a| a.models[0].num_layers = 0)),
            ("hidden 0", Box::new(|a| a.models[0].hidden = 0)),
            (
                "huge layers",
                Box::new(|a| a.models[0].layer_bytes = u64::MAX),
            ),
            ("sessions over max", Box::new(|a| a.sessions = 65)),
            ("wrapped queue", Box::new(|a| a.queue = u32::MAX)),
            ("absurd price", Box::new(|a| a.price = u64::MAX)),
            ("no threads", Box::new(|a| a.threads = 0)),
            (
                "more free KV than budget",
                Box::new(|a| a.models[0].kv_free_positions = 100_001),
            ),
            (
                "observed peer not a peer id",
                Box::new(|a| a.observed[0].peer = "me".into()),
            ),
            (
                "observed speed zero",
                Box::new(|a| a.observed[0].decode_s_per_layer = 0.0),
            ),
            (
                "observed speed NaN",
                Box::new(|a| a.observed[0].decode_s_per_layer = f32::NAN),
            ),
            ("observed no layers", Box::new(|a| a.observed[0].layers = 0)),
            (
                "too many observations",
                Box::new(|a| {
                    let o = a.observed[0].clone();
                    a.observed = vec![o; limits::MAX_OBSERVATIONS + 1];
                }),
            ),
            (
                "checks more layers than the model has",
                Box::new(|a| a.models[0].check_layers = 31),
            ),
            (
                "convicted peer not a peer id",
                Box::new(|a| a.convicted[0] = "someone".into()),
            ),
            (
                "too many verdicts",
                Box::new(|a| {
                    let c = a.convicted[0].clone();
                    a.convicted = vec![c; limits::MAX_VERDICTS + 1];
                }),
            ),
            (
                "doubted peer not a peer id",
                Box::new(|a| a.doubted[0] = "someone".into()),
            ),
            (
                "too many doubted",
                Box::new(|a| {
                    let c = a.doubted[0].clone();
                    a.doubted = vec![c; limits::MAX_VERDICTS + 1];
                }),
            ),
            (
                "huge KV budget",
                Box::new(|a| {
                    a.models[0].kv_positions = u32::MAX;
                    a.models[0].kv_free_positions = 0;
                }),
            ),
        ];
        for (what, tweak) in cases {
            let mut a = sample(&key, 1_000);
            tweak(&mut a);
            assert!(
                matches!(
                    a.sign(&key).verify(1_000),
                    Err(VerifyAnnouncementError::Implausible { .. })
                ),
                "{what} was accepted"
            );
        }
        assert!(sample(&key, 1_000).sign(&key).verify(1_000).is_ok());
    }

    proptest! {
        /// Whatever numbers a node signs, verification never panics, and what it accepts is
        /// within the limits every later computation relies on.
        #[test]
        fn hostile_numbers_never_panic_and_accepted_ones_are_bounded(
            start in any::<u32>(), end in any::<u32>(), layers in any::<u32>(),
            hidden in any::<u32>(), decode in any::<f32>(), prefill in any::<f32>(),
            bytes in any::<u64>(), sessions in any::<u32>(), max_sessions in any::<u32>(),
            queue in any::<u32>(), issued in any::<u64>(), ttl in any::<u64>(), now in any::<u64>(),
            kv in any::<u32>(), kv_free in any::<u32>(),
        ) {
            let key = NodeKey::generate();
            let mut a = sample(&key, issued);
            a.ttl_ms = ttl;
            a.sessions = sessions;
            a.max_sessions = max_sessions;
            a.queue = queue;
            let o = &mut a.models[0];
            (o.start, o.end, o.num_layers, o.hidden) = (start, end, layers, hidden);
            (o.decode_s_per_layer, o.prefill_s_per_layer, o.layer_bytes) = (decode, prefill, bytes);
            (o.kv_positions, o.kv_free_positions) = (kv, kv_free);
            if let Ok(v) = a.sign(&key).verify(now) {
                let o = &v.models[0];
                prop_assert!(o.kv_free_positions <= o.kv_positions);
                prop_assert!(o.kv_positions <= limits::MAX_KV_POSITIONS);
                prop_assert!(o.start < o.end && o.end <= o.num_layers);
                prop_assert!(o.num_layers <= limits::MAX_LAYERS);
                prop_assert!(o.decode_s_per_layer.is_finite() && o.decode_s_per_layer >= 0.0);
                prop_assert!(o.prefill_s_per_layer.is_finite() && o.prefill_s_per_layer >= 0.0);
                prop_assert!(v.sessions <= v.max_sessions);
                prop_assert!(v.expires_at_ms() > now);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(s) = SignedAnnouncement::decode(&bytes) {
                let _ = s.verify(0);
            }
        }
    }
}
