//! Stage receipts: what a stage node says it computed for one stage call, signed with its node
//! key, returned with the call's answer ([`crate::wire::Response::Receipted`]).
//!
//! ```text
//! gateway ── Forward(session, span, position, tokens, hidden) ──▶ stage node
//!         ◀── Receipted { answer, Receipt { same claims, input/output digests, price, sig } }
//! gateway: signer == the peer's key? claims == what it sent and got back? price == announced?
//!          ─▶ per-provider usage of the request ─▶ settlement pays each provider
//! ```
//!
//! The receipt is EIP-712 typed data (`plexus_ledger::receipt` hashes and signs it), so a
//! provider can carry its receipts to an EVM contract unchanged. Everything in it is a claim
//! of the node: the gateway pays on what it measured itself (the positions it sent, the span
//! it asked for, the price the node announced) and only when the receipt agrees.
//!
//! `commitment` is the digest of the call's activation fingerprints
//! (`plexus_verify::commitment::call_commitment`): an auditor that replays the call computes
//! its own and holds the node to what it signed (`plexus_node::audit`).

use crate::wire::{Activations, Forward, Response, SessionId};
use crate::{Digest, Sha256Stream};
use serde::{Deserialize, Serialize};

/// Length of a receipt's signature: `r || s || v`, `v` in {27, 28}.
pub const SIGNATURE_BYTES: usize = 65;

/// A stage node's signed account of one stage call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The chain driver's session (the request, as the stage sees it).
    pub session: SessionId,
    /// The model's identity.
    pub model: Digest,
    /// The span of layers run: `start..end`.
    pub start: u32,
    pub end: u32,
    /// Positions the session held before the call.
    pub position: u32,
    /// New positions computed (every chunk of the call).
    pub positions: u32,
    /// The node's price for this call, micro-PLX per 1000 positions per layer.
    pub price: u64,
    /// [`input_digest`] of the call.
    pub input: Digest,
    /// [`output_digest`] of the answer.
    pub output: Digest,
    /// Digest of the call's activation fingerprints, compared with an auditor's replay.
    pub commitment: [u8; 32],
    /// 65 bytes over the EIP-712 digest of the fields above.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Receipt {
    /// The claims of a call, unsigned (empty signature), as the node that ran `f` states them.
    pub fn for_call(f: &Forward, price: u64, output: Digest) -> Self {
        Self {
            session: f.session,
            model: f.model,
            start: f.start,
            end: f.end,
            position: f.position,
            positions: f.tokens.len() as u32,
            price,
            input: input_digest(f),
            output,
            commitment: [0; 32],
            signature: Vec::new(),
        }
    }

    /// Position-layers the receipt claims: `positions * (end - start)`.
    pub fn work(&self) -> u64 {
        u64::from(self.positions) * u64::from(self.end.saturating_sub(self.start))
    }
}

/// Cost in micro-PLX of `work` position-layers at `price` per 1000, rounded down (sum the work
/// of a request first, then price it once, so rounding loses less than one unit a provider).
pub fn cost(work: u64, price: u64) -> u64 {
    (u128::from(work) * u128::from(price) / 1000).min(u128::from(u64::MAX)) as u64
}

fn hash_activations(h: &mut Sha256Stream, a: &Activations) {
    h.update(&[a.dtype as u8]);
    h.update(&a.rows.to_le_bytes());
    h.update(&a.cols.to_le_bytes());
    h.update(&a.data);
}

/// The digest of a call's input: the session's prompt length (it picks the attention
/// kernels, so it is part of what was computed), its token ids (little-endian u32) and, for
/// a stage after the first, the incoming activations (dtype, rows, cols, bytes), under a
/// domain tag.
pub fn input_digest(f: &Forward) -> Digest {
    let mut h = Sha256Stream::new();
    h.update(b"plexus/receipt/input/3");
    h.update(&f.prompt_len.to_le_bytes());
    h.update(&(f.tokens.len() as u32).to_le_bytes());
    f.tokens.iter().for_each(|t| h.update(&t.to_le_bytes()));
    match &f.hidden {
        Some(a) => {
            h.update(&[1]);
            hash_activations(&mut h, a);
        }
        None => h.update(&[0]),
    }
    h.finish()
}

/// The digest of an answer: the returned activations, or the sampled token id. `None` for
/// answers that carry no computed result (errors, closes, descriptions).
pub fn output_digest(r: &Response) -> Option<Digest> {
    let mut h = Sha256Stream::new();
    h.update(b"plexus/receipt/output/1");
    match r {
        Response::Hidden { hidden, .. } => {
            h.update(&[0]);
            hash_activations(&mut h, hidden);
        }
        Response::Token { token, .. } | Response::Scored { token, .. } => {
            h.update(&[1]);
            h.update(&token.to_le_bytes());
        }
        _ => return None,
    }
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DType;

    fn forward() -> Forward {
        Forward {
            session: SessionId([3; 16]),
            model: Digest::of(b"m"),
            start: 2,
            end: 5,
            position: 7,
            tokens: vec![1, 2],
            hidden: Some(Activations::encode(&[0.25; 8], 2, 4, DType::F32)),
            chunks: vec![],
            sampling: None,
            reply_dtype: DType::F32,
            all_rows: false,
            prompt_len: 0,
        }
    }

    #[test]
    fn claims_follow_the_call_and_digests_see_every_input_byte() {
        let f = forward();
        let r = Receipt::for_call(&f, 40, Digest::of(b"out"));
        assert_eq!((r.start, r.end, r.position, r.positions), (2, 5, 7, 2));
        assert_eq!(r.work(), 6);
        assert_eq!(r.commitment, [0; 32]);
        let mut g = f.clone();
        g.tokens[1] = 3;
        assert_ne!(input_digest(&f), input_digest(&g));
        let mut g = f.clone();
        if let Some(h) = &mut g.hidden {
            h.data[0] ^= 1;
        }
        assert_ne!(input_digest(&f), input_digest(&g));
        let mut g = f.clone();
        g.hidden = None;
        assert_ne!(input_digest(&f), input_digest(&g));
        let mut g = f.clone();
        g.prompt_len = 64;
        assert_ne!(input_digest(&f), input_digest(&g));
    }

    #[test]
    fn output_digests_tell_tokens_and_activations_apart() {
        let t = Response::Token {
            token: 5,
            compute_us: 1,
        };
        let u = Response::Token {
            token: 6,
            compute_us: 1,
        };
        // Timing is not part of the result.
        let t2 = Response::Token {
            token: 5,
            compute_us: 99,
        };
        assert_ne!(output_digest(&t), output_digest(&u));
        assert_eq!(output_digest(&t), output_digest(&t2));
        assert!(output_digest(&Response::Closed).is_none());
    }

    #[test]
    fn cost_rounds_down_and_never_overflows() {
        assert_eq!(cost(999, 1), 0);
        assert_eq!(cost(1000, 1), 1);
        assert_eq!(cost(1500, 10), 15);
        assert_eq!(cost(u64::MAX, u64::MAX), u64::MAX);
    }
}
