//! Kernel tests: every backend against the scalar definition (bit for bit), the scalar
//! definition against a naive f64 sum of the same integer block products, candle's `QMatMul`
//! within a stated tolerance, and thread-count independence.

use super::act::{quantize_scalar, round_f16, Activations};
use super::*;
use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};
use proptest::prelude::*;

/// SplitMix64; every test names its seed in failure messages.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal, with occasional 8x outliers like real activations.
    fn value(&mut self) -> f32 {
        let n: f32 = (0..4).map(|_| self.uniform()).sum::<f32>() - 2.0;
        if self.next_u64().is_multiple_of(64) {
            8.0 * n
        } else {
            n
        }
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.value()).collect()
    }
}

const FORMATS: [(Format, GgmlDType); 3] = [
    (Format::Q4_0, GgmlDType::Q4_0),
    (Format::Q4_1, GgmlDType::Q4_1),
    (Format::Q8_0, GgmlDType::Q8_0),
];

fn matrix(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
    let w = Rng(seed).vec(rows * cols, 0.05);
    let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    QuantMatrix::new(Arc::new(q)).unwrap()
}

fn run(q: &QuantMatrix, backend: Backend, x: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len() / q.cols() * q.rows()];
    q.matmul_with(backend, x, &mut out);
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// (rows, cols): the SmolLM2 projections, and slices of its 49152 x 576 head with leftover rows.
const SHAPES: [(usize, usize); 4] = [(576, 1536), (1536, 576), (1030, 576), (7, 64)];
const MS: [usize; 5] = [1, 3, 4, 7, 128];

#[test]
fn every_backend_matches_scalar_bit_for_bit() {
    let backends = Backend::available();
    eprintln!("backends on this CPU: {backends:?}");
    for (fi, &(format, dtype)) in FORMATS.iter().enumerate() {
        for (si, &(rows, cols)) in SHAPES.iter().enumerate() {
            let seed = (fi * 100 + si) as u64;
            let q = matrix(dtype, rows, cols, seed);
            assert_eq!(q.format(), format);
            for &m in &MS {
                // The largest case is slow for the scalar reference at opt-level 1; once per format.
                if m == 128 && si != 1 {
                    continue;
                }
                let x = Rng(seed + 7).vec(m * cols, 1.0);
                let want = run(&q, Backend::Scalar, &x);
                assert!(want.iter().all(|v| v.is_finite()));
                for &b in &backends[1..] {
                    let got = run(&q, b, &x);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{format:?} {rows}x{cols} m={m} {b:?} (seed {seed})"
                    );
                }
            }
        }
    }
}

/// Naive reference of the same math: integer products per block, summed in f64 without any
/// lane structure: `sum_b dx * dy * sum(qx * qy) + mx * sy`.
fn naive(q: &QuantMatrix, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let nb = q.cols() / BLOCK;
    let m = x.len() / q.cols();
    let mut acts = Activations::default();
    acts.quantize(x, m, nb, q.format() == Format::Q4_1, Backend::Scalar);
    let w = q.weights();
    let bb = q.format().block_bytes();
    let (mut out, mut mag) = (vec![0f64; m * q.rows()], vec![0f64; m * q.rows()]);
    for i in 0..m {
        for r in 0..q.rows() {
            let (mut sum, mut abs) = (0f64, 0f64);
            for b in 0..nb {
                let blk = &w[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                let d = f64::from(f16_at(blk, 0));
                let (min, vals): (f64, Vec<i32>) = match q.format() {
                    Format::Q4_0 => (0.0, unpack4(&blk[2..], -8)),
                    Format::Q4_1 => (f64::from(f16_at(blk, 2)), unpack4(&blk[4..], 0)),
                    Format::Q8_0 => (0.0, blk[2..].iter().map(|&v| i32::from(v as i8)).collect()),
                };
                let ya = &acts.qs[i * nb + b];
                let dot: i32 = vals.iter().zip(ya).map(|(&a, &y)| a * i32::from(y)).sum();
                let t1 = d * f64::from(acts.d[i * nb + b]) * f64::from(dot);
                let t2 = if q.format() == Format::Q4_1 {
                    min * f64::from(acts.s[i * nb + b])
                } else {
                    0.0
                };
                sum += t1 + t2;
                abs += t1.abs() + t2.abs();
            }
            out[i * q.rows() + r] = sum;
            mag[i * q.rows() + r] = abs;
        }
    }
    (out, mag)
}

fn unpack4(qs: &[u8], offset: i32) -> Vec<i32> {
    let lo = qs.iter().map(|&v| i32::from(v & 15) + offset);
    let hi = qs.iter().map(|&v| i32::from(v >> 4) + offset);
    lo.chain(hi).collect()
}

#[test]
fn scalar_matches_naive_sum_of_integer_block_products() {
    for (fi, &(format, dtype)) in FORMATS.iter().enumerate() {
        for &(rows, cols) in &[(64, 1536), (96, 576)] {
            for &m in &[1, 3, 4, 7] {
                let seed = 1000 + fi as u64;
                let q = matrix(dtype, rows, cols, seed);
                let x = Rng(seed + 1).vec(m * cols, 1.0);
                let got = run(&q, Backend::detect(), &x);
                let (want, mag) = naive(&q, &x);
                for (k, ((&g, &w), &a)) in got.iter().zip(&want).zip(&mag).enumerate() {
                    // f32 rounding of ~2 nb terms, relative to the sum of their magnitudes.
                    assert!(
                        (f64::from(g) - w).abs() <= 1e-5 * a + 1e-30,
                        "{format:?} {rows}x{cols} m={m} out[{k}]: {g} vs {w} (|terms| {a}, seed {seed})"
                    );
                }
            }
        }
    }
}

#[test]
fn close_to_candle_qmatmul() {
    // candle quantizes the activations differently (half away from zero, scale 1 / d; its x86
    // Q8_0 path is less accurate still), so the two differ by activation rounding: bounded by 2%
    // of the output's scale, and ours must be as close as candle's to the exact product of the
    // dequantized weights (within 10% + 0.1% of scale).
    for (fi, &(format, dtype)) in FORMATS.iter().enumerate() {
        for m in [1, 5] {
            let (rows, cols) = (256, 1536);
            let seed = 2000 + fi as u64;
            let q = matrix(dtype, rows, cols, seed);
            let x = Rng(seed + 1).vec(m * cols, 1.0);
            let ours = run(&q, Backend::detect(), &x);
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            let theirs = QMatMul::from_arc(q.tensor().clone())
                .unwrap()
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let w = q
                .tensor()
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let exact: Vec<f64> = (0..m * rows)
                .map(|o| {
                    let (i, r) = (o / rows, o % rows);
                    (0..cols)
                        .map(|k| f64::from(w[r][k]) * f64::from(x[i * cols + k]))
                        .sum()
                })
                .collect();
            let max_diff = |a: &[f32], b: &[f64]| {
                a.iter()
                    .zip(b)
                    .fold(0f64, |acc, (&u, &v)| acc.max((f64::from(u) - v).abs()))
            };
            let scale = exact.iter().fold(0f64, |a, v| a.max(v.abs()));
            let theirs64: Vec<f64> = theirs.iter().map(|&v| f64::from(v)).collect();
            let vs_candle = max_diff(&ours, &theirs64);
            let (err_ours, err_candle) = (max_diff(&ours, &exact), max_diff(&theirs, &exact));
            eprintln!(
                "{format:?} m={m}: |ours - candle| {vs_candle:.2e}, error vs exact: ours \
                 {err_ours:.2e}, candle {err_candle:.2e}, scale {scale:.2e}"
            );
            assert!(vs_candle <= 0.02 * scale, "{format:?} m={m} (seed {seed})");
            assert!(
                err_ours <= 1.1 * err_candle + 1e-3 * scale,
                "{format:?} m={m} (seed {seed})"
            );
        }
    }
}

#[test]
fn same_bits_for_any_thread_count() {
    for (fi, &(format, dtype)) in FORMATS.iter().enumerate() {
        let seed = 3000 + fi as u64;
        let q = matrix(dtype, 1030, 576, seed);
        for &m in &[1, 7] {
            let x = Rng(seed + 1).vec(m * 576, 1.0);
            let outs: Vec<Vec<u32>> = [1, 2, 3]
                .iter()
                .map(|&n| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(n)
                        .build()
                        .unwrap();
                    pool.install(|| {
                        let mut out = vec![0f32; m * q.rows()];
                        q.matmul(&x, &mut out);
                        bits(&out)
                    })
                })
                .collect();
            assert_eq!(outs[0], outs[1], "{format:?} m={m}: 1 vs 2 threads");
            assert_eq!(outs[0], outs[2], "{format:?} m={m}: 1 vs 3 threads");
        }
    }
}

#[test]
fn quantizer_rounds_half_to_even_like_ggml() {
    // amax 127 makes id exactly 1, so the products are the inputs: ties stay ties.
    let mut x = vec![0f32; 32];
    x[..8].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]);
    for b in Backend::available() {
        let mut a = Activations::default();
        a.quantize(&x, 1, 1, true, b);
        assert_eq!(&a.qs[0][..8], &[127, 0, 2, 2, 0, -2, -2, 3], "{b:?}");
        assert_eq!(a.d[0], 1.0);
        assert_eq!(a.s[0], 127.0 + 2.0 + 2.0 - 2.0 - 2.0 + 3.0);
    }
    // An all-zero block: d = 0, id = 0.
    let mut a = Activations::default();
    a.quantize(&[0f32; 32], 1, 1, true, Backend::detect());
    assert_eq!((a.qs[0], a.d[0], a.s[0]), ([0; 32], 0.0, 0.0));
}

/// Q8_0 rows from `quantize_scalar`.
fn quantized(x: &[f32]) -> (Vec<[i8; 32]>, Vec<f32>, Vec<f32>) {
    let nb = x.len() / 32;
    let (mut qs, mut d, mut s) = (vec![[0; 32]; nb], vec![0.0; nb], vec![0.0; nb]);
    quantize_scalar(x, &mut qs, &mut d, Some(&mut s));
    (qs, d, s)
}

proptest! {
    #[test]
    fn quantizer_invariants(
        x in (1usize..=4).prop_flat_map(|n| prop::collection::vec(-1e3f32..1e3, 32 * n))
    ) {
        let (qs, d, s) = quantized(&x);
        for (b, xb) in x.chunks(32).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            prop_assert_eq!(d[b], round_f16(amax / 127.0));
            let q = qs[b];
            let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
            prop_assert_eq!(s[b], round_f16(amax / 127.0 * sum as f32));
            for (&v, &qi) in xb.iter().zip(&q) {
                prop_assert!((-127..=127).contains(&qi));
                // Within half a step of the value (plus f32 rounding of x * 127 / amax).
                prop_assert!((v * 127.0 / amax.max(f32::MIN_POSITIVE) - f32::from(qi)).abs() <= 0.5 + 1e-4);
            }
            if amax > 0.0 {
                prop_assert_eq!(q.iter().map(|v| v.unsigned_abs()).max(), Some(127));
            }
        }
        for b in Backend::available() {
            let mut a = Activations::default();
            a.quantize(&x, 1, x.len() / 32, true, b);
            prop_assert_eq!(&a.qs, &qs);
            prop_assert_eq!(bits(&a.d), bits(&d));
            prop_assert_eq!(bits(&a.s), bits(&s));
        }
    }
}

#[test]
fn linear_forward_uses_the_kernel_for_any_leading_shape() {
    use crate::layers::Linear;
    let q = matrix(GgmlDType::Q4_1, 64, 96, 4000);
    let x = Rng(4001).vec(2 * 3 * 96, 1.0);
    let mut want = vec![0f32; 6 * 64];
    q.matmul(&x, &mut want);
    let bias = Tensor::from_vec(Rng(4002).vec(64, 1.0), 64, &Device::Cpu).unwrap();
    let lin = Linear::new(
        QMatMul::from_arc(q.tensor().clone()).unwrap(),
        Some(bias.clone()),
    );
    let xt = Tensor::from_vec(x, (2, 3, 96), &Device::Cpu).unwrap();
    let y = lin.forward(&xt).unwrap();
    assert_eq!(y.dims(), &[2, 3, 64]);
    let want = Tensor::from_vec(want, (2, 3, 64), &Device::Cpu)
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    let diff = (y - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // A non-contiguous input (a transposed view) gives the same values.
    let xt2 = Tensor::from_vec(Rng(4001).vec(6 * 96, 1.0), (96, 6), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    let a = lin.forward(&xt2).unwrap();
    let b = lin.forward(&xt2.contiguous().unwrap()).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

/// Writes cases for `scripts/ggml_kernel_check.sh`, which recomputes them with llama.cpp's own
/// `quantize_row_q8_*` and `ggml_vec_dot_*` and compares the bits. Each file: u64 format
/// (0 Q4_0, 1 Q4_1, 2 Q8_0), rows, cols, m; the weight blocks; `x` f32 `[m, cols]`; our
/// `out` f32 `[m, rows]`.
#[test]
#[ignore = "run by scripts/ggml_kernel_check.sh, needs PLEXUS_GGML_CHECK_DIR"]
fn dump_cases_for_ggml_check() {
    use std::io::Write;
    let dir = std::path::PathBuf::from(std::env::var_os("PLEXUS_GGML_CHECK_DIR").unwrap());
    let mut cases: Vec<(String, QuantMatrix)> = FORMATS
        .iter()
        .map(|&(format, dtype)| (format!("random_{format:?}"), matrix(dtype, 1030, 1536, 77)))
        .collect();
    let model = plexus_testkit::real_model();
    if let Ok(mut f) = std::fs::File::open(model) {
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        for name in [
            "blk.0.ffn_gate.weight",
            "blk.5.ffn_down.weight",
            "blk.3.attn_k.weight",
            "token_embd.weight",
        ] {
            let t = content.tensor(&mut f, name, &Device::Cpu).unwrap();
            cases.push((
                format!("smollm2_{name}"),
                QuantMatrix::new(Arc::new(t)).unwrap(),
            ));
        }
    }
    for (name, q) in cases {
        let m = 5;
        let x = Rng(99).vec(m * q.cols(), 1.0);
        let out = run(&q, Backend::detect(), &x);
        let format = q.format() as u64;
        let mut file = std::fs::File::create(dir.join(format!("{name}.bin"))).unwrap();
        for h in [format, q.rows() as u64, q.cols() as u64, m as u64] {
            file.write_all(&h.to_le_bytes()).unwrap();
        }
        file.write_all(q.weights()).unwrap();
        for v in x.iter().chain(&out) {
            file.write_all(&v.to_le_bytes()).unwrap();
        }
    }
}

#[test]
fn crew_runs_every_chunk_exactly_once_under_concurrent_callers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Four caller threads outside rayon's pool: one holds the crew at a time, the others fall
    // back; in all cases every chunk of every job runs once.
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for job in 0..2000 {
                    let n = 1 + (job + t) % 5;
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    let f = |i: usize| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    };
                    if !super::crew::run(n, 2, &f) {
                        (0..n).for_each(f);
                    }
                    assert!(
                        hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                        "job {job}"
                    );
                }
            });
        }
    });
}

#[test]
fn concurrent_callers_get_the_same_bits() {
    let q = matrix(GgmlDType::Q4_1, 1030, 576, 5000);
    let x = Rng(5001).vec(576, 1.0);
    let want = run(&q, Backend::detect(), &x);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..200 {
                    let mut out = vec![0f32; q.rows()];
                    q.matmul(&x, &mut out);
                    assert_eq!(bits(&out), bits(&want));
                }
            });
        }
    });
}
