//! `plexus up --train SPEC`: a distributed training run on this machine. `--nodes` worker
//! processes (`plexus train --distributed SPEC`) find each other on loopback, each with its own
//! data directory (key, per-round checkpoint, final model) under the cache; a worker that exits
//! with an error is started again and resumes from its checkpoint (the run goes on without it
//! meanwhile: its rounds close at their deadlines). Worker 0's progress is shown, and every
//! worker's final line; `up` ends when every worker printed its final line and exited.
//!
//! ```text
//! plexus up --train SPEC ──spawn──▶ worker 0 (listening on A0)
//!                        ──spawn──▶ worker i --peer A0 ... (restarted with every live address)
//!                        ◀─lines── round k/N | ... ; final | ... | saved DIR
//! ```

use super::net::{runtime, shutdown_signal};
use super::up::Backoff;
use crate::cli::UpArgs;
use anyhow::{bail, Context as _};
use plexus_train::spec::{Data, SignedSpec};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::Instant;

/// Restarts of one worker before `up --train` gives up on the run.
const MAX_RESTARTS: u32 = 5;

/// How long a starting worker may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(args: &UpArgs, spec_path: &Path) -> anyhow::Result<()> {
    let spec = SignedSpec::load(spec_path)
        .with_context(|| format!("cannot use the run spec {}", spec_path.display()))?;
    let (min, max) = (
        spec.spec.workers.min as usize,
        spec.spec.workers.max as usize,
    );
    let workers = args.nodes;
    if workers < min || workers > max {
        bail!("--nodes {workers}: the spec's run takes {min} to {max} workers");
    }
    match (spec.spec.data()?, &args.text) {
        (Data::Text { digest, .. }, None) => {
            bail!("this run trains on a text (sha256 {digest}): pass the file with --text FILE")
        }
        (Data::Task(_), Some(_)) => bail!(
            "--text: this run trains on a synthetic task ({}), not a text",
            spec.spec.data.task
        ),
        // Checked here once, so a wrong file fails now rather than in every worker: the text
        // and the model's files by digest (the spec's creator loaded those weights), without
        // reading the weights, which each worker loads.
        (Data::Text { seq_len, .. }, Some(path)) => {
            super::train_net::check_text(&spec, seq_len, path, args.checkpoint.as_deref())?;
        }
        (Data::Task(_), None) => {
            if args.checkpoint.is_some() {
                bail!("--checkpoint: this run trains a fresh model on a synthetic task");
            }
        }
    }
    let base = super::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("up-train")
        .join(spec.run_id().to_string());
    // A run that asks a stake settles on a ledger: this machine's (sqlite in the run's
    // directory unless --ledger), each worker topped up to the stake from its faucet.
    let ledger = match (spec.spec.min_stake(), &args.ledger.ledger) {
        (0, None) => None,
        (0, Some(_)) => {
            bail!("--ledger: this run asks no stake (its spec has none), so it has no ledger")
        }
        (_, _) => Some(args.ledger.url(&base)?.context(
            "--ledger none: this run asks every worker a stake, which lives on a ledger",
        )?),
    };
    let plan = Plan {
        spec: spec_path.to_path_buf(),
        text: args.text.clone(),
        checkpoint: args.checkpoint.clone(),
        threads: args.threads,
        ledger,
        base,
    };
    eprintln!(
        "training run {} ({}): {workers} workers on this machine, data in {}",
        spec.run_id().short(),
        spec.spec.name,
        plan.base.display()
    );
    let rt = runtime()?;
    rt.block_on(async move {
        if let Some(url) = &plan.ledger {
            stake_workers(url, &plan.base, workers, spec.spec.min_stake()).await?;
        }
        let book = Arc::new(Mutex::new(vec![None::<String>; workers]));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for i in 0..workers {
            let (p, b, stop) = (plan.clone(), Arc::clone(&book), stop_rx.clone());
            tasks.push(tokio::spawn(async move { keep(i, &p, &b, stop).await }));
            // Worker 0 first: the others join through its address.
            if i == 0 {
                let until = Instant::now() + START_TIMEOUT;
                while book.lock().unwrap_or_else(|e| e.into_inner())[0].is_none() {
                    if Instant::now() > until || tasks[0].is_finished() {
                        let _ = stop_tx.send(true);
                        return match tasks.remove(0).await {
                            Ok(Err(e)) => Err(e),
                            _ => Err(anyhow::anyhow!("worker 0 did not start")),
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let all = futures::future::join_all(tasks);
        tokio::pin!(all);
        let results = tokio::select! {
            r = &mut all => r,
            _ = shutdown_signal() => {
                eprintln!("stopping the workers (their checkpoints stay; run the same command to resume)");
                let _ = stop_tx.send(true);
                all.await
            }
        };
        for r in results {
            r.context("a worker task failed")??;
        }
        let model = plan.base.join("worker-0").join("model");
        println!(
            "trained: {} (try: plexus generate --model {} --prompt ...)",
            model.display(),
            model.display()
        );
        Ok(())
    })
}

/// How every worker of the run is started.
#[derive(Clone)]
struct Plan {
    spec: PathBuf,
    text: Option<PathBuf>,
    checkpoint: Option<PathBuf>,
    threads: Option<usize>,
    /// The run's ledger, for a spec that asks a stake.
    ledger: Option<String>,
    base: PathBuf,
}

/// Tops up the stake of each worker's account (its key in `base/worker-I`) to `min`, from
/// the ledger's faucet.
async fn stake_workers(url: &str, base: &Path, workers: usize, min: u64) -> anyhow::Result<()> {
    let mut store = plexus_ledger_store::Store::open(url, plexus_ledger::Config::default())
        .await
        .with_context(|| format!("cannot open the ledger {}", super::ledger::redact(url)))?;
    for i in 0..workers {
        let path = base.join(format!("worker-{i}")).join("node.key");
        let key = plexus_core::keys::NodeKey::load_or_create(&path)
            .with_context(|| format!("cannot load the worker key {}", path.display()))?;
        let account =
            plexus_ledger::address_of(&key.public()).context("worker key not secp256k1")?;
        let amount = min.saturating_sub(store.ledger().account(account).staked);
        if amount == 0 {
            continue;
        }
        let now = plexus_gateway::accounts::now_ms();
        for op in [
            plexus_ledger::Op::Faucet { account, amount },
            plexus_ledger::Op::Stake { account, amount },
        ] {
            store
                .execute(op, now)
                .await
                .with_context(|| format!("cannot stake {amount} for worker {i} ({account})"))?;
        }
    }
    Ok(())
}

/// Runs worker `i` until it finished the run (exit 0 after its final line), restarting it
/// after failures; `stop` ends it early.
async fn keep(
    i: usize,
    plan: &Plan,
    book: &Mutex<Vec<Option<String>>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new();
    let mut restarts = 0;
    loop {
        let started = Instant::now();
        let peers: Vec<String> = {
            let b = book.lock().unwrap_or_else(|e| e.into_inner());
            b.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(_, a)| a.clone())
                .collect()
        };
        let exe = std::env::current_exe().context("cannot find the plexus executable")?;
        let mut cmd = Command::new(exe);
        cmd.args(["train", "--distributed"])
            .arg(&plan.spec)
            .arg("--data-dir")
            .arg(plan.base.join(format!("worker-{i}")))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--parent-pid"])
            .arg(std::process::id().to_string());
        if let Some(text) = &plan.text {
            cmd.arg("--text").arg(text);
        }
        if let Some(c) = &plan.checkpoint {
            cmd.arg("--checkpoint").arg(c);
        }
        if let Some(t) = plan.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        if let Some(url) = &plan.ledger {
            cmd.arg("--ledger").arg(url);
        }
        for p in &peers {
            cmd.arg("--peer").arg(p);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("cannot start a training worker")?;
        let stdout = child.stdout.take().context("no stdout from the worker")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut finished = false;
        let mut listening = false;
        let status = loop {
            tokio::select! {
                line = lines.next_line() => match line {
                    Ok(Some(line)) => {
                        if let Some(addr) = line.strip_prefix("listening on ") {
                            listening = true;
                            book.lock().unwrap_or_else(|e| e.into_inner())[i] =
                                Some(addr.to_string());
                        }
                        finished |= line.starts_with("final |");
                        if i == 0 || line.starts_with("final |") || line.starts_with("resumed") {
                            println!("worker {i} | {line}");
                        }
                    }
                    // Output closed: the process is ending.
                    _ => break child.wait().await?,
                },
                _ = stop.changed() => {
                    let _ = child.kill().await;
                    return Ok(());
                }
            }
        };
        if status.success() && finished {
            return Ok(());
        }
        // A first start that never got as far as listening is a setting, not a crash.
        if !listening && restarts == 0 {
            bail!("worker {i} could not start ({status}); see its error above");
        }
        if started.elapsed() >= Backoff::STABLE {
            restarts = 0;
        }
        restarts += 1;
        if restarts > MAX_RESTARTS {
            bail!("worker {i} failed {MAX_RESTARTS} times in a row (last: {status})");
        }
        let delay = backoff.after(started.elapsed());
        eprintln!("worker {i} exited ({status}); starting it again in {delay:?} (it resumes from its checkpoint)");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
}
