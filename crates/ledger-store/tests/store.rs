//! The same suite on both backends: SQLite (always) and PostgreSQL (from
//! `PLEXUS_TEST_POSTGRES_URL`; each test gets its own fresh database, so the role needs
//! CREATEDB). Without the URL the PostgreSQL half says so and passes, unless
//! `PLEXUS_REQUIRE_POSTGRES=1` (set by `.ci/run`), which makes a missing server a failure.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use k256::ecdsa::SigningKey;
use plexus_ledger::*;
use plexus_ledger_store::{Backend, OpenError, Store, VerifyError};
use proptest::prelude::*;
use sqlx::Executor;

mod common;
use common::{fresh, Db};

fn key(i: u8) -> SigningKey {
    SigningKey::from_slice(&[i + 1; 32]).unwrap()
}
fn addr(i: u8) -> Address {
    Address::from_private_key(&key(i))
}
fn rid(i: u8) -> RequestId {
    RequestId([i; 32])
}
const GATEWAY: u8 = 4;

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

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn both(test: impl Fn(Db) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>) {
    let rt = rt();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if let Some(db) = rt.block_on(fresh(backend)) {
            rt.block_on(test(db));
        }
    }
}

#[test]
fn open_creates_the_database_and_state_survives_reopening() {
    both(|db| {
        Box::pin(async move {
            let mut s = Store::open(&db.url, config()).await.unwrap();
            s.execute(
                Op::Deposit {
                    account: addr(0),
                    amount: 1_000,
                },
                1,
            )
            .await
            .unwrap()
            .unwrap();
            let open = Op::OpenEscrow {
                request: rid(1),
                client: addr(0),
                gateway: addr(GATEWAY),
                amount: 300,
            };
            s.execute(open, 2).await.unwrap();
            let settle = Op::Settle {
                request: rid(1),
                payouts: vec![Payout {
                    provider: addr(1),
                    amount: 120,
                }],
            };
            s.execute(settle.clone(), 3).await.unwrap().unwrap();
            s.verify().await.unwrap();
            let head = s.ledger().head();
            if s.backend() == Backend::Sqlite {
                let path = db.url.trim_start_matches("sqlite://");
                assert!(std::path::Path::new(path).exists());
                assert!(
                    std::path::Path::new(&format!("{path}-wal")).exists(),
                    "WAL mode"
                );
            }
            s.close().await;
            // A different config for an existing ledger: the stored rules win.
            let mut s = Store::open(&db.url, Config::default()).await.unwrap();
            assert_eq!(s.ledger().config(), &config());
            assert_eq!(s.ledger().head(), head);
            assert_eq!(s.ledger().account(addr(0)).available, 880);
            assert_eq!(s.ledger().account(addr(1)).locked, 120);
            // Idempotent across restarts: the retried settle writes nothing.
            assert!(s.execute(settle, 4).await.unwrap().is_none());
            assert_eq!(s.journal().await.unwrap().len(), 3);
            // A refused operation writes nothing either.
            let err = s
                .execute(
                    Op::Withdraw {
                        account: addr(0),
                        amount: 10_000,
                    },
                    5,
                )
                .await;
            assert!(err.is_err());
            assert_eq!(s.journal().await.unwrap().len(), 3);
            s.verify().await.unwrap();
        })
    });
}

#[test]
fn tampered_balances_or_journal_are_refused_on_open() {
    both(|db| {
        Box::pin(async move {
            let mut s = Store::open(&db.url, config()).await.unwrap();
            s.execute(
                Op::Deposit {
                    account: addr(0),
                    amount: 1_000,
                },
                1,
            )
            .await
            .unwrap();
            s.execute(
                Op::Deposit {
                    account: addr(1),
                    amount: 5,
                },
                2,
            )
            .await
            .unwrap();
            s.close().await;
            sqlx::any::install_default_drivers();
            let conn_url = if db.url.starts_with("sqlite") {
                format!("{}?mode=rw", db.url)
            } else {
                db.url.clone()
            };
            let mut c = <sqlx::AnyConnection as sqlx::Connection>::connect(&conn_url)
                .await
                .unwrap();
            c.execute(
                "UPDATE plexus_balances SET amount = amount + 1 WHERE bucket LIKE 'available:%'",
            )
            .await
            .unwrap();
            let err = Store::open(&db.url, config())
                .await
                .err()
                .expect("tampered balance");
            assert!(
                matches!(err, OpenError::Verify(VerifyError::Balance { .. })),
                "{err}"
            );
            c.execute(
                "UPDATE plexus_balances SET amount = amount - 1 WHERE bucket LIKE 'available:%'",
            )
            .await
            .unwrap();
            Store::open(&db.url, config()).await.unwrap().close().await;
            c.execute("UPDATE plexus_journal SET entry = REPLACE(entry, '\"amount\":1000', '\"amount\":1001') WHERE seq = 0")
                .await
                .unwrap();
            let err = Store::open(&db.url, config())
                .await
                .err()
                .expect("tampered journal");
            assert!(
                matches!(err, OpenError::Verify(VerifyError::Replay(_))),
                "{err}"
            );
        })
    });
}

#[test]
fn api_keys_are_stored_hashed() {
    both(|db| {
        Box::pin(async move {
            let s = Store::open(&db.url, config()).await.unwrap();
            s.add_api_key("plx-secret-1", addr(0), "dev", 1)
                .await
                .unwrap();
            assert_eq!(
                s.account_for_key("plx-secret-1").await.unwrap(),
                Some(addr(0))
            );
            assert_eq!(s.account_for_key("plx-secret-2").await.unwrap(), None);
            let keys = s.api_keys().await.unwrap();
            assert_eq!(keys.len(), 1);
            assert_ne!(keys[0].key_hash, "plx-secret-1");
            assert!(s
                .add_api_key("plx-secret-1", addr(1), "again", 2)
                .await
                .is_err());
        })
    });
}

#[test]
fn issued_vouchers_keep_the_latest_per_provider_until_forgotten() {
    both(|db| {
        Box::pin(async move {
            let s = Store::open(&db.url, config()).await.unwrap();
            let gw = key(GATEWAY);
            let voucher = |provider: u8, request: u8, cumulative: Amount, nonce: u64| {
                Voucher {
                    payer: addr(GATEWAY),
                    provider: addr(provider),
                    request: rid(request),
                    cumulative,
                    nonce,
                    expiry: 2_000_000_000,
                }
                .sign(7, &gw)
            };
            s.record_vouchers(&[voucher(1, 1, 10, 1), voucher(2, 1, 20, 1)])
                .await
                .unwrap();
            s.record_vouchers(&[voucher(1, 1, 30, 2), voucher(1, 2, 5, 1)])
                .await
                .unwrap();
            // A lower or equal nonce (a late duplicate) does not replace the recorded one.
            s.record_vouchers(&[voucher(1, 1, 99, 2), voucher(2, 1, 1, 1)])
                .await
                .unwrap();
            let mut got = s.issued_vouchers(rid(1)).await.unwrap();
            got.sort_by_key(|v| v.voucher.provider);
            let mut want = vec![voucher(1, 1, 30, 2), voucher(2, 1, 20, 1)];
            want.sort_by_key(|v| v.voucher.provider);
            assert_eq!(got, want);
            // Survives reopening (a restarted gateway reads it).
            drop(s);
            let s = Store::open(&db.url, config()).await.unwrap();
            assert_eq!(s.issued_vouchers(rid(1)).await.unwrap().len(), 2);
            s.forget_vouchers(rid(1)).await.unwrap();
            assert!(s.issued_vouchers(rid(1)).await.unwrap().is_empty());
            assert_eq!(
                s.issued_vouchers(rid(2)).await.unwrap(),
                vec![voucher(1, 2, 5, 1)]
            );
        })
    });
}

#[test]
fn two_writers_on_one_database_stay_consistent() {
    both(|db| {
        Box::pin(async move {
            let mut a = Store::open(&db.url, config()).await.unwrap();
            let mut b = Store::open(&db.url, config()).await.unwrap();
            for i in 0..5u64 {
                a.execute(
                    Op::Deposit {
                        account: addr(0),
                        amount: 10,
                    },
                    i,
                )
                .await
                .unwrap();
                b.execute(
                    Op::Deposit {
                        account: addr(1),
                        amount: 10,
                    },
                    i,
                )
                .await
                .unwrap();
            }
            b.reload().await.unwrap();
            assert_eq!(b.ledger().account(addr(0)).available, 50);
            assert_eq!(b.ledger().account(addr(1)).available, 50);
            assert_eq!(b.ledger().next_seq(), 10);
            b.verify().await.unwrap();
        })
    });
}

/// `sqlite://PATH?mode=ro`: an existing ledger opened read only follows what a writer
/// records and refuses every write of its own; a missing file is not created; any other URL
/// option is refused by name, not dropped.
#[test]
fn a_read_only_sqlite_ledger_reads_and_refuses_writes() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let url = format!("sqlite://{}", path.display());
        let mut writer = Store::open(&url, config()).await.unwrap();
        let deposit = |amount| Op::Deposit {
            account: addr(0),
            amount,
        };
        writer.execute(deposit(10), 1).await.unwrap();
        let mut reader = Store::open(&format!("{url}?mode=ro"), config())
            .await
            .unwrap();
        assert_eq!(reader.ledger().account(addr(0)).available, 10);
        writer.execute(deposit(5), 2).await.unwrap();
        assert_eq!(reader.catch_up().await.unwrap(), 1);
        assert_eq!(reader.ledger().account(addr(0)).available, 15);
        assert!(reader.execute(deposit(1), 3).await.is_err());
        reader.reload().await.unwrap();
        assert_eq!(reader.ledger().account(addr(0)).available, 15);

        let missing = format!("sqlite://{}?mode=ro", dir.path().join("none.db").display());
        assert!(Store::open(&missing, config()).await.is_err());
        assert!(!dir.path().join("none.db").exists());
        let e = Store::open(&format!("{url}?cache=shared"), config())
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&e, OpenError::SqliteOption { option } if option == "cache=shared"),
            "{e}"
        );
    });
}

#[derive(Clone, Debug)]
enum Step {
    Deposit(u8, u64),
    Open(u8, u8, u64),
    Redeem(u8, u8, u64, u64),
    Settle(u8, Vec<(u8, u64)>),
    Stake(u8, u64),
    Slash(u8, u64, u8),
    Claim(u8),
    Wait,
}

fn step() -> impl Strategy<Value = Step> {
    let who = 0u8..4;
    let req = 0u8..3;
    prop_oneof![
        (who.clone(), 0u64..3_000).prop_map(|(a, n)| Step::Deposit(a, n)),
        (req.clone(), who.clone(), 0u64..2_000).prop_map(|(r, a, n)| Step::Open(r, a, n)),
        (req.clone(), who.clone(), 0u64..1_000, 0u64..4)
            .prop_map(|(r, p, c, n)| Step::Redeem(r, p, c, n)),
        (
            req.clone(),
            prop::collection::vec((who.clone(), 0u64..800), 0..3)
        )
            .prop_map(|(r, p)| Step::Settle(r, p)),
        (who.clone(), 0u64..1_000).prop_map(|(a, n)| Step::Stake(a, n)),
        (who.clone(), 0u64..1_000, who.clone()).prop_map(|(o, n, c)| Step::Slash(o, n, c)),
        who.clone().prop_map(Step::Claim),
        Just(Step::Wait),
    ]
}

fn to_op(s: &Step) -> Option<Op> {
    Some(match s.clone() {
        Step::Deposit(a, amount) => Op::Deposit {
            account: addr(a),
            amount,
        },
        Step::Open(r, a, amount) => Op::OpenEscrow {
            request: rid(r),
            client: addr(a),
            gateway: addr(GATEWAY),
            amount,
        },
        Step::Redeem(r, p, cumulative, nonce) => Op::Redeem {
            request: rid(r),
            voucher: Voucher {
                payer: addr(GATEWAY),
                provider: addr(p),
                request: rid(r),
                cumulative,
                nonce,
                expiry: u64::MAX,
            }
            .sign(7, &key(GATEWAY)),
        },
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
        Step::Stake(a, amount) => Op::Stake {
            account: addr(a),
            amount,
        },
        Step::Slash(o, amount, c) => Op::Slash {
            offender: addr(o),
            amount,
            challenger: addr(c),
            request: None,
        },
        Step::Claim(a) => Op::Claim { account: addr(a) },
        Step::Wait => return None,
    })
}

proptest! {
    // Each case opens real databases: fewer cases than the pure-state-machine suite.
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn stored_ledger_equals_the_state_machine_on_both_backends(steps in prop::collection::vec(step(), 1..40)) {
        let rt = rt();
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let Some(db) = rt.block_on(fresh(backend)) else { continue };
            rt.block_on(async {
                let mut store = Store::open(&db.url, config()).await.unwrap();
                let mut model = Ledger::new(config());
                let mut now = 0u64;
                for s in &steps {
                    now += if matches!(s, Step::Wait) { 20_000 } else { 1 };
                    let Some(op) = to_op(s) else { continue };
                    let want = model.execute(op.clone(), now);
                    let got = store.execute(op.clone(), now).await;
                    match (&want, &got) {
                        (Ok(w), Ok(g)) => assert_eq!(w, g),
                        (Err(_), Err(_)) => {}
                        _ => panic!("model {want:?} vs store {got:?}"),
                    }
                    if let (Op::Settle { .. }, Ok(Some(_))) = (&op, &got) {
                        assert!(store.execute(op, now).await.unwrap().is_none());
                    }
                }
                store.verify().await.unwrap();
                let journal = store.journal().await.unwrap();
                assert_eq!(verify_chain(&journal), Ok(model.head()));
                assert_eq!(derive_balances(&journal), model.balances());
                store.close().await;
                let again = Store::open(&db.url, config()).await.unwrap();
                assert_eq!(again.ledger().balances(), model.balances());
                assert_eq!(again.ledger().head(), model.head());
            });
        }
    }
}
