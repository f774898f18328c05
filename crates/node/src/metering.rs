//! Metering per provider: what each stage node of a generation computed, as the chain driver
//! measured it and the node signed it.
//!
//! ```text
//! before a call:  expected = Receipt::for_call(forward, announced price)   (our measurement)
//! after it:       check(expected, node's receipt, output we got, peer's account)
//!                   ok      ─▶ Usage::record(account, price, positions x layers)
//!                   refused ─▶ Usage::refused += 1 (the call is not paid; logged)
//! settlement:     Usage::costs() ─▶ one payout per provider account
//! ```
//!
//! A node's receipt is a claim: it is paid only for what the driver itself sent (positions,
//! span) at the price it announced, and only when the signed receipt says the same. Replays to
//! a replacement stage are work too and are paid to whoever did them.

use plexus_core::receipt::{cost, output_digest, Receipt};
use plexus_core::wire::Response;
use plexus_ledger::{Address, Amount};
use std::collections::BTreeMap;

/// Why a stage call's receipt was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("the answer carries no receipt")]
    Missing,
    #[error("the node was convicted by audit")]
    Convicted,
    #[error("the peer's key is not secp256k1 (it has no ledger account)")]
    NoAccount,
    #[error("the receipt's signature is malformed")]
    Signature,
    #[error("the receipt was signed by {signer}, not by the peer's account {account}")]
    WrongSigner { signer: Address, account: Address },
    #[error("the receipt claims {field} {claimed}; the call had {measured}")]
    Claim {
        field: &'static str,
        claimed: String,
        measured: String,
    },
}

/// Checks a node's `receipt` for a call against what the caller measured: `expected` (from the
/// call it sent, at the node's announced price) and the `answer` it received; the signature
/// must be `account`'s for `chain_id`.
pub fn check(
    expected: &Receipt,
    receipt: &Receipt,
    answer: &Response,
    account: Address,
    chain_id: u64,
) -> Result<(), ReceiptError> {
    let signer =
        plexus_ledger::receipt::signer(receipt, chain_id).map_err(|_| ReceiptError::Signature)?;
    if signer != account {
        return Err(ReceiptError::WrongSigner { signer, account });
    }
    let claim = |field: &'static str, claimed: String, measured: String| {
        if claimed == measured {
            Ok(())
        } else {
            Err(ReceiptError::Claim {
                field,
                claimed,
                measured,
            })
        }
    };
    let output = output_digest(answer).map_or_else(|| "nothing".into(), |d| d.to_string());
    claim(
        "session",
        receipt.session.to_string(),
        expected.session.to_string(),
    )?;
    claim(
        "model",
        receipt.model.to_string(),
        expected.model.to_string(),
    )?;
    claim(
        "span",
        format!("{}..{}", receipt.start, receipt.end),
        format!("{}..{}", expected.start, expected.end),
    )?;
    claim(
        "position",
        receipt.position.to_string(),
        expected.position.to_string(),
    )?;
    claim(
        "positions",
        receipt.positions.to_string(),
        expected.positions.to_string(),
    )?;
    claim(
        "price",
        receipt.price.to_string(),
        expected.price.to_string(),
    )?;
    claim(
        "input",
        receipt.input.to_string(),
        expected.input.to_string(),
    )?;
    claim("output", receipt.output.to_string(), output)?;
    // The caller's recomputation from the answer (`crate::audit::expected_commitment`).
    claim(
        "commitment",
        hex::encode(receipt.commitment),
        hex::encode(expected.commitment),
    )
}

/// One provider's accepted work at one price.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Position-layers computed (positions x layers of the span).
    pub work: u64,
    /// Stage calls with an accepted receipt.
    pub calls: u64,
}

/// The metered work of one generation (or several: [`Usage::merge`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// By (provider account, price per 1000 position-layers).
    pub providers: BTreeMap<(Address, u64), Work>,
    /// Calls whose receipt was refused or missing: computed, not paid.
    pub refused: u64,
    /// Audit verdicts of the generation, for the ledger (slashes).
    pub convictions: Vec<crate::audit::Conviction>,
}

impl Usage {
    /// Adds an accepted receipt's work.
    pub fn record(&mut self, account: Address, receipt: &Receipt) {
        let w = self.providers.entry((account, receipt.price)).or_default();
        w.work = w.work.saturating_add(receipt.work());
        w.calls += 1;
    }

    /// Takes back one call of `work` at `price` recorded for `account` (its answer was
    /// rejected); false when there is no such call to take back.
    pub fn unrecord(&mut self, account: Address, price: u64, work: u64) -> bool {
        let Some(w) = self.providers.get_mut(&(account, price)) else {
            return false;
        };
        if w.calls == 0 || w.work < work {
            return false;
        }
        w.work -= work;
        w.calls -= 1;
        if w.calls == 0 {
            self.providers.remove(&(account, price));
        }
        true
    }

    pub fn merge(&mut self, other: &Usage) {
        for (k, w) in &other.providers {
            let mine = self.providers.entry(*k).or_default();
            mine.work = mine.work.saturating_add(w.work);
            mine.calls += w.calls;
        }
        self.refused += other.refused;
        self.convictions.extend(other.convictions.iter().cloned());
    }

    /// What each provider earned: its work at each price, priced once per price (rounded down).
    pub fn costs(&self) -> BTreeMap<Address, Amount> {
        let mut out: BTreeMap<Address, Amount> = BTreeMap::new();
        for ((account, price), w) in &self.providers {
            let c = out.entry(*account).or_default();
            *c = c.saturating_add(cost(w.work, *price));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::keys::NodeKey;
    use plexus_core::wire::{DType, Forward, SessionId};
    use plexus_core::Digest;

    fn forward() -> Forward {
        Forward {
            session: SessionId([1; 16]),
            model: Digest::of(b"m"),
            start: 0,
            end: 15,
            position: 0,
            tokens: vec![1, 2, 3, 4],
            hidden: None,
            chunks: vec![],
            sampling: None,
            reply_dtype: DType::F32,
            all_rows: false,
            prompt_len: 0,
        }
    }

    fn signed(node: &NodeKey, f: &Forward, price: u64, answer: &Response) -> Receipt {
        let mut r = Receipt::for_call(f, price, output_digest(answer).unwrap());
        let key = plexus_ledger::receipt::signing_key(node).unwrap();
        plexus_ledger::receipt::sign(&mut r, 31_337, &key);
        r
    }

    #[test]
    fn honest_receipts_pass_and_every_false_claim_is_named() {
        let node = NodeKey::from_secret([5; 32]).unwrap();
        let account = plexus_ledger::address_of(&node.public()).unwrap();
        let f = forward();
        let answer = Response::Token {
            token: 9,
            compute_us: 3,
        };
        let expected = Receipt::for_call(&f, 20, Digest([0; 32]));
        let good = signed(&node, &f, 20, &answer);
        assert_eq!(check(&expected, &good, &answer, account, 31_337), Ok(()));

        // Another chain id: the signature recovers someone else.
        assert!(matches!(
            check(&expected, &good, &answer, account, 1),
            Err(ReceiptError::WrongSigner { .. })
        ));
        // Signed by another node.
        let other = NodeKey::from_secret([6; 32]).unwrap();
        assert!(matches!(
            check(
                &expected,
                &signed(&other, &f, 20, &answer),
                &answer,
                account,
                31_337
            ),
            Err(ReceiptError::WrongSigner { .. })
        ));
        // Claims the node signed but that are false.
        let mut more = f.clone();
        more.tokens.push(5);
        let lie = signed(&node, &more, 20, &answer);
        assert!(matches!(
            check(&expected, &lie, &answer, account, 31_337),
            Err(ReceiptError::Claim {
                field: "positions",
                ..
            })
        ));
        let dear = signed(&node, &f, 21, &answer);
        assert!(matches!(
            check(&expected, &dear, &answer, account, 31_337),
            Err(ReceiptError::Claim { field: "price", .. })
        ));
        let mut wide = f.clone();
        wide.end = 30;
        assert!(matches!(
            check(
                &expected,
                &signed(&node, &wide, 20, &answer),
                &answer,
                account,
                31_337
            ),
            Err(ReceiptError::Claim { field: "span", .. })
        ));
        let other_answer = Response::Token {
            token: 10,
            compute_us: 3,
        };
        assert!(matches!(
            check(&expected, &good, &other_answer, account, 31_337),
            Err(ReceiptError::Claim {
                field: "output",
                ..
            })
        ));
        let mut sig = good.clone();
        sig.signature[64] = 0;
        assert_eq!(
            check(&expected, &sig, &answer, account, 31_337),
            Err(ReceiptError::Signature)
        );
    }

    #[test]
    fn usage_prices_each_provider_once_per_price() {
        let node = NodeKey::from_secret([5; 32]).unwrap();
        let a = plexus_ledger::address_of(&node.public()).unwrap();
        let b = Address::repeat_byte(2);
        let f = forward(); // 4 positions x 15 layers = 60 position-layers
        let r = Receipt::for_call(&f, 10, Digest([0; 32]));
        let mut u = Usage::default();
        for _ in 0..10 {
            u.record(a, &r); // 600 position-layers at 10 per 1000: 6 (not 10 x 0)
        }
        let mut v = Usage::default();
        v.record(b, &Receipt::for_call(&f, 1000, Digest([0; 32])));
        v.refused = 2;
        u.merge(&v);
        let costs = u.costs();
        assert_eq!(costs[&a], 6);
        assert_eq!(costs[&b], 60);
        assert_eq!(u.refused, 2);
        assert_eq!(u.providers[&(a, 10)].calls, 10);
    }

    #[test]
    fn a_rejected_call_is_taken_back_once() {
        let a = Address::repeat_byte(3);
        let f = forward(); // 60 position-layers
        let mut u = Usage::default();
        u.record(a, &Receipt::for_call(&f, 1000, Digest([0; 32])));
        u.record(a, &Receipt::for_call(&f, 1000, Digest([0; 32])));
        assert!(!u.unrecord(a, 999, 60), "no call at that price");
        assert!(!u.unrecord(a, 1000, 121), "more work than was recorded");
        assert!(u.unrecord(a, 1000, 60));
        assert_eq!(u.costs()[&a], 60);
        assert!(u.unrecord(a, 1000, 60));
        assert!(u.costs().is_empty());
        assert!(!u.unrecord(a, 1000, 60), "nothing left to take back");
    }
}
