#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! Honest nodes are never disputed on one build, however they run: audits of jobs served with
//! random thread counts, prefill chunkings and kernel backends, replayed by auditors with other
//! threads, chunkings and backends, on the real model (two stages). Every audit compares both
//! stages' fingerprints exactly and checks every sampled token, as the network's exact mode
//! does; one difference would be a dispute against an honest node.
//!
//! `PLEXUS_HONEST_AUDITS` sets the number of audits (default 16, for CI), and
//! `PLEXUS_HONEST_AUDITS_FROM` the first one's number (parallel runs take disjoint ranges);
//! the issue's figure is 10,000:
//!
//! ```sh
//! PLEXUS_HONEST_AUDITS=10000 cargo test --release -p plexus-verify --test honest_audits -- --nocapture
//! ```

use plexus_core::rng::{CounterRng, Stream};
use plexus_model::kernels::{with_backend, Backend};
use plexus_model::{LayerSpan, ModelFiles, SamplingParams, Stage};
use plexus_verify::compare::{compare, Comparison, Mode};
use plexus_verify::fingerprint::Scheme;
use plexus_verify::replay::{replay, run_chain, LastStage};
use plexus_verify::tokens::check_tokens;
use std::time::Instant;

const TEXTS: [&str; 12] = [
    "The history of the printing press begins",
    "Write a short poem about the sea and the wind.",
    "def fibonacci(n):",
    "Three reasons to learn Rust are",
    "In 1969, the first humans",
    "Explain how a compiler works.",
    "The capital of France is",
    "Once upon a time, in a small village by the mountains,",
    "List the planets of the solar system in order.",
    "SELECT name, age FROM users WHERE",
    "Photosynthesis is the process by which",
    "Translate to French: good morning, my friend.",
];

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Runs `f` on `backend` when `Some`, else on the detected one.
fn on<R>(backend: Option<Backend>, f: impl FnOnce() -> R) -> R {
    match backend {
        Some(b) => with_backend(b, f),
        None => f(),
    }
}

#[test]
fn honest_nodes_are_never_disputed_whatever_their_threads_chunks_and_kernels() {
    let var = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let audits = var("PLEXUS_HONEST_AUDITS", 16);
    // The first audit's number: runs in parallel processes take disjoint ranges.
    let from = var("PLEXUS_HONEST_AUDITS_FROM", 0);
    let files = ModelFiles::open(&plexus_testkit::real_model()).unwrap();
    let n = files.config.num_layers;
    let stages: Vec<Stage> = [LayerSpan::new(0, n / 2), LayerSpan::new(n / 2, n)]
        .into_iter()
        .map(|s| {
            files
                .stage(Some(s), plexus_model::layers::Mode::Infer)
                .unwrap()
        })
        .collect();
    let refs: Vec<&Stage> = stages.iter().collect();
    let vocab = files.config.vocab_size;
    let eos = files.config.eos_token_ids.clone();
    let tok = files.tokenizer().unwrap();
    let mut prompts: Vec<Vec<u32>> = TEXTS.iter().map(|t| tok.encode(t, true).unwrap()).collect();
    // Two prompts long enough for the tiled attention kernel (64 rows or more).
    prompts.push(tok.encode(&TEXTS[..8].join(" "), true).unwrap());
    prompts.push(tok.encode(&TEXTS[4..].join(" "), true).unwrap());
    assert!(prompts.iter().any(|p| p.len() >= 64));
    // The detected kernels most often, the scalar ones (several times slower) one time in ten.
    let mut backends = vec![None; 6];
    if Backend::detect() != Backend::Scalar {
        backends.extend([Some(Backend::Avx2); 3]);
    }
    backends.push(Some(Backend::Scalar));
    let pools = [pool(1), pool(2), pool(3)];
    let started = Instant::now();
    let (mut comparisons, mut tokens, mut disputes) = (0u64, 0u64, Vec::new());
    for j in from..from + audits {
        if j > from && (j - from) % 250 == 0 {
            eprintln!(
                "after {} audits: {comparisons} stage comparisons, {tokens} tokens checked, {} \
                 disputes, {:.0} s",
                j - from,
                disputes.len(),
                started.elapsed().as_secs_f64()
            );
        }
        let mut rng = CounterRng::new(0x5eed_a0d1, Stream::Audit, j);
        let mut pick = |n: usize| rng.below(n as u64) as usize;
        let prompt = &prompts[pick(prompts.len())];
        let params = SamplingParams {
            temperature: [0.0, 0.7, 1.0][pick(3)],
            top_k: [0, 40][pick(2)],
            seed: j,
            ..SamplingParams::default()
        };
        let max_tokens = 1 + pick(4);
        let chunk = [1, 3, 5, 7, 16, 64][pick(6)];
        let provider = (pick(3), backends[pick(backends.len())]);
        let run = pools[provider.0].install(|| {
            on(provider.1, || {
                run_chain(
                    &refs,
                    prompt,
                    max_tokens,
                    &params,
                    chunk,
                    &[Scheme::DEFAULT],
                    &eos,
                    &LastStage::Honest,
                )
                .unwrap()
            })
        });
        // The auditor: other threads and kernels, one teacher-forced pass or another chunking.
        let auditor = (
            (provider.0 + 1 + pick(2)) % 3,
            backends[pick(backends.len())],
        );
        let replay_chunk = [4096, 7, 13][pick(3)];
        for (s, stage) in stages.iter().enumerate() {
            let (input, prints) = &run.stages[s];
            let r = pools[auditor.0].install(|| {
                on(auditor.1, || {
                    replay(stage, input, replay_chunk, &[Scheme::DEFAULT], prompt.len()).unwrap()
                })
            });
            comparisons += 1;
            let c = compare(&prints[0], &r.prints[0], Mode::Exact);
            if c != Comparison::Identical {
                disputes.push(format!(
                    "audit {j} stage {s}: provider {provider:?} chunk {chunk}, auditor \
                     {auditor:?} chunk {replay_chunk}: {c:?}"
                ));
            }
            if let Some(logits) = &r.logits {
                let t = check_tokens(logits, vocab, prompt, &run.tokens, &params).unwrap();
                tokens += t.checked;
                if t.mismatches() > 0 {
                    disputes.push(format!(
                        "audit {j}: {} of {} tokens differ (provider {provider:?}, auditor \
                         {auditor:?})",
                        t.mismatches(),
                        t.checked
                    ));
                }
            }
        }
    }
    eprintln!(
        "honest audits: {audits} jobs audited ({comparisons} stage comparisons, {tokens} tokens \
         checked) with providers and auditors on threads 1-3, prefill chunks 1-64, replay \
         chunks 7/13/all, backends {:?} (detected {:?}): {} disputes, {:.1} s",
        {
            let mut b = backends.clone();
            b.dedup();
            b
        },
        Backend::detect(),
        disputes.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(disputes.is_empty(), "{disputes:#?}");
}
