//! `plexus bench`: prefill and decode throughput and peak memory, in the shape of llama.cpp's
//! `llama-bench -p N -n M` (prefill of N tokens from an empty cache; decode of M tokens one at a
//! time), so the two can be compared side by side (bench/engine_vs_llamacpp.sh).

use crate::cli::BenchArgs;
use anyhow::Context as _;
use plexus_model::stage::forward_chain;
use plexus_model::Logits;
use std::time::Instant;

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    let path = super::model_path(a.model.as_deref())?;
    let pb = crate::progress::spinner("loading");
    let model = plexus_model::load(&path)
        .with_context(|| format!("cannot load model {}", path.display()))?;
    pb.finish_and_clear();
    anyhow::ensure!(
        a.depth == 0 || a.concurrency.is_empty(),
        "--depth is not supported with --concurrency (the batching benchmark starts every \
         generation on an empty cache)"
    );
    if !a.concurrency.is_empty() {
        return super::bench_batch::run(&a, &path, model);
    }
    let cfg = &model.config;
    anyhow::ensure!(
        a.depth + a.prompt_tokens.max(a.gen_tokens + 1) <= cfg.max_position_embeddings,
        "depth + prompt (or + generated) tokens exceed the context of {}",
        cfg.max_position_embeddings
    );
    anyhow::ensure!(
        a.prompt_tokens > 0 && a.repetitions > 0,
        "nothing to measure"
    );
    let vocab = cfg.vocab_size as u64;
    // Deterministic pseudo-random prompt, like llama-bench's random tokens.
    let tokens = |n: usize, from: u64| -> Vec<u32> {
        (from..from + n as u64)
            .map(|i| ((i * 7919 + 104_729) % vocab) as u32)
            .collect()
    };
    let prompt = tokens(a.prompt_tokens, a.depth as u64);
    let context = tokens(a.depth, 0);
    let stages = std::slice::from_ref(&model.stage);
    // A cache holding `depth` positions of context, fed as llama-bench feeds it: one prompt
    // (computed once, copied for each measurement).
    let mut with_context = vec![model.stage.new_cache()];
    if a.depth > 0 {
        with_context[0].set_prompt(0..a.depth);
        forward_chain(stages, &mut with_context, &context, Logits::Last)?;
    }
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    // One warm-up pass, then timed repetitions.
    for rep in 0..=a.repetitions {
        let mut caches = with_context.clone();
        // The kernels llama-bench's prompt takes (tiled from 64 rows on), as generation does.
        caches[0].set_prompt(a.depth..a.depth + prompt.len());
        let t = Instant::now();
        let logits = forward_chain(stages, &mut caches, &prompt, Logits::Last)?;
        let pt = t.elapsed().as_secs_f64();
        let mut token = plexus_model::stage::argmax(&logits)?;
        let mut caches = with_context.clone();
        forward_chain(stages, &mut caches, &[token], Logits::Last)?;
        let t = Instant::now();
        for _ in 0..a.gen_tokens {
            let l = forward_chain(stages, &mut caches, &[token], Logits::Last)?;
            token = plexus_model::stage::argmax(&l)?;
        }
        let dt = t.elapsed().as_secs_f64();
        if rep > 0 {
            prefill.push(a.prompt_tokens as f64 / pt);
            decode.push(a.gen_tokens as f64 / dt);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let threads = candle_threads();
    let out = serde_json::json!({
        "model": path.display().to_string(),
        "model_bytes": plexus_model::identity::total_size(&model.weight_files),
        "threads": threads,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "depth": a.depth,
        "repetitions": a.repetitions,
        "prefill_tok_s": mean(&prefill),
        "decode_tok_s": mean(&decode),
        "prefill_tok_s_runs": prefill,
        "decode_tok_s_runs": decode,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "model {} | threads {} | pp{} {:.1} tok/s | tg{} {:.1} tok/s{} | peak RSS {:.1} MiB",
            path.display(),
            threads,
            a.prompt_tokens,
            mean(&prefill),
            a.gen_tokens,
            mean(&decode),
            if a.depth > 0 {
                format!(" | at depth {}", a.depth)
            } else {
                String::new()
            },
            peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

fn candle_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
