//! Portable kernels, and the definition of what every backend computes: one dot product per
//! (weight row, activation row), summed like ggml's x86 AVX2 `ggml_vec_dot_*`:
//!
//! - per block, eight lanes: lane `j` holds the exact integer `sum_{k<4} x[4j+k] * y[4j+k]`;
//! - `acc[j] = fma(dx * dy, lane[j] as f32, acc[j])`, block after block;
//! - Q4_1 also keeps `summs = fma(m, s, summs)` (ggml's `summs += m * s`, which GCC contracts);
//! - result `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`, plus `summs` for Q4_1.

use super::{f16_at, Kernel, Tile, BLOCK};

/// Eight f32 lane accumulators and the horizontal sum of ggml's `hsum_float_8`.
#[derive(Clone, Copy, Default)]
pub struct Lanes(pub [f32; 8]);

impl Lanes {
    /// `acc[j] = fma(scale, lane[j], acc[j])` for the eight integer lane sums of one block.
    #[inline]
    pub fn fma_block(&mut self, scale: f32, lanes: [i32; 8]) {
        for (a, l) in self.0.iter_mut().zip(lanes) {
            *a = scale.mul_add(l as f32, *a);
        }
    }

    #[inline]
    pub fn hsum(&self) -> f32 {
        let a = self.0;
        ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
    }
}

/// The eight 4-element integer lane sums of one block of 32 products.
#[inline]
pub fn lane_sums(x: &[i8; BLOCK], y: &[i8; BLOCK]) -> [i32; 8] {
    let mut l = [0i32; 8];
    for (j, lj) in l.iter_mut().enumerate() {
        *lj = (0..4)
            .map(|k| i32::from(x[4 * j + k]) * i32::from(y[4 * j + k]))
            .sum();
    }
    l
}

/// Unpacks a 4-bit block: byte `j` holds value `j` in its low nibble and `j + 16` in its high.
#[inline]
pub fn nibbles(qs: &[u8], offset: i8) -> [i8; BLOCK] {
    let mut v = [0i8; BLOCK];
    for j in 0..BLOCK / 2 {
        v[j] = (qs[j] & 0x0F) as i8 - offset;
        v[j + BLOCK / 2] = (qs[j] >> 4) as i8 - offset;
    }
    v
}

/// Weight block `b` of a row as `(d, m, values)`; `m` is 0 for formats without a minimum.
trait Block {
    const BYTES: usize;
    fn load(row: &[u8], b: usize) -> (f32, f32, [i8; BLOCK]);
}

pub struct Q4_0;
pub struct Q4_1;
pub struct Q8_0;

impl Block for Q4_0 {
    const BYTES: usize = 18;
    fn load(row: &[u8], b: usize) -> (f32, f32, [i8; BLOCK]) {
        let o = b * Self::BYTES;
        (f16_at(row, o), 0.0, nibbles(&row[o + 2..o + 18], 8))
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    fn load(row: &[u8], b: usize) -> (f32, f32, [i8; BLOCK]) {
        let o = b * Self::BYTES;
        (
            f16_at(row, o),
            f16_at(row, o + 2),
            nibbles(&row[o + 4..o + 20], 0),
        )
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    fn load(row: &[u8], b: usize) -> (f32, f32, [i8; BLOCK]) {
        let o = b * Self::BYTES;
        let mut v = [0i8; BLOCK];
        for (vi, &q) in v.iter_mut().zip(&row[o + 2..o + 34]) {
            *vi = q as i8;
        }
        (f16_at(row, o), 0.0, v)
    }
}

/// One dot product of weight row `row` with activation row `c` of the tile.
fn dot<K: Block>(t: &Tile, row: &[u8], c: usize, with_min: bool) -> f32 {
    let mut acc = Lanes::default();
    let mut summs = 0f32;
    for b in 0..t.nb {
        let (dx, mx, qx) = K::load(row, b);
        let i = c * t.nb + b;
        if with_min {
            summs = mx.mul_add(t.s[i], summs);
        }
        acc.fma_block(dx * t.d[i], lane_sums(&qx, &t.qs[i]));
    }
    if with_min {
        acc.hsum() + summs
    } else {
        acc.hsum()
    }
}

macro_rules! scalar_kernel {
    ($t:ty, $min:expr) => {
        impl Kernel for $t {
            const ROWS: usize = 1;
            unsafe fn full<const C: usize>(t: &Tile) {
                // SAFETY: same contract.
                unsafe { Self::one::<C>(t) }
            }
            unsafe fn one<const C: usize>(t: &Tile) {
                let row = &t.w[..t.row_bytes];
                for c in 0..C {
                    let v = dot::<$t>(t, row, c, $min);
                    // SAFETY: the caller's contract.
                    unsafe { t.store(c, 0, v) };
                }
            }
        }
    };
}

scalar_kernel!(Q4_0, false);
scalar_kernel!(Q4_1, true);
scalar_kernel!(Q8_0, false);
