//! The ledger state machine: balances per bucket, open escrows, settled requests, unbonding
//! tranches, locked earnings and challenges, the journal head. Every operation validates fully
//! before it changes anything, so a refused operation leaves the ledger as it was; a successful
//! one returns the journal entry that records it (the caller persists it).

use crate::config::{Config, BPS};
use crate::error::*;
use crate::journal::{check_link, Entry, GENESIS};
use crate::op::{Op, Payout};
use crate::types::{Address, Amount, Bucket, Posting, RequestId, Timestamp, MAX_AMOUNT};
use crate::voucher::SignedVoucher;
use plexus_core::Digest;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// An open escrow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    pub client: Address,
    /// Whose vouchers spend this escrow.
    pub gateway: Address,
    /// The amount held when it opened.
    pub held: Amount,
    pub opened_at: Timestamp,
    /// Per provider: cumulative amount and nonce of the latest redeemed voucher.
    pub redeemed: BTreeMap<Address, (Amount, u64)>,
}

impl Escrow {
    fn redeemed_total(&self) -> u128 {
        self.redeemed.values().map(|(a, _)| u128::from(*a)).sum()
    }
}

/// A closed escrow: what was paid and refunded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub client: Address,
    /// The payouts the settle named (as given).
    pub payouts: Vec<Payout>,
    /// Everything providers received (vouchers and settlement).
    pub paid: Amount,
    pub refunded: Amount,
    pub settled_at: Timestamp,
}

/// A provider's earnings for one request, locked until `unlock_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Earning {
    pub amount: Amount,
    pub unlock_at: Timestamp,
    pub challenger: Option<Address>,
}

/// Stake unbonding until `release_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tranche {
    pub amount: Amount,
    pub release_at: Timestamp,
}

/// An account's funds by bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountView {
    pub available: Amount,
    pub staked: Amount,
    pub unbonding: Amount,
    pub locked: Amount,
    /// Held in open escrows where this account is the client.
    pub escrow: Amount,
    /// Paid to providers from this account's settled requests, ever.
    pub spent: Amount,
}

/// The ledger.
#[derive(Clone, Debug)]
pub struct Ledger {
    config: Config,
    balances: BTreeMap<Bucket, Amount>,
    /// Deposited and not withdrawn: minus the balance of [`Bucket::World`].
    issued: Amount,
    escrows: BTreeMap<RequestId, Escrow>,
    settled: BTreeMap<RequestId, Settlement>,
    unbonding: BTreeMap<(Address, u64), Tranche>,
    locked: BTreeMap<(Address, RequestId), Earning>,
    /// Per client: paid to providers over all settled requests.
    spent: BTreeMap<Address, Amount>,
    /// Offenders already slashed for a request: one verdict slashes once, however many
    /// challengers bring it (every honest auditor of a training round does).
    slashed: BTreeSet<(Address, RequestId)>,
    next_seq: u64,
    head: Digest,
}

fn bad(what: impl Into<String>) -> InvariantError {
    InvariantError(what.into())
}

impl Ledger {
    /// An empty ledger under `config` (validate the config first).
    pub fn new(config: Config) -> Self {
        Self {
            config,
            balances: BTreeMap::new(),
            issued: 0,
            escrows: BTreeMap::new(),
            settled: BTreeMap::new(),
            unbonding: BTreeMap::new(),
            locked: BTreeMap::new(),
            spent: BTreeMap::new(),
            slashed: BTreeSet::new(),
            next_seq: 0,
            head: GENESIS,
        }
    }

    /// Rebuilds a ledger from its journal, checking the hash chain and re-executing every
    /// operation: each entry's postings must be exactly what the rules produce.
    pub fn replay<'a>(
        config: Config,
        entries: impl IntoIterator<Item = &'a Entry>,
    ) -> Result<Self, ReplayError> {
        let mut ledger = Self::new(config);
        for e in entries {
            ledger.apply_recorded(e)?;
        }
        Ok(ledger)
    }

    /// Re-executes one recorded entry on top of this ledger (the next one in its journal).
    pub fn apply_recorded(&mut self, e: &Entry) -> Result<(), ReplayError> {
        check_link(self.next_seq, &self.head, e)?;
        let redone = self
            .execute(e.op.clone(), e.time)
            .map_err(|source| ReplayError::Refused { seq: e.seq, source })?
            .ok_or(ReplayError::Noop { seq: e.seq })?;
        if redone != *e {
            return Err(ReplayError::Diverged { seq: e.seq });
        }
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The sequence number the next entry gets (= the number of entries so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The hash of the last entry (or [`GENESIS`]).
    pub fn head(&self) -> Digest {
        self.head
    }

    /// The balance of a bucket; [`Bucket::World`] reads as 0 (see [`Ledger::issued`]).
    pub fn balance(&self, bucket: Bucket) -> Amount {
        self.balances.get(&bucket).copied().unwrap_or(0)
    }

    /// All non-zero balances, signed, [`Bucket::World`] included (as minus the supply): the
    /// form [`crate::journal::derive_balances`] returns.
    pub fn balances(&self) -> BTreeMap<Bucket, i128> {
        let mut out: BTreeMap<Bucket, i128> = self
            .balances
            .iter()
            .map(|(b, a)| (*b, i128::from(*a)))
            .collect();
        if self.issued > 0 {
            out.insert(Bucket::World, -i128::from(self.issued));
        }
        out
    }

    /// The total supply: everything deposited and not withdrawn.
    pub fn issued(&self) -> Amount {
        self.issued
    }

    pub fn escrow(&self, request: &RequestId) -> Option<&Escrow> {
        self.escrows.get(request)
    }

    pub fn open_escrows(&self) -> impl Iterator<Item = (&RequestId, &Escrow)> {
        self.escrows.iter()
    }

    pub fn settlement(&self, request: &RequestId) -> Option<&Settlement> {
        self.settled.get(request)
    }

    /// An account's locked earnings, per request.
    pub fn earnings(&self, account: Address) -> impl Iterator<Item = (&RequestId, &Earning)> {
        self.locked
            .range((account, RequestId([0; 32]))..=(account, RequestId([0xff; 32])))
            .map(|((_, r), e)| (r, e))
    }

    /// An account's unbonding tranches.
    pub fn tranches(&self, account: Address) -> impl Iterator<Item = &Tranche> {
        self.unbonding
            .range((account, 0)..=(account, u64::MAX))
            .map(|(_, t)| t)
    }

    /// Every account that holds or held funds (a bucket with a balance, or past spending),
    /// in address order.
    pub fn accounts(&self) -> Vec<Address> {
        let mut out: Vec<Address> = self
            .balances
            .keys()
            .filter_map(|b| match b {
                Bucket::Available(a)
                | Bucket::Staked(a)
                | Bucket::Unbonding(a)
                | Bucket::Locked(a) => Some(*a),
                _ => None,
            })
            .chain(self.spent.keys().copied())
            .chain(self.escrows.values().map(|e| e.client))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// An account's funds by bucket.
    pub fn account(&self, account: Address) -> AccountView {
        AccountView {
            available: self.balance(Bucket::Available(account)),
            staked: self.balance(Bucket::Staked(account)),
            unbonding: self.balance(Bucket::Unbonding(account)),
            locked: self.balance(Bucket::Locked(account)),
            escrow: self
                .escrows
                .iter()
                .filter(|(_, e)| e.client == account)
                .map(|(r, _)| self.balance(Bucket::Escrow(*r)))
                .sum(),
            spent: self.spent.get(&account).copied().unwrap_or(0),
        }
    }

    /// Executes any operation. `Ok(None)` only for a settle of an already-settled request with
    /// the same payouts (idempotent: nothing changes, nothing is journaled).
    pub fn execute(&mut self, op: Op, now: Timestamp) -> Result<Option<Entry>, OpError> {
        Ok(Some(match op {
            Op::Deposit { account, amount } => self.deposit(account, amount, now)?,
            Op::Faucet { account, amount } => self.faucet(account, amount, now)?,
            Op::Withdraw { account, amount } => self.withdraw(account, amount, now)?,
            Op::Stake { account, amount } => self.stake(account, amount, now)?,
            Op::Unbond { account, amount } => self.unbond(account, amount, now)?,
            Op::Claim { account } => self.claim(account, now)?,
            Op::OpenEscrow {
                request,
                client,
                gateway,
                amount,
            } => self.open_escrow(request, client, gateway, amount, now)?,
            Op::Redeem { request, voucher } => self.redeem(request, voucher, now)?,
            Op::Settle { request, payouts } => return Ok(self.settle(request, payouts, now)?),
            Op::Challenge {
                request,
                provider,
                challenger,
            } => self.challenge(request, provider, challenger, now)?,
            Op::Dismiss { request, provider } => self.dismiss(request, provider, now)?,
            Op::Slash {
                offender,
                amount,
                challenger,
                request,
            } => self.slash(offender, amount, challenger, request, now)?,
        }))
    }

    fn need(&self, bucket: Bucket, needed: Amount) -> Result<(), Insufficient> {
        let available = self.balance(bucket);
        if available < needed {
            return Err(Insufficient {
                bucket,
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Applies postings (all checked before any is applied) and appends the entry.
    fn record(
        &mut self,
        op: Op,
        postings: Vec<Posting>,
        now: Timestamp,
    ) -> Result<Entry, InvariantError> {
        // Net effect per bucket, checked against current balances first.
        let mut net: BTreeMap<Bucket, i128> = BTreeMap::new();
        for p in &postings {
            if p.amount == 0 || p.from == p.to {
                return Err(bad(format!("degenerate posting {p:?}")));
            }
            *net.entry(p.from).or_default() -= i128::from(p.amount);
            *net.entry(p.to).or_default() += i128::from(p.amount);
        }
        let mut updates = Vec::with_capacity(net.len());
        let mut issued = i128::from(self.issued);
        for (bucket, delta) in net {
            if bucket == Bucket::World {
                issued -= delta;
                continue;
            }
            let after = i128::from(self.balance(bucket)) + delta;
            if !(0..=i128::from(MAX_AMOUNT)).contains(&after) {
                return Err(bad(format!("{bucket} would hold {after}")));
            }
            updates.push((bucket, after as Amount));
        }
        if !(0..=i128::from(MAX_AMOUNT)).contains(&issued) {
            return Err(bad(format!("the supply would be {issued}")));
        }
        self.issued = issued as Amount;
        for (bucket, after) in updates {
            if after == 0 {
                self.balances.remove(&bucket);
            } else {
                self.balances.insert(bucket, after);
            }
        }
        let seq = self.next_seq;
        let hash = Entry::compute_hash(seq, now, &op, &postings, &self.head);
        let entry = Entry {
            seq,
            time: now,
            op,
            postings,
            prev: self.head,
            hash,
        };
        self.next_seq += 1;
        self.head = hash;
        Ok(entry)
    }

    fn credit(
        &mut self,
        op: Op,
        account: Address,
        amount: Amount,
        now: Timestamp,
    ) -> Result<Entry, DepositError> {
        if amount == 0 {
            return Err(DepositError::Zero);
        }
        if u128::from(self.issued) + u128::from(amount) > u128::from(MAX_AMOUNT) {
            return Err(DepositError::SupplyOverflow {
                amount,
                max: MAX_AMOUNT - self.issued,
            });
        }
        let p = Posting {
            from: Bucket::World,
            to: Bucket::Available(account),
            amount,
        };
        Ok(self.record(op, vec![p], now)?)
    }

    /// Funds from outside into `account`'s available balance.
    pub fn deposit(
        &mut self,
        account: Address,
        amount: Amount,
        now: Timestamp,
    ) -> Result<Entry, DepositError> {
        self.credit(Op::Deposit { account, amount }, account, amount, now)
    }

    /// Free local-mode funds, at most [`Config::faucet_max`] at a time.
    pub fn faucet(
        &mut self,
        account: Address,
        amount: Amount,
        now: Timestamp,
    ) -> Result<Entry, DepositError> {
        let max = self.config.faucet_max;
        if max == 0 {
            return Err(DepositError::FaucetOff);
        }
        if amount > max {
            return Err(DepositError::OverFaucetLimit { asked: amount, max });
        }
        self.credit(Op::Faucet { account, amount }, account, amount, now)
    }

    fn transfer(
        &mut self,
        op: Op,
        from: Bucket,
        to: Bucket,
        amount: Amount,
        now: Timestamp,
    ) -> Result<Entry, MoveError> {
        if amount == 0 {
            return Err(MoveError::Zero);
        }
        self.need(from, amount)?;
        Ok(self.record(op, vec![Posting { from, to, amount }], now)?)
    }

    /// Available funds leaving the ledger.
    pub fn withdraw(
        &mut self,
        account: Address,
        amount: Amount,
        now: Timestamp,
    ) -> Result<Entry, MoveError> {
        let op = Op::Withdraw { account, amount };
        self.transfer(op, Bucket::Available(account), Bucket::World, amount, now)
    }

    /// Available funds bonded as stake.
    pub fn stake(
        &mut self,
        account: Address,
        amount: Amount,
        now: Timestamp,
    ) -> Result<Entry, MoveError> {
        let op = Op::Stake { account, amount };
        self.transfer(
            op,
            Bucket::Available(account),
            Bucket::Staked(account),
            amount,
            now,
        )
    }

    /// Stake entering its unbonding period (slashable until `now + unbonding_period`).
    pub fn unbond(
        &mut self,
        account: Address,
        amount: Amount,
        now: Timestamp,
    ) -> Result<Entry, MoveError> {
        let op = Op::Unbond { account, amount };
        let id = self.next_seq;
        let entry = self.transfer(
            op,
            Bucket::Staked(account),
            Bucket::Unbonding(account),
            amount,
            now,
        )?;
        let release_at = now.saturating_add(self.config.unbonding_period_ms);
        self.unbonding
            .insert((account, id), Tranche { amount, release_at });
        Ok(entry)
    }

    /// Matured, unchallenged earnings and matured unbonded stake made available.
    pub fn claim(&mut self, account: Address, now: Timestamp) -> Result<Entry, ClaimError> {
        let earnings: Vec<(RequestId, Amount)> = self
            .earnings(account)
            .filter(|(_, e)| e.unlock_at <= now && e.challenger.is_none())
            .map(|(r, e)| (*r, e.amount))
            .collect();
        let tranches: Vec<(u64, Amount)> = self
            .unbonding
            .range((account, 0)..=(account, u64::MAX))
            .filter(|(_, t)| t.release_at <= now)
            .map(|((_, id), t)| (*id, t.amount))
            .collect();
        let earned: Amount = earnings.iter().map(|(_, a)| *a).sum();
        let unbonded: Amount = tranches.iter().map(|(_, a)| *a).sum();
        if earned == 0 && unbonded == 0 {
            let next = self
                .earnings(account)
                .filter(|(_, e)| e.challenger.is_none())
                .map(|(_, e)| e.unlock_at)
                .chain(self.tranches(account).map(|t| t.release_at))
                .min();
            return Err(ClaimError::NothingClaimable { account, now, next });
        }
        let available = Bucket::Available(account);
        let mut postings = Vec::new();
        if earned > 0 {
            postings.push(Posting {
                from: Bucket::Locked(account),
                to: available,
                amount: earned,
            });
        }
        if unbonded > 0 {
            postings.push(Posting {
                from: Bucket::Unbonding(account),
                to: available,
                amount: unbonded,
            });
        }
        let entry = self.record(Op::Claim { account }, postings, now)?;
        for (r, _) in earnings {
            self.locked.remove(&(account, r));
        }
        for (id, _) in tranches {
            self.unbonding.remove(&(account, id));
        }
        Ok(entry)
    }

    /// Holds `amount` of `client`'s available funds for `request`; `gateway` signs its vouchers.
    pub fn open_escrow(
        &mut self,
        request: RequestId,
        client: Address,
        gateway: Address,
        amount: Amount,
        now: Timestamp,
    ) -> Result<Entry, EscrowError> {
        if amount == 0 {
            return Err(EscrowError::Zero);
        }
        if self.escrows.contains_key(&request) || self.settled.contains_key(&request) {
            return Err(EscrowError::Duplicate { request });
        }
        self.need(Bucket::Available(client), amount)?;
        let op = Op::OpenEscrow {
            request,
            client,
            gateway,
            amount,
        };
        let p = Posting {
            from: Bucket::Available(client),
            to: Bucket::Escrow(request),
            amount,
        };
        let entry = self.record(op, vec![p], now)?;
        self.escrows.insert(
            request,
            Escrow {
                client,
                gateway,
                held: amount,
                opened_at: now,
                redeemed: BTreeMap::new(),
            },
        );
        Ok(entry)
    }

    fn lock_earning(
        &mut self,
        provider: Address,
        request: RequestId,
        amount: Amount,
        now: Timestamp,
    ) {
        let unlock_at = now.saturating_add(self.config.challenge_window_ms);
        let e = self.locked.entry((provider, request)).or_insert(Earning {
            amount: 0,
            unlock_at,
            challenger: None,
        });
        e.amount += amount;
        e.unlock_at = e.unlock_at.max(unlock_at);
    }

    /// A provider redeems the latest cumulative voucher for `request`: what it adds over the last
    /// redeemed one moves from the escrow into the provider's locked earnings.
    pub fn redeem(
        &mut self,
        request: RequestId,
        voucher: SignedVoucher,
        now: Timestamp,
    ) -> Result<Entry, RedeemError> {
        voucher.verify(self.config.chain_id, now)?;
        let v = voucher.voucher;
        if v.request != request {
            return Err(RedeemError::ForAnotherRequest {
                request,
                voucher: v.request,
            });
        }
        if let Some(done) = self.settled.get(&request) {
            let paid = done
                .payouts
                .iter()
                .find(|p| p.provider == v.provider)
                .map_or(0, |p| p.amount);
            return Err(RedeemError::Settled {
                request,
                provider: v.provider,
                paid,
                cumulative: v.cumulative,
            });
        }
        let escrow = self
            .escrows
            .get(&request)
            .ok_or(RedeemError::NotOpen { request })?;
        if v.payer != escrow.gateway {
            return Err(RedeemError::WrongPayer {
                request,
                payer: v.payer,
                gateway: escrow.gateway,
            });
        }
        let (redeemed, last_nonce) = escrow.redeemed.get(&v.provider).copied().unwrap_or((0, 0));
        if escrow.redeemed.contains_key(&v.provider) {
            if v.nonce == last_nonce {
                return Err(RedeemError::Replayed {
                    request,
                    provider: v.provider,
                    nonce: v.nonce,
                });
            }
            if v.nonce < last_nonce {
                return Err(RedeemError::Stale {
                    nonce: v.nonce,
                    redeemed: last_nonce,
                });
            }
        }
        if v.cumulative < redeemed {
            return Err(RedeemError::BelowRedeemed {
                cumulative: v.cumulative,
                redeemed,
            });
        }
        if v.cumulative == redeemed {
            return Err(RedeemError::NothingNew {
                cumulative: v.cumulative,
            });
        }
        let asked = escrow.redeemed_total() - u128::from(redeemed) + u128::from(v.cumulative);
        if asked > u128::from(escrow.held) {
            return Err(RedeemError::ExceedsEscrow {
                request,
                held: escrow.held,
                asked,
            });
        }
        let amount = v.cumulative - redeemed;
        let p = Posting {
            from: Bucket::Escrow(request),
            to: Bucket::Locked(v.provider),
            amount,
        };
        let entry = self.record(Op::Redeem { request, voucher }, vec![p], now)?;
        if let Some(e) = self.escrows.get_mut(&request) {
            e.redeemed.insert(v.provider, (v.cumulative, v.nonce));
        }
        self.lock_earning(v.provider, request, amount, now);
        Ok(entry)
    }

    /// Closes `request`'s escrow: each named provider is paid up to its payout (never less than
    /// its redeemed vouchers), the rest goes back to the client. Idempotent: settling a settled
    /// request again with the same payouts returns `Ok(None)` and changes nothing.
    pub fn settle(
        &mut self,
        request: RequestId,
        payouts: Vec<Payout>,
        now: Timestamp,
    ) -> Result<Option<Entry>, SettleError> {
        if let Some(done) = self.settled.get(&request) {
            return if done.payouts == payouts {
                Ok(None)
            } else {
                Err(SettleError::Conflict { request })
            };
        }
        let escrow = self
            .escrows
            .get(&request)
            .ok_or(SettleError::Unknown { request })?;
        let mut seen = std::collections::BTreeSet::new();
        let mut extra: Vec<(Address, Amount)> = Vec::new();
        for p in &payouts {
            if !seen.insert(p.provider) {
                return Err(SettleError::DuplicateProvider {
                    request,
                    provider: p.provider,
                });
            }
            let redeemed = escrow.redeemed.get(&p.provider).map_or(0, |(a, _)| *a);
            if p.amount > redeemed {
                extra.push((p.provider, p.amount - redeemed));
            }
        }
        let extra_total: u128 = extra.iter().map(|(_, a)| u128::from(*a)).sum();
        let asked = escrow.redeemed_total() + extra_total;
        if asked > u128::from(escrow.held) {
            return Err(SettleError::ExceedsEscrow {
                request,
                held: escrow.held,
                asked,
            });
        }
        let paid = asked as Amount;
        let refunded = escrow.held - paid;
        let client = escrow.client;
        let from = Bucket::Escrow(request);
        let mut postings: Vec<Posting> = extra
            .iter()
            .map(|(provider, amount)| Posting {
                from,
                to: Bucket::Locked(*provider),
                amount: *amount,
            })
            .collect();
        if refunded > 0 {
            postings.push(Posting {
                from,
                to: Bucket::Available(client),
                amount: refunded,
            });
        }
        let op = Op::Settle {
            request,
            payouts: payouts.clone(),
        };
        let entry = self.record(op, postings, now)?;
        for (provider, amount) in extra {
            self.lock_earning(provider, request, amount, now);
        }
        self.escrows.remove(&request);
        let spent = self.spent.entry(client).or_default();
        *spent = spent.saturating_add(paid);
        self.settled.insert(
            request,
            Settlement {
                client,
                payouts,
                paid,
                refunded,
                settled_at: now,
            },
        );
        Ok(Some(entry))
    }

    /// Disputes `provider`'s locked earnings for `request` while the challenge window is open;
    /// they stay locked (past the window) until [`Ledger::dismiss`] or [`Ledger::slash`].
    pub fn challenge(
        &mut self,
        request: RequestId,
        provider: Address,
        challenger: Address,
        now: Timestamp,
    ) -> Result<Entry, ChallengeError> {
        let e = self
            .locked
            .get(&(provider, request))
            .ok_or(ChallengeError::NoEarnings { request, provider })?;
        if e.challenger.is_some() {
            return Err(ChallengeError::AlreadyChallenged { request, provider });
        }
        if now >= e.unlock_at {
            return Err(ChallengeError::WindowClosed {
                request,
                closed_at: e.unlock_at,
                now,
            });
        }
        let op = Op::Challenge {
            request,
            provider,
            challenger,
        };
        let entry = self
            .record(op, Vec::new(), now)
            .map_err(|_| ChallengeError::NoEarnings { request, provider })?;
        if let Some(e) = self.locked.get_mut(&(provider, request)) {
            e.challenger = Some(challenger);
        }
        Ok(entry)
    }

    /// Ends a challenge without a slash: the earnings mature as if never challenged.
    pub fn dismiss(
        &mut self,
        request: RequestId,
        provider: Address,
        now: Timestamp,
    ) -> Result<Entry, ChallengeError> {
        match self.locked.get(&(provider, request)) {
            None => return Err(ChallengeError::NoEarnings { request, provider }),
            Some(e) if e.challenger.is_none() => {
                return Err(ChallengeError::NotChallenged { request, provider })
            }
            Some(_) => {}
        }
        let entry = self
            .record(Op::Dismiss { request, provider }, Vec::new(), now)
            .map_err(|_| ChallengeError::NoEarnings { request, provider })?;
        if let Some(e) = self.locked.get_mut(&(provider, request)) {
            e.challenger = None;
        }
        Ok(entry)
    }

    /// Takes up to `amount` from `offender`: stake first, then unbonding tranches (latest
    /// release first), then locked earnings (`request`'s first, then latest unlock first). Of
    /// what is taken, [`Config::challenger_bps`] goes to `challenger`, [`Config::refund_bps`] to
    /// the client of `request` (when it names one this ledger knows), the rest to the treasury.
    /// A challenge on `request`'s earnings ends with the slash. An offender is slashed at most
    /// once per request: a second slash for the same one is refused.
    pub fn slash(
        &mut self,
        offender: Address,
        amount: Amount,
        challenger: Address,
        request: Option<RequestId>,
        now: Timestamp,
    ) -> Result<Entry, SlashError> {
        if amount == 0 {
            return Err(SlashError::Zero);
        }
        if let Some(r) = request {
            if self.slashed.contains(&(offender, r)) {
                return Err(SlashError::AlreadySlashed {
                    offender,
                    request: r,
                });
            }
        }
        let mut left = amount;
        let from_stake = self.balance(Bucket::Staked(offender)).min(left);
        left -= from_stake;
        let mut tranches: Vec<(u64, Amount, Timestamp)> = self
            .unbonding
            .range((offender, 0)..=(offender, u64::MAX))
            .map(|((_, id), t)| (*id, t.amount, t.release_at))
            .collect();
        tranches.sort_by_key(|(id, _, release)| std::cmp::Reverse((*release, *id)));
        let mut take_tranches = Vec::new();
        for (id, have, _) in tranches {
            if left == 0 {
                break;
            }
            let take = have.min(left);
            left -= take;
            take_tranches.push((id, take));
        }
        let mut earnings: Vec<(RequestId, Amount, Timestamp)> = self
            .earnings(offender)
            .map(|(r, e)| (*r, e.amount, e.unlock_at))
            .collect();
        earnings
            .sort_by_key(|(r, _, unlock)| (Some(*r) != request, std::cmp::Reverse((*unlock, *r))));
        let mut take_earnings = Vec::new();
        for (r, have, _) in earnings {
            if left == 0 {
                break;
            }
            let take = have.min(left);
            left -= take;
            take_earnings.push((r, take));
        }
        let taken = amount - left;
        if taken == 0 {
            return Err(SlashError::NothingToSlash { offender });
        }
        let client = request.and_then(|r| {
            self.escrows
                .get(&r)
                .map(|e| e.client)
                .or_else(|| self.settled.get(&r).map(|s| s.client))
        });
        let share = |bps: u32| (u128::from(taken) * u128::from(bps) / u128::from(BPS)) as Amount;
        let to_challenger = share(self.config.challenger_bps);
        let to_client = if client.is_some() {
            share(self.config.refund_bps)
        } else {
            0
        };
        let mut postings = Vec::new();
        let pot = Bucket::Treasury;
        let unbonded: Amount = take_tranches.iter().map(|(_, a)| *a).sum();
        let earned: Amount = take_earnings.iter().map(|(_, a)| *a).sum();
        for (from, amount) in [
            (Bucket::Staked(offender), from_stake),
            (Bucket::Unbonding(offender), unbonded),
            (Bucket::Locked(offender), earned),
        ] {
            if amount > 0 {
                postings.push(Posting {
                    from,
                    to: pot,
                    amount,
                });
            }
        }
        if to_challenger > 0 {
            postings.push(Posting {
                from: pot,
                to: Bucket::Available(challenger),
                amount: to_challenger,
            });
        }
        if let (Some(client), true) = (client, to_client > 0) {
            postings.push(Posting {
                from: pot,
                to: Bucket::Available(client),
                amount: to_client,
            });
        }
        let op = Op::Slash {
            offender,
            amount,
            challenger,
            request,
        };
        let entry = self.record(op, postings, now)?;
        for (id, take) in take_tranches {
            if let Some(t) = self.unbonding.get_mut(&(offender, id)) {
                t.amount -= take;
                if t.amount == 0 {
                    self.unbonding.remove(&(offender, id));
                }
            }
        }
        for (r, take) in take_earnings {
            if let Some(e) = self.locked.get_mut(&(offender, r)) {
                e.amount -= take;
                if e.amount == 0 {
                    self.locked.remove(&(offender, r));
                }
            }
        }
        if let Some(r) = request {
            if let Some(e) = self.locked.get_mut(&(offender, r)) {
                e.challenger = None;
            }
            self.slashed.insert((offender, r));
        }
        Ok(entry)
    }

    /// Checks every invariant between the balances and the records behind them.
    pub fn check_invariants(&self) -> Result<(), InvariantError> {
        let total: u128 = self.balances.values().map(|a| u128::from(*a)).sum();
        if total != u128::from(self.issued) {
            return Err(bad(format!(
                "buckets hold {total}, the supply is {}",
                self.issued
            )));
        }
        for (r, e) in &self.escrows {
            let expect = u128::from(e.held) - e.redeemed_total();
            if u128::from(self.balance(Bucket::Escrow(*r))) != expect {
                return Err(bad(format!("escrow {r} holds the wrong amount")));
            }
        }
        for r in self.settled.keys() {
            if self.balance(Bucket::Escrow(*r)) != 0 {
                return Err(bad(format!("settled escrow {r} still holds funds")));
            }
        }
        let mut unbonding: BTreeMap<Address, Amount> = BTreeMap::new();
        for ((a, _), t) in &self.unbonding {
            *unbonding.entry(*a).or_default() += t.amount;
        }
        let mut locked: BTreeMap<Address, Amount> = BTreeMap::new();
        for ((a, _), e) in &self.locked {
            *locked.entry(*a).or_default() += e.amount;
        }
        for (bucket, amount) in &self.balances {
            let expect = match bucket {
                Bucket::Unbonding(a) => unbonding.remove(a).unwrap_or(0),
                Bucket::Locked(a) => locked.remove(a).unwrap_or(0),
                Bucket::Escrow(r) if !self.escrows.contains_key(r) => 0,
                _ => *amount,
            };
            if expect != *amount {
                return Err(bad(format!(
                    "{bucket} holds {amount}, its records say {expect}"
                )));
            }
        }
        if unbonding.values().chain(locked.values()).any(|a| *a != 0) {
            return Err(bad("tranches or earnings without a balance"));
        }
        Ok(())
    }
}
