//! Quantized matrix multiplication for the GGML block formats Q4_0, Q4_1 and Q8_0, written to
//! reproduce llama.cpp's CPU results bit for bit (greedy outputs are compared token by token
//! against llama.cpp's) and to run at its speed.
//!
//! - weights: the raw GGML blocks of a `[rows, cols]` matrix, borrowed from the candle
//!   [`QTensor`] that owns them (no copy; a tied output head shares the embedding's table).
//! - `x [m, cols]` f32 -> each row quantized once per call (`act`: Q8_1 for Q4_1 weights,
//!   Q8_0 otherwise, exactly as ggml's x86 `quantize_row_q8_*`) into a thread-local scratch.
//! - the weight rows are split into contiguous chunks, one per rayon thread (run by `crew` when
//!   the caller is outside rayon's pool, by `rayon::join` inside it); a chunk runs tiles
//!   of a few weight rows x up to [`ACT_ROWS`] activation rows, so each weight block is loaded and
//!   unpacked once per [`ACT_ROWS`] rows, and for prefill a few KiB of weight rows stay in L1
//!   while all the activation rows stream past them.
//! - `out [m, rows]`: each value is one dot product, summed in the order of ggml's x86 AVX2
//!   `ggml_vec_dot_*` (eight f32 lanes, one FMA per block, the same final horizontal sum), so the
//!   result never depends on the backend, the tiling or the thread count.
//!
//! Backends: `scalar` (portable, also the definition), `avx2` (AVX2+FMA+F16C) and `avx512`
//! (AVX-512 BW/VL + VNNI, two weight rows per 512-bit register), chosen at run time.

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod crew;
mod scalar;

use act::Activations;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// Activation rows per tile: each unpacked weight block is reused for this many rows.
pub const ACT_ROWS: usize = 4;

/// Values per block in all three formats (and in Q8_0/Q8_1 activations).
pub const BLOCK: usize = 32;

/// Weight tiles for prefill are sized to stay in L1 while the activation rows stream past.
const TILE_BYTES: usize = 16 * 1024;

/// Software prefetch distance in the weight stream. At decode the weights (94 MiB for SmolLM2-135M)
/// come from DRAM once per token and the hardware prefetcher alone leaves the kernels waiting:
/// prefetching ~4 KiB ahead made a decode sweep over all matrices ~30% faster.
const PREFETCH_BYTES: usize = 4096;

/// Below this many weight blocks x activation rows a call runs on the calling thread (a 192 x 576
/// k/v projection at decode is ~6 us of work). With `crew` the hand-off costs ~1-2 us, and
/// 1024 (k/v parallel too) decoded SmolLM2-135M no faster than this.
const PARALLEL_MIN_BLOCKS: usize = 4096;

/// A GGML weight format with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 32 4-bit values `q` and an f16 scale `d`: `d * (q - 8)`; dotted with Q8_0 activations.
    Q4_0,
    /// 32 4-bit values, f16 scale `d` and minimum `m`: `d * q + m`; dotted with Q8_1.
    Q4_1,
    /// 32 i8 values and an f16 scale; dotted with Q8_0.
    Q8_0,
}

impl Format {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Format::Q4_0),
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        }
    }

    /// Bytes per block of 32 values.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }

    /// Whether the activations carry the Q8_1 sum term `s = d * sum(q)` (for the Q4_1 minimum).
    const fn act_sums(self) -> bool {
        matches!(self, Format::Q4_1)
    }
}

/// Which instruction set runs the kernels. All give bit-identical results. Ordered: each one
/// needs the features of those before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    Scalar,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI, plus the AVX2 set.
    Avx512,
}

impl Backend {
    /// The fastest backend this CPU supports (detected once).
    pub fn detect() -> Self {
        static BEST: OnceLock<Backend> = OnceLock::new();
        *BEST.get_or_init(|| Self::available().last().copied().unwrap_or(Backend::Scalar))
    }

    /// Every backend this CPU supports, slowest first.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    pub fn available() -> Vec<Backend> {
        let mut v = vec![Backend::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Backend::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Backend::Avx512);
                }
            }
        }
        v
    }

    fn supported(self) -> bool {
        self <= Self::detect()
    }
}

thread_local! {
    static FORCED_BACKEND: std::cell::Cell<Option<Backend>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every [`QuantMatrix::matmul`] called from this thread on `backend` (falling
/// back to scalar where unsupported): audits replay a stage on another backend to check that
/// fingerprints do not depend on it.
pub fn with_backend<R>(backend: Backend, f: impl FnOnce() -> R) -> R {
    let before = FORCED_BACKEND.with(|b| b.replace(Some(backend)));
    let out = f();
    FORCED_BACKEND.with(|b| b.set(before));
    out
}

/// The backend this thread's kernels run on: the one forced by [`with_backend`], else the
/// fastest this CPU has.
pub fn current_backend() -> Backend {
    FORCED_BACKEND
        .with(|b| b.get())
        .unwrap_or_else(Backend::detect)
}

/// A `[rows, cols]` weight matrix in a GGML block format, multiplied by f32 activations.
#[derive(Clone)]
pub struct QuantMatrix {
    tensor: Arc<QTensor>,
    format: Format,
    rows: usize,
    cols: usize,
    backend: Backend,
}

impl fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("backend", &self.backend)
            .finish()
    }
}

impl QuantMatrix {
    /// Wraps a 2-d CPU tensor of a supported format; `None` for anything else (other formats,
    /// other devices, a width that is not a whole number of blocks).
    pub fn new(tensor: Arc<QTensor>) -> Option<Self> {
        let format = Format::from_ggml(tensor.dtype())?;
        let &[rows, cols] = tensor.shape().dims() else {
            return None;
        };
        if !matches!(tensor.device(), Device::Cpu) || cols % BLOCK != 0 {
            return None;
        }
        let m = Self {
            tensor,
            format,
            rows,
            cols,
            backend: Backend::detect(),
        };
        (m.weights().len() == rows * (cols / BLOCK) * format.block_bytes()).then_some(m)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn tensor(&self) -> &Arc<QTensor> {
        &self.tensor
    }

    /// The raw blocks, row after row. CPU storage lends them without a copy (checked in `new`).
    fn weights(&self) -> &[u8] {
        match self.tensor.data() {
            Ok(std::borrow::Cow::Borrowed(b)) => b,
            _ => &[],
        }
    }

    /// `out[i][r] = sum_k x[i][k] * w[r][k]` for `x: [m, cols]`, `out: [m, rows]` (row-major).
    ///
    /// Runs on rayon's global pool; results are the same for any thread count.
    ///
    /// # Panics
    /// If `x.len()` is not a multiple of `cols` or `out` is not `[m, rows]`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        let backend = FORCED_BACKEND.with(|b| b.get()).unwrap_or(self.backend);
        self.matmul_with(backend, x, out);
    }

    /// [`matmul`](Self::matmul) on a chosen backend (tests and benchmarks). An unsupported
    /// backend falls back to [`Backend::Scalar`].
    pub fn matmul_with(&self, backend: Backend, x: &[f32], out: &mut [f32]) {
        let backend = if backend.supported() {
            backend
        } else {
            Backend::Scalar
        };
        assert!(
            x.len().is_multiple_of(self.cols),
            "input of {} values is not [m, {}]",
            x.len(),
            self.cols
        );
        let m = x.len() / self.cols;
        assert_eq!(
            out.len(),
            m * self.rows,
            "output is not [{m}, {}]",
            self.rows
        );
        if m == 0 || self.rows == 0 {
            return;
        }
        let weights = self.weights();
        assert_eq!(
            weights.len(),
            self.rows * (self.cols / BLOCK) * self.format.block_bytes(),
            "weight storage is not the CPU block layout"
        );
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut acts) => self.run(backend, weights, &mut acts, x, m, out),
            // Re-entered from a job this thread ran while waiting inside another call.
            Err(_) => self.run(backend, weights, &mut Activations::default(), x, m, out),
        });
    }

    fn run(
        &self,
        backend: Backend,
        weights: &[u8],
        acts: &mut Activations,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        let nb = self.cols / BLOCK;
        acts.quantize(x, m, nb, self.format.act_sums(), backend);
        let job = Job {
            format: self.format,
            backend,
            weights,
            row_bytes: nb * self.format.block_bytes(),
            nb,
            acts,
            m,
            rows: self.rows,
            out: OutPtr(out.as_mut_ptr()),
        };
        let threads = if self.rows * nb * m < PARALLEL_MIN_BLOCKS {
            1
        } else {
            rayon::current_num_threads().clamp(1, self.rows.div_ceil(ACT_ROWS))
        };
        if threads == 1 {
            job.rows(0, self.rows);
        } else {
            // Chunk boundaries on multiples of 4 rows, so every backend's full tiles line up.
            let quads = self.rows.div_ceil(4);
            let bound = |i: usize| (i * quads / threads * 4).min(self.rows);
            let f = |i: usize| job.rows(bound(i), bound(i + 1));
            // Inside the pool `join` is cheap; from outside, the crew avoids its wake-ups.
            let done = rayon::current_thread_index().is_none() && crew::run(threads, threads, &f);
            if !done {
                split(0, threads, &f);
            }
        }
    }
}

thread_local! {
    /// Quantized activations of the current call, reused so decode does not allocate.
    static SCRATCH: RefCell<Activations> = RefCell::new(Activations::default());
}

/// Lets the matmul helper threads go back to sleep now: for an engine about to wait for work,
/// so its helpers do not poll a core away from other processes meanwhile.
pub fn release_helpers() {
    crew::release();
}

/// Runs `f(i)` for every `i in 0..n`, each once, on the engine's threads: the polling crew
/// when the caller is outside rayon's pool (the engine thread; the same helpers the matmuls
/// keep spinning, so no wake-up and no helper left spinning beside a rayon job), rayon's
/// `join` otherwise. For work whose results do not depend on which thread runs which `i`.
pub fn for_each_index(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let threads = rayon::current_num_threads().clamp(1, n.max(1));
    if threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    let done = rayon::current_thread_index().is_none() && crew::run(n, threads, f);
    if !done {
        split(0, n, f);
    }
}

/// Runs `f(i)` for `i in lo..hi` on rayon's pool (binary splitting with `join`, no allocation).
fn split(lo: usize, hi: usize, f: &(dyn Fn(usize) + Sync)) {
    if hi - lo == 1 {
        f(lo);
    } else {
        let mid = lo + (hi - lo) / 2;
        rayon::join(|| split(lo, mid, f), || split(mid, hi, f));
    }
}

/// The output of one call; threads write disjoint column ranges of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: `Job::rows` is only called on disjoint row ranges, so no two threads write the same
// element, and the buffer outlives the `split` that uses it.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Everything a thread needs to compute a range of output rows.
struct Job<'a> {
    format: Format,
    backend: Backend,
    weights: &'a [u8],
    row_bytes: usize,
    nb: usize,
    acts: &'a Activations,
    m: usize,
    rows: usize,
    out: OutPtr,
}

/// One kernel call: `R` consecutive weight rows (`R` is the kernel's) times `C` activation rows.
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    /// The tile's weight rows, `row_bytes` each.
    pub w: &'a [u8],
    pub row_bytes: usize,
    pub nb: usize,
    /// The tile's activation rows: values `[c * nb + b]`, scales `d`, sums `s` (Q8_1 only).
    pub qs: &'a [[i8; BLOCK]],
    pub d: &'a [f32],
    pub s: &'a [f32],
    /// `out[c * out_stride + r]` receives the dot of activation row `c` with weight row `r`.
    pub out: *mut f32,
    pub out_stride: usize,
    /// Prefetch distance in bytes (whole rows), see [`PREFETCH_BYTES`].
    pub ahead: usize,
}

impl Tile<'_> {
    /// # Safety
    /// `out` must be valid for writes at `c * out_stride + r` and not written concurrently.
    #[inline(always)]
    pub unsafe fn store(&self, c: usize, r: usize, v: f32) {
        // SAFETY: per the caller's contract.
        unsafe { *self.out.add(c * self.out_stride + r) = v };
    }
}

/// A backend's kernels for one format.
pub(crate) trait Kernel {
    /// Weight rows per call of [`Kernel::full`].
    const ROWS: usize;
    /// `ROWS` weight rows x `C` activation rows.
    ///
    /// # Safety
    /// The backend's CPU features are present; `t` holds `ROWS` weight rows and `C` activation
    /// rows, and its output cells are writable (see [`Tile::store`]).
    unsafe fn full<const C: usize>(t: &Tile);
    /// One weight row x `C` activation rows; same contract with one row.
    unsafe fn one<const C: usize>(t: &Tile);
}

impl Job<'_> {
    /// Computes output columns `r0..r1` for all activation rows.
    fn rows(&self, r0: usize, r1: usize) {
        if r0 >= r1 {
            return;
        }
        macro_rules! go {
            ($k:ty) => {
                self.drive::<$k>(r0, r1)
            };
        }
        use Backend as B;
        use Format as F;
        match (self.backend, self.format) {
            (B::Scalar, F::Q4_0) => go!(scalar::Q4_0),
            (B::Scalar, F::Q4_1) => go!(scalar::Q4_1),
            (B::Scalar, F::Q8_0) => go!(scalar::Q8_0),
            #[cfg(target_arch = "x86_64")]
            (B::Avx2, F::Q4_0) => go!(avx2::Q4_0),
            #[cfg(target_arch = "x86_64")]
            (B::Avx2, F::Q4_1) => go!(avx2::Q4_1),
            #[cfg(target_arch = "x86_64")]
            (B::Avx2, F::Q8_0) => go!(avx2::Q8_0),
            #[cfg(target_arch = "x86_64")]
            (B::Avx512, F::Q4_0) => go!(avx512::Q4_0),
            #[cfg(target_arch = "x86_64")]
            (B::Avx512, F::Q4_1) => go!(avx512::Q4_1),
            #[cfg(target_arch = "x86_64")]
            (B::Avx512, F::Q8_0) => go!(avx512::Q8_0),
            #[cfg(not(target_arch = "x86_64"))]
            (_, F::Q4_0) => go!(scalar::Q4_0),
            #[cfg(not(target_arch = "x86_64"))]
            (_, F::Q4_1) => go!(scalar::Q4_1),
            #[cfg(not(target_arch = "x86_64"))]
            (_, F::Q8_0) => go!(scalar::Q8_0),
        }
    }

    /// Tiles `r0..r1`: weight rows in L1-sized tiles, activation rows [`ACT_ROWS`] at a time
    /// inside each tile, then `K::ROWS` weight rows per kernel call.
    fn drive<K: Kernel>(&self, r0: usize, r1: usize) {
        let tile_rows = (TILE_BYTES / self.row_bytes.max(1))
            .max(1)
            .next_multiple_of(K::ROWS);
        let nb = self.nb;
        // The same column of a row this far below: a few kernel calls ahead at decode.
        let ahead = PREFETCH_BYTES
            .div_ceil(self.row_bytes)
            .next_multiple_of(K::ROWS)
            .max(2 * K::ROWS)
            * self.row_bytes;
        let mut t0 = r0;
        while t0 < r1 {
            let t1 = (t0 + tile_rows).min(r1);
            let mut c0 = 0;
            while c0 < self.m {
                let cc = (self.m - c0).min(ACT_ROWS);
                let mut r = t0;
                while r < t1 {
                    let n = if t1 - r >= K::ROWS { K::ROWS } else { 1 };
                    let tile = Tile {
                        w: &self.weights[r * self.row_bytes..(r + n) * self.row_bytes],
                        row_bytes: self.row_bytes,
                        nb,
                        qs: &self.acts.qs[c0 * nb..(c0 + cc) * nb],
                        d: &self.acts.d[c0 * nb..(c0 + cc) * nb],
                        s: if self.acts.s.is_empty() {
                            &[]
                        } else {
                            &self.acts.s[c0 * nb..(c0 + cc) * nb]
                        },
                        // SAFETY: `c0 * rows + r` is inside the `[m, rows]` output.
                        out: unsafe { self.out.0.add(c0 * self.rows + r) },
                        out_stride: self.rows,
                        ahead,
                    };
                    // SAFETY: the backend was checked by `matmul_with`; the tile holds `n` weight
                    // rows and `cc` activation rows; this thread alone writes columns `r0..r1`.
                    unsafe {
                        match (n == K::ROWS && n > 1, cc) {
                            (true, 1) => K::full::<1>(&tile),
                            (true, 2) => K::full::<2>(&tile),
                            (true, 3) => K::full::<3>(&tile),
                            (true, _) => K::full::<4>(&tile),
                            (false, 1) => K::one::<1>(&tile),
                            (false, 2) => K::one::<2>(&tile),
                            (false, 3) => K::one::<3>(&tile),
                            (false, _) => K::one::<4>(&tile),
                        }
                    }
                    r += n;
                }
                c0 += cc;
            }
            t0 = t1;
        }
    }
}

/// f16 bits at `p` (unaligned little-endian) as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[cfg(test)]
mod tests;
