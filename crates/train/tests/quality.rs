//! What DiLoCo runs learn, asserted on held-out data: sparse pseudo-gradients with error
//! feedback on a synthetic task (exact match and loss, with the documented scoring tolerance
//! for compressed contributions), and f32 DiLoCo on a real text (held-out loss well below what a
//! model ignoring context reaches).

#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_core::Digest;
use plexus_model::train::task::Task;
use plexus_model::train::text::TextShard;
use plexus_model::train::{AdamWConfig, InnerConfig};
use plexus_train::deadline::DeadlinePolicy;
use plexus_train::local::{run_diloco, LocalData, TaskSetup, TextSetup};
use plexus_train::score::HONEST_TOLERANCE;
use plexus_train::{Codec, OuterConfig, RoundConfig, ScorePolicy};
use std::sync::Arc;

fn config(codec: Codec, inner_steps: u32, rounds: usize, lr: f64) -> RoundConfig {
    let sparse = matches!(codec, Codec::Sparse { .. });
    RoundConfig {
        run: Digest::of(b"quality test"),
        seed: 5,
        inner_steps,
        batch_size: 16,
        inner: InnerConfig {
            lr,
            warmup: 20,
            min_lr_ratio: 0.1,
            schedule_steps: rounds * inner_steps as usize,
            clip: 1.0,
            adamw: AdamWConfig::default(),
        },
        codec,
        error_feedback: sparse,
        outer: if sparse {
            OuterConfig::Sgd { lr: 1.0 }
        } else {
            OuterConfig::default()
        },
        // Workers run one after another here; scheduling noise must not make one miss a round.
        deadline: DeadlinePolicy {
            initial_ms: 3_600_000,
            min_ms: 3_600_000,
            max_ms: 3_600_000,
            ..DeadlinePolicy::default()
        },
        score: ScorePolicy {
            examples: 64,
            tolerance: HONEST_TOLERANCE,
        },
        max_workers: 4,
    }
}

/// Runs DiLoCo with 4 workers; returns (loss, accuracy, applied, rejected, bytes per worker).
fn run(setup: &impl LocalData, cfg: &RoundConfig, rounds: usize) -> (f32, f64, usize, usize, u64) {
    let (mut applied, mut rejected) = (0, 0);
    let d = run_diloco(setup, cfg, 4, rounds, |p| {
        applied += p.outcome.applied.len();
        rejected += p.outcome.rejected.len();
        assert_eq!(p.late, 0);
    })
    .unwrap();
    eprintln!(
        "loss {} accuracy {} applied {applied} rejected {rejected} bytes {}",
        d.loss, d.accuracy, d.bytes_per_worker
    );
    let n = d.params.values.len();
    assert_eq!(
        d.bytes_per_worker,
        (rounds * cfg.codec.encoded_len(n)) as u64,
        "one payload per worker per round"
    );
    (d.loss, d.accuracy, applied, rejected, d.bytes_per_worker)
}

#[test]
fn sparse_diloco_with_error_feedback_learns_the_task() {
    let setup = TaskSetup {
        task: Task::Reverse { len: 4 },
        hidden: 64,
        layers: 2,
        init_seed: 0,
        eval_examples: 256,
    };
    let codec: Codec = "sparse".parse().unwrap();
    let (h, rounds) = (10, 30);
    let cfg = config(codec, h, rounds, 1e-2);
    let (loss, accuracy, applied, rejected, bytes) = run(&setup, &cfg, rounds);
    // Synchronous data parallel would send one f32 gradient per step.
    let params = setup.prepare(cfg.seed).unwrap().2.values.len();
    let sync = (rounds * h as usize * Codec::F32.encoded_len(params)) as u64;
    assert!(sync / bytes >= 1000, "{}x fewer bytes", sync / bytes);
    assert!(
        rejected * 10 <= applied + rejected,
        "{rejected} of {} honest contributions rejected",
        applied + rejected
    );
    assert!(accuracy >= 0.9, "held-out exact match {accuracy}");
    assert!(loss < 0.3, "held-out loss {loss}");
}

/// 300 inner steps of a 1-layer model of width 32 on 33 KB of text: small enough for the test
/// suite, long enough to use context (training is deterministic: this run ends at 0.94 of the
/// unigram loss on every machine running this build).
#[test]
fn diloco_on_text_beats_a_context_free_model() {
    // A real UTF-8 text present on every Debian system (base-files).
    let shard = TextShard::open("/usr/share/common-licenses/GPL-3".as_ref(), 16).unwrap();
    let unigram = shard.unigram_loss();
    let setup = TextSetup {
        shard: Arc::new(shard),
        hidden: 32,
        layers: 1,
        init_seed: 0,
        eval_examples: 64,
        init: None,
    };
    let rounds = 20;
    let mut cfg = config(Codec::F32, 15, rounds, 2e-2);
    cfg.batch_size = 8;
    let (loss, accuracy, applied, _, _) = run(&setup, &cfg, rounds);
    assert!(accuracy.is_nan(), "text has no exact answers");
    assert!(applied >= rounds * 3, "{applied} contributions applied");
    assert!(
        f64::from(loss) < 0.95 * unigram,
        "held-out loss {loss}, unigram {unigram}"
    );
}
