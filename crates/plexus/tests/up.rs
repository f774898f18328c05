//! End to end: `plexus up --nodes 3` (three real node processes and the gateway) serving the
//! real SmolLM2 model, driven by the official `openai` Python client (tests/openai_client.py,
//! then tests/openai_billing.py: exact charges, a cancelled stream charged only for what was
//! produced, 402 and 401), then stopped with SIGINT, which must stop the nodes too. Then the
//! ledger it leaves: each node holds the gateway's vouchers for exactly its earnings, and
//! after the (test-short) challenge window each node's claimable earnings equal its accepted
//! receipts' work times its price.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

#[path = "support/procs.rs"]
mod procs;
use procs::children_of;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The challenge window of the test's ledger, seconds.
const WINDOW_S: u64 = 30;
/// Micro-PLX per completion token: above what the nodes' work on any of the clients'
/// requests costs at 1000 per 1000 position-layers (30 per position for the whole model), so
/// every node is paid in full (no pro-rata sharing).
const PRICE: u64 = 3000;

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A started `plexus up`: its API URL, dev key and output lines up to the curl line.
struct Started {
    up: Up,
    url: String,
    key: String,
    lines: Vec<String>,
    curl: String,
}

/// Starts `plexus up` on the real model with `args` (after `up`), its cache in `cache`, and
/// waits for its API URL and key.
fn start_up(args: &[&str], cache: &Path) -> Started {
    let model = plexus_testkit::real_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .arg("up")
        .args(args)
        .arg("--model")
        .arg(&model)
        .env("PLEXUS_CACHE_DIR", cache)
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
    Started {
        up,
        url,
        key,
        lines,
        curl,
    }
}

/// Ctrl-C: `plexus up` and its nodes stop within 30 s, successfully.
fn stop_up(up: Up) {
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

/// `plexus status --json` of the ledger `plexus up` left in `base`, for the key in `base/dir`.
fn status(base: &Path, dir: &str) -> serde_json::Value {
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
}

/// The account of the status' own key.
fn mine(v: &serde_json::Value) -> serde_json::Value {
    v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["this_node"] == true)
        .cloned()
        .unwrap_or_else(|| panic!("no account of this node: {v}"))
}

/// What each of the first `n` nodes of a `plexus up` run in `cache` has staked, from its own
/// `plexus status`.
fn node_stakes(cache: &Path, n: usize) -> Vec<u64> {
    let base = cache.join("up");
    (0..n)
        .map(|i| {
            mine(&status(&base, &format!("node-{i}")))["staked"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// A counter from a `/metrics` page.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn plexus_up_serves_the_openai_client_and_stops_cleanly() {
    let python = std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let cache = tempfile::tempdir().unwrap();
    let Started {
        up,
        url,
        key,
        lines,
        curl,
    } = start_up(
        &[
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
        ],
        cache.path(),
    );
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

    // The Anthropic, Responses and Ollama dialects through the split network: the same
    // greedy text as the chat completion, a stream, tool calls, exact charges.
    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/dialects_client.py"))
        .args([&url, &key, &PRICE.to_string(), "quick"])
        .output()
        .expect("run the python dialect checks");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("all dialect checks passed"));

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
    assert!(counter(&metrics, "plexus_stage_receipts") > 0, "{metrics}");
    assert_eq!(
        counter(&metrics, "plexus_stage_receipts_refused"),
        0,
        "{metrics}"
    );
    // Issue 9: the client's `n = 3` requests (two, and one streamed) share their prompt: each
    // choice after the first forks the chain before it, and no stage refused a fork.
    assert!(counter(&metrics, "plexus_chain_forks") >= 6, "{metrics}");
    assert_eq!(
        counter(&metrics, "plexus_chain_forks_refused"),
        0,
        "{metrics}"
    );
    assert!(
        counter(&metrics, "plexus_chain_forked_positions") >= 6 * 10,
        "{metrics}"
    );
    // Every accepted receipt carries its 32-byte commitment.
    assert_eq!(
        counter(&metrics, "plexus_commitment_bytes"),
        32 * counter(&metrics, "plexus_stage_receipts"),
        "{metrics}"
    );
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
        let c = |name: &str| counter(&m, name);
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

    stop_up(up);

    // The ledger it leaves: each node was paid into its locked earnings for its receipted
    // work (equal spans at equal prices: equal pay for serving, plus a checker's pay when a
    // job was drawn for audit at the 1% floor: nodes load each other's spans to check them),
    // the gateway kept the rest of what the client spent, and nothing more was paid than
    // spent.
    let status = |dir: &str| status(&base, dir);
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
    assert!(nodes.iter().all(|&n| n > 0), "{nodes:?}");
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

/// Issue 11: `plexus up` with one node cheating (random outputs, undercutting on price so
/// routing picks it) among three serving the whole model, every job audited
/// (`--audit-probability 1`). The cheater is caught on its first job (its auditor's
/// recomputation differs, the referee sides with the auditor), excluded from routing and
/// slashed; the stream it was serving fails over with the honest text; the client is refunded
/// its share of the slash and the auditor paid its challenger share; the honest nodes keep
/// their stakes.
#[test]
fn a_cheating_node_is_caught_excluded_and_slashed_while_streams_go_on_issue_11() {
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "--nodes",
        "3",
        "--stages",
        "1",
        "--static-spans",
        "--port",
        "0",
        "--threads",
        "1",
        "--node-price",
        "20000",
        "--node-stake",
        "100PLX",
        "--audit-probability",
        "1",
        "--audit-referees",
        "1",
        "--cheat",
        "random",
    ];
    let Started {
        up,
        url,
        key,
        lines,
        ..
    } = start_up(&args, cache.path());
    assert!(
        lines[0].contains("3 nodes") && lines[0].contains("0..30, 0..30, 0..30"),
        "{lines:?}"
    );
    let texts = audited_streams(&url, &key, 3, 0);
    // The first stream met the cheater; the later ones only honest nodes: same greedy text.
    assert!(
        texts.len() == 3 && texts.iter().all(|t| *t == texts[0]),
        "{texts:?}"
    );

    let metrics = http_get(&url, "/metrics", &key);
    let c = |name: &str| counter(&metrics, name);
    eprintln!(
        "audits {} (unavailable {}), calls passed {}, disputes {}, convictions {}, commitment \
         bytes {} over {} tokens",
        c("plexus_audits"),
        c("plexus_audits_unavailable"),
        c("plexus_audit_calls_passed"),
        c("plexus_audit_disputes"),
        c("plexus_audit_convictions"),
        c("plexus_commitment_bytes"),
        c("plexus_chain_tokens"),
    );
    assert_eq!(c("plexus_audit_convictions"), 1, "{metrics}");
    assert_eq!(c("plexus_audit_disputes"), 1, "{metrics}");
    assert!(c("plexus_audit_calls_passed") > 0, "{metrics}");
    assert_eq!(c("plexus_audits_unavailable"), 0, "{metrics}");
    assert!(c("plexus_chain_failovers") >= 1, "{metrics}");
    // Published reputations: the convicted cheater 0, the honest nodes above it.
    let reputations: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("plexus_node_reputation{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    eprintln!("reputations {reputations:?}");
    assert!(reputations.len() >= 3, "{metrics}");
    assert_eq!(
        reputations.iter().filter(|r| **r == 0.0).count(),
        1,
        "{metrics}"
    );
    assert!(
        reputations.iter().filter(|r| **r > 0.0).count() >= 2,
        "{metrics}"
    );

    // Issue 9: `n = 2` with every job still audited, through the two honest nodes (one
    // serves, the other audits). The second choice forks the first's chain: its provider
    // already holds the shared prompt when its job is drawn, and its auditor is fed those
    // positions with the first call, so their commitments agree: no dispute, no conviction.
    let before = (c("plexus_audit_calls_passed"), c("plexus_chain_forks"));
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Name three colours of the sea."}],
        "n": 2,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 3,
    });
    let answer = ureq::post(&format!("{url}/v1/chat/completions"))
        .header("Authorization", &format!("Bearer {key}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        answer["choices"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    let metrics = http_get(&url, "/metrics", &key);
    let c = |name: &str| counter(&metrics, name);
    assert_eq!(c("plexus_chain_forks"), before.1 + 1, "{metrics}");
    assert_eq!(c("plexus_chain_forks_refused"), 0, "{metrics}");
    assert!(c("plexus_audit_calls_passed") >= before.0 + 16, "{metrics}");
    assert_eq!(c("plexus_audit_disputes"), 1, "{metrics}");
    assert_eq!(c("plexus_audit_convictions"), 1, "{metrics}");
    stop_up(up);

    let base = cache.path().join("up");
    let nodes: Vec<serde_json::Value> = (0..3)
        .map(|i| mine(&status(&base, &format!("node-{i}"))))
        .collect();
    eprintln!("nodes after: {nodes:?}");
    let stake = 100_000_000u64;
    // The cheater (node 0) lost its stake and anything locked; the honest nodes kept theirs.
    assert_eq!(nodes[0]["staked"], 0, "{:?}", nodes[0]);
    assert_eq!(nodes[0]["locked"], 0, "{:?}", nodes[0]);
    for n in &nodes[1..] {
        assert_eq!(n["staked"].as_u64(), Some(stake), "{n:?}");
    }
    // The challenger (the auditor) was paid half of the slash (ledger default 50%).
    let paid: u64 = nodes[1..]
        .iter()
        .map(|n| n["available"].as_u64().unwrap())
        .sum();
    assert_eq!(paid, stake / 2, "{nodes:?}");
    // The cheater's audit probability in `plexus status` is now 1 (nothing at stake), the
    // honest nodes' the floor.
    assert_eq!(nodes[0]["audit_probability"], 1.0, "{:?}", nodes[0]);
    assert_eq!(nodes[1]["audit_probability"], 0.01, "{:?}", nodes[1]);
    // The client (the account that spent) got its refund share (25%) of the slash back:
    // it holds its faucet funds minus what it spent plus the refund.
    let all = status(&base, "gateway");
    let client = all["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["spent"].as_u64().unwrap_or(0) > 0)
        .cloned()
        .unwrap_or_else(|| panic!("no client account: {all}"));
    let (available, spent) = (
        client["available"].as_u64().unwrap(),
        client["spent"].as_u64().unwrap(),
    );
    assert_eq!(available + spent, 100_000_000 + stake / 4, "{client}");

    // Started again on the same directory, node 0 still cheating: the gateway read its audit
    // book back, so the cheater is convicted before any request (reputation 0), never routed
    // to, audited or staked again; the streams give the honest text with no dispute.
    let book = std::fs::read_to_string(base.join("gateway/audits.json")).unwrap();
    let book: serde_json::Value = serde_json::from_str(&book).unwrap();
    assert_eq!(
        book["convicted"].as_array().map(Vec::len),
        Some(1),
        "{book}"
    );
    let Started { up, url, key, .. } = start_up(&args, cache.path());
    let zero = |metrics: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("plexus_node_reputation{"))
            .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(0.0))
            .count()
    };
    // (Node 0 may announce a moment after the first full route.)
    let started = Instant::now();
    loop {
        let metrics = http_get(&url, "/metrics", &key);
        if zero(&metrics) == 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{metrics}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let again = audited_streams(&url, &key, 3, 0);
    assert!(again.iter().all(|t| *t == texts[0]), "{again:?}");
    let metrics = http_get(&url, "/metrics", &key);
    let c = |name: &str| counter(&metrics, name);
    assert_eq!(c("plexus_audit_disputes"), 0, "{metrics}");
    assert_eq!(c("plexus_audit_convictions"), 0, "{metrics}");
    assert!(c("plexus_audit_calls_passed") > 0, "{metrics}");
    assert_eq!(zero(&metrics), 1, "{metrics}");
    stop_up(up);
    assert_eq!(mine(&status(&base, "node-0"))["staked"], 0);
}

/// Issue 11: `plexus up`'s default network, one node per span (three stages, no replica),
/// every job audited, node 0 cheating (random activations, asking price 0) alone on layers
/// 0..10. Before, no node shared its span, so it was never audited (`plexus_audits_unavailable`)
/// and cheated unseen; and once a sole server was convicted, placement still counted it, so
/// no honest node took its layers and every request waited for a route. Now the other nodes
/// load 0..10 to audit and referee it, the gateway convicts and slashes it and announces the
/// verdict, the nodes (trusting `plexus up`'s gateway) plan without it and take its layers
/// over, and every stream completes with the honest text.
#[test]
fn a_cheater_alone_on_its_span_is_audited_convicted_and_its_layers_taken_over_issue_11() {
    let cache = tempfile::tempdir().unwrap();
    let Started {
        up,
        url,
        key,
        lines,
        ..
    } = start_up(
        &[
            "--nodes",
            "3",
            "--port",
            "0",
            "--threads",
            "1",
            "--node-price",
            "20000",
            "--node-stake",
            "100PLX",
            "--audit-probability",
            "1",
            "--audit-referees",
            "1",
            "--cheat",
            "random",
        ],
        cache.path(),
    );
    assert!(
        lines[0].contains("3 nodes") && lines[0].contains("0..10, 10..20, 20..30"),
        "{lines:?}"
    );
    let texts = audited_streams(&url, &key, 4, 0);
    assert!(
        texts.len() == 4 && texts.iter().all(|t| *t == texts[0]) && !texts[0].is_empty(),
        "{texts:?}"
    );
    let metrics = http_get(&url, "/metrics", &key);
    let c = |name: &str| counter(&metrics, name);
    eprintln!(
        "audits {} (unavailable {}), calls passed {}, disputes {}, convictions {}, failovers {}",
        c("plexus_audits"),
        c("plexus_audits_unavailable"),
        c("plexus_audit_calls_passed"),
        c("plexus_audit_disputes"),
        c("plexus_audit_convictions"),
        c("plexus_chain_failovers"),
    );
    assert_eq!(c("plexus_audit_convictions"), 1, "{metrics}");
    assert_eq!(c("plexus_audits_unavailable"), 0, "{metrics}");
    assert!(c("plexus_audit_calls_passed") > 0, "{metrics}");
    assert!(c("plexus_chain_failovers") >= 1, "{metrics}");
    stop_up(up);
    // The cheater (node 0) lost its stake; the honest nodes kept theirs.
    assert_eq!(node_stakes(cache.path(), 3), [0, 100_000_000, 100_000_000]);
}

/// Runs `audit_client.py` (the official `openai` client): `n` greedy streams of the same chat
/// with a system prompt of `repeats` sentences; the texts.
fn audited_streams(url: &str, key: &str, n: usize, repeats: usize) -> Vec<String> {
    audited_chats(url, key, n, repeats, 24, false)
}

/// [`audited_streams`] of `max_tokens` each, a different question in each chat when `vary`.
fn audited_chats(
    url: &str,
    key: &str,
    n: usize,
    repeats: usize,
    max_tokens: usize,
    vary: bool,
) -> Vec<String> {
    let python = std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/audit_client.py"))
        .arg(url)
        .arg(key)
        .arg(n.to_string())
        .arg(repeats.to_string())
        .arg(max_tokens.to_string())
        .arg(if vary { "vary" } else { "same" })
        .output()
        .expect("run the python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the streams failed");
    let texts: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    texts["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

/// `plexus up` flags for the cross-build audit tests: `nodes` nodes in `stages` stages on
/// static spans, one thread each, every job audited with one referee, node 0 on the untiled
/// arithmetic (another build, and price 0 so routing prefers it).
fn untiled_node0_args(nodes: &'static str, stages: &'static str) -> Vec<&'static str> {
    vec![
        "--nodes",
        nodes,
        "--stages",
        stages,
        "--static-spans",
        "--port",
        "0",
        "--threads",
        "1",
        "--node-price",
        "20000",
        "--audit-probability",
        "1",
        "--audit-referees",
        "1",
        "--node0-arithmetic",
        "untiled",
    ]
}

/// Issue 11, across builds: five nodes in chains of two stages, node 0 on a build of its own
/// (`--node0-arithmetic untiled`: honest, but its activations differ from the others' by up to
/// a few %) and asking price 0 so routing picks it, every job audited. Before, a node whose
/// build nobody else announced was never audited (`plexus_audits_unavailable`): a cheater
/// only had to announce a build of its own.
///
/// - Honest: its jobs are audited by nodes of the other build within the published band, and
///   it is never disputed, let alone convicted.
/// - Cheating as well (`--cheat random`): the first audited call's windows are far outside the
///   band (gross, not a marginal miss), the referee confirms it: convicted and slashed, with
///   the streams going on with the honest text.
#[test]
fn audits_across_builds_spare_an_honest_node_of_another_build_and_convict_a_cheating_one_issue_11()
{
    let run = |cheat: bool| {
        let cache = tempfile::tempdir().unwrap();
        let mut args = untiled_node0_args("5", "2");
        if cheat {
            args.extend(["--cheat", "random"]);
        }
        let Started {
            up,
            url,
            key,
            lines,
            ..
        } = start_up(&args, cache.path());
        // Node 0 shares its span with two nodes of the other build: an auditor and a referee.
        assert!(
            lines[0].contains("0..15, 0..15, 0..15, 15..30, 15..30"),
            "{lines:?}"
        );
        // About 150 prompt positions: the tiled kernel, and five windows in the prefill call.
        let texts = audited_streams(&url, &key, 3, 5);
        let metrics = http_get(&url, "/metrics", &key);
        stop_up(up);
        let c = |name: &str| counter(&metrics, name);
        eprintln!(
            "cheat {cheat}: audits {} (unavailable {}, across builds {}), calls passed {}, band \
             comparisons {} (misses {}), disputes {}, convictions {}",
            c("plexus_audits"),
            c("plexus_audits_unavailable"),
            c("plexus_audits_cross_build"),
            c("plexus_audit_calls_passed"),
            c("plexus_audit_band_comparisons"),
            c("plexus_audit_band_misses"),
            c("plexus_audit_disputes"),
            c("plexus_audit_convictions"),
        );
        assert_eq!(c("plexus_audits_unavailable"), 0, "{metrics}");
        assert!(c("plexus_audits_cross_build") >= 1, "{metrics}");
        let stakes = node_stakes(cache.path(), 5);
        (texts, metrics, stakes)
    };
    let c = |metrics: &str, name: &str| counter(metrics, name);

    let (_, metrics, stakes) = run(false);
    // Three jobs of node 0, each a prefill call and 23 one-token calls, all compared.
    assert!(c(&metrics, "plexus_audits_cross_build") >= 3, "{metrics}");
    assert!(
        c(&metrics, "plexus_audit_band_comparisons") >= 3 * 24,
        "{metrics}"
    );
    assert_eq!(c(&metrics, "plexus_audit_band_misses"), 0, "{metrics}");
    assert_eq!(c(&metrics, "plexus_audit_disputes"), 0, "{metrics}");
    assert_eq!(c(&metrics, "plexus_audit_convictions"), 0, "{metrics}");
    assert!(stakes.iter().all(|s| *s == 100_000_000), "{stakes:?}");

    let (texts, metrics, stakes) = run(true);
    assert_eq!(c(&metrics, "plexus_audit_disputes"), 1, "{metrics}");
    assert_eq!(c(&metrics, "plexus_audit_convictions"), 1, "{metrics}");
    // Its first call's windows are far outside the band (gross): one confirmed miss convicts.
    assert_eq!(c(&metrics, "plexus_audit_band_misses"), 1, "{metrics}");
    assert!(c(&metrics, "plexus_chain_failovers") >= 1, "{metrics}");
    // The stream that met the cheater went on with the honest text, as the later ones.
    assert!(
        texts.len() == 3 && texts.iter().all(|t| *t == texts[0]),
        "{texts:?}"
    );
    assert_eq!(stakes[0], 0, "{stakes:?}");
    assert!(stakes[1..].iter().all(|s| *s == 100_000_000), "{stakes:?}");
}

/// Issue 11, a last stage across builds: three nodes each serving the whole model, node 0 on
/// the untiled arithmetic (another build) at price 0, every job audited. Its logits differ from
/// the other build's by a few %, so some greedy tokens flip between near-equal candidates:
/// each auditor reports its top log-probabilities, and the gateway admits such a flip as a
/// near tie (`plexus_verify::near_tie`) instead of disputing it. Before, every flip was a
/// dispute, a failover and a recorded miss against an honest node.
#[test]
fn a_last_stage_of_another_build_passes_its_near_ties_issue_11() {
    let cache = tempfile::tempdir().unwrap();
    let args = untiled_node0_args("3", "1");
    let Started { up, url, key, .. } = start_up(&args, cache.path());
    let texts = audited_streams(&url, &key, 3, 5);
    let metrics = http_get(&url, "/metrics", &key);
    stop_up(up);
    let c = |name: &str| counter(&metrics, name);
    eprintln!(
        "audits {} (across builds {}), calls passed {}, band comparisons {} (near ties {}, \
         misses {}), disputes {}, failovers {}; texts {texts:?}",
        c("plexus_audits"),
        c("plexus_audits_cross_build"),
        c("plexus_audit_calls_passed"),
        c("plexus_audit_band_comparisons"),
        c("plexus_audit_token_near_ties"),
        c("plexus_audit_band_misses"),
        c("plexus_audit_disputes"),
        c("plexus_chain_failovers"),
    );
    assert!(c("plexus_audits_cross_build") >= 3, "{metrics}");
    assert!(c("plexus_audit_band_comparisons") >= 3 * 24, "{metrics}");
    assert!(c("plexus_audit_token_near_ties") >= 1, "{metrics}");
    assert_eq!(c("plexus_audit_disputes"), 0, "{metrics}");
    assert_eq!(c("plexus_audit_band_misses"), 0, "{metrics}");
    assert_eq!(c("plexus_audit_convictions"), 0, "{metrics}");
    assert_eq!(c("plexus_chain_failovers"), 0, "{metrics}");
    let stakes = node_stakes(cache.path(), 3);
    assert!(stakes.iter().all(|s| *s == 100_000_000), "{stakes:?}");
}

/// Issue 11, a last stage that steers within the near-tie rule: as above, with node 0 also
/// returning its runner-up token wherever that token's logit is within 0.5 of the sampled one's
/// (`--cheat pick`). Many such tokens pass its checkers of the other build as near ties, some
/// do not (disputes, failovers); what convicts it is their number: near ties, and wide ones,
/// improbable for an honest node against both checkers (`plexus_verify::ties`). The streams
/// all complete, and node 0 alone is slashed.
#[test]
fn a_last_stage_that_picks_among_near_ties_is_convicted_by_their_number_issue_11() {
    let cache = tempfile::tempdir().unwrap();
    let mut args = untiled_node0_args("3", "1");
    args.extend(["--cheat", "pick"]);
    let Started { up, url, key, .. } = start_up(&args, cache.path());
    // Chats in rounds of 40 until the conviction, at most 80: a statistical verdict (a
    // binomial tail under 1e-6 against the less damning of the two checkers) came within 40
    // chats in most runs, not in all (2 of about 12 runs over two sessions did not).
    let mut texts = Vec::new();
    let mut metrics = String::new();
    for _ in 0..2 {
        texts.extend(audited_chats(&url, &key, 40, 2, 48, true));
        metrics = http_get(&url, "/metrics", &key);
        if counter(&metrics, "plexus_audit_near_tie_convictions") > 0 {
            break;
        }
    }
    stop_up(up);
    let c = |name: &str| counter(&metrics, name);
    eprintln!(
        "audits {} (across builds {}), band comparisons {} (near ties {}, wide {}, misses {}), \
         disputes {}, failovers {}, near-tie convictions {}, convictions {}; texts {texts:?}",
        c("plexus_audits"),
        c("plexus_audits_cross_build"),
        c("plexus_audit_band_comparisons"),
        c("plexus_audit_token_near_ties"),
        c("plexus_audit_token_wide_near_ties"),
        c("plexus_audit_band_misses"),
        c("plexus_audit_disputes"),
        c("plexus_chain_failovers"),
        c("plexus_audit_near_tie_convictions"),
        c("plexus_audit_convictions"),
    );
    assert!(texts.len() == 40 || texts.len() == 80, "{}", texts.len());
    assert_eq!(c("plexus_audit_near_tie_convictions"), 1, "{metrics}");
    let stakes = node_stakes(cache.path(), 3);
    assert!(stakes[0] < 100_000_000, "{stakes:?}");
    assert!(stakes[1..].iter().all(|s| *s == 100_000_000), "{stakes:?}");
}

/// Issue 10: the gateway pays providers during a stream, not only when it ends. `plexus up` is
/// SIGKILLed (then its nodes) in the middle of a long stream, after the nodes have kept
/// vouchers for three windows of it: each node holds a voucher of the gateway for its work
/// before the kill (at most one window of tokens behind). Started again on the same data, the
/// gateway settles the killed request paying each node exactly the voucher it holds and the
/// client the rest back: nothing promised lost, nothing paid twice, the client's balance adds
/// up to its faucet.
#[test]
fn a_gateway_killed_mid_stream_pays_the_vouchers_its_nodes_hold_issue_10() {
    use std::io::{Read, Write};
    let cache = tempfile::tempdir().unwrap();
    let price = PRICE.to_string();
    let args = [
        "--nodes",
        "3",
        "--port",
        "0",
        "--threads",
        "1",
        "--price",
        &price,
        "--node-price",
        "1000",
    ];
    let Started { up, url, key, .. } = start_up(&args, cache.path());
    let models: serde_json::Value =
        serde_json::from_str(&http_get(&url, "/v1/models", &key)).unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_owned();
    let before: serde_json::Value =
        serde_json::from_str(&http_get(&url, "/v1/account", &key)).unwrap();
    // Greedy, the special tokens banned: the stream cannot end before its 2000 tokens.
    let body = format!(
        r#"{{"model":"{model}","stream":true,"max_tokens":2000,"temperature":0,"logit_bias":{{"0":-100,"1":-100,"2":-100}},"messages":[{{"role":"user","content":"Write a long story."}}]}}"#
    );
    let addr = url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the stream as it comes (so the gateway never waits on us).
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    // Vouchers of the stream's fourth window or later kept by each of the three nodes (the
    // gateway's count of kept vouchers sums over nodes, and deliveries to one node may lag the
    // others': each node's own file is what its wallet reads after the kill).
    let base = cache.path().join("up");
    let kept_nonce = |i: usize| -> u64 {
        let path = base.join(format!("node-{i}")).join("vouchers.jsonl");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["voucher"]["nonce"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let started = Instant::now();
    loop {
        let m = http_get(&url, "/metrics", &key);
        assert_eq!(counter(&m, "plexus_vouchers_refused"), 0, "{m}");
        assert_eq!(counter(&m, "plexus_vouchers_failed"), 0, "{m}");
        if (0..3).all(|i| kept_nonce(i) >= 4) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "no vouchers of the fourth window at every node during the stream: {:?} {m}",
            (0..3).map(kept_nonce).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let held: serde_json::Value =
        serde_json::from_str(&http_get(&url, "/v1/account", &key)).unwrap();
    assert_eq!(
        held["escrow"],
        2000 * PRICE,
        "the stream still runs: {held}"
    );
    let nodes = children_of(up.0.id());
    assert_eq!(nodes.len(), 3);
    let mut up = up;
    up.0.kill().unwrap();
    up.0.wait().unwrap();
    for pid in nodes {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    reader.join().unwrap();

    let ledger = format!("sqlite://{}", base.join("ledger.db").display());
    let vouchers = |i: usize| -> Vec<serde_json::Value> {
        let out = wallet(
            &base,
            &format!("node-{i}"),
            &ledger,
            &["vouchers", "--json"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // Each node holds one voucher for the killed request, issued during the stream (its second
    // window or later), unpaid yet: at least two windows of 16 decoded positions through its
    // 10 layers at 1 micro-PLX per position-layer.
    let mut held_vouchers = Vec::new();
    for i in 0..3 {
        let vs = vouchers(i);
        assert_eq!(vs.len(), 1, "node {i}: {vs:?}");
        let v = &vs[0];
        assert!(v["paid"].is_null(), "node {i}: {v}");
        let amount = v["voucher"]["voucher"]["cumulative"].as_u64().unwrap();
        assert!(amount >= 10 * 31, "node {i}: {v}");
        assert!(
            v["voucher"]["voucher"]["nonce"].as_u64().unwrap() >= 4,
            "node {i}: {v}"
        );
        held_vouchers.push(amount);
    }
    eprintln!("vouchers held at the kill: {held_vouchers:?}");

    // Restarted on the same data: the killed request is settled for exactly those vouchers.
    let Started {
        up,
        url,
        key: again,
        ..
    } = start_up(&args, cache.path());
    assert_eq!(again, key, "the dev key survives the restart");
    let after: serde_json::Value =
        serde_json::from_str(&http_get(&url, "/v1/account", &key)).unwrap();
    stop_up(up);
    let paid: u64 = held_vouchers.iter().sum();
    assert_eq!(after["escrow"], 0, "{after}");
    assert_eq!(
        after["spent"].as_u64().unwrap(),
        before["spent"].as_u64().unwrap() + paid,
        "the client paid exactly the vouchers: {after}"
    );
    assert_eq!(
        after["available"].as_u64().unwrap() + after["spent"].as_u64().unwrap(),
        before["available"].as_u64().unwrap() + before["spent"].as_u64().unwrap(),
        "balances add up: {after}"
    );
    for (i, amount) in held_vouchers.iter().enumerate() {
        let me = mine(&status(&base, &format!("node-{i}")));
        assert_eq!(me["locked"].as_u64(), Some(*amount), "node {i}: {me}");
        let vs = vouchers(i);
        assert_eq!(vs.len(), 1, "node {i}: {vs:?}");
        assert_eq!(
            vs[0]["paid"].as_u64(),
            Some(*amount),
            "node {i}: {:?}",
            vs[0]
        );
    }
}
