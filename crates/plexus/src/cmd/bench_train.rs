//! `plexus bench train`: the same model on the same data with equal total tokens, synchronous
//! data parallel and DiLoCo side by side in one run (workers in-process), printed as one JSON
//! object: `{"sync": {"loss", "accuracy", "bytes_per_worker"}, "diloco": {...}, "workers",
//! "inner_steps", "codec", "tokens", ...}`.
//!
//! `--runs "H:CODEC ..."` runs several DiLoCo settings against one synchronous run in the same
//! process (it is a pure function of seed, steps and batch, so it would come out bit-identical
//! each time) and prints one JSON object per setting, one per line. A setting may name its own
//! outer step after `@` as LR:MOMENTUM (`"100:f32@1.0:0.5"`; momentum 0 is plain SGD).
//!
//! Bytes are payload bytes each worker sends (sync: its f32 gradient every step; DiLoCo: its
//! encoded pseudo-gradient every round), counted from the encoded buffers. The modelled wall
//! clock adds, per exchange, a 50 ms latency and the time to push what a worker sends to each of
//! the other workers through a 100 Mbit/s link, to the compute measured here (CPU time of this
//! process, all threads, where Linux reports it; else wall time) divided by the number of
//! workers (as if they ran side by side, one core each).

use crate::cli::BenchTrainArgs;
use anyhow::Context as _;
use plexus_core::Digest;
use plexus_model::train::pretrained::Pretrained;
use plexus_model::train::task::Task;
use plexus_model::train::text::TextShard;
use plexus_model::train::{AdamWConfig, InnerConfig};
use plexus_train::deadline::DeadlinePolicy;
use plexus_train::local::{run_diloco, run_sync, LocalData, Report, TaskSetup, TextSetup};
use plexus_train::{Codec, OuterConfig, RoundConfig, ScorePolicy};
use std::sync::Arc;

const LINK_BITS_PER_S: f64 = 100e6;
const LINK_LATENCY_S: f64 = 0.05;

/// Seconds of CPU time this process's threads have used (Linux: `/proc/self/task/*/schedstat`,
/// nanoseconds on CPU per thread); `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir("/proc/self/task").ok()? {
        let s = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// A run's compute: CPU seconds where measured, else wall seconds.
struct Timed<T> {
    value: T,
    wall: f64,
    cpu: Option<f64>,
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<Timed<T>> {
    let (c0, t0) = (cpu_seconds(), std::time::Instant::now());
    let value = f()?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = c0.and_then(|c0| Some(cpu_seconds()? - c0));
    Ok(Timed { value, wall, cpu })
}

fn modelled_seconds(t: &Timed<Report>, workers: usize, exchanges: usize) -> f64 {
    let compute = t.cpu.unwrap_or(t.wall) / workers as f64;
    let fan_out = (workers - 1).max(1) as f64;
    let comm = exchanges as f64 * LINK_LATENCY_S
        + t.value.bytes_per_worker as f64 * fan_out * 8.0 / LINK_BITS_PER_S;
    compute + comm
}

/// One DiLoCo setting to run.
struct Setting {
    inner_steps: u32,
    codec: Codec,
    name: String,
    /// The outer step's learning rate and momentum, when the setting names them.
    outer: Option<(f32, f32)>,
}

/// `LR:MOMENTUM` after a setting's `@`: both finite, the rate positive, the momentum in [0, 1).
fn parse_outer(run: &str, s: &str) -> anyhow::Result<(f32, f32)> {
    let (lr, m) = s
        .split_once(':')
        .with_context(|| format!("--runs {run:?}: expected @LR:MOMENTUM after the codec"))?;
    let lr = lr
        .parse::<f32>()
        .with_context(|| format!("--runs {run:?}: outer LR is not a number"))?;
    let m = m
        .parse::<f32>()
        .with_context(|| format!("--runs {run:?}: outer momentum is not a number"))?;
    anyhow::ensure!(
        lr.is_finite() && lr > 0.0 && (0.0..1.0).contains(&m),
        "--runs {run:?}: the outer LR must be > 0 and the momentum in [0, 1)"
    );
    Ok((lr, m))
}

/// `--runs "10:f32 30:sparse"` or `--inner-steps` / `--codec` (not both).
fn settings(a: &BenchTrainArgs) -> anyhow::Result<Vec<Setting>> {
    let one = |h: u32, c: &str| -> anyhow::Result<Setting> {
        Ok(Setting {
            inner_steps: h,
            codec: c.parse().with_context(|| format!("--codec {c}"))?,
            name: c.to_string(),
            outer: None,
        })
    };
    let Some(runs) = &a.runs else {
        return Ok(vec![one(
            a.inner_steps.unwrap_or(30),
            a.codec.as_deref().unwrap_or("f32"),
        )?]);
    };
    anyhow::ensure!(
        a.inner_steps.is_none() && a.codec.is_none(),
        "--runs names H and codec of every run: drop --inner-steps and --codec"
    );
    let out = runs
        .split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(|r| {
            let (h, c) = r
                .split_once(':')
                .with_context(|| format!("--runs {r:?}: expected H:CODEC, e.g. 100:int8"))?;
            let h = h
                .parse::<u32>()
                .with_context(|| format!("--runs {r:?}: H is not a number"))?;
            let Some((c, outer)) = c.split_once('@') else {
                return one(h, c);
            };
            anyhow::ensure!(
                a.outer_lr.is_none() && a.outer_momentum.is_none(),
                "--runs {r:?} names its outer step: drop --outer-lr and --outer-momentum"
            );
            Ok(Setting {
                outer: Some(parse_outer(r, outer)?),
                ..one(h, c)?
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!out.is_empty(), "--runs is empty");
    Ok(out)
}

pub fn run(a: BenchTrainArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
    let settings = settings(&a)?;
    for s in &settings {
        anyhow::ensure!(
            s.inner_steps > 0 && a.total_steps.is_multiple_of(s.inner_steps as usize),
            "--total-steps {} must be a positive multiple of H = {}",
            a.total_steps,
            s.inner_steps
        );
    }
    anyhow::ensure!(
        a.score_tolerance.is_finite() && a.score_tolerance >= 0.0,
        "--score-tolerance must be a finite number >= 0"
    );
    let error_feedback = |codec: &Codec| match a.error_feedback.as_str() {
        "auto" => Ok(matches!(codec, Codec::Sparse { .. })),
        "on" => Ok(true),
        "off" => Ok(false),
        other => anyhow::bail!("--error-feedback {other:?}: expected auto, on or off"),
    };
    let config = |s: &Setting| -> anyhow::Result<RoundConfig> {
        let sparse = matches!(s.codec, Codec::Sparse { .. });
        let (outer_lr, momentum) = s.outer.unwrap_or((
            a.outer_lr.unwrap_or(if sparse { 1.0 } else { 0.7 }),
            a.outer_momentum.unwrap_or(if sparse { 0.0 } else { 0.9 }),
        ));
        let outer = if momentum == 0.0 {
            OuterConfig::Sgd { lr: outer_lr }
        } else {
            OuterConfig::Nesterov {
                lr: outer_lr,
                momentum,
            }
        };
        Ok(RoundConfig {
            run: Digest::of(format!("bench-train/{}/{}", a.seed, data_name(&a)).as_bytes()),
            seed: a.seed,
            inner_steps: s.inner_steps,
            batch_size: a.batch_size,
            inner: InnerConfig {
                lr: a.lr,
                warmup: a.warmup,
                min_lr_ratio: 0.1,
                schedule_steps: a.total_steps,
                clip: 1.0,
                adamw: AdamWConfig::default(),
            },
            codec: s.codec,
            error_feedback: error_feedback(&s.codec)?,
            outer,
            // In one process there are no stragglers, only scheduling noise: a deadline that
            // never bites, so every worker's contribution counts on both sides.
            deadline: DeadlinePolicy {
                initial_ms: 3_600_000,
                min_ms: 3_600_000,
                max_ms: 3_600_000,
                ..DeadlinePolicy::default()
            },
            score: ScorePolicy {
                examples: a.score_examples,
                tolerance: a.score_tolerance,
            },
            max_workers: a.workers as u32,
        })
    };
    let configs = settings
        .iter()
        .map(config)
        .collect::<anyhow::Result<Vec<_>>>()?;
    match a.data.as_deref() {
        None => {
            anyhow::ensure!(a.seq_len.is_none(), "--seq-len is for --data text:FILE");
            let task = Task::parse(a.task.as_deref().unwrap_or("reverse"), a.size.unwrap_or(5))?;
            let setup = TaskSetup {
                task,
                hidden: a.hidden,
                layers: a.layers,
                init_seed: a.seed,
                eval_examples: a.eval_examples,
            };
            run_all(&a, &setup, &settings, &configs, None)
        }
        Some(d) => {
            anyhow::ensure!(
                a.task.is_none() && a.size.is_none(),
                "--data {d} replaces the synthetic task: drop --task and --size"
            );
            let seq_len = a.seq_len.unwrap_or(64);
            let path = d
                .strip_prefix("text:")
                .with_context(|| format!("--data {d}: expected text:FILE"))?;
            let init = a
                .checkpoint
                .as_deref()
                .map(|p| {
                    Pretrained::open(p).with_context(|| format!("--checkpoint {}", p.display()))
                })
                .transpose()?;
            let shard = match &init {
                Some(p) => TextShard::open_with(path.as_ref(), seq_len, &p.tokenizer),
                None => TextShard::open(path.as_ref(), seq_len),
            }
            .with_context(|| format!("--data {d}"))?;
            if let Some(p) = &init {
                anyhow::ensure!(
                    seq_len < p.config.max_position_embeddings,
                    "--seq-len {seq_len}: the model's context is {} tokens",
                    p.config.max_position_embeddings
                );
                eprintln!(
                    "fine-tuning {} ({} parameters, digest {})",
                    p.path.display(),
                    p.params.values.len(),
                    p.digest.short()
                );
            }
            eprintln!(
                "text {path}: {} tokens, vocabulary {}, {} train and {} held-out windows of {} tokens; unigram held-out loss {:.4}",
                shard.token_count(),
                shard.tokenizer().get_vocab_size(true),
                shard.train_windows(),
                shard.held_out_windows(),
                seq_len + 1,
                shard.unigram_loss()
            );
            let mut text = serde_json::json!({
                "file": path,
                "sha256": shard.digest().to_string(),
                "tokens": shard.token_count(),
                "vocab": shard.tokenizer().get_vocab_size(true),
                "seq_len": seq_len,
                "unigram_loss": shard.unigram_loss(),
            });
            if let Some(p) = &init {
                text["checkpoint"] = serde_json::json!({
                    "path": p.path,
                    "digest": p.digest.to_string(),
                    "params": p.params.values.len(),
                    "hidden": p.config.hidden_size,
                    "layers": p.config.num_layers,
                });
            }
            let setup = TextSetup {
                shard: Arc::new(shard),
                hidden: a.hidden,
                layers: a.layers,
                init_seed: a.seed,
                eval_examples: a.eval_examples,
                init: init.map(Arc::new),
            };
            run_all(&a, &setup, &settings, &configs, Some(text))
        }
    }
}

/// What the run trains on, as the JSON names it.
fn data_name(a: &BenchTrainArgs) -> String {
    match &a.data {
        Some(d) => d.clone(),
        None => format!(
            "{}:{}",
            a.task.as_deref().unwrap_or("reverse"),
            a.size.unwrap_or(5)
        ),
    }
}

/// The synchronous run (unless `--no-sync`), then each DiLoCo setting; one JSON line per
/// setting.
fn run_all<D: LocalData>(
    a: &BenchTrainArgs,
    setup: &D,
    settings: &[Setting],
    configs: &[RoundConfig],
    text: Option<serde_json::Value>,
) -> anyhow::Result<()> {
    let model = match &a.checkpoint {
        Some(p) => format!("fine-tuning {}", p.display()),
        None => format!("hidden {} x {} layers", a.hidden, a.layers),
    };
    eprintln!(
        "bench train: {} workers, {}, {model}, {} steps per worker x {} sequences; DiLoCo runs: {}",
        a.workers,
        data_name(a),
        a.total_steps,
        a.batch_size,
        settings
            .iter()
            .map(|s| format!("H={} {}", s.inner_steps, s.codec))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The synchronous run only reads seed, batch, inner settings and the step count, which
    // every setting shares.
    let sync_rounds = a.total_steps / configs[0].inner_steps as usize;
    let pct = |x: f64| {
        if x.is_nan() {
            "n/a".to_string()
        } else {
            format!("{:.1}%", 100.0 * x)
        }
    };
    let sync = if a.no_sync {
        eprintln!("sync   | skipped (--no-sync)");
        None
    } else {
        let sync = timed(|| {
            run_sync(setup, &configs[0], a.workers, sync_rounds).context("synchronous run failed")
        })?;
        eprintln!(
            "sync   | held-out loss {:.4} | exact match {} | {} bytes per worker | {:.0}s",
            sync.value.loss,
            pct(sync.value.accuracy),
            sync.value.bytes_per_worker,
            sync.wall
        );
        Some(sync)
    };
    let side = |t: &Timed<Report>, exchanges: usize| {
        let r = &t.value;
        serde_json::json!({
            "loss": r.loss,
            "accuracy": r.accuracy,
            "bytes_per_worker": r.bytes_per_worker,
            "bytes_received_per_worker": r.bytes_received_per_worker,
            "seconds": t.wall,
            "cpu_seconds": t.cpu,
            "modelled_seconds_100mbit_50ms": modelled_seconds(t, a.workers, exchanges),
        })
    };
    for (s, cfg) in settings.iter().zip(configs) {
        let rounds = a.total_steps / s.inner_steps as usize;
        let (mut rejected, mut applied) = (0usize, 0usize);
        let diloco = timed(|| {
            run_diloco(setup, cfg, a.workers, rounds, |p| {
                rejected += p.outcome.rejected.len();
                applied += p.outcome.applied.len();
                let rel = |l: &[plexus_train::round::Scored]| {
                    l.iter()
                        .map(|x| format!("{:+.2}%", 100.0 * (x.loss / p.outcome.loss_before - 1.0)))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                eprintln!(
                    "round {:>4}/{rounds} | train loss {:.4} | score loss {:.4} | applied [{}] rejected [{}] | {} bytes sent per worker",
                    p.outcome.round + 1,
                    p.train_loss,
                    p.outcome.loss_before,
                    rel(&p.outcome.applied),
                    rel(&p.outcome.rejected),
                    p.bytes_per_worker
                );
            })
            .context("DiLoCo run failed")
        })?;
        eprintln!(
            "diloco H={} {} {:?} | held-out loss {:.4} | exact match {} | {} bytes per worker | {:.0}s",
            s.inner_steps,
            s.codec,
            cfg.outer,
            diloco.value.loss,
            pct(diloco.value.accuracy),
            diloco.value.bytes_per_worker,
            diloco.wall
        );
        let d = &diloco.value;
        let y = sync.as_ref().map(|t| &t.value);
        let out = serde_json::json!({
            "sync": sync.as_ref().map(|t| side(t, a.total_steps)),
            "diloco": side(&diloco, rounds),
            "workers": a.workers,
            "inner_steps": s.inner_steps,
            "codec": s.name,
            "codec_detail": s.codec.to_string(),
            "error_feedback": cfg.error_feedback,
            "outer": format!("{:?}", cfg.outer),
            "inner_lr": a.lr,
            "batch_size": a.batch_size,
            "score_examples": a.score_examples,
            "score_tolerance": a.score_tolerance,
            "tokens": d.tokens,
            "sync_tokens": y.map(|y| y.tokens),
            "rounds": rounds,
            "seed": a.seed,
            "task": data_name(a),
            "text": text,
            "model": match &text.as_ref().and_then(|t| t.get("checkpoint")) {
                // A fine-tuned model: its own width and depth.
                Some(c) => serde_json::json!({
                    "hidden": c["hidden"], "layers": c["layers"], "params": d.params.values.len(),
                }),
                None => serde_json::json!({
                    "hidden": a.hidden, "layers": a.layers, "params": d.params.values.len(),
                }),
            },
            "contributions_applied": applied,
            "contributions_rejected": rejected,
            "loss_ratio": y.map(|y| d.loss / y.loss),
            "bytes_ratio": y.map(|y| y.bytes_per_worker as f64 / d.bytes_per_worker.max(1) as f64),
        });
        if a.json {
            println!("{out}");
        } else if let Some(y) = y {
            println!(
                "H={} {}: DiLoCo/sync held-out loss {:.3}x, {:.0}x fewer bytes per worker ({} vs {})",
                s.inner_steps,
                s.codec,
                d.loss / y.loss,
                y.bytes_per_worker as f64 / d.bytes_per_worker.max(1) as f64,
                d.bytes_per_worker,
                y.bytes_per_worker
            );
        } else {
            println!(
                "H={} {}: DiLoCo held-out loss {:.4}, {} bytes per worker (no synchronous run)",
                s.inner_steps, s.codec, d.loss, d.bytes_per_worker
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_outer;

    #[test]
    fn a_settings_outer_step_is_parsed_and_bad_ones_are_refused() {
        assert_eq!(parse_outer("r", "1.0:0.5").unwrap(), (1.0, 0.5));
        assert_eq!(parse_outer("r", "0.7:0").unwrap(), (0.7, 0.0));
        for bad in [
            "1.0", "x:0.5", "1.0:y", "0:0.5", "-1:0.5", "1.0:1.0", "nan:0.5", "1:-0.1",
        ] {
            assert!(parse_outer("r", bad).is_err(), "{bad} accepted");
        }
    }
}
