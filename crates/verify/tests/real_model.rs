#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! Measurements on the real model (SmolLM2-135M-Instruct Q4_1), printed for BENCHMARKS.md and
//! asserted where the design depends on them:
//!
//! - honest replays (other chunkings, thread counts, kernel backends) reproduce every
//!   fingerprint byte for byte, so exact mode applies on the same build;
//! - both fingerprint schemes separate a re-quantized substitute (same weights in Q4_0 / Q8_0)
//!   from the real model by orders of magnitude, and the tolerance band sits between them;
//! - the token check catches a substitute within 300 tokens at the Token-DiFR band.
//!
//! Run with `--nocapture` to see the figures.

use candle_core::quantized::GgmlDType;
use plexus_model::requant::requantize;
use plexus_model::{LayerSpan, ModelFiles, SamplingParams, Stage};
use plexus_verify::compare::{compare, window_score, Comparison, Mode, Tolerance};
use plexus_verify::fingerprint::Scheme;
use plexus_verify::replay::{replay, run_chain, ChainRun, LastStage};
use plexus_verify::seed::{commit_secret, protocol_seed};
use plexus_verify::stats::binomial_tail;
use plexus_verify::tokens::check_tokens;
use std::path::PathBuf;

const SCHEMES: [Scheme; 2] = [Scheme::DEFAULT, Scheme::TopK { k: 128 }];
/// The honest token-mismatch rate the tolerance mode assumes (Token-DiFR: > 98% match).
const TOKEN_FPR: f64 = 0.02;

fn model_path() -> PathBuf {
    plexus_testkit::real_model()
}

fn stages(path: &std::path::Path, split: usize) -> Vec<Stage> {
    let files = ModelFiles::open(path).unwrap();
    let n = files.config.num_layers;
    [LayerSpan::new(0, split), LayerSpan::new(split, n)]
        .into_iter()
        .map(|s| {
            files
                .stage(Some(s), plexus_model::layers::Mode::Infer)
                .unwrap()
        })
        .collect()
}

fn prompts() -> Vec<Vec<u32>> {
    let tok = ModelFiles::open(&model_path())
        .unwrap()
        .tokenizer()
        .unwrap();
    [
        "The history of the printing press begins",
        "Write a short poem about the sea and the wind.",
        "def fibonacci(n):",
        "Three reasons to learn Rust are",
        "In 1969, the first humans",
    ]
    .iter()
    .map(|t| tok.encode(t, true).unwrap())
    .collect()
}

fn params(i: usize) -> SamplingParams {
    let seed = protocol_seed(&[i as u8; 32], &commit_secret(&[7; 32]));
    SamplingParams {
        seed,
        ..SamplingParams::default()
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Replays each stage of `run` on `real` and returns (per stage comparisons per scheme, token
/// check mismatches / checked).
fn audit(
    real: &[Stage],
    prompt: &[u32],
    run: &ChainRun,
    p: &SamplingParams,
    chunk: usize,
) -> (Vec<Vec<Comparison>>, u64, u64) {
    let mut cmp = Vec::new();
    let mut tokens = (0, 0);
    for (i, stage) in real.iter().enumerate() {
        let (input, prints) = &run.stages[i];
        let r = replay(stage, input, chunk, &SCHEMES, prompt.len()).unwrap();
        let exact = prints
            .iter()
            .zip(&r.prints)
            .map(|(a, b)| compare(a, b, Mode::Exact))
            .collect();
        cmp.push(exact);
        if let Some(logits) = &r.logits {
            let vocab = stage.config().vocab_size;
            let c = check_tokens(logits, vocab, prompt, &run.tokens, p).unwrap();
            tokens = (c.mismatches(), c.checked);
        }
    }
    (cmp, tokens.0, tokens.1)
}

fn worst_scores(a: &ChainRun, b: &ChainRun) -> Vec<f32> {
    // Per scheme, the largest window score (tolerance units) over both stages.
    (0..SCHEMES.len())
        .map(|s| {
            a.stages
                .iter()
                .zip(&b.stages)
                .flat_map(|((_, pa), (_, pb))| {
                    pa[s].windows.iter().zip(&pb[s].windows).map(|(x, y)| {
                        window_score(&x.data, &y.data, &Tolerance::PUBLISHED)
                            .unwrap_or(f32::INFINITY)
                    })
                })
                .fold(0.0f32, f32::max)
        })
        .collect()
}

#[test]
fn honest_replays_are_exact_and_substitutes_are_caught() {
    let path = model_path();
    if !path.exists() {
        panic!("the real model is missing at {}", path.display());
    }
    let real = stages(&path, 15);
    let refs: Vec<&Stage> = real.iter().collect();
    let eos = ModelFiles::open(&path)
        .unwrap()
        .config
        .eos_token_ids
        .clone();
    let dir = tempfile::tempdir().unwrap();
    let prompts = prompts();
    let max_tokens = 60;

    // Honest providers: prefill chunk 5 on 1 thread, chunk 64 on 2 threads, scalar kernels.
    let mut honest_tokens = 0u64;
    let mut bytes = 0usize;
    let mut positions = 0u64;
    for (i, prompt) in prompts.iter().enumerate().take(3) {
        let p = params(i);
        let a = pool(1).install(|| {
            run_chain(
                &refs,
                prompt,
                max_tokens,
                &p,
                5,
                &SCHEMES,
                &eos,
                &LastStage::Honest,
            )
            .unwrap()
        });
        let b = pool(2).install(|| {
            run_chain(
                &refs,
                prompt,
                max_tokens,
                &p,
                64,
                &SCHEMES,
                &eos,
                &LastStage::Honest,
            )
            .unwrap()
        });
        let c = pool(2).install(|| {
            plexus_model::kernels::with_backend(plexus_model::kernels::Backend::Scalar, || {
                run_chain(
                    &refs,
                    prompt,
                    max_tokens,
                    &p,
                    16,
                    &SCHEMES,
                    &eos,
                    &LastStage::Honest,
                )
                .unwrap()
            })
        });
        assert_eq!(
            a.tokens, b.tokens,
            "prompt {i}: tokens depend on threads/chunking"
        );
        assert_eq!(
            a.tokens, c.tokens,
            "prompt {i}: tokens depend on the kernel backend"
        );
        for s in 0..2 {
            assert_eq!(
                a.stages[s].1, b.stages[s].1,
                "prompt {i} stage {s}: fingerprints differ across threads/chunking"
            );
            assert_eq!(
                a.stages[s].1, c.stages[s].1,
                "prompt {i} stage {s}: fingerprints differ across backends"
            );
            bytes += a.stages[s].1[0].data_bytes();
            positions += a.stages[s].1[0].rows();
        }
        // The auditor: one teacher-forced pass (and a 7-position chunking) on 2 threads.
        for chunk in [4096, 7] {
            let (cmp, miss, checked) = pool(2).install(|| audit(&real, prompt, &a, &p, chunk));
            for (s, c) in cmp.iter().enumerate() {
                for (k, x) in c.iter().enumerate() {
                    assert_eq!(
                        *x,
                        Comparison::Identical,
                        "prompt {i} stage {s} scheme {k} chunk {chunk}"
                    );
                }
            }
            assert_eq!(miss, 0, "prompt {i}: an honest token failed the check");
            honest_tokens += checked;
        }
    }
    eprintln!("honest: every fingerprint identical across threads 1/2, prefill chunks 5/16/64, replay chunks 7/all, backends scalar/{:?}; {honest_tokens} tokens checked, 0 mismatches", plexus_model::kernels::Backend::detect());
    eprintln!(
        "sketch commitment: {bytes} B over {positions} stage positions = {:.3} B/position/stage",
        bytes as f64 / positions as f64
    );

    // Substitutes: the same weights re-quantized.
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let sub_path = dir.path().join(format!("sub-{dtype:?}.gguf"));
        requantize(&path, &sub_path, dtype).unwrap();
        let sub = stages(&sub_path, 15);
        let sub_refs: Vec<&Stage> = sub.iter().collect();
        let (mut miss, mut checked) = (0u64, 0u64);
        let mut detected_at: Option<u64> = None;
        let mut scores = vec![f32::INFINITY; SCHEMES.len()];
        for (i, prompt) in prompts.iter().enumerate() {
            let p = params(i);
            let run = pool(2).install(|| {
                run_chain(
                    &sub_refs,
                    prompt,
                    max_tokens,
                    &p,
                    64,
                    &SCHEMES,
                    &eos,
                    &LastStage::Honest,
                )
                .unwrap()
            });
            let honest = pool(2).install(|| {
                run_chain(
                    &refs,
                    prompt,
                    max_tokens,
                    &p,
                    64,
                    &SCHEMES,
                    &eos,
                    &LastStage::Honest,
                )
                .unwrap()
            });
            // Fingerprint distance of the substitute's first stage, on the same prompt
            // (stage 0 sees the same tokens up to the first differing token).
            let s = worst_scores(&run, &honest);
            for (a, b) in scores.iter_mut().zip(s) {
                *a = a.min(b);
            }
            let (cmp, m, c) = pool(2).install(|| audit(&real, prompt, &run, &p, 4096));
            assert!(
                cmp.iter().all(|st| st.iter().all(|x| !x.passes())),
                "{dtype:?} prompt {i}: a substitute passed exact mode"
            );
            for (s, st) in cmp.iter().enumerate() {
                let tol = {
                    let (input, prints) = &run.stages[s];
                    let r = replay(&real[s], input, 4096, &SCHEMES, prompt.len()).unwrap();
                    compare(&prints[0], &r.prints[0], Mode::Within(Tolerance::PUBLISHED))
                };
                eprintln!(
                    "{dtype:?} prompt {i} stage {s}: exact {:?}, tolerance (sketch) {:?}",
                    st[0].passes(),
                    tol
                );
            }
            miss += m;
            checked += c;
            if detected_at.is_none() && binomial_tail(checked, miss, TOKEN_FPR) < 1e-6 {
                detected_at = Some(checked);
            }
        }
        eprintln!(
            "substitute {dtype:?}: token match {:.1}% ({} of {checked} differ); token check convicts (tail < 1e-6 at {TOKEN_FPR}) after {detected_at:?} tokens; smallest worst-window score vs honest: sketch {:.1}, top-128 {:.1} (tolerance units)",
            100.0 * (checked - miss) as f64 / checked as f64,
            miss,
            scores[0],
            scores[1]
        );
        assert!(miss > 0, "{dtype:?}: the substitute matched every token");
        if dtype == GgmlDType::Q4_0 {
            assert!(
                detected_at.is_some_and(|n| n <= 300),
                "{dtype:?}: not detected within 300 tokens"
            );
        }
    }
}
