#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! `plexus sim` on the real model, as the verification issue asks it to be checked (with a
//! smaller job count than the 2000 of BENCHMARKS.md): no honest provider slashed, every
//! cheater that cheats on more than 1% of its jobs caught with a negative net profit, audit
//! overhead at most 5% of total compute (measured in positions computed, so the assertion does
//! not depend on the machine's speed), and the same JSON for the same seed; and `plexus models
//! requantize`, which makes the default substitute.

use std::path::PathBuf;
use std::process::Command;

fn model() -> PathBuf {
    plexus_testkit::real_model()
}

fn sim(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .arg("sim")
        .arg("--model")
        .arg(model())
        .args(args)
        .arg("--json")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run plexus sim");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "plexus sim failed: {err}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {err}"))
}

#[test]
fn sim_catches_every_cheater_and_slashes_no_honest_node() {
    let r = sim(&["--jobs", "600", "--seed", "7", "--max-tokens", "2"]);
    eprintln!("{r}");
    assert_eq!(r["jobs"], 600);
    assert_eq!(r["honest_slashed"], 0, "{r}");
    assert_eq!(r["false_positive_rate"], 0.0);
    assert!(
        r["honest_net_profit_min"].as_i64().unwrap() > 0,
        "honest work must pay"
    );
    let cheaters = r["cheaters"].as_array().unwrap();
    assert_eq!(cheaters.len(), 8, "one of each cheating kind");
    for c in cheaters {
        let acted = c["jobs"].as_u64().unwrap() + c["audits_done"].as_u64().unwrap();
        let share = c["cheated_jobs"].as_u64().unwrap() as f64 / acted.max(1) as f64;
        if share > 0.01 {
            assert_eq!(c["caught"], true, "{c}");
            assert!(c["net_profit"].as_i64().unwrap() < 0, "{c}");
            assert!(c["jobs_to_detection"].as_u64().is_some(), "{c}");
        }
    }
    let overhead = r["audit_overhead_positions"].as_f64().unwrap();
    assert!(overhead <= 0.05, "audit overhead {overhead}");
    // Jobs of a few positions leave every window partial: the figure is per position of these
    // short jobs (BENCHMARKS.md gives the long-job figure beside TOPLOC's 258 B / 32 tokens).
    let bytes = r["commitment_bytes_per_token"].as_f64().unwrap();
    assert!(bytes > 0.0 && bytes < 16.0, "{bytes}");
}

#[test]
fn sim_is_deterministic_and_refuses_bad_flags() {
    let strip = |mut v: serde_json::Value| {
        for k in [
            "audit_overhead",
            "audit_seconds",
            "provider_seconds",
            "seconds",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    let a = strip(sim(&["--jobs", "12", "--seed", "3", "--max-tokens", "2"]));
    let b = strip(sim(&["--jobs", "12", "--seed", "3", "--max-tokens", "2"]));
    assert_eq!(a, b);
    let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(["sim", "--jobs", "1", "--cheat-rate", "2"])
        .arg("--model")
        .arg(model())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cheat-rate"));
}

#[test]
fn requantize_writes_a_loadable_model_and_refuses_unknown_types() {
    let dir = tempfile::tempdir().unwrap();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny/smollm2/model-f32.gguf");
    let out = dir.path().join("q8.gguf");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_plexus"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&[
        "models",
        "requantize",
        src.to_str().unwrap(),
        "--to",
        "q8_0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["models", "inspect", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Q8_0"));
    let o = run(&[
        "models",
        "requantize",
        src.to_str().unwrap(),
        "--to",
        "q9_9",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("q9_9"));
}
