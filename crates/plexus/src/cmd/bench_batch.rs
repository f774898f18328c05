//! `plexus bench --concurrency N[,M...]`: the batching engine alone (no HTTP). For each level,
//! N greedy generations of distinct prompts are sent at once and, in the same run, the same
//! N generations one after another (what an engine without batching gives); it reports the
//! aggregate completion tokens per second of both, their ratio, and the median and worst time
//! to first token of the concurrent run.

use crate::cli::BenchArgs;
use anyhow::Context as _;
use plexus_model::generate::TokenChain;
use plexus_model::serve::{BatchHandle, ServeConfig};
use plexus_model::{LoadedModel, SamplingParams};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one generation measured.
struct Run {
    ttft: Duration,
    tokens: usize,
}

/// One generation through the engine: the prompt, then `gen` tokens (end-of-sequence tokens
/// do not stop it: the engine here has none, so every run produces the same count).
fn one(engine: &BatchHandle, prompt: &[u32], gen: usize) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut s = engine
        .open(prompt, &SamplingParams::default(), gen)
        .context("the engine refused a generation")?;
    let mut token = s.feed_prompt(prompt)?;
    let ttft = started.elapsed();
    for _ in 1..gen {
        token = s.feed(&[token])?;
    }
    Ok(Run { ttft, tokens: gen })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(a: &BenchArgs, path: &Path, model: LoadedModel) -> anyhow::Result<()> {
    let cfg = &model.config;
    anyhow::ensure!(
        a.prompt_tokens > 0 && a.gen_tokens > 0,
        "nothing to measure"
    );
    anyhow::ensure!(
        a.prompt_tokens + a.gen_tokens < cfg.max_position_embeddings,
        "prompt + generated tokens exceed the context of {}",
        cfg.max_position_embeddings
    );
    let vocab = cfg.vocab_size as u64;
    let engine = BatchHandle::start(
        Arc::new(model.stage),
        HashSet::new(),
        ServeConfig {
            kv_budget: plexus_node::measure::default_kv_budget(),
            ..ServeConfig::default()
        },
    );
    // Distinct deterministic prompts, one per stream.
    let prompt = |i: u64| -> Vec<u32> {
        (0..a.prompt_tokens as u64)
            .map(|t| ((t * 7919 + 104_729 + i * 31_337) % vocab) as u32)
            .collect()
    };
    // Warm-up.
    one(&engine, &prompt(1_000), a.gen_tokens.min(8))?;
    for &n in &a.concurrency {
        anyhow::ensure!(n > 0, "--concurrency levels must be positive");
        let prompts: Vec<Vec<u32>> = (0..n as u64).map(prompt).collect();
        let t = Instant::now();
        let runs: Vec<Run> = std::thread::scope(|s| {
            let joins: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let engine = engine.clone();
                    s.spawn(move || one(&engine, p, a.gen_tokens))
                })
                .collect();
            joins
                .into_iter()
                .map(|j| j.join().map_err(|_| anyhow::anyhow!("a stream panicked"))?)
                .collect::<anyhow::Result<_>>()
        })?;
        let wall = t.elapsed().as_secs_f64();
        let tokens: usize = runs.iter().map(|r| r.tokens).sum();
        let mut ttfts: Vec<f64> = runs.iter().map(|r| r.ttft.as_secs_f64()).collect();
        let worst_ttft = ttfts.iter().copied().fold(0.0, f64::max);
        let median_ttft = median(&mut ttfts);
        let t = Instant::now();
        let mut seq_ttfts = Vec::new();
        for p in &prompts {
            let r = one(&engine, p, a.gen_tokens)?;
            seq_ttfts.push(r.ttft.as_secs_f64());
        }
        let seq_wall = t.elapsed().as_secs_f64();
        let batched = tokens as f64 / wall;
        let sequential = tokens as f64 / seq_wall;
        let out = serde_json::json!({
            "model": path.display().to_string(),
            "concurrency": n,
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "batched_tok_s": batched,
            "sequential_tok_s": sequential,
            "ratio": batched / sequential,
            "median_ttft_s": median_ttft,
            "worst_ttft_s": worst_ttft,
            "sequential_median_ttft_s": median(&mut seq_ttfts),
        });
        if a.json {
            println!("{out}");
        } else {
            println!(
                "{n:>3} streams | batched {batched:7.1} tok/s | one after another \
                 {sequential:7.1} tok/s | {:.2}x | TTFT median {median_ttft:.3} s, worst \
                 {worst_ttft:.3} s",
                batched / sequential
            );
        }
    }
    Ok(())
}
