//! The vouchers a provider keeps: a payer's (gateway's) signed, cumulative EIP-712 promise of
//! what this node has earned on one request. The node keeps only the latest per (payer,
//! request) and its operator redeems it on the ledger (`plexus wallet redeem`).
//!
//! ```text
//! gateway settles a request ─▶ signs Voucher(payer, provider, request, cumulative, nonce, expiry)
//!   ─▶ Request::Voucher ─▶ VoucherBook::offer (chain id, expiry, signature = payer, provider =
//!      this node, nonce and amount above the kept one) ─▶ kept, appended to DATA_DIR/vouchers.jsonl
//!   ◀─ Response::VoucherKept { cumulative } | Error { BadRequest, the precise reason }
//! ```
//!
//! The book is a pure state machine (time passed in); [`VoucherLog`] persists it as JSON lines
//! (one accepted voucher a line, the latest line for a request wins), compacted when it holds
//! twice as many lines as kept vouchers. A voucher is written before it is acknowledged.

use plexus_ledger::voucher::SignatureError;
use plexus_ledger::{Address, Amount, RequestId, SignedVoucher, Timestamp};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// Vouchers a book holds at most (valid, unexpired ones; expired ones are dropped first).
pub const MAX_VOUCHERS: usize = 100_000;

/// Why an offered voucher was not kept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OfferError {
    #[error("the voucher is not JSON of a signed voucher: {0}")]
    Malformed(String),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("the voucher pays {provider}, not this node's account {me}")]
    NotForMe { provider: Address, me: Address },
    #[error("replayed voucher: nonce {nonce} of request {request} is the one already kept")]
    Replayed { request: RequestId, nonce: u64 },
    #[error("stale voucher: nonce {nonce}, a voucher with nonce {kept} is already kept")]
    Stale { nonce: u64, kept: u64 },
    #[error("the voucher's cumulative amount {cumulative} is below the kept one's {kept}")]
    BelowKept { cumulative: Amount, kept: Amount },
    #[error("the voucher book is full ({max} unexpired vouchers): redeem and prune first")]
    Full { max: usize },
}

/// The latest voucher per (payer, request) for one provider account.
#[derive(Clone, Debug)]
pub struct VoucherBook {
    me: Address,
    chain_id: u64,
    max: usize,
    kept: BTreeMap<(Address, RequestId), SignedVoucher>,
}

impl VoucherBook {
    /// An empty book of `me`'s vouchers on a ledger with `chain_id`.
    pub fn new(me: Address, chain_id: u64) -> Self {
        Self::with_capacity(me, chain_id, MAX_VOUCHERS)
    }

    pub fn with_capacity(me: Address, chain_id: u64, max: usize) -> Self {
        Self {
            me,
            chain_id,
            max,
            kept: BTreeMap::new(),
        }
    }

    /// Checks `voucher` at `now` (milliseconds) and keeps it if it supersedes what is kept for
    /// its (payer, request). Returns the cumulative amount now held.
    pub fn offer(&mut self, voucher: SignedVoucher, now: Timestamp) -> Result<Amount, OfferError> {
        voucher.verify(self.chain_id, now)?;
        let v = voucher.voucher;
        if v.provider != self.me {
            return Err(OfferError::NotForMe {
                provider: v.provider,
                me: self.me,
            });
        }
        let key = (v.payer, v.request);
        match self.kept.get(&key) {
            Some(k) if k.voucher.nonce == v.nonce => {
                return Err(OfferError::Replayed {
                    request: v.request,
                    nonce: v.nonce,
                })
            }
            Some(k) if v.nonce < k.voucher.nonce => {
                return Err(OfferError::Stale {
                    nonce: v.nonce,
                    kept: k.voucher.nonce,
                })
            }
            Some(k) if v.cumulative < k.voucher.cumulative => {
                return Err(OfferError::BelowKept {
                    cumulative: v.cumulative,
                    kept: k.voucher.cumulative,
                })
            }
            Some(_) => {}
            None => {
                if self.kept.len() >= self.max {
                    self.prune(now);
                }
                if self.kept.len() >= self.max {
                    return Err(OfferError::Full { max: self.max });
                }
            }
        }
        self.kept.insert(key, voucher);
        Ok(v.cumulative)
    }

    /// Drops vouchers that expired before `now`; returns how many.
    pub fn prune(&mut self, now: Timestamp) -> usize {
        let before = self.kept.len();
        let now_s = now / 1000;
        self.kept.retain(|_, v| v.voucher.expiry >= now_s);
        before - self.kept.len()
    }

    /// The kept voucher of `request` (from any payer; the highest amount if several).
    pub fn latest(&self, request: &RequestId) -> Option<&SignedVoucher> {
        self.kept
            .iter()
            .filter(|((_, r), _)| r == request)
            .map(|(_, v)| v)
            .max_by_key(|v| v.voucher.cumulative)
    }

    /// Every kept voucher, by payer then request.
    pub fn iter(&self) -> impl Iterator<Item = &SignedVoucher> {
        self.kept.values()
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// The sum of the kept vouchers' cumulative amounts.
    pub fn total(&self) -> u128 {
        self.kept
            .values()
            .map(|v| u128::from(v.voucher.cumulative))
            .sum()
    }
}

/// Why the voucher file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot use the voucher file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A [`VoucherBook`] persisted as JSON lines at `path` (or kept in memory only).
pub struct VoucherLog {
    path: Option<PathBuf>,
    book: VoucherBook,
    lines: usize,
}

impl VoucherLog {
    /// Reads `path` (missing: an empty book). Lines that do not parse or no longer verify
    /// (expired, another chain) are skipped with a warning: the file is this node's own.
    pub fn open(path: &Path, me: Address, chain_id: u64, now: Timestamp) -> Result<Self, LogError> {
        let io = |source| LogError::Io {
            path: path.to_owned(),
            source,
        };
        let mut book = VoucherBook::new(me, chain_id);
        let mut lines = 0;
        match std::fs::File::open(path) {
            Ok(f) => {
                for line in std::io::BufReader::new(f).lines() {
                    let line = line.map_err(io)?;
                    lines += 1;
                    let parsed = serde_json::from_str::<SignedVoucher>(&line)
                        .map_err(|e| OfferError::Malformed(e.to_string()))
                        .and_then(|v| book.offer(v, now));
                    match parsed {
                        Ok(_) | Err(OfferError::Replayed { .. } | OfferError::Stale { .. }) => {}
                        Err(e) => {
                            tracing::warn!(path = %path.display(), line = lines, "voucher skipped: {e}")
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        Ok(Self {
            path: Some(path.to_owned()),
            book,
            lines,
        })
    }

    /// A book that is never written anywhere (a node without a data directory).
    pub fn in_memory(me: Address, chain_id: u64) -> Self {
        Self {
            path: None,
            book: VoucherBook::new(me, chain_id),
            lines: 0,
        }
    }

    pub fn book(&self) -> &VoucherBook {
        &self.book
    }

    /// Offers voucher bytes (JSON) received from a payer: kept in the book and appended to
    /// the file before the caller acknowledges it.
    pub fn offer_bytes(&mut self, bytes: &[u8], now: Timestamp) -> Result<Amount, OfferError> {
        let v: SignedVoucher =
            serde_json::from_slice(bytes).map_err(|e| OfferError::Malformed(e.to_string()))?;
        let line = serde_json::to_string(&v).map_err(|e| OfferError::Malformed(e.to_string()))?;
        let mut next = self.book.clone();
        let cumulative = next.offer(v, now)?;
        if let Err(e) = self.append(&line) {
            // Not persisted: not kept either, so the payer sees the refusal.
            tracing::error!("{e}");
            return Err(OfferError::Malformed(format!("not stored: {e}")));
        }
        self.book = next;
        if self.lines > 2 * self.book.len() + 64 {
            if let Err(e) = self.compact() {
                tracing::warn!("voucher file not compacted: {e}");
            }
        }
        Ok(cumulative)
    }

    fn append(&mut self, line: &str) -> Result<(), LogError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        writeln!(f, "{line}").map_err(io)?;
        self.lines += 1;
        Ok(())
    }

    /// Rewrites the file with the kept vouchers only (through a renamed temporary file).
    fn compact(&mut self) -> Result<(), LogError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        let tmp = path.with_extension("jsonl.tmp");
        let mut text = String::new();
        for v in self.book.iter() {
            text.push_str(&serde_json::to_string(v).unwrap_or_default());
            text.push('\n');
        }
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        self.lines = self.book.len();
        Ok(())
    }
}

/// The peer whose announced key is `account`'s, among the peers of `directory`.
pub fn peer_of(
    directory: &crate::directory::Directory,
    account: Address,
) -> Option<plexus_net::PeerId> {
    directory.iter().find_map(|(peer, a)| {
        let key = libp2p_identity::PublicKey::try_decode_protobuf(&a.public_key).ok()?;
        (plexus_ledger::address_of(&key)? == account).then_some(*peer)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;
    use plexus_ledger::Voucher;

    const CHAIN: u64 = 31_337;
    const NOW: Timestamp = 1_000_000;

    fn key(b: u8) -> SigningKey {
        SigningKey::from_slice(&[b; 32]).unwrap()
    }

    fn voucher(
        payer: &SigningKey,
        provider: Address,
        cumulative: Amount,
        nonce: u64,
    ) -> SignedVoucher {
        Voucher {
            payer: Address::from_private_key(payer),
            provider,
            request: RequestId([7; 32]),
            cumulative,
            nonce,
            expiry: 2_000,
        }
        .sign(CHAIN, payer)
    }

    #[test]
    fn only_the_latest_valid_voucher_is_kept_and_refusals_are_precise() {
        let me = Address::from_private_key(&key(9));
        let gw = key(1);
        let mut book = VoucherBook::new(me, CHAIN);
        assert_eq!(book.offer(voucher(&gw, me, 100, 1), NOW), Ok(100));
        assert_eq!(
            book.offer(voucher(&gw, me, 100, 1), NOW),
            Err(OfferError::Replayed {
                request: RequestId([7; 32]),
                nonce: 1
            })
        );
        assert_eq!(book.offer(voucher(&gw, me, 250, 3), NOW), Ok(250));
        assert_eq!(
            book.offer(voucher(&gw, me, 400, 2), NOW),
            Err(OfferError::Stale { nonce: 2, kept: 3 })
        );
        assert_eq!(
            book.offer(voucher(&gw, me, 200, 4), NOW),
            Err(OfferError::BelowKept {
                cumulative: 200,
                kept: 250
            })
        );
        let other = Address::repeat_byte(5);
        assert_eq!(
            book.offer(voucher(&gw, other, 300, 5), NOW),
            Err(OfferError::NotForMe {
                provider: other,
                me
            })
        );
        // Forged: the amount changed after signing.
        let mut forged = voucher(&gw, me, 300, 5);
        forged.voucher.cumulative = 3_000;
        assert!(matches!(
            book.offer(forged, NOW),
            Err(OfferError::Signature(SignatureError::Forged { .. }))
        ));
        assert!(matches!(
            book.offer(voucher(&gw, me, 300, 5), 2_001_000),
            Err(OfferError::Signature(SignatureError::Expired { .. }))
        ));
        let mut wrong = VoucherBook::new(me, 1);
        assert!(matches!(
            wrong.offer(voucher(&gw, me, 300, 5), NOW),
            Err(OfferError::Signature(SignatureError::WrongChain { .. }))
        ));
        assert_eq!(book.len(), 1);
        assert_eq!(
            book.latest(&RequestId([7; 32])).unwrap().voucher.cumulative,
            250
        );
        // Another payer's voucher on the same request id is its own entry.
        assert_eq!(book.offer(voucher(&key(2), me, 5, 1), NOW), Ok(5));
        assert_eq!(book.total(), 255);
        assert_eq!(book.prune(2_001_000), 2);
    }

    #[test]
    fn a_full_book_drops_expired_vouchers_before_refusing() {
        let me = Address::from_private_key(&key(9));
        let mut book = VoucherBook::with_capacity(me, CHAIN, 1);
        book.offer(voucher(&key(1), me, 1, 1), NOW).unwrap();
        assert_eq!(
            book.offer(voucher(&key(2), me, 1, 1), NOW),
            Err(OfferError::Full { max: 1 })
        );
        let mut late = voucher(&key(2), me, 1, 1).voucher;
        late.expiry = 5_000;
        let late = late.sign(CHAIN, &key(2));
        assert_eq!(book.offer(late, 3_000_000), Ok(1));
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn the_log_survives_reopening_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vouchers.jsonl");
        let me = Address::from_private_key(&key(9));
        let gw = key(1);
        let mut log = VoucherLog::open(&path, me, CHAIN, NOW).unwrap();
        for n in 1..=100u64 {
            let v = serde_json::to_vec(&voucher(&gw, me, n * 10, n)).unwrap();
            assert_eq!(log.offer_bytes(&v, NOW), Ok(n * 10));
        }
        assert!(matches!(
            log.offer_bytes(b"{not json", NOW),
            Err(OfferError::Malformed(_))
        ));
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 100, "compacted: {lines} lines");
        let back = VoucherLog::open(&path, me, CHAIN, NOW).unwrap();
        assert_eq!(back.book().len(), 1);
        assert_eq!(back.book().total(), 1000);
    }
}
