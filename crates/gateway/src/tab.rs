//! A request's running tab: how its charge is split between providers and the gateway
//! ([`split`]), and the cumulative amounts promised to each provider so far ([`Tab`]), raised
//! every few tokens during a stream so a gateway that dies mid-request leaves at most one
//! window of each provider's work without a voucher.
//!
//! ```text
//! every VOUCHER_EVERY tokens ─▶ Tab::checkpoint(tokens so far, costs so far)
//!     ─▶ promises raised (provider, cumulative, nonce) ─▶ signed, recorded, delivered
//! end of the request ─▶ Tab::close(tokens, costs) ─▶ settlement payouts (each >= its promise)
//!     + the promises the settlement raises
//! ```
//!
//! Invariants (checked by the property tests below): a promise never decreases and its nonce
//! always increases; the promises never add up to more than the charge of the tokens sampled
//! at the time (capped at the escrow); the settlement pays every provider at least its latest
//! promise and its payouts add up to the charge (or to the promises, if a failed request is
//! charged less than what was already promised: the work was done and promised).

use plexus_ledger::{Address, Amount, Payout};
use std::collections::BTreeMap;

/// How a request's charge is paid out ([`split`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Split {
    /// One payout per account (providers, then the gateway's fee), amounts summing to the
    /// charge.
    pub payouts: Vec<Payout>,
    /// Metered provider pay the charge could not cover (0 when it could).
    pub shortfall: Amount,
}

/// Splits `charge` between the providers' metered `costs` and the `gateway`'s account (see
/// [`crate::accounts`]): providers in full when the charge covers them, pro rata otherwise;
/// each provider gets at least what it was already `vouched` (topped up, in address order,
/// while the charge lasts); the gateway keeps what is left. The charge is raised to the sum of
/// `vouched` if below it. Payouts of zero are left out.
pub fn split(
    charge: Amount,
    costs: &BTreeMap<Address, Amount>,
    gateway: Address,
    vouched: &BTreeMap<Address, Amount>,
) -> Split {
    let floor: u128 = vouched.values().map(|&v| u128::from(v)).sum();
    let charge = u128::from(charge).max(floor);
    let total: u128 = costs.values().map(|&c| u128::from(c)).sum();
    let mut pay: BTreeMap<Address, u128> =
        vouched.iter().map(|(&a, &v)| (a, u128::from(v))).collect();
    let mut budget = charge - floor;
    for (&account, &c) in costs {
        let share = if total <= charge {
            u128::from(c)
        } else {
            u128::from(c) * charge / total
        };
        let mine = pay.entry(account).or_default();
        let raise = share.saturating_sub(*mine).min(budget);
        *mine += raise;
        budget -= raise;
    }
    // Every unit of the charge not paid to a provider is the gateway's fee.
    *pay.entry(gateway).or_default() += budget;
    Split {
        payouts: pay
            .into_iter()
            .filter(|(_, a)| *a > 0)
            .map(|(provider, amount)| Payout {
                provider,
                amount: amount.min(u128::from(Amount::MAX)) as Amount,
            })
            .collect(),
        shortfall: total.saturating_sub(charge).min(u128::from(Amount::MAX)) as Amount,
    }
}

/// A raised promise to a provider: the voucher to sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promise {
    pub provider: Address,
    /// Everything the provider is owed for the request so far.
    pub cumulative: Amount,
    /// Higher than the provider's previous voucher for the request.
    pub nonce: u64,
}

/// The promises of one request (pure; see the module docs).
#[derive(Clone, Debug)]
pub struct Tab {
    gateway: Address,
    /// Ledger units per completion token.
    price: Amount,
    /// The escrow: no charge exceeds it.
    held: Amount,
    vouched: BTreeMap<Address, Amount>,
    nonce: u64,
}

impl Tab {
    pub fn new(gateway: Address, price: Amount, held: Amount) -> Self {
        Self {
            gateway,
            price,
            held,
            vouched: BTreeMap::new(),
            nonce: 0,
        }
    }

    /// The charge of `tokens` completion tokens, capped at the escrow.
    pub fn charge(&self, tokens: usize) -> Amount {
        (tokens as u128 * u128::from(self.price)).min(u128::from(self.held)) as Amount
    }

    /// The latest promise to each provider.
    pub fn vouched(&self) -> &BTreeMap<Address, Amount> {
        &self.vouched
    }

    /// During the stream: `sampled` tokens sampled so far (the last one may yet end the
    /// completion uncounted, so it is not charged here), `costs` the providers' metered pay so
    /// far; `excluded` providers (convicted by an audit) are promised nothing more. Returns the
    /// promises raised.
    pub fn checkpoint(
        &mut self,
        sampled: usize,
        costs: &BTreeMap<Address, Amount>,
        excluded: &[Address],
    ) -> Vec<Promise> {
        let charge = self.charge(sampled.saturating_sub(1));
        let costs: BTreeMap<Address, Amount> = costs
            .iter()
            .filter(|(a, _)| !excluded.contains(a))
            .map(|(&a, &c)| (a, c))
            .collect();
        let payouts = split(charge, &costs, self.gateway, &self.vouched).payouts;
        self.raise(&payouts)
    }

    /// At the end: the settlement of `tokens` completion tokens with the providers' final
    /// `costs`, and the promises it raises.
    pub fn close(
        &mut self,
        tokens: usize,
        costs: &BTreeMap<Address, Amount>,
    ) -> (Split, Vec<Promise>) {
        let split = split(self.charge(tokens), costs, self.gateway, &self.vouched);
        let raised = self.raise(&split.payouts);
        (split, raised)
    }

    /// Raises the promises of the providers (not the gateway) whose payout exceeds them.
    fn raise(&mut self, payouts: &[Payout]) -> Vec<Promise> {
        let mut out = Vec::new();
        for p in payouts {
            if p.provider == self.gateway {
                continue;
            }
            let v = self.vouched.entry(p.provider).or_default();
            if p.amount > *v {
                *v = p.amount;
                self.nonce += 1;
                out.push(Promise {
                    provider: p.provider,
                    cumulative: p.amount,
                    nonce: self.nonce,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(b: u8) -> Address {
        Address::repeat_byte(b)
    }

    fn none() -> BTreeMap<Address, Amount> {
        BTreeMap::new()
    }

    fn pay(payouts: &[Payout]) -> Vec<(u8, Amount)> {
        payouts
            .iter()
            .map(|p| (p.provider.0[0], p.amount))
            .collect()
    }

    #[test]
    fn providers_are_paid_in_full_and_the_gateway_keeps_the_rest() {
        let costs = BTreeMap::from([(a(1), 30), (a(2), 0), (a(3), 45)]);
        let s = split(100, &costs, a(9), &none());
        assert_eq!(pay(&s.payouts), vec![(1, 30), (3, 45), (9, 25)]);
        assert_eq!(s.shortfall, 0);
        // Exactly covered: no fee payout.
        let s = split(75, &costs, a(9), &none());
        assert_eq!(pay(&s.payouts), vec![(1, 30), (3, 45)]);
        // Nothing metered (the local engine): all to the gateway; nothing charged: nothing.
        assert_eq!(
            pay(&split(10, &none(), a(9), &none()).payouts),
            vec![(9, 10)]
        );
        assert!(split(0, &costs, a(9), &none()).payouts.is_empty());
    }

    #[test]
    fn a_short_charge_is_shared_pro_rata_and_never_exceeded() {
        let costs = BTreeMap::from([(a(1), 100), (a(2), 200)]);
        let s = split(100, &costs, a(9), &none());
        // 33.3 and 66.6 rounded down; the remainder unit to the gateway.
        assert_eq!(pay(&s.payouts), vec![(1, 33), (2, 66), (9, 1)]);
        assert_eq!(s.shortfall, 200);
        // A provider that is also the gateway's account gets one payout.
        let s = split(50, &BTreeMap::from([(a(9), 20)]), a(9), &none());
        assert_eq!(pay(&s.payouts), vec![(9, 50)]);
    }

    #[test]
    fn promises_are_floors_of_the_split() {
        let costs = BTreeMap::from([(a(1), 100), (a(2), 200)]);
        // Provider 1 was promised more than its pro-rata share: it keeps it, provider 2 gets
        // what is left, the gateway nothing.
        let s = split(100, &costs, a(9), &BTreeMap::from([(a(1), 50)]));
        assert_eq!(pay(&s.payouts), vec![(1, 50), (2, 50)]);
        // A charge below the promises (a failed request charged 0) pays the promises.
        let s = split(0, &costs, a(9), &BTreeMap::from([(a(1), 7), (a(3), 5)]));
        assert_eq!(pay(&s.payouts), vec![(1, 7), (3, 5)]);
    }

    #[test]
    fn a_stream_raises_promises_each_window_and_settles_at_least_them() {
        let mut tab = Tab::new(a(9), 10, 1_000);
        // 5 tokens sampled, 4 charged (40): both providers' 10 + 15 covered.
        let p = tab.checkpoint(5, &BTreeMap::from([(a(1), 10), (a(2), 15)]), &[]);
        assert_eq!(
            p,
            vec![
                Promise {
                    provider: a(1),
                    cumulative: 10,
                    nonce: 1
                },
                Promise {
                    provider: a(2),
                    cumulative: 15,
                    nonce: 2
                }
            ]
        );
        // Provider 2 convicted: promised nothing more; provider 1 raised.
        let p = tab.checkpoint(9, &BTreeMap::from([(a(1), 20), (a(2), 30)]), &[a(2)]);
        assert_eq!(
            p,
            vec![Promise {
                provider: a(1),
                cumulative: 20,
                nonce: 3
            }]
        );
        // Unchanged costs: nothing to raise.
        assert!(tab
            .checkpoint(9, &BTreeMap::from([(a(1), 20)]), &[])
            .is_empty());
        // Settled: provider 2's work gone from the costs (convicted), its promise still paid.
        let (s, p) = tab.close(10, &BTreeMap::from([(a(1), 25)]));
        assert_eq!(pay(&s.payouts), vec![(1, 25), (2, 15), (9, 60)]);
        assert_eq!(
            p,
            vec![Promise {
                provider: a(1),
                cumulative: 25,
                nonce: 4
            }]
        );
    }

    #[test]
    fn promises_never_exceed_the_escrow() {
        let mut tab = Tab::new(a(9), 10, 35);
        let p = tab.checkpoint(100, &BTreeMap::from([(a(1), 1_000)]), &[]);
        assert_eq!(p[0].cumulative, 35);
        let (s, p) = tab.close(100, &BTreeMap::from([(a(1), 2_000)]));
        assert_eq!(pay(&s.payouts), vec![(1, 35)]);
        assert!(p.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn payouts_sum_to_the_charge(
            charge in 0u64..1_000_000_000,
            costs in proptest::collection::vec((0u8..6, 0u64..1_000_000_000), 0..6),
        ) {
            let costs: BTreeMap<Address, Amount> = costs.into_iter().map(|(b, c)| (a(b), c)).collect();
            let s = split(charge, &costs, a(200), &none());
            let sum: u64 = s.payouts.iter().map(|p| p.amount).sum();
            proptest::prop_assert_eq!(sum, charge);
            for p in &s.payouts {
                if p.provider != a(200) {
                    proptest::prop_assert!(p.amount <= costs[&p.provider]);
                }
            }
        }

        /// Any stream of checkpoints (costs only growing, as metered work does), then the
        /// close: promises monotone with rising nonces, within the charge at the time, and the
        /// settlement pays each at least its promise and adds up.
        #[test]
        fn promises_only_grow_and_the_settlement_honours_them(
            price in 1u64..50,
            held in 0u64..5_000,
            steps in proptest::collection::vec(
                (1usize..20, proptest::collection::vec((0u8..4, 0u64..200), 0..4), proptest::option::of(0u8..4)),
                0..12,
            ),
            final_tokens in 0usize..300,
            gateway_is_provider in proptest::bool::ANY,
        ) {
            let gateway = if gateway_is_provider { a(0) } else { a(200) };
            let mut tab = Tab::new(gateway, price, held);
            let mut costs: BTreeMap<Address, Amount> = BTreeMap::new();
            let mut sampled = 0;
            let mut last: BTreeMap<Address, (Amount, u64)> = BTreeMap::new();
            let mut excluded = Vec::new();
            for (more, work, convict) in steps {
                sampled += more;
                for (p, w) in work {
                    *costs.entry(a(p)).or_default() += w;
                }
                if let Some(c) = convict {
                    excluded.push(a(c));
                }
                for pr in tab.checkpoint(sampled, &costs, &excluded) {
                    proptest::prop_assert_ne!(pr.provider, gateway);
                    if let Some(&(amount, nonce)) = last.get(&pr.provider) {
                        proptest::prop_assert!(pr.cumulative > amount && pr.nonce > nonce);
                    }
                    last.insert(pr.provider, (pr.cumulative, pr.nonce));
                }
                let promised: u64 = tab.vouched().values().sum();
                proptest::prop_assert!(promised <= tab.charge(sampled.saturating_sub(1)));
            }
            let vouched = tab.vouched().clone();
            let (s, raised) = tab.close(final_tokens, &costs);
            let sum: u64 = s.payouts.iter().map(|p| p.amount).sum();
            let floor: u64 = vouched.values().sum();
            proptest::prop_assert_eq!(sum, tab.charge(final_tokens).max(floor));
            proptest::prop_assert!(sum <= held);
            for (provider, v) in &vouched {
                let paid = s.payouts.iter().find(|p| p.provider == *provider).map_or(0, |p| p.amount);
                proptest::prop_assert!(paid >= *v);
            }
            for pr in raised {
                let paid = s.payouts.iter().find(|p| p.provider == pr.provider).map_or(0, |p| p.amount);
                proptest::prop_assert_eq!(paid, pr.cumulative);
                if let Some(&(amount, nonce)) = last.get(&pr.provider) {
                    proptest::prop_assert!(pr.cumulative > amount && pr.nonce > nonce);
                }
            }
        }
    }
}
