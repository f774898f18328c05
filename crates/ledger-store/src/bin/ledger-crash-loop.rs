//! A settlement loop to kill: `scripts/ledger_crash.py` SIGKILLs it at random points and starts
//! it again on the same ledger, then asks it to check the result.
//!
//! `ledger-crash-loop run URL N`: settles requests 0..N. Request `i` is a fixed workload: open
//! an escrow, redeem one cumulative voucher per provider, settle. A restarted run redoes the
//! request it was killed in from its first step, so every step meets its own half-done past:
//! an escrow already open, a voucher already redeemed (refused as replayed), a settlement
//! already recorded (an idempotent no-op).
//!
//! `ledger-crash-loop check URL N`: opening the store replays the journal (hash chain, every
//! operation re-executed, stored balances equal re-derived ones); then the balances must equal
//! the closed form of N settled requests and the journal must hold exactly one escrow, one
//! redemption per provider and one settlement per request: nothing paid twice, nothing lost.
#![allow(clippy::unwrap_used, unused_crate_dependencies)]

use k256::ecdsa::SigningKey;
use plexus_ledger::{
    Address, Config, EscrowError, Op, OpError, Payout, RedeemError, RequestId, Voucher,
};
use plexus_ledger_store::{Store, StoreError};
use std::collections::BTreeMap;
use std::process::ExitCode;

const DEPOSIT: u64 = 1_000_000_000;

fn key(i: u8) -> SigningKey {
    SigningKey::from_slice(&[i; 32]).unwrap()
}

struct World {
    client: Address,
    gateway: SigningKey,
    providers: [Address; 2],
}

fn world() -> World {
    World {
        client: Address::from_private_key(&key(1)),
        gateway: key(2),
        providers: [
            Address::from_private_key(&key(3)),
            Address::from_private_key(&key(4)),
        ],
    }
}

/// Request `i`: held, each provider's voucher, and the settlement payout of provider 1 (one
/// more than its voucher for i % 3 == 0, to exercise settle paying over a voucher).
fn workload(i: u64) -> (RequestId, u64, [u64; 2], [u64; 2]) {
    let held = 1_000 + (i % 7) * 10;
    let vouchers = [100 + i % 13, 50 + i % 5];
    let payouts = [vouchers[0], vouchers[1] + u64::from(i.is_multiple_of(3))];
    (
        RequestId::from_label(&format!("req-{i}")),
        held,
        vouchers,
        payouts,
    )
}

fn config() -> Config {
    Config::default()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn run(url: &str, n: u64) -> Result<(), String> {
    let w = world();
    let gateway = Address::from_private_key(&w.gateway);
    let mut store = Store::open(url, config())
        .await
        .map_err(|e| e.to_string())?;
    store
        .ledger()
        .check_invariants()
        .map_err(|e| e.to_string())?;
    if store.ledger().issued() == 0 {
        let op = Op::Deposit {
            account: w.client,
            amount: DEPOSIT,
        };
        store.execute(op, now()).await.map_err(|e| e.to_string())?;
    }
    // Resume at the first request that is not settled.
    let mut i = 0;
    while i < n && store.ledger().settlement(&workload(i).0).is_some() {
        i += 1;
    }
    println!("resuming at {i}");
    for i in i..n {
        let (request, held, vouchers, payouts) = workload(i);
        let open = Op::OpenEscrow {
            request,
            client: w.client,
            gateway,
            amount: held,
        };
        match store.execute(open, now()).await {
            Ok(_) => {}
            Err(StoreError::Refused(OpError::Escrow(EscrowError::Duplicate { .. }))) => {}
            Err(e) => return Err(format!("open {i}: {e}")),
        }
        for (p, amount) in w.providers.iter().zip(vouchers) {
            let v = Voucher {
                payer: gateway,
                provider: *p,
                request,
                cumulative: amount,
                nonce: 1,
                expiry: u64::MAX / 2000,
            };
            let op = Op::Redeem {
                request,
                voucher: v.sign(config().chain_id, &w.gateway),
            };
            match store.execute(op, now()).await {
                Ok(_) => {}
                Err(StoreError::Refused(OpError::Redeem(RedeemError::Replayed { .. }))) => {}
                Err(e) => return Err(format!("redeem {i}: {e}")),
            }
        }
        let payouts = w
            .providers
            .iter()
            .zip(payouts)
            .map(|(p, amount)| Payout {
                provider: *p,
                amount,
            })
            .collect();
        store
            .execute(Op::Settle { request, payouts }, now())
            .await
            .map_err(|e| format!("settle {i}: {e}"))?;
    }
    println!("done {n}");
    Ok(())
}

async fn check(url: &str, n: u64) -> Result<(), String> {
    let w = world();
    let store = Store::open(url, config())
        .await
        .map_err(|e| format!("open: {e}"))?;
    store.verify().await.map_err(|e| e.to_string())?;
    let l = store.ledger();
    l.check_invariants().map_err(|e| e.to_string())?;
    let (mut spent, mut earned) = (0u64, [0u64; 2]);
    for i in 0..n {
        let (request, _, _, payouts) = workload(i);
        if l.settlement(&request).is_none() {
            return Err(format!("request {i} is not settled"));
        }
        spent += payouts[0] + payouts[1];
        earned[0] += payouts[0];
        earned[1] += payouts[1];
    }
    if l.open_escrows().next().is_some() {
        return Err("an escrow is still open".into());
    }
    let client = l.account(w.client);
    if client.available != DEPOSIT - spent || client.spent != spent {
        return Err(format!(
            "client has {} available and spent {}, expected {} and {spent}",
            client.available,
            client.spent,
            DEPOSIT - spent
        ));
    }
    for (p, want) in w.providers.iter().zip(earned) {
        if l.account(*p).locked != want {
            return Err(format!(
                "provider {p} earned {}, expected {want}",
                l.account(*p).locked
            ));
        }
    }
    if l.issued() != DEPOSIT {
        return Err(format!("supply {} != deposit {DEPOSIT}", l.issued()));
    }
    // Exactly one of each step per request in the journal.
    let mut seen: BTreeMap<(RequestId, &'static str, Option<Address>), u32> = BTreeMap::new();
    let journal = store.journal().await.map_err(|e| e.to_string())?;
    for e in &journal {
        let k = match &e.op {
            Op::OpenEscrow { request, .. } => (*request, "open", None),
            Op::Redeem { request, voucher } => (*request, "redeem", Some(voucher.voucher.provider)),
            Op::Settle { request, .. } => (*request, "settle", None),
            Op::Deposit { .. } => continue,
            other => return Err(format!("unexpected operation {}", other.kind())),
        };
        *seen.entry(k).or_default() += 1;
    }
    if let Some((k, c)) = seen.iter().find(|(_, c)| **c != 1) {
        return Err(format!("{} of request {} recorded {c} times", k.1, k.0));
    }
    if seen.len() as u64 != n * 4 {
        return Err(format!("{} steps recorded, expected {}", seen.len(), n * 4));
    }
    println!(
        "ok: {n} requests, {} journal entries, every invariant holds",
        journal.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(cmd), Some(url), Some(n)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: ledger-crash-loop run|check URL REQUESTS");
        return ExitCode::from(2);
    };
    let Ok(n) = n.parse::<u64>() else {
        eprintln!("REQUESTS must be a number");
        return ExitCode::from(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = rt.block_on(async {
        match cmd.as_str() {
            "run" => run(url, n).await,
            "check" => check(url, n).await,
            _ => Err(format!("unknown command {cmd}")),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
