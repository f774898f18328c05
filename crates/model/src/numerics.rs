//! Element-wise kernels of the cached inference path, computed with the same operations, in
//! the same order, as llama.cpp's CPU backend (ggml-cpu `rms_norm_f32`, `vec_swiglu_f32` with
//! its AVX-512 `ggml_v_expf`). Greedy outputs are checked token for token against llama.cpp, and
//! int8 activation quantization turns a one-ulp difference here into a visible one in the
//! logits, so these follow the reference bit for bit rather than calling `f32::exp`.

/// RMS normalisation of each row of `x` (`[rows][w.len()]`), scaled by `w`:
/// `x * (1 / sqrtf(mean(x^2) + eps)) * w`, the mean summed in f64 as ggml does.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(n) {
        let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| (v * scale) * g));
    }
    out
}

/// `e^x` as ggml's AVX-512 `ggml_v_expf` computes it (an Arm optimized-routines polynomial,
/// max error ~1.5 ulp).
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), r); // 0x1.715476p+0
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0)); // 0x1.ffffecp-1
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n)
}

/// `j * 2^n` for integral `n` with one rounding (AVX-512 `vscalefps`).
fn scalef(j: f32, n: f32) -> f32 {
    let e = n as i32;
    // Split the exponent so neither factor overflows or goes subnormal on its own.
    let (e1, e2) = (e / 2, e - e / 2);
    let p = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    (f64::from(j) * f64::from(p(e1)) * f64::from(p(e2))) as f32
}

/// `silu(g) * u` element-wise, `silu(x) = x / (1 + e^-x)`.
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(&x, &y)| (x / (1.0 + expf(0.0 - x))) * y)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_within_two_ulp_of_libm() {
        for i in -4000..4000 {
            let x = i as f32 * 0.0217;
            let (a, b) = (expf(x), x.exp());
            let ulp = (b.to_bits() as i64 - a.to_bits() as i64).abs();
            assert!(ulp <= 2, "x={x}: {a} vs {b} ({ulp} ulp)");
        }
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5, 4.0, -1.0];
        let w = [1.0f32, 2.0, 0.5];
        let y = rms_norm(&x, &w, 1e-5);
        let r = ((1.0f64 + 4.0 + 9.0) / 3.0 + 1e-5).sqrt();
        assert!((f64::from(y[1]) - (-2.0 / r * 2.0)).abs() < 1e-6);
        assert_eq!(y.len(), 6);
    }

    #[test]
    fn swiglu_matches_definition() {
        let y = swiglu(&[1.0, -3.0], &[2.0, 0.5]);
        let silu = |x: f64| x / (1.0 + (-x).exp());
        assert!((f64::from(y[0]) - silu(1.0) * 2.0).abs() < 1e-6);
        assert!((f64::from(y[1]) - silu(-3.0) * 0.5).abs() < 1e-6);
    }
}
