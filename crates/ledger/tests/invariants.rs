//! Property tests: any sequence of operations (valid or not) keeps the supply conserved, every
//! balance non-negative, every invariant between balances and records, a verifiable hash chain
//! and balances that re-derive from the journal; refused operations change nothing; settle is
//! idempotent.

#![allow(unused_crate_dependencies, clippy::unwrap_used)]
use k256::ecdsa::SigningKey;
use plexus_ledger::*;
use proptest::prelude::*;

fn key(i: u8) -> SigningKey {
    SigningKey::from_slice(&[i + 1; 32]).unwrap()
}

fn addr(i: u8) -> Address {
    Address::from_private_key(&key(i))
}

/// Accounts 0..4 are clients/providers; account 4 is the gateway that signs vouchers.
const GATEWAY: u8 = 4;

#[derive(Clone, Debug)]
enum Step {
    Deposit(u8, u64),
    Faucet(u8, u64),
    Withdraw(u8, u64),
    Stake(u8, u64),
    Unbond(u8, u64),
    Claim(u8),
    Open(u8, u8, u64),
    Redeem {
        req: u8,
        provider: u8,
        cumulative: u64,
        nonce: u64,
        signer: u8,
        for_req: u8,
    },
    Settle(u8, Vec<(u8, u64)>),
    Challenge(u8, u8, u8),
    Dismiss(u8, u8),
    Slash(u8, u64, u8, Option<u8>),
    Wait(u64),
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..5, 0u64..2_000, Just(MAX_AMOUNT_TEST)]
}

const MAX_AMOUNT_TEST: u64 = i64::MAX as u64;

fn step() -> impl Strategy<Value = Step> {
    let who = 0u8..4;
    let req = 0u8..4;
    prop_oneof![
        (who.clone(), amount()).prop_map(|(a, n)| Step::Deposit(a, n)),
        (who.clone(), 0u64..3_000).prop_map(|(a, n)| Step::Faucet(a, n)),
        (who.clone(), amount()).prop_map(|(a, n)| Step::Withdraw(a, n)),
        (who.clone(), amount()).prop_map(|(a, n)| Step::Stake(a, n)),
        (who.clone(), amount()).prop_map(|(a, n)| Step::Unbond(a, n)),
        who.clone().prop_map(Step::Claim),
        (req.clone(), who.clone(), amount()).prop_map(|(r, a, n)| Step::Open(r, a, n)),
        (
            req.clone(),
            who.clone(),
            0u64..1_500,
            0u64..6,
            prop_oneof![Just(GATEWAY), who.clone()],
            req.clone()
        )
            .prop_map(
                |(req, provider, cumulative, nonce, signer, for_req)| Step::Redeem {
                    req,
                    provider,
                    cumulative,
                    nonce,
                    signer,
                    for_req
                }
            ),
        (
            req.clone(),
            prop::collection::vec((who.clone(), 0u64..1_000), 0..3)
        )
            .prop_map(|(r, p)| Step::Settle(r, p)),
        (req.clone(), who.clone(), who.clone()).prop_map(|(r, p, c)| Step::Challenge(r, p, c)),
        (req.clone(), who.clone()).prop_map(|(r, p)| Step::Dismiss(r, p)),
        (
            who.clone(),
            amount(),
            who.clone(),
            prop::option::of(req.clone())
        )
            .prop_map(|(o, n, c, r)| Step::Slash(o, n, c, r)),
        prop_oneof![0u64..10, Just(10_000u64), Just(50_000u64)].prop_map(Step::Wait),
    ]
}

fn config() -> Config {
    Config {
        chain_id: 7,
        challenge_window_ms: 10_000,
        unbonding_period_ms: 40_000,
        challenger_bps: 5_000,
        refund_bps: 2_500,
        faucet_max: 2_000,
    }
}

fn rid(i: u8) -> RequestId {
    RequestId([i; 32])
}

fn to_op(s: &Step) -> Option<Op> {
    Some(match s.clone() {
        Step::Deposit(a, amount) => Op::Deposit {
            account: addr(a),
            amount,
        },
        Step::Faucet(a, amount) => Op::Faucet {
            account: addr(a),
            amount,
        },
        Step::Withdraw(a, amount) => Op::Withdraw {
            account: addr(a),
            amount,
        },
        Step::Stake(a, amount) => Op::Stake {
            account: addr(a),
            amount,
        },
        Step::Unbond(a, amount) => Op::Unbond {
            account: addr(a),
            amount,
        },
        Step::Claim(a) => Op::Claim { account: addr(a) },
        Step::Open(r, a, amount) => Op::OpenEscrow {
            request: rid(r),
            client: addr(a),
            gateway: addr(GATEWAY),
            amount,
        },
        Step::Redeem {
            req,
            provider,
            cumulative,
            nonce,
            signer,
            for_req,
        } => {
            let v = Voucher {
                payer: addr(GATEWAY),
                provider: addr(provider),
                request: rid(for_req),
                cumulative,
                nonce,
                expiry: u64::MAX,
            };
            Op::Redeem {
                request: rid(req),
                voucher: v.sign(7, &key(signer)),
            }
        }
        Step::Settle(r, p) => Op::Settle {
            request: rid(r),
            payouts: p
                .into_iter()
                .map(|(a, amount)| Payout {
                    provider: addr(a),
                    amount,
                })
                .collect(),
        },
        Step::Challenge(r, p, c) => Op::Challenge {
            request: rid(r),
            provider: addr(p),
            challenger: addr(c),
        },
        Step::Dismiss(r, p) => Op::Dismiss {
            request: rid(r),
            provider: addr(p),
        },
        Step::Slash(o, amount, c, r) => Op::Slash {
            offender: addr(o),
            amount,
            challenger: addr(c),
            request: r.map(rid),
        },
        Step::Wait(_) => return None,
    })
}

/// Deterministically useful prefix: funds so that later steps have something to move.
fn prefix() -> Vec<Step> {
    vec![
        Step::Deposit(0, 5_000),
        Step::Deposit(1, 5_000),
        Step::Stake(1, 1_000),
        Step::Open(0, 0, 2_000),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_sequence_keeps_every_invariant(steps in prop::collection::vec(step(), 1..60)) {
        let mut ledger = Ledger::new(config());
        let mut journal: Vec<Entry> = Vec::new();
        let mut now = 1_000u64;
        for s in prefix().iter().chain(&steps) {
            if let Step::Wait(ms) = s {
                now += ms;
                continue;
            }
            now += 1;
            let op = to_op(s).unwrap();
            let before = (ledger.balances(), ledger.next_seq(), ledger.head());
            match ledger.execute(op.clone(), now) {
                Ok(Some(entry)) => {
                    prop_assert_eq!(entry.seq as usize, journal.len());
                    journal.push(entry);
                    if let Op::Settle { .. } = op {
                        // Idempotent: the same settle again changes nothing.
                        let again = ledger.execute(op.clone(), now + 1);
                        prop_assert_eq!(again, Ok(None));
                    }
                }
                Ok(None) => {
                    let is_settle = matches!(op, Op::Settle { .. });
                    prop_assert!(is_settle);
                    prop_assert_eq!(&before, &(ledger.balances(), ledger.next_seq(), ledger.head()));
                }
                Err(_) => {
                    // A refused operation leaves everything as it was.
                    prop_assert_eq!(&before, &(ledger.balances(), ledger.next_seq(), ledger.head()));
                }
            }
            ledger.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Conservation: the buckets hold exactly the supply.
            let sum: i128 = ledger.balances().values().sum();
            prop_assert_eq!(sum, 0);
            prop_assert!(ledger.balances().iter().all(|(b, v)| *b == Bucket::World || *v > 0));
        }
        prop_assert_eq!(verify_chain(&journal), Ok(ledger.head()));
        prop_assert_eq!(derive_balances(&journal), ledger.balances());
        let replayed = Ledger::replay(config(), &journal).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(replayed.balances(), ledger.balances());
        prop_assert_eq!(replayed.head(), ledger.head());
        // Tampering with any entry breaks the chain.
        if let Some(first) = journal.first().cloned() {
            let mut bad = journal.clone();
            bad[0].time = first.time + 1;
            prop_assert!(verify_chain(&bad).is_err());
        }
    }
}

#[test]
fn settle_pays_providers_locks_earnings_and_refunds_the_rest() {
    let mut l = Ledger::new(config());
    let (client, p1, p2) = (addr(0), addr(1), addr(2));
    l.deposit(client, 1_000, 0).unwrap();
    l.open_escrow(rid(1), client, addr(GATEWAY), 600, 1)
        .unwrap();
    assert_eq!(l.account(client).available, 400);
    assert_eq!(l.account(client).escrow, 600);
    let payouts = vec![
        Payout {
            provider: p1,
            amount: 100,
        },
        Payout {
            provider: p2,
            amount: 50,
        },
    ];
    l.settle(rid(1), payouts.clone(), 2).unwrap().unwrap();
    assert_eq!(l.account(client).available, 850);
    assert_eq!(l.account(p1).locked, 100);
    assert_eq!(l.settle(rid(1), payouts, 3), Ok(None));
    assert!(matches!(
        l.settle(rid(1), vec![], 3),
        Err(SettleError::Conflict { .. })
    ));
    // Locked inside the window, claimable after it.
    assert!(matches!(
        l.claim(p1, 5_000),
        Err(ClaimError::NothingClaimable {
            next: Some(10_002),
            ..
        })
    ));
    l.claim(p1, 10_002).unwrap();
    assert_eq!(l.account(p1).available, 100);
    assert!(matches!(
        l.open_escrow(rid(1), client, addr(GATEWAY), 1, 4),
        Err(EscrowError::Duplicate { .. })
    ));
    assert!(matches!(
        l.open_escrow(rid(2), client, addr(GATEWAY), 10_000, 4),
        Err(EscrowError::Insufficient(_))
    ));
}

#[test]
fn vouchers_are_refused_precisely() {
    let mut l = Ledger::new(config());
    let (client, provider, gw) = (addr(0), addr(1), key(GATEWAY));
    l.deposit(client, 1_000, 0).unwrap();
    l.open_escrow(rid(1), client, addr(GATEWAY), 500, 0)
        .unwrap();
    l.open_escrow(rid(2), client, addr(GATEWAY), 100, 0)
        .unwrap();
    let v = |cumulative, nonce, request| Voucher {
        payer: addr(GATEWAY),
        provider,
        request,
        cumulative,
        nonce,
        expiry: 100,
    };
    let s1 = v(100, 1, rid(1)).sign(7, &gw);
    l.redeem(rid(1), s1.clone(), 1_000).unwrap();
    assert_eq!(l.account(provider).locked, 100);
    assert!(matches!(
        l.redeem(rid(1), s1, 1_000),
        Err(RedeemError::Replayed { nonce: 1, .. })
    ));
    let s3 = v(300, 3, rid(1)).sign(7, &gw);
    l.redeem(rid(1), s3, 1_000).unwrap();
    assert!(matches!(
        l.redeem(rid(1), v(400, 2, rid(1)).sign(7, &gw), 1_000),
        Err(RedeemError::Stale {
            nonce: 2,
            redeemed: 3
        })
    ));
    assert!(matches!(
        l.redeem(rid(1), v(200, 4, rid(1)).sign(7, &gw), 1_000),
        Err(RedeemError::BelowRedeemed {
            cumulative: 200,
            redeemed: 300
        })
    ));
    assert!(matches!(
        l.redeem(rid(1), v(400, 4, rid(1)).sign(8, &gw), 1_000),
        Err(RedeemError::Signature(
            voucher::SignatureError::WrongChain {
                expected: 7,
                got: 8
            }
        ))
    ));
    assert!(matches!(
        l.redeem(rid(1), v(400, 4, rid(1)).sign(7, &gw), 101_000),
        Err(RedeemError::Signature(
            voucher::SignatureError::Expired { .. }
        ))
    ));
    assert!(matches!(
        l.redeem(rid(1), v(400, 4, rid(1)).sign(7, &key(0)), 1_000),
        Err(RedeemError::Signature(
            voucher::SignatureError::Forged { .. }
        ))
    ));
    assert!(matches!(
        l.redeem(rid(1), v(50, 4, rid(2)).sign(7, &gw), 1_000),
        Err(RedeemError::ForAnotherRequest { .. })
    ));
    assert!(matches!(
        l.redeem(rid(1), v(600, 4, rid(1)).sign(7, &gw), 1_000),
        Err(RedeemError::ExceedsEscrow { .. })
    ));
    // Settlement pays at least what the vouchers promised.
    l.settle(
        rid(1),
        vec![Payout {
            provider,
            amount: 10,
        }],
        2_000,
    )
    .unwrap();
    assert_eq!(l.account(provider).locked, 300);
    assert_eq!(l.account(client).available, 400 + 200);
    // After settlement the escrow is gone: a later voucher is refused, naming what was paid.
    assert!(matches!(
        l.redeem(rid(1), v(350, 5, rid(1)).sign(7, &gw), 2_500),
        Err(RedeemError::Settled {
            paid: 10,
            cumulative: 350,
            ..
        })
    ));
    assert!(matches!(
        l.redeem(rid(9), v(5, 1, rid(9)).sign(7, &gw), 2_500),
        Err(RedeemError::NotOpen { .. })
    ));
    l.check_invariants().unwrap();
}

#[test]
fn slash_reaches_stake_then_unbonding_then_earnings_and_splits() {
    let mut l = Ledger::new(config());
    let (client, provider, challenger) = (addr(0), addr(1), addr(2));
    l.deposit(client, 1_000, 0).unwrap();
    l.deposit(provider, 300, 0).unwrap();
    l.stake(provider, 300, 0).unwrap();
    l.unbond(provider, 100, 0).unwrap();
    l.open_escrow(rid(1), client, addr(GATEWAY), 400, 0)
        .unwrap();
    l.settle(
        rid(1),
        vec![Payout {
            provider,
            amount: 400,
        }],
        1,
    )
    .unwrap();
    l.challenge(rid(1), provider, challenger, 2).unwrap();
    // Past the window the challenged earnings stay locked.
    assert!(l.claim(provider, 20_000).is_err());
    assert!(matches!(
        l.challenge(rid(1), provider, challenger, 3),
        Err(ChallengeError::AlreadyChallenged { .. })
    ));
    let e = l
        .slash(provider, 350, challenger, Some(rid(1)), 20_001)
        .unwrap();
    assert!(e
        .postings
        .iter()
        .any(|p| p.from == Bucket::Staked(provider) && p.amount == 200));
    assert!(e
        .postings
        .iter()
        .any(|p| p.from == Bucket::Unbonding(provider) && p.amount == 100));
    assert!(e
        .postings
        .iter()
        .any(|p| p.from == Bucket::Locked(provider) && p.amount == 50));
    assert_eq!(l.account(challenger).available, 175);
    assert_eq!(l.account(client).available, 600 + 87);
    assert_eq!(l.balance(Bucket::Treasury), 350 - 175 - 87);
    assert_eq!(l.account(provider).staked, 0);
    // The challenge ended with the slash: the rest matures.
    l.claim(provider, 20_002).unwrap();
    assert_eq!(l.account(provider).available, 350);
    assert!(matches!(
        l.slash(provider, 1, challenger, None, 20_003),
        Err(SlashError::NothingToSlash { .. })
    ));
    assert!(matches!(
        l.challenge(rid(1), provider, challenger, 20_004),
        Err(ChallengeError::NoEarnings { .. })
    ));
    l.check_invariants().unwrap();
}

/// One verdict slashes once: the same offender and request a second time is refused (every
/// honest auditor of a training round brings the same verdict), without touching a balance;
/// another request, or a slash without one, still reaches what is left.
#[test]
fn an_offender_is_slashed_once_per_request() {
    let mut l = Ledger::new(config());
    let (offender, first, second) = (addr(0), addr(1), addr(2));
    l.deposit(offender, 1_000, 0).unwrap();
    l.stake(offender, 1_000, 0).unwrap();
    l.slash(offender, 400, first, Some(rid(3)), 1).unwrap();
    let before = l.balances();
    assert!(matches!(
        l.slash(offender, 400, second, Some(rid(3)), 2),
        Err(SlashError::AlreadySlashed { request, .. }) if request == rid(3)
    ));
    assert_eq!(l.balances(), before);
    assert_eq!(l.account(second).available, 0);
    l.slash(offender, 100, second, Some(rid(4)), 3).unwrap();
    l.slash(offender, 100, second, None, 4).unwrap();
    l.slash(offender, 100, second, None, 5).unwrap();
    assert_eq!(l.account(offender).staked, 300);
    l.check_invariants().unwrap();
}
