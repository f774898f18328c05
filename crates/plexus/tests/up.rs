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

    // Structured outputs and tool calls through the split network: the last stage samples
    // under the gateway's grammar masks; every answer parses and validates.
    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/structured_client.py"))
        .args([&url, &key, "1", "quick"])
        .output()
        .expect("run the python structured-output checks");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("all structured checks passed"));

    // Every stage call the client's requests made came back with a receipt the gateway
    // accepted (three honest nodes: none refused).
    let metrics = http_get(&url, "/metrics", &key);
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
            .trim()
            .parse()
            .unwrap()
    };
    assert!(counter("plexus_stage_receipts") > 0, "{metrics}");
    assert_eq!(counter("plexus_stage_receipts_refused"), 0, "{metrics}");

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

    // The ledger it leaves: each node was paid into its locked earnings for its receipted
    // work (equal spans at equal prices: equal pay), the gateway kept the rest of what the
    // client spent, and nothing more was paid than spent.
    let base = cache.path().join("up");
    let status = |dir: &str| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
            .args(["status", "--json", "--data-dir"])
            .arg(base.join(dir))
            .arg("--ledger")
            .arg(format!("sqlite://{}", base.join("ledger.db").display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let mine = |v: &serde_json::Value| -> serde_json::Value {
        v["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["this_node"] == true)
            .cloned()
            .unwrap_or_else(|| panic!("no account of this node: {v}"))
    };
    let nodes: Vec<u64> = (0..3)
        .map(|i| {
            mine(&status(&format!("node-{i}")))["locked"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let all = status("gateway");
    let fee = mine(&all)["locked"].as_u64().unwrap();
    let spent: u64 = all["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["spent"].as_u64().unwrap())
        .sum();
    eprintln!("spent {spent}: nodes {nodes:?}, gateway {fee}");
    assert!(
        nodes[0] > 0 && nodes.iter().all(|&n| n == nodes[0]),
        "{nodes:?}"
    );
    assert_eq!(nodes.iter().sum::<u64>() + fee, spent, "{all}");
}

/// `GET path` with the key; the body.
fn http_get(url: &str, path: &str, key: &str) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n")
        .map_or(text.clone(), |(_, b)| b.to_owned())
}
