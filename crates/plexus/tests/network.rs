//! Multi-process network tests: real `plexus node` processes on loopback, each serving a span
//! of SmolLM2-135M, driven by a client in this process through libp2p.
//!
//! - with default settings, a split chain (2, 3, 4 nodes) generates exactly what the whole model
//!   generates in one process, on every recorded llama.cpp prompt;
//! - killing a stage (SIGKILL) mid-generation fails over to a replica and the text is unchanged.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_core::keys::NodeKey;
use plexus_core::wire::DType;
use plexus_model::generate::{generate, generate_with, Flow, GenerateRequest};
use plexus_model::SamplingParams;
use plexus_net::{Multiaddr, NetConfig, PeerId};
use plexus_node::client::{ClientConfig, NetworkClient};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn model() -> PathBuf {
    plexus_testkit::real_model()
}

/// A `plexus node` process, killed when dropped.
struct NodeProc {
    child: Child,
    peer: PeerId,
    addr: Multiaddr,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(span: &str, dir: &Path, bootstrap: Option<&Multiaddr>) -> NodeProc {
    spawn_node_with(&["--span", span], dir, bootstrap)
}

/// Starts `plexus node` with `span_args` (`--span a..b`, or `--span auto --stages N`).
fn spawn_node_with(span_args: &[&str], dir: &Path, bootstrap: Option<&Multiaddr>) -> NodeProc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plexus"));
    cmd.args(["node", "--threads", "1", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(span_args)
        .arg("--model")
        .arg(model())
        .arg("--data-dir")
        .arg(dir)
        .env("PLEXUS_CACHE_DIR", dir.join("cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(b) = bootstrap {
        cmd.arg("--bootstrap").arg(b.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut peer = None;
    let addr = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("node {span_args:?} exited before listening"))
            .unwrap();
        if let Some(p) = line.strip_prefix("peer ") {
            peer = Some(p.parse::<PeerId>().unwrap());
        }
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.parse::<Multiaddr>().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    NodeProc {
        child,
        peer: peer.unwrap(),
        addr,
    }
}

fn spawn_nodes(spans: &[&str], dir: &Path) -> Vec<NodeProc> {
    let first = spawn_node(spans[0], &dir.join("n0"), None);
    let boot = first.addr.clone();
    let mut nodes = vec![first];
    for (i, span) in spans.iter().enumerate().skip(1) {
        nodes.push(spawn_node(span, &dir.join(format!("n{i}")), Some(&boot)));
    }
    nodes
}

/// A client joined to `nodes`; `wire: None` keeps the default activation type.
fn client(rt: &tokio::runtime::Runtime, nodes: &[NodeProc], wire: Option<DType>) -> NetworkClient {
    let _guard = rt.enter();
    let net = NetConfig::new(NodeKey::generate())
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
        .with_bootstrap(nodes.iter().map(|n| n.addr.clone()).collect());
    let mut config = ClientConfig::new(net);
    if let Some(w) = wire {
        config.wire = w;
    }
    NetworkClient::start(config).unwrap()
}

fn request(prompt: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_tokens: prompt.to_vec(),
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
    }
}

/// Spans for `n` equal nodes, as `plexus up` places them.
fn equal_spans(layers: usize, n: usize) -> Vec<String> {
    use plexus_node::placement::{plan, NodeCapacity};
    let nodes: Vec<NodeCapacity> = (0..n)
        .map(|i| NodeCapacity {
            peer: NodeKey::from_secret([i as u8 + 1; 32]).unwrap().peer_id(),
            decode_s_per_layer: 1e-3,
            max_layers: layers,
        })
        .collect();
    let p = plan(&nodes, layers, Some(n)).unwrap();
    let mut spans: Vec<(usize, usize)> = p
        .chains
        .iter()
        .flatten()
        .map(|a| (a.start, a.end))
        .collect();
    spans.sort_unstable();
    spans.iter().map(|(a, b)| format!("{a}..{b}")).collect()
}

/// The prompts recorded from llama.cpp (tests/fixtures/llamacpp), as token ids.
fn recorded_prompts() -> Vec<(String, Vec<u32>)> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/llamacpp/smollm2-135m-q4_1.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["generate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["prompt_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            (c["name"].as_str().unwrap().to_owned(), ids)
        })
        .collect()
}

/// Tokens a generation agrees on before it parts.
fn agreeing(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Log-probabilities come from the last stage: through the split chain they equal the
/// single-process ones, bit for bit, and the greedy token is the top-1.
fn check_logprobs(
    client: &NetworkClient,
    local: &plexus_model::LoadedModel,
    digest: plexus_core::Digest,
    prompt: &[u32],
) {
    let mut req = request(prompt, 8);
    req.sampling.logprobs = Some(5);
    let want = generate(
        std::slice::from_ref(&local.stage),
        &local.tokenizer,
        &req,
        |_| Flow::Continue,
    )
    .unwrap();
    let mut chain = client
        .open_chain(
            digest,
            local.config.num_layers,
            local.config.max_position_embeddings,
            req.sampling.clone(),
        )
        .unwrap();
    let got = generate_with(&mut chain, &local.tokenizer, &req, |_| Flow::Continue).unwrap();
    assert_eq!(got.logprobs.len(), got.tokens.len());
    assert_eq!(got.logprobs, want.logprobs);
    for (lp, &t) in got.logprobs.iter().zip(&got.tokens) {
        assert_eq!((lp.token, lp.top[0].0, lp.top[0].1), (t, t, lp.logprob));
    }
}

/// Generates `MAX_TOKENS` greedy tokens for every recorded prompt through `n` nodes placed as
/// `plexus up` places them, for each wire (`None`: the default); per wire, the prompts whose
/// tokens equal the single process's and the tokens agreeing before the first difference.
fn split_runs(n: usize, wires: &[Option<DType>], exact: bool) -> Vec<(usize, usize)> {
    const MAX_TOKENS: usize = 48;
    let local = plexus_model::load(&model()).unwrap();
    let layers = local.config.num_layers;
    let digest = plexus_model::identity::identity(&[model()], None, |_, _| {}).unwrap();
    let prompts = recorded_prompts();
    assert!(prompts.len() >= 10);
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(_, p)| {
            generate(
                std::slice::from_ref(&local.stage),
                &local.tokenizer,
                &request(p, MAX_TOKENS),
                |_| Flow::Continue,
            )
            .unwrap()
            .tokens
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spans = equal_spans(layers, n);
    let span_refs: Vec<&str> = spans.iter().map(String::as_str).collect();
    let nodes = spawn_nodes(&span_refs, dir.path());
    let mut out = Vec::new();
    for &wire in wires {
        let client = client(&rt, &nodes, wire);
        assert!(
            rt.block_on(client.wait_for_route(&digest, layers, Duration::from_secs(60))),
            "no route appeared"
        );
        let (mut same, mut agree) = (0, 0);
        for (i, ((name, prompt), want)) in prompts.iter().zip(&want).enumerate() {
            let req = request(prompt, MAX_TOKENS);
            let mut chain = client
                .open_chain(
                    digest,
                    layers,
                    local.config.max_position_embeddings,
                    req.sampling.clone(),
                )
                .unwrap();
            assert_eq!(chain.route().len(), n, "the chain should use the {n} nodes");
            let got =
                generate_with(&mut chain, &local.tokenizer, &req, |_| Flow::Continue).unwrap();
            if exact {
                assert_eq!(&got.tokens, want, "{n} nodes, wire {wire:?}, prompt {name}");
                if i < 2 {
                    check_logprobs(&client, &local, digest, prompt);
                }
            }
            same += usize::from(&got.tokens == want);
            agree += agreeing(&got.tokens, want);
        }
        eprintln!(
            "{n} nodes ({}), wire {}: {same}/{} prompts identical, {agree}/{} tokens before parting",
            spans.join(", "),
            wire.map_or("default".to_owned(), |w| format!("{w:?}")),
            prompts.len(),
            want.iter().map(Vec::len).sum::<usize>()
        );
        out.push((same, agree));
    }
    out
}

/// Default settings are exact: 2, 3 and 4 nodes placed as `plexus up` places them give the
/// single-process engine's tokens on every recorded llama.cpp prompt (issue 7: the old f16
/// default gave the single-process answer on 3 of 6 chat prompts).
/// One test per node count, so each fits the multiprocess group's time limit on a loaded
/// 2-core machine.
#[test]
fn default_split_2_nodes_gives_the_single_process_tokens_issue_7() {
    split_runs(2, &[None], true);
}

#[test]
fn default_split_3_nodes_gives_the_single_process_tokens_issue_7() {
    split_runs(3, &[None], true);
}

#[test]
fn default_split_4_nodes_gives_the_single_process_tokens_issue_7() {
    split_runs(4, &[None], true);
}

/// The lossy wires, measured (docs/network.md quotes the figures): how often f16 and int8
/// activations on a 3-node split still give the single-process tokens. A measurement, not a
/// check: run the test binary directly (nextest's multiprocess limit of 240 s is too short on
/// a loaded 2-core machine): `target/debug/deps/network-* --exact lossy_wire_agreement
/// --ignored --nocapture`.
#[test]
#[ignore = "a measurement (minutes): see the doc comment"]
fn lossy_wire_agreement() {
    split_runs(3, &[Some(DType::F16), Some(DType::I8)], false);
}

#[test]
fn killing_a_stage_mid_generation_fails_over_with_identical_text() {
    let local = plexus_model::load(&model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = spawn_nodes(&["0..10", "10..20", "10..20", "20..30"], dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = client(&rt, &nodes, None);
    let digest = plexus_model::identity::identity(&[model()], None, |_, _| {}).unwrap();
    assert!(rt.block_on(client.wait_for_route(&digest, 30, Duration::from_secs(60))));
    // Past llama.cpp's 64-row switch: the prompt's rows take the tiled attention kernel, on
    // the replacement stage's replay too.
    let tokens = local
        .tokenizer
        .encode(
            "The lighthouse stood on a rocky island far from the coast. Every night its keeper \
             climbed the one hundred and twelve steps to light the lamp, and every morning he \
             wrote in his log what the sea had done. Storms came in winter and fog in spring, \
             but the light never failed. Write a story about this lighthouse keeper:",
            true,
        )
        .unwrap();
    assert!(tokens.len() >= 64, "{} prompt tokens", tokens.len());
    let mut req = request(&tokens, 48);
    req.sampling = SamplingParams {
        temperature: 0.7,
        seed: 42,
        // Log-probabilities show a logit's last bit: the replay must compute what the dead
        // stage computed, kernels included, not only something that samples the same tokens.
        logprobs: Some(3),
        ..SamplingParams::default()
    };
    let context = local.config.max_position_embeddings;
    let mut undisturbed = client
        .open_chain(digest, 30, context, req.sampling.clone())
        .unwrap();
    let want = generate_with(&mut undisturbed, &local.tokenizer, &req, |_| Flow::Continue).unwrap();
    drop(undisturbed);

    let mut chain = client
        .open_chain(digest, 30, context, req.sampling.clone())
        .unwrap();
    let middle = chain.route()[1].peer;
    let victim = nodes.iter().position(|n| n.peer == middle).unwrap();
    let mut pieces = 0;
    let got = generate_with(&mut chain, &local.tokenizer, &req, |_| {
        pieces += 1;
        if pieces == 10 {
            // SIGKILL, mid-stream.
            nodes[victim].child.kill().unwrap();
            nodes[victim].child.wait().unwrap();
        }
        Flow::Continue
    })
    .unwrap();
    assert!(pieces > 10, "the kill must happen mid-generation");
    assert_eq!(chain.failovers(), 1);
    assert_ne!(chain.route()[1].peer, middle);
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.text, want.text);
    assert_eq!(got.logprobs, want.logprobs);
    assert!(!got.logprobs.is_empty());
}

/// The span a node serves now, from its freshly signed announcement.
fn span_of(
    rt: &tokio::runtime::Runtime,
    client: &NetworkClient,
    peer: PeerId,
) -> Option<(u32, u32)> {
    let a = announcement_of(rt, client, peer)?;
    a.models.first().map(|o| (o.start, o.end))
}

/// A node's current announcement, as it answers `Describe`, verified.
fn announcement_of(
    rt: &tokio::runtime::Runtime,
    client: &NetworkClient,
    peer: PeerId,
) -> Option<plexus_core::announce::Announcement> {
    let resp = rt
        .block_on(
            client
                .handle()
                .call(peer, plexus_core::wire::Request::Describe),
        )
        .ok()?;
    let plexus_core::wire::Response::Described(bytes) = resp else {
        return None;
    };
    plexus_core::announce::SignedAnnouncement::decode(&bytes)
        .ok()?
        .verify(plexus_node::discovery::now_ms())
        .ok()
}

fn spawn_auto(dir: &Path, bootstrap: Option<&Multiaddr>) -> NodeProc {
    spawn_node_with(&["--span", "auto", "--stages", "2"], dir, bootstrap)
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn auto_placement_splits_when_a_node_joins_and_merges_when_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut nodes = vec![spawn_auto(&dir.path().join("a"), None)];
    let a = nodes[0].peer;
    let boot = nodes[0].addr.clone();
    nodes.push(spawn_auto(&dir.path().join("b"), Some(&boot)));
    let b = nodes[1].peer;
    let client = client(&rt, &nodes, None);
    // Two nodes, two stages: they move to complementary spans.
    let (sa, sb) = wait_for("a two-stage split", 60, || {
        let (sa, sb) = (span_of(&rt, &client, a)?, span_of(&rt, &client, b)?);
        let (first, second) = if sa.0 == 0 { (sa, sb) } else { (sb, sa) };
        (first.0 == 0 && first.1 == second.0 && second.1 == 30).then_some((sa, sb))
    });
    println!("split: a {sa:?}, b {sb:?}");
    // The split serves a generation end to end.
    let digest = plexus_model::identity::identity(&[model()], None, |_, _| {}).unwrap();
    assert!(rt.block_on(client.wait_for_route(&digest, 30, Duration::from_secs(30))));
    // b leaves: a takes every layer again.
    drop(nodes.pop());
    wait_for("a to serve every layer again", 60, || {
        (span_of(&rt, &client, a) == Some((0, 30))).then_some(())
    });
}

/// Issue 11: a node's announced speed is a claim. Node b claims a decode speed a thousand
/// times its own (`--claim-decode-s-per-layer`, hidden); placed on claims, it would take all
/// but one of the model's 30 layers. Each node times the other's stage calls and announces
/// what it measured; placement takes the measurement over a claim more than twice too fast,
/// so b ends up with a share like a's.
#[test]
fn placement_checks_a_claimed_speed_against_measurement_issue_11() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = spawn_auto(&dir.path().join("a"), None);
    let liar = spawn_node_with(
        &[
            "--span",
            "auto",
            "--stages",
            "2",
            "--claim-decode-s-per-layer",
            "1e-7",
        ],
        &dir.path().join("b"),
        Some(&a.addr),
    );
    let (a_peer, b_peer) = (a.peer, liar.peer);
    let nodes = [a, liar];
    let client = client(&rt, &nodes, None);
    // Each measured the other, and the split settled with the liar on at most 20 layers:
    // the same split seen twice, a second apart.
    let seen = |of: PeerId, by: PeerId| -> Option<f32> {
        let ann = announcement_of(&rt, &client, by)?;
        ann.observed
            .iter()
            .find(|o| o.peer == of.to_string())
            .map(|o| o.decode_s_per_layer)
    };
    let split = || -> Option<((u32, u32), (u32, u32))> {
        let (sa, sb) = (
            span_of(&rt, &client, a_peer)?,
            span_of(&rt, &client, b_peer)?,
        );
        let (first, second) = if sa.0 == 0 { (sa, sb) } else { (sb, sa) };
        (first.0 == 0 && first.1 == second.0 && second.1 == 30).then_some((sa, sb))
    };
    let (measured, claimed_by_b, sb) = wait_for("a measured split", 120, || {
        let measured = seen(b_peer, a_peer)?;
        let by_b = seen(a_peer, b_peer)?;
        let (_, sb) = split()?;
        if sb.1 - sb.0 > 20 {
            return None;
        }
        std::thread::sleep(Duration::from_secs(1));
        (split()?.1 == sb).then_some((measured, by_b, sb))
    });
    println!(
        "b claims 1e-7 s/layer; a measured it at {measured:e}; b measured a at {claimed_by_b:e}; b serves {sb:?}"
    );
    assert!(measured > 1e-5, "a measured b at {measured}");
}

/// `--max-price` (issue 10): a client never routes to a node asking more. One node serves the
/// whole model at price 50: a client capped at 10 knows its offer but finds no route; a client
/// capped at 50 routes to it.
#[test]
fn a_max_price_keeps_the_client_off_dearer_nodes_issue_10() {
    let tmp = tempfile::tempdir().unwrap();
    let node = spawn_node_with(&["--span", "0..30", "--price", "50"], tmp.path(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let digest = plexus_model::identity::identity(&[model()], None, |_, _| {}).unwrap();
    let capped = |max: u64| {
        let _guard = rt.enter();
        let net = NetConfig::new(NodeKey::generate())
            .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
            .with_bootstrap(vec![node.addr.clone()]);
        let mut config = ClientConfig::new(net);
        config.max_price = Some(max);
        NetworkClient::start(config).unwrap()
    };
    let cheap = capped(10);
    wait_for("the node's offer", 60, || {
        let dir = cheap.directory();
        let known = dir
            .offers(&digest)
            .into_iter()
            .any(|(p, a, _)| p == node.peer && a.price == 50);
        known.then_some(())
    });
    assert!(
        !rt.block_on(cheap.wait_for_route(&digest, 30, Duration::from_secs(5))),
        "a client capped at 10 routed to a node asking 50"
    );
    let willing = capped(50);
    assert!(rt.block_on(willing.wait_for_route(&digest, 30, Duration::from_secs(60))));
}
