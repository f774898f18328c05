//! Crash safety: `scripts/ledger_crash.py` SIGKILLs the settlement loop at random points and
//! restarts it, then checks every invariant and that nothing was paid twice or lost. A reduced
//! count here (the script defaults to 100 kills); on SQLite and, when configured, PostgreSQL.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

mod common;
use plexus_ledger_store::Backend;
use std::path::Path;
use std::process::Command;

fn python() -> String {
    std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn crash_loop(url: &str, seed: u32) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ledger_crash.py");
    let out = Command::new(python())
        .arg(script)
        .args([
            "--bin",
            env!("CARGO_BIN_EXE_ledger-crash-loop"),
            "--url",
            url,
        ])
        .args(["--kills", "20", "--requests", "120", "--max-delay", "0.25"])
        .args(["--seed", &seed.to_string()])
        .output()
        .expect("run scripts/ledger_crash.py");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "crash check failed");
    assert!(text.contains("ok: 120 requests"), "{text}");
}

#[test]
fn sigkilled_settlement_loop_loses_nothing_and_pays_nothing_twice() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (seed, backend) in [(1, Backend::Sqlite), (2, Backend::Postgres)] {
        if let Some(db) = rt.block_on(common::fresh(backend)) {
            crash_loop(&db.url, seed);
        }
    }
}
