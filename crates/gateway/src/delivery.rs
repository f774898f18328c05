//! The order vouchers leave the gateway in ([`crate::payments`]): at most `concurrency`
//! deliveries at once, one at a time per (provider, request) so a node sees a request's
//! vouchers in nonce order, and a voucher still waiting when a later one for the same provider
//! and request arrives is replaced by it (the later one supersedes it on the node anyway).
//! Pure: no I/O, the caller starts the deliveries it is handed.

use plexus_ledger::{Address, RequestId, SignedVoucher};
use std::collections::{HashMap, HashSet, VecDeque};

/// A provider and a request: its vouchers go out one at a time, in nonce order.
pub type Key = (Address, RequestId);

/// What became of an offered voucher.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Deliver it now.
    Start(SignedVoucher),
    /// It waits for a free slot or for its key's delivery in flight.
    Waiting,
    /// A voucher for the same key was waiting: the one with the higher nonce waits on.
    Superseded,
    /// `capacity` keys wait already: dropped.
    Dropped,
}

/// The delivery schedule (see the module docs).
#[derive(Debug)]
pub struct Schedule {
    concurrency: usize,
    capacity: usize,
    /// The latest voucher waiting per key (at most `capacity`).
    pending: HashMap<Key, SignedVoucher>,
    /// Keys in the order their vouchers arrived (entries whose voucher left are skipped).
    order: VecDeque<Key>,
    /// Keys with a delivery in flight (at most `concurrency`).
    inflight: HashSet<Key>,
}

pub fn key(v: &SignedVoucher) -> Key {
    (v.voucher.provider, v.voucher.request)
}

impl Schedule {
    pub fn new(concurrency: usize, capacity: usize) -> Self {
        Self {
            concurrency: concurrency.max(1),
            capacity,
            pending: HashMap::new(),
            order: VecDeque::new(),
            inflight: HashSet::new(),
        }
    }

    pub fn offer(&mut self, v: SignedVoucher) -> Offer {
        let key = key(&v);
        if let Some(waiting) = self.pending.get_mut(&key) {
            if waiting.voucher.nonce < v.voucher.nonce {
                *waiting = v;
            }
            return Offer::Superseded;
        }
        if !self.inflight.contains(&key) && self.inflight.len() < self.concurrency {
            self.inflight.insert(key);
            return Offer::Start(v);
        }
        if self.pending.len() >= self.capacity {
            return Offer::Dropped;
        }
        self.pending.insert(key, v);
        self.order.push_back(key);
        Offer::Waiting
    }

    /// The delivery of `key` ended (delivered, refused or failed): the vouchers to deliver now.
    pub fn finished(&mut self, key: Key) -> Vec<SignedVoucher> {
        let mut out = Vec::new();
        self.inflight.remove(&key);
        // The same key's next voucher first: it waited for this one.
        if let Some(v) = self.pending.remove(&key) {
            self.inflight.insert(key);
            out.push(v);
        }
        while self.inflight.len() < self.concurrency {
            let Some(next) = self.order.pop_front() else {
                break;
            };
            // A key in flight starts its waiting voucher when it finishes (above).
            if self.inflight.contains(&next) {
                continue;
            }
            if let Some(v) = self.pending.remove(&next) {
                self.inflight.insert(next);
                out.push(v);
            }
        }
        if self.order.len() > 2 * self.capacity {
            let pending = &self.pending;
            self.order.retain(|k| pending.contains_key(k));
        }
        out
    }

    /// Deliveries in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Vouchers waiting.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_ledger::Voucher;

    fn v(provider: u8, request: u8, nonce: u64) -> SignedVoucher {
        let key = k256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
        Voucher {
            payer: Address::from_private_key(&key),
            provider: Address::repeat_byte(provider),
            request: RequestId([request; 32]),
            cumulative: nonce * 10,
            nonce,
            expiry: 2_000_000_000,
        }
        .sign(1, &key)
    }

    #[test]
    fn one_delivery_at_a_time_per_key_in_nonce_order_and_waiting_ones_superseded() {
        let mut s = Schedule::new(8, 100);
        assert_eq!(s.offer(v(1, 1, 1)), Offer::Start(v(1, 1, 1)));
        // Another provider goes at once; the same key waits for the one in flight.
        assert_eq!(s.offer(v(2, 1, 2)), Offer::Start(v(2, 1, 2)));
        assert_eq!(s.offer(v(1, 1, 3)), Offer::Waiting);
        assert_eq!(s.offer(v(1, 1, 4)), Offer::Superseded);
        // A late lower nonce does not replace the waiting one.
        assert_eq!(s.offer(v(1, 1, 2)), Offer::Superseded);
        assert_eq!(s.finished(key(&v(2, 1, 2))), vec![]);
        assert_eq!(s.finished(key(&v(1, 1, 1))), vec![v(1, 1, 4)]);
        assert_eq!(s.finished(key(&v(1, 1, 4))), vec![]);
        assert_eq!((s.inflight(), s.waiting()), (0, 0));
    }

    #[test]
    fn concurrency_and_capacity_bound_it() {
        let mut s = Schedule::new(2, 2);
        assert!(matches!(s.offer(v(1, 1, 1)), Offer::Start(_)));
        assert!(matches!(s.offer(v(2, 1, 1)), Offer::Start(_)));
        assert_eq!(s.offer(v(3, 1, 1)), Offer::Waiting);
        assert_eq!(s.offer(v(4, 1, 1)), Offer::Waiting);
        assert_eq!(s.offer(v(5, 1, 1)), Offer::Dropped);
        // A freed slot goes to the first waiting key.
        assert_eq!(s.finished(key(&v(1, 1, 1))), vec![v(3, 1, 1)]);
        assert_eq!(s.finished(key(&v(2, 1, 1))), vec![v(4, 1, 1)]);
        assert_eq!(s.finished(key(&v(3, 1, 1))), vec![]);
        assert_eq!(s.finished(key(&v(4, 1, 1))), vec![]);
        assert_eq!((s.inflight(), s.waiting()), (0, 0));
    }

    type Checked = Result<(), proptest::test_runner::TestCaseError>;

    /// A delivery started: never two of a key at once, its nonce above the key's last one,
    /// at most 2 (the test's concurrency) in flight.
    fn start(
        v: SignedVoucher,
        flying: &mut Vec<SignedVoucher>,
        last: &mut HashMap<Key, u64>,
    ) -> Checked {
        proptest::prop_assert!(flying.iter().all(|f| key(f) != key(&v)));
        if let Some(&n) = last.get(&key(&v)) {
            proptest::prop_assert!(v.voucher.nonce > n);
        }
        last.insert(key(&v), v.voucher.nonce);
        flying.push(v);
        proptest::prop_assert!(flying.len() <= 2);
        Ok(())
    }

    proptest::proptest! {
        /// Any interleaving of offers and finishes: never more than `concurrency` in flight,
        /// never two of a key at once, a key's deliveries in rising nonce order, and nothing
        /// left behind once everything finished (every key's highest nonce delivered).
        #[test]
        fn never_two_of_a_key_at_once_and_nonces_rise(
            steps in proptest::collection::vec((0u8..4, proptest::bool::ANY), 1..80),
        ) {
            let mut s = Schedule::new(2, 1_000);
            let mut nonce = 0u64;
            let mut flying: Vec<SignedVoucher> = Vec::new();
            let mut last: HashMap<Key, u64> = HashMap::new();
            let mut highest: HashMap<Key, u64> = HashMap::new();
            for (provider, offer) in steps {
                if offer || flying.is_empty() {
                    nonce += 1;
                    let voucher = v(provider, 1, nonce);
                    highest.insert(key(&voucher), nonce);
                    if let Offer::Start(x) = s.offer(voucher) {
                        start(x, &mut flying, &mut last)?;
                    }
                } else {
                    let done = flying.remove(0);
                    for x in s.finished(key(&done)) {
                        start(x, &mut flying, &mut last)?;
                    }
                }
            }
            while let Some(done) = (!flying.is_empty()).then(|| flying.remove(0)) {
                for x in s.finished(key(&done)) {
                    start(x, &mut flying, &mut last)?;
                }
            }
            proptest::prop_assert_eq!(last, highest);
        }
    }
}
