//! Slow links: every `plexus node` process sits in its own network namespace, joined to the
//! root namespace by a veth pair rate-limited with `tc tbf` (100 Mbit/s each way), and is
//! reached only through a delaying TCP relay (`bench/delay_relay.py`, 20 ms each way; the
//! kernel here has no `netem`). The client runs in this process, in the root namespace.
//!
//! - Policy routing (`bench/netns.sh`) refuses the root namespace's own packets to the
//!   namespaces unless they carry the relays' firewall mark: the test checks a direct dial
//!   fails, and counts the bytes the relays carried.
//! - For 1-, 2- and 3-stage chains it measures the per-token decode latency through the relays
//!   at 0 ms (compute + software overhead) and at 20 ms, and checks the slow one against the
//!   model `stages x RTT + compute + transfer`, and the text against the whole model run in
//!   this process (f32 activations: exact).
//!
//! Needs root, `ip netns`, veth, `tc tbf` and python3; without them it fails saying which is
//! missing (they are all present in this project's CI, where it runs; `nat.rs` does the same).
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_core::keys::NodeKey;
use plexus_core::wire::DType;
use plexus_model::generate::{generate, generate_with, Flow, GenerateRequest};
use plexus_model::SamplingParams;
use plexus_net::{Multiaddr, NetConfig, PeerId};
use plexus_node::client::{ClientConfig, NetworkClient};
use std::io::{BufRead, BufReader, Lines, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

/// Namespace name prefix and subnet byte (10.B.k.0/30); bench/slow_link.sh uses 212.
const NS: &str = "plxsl";
const SUBNET: u8 = 211;
const STAGES_MAX: usize = 3;
const DELAY_MS: f64 = 20.0;
const RATE_BITS: f64 = 100e6;
const TOKENS: usize = 24;

fn model() -> PathBuf {
    plexus_testkit::real_model()
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench")
}

fn netns_sh(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(bench_dir().join("netns.sh"))
        .args(args)
        .output()
        .unwrap()
}

/// The namespaces; torn down when dropped (also when the test panics).
struct Namespaces;

impl Namespaces {
    fn up() -> Self {
        // A leftover from a killed run would make `up` fail.
        Self::down();
        let out = netns_sh(&["up", NS, &SUBNET.to_string(), &STAGES_MAX.to_string()]);
        assert!(
            out.status.success(),
            "netns.sh up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Namespaces
    }

    fn down() {
        netns_sh(&["down", NS, &SUBNET.to_string(), &STAGES_MAX.to_string()]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        Self::down();
    }
}

/// A `plexus node` in namespace `k`, killed when dropped.
struct NodeProc {
    child: Child,
    peer: PeerId,
    port: u16,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(k: usize, span: &str, dir: &Path) -> NodeProc {
    let ip = format!("10.{SUBNET}.{k}.2");
    // `ip netns exec` execs the command, so the child's pid is the node's.
    let mut child = Command::new("ip")
        .args(["netns", "exec", &format!("{NS}{k}")])
        .arg(env!("CARGO_BIN_EXE_plexus"))
        .args(["node", "--threads", "1", "--span", span, "--listen"])
        .arg(format!("/ip4/{ip}/tcp/0"))
        .arg("--model")
        .arg(model())
        .arg("--data-dir")
        .arg(dir)
        .env("PLEXUS_CACHE_DIR", dir.join("cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut peer = None;
    let addr: String = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("node {span} exited before listening"))
            .unwrap();
        if let Some(p) = line.strip_prefix("peer ") {
            peer = Some(p.parse::<PeerId>().unwrap());
        }
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    // `/ip4/10.B.k.2/tcp/PORT`
    let port = addr
        .split('/')
        .skip_while(|p| *p != "tcp")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    NodeProc {
        child,
        peer: peer.unwrap(),
        port,
    }
}

/// A delaying relay in the root namespace; stopped (stdin closed) when dropped.
struct Relay {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    port: u16,
}

#[derive(Clone, Copy, Debug, Default)]
struct RelayStats {
    up: u64,
    down: u64,
    late_us_max: u64,
}

impl Relay {
    fn start(target: &str) -> Self {
        let mut child = Command::new("python3")
            .arg(bench_dir().join("delay_relay.py"))
            .args(["--listen", "127.0.0.1:0", "--target", target])
            .args(["--delay-ms", "0", "--mark", &SUBNET.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().unwrap().unwrap();
        let port = line.rsplit(':').next().unwrap().parse().unwrap();
        Relay {
            child,
            stdin,
            lines,
            port,
        }
    }

    fn command(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        self.lines.next().unwrap().unwrap()
    }

    fn set_delay(&mut self, ms: f64) {
        self.command(&format!("delay {ms}"));
    }

    fn stats(&mut self) -> RelayStats {
        let line = self.command("stats");
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap()
                .parse()
                .unwrap()
        };
        RelayStats {
            up: field("up"),
            down: field("down"),
            late_us_max: field("late_us_max"),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn client(rt: &tokio::runtime::Runtime, boot: Vec<Multiaddr>) -> NetworkClient {
    let _guard = rt.enter();
    let net = NetConfig::new(NodeKey::generate())
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
        .with_bootstrap(boot);
    let mut config = ClientConfig::new(net);
    config.wire = DType::F32;
    NetworkClient::start(config).unwrap()
}

/// What one delayed run measured.
struct Run {
    stages: usize,
    compute_ms: f64,
    measured_ms: f64,
    model_ms: f64,
    bytes_per_token: f64,
    late_ms_max: f64,
}

#[test]
fn per_token_latency_over_slow_links_follows_stages_times_rtt() {
    let check = netns_sh(&["check"]);
    assert!(
        check.status.success(),
        "slow_link needs root, ip netns, veth and tc tbf: {}{}",
        String::from_utf8_lossy(&check.stdout).trim(),
        String::from_utf8_lossy(&check.stderr).trim()
    );
    assert!(
        Command::new("python3").arg("--version").output().is_ok(),
        "slow_link needs python3 for bench/delay_relay.py"
    );
    let _ns = Namespaces::up();
    let local = plexus_model::load(&model()).unwrap();
    let digest = plexus_model::identity::identity(&[model()], None, |_, _| {}).unwrap();
    let tokens = local
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let req = GenerateRequest {
        prompt_tokens: tokens,
        max_tokens: TOKENS,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
    };
    let want = generate(
        std::slice::from_ref(&local.stage),
        &local.tokenizer,
        &req,
        |_| Flow::Continue,
    )
    .unwrap();
    assert_eq!(
        want.tokens.len(),
        TOKENS,
        "the prompt must not hit EOS early"
    );
    let context = local.config.max_position_embeddings;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for spans in [
        &["0..30"][..],
        &["0..15", "15..30"][..],
        &["0..10", "10..20", "20..30"][..],
    ] {
        let stages = spans.len();
        let nodes: Vec<NodeProc> = spans
            .iter()
            .enumerate()
            .map(|(i, s)| spawn_node(i + 1, s, &dir.path().join(format!("s{stages}n{i}"))))
            .collect();
        // The namespaces are unreachable from here except through the relays.
        for (i, n) in nodes.iter().enumerate() {
            let direct = format!("10.{SUBNET}.{}.2:{}", i + 1, n.port);
            let dial = std::net::TcpStream::connect_timeout(
                &direct.parse().unwrap(),
                Duration::from_secs(2),
            );
            assert!(dial.is_err(), "{direct} is reachable without the relay");
        }
        let mut relays: Vec<Relay> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| Relay::start(&format!("10.{SUBNET}.{}.2:{}", i + 1, n.port)))
            .collect();
        let boot = nodes
            .iter()
            .zip(&relays)
            .map(|(n, r)| {
                format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", r.port, n.peer)
                    .parse()
                    .unwrap()
            })
            .collect();
        let client = client(&rt, boot);
        assert!(
            rt.block_on(client.wait_for_route(&digest, 30, Duration::from_secs(60))),
            "no route appeared through the relays"
        );
        let run = |relays: &mut [Relay]| {
            let before: Vec<RelayStats> = relays.iter_mut().map(Relay::stats).collect();
            let mut chain = client
                .open_chain(digest, 30, context, req.sampling.clone())
                .unwrap();
            assert_eq!(chain.route().len(), stages);
            let got =
                generate_with(&mut chain, &local.tokenizer, &req, |_| Flow::Continue).unwrap();
            drop(chain);
            assert_eq!(got.tokens, want.tokens, "{stages} stages");
            assert_eq!(got.text, want.text);
            let after: Vec<RelayStats> = relays.iter_mut().map(Relay::stats).collect();
            let decoded = (got.prompt_tokens + got.tokens.len()) as f64;
            let per_relay: Vec<f64> = before
                .iter()
                .zip(&after)
                .map(|(b, a)| (a.up + a.down - b.up - b.down) as f64 / decoded)
                .collect();
            let late = after.iter().map(|a| a.late_us_max).max().unwrap_or(0);
            let per_token_ms = got.decode_time.as_secs_f64() * 1e3 / (got.tokens.len() - 1) as f64;
            (per_token_ms, per_relay, late as f64 / 1e3)
        };
        // Warm-up (connections, first-call allocations), then compute + overhead at 0 ms.
        run(&mut relays);
        let (compute_ms, _, _) = run(&mut relays);
        for r in &mut relays {
            r.set_delay(DELAY_MS);
        }
        let (measured_ms, per_relay, late_ms_max) = run(&mut relays);
        // Every stage call crossed its relay: a token id or a row of 576 f32 activations
        // each way, plus framing.
        for (i, b) in per_relay.iter().enumerate() {
            let floor = if i == 0 { 100.0 } else { 576.0 * 4.0 };
            assert!(
                *b > floor,
                "relay {i} carried only {b:.0} bytes per token: calls bypass it?"
            );
        }
        let bytes_per_token: f64 = per_relay.iter().sum();
        let transfer_ms = bytes_per_token * 8.0 / RATE_BITS * 1e3;
        let model_ms = stages as f64 * 2.0 * DELAY_MS + compute_ms + transfer_ms;
        eprintln!(
            "{stages} stage(s): measured {measured_ms:.1} ms/token, model {model_ms:.1} \
             (= {stages} x {:.0} ms RTT + compute {compute_ms:.1} + transfer {transfer_ms:.2}), \
             {bytes_per_token:.0} B/token through the relays, relay lateness max {late_ms_max:.1} ms",
            2.0 * DELAY_MS
        );
        runs.push(Run {
            stages,
            compute_ms,
            measured_ms,
            model_ms,
            bytes_per_token,
            late_ms_max,
        });
    }
    eprintln!("stages | compute ms | measured ms/token | model ms/token | ratio | B/token | relay late max ms");
    for r in &runs {
        eprintln!(
            "{} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.1}",
            r.stages,
            r.compute_ms,
            r.measured_ms,
            r.model_ms,
            r.measured_ms / r.model_ms,
            r.bytes_per_token,
            r.late_ms_max
        );
    }
    for r in &runs {
        assert!(
            r.measured_ms >= r.model_ms * 0.8 && r.measured_ms <= r.model_ms * 1.5 + 50.0,
            "{} stage(s): measured {:.1} ms/token, model {:.1}",
            r.stages,
            r.measured_ms,
            r.model_ms
        );
    }
}
