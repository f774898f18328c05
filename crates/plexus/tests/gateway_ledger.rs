//! The gateway's ledger across a crash: SIGKILL `plexus gateway` in the middle of streamed
//! requests, restart it on the same ledger: the escrows it held are released (nothing stays
//! held forever), and the account adds up to what it was funded with.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn model() -> PathBuf {
    plexus_testkit::real_model()
}

struct Gateway(Child, String);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gateway(data: &Path) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(["gateway", "--port", "0", "--threads", "1", "--model"])
        .arg(model())
        .arg("--data-dir")
        .arg(data)
        .env("PLEXUS_CACHE_DIR", data.join("cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let addr = line
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{line}"))
        .to_owned();
    std::thread::spawn(move || for _ in lines {});
    Gateway(child, addr)
}

fn request(addr: &str, method: &str, path: &str, key: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

fn account(addr: &str, key: &str) -> serde_json::Value {
    let mut s = request(addr, "GET", "/v1/account", key, "");
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn escrow_of_a_killed_gateway_is_released_on_restart() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(["keys", "create", "--faucet", "50000", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("API key: "))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();

    let gw = gateway(data.path());
    // The streams must still be running when the gateway is killed: greedy, with the special
    // tokens (SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>; the end of a turn among them)
    // banned, so no stream can end at an end-of-sequence token before its 2000 tokens.
    let body = r#"{"model":"SmolLM2-135M-Instruct","stream":true,"max_tokens":2000,"temperature":0,"logit_bias":{"0":-100,"1":-100,"2":-100},"messages":[{"role":"user","content":"Write a long story."}]}"#;
    let model_id = {
        let mut s = request(&gw.1, "GET", "/v1/models", &key, "");
        let mut t = String::new();
        s.read_to_string(&mut t).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(t.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        v["data"][0]["id"].as_str().unwrap().to_owned()
    };
    let body = body.replace("SmolLM2-135M-Instruct", &model_id);
    // Two streams open. The local engine runs one generation at a time (`LocalBackend`
    // serializes them), so the second waits for the first to finish: wait until the first has
    // produced text and the second has been admitted (its opening chunk is sent once its escrow
    // is held and its prompt checked), then SIGKILL: one request killed mid-generation, one
    // killed while queued, both holding escrow.
    let next_data = |r: &mut BufReader<TcpStream>| -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "stream ended early");
            if line.starts_with("data: ") {
                return line.clone();
            }
        }
    };
    let mut first = BufReader::new(request(&gw.1, "POST", "/v1/chat/completions", &key, &body));
    loop {
        let line = next_data(&mut first);
        if line.contains("\"content\"") && !line.contains("\"content\":\"\"") {
            break;
        }
    }
    let mut second = BufReader::new(request(&gw.1, "POST", "/v1/chat/completions", &key, &body));
    let opening = next_data(&mut second);
    assert!(opening.contains("\"role\":\"assistant\""), "{opening}");
    let held = account(&gw.1, &key);
    assert_eq!(held["escrow"], 4000, "two holds of 2000 tokens: {held}");
    let mut gw = gw;
    gw.0.kill().unwrap();
    gw.0.wait().unwrap();
    drop((first, second));

    let gw = gateway(data.path());
    let after = account(&gw.1, &key);
    assert_eq!(after["escrow"], 0, "no escrow held after restart: {after}");
    let total = after["available"].as_u64().unwrap() + after["spent"].as_u64().unwrap();
    assert_eq!(total, 50_000, "balances add up: {after}");
    // Nothing was settled for the killed requests: the client is not charged for them.
    assert_eq!(after["spent"], 0, "{after}");
}

/// Routing and audit flags concern network nodes: a gateway serving the model in its own
/// process refuses each of them, by name, instead of ignoring it.
#[test]
fn routing_flags_are_refused_without_a_network() {
    let data = tempfile::tempdir().unwrap();
    for flag in [
        ["--max-price", "5"],
        ["--time-value", "10"],
        ["--audit-probability", "0.5"],
        ["--collusion", "0.2"],
        ["--audit-referees", "3"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
            .args(["gateway", "--port", "0", "--model"])
            .arg(model())
            .args(flag)
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag:?} was accepted");
        assert!(
            err.contains(flag[0]) && err.contains("--bootstrap"),
            "{err}"
        );
    }
}
