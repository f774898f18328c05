//! `plexus bench train`: the same model on the same data with equal total tokens, synchronous
//! data parallel and DiLoCo side by side in one run (workers in-process), printed as one JSON
//! object: `{"sync": {"loss", "accuracy", "bytes_per_worker"}, "diloco": {...}, "workers",
//! "inner_steps", "codec", "tokens", ...}`.
//!
//! Bytes are payload bytes each worker sends (sync: its f32 gradient every step; DiLoCo: its
//! encoded pseudo-gradient every round), counted from the encoded buffers. The modelled wall
//! clock adds, per exchange, a 50 ms latency and the time to push what a worker sends to each of
//! the other workers through a 100 Mbit/s link, to the compute measured here divided by the
//! number of workers (as if they ran side by side).

use crate::cli::BenchTrainArgs;
use anyhow::Context as _;
use plexus_core::Digest;
use plexus_model::train::task::Task;
use plexus_model::train::{AdamWConfig, InnerConfig};
use plexus_train::deadline::DeadlinePolicy;
use plexus_train::local::{run_diloco, run_sync, Report, TaskSetup};
use plexus_train::{Codec, OuterConfig, RoundConfig, ScorePolicy};

const LINK_BITS_PER_S: f64 = 100e6;
const LINK_LATENCY_S: f64 = 0.05;

fn modelled_seconds(r: &Report, workers: usize, exchanges: usize) -> f64 {
    let compute = r.seconds / workers as f64;
    let fan_out = (workers - 1).max(1) as f64;
    let comm = exchanges as f64 * LINK_LATENCY_S
        + r.bytes_per_worker as f64 * fan_out * 8.0 / LINK_BITS_PER_S;
    compute + comm
}

pub fn run(a: BenchTrainArgs) -> anyhow::Result<()> {
    if let Some(d) = &a.data {
        anyhow::bail!(
            "--data {d}: only the synthetic tasks are implemented (--task); text:FILE is not yet"
        );
    }
    anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(
        a.inner_steps > 0 && a.total_steps.is_multiple_of(a.inner_steps as usize),
        "--total-steps {} must be a positive multiple of --inner-steps {}",
        a.total_steps,
        a.inner_steps
    );
    let task = Task::parse(&a.task, a.size)?;
    let codec: Codec = a.codec.parse()?;
    let error_feedback = match a.error_feedback.as_str() {
        "auto" => matches!(codec, Codec::Sparse { .. }),
        "on" => true,
        "off" => false,
        other => anyhow::bail!("--error-feedback {other:?}: expected auto, on or off"),
    };
    let rounds = a.total_steps / a.inner_steps as usize;
    let sparse = matches!(codec, Codec::Sparse { .. });
    let outer_lr = a.outer_lr.unwrap_or(if sparse { 1.0 } else { 0.7 });
    let momentum = a.outer_momentum.unwrap_or(if sparse { 0.0 } else { 0.9 });
    let outer = if momentum == 0.0 {
        OuterConfig::Sgd { lr: outer_lr }
    } else {
        OuterConfig::Nesterov {
            lr: outer_lr,
            momentum,
        }
    };
    let cfg = RoundConfig {
        run: Digest::of(format!("bench-train/{}/{}", a.seed, a.task).as_bytes()),
        seed: a.seed,
        inner_steps: a.inner_steps,
        batch_size: a.batch_size,
        inner: InnerConfig {
            lr: a.lr,
            warmup: a.warmup,
            min_lr_ratio: 0.1,
            schedule_steps: a.total_steps,
            clip: 1.0,
            adamw: AdamWConfig::default(),
        },
        codec,
        error_feedback,
        outer,
        // In one process there are no stragglers, only scheduling noise: a deadline that never
        // bites, so every worker's contribution counts on both sides.
        deadline: DeadlinePolicy {
            initial_ms: 3_600_000,
            min_ms: 3_600_000,
            max_ms: 3_600_000,
            ..DeadlinePolicy::default()
        },
        score: ScorePolicy {
            examples: a.score_examples,
            tolerance: 0.0,
        },
        max_workers: a.workers as u32,
    };
    let setup = TaskSetup {
        task,
        hidden: a.hidden,
        layers: a.layers,
        init_seed: a.seed,
        eval_examples: a.eval_examples,
    };
    eprintln!(
        "bench train: {} workers, {} (size {}), hidden {} x {} layers, {} steps per worker x {} sequences; DiLoCo H={} ({} rounds), codec {}, error feedback {}",
        a.workers, task.name(), a.size, a.hidden, a.layers, a.total_steps, a.batch_size,
        a.inner_steps, rounds, codec, if error_feedback { "on" } else { "off" }
    );
    let sync = run_sync(&setup, &cfg, a.workers, rounds).context("synchronous run failed")?;
    eprintln!(
        "sync   | held-out loss {:.4} | exact match {:.1}% | {} bytes per worker | {:.0}s",
        sync.loss,
        100.0 * sync.accuracy,
        sync.bytes_per_worker,
        sync.seconds
    );
    let (mut rejected, mut applied) = (0usize, 0usize);
    let diloco = run_diloco(&setup, &cfg, a.workers, rounds, |p| {
        rejected += p.outcome.rejected.len();
        applied += p.outcome.applied.len();
        eprintln!(
            "round {:>4}/{rounds} | train loss {:.4} | score loss {:.4} | workers {} applied, {} rejected | {} bytes sent per worker",
            p.outcome.round + 1,
            p.train_loss,
            p.outcome.loss_before,
            p.outcome.applied.len(),
            p.outcome.rejected.len(),
            p.bytes_per_worker
        );
    })
    .context("DiLoCo run failed")?;
    eprintln!(
        "diloco | held-out loss {:.4} | exact match {:.1}% | {} bytes per worker | {:.0}s",
        diloco.loss,
        100.0 * diloco.accuracy,
        diloco.bytes_per_worker,
        diloco.seconds
    );
    let side = |r: &Report, exchanges: usize| {
        serde_json::json!({
            "loss": r.loss,
            "accuracy": r.accuracy,
            "bytes_per_worker": r.bytes_per_worker,
            "bytes_received_per_worker": r.bytes_received_per_worker,
            "seconds": r.seconds,
            "modelled_seconds_100mbit_50ms": modelled_seconds(r, a.workers, exchanges),
        })
    };
    let out = serde_json::json!({
        "sync": side(&sync, a.total_steps),
        "diloco": side(&diloco, rounds),
        "workers": a.workers,
        "inner_steps": a.inner_steps,
        "codec": a.codec,
        "codec_detail": codec.to_string(),
        "error_feedback": error_feedback,
        "outer": format!("{outer:?}"),
        "tokens": diloco.tokens,
        "sync_tokens": sync.tokens,
        "rounds": rounds,
        "seed": a.seed,
        "task": format!("{}:{}", task.name(), a.size),
        "model": {"hidden": a.hidden, "layers": a.layers, "params": diloco.params.values.len()},
        "contributions_applied": applied,
        "contributions_rejected": rejected,
        "loss_ratio": diloco.loss / sync.loss,
        "bytes_ratio": sync.bytes_per_worker as f64 / diloco.bytes_per_worker.max(1) as f64,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "DiLoCo/sync held-out loss {:.3}x, {:.0}x fewer bytes per worker ({} vs {})",
            diloco.loss / sync.loss,
            sync.bytes_per_worker as f64 / diloco.bytes_per_worker.max(1) as f64,
            diloco.bytes_per_worker,
            sync.bytes_per_worker
        );
    }
    Ok(())
}
