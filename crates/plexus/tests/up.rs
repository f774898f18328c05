//! End to end: `plexus up --nodes 3` (three real node processes and the gateway) serving the
//! real SmolLM2 model, driven by the official `openai` Python client (tests/openai_client.py,
//! then tests/openai_billing.py: exact charges, a cancelled stream charged only for what was
//! produced, 402 and 401), then stopped with SIGINT, which must stop the nodes too. Then the
//! ledger it leaves: each node holds the gateway's vouchers for exactly its earnings, and
//! after the (test-short) challenge window each node's claimable earnings equal its accepted
//! receipts' work times its price.
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

/// The challenge window of the test's ledger, seconds.
const WINDOW_S: u64 = 30;
/// Micro-PLX per completion token: above what the nodes' work on any of the clients'
/// requests costs at 1000 per 1000 position-layers (30 per position for the whole model), so
/// every node is paid in full (no pro-rata sharing).
const PRICE: u64 = 3000;

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
            "--challenge-window",
            &WINDOW_S.to_string(),
            "--price",
            &PRICE.to_string(),
            "--node-price",
            "1000",
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

    // Billing through the network: a key too poor for 64 tokens, created beside the running
    // gateway (another writer on its ledger).
    let base = cache.path().join("up");
    let ledger = format!("sqlite://{}", base.join("ledger.db").display());
    let keys = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args([
            "keys", "create", "--label", "poor", "--faucet", "10", "--ledger", &ledger,
        ])
        .output()
        .unwrap();
    let keys_out = String::from_utf8_lossy(&keys.stdout);
    let poor = keys_out
        .lines()
        .find_map(|l| l.strip_prefix("API key: "))
        .unwrap_or_else(|| panic!("{keys_out}{}", String::from_utf8_lossy(&keys.stderr)))
        .to_owned();
    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/openai_billing.py"))
        .args([&url, &key, &poor, &PRICE.to_string()])
        .output()
        .expect("run the python billing client");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("all billing checks passed"));

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
    // Each provider's accepted work (position-layers), all at price 1000.
    let work: Vec<(String, u64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("plexus_provider_work_total{account=\""))
        .map(|l| {
            let (account, rest) = l.split_once('"').unwrap();
            assert!(rest.starts_with(",price=\"1000\"}"), "{l}");
            let n = rest.rsplit_once(' ').unwrap().1.parse().unwrap();
            (account.to_lowercase(), n)
        })
        .collect();
    assert_eq!(work.len(), 3, "{metrics}");
    // Vouchers reach the nodes after each settlement (asynchronously): wait for them all.
    let started = Instant::now();
    loop {
        let m = http_get(&url, "/metrics", &key);
        let c = |name: &str| -> u64 {
            m.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
                .unwrap_or_else(|| panic!("no {name} in /metrics"))
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(c("plexus_vouchers_refused"), 0, "{m}");
        assert_eq!(c("plexus_vouchers_failed"), 0, "{m}");
        assert_eq!(c("plexus_vouchers_dropped"), 0, "{m}");
        if c("plexus_vouchers_kept") > 0 && started.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no vouchers kept: {m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

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
    let status = |dir: &str| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
            .args(["status", "--json", "--data-dir"])
            .arg(base.join(dir))
            .arg("--ledger")
            .arg(&ledger)
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

    // Each node's earnings are its accepted receipts' work x its price (1000 per 1000
    // position-layers: one micro-PLX per position-layer), and it holds the gateway's signed
    // vouchers for exactly that: one per request, all paid by their settlements.
    for i in 0..3 {
        let dir = format!("node-{i}");
        let me = mine(&status(&dir));
        let account = me["account"].as_str().unwrap().to_lowercase();
        let w = work
            .iter()
            .find(|(a, _)| *a == account)
            .unwrap_or_else(|| panic!("no work metered for {account}: {work:?}"))
            .1;
        assert_eq!(me["locked"].as_u64().unwrap(), w, "node {i}: {me}");
        assert!(
            me["claimable"].as_u64().unwrap() < w,
            "earnings claimable inside the challenge window: {me}"
        );
        let out = wallet(&base, &dir, &ledger, &["vouchers", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vouchers: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let total: u64 = vouchers
            .iter()
            .map(|v| v["voucher"]["voucher"]["cumulative"].as_u64().unwrap())
            .sum();
        assert_eq!(total, w, "node {i}'s vouchers");
        for v in &vouchers {
            assert_eq!(v["paid"], v["voucher"]["voucher"]["cumulative"], "{v}");
        }
        // Exported and redeemed after its settlement: refused, saying what was paid.
        let request = vouchers[0]["voucher"]["voucher"]["request"]
            .as_array()
            .map_or_else(
                || {
                    vouchers[0]["voucher"]["voucher"]["request"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                },
                |bytes| {
                    bytes
                        .iter()
                        .map(|b| format!("{:02x}", b.as_u64().unwrap()))
                        .collect()
                },
            );
        let out = wallet(&base, &dir, &ledger, &["voucher", &request]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exported: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(exported, vouchers[0]["voucher"]);
        let out = wallet(&base, &dir, &ledger, &["redeem", &request]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && said.contains("already settled"),
            "{said}"
        );
    }

    // After the challenge window every node's earnings are claimable, and a claim makes them
    // available: exactly its receipts' work x its price.
    let settled_by = Instant::now() + Duration::from_secs(WINDOW_S + 1);
    std::thread::sleep(settled_by.saturating_duration_since(Instant::now()));
    for i in 0..3 {
        let dir = format!("node-{i}");
        let me = mine(&status(&dir));
        assert_eq!(
            me["claimable"], me["locked"],
            "node {i} after the window: {me}"
        );
        let out = wallet(&base, &dir, &ledger, &["claim"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let me = mine(&status(&dir));
        let account = me["account"].as_str().unwrap().to_lowercase();
        let w = work.iter().find(|(a, _)| *a == account).unwrap().1;
        assert_eq!(
            me["available"].as_u64().unwrap(),
            w,
            "node {i} claimed: {me}"
        );
        assert_eq!(me["locked"].as_u64().unwrap(), 0, "{me}");
    }
}

/// `plexus wallet --ledger LEDGER --data-dir BASE/DIR ARGS`.
fn wallet(base: &Path, dir: &str, ledger: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_plexus"))
        .arg("wallet")
        .arg("--ledger")
        .arg(ledger)
        .arg("--data-dir")
        .arg(base.join(dir))
        .args(args)
        .output()
        .unwrap()
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
