#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! `plexus gateway --alias NAME` and `plexus up --alias NAME` (two nodes: the last stage applies
//! the masks) as processes, on the real model, driven by the official `openai` Python client
//! (tests/grammar_alias_client.py): the alias is listed by /v1/models and accepted as `model`
//! (the file's name too), and llama-server's `grammar` field (GBNF, through `extra_body`, token
//! references included) constrains chat and completions, greedy, sampled and streamed, with bad
//! grammars refused by name.
//!
//! Python comes from `PLEXUS_PYTHON` (default `python3`) with the packages of
//! scripts/requirements-ci.txt.

#[path = "support/served.rs"]
mod served;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn gateway_alias_and_gbnf_grammar_with_the_openai_client() {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plexus"));
    cmd.args(["gateway", "--model"])
        .arg(plexus_testkit::real_model())
        .args([
            "--alias",
            "smol",
            "--port",
            "0",
            "--ledger",
            "none",
            "--threads",
            "2",
        ])
        .env("PLEXUS_CACHE_DIR", cache.path());
    let (_server, url) = served::start(cmd);
    run_client(&url);
}

#[test]
fn up_alias_and_gbnf_grammar_on_split_inference_with_the_openai_client() {
    let cache = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(["up", "--model"])
        .arg(plexus_testkit::real_model())
        .args([
            "--alias",
            "smol",
            "--nodes",
            "2",
            "--port",
            "0",
            "--ledger",
            "none",
            "--threads",
            "1",
        ])
        .env("PLEXUS_CACHE_DIR", cache.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut up = served::Server(child);
    let stdout = up.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("up: {line}");
            let _ = tx.send(line);
        }
    });
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(180))
            .expect("plexus up printed no `API: URL` in time");
        if let Some(u) = line.strip_prefix("API: ") {
            break u.trim_end_matches("/v1").to_owned();
        }
    };
    run_client(&url);
}

/// Runs tests/grammar_alias_client.py against `url` (alias `smol`).
fn run_client(url: &str) {
    let python = std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grammar_alias_client.py");
    let out = Command::new(&python)
        .arg(script)
        .args([url, "smol", "SmolLM2-135M-Instruct"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (set PLEXUS_PYTHON)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all grammar checks passed"),
        "the grammar/alias checks failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
