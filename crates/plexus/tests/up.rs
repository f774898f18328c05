//! End to end: `plexus up --nodes 3` (three real node processes and the gateway) serving the
//! real SmolLM2 model, driven by the official `openai` Python client, then stopped with
//! SIGINT, which must stop the nodes too.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pids of processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        if after.split_whitespace().nth(1) == Some(&pid.to_string()) {
            out.push(child);
        }
    }
    out
}

#[test]
fn plexus_up_serves_the_openai_client_and_stops_cleanly() {
    let python = std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let model = repo().join("../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args([
            "up",
            "--nodes",
            "3",
            "--port",
            "0",
            "--threads",
            "1",
            "--model",
        ])
        .arg(&model)
        .env("PLEXUS_CACHE_DIR", cache.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let up = Up(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("up: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut lines = Vec::new();
    let url = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("plexus up did not print its API URL in time");
        lines.push(line.clone());
        if let Some(u) = line.strip_prefix("API: ") {
            break u.trim_end_matches("/v1").to_owned();
        }
    };
    let mut key = None;
    let curl = loop {
        let line = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        if let Some(k) = line.strip_prefix("API key: ") {
            key = Some(k.to_owned());
        }
        if line.trim_start().starts_with("curl ") {
            break line;
        }
    };
    let key = key.expect("plexus up prints `API key: KEY`");
    assert!(
        curl.contains(&format!("Authorization: Bearer {key}")),
        "{curl}"
    );
    assert!(
        lines[0].contains("3 nodes") && lines[0].contains("0..10, 10..20, 20..30"),
        "{lines:?}"
    );
    assert!(curl.contains(&url), "{curl}");
    assert_eq!(children_of(up.0.id()).len(), 3, "three node processes");

    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/openai_client.py"))
        .arg(&url)
        .arg(&key)
        .output()
        .expect("run the python client");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("all checks passed"));

    // Ctrl-C: everything stops, nodes included.
    let pid = up.0.id();
    assert!(Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let mut up = up;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = up.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "plexus up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    assert!(children_of(pid).is_empty());
}
