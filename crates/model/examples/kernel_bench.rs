//! Times `QuantMatrix::matmul` on the SmolLM2-135M shapes for each backend: best of N calls
//! for one matrix kept hot in cache (decode, m = 1, and prefill, m = 128), then a decode "sweep"
//! through all 211 matrices of the model, whose weights stream from memory as in real decoding.
//!
//! Last, the latency of one 576 x 576 mat-vec called from the main thread (outside rayon's pool,
//! as the engine calls it) after pauses of 0, 20 and 100 us, which is what the kernels' thread
//! hand-off (`kernels::crew`) is for.
//!
//! `cargo run --release -p plexus-model --example kernel_bench [threads]`
//! (`SWEEP_ONLY=1` for the sweep and latency alone).

#![allow(unused_crate_dependencies)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use plexus_model::kernels::{Backend, QuantMatrix};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> Result<()> {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(candle_core::Error::wrap)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(candle_core::Error::wrap)?;
    if std::env::var_os("SWEEP_ONLY").is_none() {
        hot(&pool, threads)?;
    }
    sweep(&pool)?;
    latency(threads)
}

/// One matrix at a time, kept in cache: best time per call.
fn hot(pool: &rayon::ThreadPool, threads: usize) -> Result<()> {
    let shapes = [
        ("q/o 576x576", GgmlDType::Q4_1, 576, 576),
        ("k/v 192x576", GgmlDType::Q4_1, 192, 576),
        ("gate/up 1536x576", GgmlDType::Q4_1, 1536, 576),
        ("down 576x1536", GgmlDType::Q4_1, 576, 1536),
        ("head 49152x576", GgmlDType::Q8_0, 49152, 576),
        ("q4_0 1536x576", GgmlDType::Q4_0, 1536, 576),
    ];
    println!("threads {threads}; time per call (best of runs), weight GB/s, GMAC/s");
    for (name, dtype, rows, cols) in shapes {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        let q = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &Device::Cpu)?, dtype)?;
        let bytes = q.storage_size_in_bytes();
        let Some(q) = QuantMatrix::new(Arc::new(q)) else {
            continue;
        };
        for m in [1usize, 128] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 31) % 17) as f32 - 8.0)
                .collect();
            let mut out = vec![0f32; m * rows];
            for b in Backend::available() {
                if b == Backend::Scalar && m > 1 {
                    continue;
                }
                let best = pool.install(|| {
                    let mut best = Duration::MAX;
                    let deadline = Instant::now() + Duration::from_millis(300);
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        q.matmul_with(b, &x, &mut out);
                        best = best.min(t.elapsed());
                    }
                    best
                });
                let s = best.as_secs_f64();
                println!(
                    "{name:18} m={m:<3} {b:?}: {:9.1} us  {:6.1} GB/s  {:6.1} GMAC/s",
                    s * 1e6,
                    bytes as f64 / s / 1e9,
                    (m * rows * cols) as f64 / s / 1e9
                );
            }
        }
    }
    Ok(())
}

/// Decode as the model does it: every matrix of SmolLM2-135M once per token (94 MiB, more than
/// the L2), so weights stream from L3 or DRAM instead of staying cached.
fn sweep(pool: &rayon::ThreadPool) -> Result<()> {
    let mut mats = Vec::new();
    let mut make = |dtype, rows: usize, cols: usize, seed: usize| -> Result<()> {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (((i + seed) * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        let q = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &Device::Cpu)?, dtype)?;
        if let Some(q) = QuantMatrix::new(Arc::new(q)) {
            mats.push(q);
        }
        Ok(())
    };
    for l in 0..30 {
        for (i, (r, c)) in [
            (576, 576),
            (192, 576),
            (192, 576),
            (576, 576),
            (1536, 576),
            (1536, 576),
            (576, 1536),
        ]
        .into_iter()
        .enumerate()
        {
            make(GgmlDType::Q4_1, r, c, l * 10 + i)?;
        }
    }
    make(GgmlDType::Q8_0, 49152, 576, 999)?;
    for b in Backend::available().into_iter().skip(1) {
        let best = pool.install(|| {
            let mut best = Duration::MAX;
            for _ in 0..20 {
                let t = Instant::now();
                for q in &mats {
                    let x = vec![0.5f32; q.cols()];
                    let mut out = vec![0f32; q.rows()];
                    q.matmul_with(b, &x, &mut out);
                }
                best = best.min(t.elapsed());
            }
            best
        });
        println!(
            "decode sweep of all 211 matrices, {b:?}: {:.2} ms per token",
            best.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// One 576 x 576 mat-vec from this (non-pool) thread after a pause, averaged over many calls.
fn latency(threads: usize) -> Result<()> {
    let (rows, cols) = (576, 576);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
        .collect();
    let q = QTensor::quantize(
        &Tensor::from_vec(w, (rows, cols), &Device::Cpu)?,
        GgmlDType::Q4_1,
    )?;
    let Some(q) = QuantMatrix::new(Arc::new(q)) else {
        return Ok(());
    };
    let x = vec![0.5f32; cols];
    let mut out = vec![0f32; rows];
    for pause_us in [0u64, 20, 100] {
        let n = 2000;
        let mut total = Duration::ZERO;
        for _ in 0..n {
            let t = Instant::now();
            q.matmul(&x, &mut out);
            total += t.elapsed();
            let p = Instant::now();
            while p.elapsed() < Duration::from_micros(pause_us) {
                std::hint::spin_loop();
            }
        }
        println!(
            "576x576 m=1 from the main thread, {threads} threads, after {pause_us:3} us pauses: \
             {:.1} us per call",
            total.as_secs_f64() * 1e6 / n as f64
        );
    }
    Ok(())
}
