//! Prefill attention on every backend this CPU has, for SmolLM2-135M's shape (9 query heads,
//! 3 key/value heads of 64), one layer of a 128-, 256- and a 512-token prompt (best of 5) with
//! each of ggml's kernels (one-chunk and tiled), then a whole prefill of the real model (best
//! of 3). BENCHMARKS.md quotes it:
//!
//! ```sh
//! cargo run -p plexus-model --example prefill_attention
//! ```
#![allow(unused_crate_dependencies, clippy::unwrap_used)]
use half::f16;
use plexus_model::attention::{flash_attention_into, AttnKernel, AttnShape};
use plexus_model::kernels::Backend;
use plexus_model::kv_cache::LayerKv;
use std::time::Instant;

fn main() {
    let (heads, kv_heads, d) = (9, 3, 64);
    for len in [128usize, 256, 512] {
        let q: Vec<f32> = (0..len * heads * d)
            .map(|i| ((i * 7919) % 251) as f32 / 50.0 - 2.5)
            .collect();
        let kv = LayerKv {
            k: (0..len * kv_heads * d)
                .map(|i| f16::from_f32(((i * 31) % 97) as f32 / 40.0 - 1.2))
                .collect(),
            v: (0..len * kv_heads * d)
                .map(|i| f16::from_f32(((i * 17) % 89) as f32 / 30.0 - 1.5))
                .collect(),
        };
        let mut out = vec![0f32; q.len()];
        for kernel in [AttnKernel::OneChunk, AttnKernel::Tiled] {
            let s = AttnShape {
                heads,
                kv_heads,
                head_dim: d,
                past: 0,
                scale: 0.125,
                kernel,
            };
            for b in Backend::available() {
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let t = Instant::now();
                    flash_attention_into(b, &q, &kv, s, &mut out);
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!(
                    "len {len} {kernel:?} {b:?}: one layer's attention {:.2} ms, x30 layers {:.1} ms",
                    best * 1e3,
                    best * 30e3
                );
            }
        }
    }
    let p = plexus_testkit::real_model();
    let m = plexus_model::load(&p).unwrap();
    for len in [128usize, 512] {
        let toks: Vec<u32> = (0..len as u32).map(|i| 100 + (i * 37) % 40000).collect();
        let mut best = f64::MAX;
        for _ in 0..3 {
            let mut c = m.stage.new_cache();
            // The kernels a prompt of this length takes (tiled, as in llama.cpp).
            c.set_prompt(0..len);
            let t = Instant::now();
            m.stage
                .forward(
                    plexus_model::StageInput::Tokens(&toks),
                    &mut c,
                    plexus_model::Logits::Last,
                )
                .unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "prefill {len}: {:.1} ms = {:.1} tok/s",
            best * 1e3,
            len as f64 / best
        );
    }
}
