//! `plexus gateway`: serves one local model over the OpenAI-compatible HTTP API
//! (`plexus_gateway`) until SIGINT or SIGTERM, then shuts down gracefully.
//!
//! With `--bootstrap` (or `--mdns`) it serves through the network instead: the model file
//! gives the tokenizer, chat template and identity, and nodes announcing that identity run it.
//!
//! Prints `listening on http://HOST:PORT` (the bound port, so `--port 0` works) on stdout as
//! soon as it accepts connections; everything else goes to stderr.

use anyhow::Context as _;
use clap::Args;
use plexus_gateway::{GatewayConfig, LocalBackend};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Flags of `plexus gateway`.
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// A .gguf file or a Hugging Face model directory to serve.
    #[arg(long, short)]
    pub model: PathBuf,
    /// The name clients put in "model" and see in /v1/models (default: the file name without
    /// .gguf and quant tag, which is accepted too); `--alias` is llama-server's name for it.
    #[arg(long, visible_alias = "alias")]
    pub model_id: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (printed on stdout).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Generations running at once (locally they run as one batch).
    #[arg(long, default_value_t = 32)]
    pub max_concurrent: usize,
    /// KV cache memory for all running generations, in MiB (local mode); a request whose
    /// prompt + max_tokens does not fit gets 429 server_overloaded. Default: half the memory
    /// available at start.
    #[arg(long)]
    pub kv_budget_mib: Option<u64>,
    /// Requests that may wait for a generation slot; beyond that, 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body in bytes; beyond that, 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds in-flight requests get to finish at shutdown before they are cancelled.
    #[arg(long, default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// CPU threads for the engine (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Serve through the network instead of in this process: join through --bootstrap (or
    /// --mdns) and route each request over a chain of nodes announcing this model.
    #[command(flatten)]
    pub net: crate::cli::NetArgs,
    /// Activations between stages (network mode): f32 (default: exact, the tokens of one
    /// process), f16 or int8 (half or a quarter of the bytes for slow links; answers may part
    /// from the single-process ones where two tokens nearly tie).
    #[arg(long, default_value = "f32")]
    pub wire: String,
    #[command(flatten)]
    pub ledger: super::ledger::LedgerArgs,
    #[command(flatten)]
    pub rules: super::ledger::LedgerRulesArgs,
    /// Price per completion token, in micro-PLX (default 1). It is what a ledger charges, so
    /// it is refused with `--ledger none`.
    #[arg(long)]
    pub price: Option<plexus_ledger::Amount>,
    #[command(flatten)]
    pub routing: RoutingArgs,
    /// Require this static key from clients (`Authorization: Bearer KEY` or `x-api-key: KEY`);
    /// /health stays open. Only with `--ledger none`: with a ledger, clients authenticate with
    /// their per-account keys instead, and giving both is refused.
    #[arg(long, env = "PLEXUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Also allow browser pages from this origin (repeatable; `*`: any). Pages served from
    /// localhost are always allowed.
    #[arg(long = "cors-origin")]
    pub cors_origins: Vec<String>,
    /// Benchmark only: serve timestamps every N ms instead of running the model
    /// (bench/gateway_overhead.sh).
    #[arg(long, hide = true)]
    pub bench_echo_ms: Option<u64>,
}

/// How the network backend weighs price (network mode only).
#[derive(clap::Args, Debug, Clone)]
pub struct RoutingArgs {
    /// Never route to nodes asking more than this, micro-PLX per 1000 positions per layer
    /// (network mode).
    #[arg(long)]
    pub max_price: Option<u64>,
    /// Micro-PLX one second of latency per token is worth when routing weighs a node's price
    /// against its speed; 0 ignores price (network mode; default 1000).
    #[arg(long)]
    pub time_value: Option<f64>,
    /// Audit every provider's jobs with this probability (0..=1) instead of the
    /// Proof-of-Sampling probability from its price and stake (network mode; tests and demos:
    /// 1 audits every job).
    #[arg(long, value_name = "P")]
    pub audit_probability: Option<f64>,
    /// Share of auditors assumed to collude with a cheater, in [0, 1): raises the PoSP audit
    /// probability (network mode; default 0.1).
    #[arg(long, value_name = "R")]
    pub collusion: Option<f64>,
    /// Referees a disputed audit goes to (odd; fewer when fewer nodes serve the span; network
    /// mode; default 3).
    #[arg(long, value_name = "K")]
    pub audit_referees: Option<usize>,
}

impl RoutingArgs {
    /// Applies the flags to a network client's config.
    pub fn apply(&self, c: &mut plexus_node::client::ClientConfig) -> anyhow::Result<()> {
        c.max_price = self.max_price;
        if let Some(v) = self.time_value {
            if !v.is_finite() || v < 0.0 {
                anyhow::bail!("--time-value {v}: expected a non-negative number");
            }
            c.time_value = v;
        }
        if let Some(p) = self.audit_probability {
            if !(0.0..=1.0).contains(&p) {
                anyhow::bail!("--audit-probability {p}: expected a probability in [0, 1]");
            }
            c.audit.probability = Some(p);
        }
        if let Some(r) = self.collusion {
            if !(0.0..1.0).contains(&r) {
                anyhow::bail!("--collusion {r}: expected a share in [0, 1)");
            }
            c.audit.collusion = r;
        }
        if let Some(k) = self.audit_referees {
            if k == 0 || k % 2 == 0 {
                anyhow::bail!("--audit-referees {k}: expected an odd number of referees");
            }
            c.audit.referees = k;
        }
        Ok(())
    }

    fn any(&self) -> bool {
        self.max_price.is_some()
            || self.time_value.is_some()
            || self.audit_probability.is_some()
            || self.collusion.is_some()
            || self.audit_referees.is_some()
    }
}

impl GatewayArgs {
    fn config(&self) -> GatewayConfig {
        GatewayConfig::new()
            .with_max_concurrent(self.max_concurrent)
            .with_max_queue(self.max_queue)
            .with_max_body_bytes(self.max_body_bytes)
            .with_shutdown_grace(Duration::from_secs(self.shutdown_grace_secs))
            .with_api_key(self.api_key.clone())
            .with_cors_origins(self.cors_origins.clone())
    }
}

pub fn run(a: GatewayArgs) -> anyhow::Result<()> {
    super::model_path(Some(&a.model))?;
    let data_dir = a.net.data_dir();
    super::ledger::check_auth(a.ledger.url(&data_dir)?.is_some(), a.api_key.as_deref())?;
    if !a.net.bootstrap.is_empty() || a.net.mdns {
        return run_network(a);
    }
    if a.routing.any() {
        anyhow::bail!(
            "--max-price, --time-value and the audit flags (--audit-probability, --collusion, \
             --audit-referees) concern network nodes; this gateway serves the model in its own \
             process (add --bootstrap or --mdns)"
        );
    }
    let pb = crate::progress::spinner(&format!("loading {}", a.model.display()));
    let cache = super::cache_dir();
    let serve = plexus_model::serve::ServeConfig {
        kv_budget: a
            .kv_budget_mib
            .map_or_else(plexus_node::measure::default_kv_budget, |m| m << 20),
        ..plexus_model::serve::ServeConfig::default()
    };
    let backend = LocalBackend::load_with(&a.model, cache.as_deref(), serve)
        .with_context(|| format!("cannot load model {}", a.model.display()))?;
    pb.finish_and_clear();
    let entry = backend.entry().clone();
    if let Some(ms) = a.bench_echo_ms {
        let entry_id = entry.id.clone();
        let echo = plexus_gateway::echo::EchoBackend::new(entry, Duration::from_millis(ms));
        let runtime = super::net::runtime()?;
        runtime.block_on(listen_and_serve(&a, Arc::new(echo), None, &entry_id))?;
        runtime.shutdown_timeout(Duration::from_secs(5));
        return Ok(());
    }
    eprintln!(
        "serving {}{} (context {}, identity {})",
        entry.id,
        a.model_id
            .as_deref()
            .map(|n| format!(" as {n}"))
            .unwrap_or_default(),
        entry.context,
        entry.identity
    );
    let runtime = super::net::runtime()?;
    runtime.block_on(listen_and_serve(&a, Arc::new(backend), None, &entry.id))?;
    // Blocking generation threads were cancelled at shutdown; do not wait on a stray one.
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

/// Binds `--host:--port`, prints `listening on URL`, and serves `backend` until SIGINT or
/// SIGTERM, then shuts down gracefully.
async fn listen_and_serve(
    a: &GatewayArgs,
    backend: Arc<dyn plexus_gateway::Backend>,
    network: Option<plexus_node::client::NetworkClient>,
    model: &str,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let data_dir = a.net.data_dir();
    let accounts =
        super::ledger::open_accounts(&a.ledger, &a.rules, &data_dir, &a.net.key()?, a.price)
            .await?;
    if let (Some(accounts), Some(client)) = (&accounts, network) {
        // Audit probabilities follow the nodes' stakes on this ledger.
        tokio::spawn(plexus_gateway::slashing::keep_stakes(
            accounts.clone(),
            client,
            Duration::from_secs(5),
        ));
    }
    // Ctrl-C is caught from here on, before the address is printed.
    let shutdown = super::net::shutdown_signal();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on http://{addr}")?;
    stdout.flush()?;
    let mut config = a.config();
    // Both backends name the model after its file; `--model-id` / `--alias` is the name it
    // is served under (listed and answered with; the file's name is accepted too).
    if let Some(name) = a.model_id.as_deref().filter(|n| *n != model) {
        config = config.with_alias(model, name);
    }
    let state = plexus_gateway::AppState::with_accounts(backend, config, accounts);
    plexus_gateway::serve_state(listener, state, shutdown)
        .await
        .context("the server failed")
}

/// The gateway's audit book in its data directory (`plexus_node::audit::book_file`).
pub const AUDIT_BOOK: &str = "audits.json";

/// Reads the audit book at `path`, refusing a damaged one (before anything starts).
pub fn read_audit_book(
    path: &std::path::Path,
) -> anyhow::Result<(plexus_node::audit::BookFile, plexus_node::audit::AuditBook)> {
    let file = plexus_node::audit::BookFile::new(path);
    let book = file.load()?;
    let (convicted, doubted) = (book.convicted_count(), book.doubted().len());
    if convicted + doubted > 0 {
        eprintln!(
            "audit book {}: {convicted} node(s) convicted, {doubted} doubted (delete the file, \
             with the gateway stopped, to forgive them)",
            path.display()
        );
    }
    Ok((file, book))
}

/// Stops a network gateway: the audit book is saved once more, whether serving ended well
/// (`served`) or not (then a failed save is said, and the serving error returned).
pub async fn save_audit_book(
    client: &plexus_node::client::NetworkClient,
    served: anyhow::Result<()>,
) -> anyhow::Result<()> {
    let saved = client.save_book().await;
    match (served, saved) {
        (Err(e), Err(s)) => {
            eprintln!("error: {s}");
            Err(e)
        }
        (served, saved) => {
            served?;
            Ok(saved?)
        }
    }
}

fn run_network(a: GatewayArgs) -> anyhow::Result<()> {
    use plexus_gateway::network::NetworkBackend;
    use plexus_node::client::{ClientConfig, NetworkClient};
    if a.kv_budget_mib.is_some() {
        anyhow::bail!(
            "--kv-budget-mib sets the local engine's KV memory; through the network each node \
             has its own (plexus node --kv-budget-mib)"
        );
    }
    let wire = a
        .wire
        .parse()
        .map_err(anyhow::Error::msg)
        .context("bad --wire")?;
    // The audit book first: a damaged one stops the gateway before it joins the network.
    let data_dir = a.net.data_dir();
    let (book_file, book) = read_audit_book(&data_dir.join(AUDIT_BOOK))?;
    let key = a.net.key()?;
    let mut net = a.net.config(key)?;
    if a.net.listen.is_empty() {
        net = net.with_listen(vec!["/ip4/0.0.0.0/tcp/0".parse()?]);
    }
    let runtime = super::net::runtime()?;
    runtime.block_on(async {
        let mut client_config = ClientConfig::new(net);
        client_config.wire = wire;
        a.routing.apply(&mut client_config)?;
        let client = NetworkClient::start(client_config)?;
        client.keep_book(book_file, book)?;
        let mut backend = NetworkBackend::new(client.clone());
        let cache = super::cache_dir();
        let entry = backend
            .add_model(&a.model, cache.as_deref())
            .with_context(|| format!("cannot read model {}", a.model.display()))?
            .clone();
        eprintln!(
            "serving {} through the network (identity {}); gateway peer {} (nodes trust its \
             audit verdicts with --trust-verdicts {})",
            entry.id,
            entry.identity,
            client.handle().peer_id(),
            client.handle().peer_id()
        );
        let served = listen_and_serve(&a, Arc::new(backend), Some(client.clone()), &entry.id).await;
        save_audit_book(&client, served).await
    })?;
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}
