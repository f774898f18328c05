//! `plexus wallet` and `plexus status` on a fresh SQLite ledger: the node key's account is
//! funded, stakes, unbonds and refuses what it cannot cover, and status shows the same buckets.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn plexus(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn line(out: &Output, name: &str) -> u64 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn wallet_moves_funds_between_buckets_and_refuses_overdrafts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let address = String::from_utf8(plexus(d, &["wallet", "address"]).stdout).unwrap();
    let address = address.trim().to_owned();
    assert!(
        address.starts_with("0x") && address.len() == 42,
        "{address}"
    );

    assert_eq!(
        line(&plexus(d, &["wallet", "faucet", "5PLX"]), "available"),
        5_000_000
    );
    let staked = plexus(d, &["wallet", "stake", "2PLX"]);
    assert_eq!(line(&staked, "available"), 3_000_000);
    assert_eq!(line(&staked, "staked"), 2_000_000);
    let unbond = plexus(d, &["wallet", "unbond", "500000"]);
    assert_eq!(line(&unbond, "unbonding"), 500_000);
    assert_eq!(line(&unbond, "claimable"), 0, "unbonding takes 7 days");

    let over = plexus(d, &["wallet", "withdraw", "10PLX"]);
    assert!(!over.status.success());
    let err = String::from_utf8_lossy(&over.stderr);
    assert!(
        err.contains("withdraw refused") && err.contains("3000000"),
        "{err}"
    );
    assert_eq!(
        line(&plexus(d, &["wallet", "balance"]), "available"),
        3_000_000
    );
    assert_eq!(
        line(&plexus(d, &["wallet", "withdraw", "1PLX"]), "available"),
        2_000_000
    );

    let history = String::from_utf8(plexus(d, &["wallet", "history"]).stdout).unwrap();
    let kinds: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        kinds,
        ["faucet", "stake", "unbond", "withdraw"],
        "{history}"
    );

    let status = plexus(d, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let me = &v["accounts"][0];
    assert_eq!(me["account"], address.as_str());
    assert_eq!(me["this_node"], true);
    assert_eq!(
        (
            me["available"].as_u64(),
            me["staked"].as_u64(),
            me["unbonding"].as_u64()
        ),
        (Some(2_000_000), Some(1_500_000), Some(500_000))
    );
    assert_eq!(v["supply"], 4_000_000);
}
