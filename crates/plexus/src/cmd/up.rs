//! `plexus up`: a whole local network in one command. Starts `--nodes` node processes on
//! loopback with the model split across them by placement, joins them from this process as a
//! gateway, waits until a chain covers every layer, prints the API URL and a curl line, and on
//! Ctrl-C stops the gateway (finishing in-flight requests) and then the nodes.
//!
//! Nodes follow placement (unless `--static-spans`): when one dies, the survivors re-plan over
//! fewer stages, load the layers they now need from the model file and announce them, and the
//! gateway's chains replay onto them; streams go on with the same text.
//!
//! Each node process is supervised ([`supervise`]): one that exits while `plexus up` runs is
//! started again (same key, so the same peer id, and its first span) after a backoff of 1 s
//! doubling to 30 s, back to 1 s once a process has run for a minute. The node rejoins and
//! placement rebalances onto it; sessions on nodes that move keep their old layers until they
//! end, so running streams are not broken.

use super::net::{runtime, shutdown_signal};
use crate::cli::UpArgs;
use anyhow::{bail, Context as _};
use plexus_core::keys::NodeKey;
use plexus_gateway::network::NetworkBackend;
use plexus_gateway::GatewayConfig;
use plexus_model::ModelFiles;
use plexus_net::{Multiaddr, NetConfig};
use plexus_node::client::{ClientConfig, NetworkClient};
use plexus_node::placement::{plan, NodeCapacity};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

/// A started node process and the addresses it listens on.
struct NodeProcess {
    child: Child,
    /// The node stops when this closes (`Child::wait` would close it if the child held it).
    stdin: Option<tokio::process::ChildStdin>,
    addrs: Vec<Multiaddr>,
    span: (usize, usize),
}

/// Spans for `n` equal nodes in chains of `stages`: placement's plan for identical machines.
fn spans(layers: usize, n: usize, stages: usize) -> anyhow::Result<Vec<(usize, usize)>> {
    let nodes: Vec<NodeCapacity> = (0..n)
        .map(|i| {
            let key = NodeKey::from_secret([i as u8 + 1; 32])
                .context("deriving a placeholder peer id")?;
            Ok(NodeCapacity {
                peer: key.peer_id(),
                decode_s_per_layer: 1e-3,
                max_layers: layers,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let p = plan(&nodes, layers, Some(stages))?;
    let mut out: Vec<(usize, usize)> = p
        .chains
        .iter()
        .flatten()
        .map(|a| (a.start, a.end))
        .collect();
    out.extend(p.replicas.iter().map(|a| (a.start, a.end)));
    out.sort_unstable();
    Ok(out)
}

/// How `plexus up` starts its nodes.
#[derive(Clone, Copy)]
struct NodeOptions {
    threads: Option<usize>,
    /// Follow placement with chains of this many stages (survivors take over a dead node's
    /// layers); `None`: keep the first span.
    follow: Option<usize>,
    /// `--price` of every node (micro-PLX per 1000 positions per layer).
    price: u64,
    /// Tests: this node cheats (and asks price 0).
    cheat: Option<plexus_node::cheat::Cheat>,
    /// Tests: this node's arithmetic (another build's; it then asks price 0 too).
    arithmetic: plexus_node::engine::Arithmetic,
    /// The gateway whose verdicts the node trusts (`--trust-verdicts`): `plexus up`'s own.
    trust: Option<plexus_net::PeerId>,
    /// Load other nodes' spans to audit them (else `--no-checks`).
    checks: bool,
}

impl NodeOptions {
    /// Whether this is a test-mode node that asks price 0 so routing prefers it.
    fn undercuts(&self) -> bool {
        self.cheat.is_some() || self.arithmetic != plexus_node::engine::Arithmetic::Current
    }
}

async fn start_node(
    model: &Path,
    span: (usize, usize),
    data_dir: &Path,
    bootstrap: &[Multiaddr],
    options: NodeOptions,
) -> anyhow::Result<NodeProcess> {
    let exe = std::env::current_exe().context("cannot find the plexus executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .arg("--model")
        .arg(model)
        .arg("--span")
        .arg(format!("{}..{}", span.0, span.1))
        .arg("--listen")
        .arg("/ip4/127.0.0.1/tcp/0")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .arg("--price")
        .arg(
            if options.undercuts() {
                0
            } else {
                options.price
            }
            .to_string(),
        );
    if let Some(cheat) = options.cheat {
        cmd.arg("--cheat").arg(match cheat {
            plexus_node::cheat::Cheat::Random => "random",
            plexus_node::cheat::Cheat::Noise => "noise",
            plexus_node::cheat::Cheat::Token => "token",
            plexus_node::cheat::Cheat::Pick => "pick",
        });
    }
    if options.arithmetic == plexus_node::engine::Arithmetic::Untiled {
        cmd.arg("--arithmetic").arg("untiled");
    }
    if let Some(t) = options.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    if let Some(gateway) = options.trust {
        cmd.arg("--trust-verdicts").arg(gateway.to_string());
    }
    if !options.checks {
        cmd.arg("--no-checks");
    }
    if let Some(stages) = options.follow {
        cmd.arg("--follow-placement")
            .arg("--plan-equal-speeds")
            .arg("--stages")
            .arg(stages.to_string());
    }
    for b in bootstrap {
        cmd.arg("--bootstrap").arg(b.to_string());
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("cannot start a node process")?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("no stdout from the node")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(a) = line.strip_prefix("listening on ") {
                addrs.push(a.parse::<Multiaddr>()?);
            } else if !addrs.is_empty() {
                break;
            }
            if addrs.len() == 1 {
                // One TCP address is all the gateway needs; later lines are not awaited.
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .context("the node did not start listening within 120 s")??;
    if addrs.is_empty() {
        let status = child.wait().await?;
        bail!(
            "the node for layers {}..{} exited ({status})",
            span.0,
            span.1
        );
    }
    // Keep draining stdout so the node never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(NodeProcess {
        child,
        stdin,
        addrs,
        span,
    })
}

async fn stop_nodes(nodes: &mut [NodeProcess]) {
    // Closing stdin asks each node to stop (see `plexus node --parent-pid`).
    for n in nodes.iter_mut() {
        drop(n.stdin.take());
    }
    for n in nodes.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(5), n.child.wait())
            .await
            .is_err()
        {
            let _ = n.child.kill().await;
        }
    }
}

/// What each node of `plexus up` stakes without `--node-stake`: 100 PLX in micro-PLX.
const DEFAULT_NODE_STAKE: plexus_ledger::Amount = 100_000_000;
/// The dev API key's starting balance when `--faucet` is not given (100 PLX).
const DEFAULT_FAUCET: plexus_ledger::Amount = 100_000_000;

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if let Some(spec) = &args.train {
        return super::up_train::run(&args, spec);
    }
    let model = super::model_path(args.model.as_deref())?;
    let files =
        ModelFiles::open(&model).with_context(|| format!("cannot open {}", model.display()))?;
    let layers = files.config.num_layers;
    drop(files);
    if args.nodes == 0 || args.nodes > layers {
        bail!("--nodes must be between 1 and the model's {layers} layers");
    }
    let stages = args.stages.unwrap_or(args.nodes);
    if stages == 0 || stages > args.nodes {
        bail!("--stages must be between 1 and --nodes ({})", args.nodes);
    }
    // `up` sets every node's price: a cap below it could only ever wait for a route.
    if let Some(max) = args.routing.max_price {
        if max < args.node_price {
            bail!(
                "--max-price {max} is below --node-price {}: the gateway could route to none of this network's nodes",
                args.node_price
            );
        }
    }
    let spans = spans(layers, args.nodes, stages)?;
    let base = super::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("up");
    let has_ledger = args.ledger.url(&base)?.is_some();
    super::ledger::check_auth(has_ledger, args.api_key.as_deref())?;
    super::ledger::check_ledger_flags(
        has_ledger,
        &[
            ("--node-stake", args.node_stake.is_some()),
            ("--faucet", args.faucet.is_some()),
            ("--price", args.price.is_some()),
        ],
    )?;
    let rt = runtime()?;
    rt.block_on(async move {
        eprintln!("starting {} nodes for {}", spans.len(), model.display());
        let mut nodes: Vec<NodeProcess> = Vec::new();
        let result = async {
            // The nodes trust the verdicts of the gateway started beside them: a node it
            // convicts is left out of their placement, and its layers taken over.
            let gateway = NodeKey::load_or_create(&gateway_key_path(&base))
                .with_context(|| "cannot load the gateway key")?
                .peer_id();
            let options = NodeOptions {
                threads: args.threads,
                follow: (!args.static_spans).then_some(stages),
                price: args.node_price,
                cheat: None,
                arithmetic: plexus_node::engine::Arithmetic::Current,
                trust: Some(gateway),
                checks: !args.no_node_checks,
            };
            let first_options = NodeOptions {
                cheat: args.cheat,
                arithmetic: args.node0_arithmetic,
                ..options
            };
            if args.node0_arithmetic != plexus_node::engine::Arithmetic::Current {
                eprintln!(
                    "test mode: node 0 computes with the {:?} arithmetic (another build) and asks price 0",
                    args.node0_arithmetic
                );
            }
            if let Some(cheat) = args.cheat {
                eprintln!("test mode: node 0 cheats ({cheat:?}) and asks price 0");
            }
            let first =
                start_node(&model, spans[0], &base.join("node-0"), &[], first_options).await?;
            let boot = first.addrs.clone();
            nodes.push(first);
            let rest = spans[1..].iter().enumerate().map(|(i, span)| {
                let dir = base.join(format!("node-{}", i + 1));
                let (model, boot) = (model.clone(), boot.clone());
                let span = *span;
                async move { start_node(&model, span, &dir, &boot, options).await }
            });
            for n in futures::future::join_all(rest).await {
                nodes.push(n?);
            }
            let bootstrap: Vec<Multiaddr> = nodes.iter().flat_map(|n| n.addrs.clone()).collect();
            let spans: Vec<(usize, usize)> = nodes.iter().map(|n| n.span).collect();
            // From here on each node process is supervised: restarted when it exits.
            let (stop_tx, stop_rx) = watch::channel(false);
            let book = Arc::new(Mutex::new(AddrBook {
                nodes: nodes.iter().map(|n| n.addrs.clone()).collect(),
                gateway: Vec::new(),
            }));
            let supervisors: Vec<_> = nodes
                .drain(..)
                .enumerate()
                .map(|(i, process)| {
                    let slot = Slot {
                        index: i,
                        model: model.clone(),
                        dir: base.join(format!("node-{i}")),
                        options: if i == 0 { first_options } else { options },
                        book: Arc::clone(&book),
                    };
                    tokio::spawn(supervise(process, slot, stop_rx.clone()))
                })
                .collect();
            let result = serve(&args, &model, &bootstrap, &spans, &book, &base).await;
            let _ = stop_tx.send(true);
            for s in supervisors {
                if let Ok(Some(process)) = s.await {
                    nodes.push(process);
                }
            }
            result
        }
        .await;
        stop_nodes(&mut nodes).await;
        result
    })
}

/// Where a restarted node finds the network: the latest addresses of every node, and the
/// gateway's (always up while `plexus up` runs).
struct AddrBook {
    nodes: Vec<Vec<Multiaddr>>,
    gateway: Vec<Multiaddr>,
}

/// What it takes to start node `index` again.
struct Slot {
    index: usize,
    model: PathBuf,
    dir: PathBuf,
    options: NodeOptions,
    book: Arc<Mutex<AddrBook>>,
}

/// Restart delays of a supervised process: 1 s, doubled after each exit up to 30 s, back to
/// 1 s once a process ran [`Backoff::STABLE`]. Pure: the caller says how long a process ran.
#[derive(Debug)]
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);
    pub(super) const STABLE: Duration = Duration::from_secs(60);

    pub(super) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The delay before the next start, after a process that ran for `ran` (zero: it did not
    /// start at all).
    pub(super) fn after(&mut self, ran: Duration) -> Duration {
        if ran >= Self::STABLE {
            self.next = Self::FIRST;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

/// Keeps node `slot.index` running until `stop` turns true; gives its process back then (for
/// an orderly stop), or `None` when none runs.
async fn supervise(
    mut process: NodeProcess,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) -> Option<NodeProcess> {
    let span = process.span;
    let mut backoff = Backoff::new();
    let mut started = Instant::now();
    loop {
        let status = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Some(process),
            status = process.child.wait() => status,
        };
        let mut delay = backoff.after(started.elapsed());
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        eprintln!(
            "node {} (layers {}..{}) exited ({status}); starting it again in {delay:?}",
            slot.index, span.0, span.1
        );
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            let bootstrap: Vec<Multiaddr> = {
                let book = slot.book.lock().unwrap_or_else(|e| e.into_inner());
                book.gateway
                    .iter()
                    .chain(
                        book.nodes
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| *i != slot.index)
                            .flat_map(|(_, a)| a),
                    )
                    .cloned()
                    .collect()
            };
            let start = start_node(&slot.model, span, &slot.dir, &bootstrap, slot.options);
            // A stop during the start drops the half-started child (killed on drop).
            let outcome = tokio::select! {
                _ = stop.wait_for(|s| *s) => return None,
                outcome = start => outcome,
            };
            match outcome {
                Ok(p) => {
                    eprintln!(
                        "node {} is back (layers {}..{})",
                        slot.index, span.0, span.1
                    );
                    slot.book.lock().unwrap_or_else(|e| e.into_inner()).nodes[slot.index] =
                        p.addrs.clone();
                    process = p;
                    started = Instant::now();
                    break;
                }
                Err(e) => {
                    delay = backoff.after(Duration::ZERO);
                    eprintln!(
                        "node {} did not start again ({e:#}); next try in {delay:?}",
                        slot.index
                    );
                }
            }
        }
    }
}

/// Tops up the stake of each node's account (its key in `base/node-I`) to `stake`, from the
/// local faucet; not a node the gateway's audit book convicted (it was slashed for cheating).
async fn stake_nodes(
    accounts: &plexus_gateway::accounts::Accounts,
    base: &Path,
    nodes: usize,
    stake: plexus_ledger::Amount,
    audits: &plexus_node::audit::AuditBook,
) -> anyhow::Result<()> {
    for i in 0..nodes {
        let path = base.join(format!("node-{i}")).join("node.key");
        let key = NodeKey::load_or_create(&path)
            .with_context(|| format!("cannot load the node key {}", path.display()))?;
        if audits.is_convicted(&key.peer_id()) {
            eprintln!(
                "node {i} ({}) was convicted by this gateway's audits: not staked again, never \
                 routed to",
                key.peer_id()
            );
            continue;
        }
        let account = plexus_ledger::address_of(&key.public()).context("node key not secp256k1")?;
        let have = accounts.view(account).await.staked;
        let amount = stake.saturating_sub(have);
        if amount == 0 {
            continue;
        }
        for op in [
            plexus_ledger::Op::Faucet { account, amount },
            plexus_ledger::Op::Stake { account, amount },
        ] {
            accounts
                .execute(op)
                .await
                .with_context(|| format!("cannot stake {amount} for node {i} ({account})"))?;
        }
    }
    Ok(())
}

/// Where `plexus up` keeps its gateway's key.
fn gateway_key_path(base: &Path) -> PathBuf {
    base.join("gateway").join("node.key")
}

async fn serve(
    args: &UpArgs,
    model: &Path,
    bootstrap: &[Multiaddr],
    spans: &[(usize, usize)],
    book: &Mutex<AddrBook>,
    base: &Path,
) -> anyhow::Result<()> {
    // A persistent gateway key: it is the ledger account that opens escrows, so a restarted
    // `plexus up` finds (and releases) what a killed one left open.
    let key_path = gateway_key_path(base);
    let key = NodeKey::load_or_create(&key_path)
        .with_context(|| format!("cannot load the gateway key {}", key_path.display()))?;
    let accounts =
        super::ledger::open_accounts(&args.ledger, &args.rules, base, &key, args.price).await?;
    let dev_key = match &accounts {
        Some(accounts) => Some(
            super::ledger::dev_key(accounts, base, args.faucet.unwrap_or(DEFAULT_FAUCET)).await?,
        ),
        None => None,
    };
    // The gateway's audit book, as a killed or stopped `plexus up` left it: the nodes it
    // convicted stay excluded, and are not staked again.
    let (book_file, audit_book) =
        super::gateway::read_audit_book(&base.join("gateway").join(super::gateway::AUDIT_BOOK))?;
    if let Some(accounts) = &accounts {
        let stake = args.node_stake.unwrap_or(DEFAULT_NODE_STAKE);
        stake_nodes(accounts, base, spans.len(), stake, &audit_book).await?;
    }
    let net = NetConfig::new(key)
        .with_listen(vec!["/ip4/127.0.0.1/tcp/0".parse()?])
        .with_bootstrap(bootstrap.to_vec());
    let mut config = ClientConfig::new(net);
    config.wire = args
        .wire
        .parse()
        .map_err(anyhow::Error::msg)
        .context("bad --wire")?;
    args.routing.apply(&mut config)?;
    let client = NetworkClient::start(config)?;
    client.keep_book(book_file, audit_book)?;
    let me = client.handle().peer_id();
    book.lock().unwrap_or_else(|e| e.into_inner()).gateway = client
        .handle()
        .listen_addrs()
        .await
        .into_iter()
        .map(|a| a.with_p2p(me).unwrap_or_else(|a| a))
        .collect();
    if let Some(accounts) = &accounts {
        tokio::spawn(plexus_gateway::slashing::keep_stakes(
            accounts.clone(),
            client.clone(),
            Duration::from_secs(2),
        ));
    }
    let mut backend = NetworkBackend::new(client.clone());
    let cache = super::cache_dir();
    let entry = backend
        .add_model(model, cache.as_deref())
        .with_context(|| format!("cannot read {}", model.display()))?
        .clone();
    if !backend.wait_for_routes(Duration::from_secs(60)).await {
        bail!("the nodes did not announce a full chain within 60 s");
    }
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let spans: Vec<String> = spans.iter().map(|s| format!("{}..{}", s.0, s.1)).collect();
    let served = args.alias.clone().unwrap_or_else(|| entry.id.clone());
    // Ctrl-C is caught from here on, before the address and the hint are printed.
    let shutdown = shutdown_signal();
    println!(
        "Plexus is up: {} nodes serving {} (layers {})",
        spans.len(),
        served,
        spans.join(", ")
    );
    println!("API: {url}/v1");
    let auth = match &dev_key {
        Some(k) => {
            println!("API key: {k}");
            format!(" -H 'Authorization: Bearer {k}'")
        }
        // `--ledger none --api-key KEY`: the static key the user gave.
        None => match args.api_key.as_deref().filter(|k| !k.is_empty()) {
            Some(k) => format!(" -H 'Authorization: Bearer {k}'"),
            None => String::new(),
        },
    };
    println!("Try:");
    if entry.chat_template.is_some() {
        println!(
            "  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'",
            served
        );
    } else {
        // A model without a chat template (a checkpoint `plexus train` wrote) only completes,
        // and its vocabulary may know a task's characters only: the example prompt is one it
        // encodes.
        let prompt = ["Hello", "hello", "abc|", "123"]
            .into_iter()
            .find(|p| entry.tokenizer.untokenizable(p).is_empty())
            .unwrap_or("Hello");
        println!(
            "  curl {url}/v1/completions{auth} -H 'Content-Type: application/json' -d '{{\"model\":\"{}\",\"prompt\":\"{prompt}\",\"max_tokens\":8}}'",
            served
        );
    }
    println!("Ctrl-C stops everything.");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let state = plexus_gateway::AppState::with_accounts(
        Arc::new(backend),
        match &args.alias {
            Some(name) => GatewayConfig::default().with_alias(entry.id.clone(), name.clone()),
            None => GatewayConfig::default(),
        }
        .with_api_key(args.api_key.clone())
        .with_cors_origins(args.cors_origins.clone()),
        accounts,
    );
    let served = plexus_gateway::serve_state(listener, state, shutdown).await;
    super::gateway::save_audit_book(&client, served.map_err(anyhow::Error::from)).await?;
    eprintln!("stopping the nodes");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn restarts_back_off_and_reset_after_a_stable_run() {
        let mut b = Backoff::new();
        let quick = Duration::from_millis(300);
        let delays: Vec<u64> = (0..7).map(|_| b.after(quick).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 30, 30]);
        // A process that ran a minute was healthy: the next crash waits 1 s again.
        assert_eq!(b.after(Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(b.after(Duration::ZERO), Duration::from_secs(2));
    }
}
