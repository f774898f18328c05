//! Activation fingerprints: a compact, tolerance-comparable summary of a stage's output, one per
//! window of [`WINDOW`] positions, committed in the stage call's receipt.
//!
//! - a stage's output rows (hidden states `[len, hidden]`, or the last stage's logits rows) go
//!   into a [`Fingerprinter`] in position order, call by call (prefill chunks, decode steps);
//! - each window of 32 absolute positions becomes one [`Window`];
//! - [`Fingerprint::digest`] is the 32 bytes a receipt carries; the fingerprint itself is kept by
//!   the provider and sent when the gateway asks for it (after the draw).
//!
//! Two schemes, compared on the real model in `tests/real_model.rs` (BENCHMARKS.md):
//!
//! - [`Scheme::TopK`] (TOPLOC): the `k` largest-magnitude entries of the window's last row, as
//!   (index u16, value f16). 4k bytes per window before TOPLOC's polynomial packing.
//! - [`Scheme::Sketch`] (Activation-DiFR style random projection): every row, divided by its
//!   RMS, is projected onto `dims` seeded ±1 directions, the projections are summed over the
//!   window in position order (f64) and stored as f16. 2·dims bytes per window; it covers every
//!   position of the window, not only the last.
//!
//! Both are pure functions of the rows and their positions: the same rows give the same bytes
//! however the calls were chunked.

use half::f16;
use plexus_core::rng::{bits, Stream};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;

/// Positions per fingerprint window (TOPLOC's 32).
pub const WINDOW: u64 = 32;

/// Largest `k` or `dims` a scheme may ask for (bounds what a peer can make us allocate).
pub const MAX_COMPONENTS: u16 = 1024;

/// Directions of [`Scheme::DEFAULT`].
const DEFAULT_DIMS: u16 = 16;

/// How a window is summarised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    /// The `k` largest-magnitude entries of the window's last row.
    TopK { k: u16 },
    /// Sums over the window of each RMS-normalised row projected onto `dims` random ±1
    /// directions drawn from `key`.
    Sketch { dims: u16, key: u64 },
}

impl Scheme {
    /// The scheme Plexus commits with (chosen by measurement: see the module docs and
    /// BENCHMARKS.md): a 16-direction sketch, 32 bytes per 32 positions.
    pub const DEFAULT: Scheme = Scheme::Sketch {
        dims: DEFAULT_DIMS,
        key: 0x706c_6578_7573_0001,
    };

    /// Bytes one full window takes in a fingerprint's encoding (its data only).
    pub fn window_bytes(&self) -> usize {
        match *self {
            Scheme::TopK { k } => 4 * usize::from(k),
            Scheme::Sketch { dims, .. } => 2 * usize::from(dims),
        }
    }
}

/// One window's summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowData {
    /// (index, f16 bits), largest magnitude first (ties by lower index).
    TopK(Vec<(u16, u16)>),
    /// f16 bits, one per direction.
    Sketch(Vec<u16>),
}

/// The summary of the rows of one window that a stage produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// The window number: it covers positions `index * WINDOW .. (index + 1) * WINDOW`.
    pub index: u64,
    /// How many rows of the window went in (fewer than [`WINDOW`] for a partial window, or for
    /// a last stage, which produces logits only where it samples).
    pub rows: u16,
    pub data: WindowData,
}

/// The fingerprint of one stage's output over a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub scheme: Scheme,
    /// Width of the rows (hidden size, or vocabulary for logits).
    pub width: u32,
    pub windows: Vec<Window>,
}

/// Why rows could not be fingerprinted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FingerprintError {
    #[error("{got} values are not whole rows of width {width}")]
    Ragged { got: usize, width: usize },
    #[error("rows must come in increasing positions: got {got} after {last}")]
    OutOfOrder { got: u64, last: u64 },
    #[error("row width {width} does not fit the scheme (1..=65536 columns)")]
    BadWidth { width: usize },
    #[error("the scheme asks for {asked} components, more than {max}")]
    TooManyComponents { asked: u16, max: u16 },
    #[error("a row holds a non-finite value at position {position}")]
    NonFinite { position: u64 },
}

/// Builds a [`Fingerprint`] from rows pushed in position order.
#[derive(Clone, Debug)]
pub struct Fingerprinter {
    scheme: Scheme,
    width: usize,
    /// Sketch directions transposed, `width x dims` signs (+1 / -1): one pass over a row
    /// feeds every direction's sum. Shared by clones (a vocabulary's table is 786 KB).
    signs: Arc<[i8]>,
    windows: Vec<Window>,
    open: Option<Open>,
    last: Option<u64>,
}

#[derive(Clone, Debug)]
struct Open {
    index: u64,
    rows: u16,
    /// Sketch sums, or the last row (TopK).
    acc: Vec<f64>,
    last_row: Vec<f32>,
}

impl Fingerprinter {
    pub fn new(scheme: Scheme, width: usize) -> Result<Self, FingerprintError> {
        if width == 0 || width > 1 << 16 {
            return Err(FingerprintError::BadWidth { width });
        }
        let signs = match scheme {
            Scheme::TopK { k } => {
                check_components(k)?;
                Arc::from([])
            }
            Scheme::Sketch { dims, key } => {
                check_components(dims)?;
                transpose(&directions(key, dims, width), usize::from(dims), width).into()
            }
        };
        Ok(Self {
            scheme,
            width,
            signs,
            windows: Vec::new(),
            open: None,
            last: None,
        })
    }

    /// Width of the rows it takes.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Adds `rows` (row-major, `rows.len() / width` rows) at positions `first..`.
    pub fn push(&mut self, first: u64, rows: &[f32]) -> Result<(), FingerprintError> {
        if !rows.len().is_multiple_of(self.width) {
            return Err(FingerprintError::Ragged {
                got: rows.len(),
                width: self.width,
            });
        }
        for (i, row) in rows.chunks_exact(self.width).enumerate() {
            let position = first + i as u64;
            if let Some(last) = self.last {
                if position <= last {
                    return Err(FingerprintError::OutOfOrder {
                        got: position,
                        last,
                    });
                }
            }
            if row.iter().any(|v| !v.is_finite()) {
                return Err(FingerprintError::NonFinite { position });
            }
            self.push_row(position, row);
            self.last = Some(position);
        }
        Ok(())
    }

    fn push_row(&mut self, position: u64, row: &[f32]) {
        let index = position / WINDOW;
        if self.open.as_ref().is_some_and(|o| o.index != index) {
            self.close();
        }
        let dims = match self.scheme {
            Scheme::Sketch { dims, .. } => usize::from(dims),
            Scheme::TopK { .. } => 0,
        };
        let open = self.open.get_or_insert_with(|| Open {
            index,
            rows: 0,
            acc: vec![0.0; dims],
            last_row: Vec::new(),
        });
        open.rows += 1;
        match self.scheme {
            Scheme::TopK { .. } => {
                open.last_row.clear();
                open.last_row.extend_from_slice(row);
            }
            Scheme::Sketch { .. } => {
                let ms: f64 = row
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    / row.len() as f64;
                let inv = if ms > 0.0 { 1.0 / ms.sqrt() } else { 0.0 };
                for (acc, dot) in open.acc.iter_mut().zip(project(row, &self.signs, dims)) {
                    // Divided by sqrt(width) so a component is O(1) per row whatever the width.
                    *acc += dot * inv / (self.width as f64).sqrt();
                }
            }
        }
    }

    fn close(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        let data = match self.scheme {
            Scheme::TopK { k } => WindowData::TopK(top_k(&open.last_row, usize::from(k))),
            Scheme::Sketch { .. } => WindowData::Sketch(
                open.acc
                    .iter()
                    .map(|&v| f16::from_f64(v).to_bits())
                    .collect(),
            ),
        };
        self.windows.push(Window {
            index: open.index,
            rows: open.rows,
            data,
        });
    }

    /// The fingerprint of everything pushed (the last window may be partial).
    pub fn finish(mut self) -> Fingerprint {
        self.close();
        Fingerprint {
            scheme: self.scheme,
            width: self.width as u32,
            windows: self.windows,
        }
    }
}

fn check_components(n: u16) -> Result<(), FingerprintError> {
    if n == 0 || n > MAX_COMPONENTS {
        return Err(FingerprintError::TooManyComponents {
            asked: n,
            max: MAX_COMPONENTS,
        });
    }
    Ok(())
}

/// `dims x width` random signs from `key` (the audit stream of the counter-based RNG).
fn directions(key: u64, dims: u16, width: usize) -> Vec<i8> {
    let mut out = Vec::with_capacity(usize::from(dims) * width);
    for d in 0..u64::from(dims) {
        for block in 0..width.div_ceil(128) {
            let b = bits(key, Stream::Audit, d, block as u32);
            for i in 0..128 {
                if out.len() == (d as usize + 1) * width {
                    break;
                }
                let bit = b[i / 32] >> (i % 32) & 1;
                out.push(if bit == 1 { 1 } else { -1 });
            }
        }
    }
    out
}

/// `width x dims` from `dims x width`.
fn transpose(signs: &[i8], dims: usize, width: usize) -> Vec<i8> {
    let mut out = vec![0; signs.len()];
    for (d, direction) in signs.chunks_exact(width).enumerate() {
        for (i, &s) in direction.iter().enumerate() {
            out[i * dims + d] = s;
        }
    }
    out
}

/// The dot product of `row` with each of the `dims` directions (`signs` transposed, `width x
/// dims`), in one pass over the row. Each direction's sum adds its terms in ascending column
/// order from -0.0, as `Iterator::sum` over that direction alone would, and a product with
/// +-1 is exact: the bits are those of `dims` separate passes, at the cost of one (the
/// independent sums run side by side in SIMD lanes instead of one dependent chain each).
fn project(row: &[f32], signs: &[i8], dims: usize) -> Vec<f64> {
    if dims == usize::from(DEFAULT_DIMS) {
        return project_fixed::<{ DEFAULT_DIMS as usize }>(row, signs).to_vec();
    }
    let mut dots = vec![-0.0f64; dims];
    for (&v, signs) in row.iter().zip(signs.chunks_exact(dims)) {
        let v = f64::from(v);
        for (dot, &s) in dots.iter_mut().zip(signs) {
            *dot += v * f64::from(s);
        }
    }
    dots
}

/// [`project`] for a `D` known when compiling, so the sums stay in registers.
fn project_fixed<const D: usize>(row: &[f32], signs: &[i8]) -> [f64; D] {
    let mut dots = [-0.0f64; D];
    for (&v, signs) in row.iter().zip(signs.chunks_exact(D)) {
        let v = f64::from(v);
        for (dot, &s) in dots.iter_mut().zip(signs) {
            *dot += v * f64::from(s);
        }
    }
    dots
}

/// The `k` largest-magnitude entries as (index, f16 bits), largest first, ties by lower index.
fn top_k(row: &[f32], k: usize) -> Vec<(u16, u16)> {
    let order =
        |a: &(usize, f32), b: &(usize, f32)| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0));
    let mut all: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
    let k = k.min(all.len());
    if k > 0 && k < all.len() {
        all.select_nth_unstable_by(k - 1, order);
    }
    all.truncate(k);
    all.sort_unstable_by(order);
    all.into_iter()
        .map(|(i, v)| (i as u16, f16::from_f32(v).to_bits()))
        .collect()
}

impl Fingerprint {
    /// The canonical bytes: what [`Fingerprint::digest`] hashes and what travels to the gateway.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(16 + self.windows.len() * (10 + self.scheme.window_bytes()));
        match self.scheme {
            Scheme::TopK { k } => {
                out.push(1);
                out.extend_from_slice(&k.to_le_bytes());
            }
            Scheme::Sketch { dims, key } => {
                out.push(2);
                out.extend_from_slice(&dims.to_le_bytes());
                out.extend_from_slice(&key.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.width.to_le_bytes());
        out.extend_from_slice(&(self.windows.len() as u64).to_le_bytes());
        for w in &self.windows {
            out.extend_from_slice(&w.index.to_le_bytes());
            out.extend_from_slice(&w.rows.to_le_bytes());
            match &w.data {
                WindowData::TopK(entries) => {
                    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
                    for (i, v) in entries {
                        out.extend_from_slice(&i.to_le_bytes());
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                WindowData::Sketch(values) => {
                    out.extend_from_slice(&(values.len() as u16).to_le_bytes());
                    for v in values {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    /// The 32 bytes a stage call's receipt commits to.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"plexus/fingerprint/v1");
        h.update(self.encode());
        h.finalize().into()
    }

    /// Bytes of the windows' data (what the fingerprint costs per position, without framing).
    pub fn data_bytes(&self) -> usize {
        self.windows
            .iter()
            .map(|w| match &w.data {
                WindowData::TopK(e) => 4 * e.len(),
                WindowData::Sketch(v) => 2 * v.len(),
            })
            .sum()
    }

    /// Rows covered by the fingerprint.
    pub fn rows(&self) -> u64 {
        self.windows.iter().map(|w| u64::from(w.rows)).sum()
    }
}

/// The fingerprint of `rows` at positions `first..` in one go.
pub fn fingerprint(
    scheme: Scheme,
    width: usize,
    first: u64,
    rows: &[f32],
) -> Result<Fingerprint, FingerprintError> {
    let mut f = Fingerprinter::new(scheme, width)?;
    f.push(first, rows)?;
    Ok(f.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rows(n: usize, width: usize, seed: u64) -> Vec<f32> {
        (0..n * width)
            .map(|i| {
                let b = bits(seed, Stream::Audit, i as u64, 7);
                (b[0] as f32 / u32::MAX as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn windows_follow_absolute_positions() {
        let r = rows(40, 8, 1);
        let f = fingerprint(Scheme::DEFAULT, 8, 20, &r).unwrap();
        // positions 20..60: windows 0 (20..32), 1 (32..60).
        assert_eq!(f.windows.len(), 2);
        assert_eq!((f.windows[0].index, f.windows[0].rows), (0, 12));
        assert_eq!((f.windows[1].index, f.windows[1].rows), (1, 28));
        assert_eq!(f.rows(), 40);
    }

    #[test]
    fn top_k_orders_by_magnitude() {
        let t = top_k(&[0.5, -3.0, 2.0, -2.0, 0.0], 3);
        let idx: Vec<u16> = t.iter().map(|e| e.0).collect();
        assert_eq!(idx, vec![1, 2, 3]);
    }

    #[test]
    fn refuses_bad_input() {
        let mut f = Fingerprinter::new(Scheme::TopK { k: 4 }, 8).unwrap();
        assert_eq!(
            f.push(0, &[0.0; 7]),
            Err(FingerprintError::Ragged { got: 7, width: 8 })
        );
        f.push(5, &[0.0; 8]).unwrap();
        assert_eq!(
            f.push(5, &[0.0; 8]),
            Err(FingerprintError::OutOfOrder { got: 5, last: 5 })
        );
        let mut bad = [0.0f32; 8];
        bad[3] = f32::NAN;
        assert_eq!(
            f.push(6, &bad),
            Err(FingerprintError::NonFinite { position: 6 })
        );
        assert!(Fingerprinter::new(Scheme::TopK { k: 0 }, 8).is_err());
        assert!(Fingerprinter::new(Scheme::Sketch { dims: 5000, key: 1 }, 8).is_err());
        assert!(Fingerprinter::new(Scheme::DEFAULT, 0).is_err());
    }

    #[test]
    fn directions_are_balanced_and_keyed() {
        let d = directions(3, 4, 1000);
        assert_eq!(d.len(), 4000);
        let plus = d.iter().filter(|&&s| s == 1).count();
        assert!((1800..2200).contains(&plus), "{plus}");
        assert_ne!(directions(3, 1, 256), directions(4, 1, 256));
    }

    #[test]
    fn a_changed_row_changes_the_window() {
        let r = rows(64, 16, 2);
        let a = fingerprint(Scheme::DEFAULT, 16, 0, &r).unwrap();
        let mut r2 = r.clone();
        r2[16 * 40 + 3] += 1.0;
        let b = fingerprint(Scheme::DEFAULT, 16, 0, &r2).unwrap();
        assert_eq!(a.windows[0], b.windows[0]);
        assert_ne!(a.windows[1], b.windows[1]);
        assert_ne!(a.digest(), b.digest());
    }

    /// The sketch as first written: one ordered pass over the row per direction.
    fn sketch_by_direction(dims: u16, key: u64, width: usize, rows: &[f32]) -> Vec<u16> {
        let dirs = directions(key, dims, width);
        let mut acc = vec![0.0f64; usize::from(dims)];
        for row in rows.chunks_exact(width) {
            let ms: f64 = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / width as f64;
            let inv = if ms > 0.0 { 1.0 / ms.sqrt() } else { 0.0 };
            for (d, acc) in acc.iter_mut().enumerate() {
                let dot: f64 = row
                    .iter()
                    .zip(&dirs[d * width..(d + 1) * width])
                    .map(|(&v, &s)| f64::from(v) * f64::from(s))
                    .sum();
                *acc += dot * inv / (width as f64).sqrt();
            }
        }
        acc.iter().map(|&v| f16::from_f64(v).to_bits()).collect()
    }

    proptest! {
        /// The one-pass projection gives the bits of one ordered pass per direction, for the
        /// default 16 directions and for other counts, on rows with signed zeros and a wide
        /// spread of magnitudes (where a reordered sum would round differently).
        #[test]
        fn one_pass_projection_keeps_the_bits(
            width in 1usize..300,
            n in 1usize..(WINDOW as usize + 1),
            dims in prop_oneof![Just(16u16), 1u16..40],
            seed in any::<u64>(),
            zeros in any::<bool>(),
        ) {
            let mut r = rows(n, width, seed);
            for (i, v) in r.iter_mut().enumerate() {
                *v *= 10f32.powi((i % 13) as i32 - 6);
                if zeros && i % 3 == 0 {
                    *v = if i % 2 == 0 { 0.0 } else { -0.0 };
                }
            }
            let key = seed ^ 0x5eed;
            let f = fingerprint(Scheme::Sketch { dims, key }, width, 0, &r).unwrap();
            prop_assert_eq!(f.windows.len(), 1);
            prop_assert_eq!(
                &f.windows[0].data,
                &WindowData::Sketch(sketch_by_direction(dims, key, width, &r))
            );
        }
    }

    proptest! {
        /// The same rows give the same bytes however the calls are chunked.
        #[test]
        fn chunking_does_not_matter(n in 1usize..100, cuts in proptest::collection::vec(1usize..40, 0..6), first in 0u64..100, topk in any::<bool>()) {
            let width = 12;
            let r = rows(n, width, first);
            let scheme = if topk { Scheme::TopK { k: 5 } } else { Scheme::DEFAULT };
            let whole = fingerprint(scheme, width, first, &r).unwrap();
            let mut f = Fingerprinter::new(scheme, width).unwrap();
            let mut at = 0usize;
            for c in cuts {
                let end = (at + c).min(n);
                f.push(first + at as u64, &r[at * width..end * width]).unwrap();
                at = end;
            }
            f.push(first + at as u64, &r[at * width..]).unwrap();
            let chunked = f.finish();
            prop_assert_eq!(whole.digest(), chunked.digest());
            prop_assert_eq!(&whole, &chunked);
            prop_assert_eq!(whole.rows(), n as u64);
        }
    }
}
