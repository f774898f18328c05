//! Pseudo-gradient codecs: what a worker sends at the end of a round, and exactly how many bytes
//! it is.
//!
//! Every payload starts with a 5-byte header (codec tag, value count as u32 LE) so a decoder
//! refuses a payload of the wrong codec or length before reading it. Bodies:
//!
//! - `f32`: the values, 4 bytes each. Exact.
//! - `f16`: 2 bytes each, round to nearest. |error| <= 2^-11 |x| for |x| in the normal f16
//!   range, <= 2^-25 below it; values beyond +-65504 saturate there.
//! - `int8` (block B, default 256): per block an f32 scale `max|x| / 127`, then one signed byte
//!   per value. |error| <= scale / 2 (+ f32 rounding).
//! - `int8ans` (block B, default 256): the same values and scales, the bytes coded with their
//!   own frequencies ([`crate::ans`], order-0 rANS: 11-13% fewer bytes on DiLoCo
//!   pseudo-gradients), after a mode byte (1; 0 stores them raw when coding would not be
//!   smaller). The same error as `int8`; the size depends on the values.
//! - `sparse` (chunk C, k per chunk, b bits, defaults 4096 / 64 / 2, i.e. 1.56% as in
//!   SparseLoCo and Covenant-72B): per chunk the k values of largest magnitude, their
//!   magnitudes quantized to 2^(b-1) levels between the chunk's smallest and largest selected
//!   magnitude (`lo`, `hi`, f32 each), one sign bit. Entries are bit-packed: `ceil(log2 C)` bits
//!   of index within the chunk, 1 sign bit, b-1 level bits. A dropped value's error is |x| <= lo;
//!   a kept one's is <= (hi - lo) / (2 (L - 1)) with L = 2^(b-1) levels (for b = 1,
//!   (hi - lo) / 2). [`ErrorFeedback`] carries what was not sent into the next round.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A pseudo-gradient encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    F32,
    F16,
    Int8 {
        block: u32,
    },
    Sparse {
        chunk: u32,
        k: u32,
        bits: u8,
    },
    /// `int8` with its bytes entropy-coded (appended last: the other variants keep their
    /// encoding).
    Int8Ans {
        block: u32,
    },
}

const HEADER: usize = 5;
/// Symbols of the `int8ans` alphabet: the values -127..=127, shifted by 127.
const INT8_SYMBOLS: usize = 255;

/// Why a codec name or its parameters are not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseCodecError {
    #[error(
        "unknown codec {0:?} (codecs: f32, f16, int8, int8/BLOCK, int8ans, int8ans/BLOCK, sparse, sparse/KofCHUNK/BITSbit)"
    )]
    Unknown(String),
    #[error("codec parameters out of range: {0}")]
    Range(String),
}

/// Why a vector could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("value {index} is not finite")]
    NonFinite { index: usize },
    #[error("{0} values do not fit a u32 count")]
    TooLong(usize),
    #[error("the codec could not decode its own payload")]
    SelfCheck,
    #[error(transparent)]
    BadCodec(#[from] ParseCodecError),
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("payload is {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("payload is for codec tag {got}, the run uses tag {expected}")]
    WrongCodec { got: u8, expected: u8 },
    #[error("payload holds {got} values, the model has {expected}")]
    WrongCount { got: usize, expected: usize },
    #[error("payload holds a non-finite number")]
    NonFinite,
    #[error("sparse chunk {chunk}: {reason}")]
    Sparse { chunk: usize, reason: &'static str },
    #[error("int8ans: {0}")]
    Entropy(String),
    #[error(transparent)]
    BadCodec(#[from] ParseCodecError),
}

impl Codec {
    pub const INT8_BLOCK: u32 = 256;
    pub const SPARSE_CHUNK: u32 = 4096;
    pub const SPARSE_K: u32 = 64;
    pub const SPARSE_BITS: u8 = 2;

    fn tag(&self) -> u8 {
        match self {
            Codec::F32 => 1,
            Codec::F16 => 2,
            Codec::Int8 { .. } => 3,
            Codec::Sparse { .. } => 4,
            Codec::Int8Ans { .. } => 5,
        }
    }

    /// Checks parameter ranges (a spec from a peer is a claim).
    pub fn validate(&self) -> Result<(), ParseCodecError> {
        match *self {
            Codec::F32 | Codec::F16 => Ok(()),
            Codec::Int8 { block } | Codec::Int8Ans { block } if (1..=1 << 20).contains(&block) => {
                Ok(())
            }
            Codec::Int8 { block } | Codec::Int8Ans { block } => Err(ParseCodecError::Range(
                format!("{self} block {block} (1..=1048576)"),
            )),
            Codec::Sparse { chunk, k, bits }
                if (2..=1 << 24).contains(&chunk)
                    && (1..=chunk).contains(&k)
                    && (1..=8).contains(&bits) =>
            {
                Ok(())
            }
            Codec::Sparse { chunk, k, bits } => Err(ParseCodecError::Range(format!(
                "sparse chunk {chunk} (2..=16777216), k {k} (1..=chunk), bits {bits} (1..=8)"
            ))),
        }
    }

    /// Whether the codec loses information (and so benefits from error feedback).
    pub fn is_lossy(&self) -> bool {
        !matches!(self, Codec::F32)
    }

    /// The exact payload size for `n` values (of a codec that passes [`Self::validate`]); for
    /// `int8ans`, whose size depends on the values, the largest (the raw mode's).
    pub fn encoded_len(&self, n: usize) -> usize {
        HEADER
            + match *self {
                Codec::F32 => 4 * n,
                Codec::F16 => 2 * n,
                Codec::Int8 { block } => n + 4 * n.div_ceil(block as usize),
                Codec::Int8Ans { block } => 1 + n + 4 * n.div_ceil(block as usize),
                Codec::Sparse { chunk, k, bits } => {
                    let chunks = n.div_ceil(chunk as usize);
                    let entries = sparse_entries(n, chunk as usize, k as usize);
                    8 * chunks + (entries * entry_bits(chunk, bits)).div_ceil(8)
                }
            }
    }

    /// Encodes `x`.
    pub fn encode(&self, x: &[f32]) -> Result<Vec<u8>, EncodeError> {
        self.validate()?;
        if let Some(index) = x.iter().position(|v| !v.is_finite()) {
            return Err(EncodeError::NonFinite { index });
        }
        let n = u32::try_from(x.len()).map_err(|_| EncodeError::TooLong(x.len()))?;
        let mut out = Vec::with_capacity(self.encoded_len(x.len()));
        out.push(self.tag());
        out.extend_from_slice(&n.to_le_bytes());
        match *self {
            Codec::F32 => x
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Codec::F16 => x.iter().for_each(|&v| {
                let h = half::f16::from_f32(v.clamp(-65504.0, 65504.0));
                out.extend_from_slice(&h.to_bits().to_le_bytes());
            }),
            Codec::Int8 { block } => {
                let values = int8_quantize(x, block as usize, &mut out);
                out.extend(values.iter().map(|&q| q as u8));
            }
            Codec::Int8Ans { block } => {
                let values = int8_quantize(x, block as usize, &mut out);
                let symbols: Vec<u8> = values.iter().map(|&q| (i16::from(q) + 127) as u8).collect();
                let mut coded = Vec::new();
                crate::ans::encode(&symbols, INT8_SYMBOLS, &mut coded);
                if coded.len() < values.len() {
                    out.push(1);
                    out.extend_from_slice(&coded);
                } else {
                    out.push(0);
                    out.extend(values.iter().map(|&q| q as u8));
                }
            }
            Codec::Sparse { chunk, k, bits } => encode_sparse(x, chunk, k, bits, &mut out),
        }
        debug_assert!(match self {
            Codec::Int8Ans { .. } => out.len() <= self.encoded_len(x.len()),
            _ => out.len() == self.encoded_len(x.len()),
        });
        Ok(out)
    }

    /// Decodes a payload that must hold exactly `n` values of this codec.
    pub fn decode(&self, bytes: &[u8], n: usize) -> Result<Vec<f32>, DecodeError> {
        self.validate()?;
        let expected = self.encoded_len(n);
        if bytes.len() < HEADER {
            return Err(DecodeError::Length {
                got: bytes.len(),
                expected,
            });
        }
        if bytes[0] != self.tag() {
            return Err(DecodeError::WrongCodec {
                got: bytes[0],
                expected: self.tag(),
            });
        }
        let count = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if count != n {
            return Err(DecodeError::WrongCount {
                got: count,
                expected: n,
            });
        }
        let fits = match self {
            // Scales and the mode byte at least, the raw mode's size at most.
            Codec::Int8Ans { block } => {
                (HEADER + 4 * n.div_ceil(*block as usize) + 1..=expected).contains(&bytes.len())
            }
            _ => bytes.len() == expected,
        };
        if !fits {
            return Err(DecodeError::Length {
                got: bytes.len(),
                expected,
            });
        }
        let body = &bytes[HEADER..];
        let out: Vec<f32> = match *self {
            Codec::F32 => body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Codec::F16 => body
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Codec::Int8 { block } => {
                let (scales, values) = int8_scales(body, n, block as usize)?;
                int8_values(&scales, values.iter().map(|&q| q as i8), block as usize)
            }
            Codec::Int8Ans { block } => {
                let (scales, rest) = int8_scales(body, n, block as usize)?;
                let (mode, values) = rest.split_first().ok_or(DecodeError::Length {
                    got: bytes.len(),
                    expected,
                })?;
                let values: Vec<i8> = match mode {
                    0 if values.len() == n => values.iter().map(|&q| q as i8).collect(),
                    0 => {
                        return Err(DecodeError::Length {
                            got: bytes.len(),
                            expected,
                        })
                    }
                    1 => crate::ans::decode(values, INT8_SYMBOLS, n)
                        .map_err(|e| DecodeError::Entropy(e.to_string()))?
                        .into_iter()
                        .map(|s| (i16::from(s) - 127) as i8)
                        .collect(),
                    m => return Err(DecodeError::Entropy(format!("unknown mode {m}"))),
                };
                int8_values(&scales, values.into_iter(), block as usize)
            }
            Codec::Sparse { chunk, k, bits } => decode_sparse(body, n, chunk, k, bits)?,
        };
        if out.iter().any(|v| !v.is_finite()) {
            return Err(DecodeError::NonFinite);
        }
        Ok(out)
    }
}

impl FromStr for Codec {
    type Err = ParseCodecError;

    /// `f32`, `f16`, `int8` or `sparse` with default parameters, or with parameters in the
    /// form [`fmt::Display`] writes: `int8/BLOCK`, `sparse/KofCHUNK/BITSbit` (checked by
    /// [`Self::validate`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || ParseCodecError::Unknown(s.into());
        let number = |t: &str| t.parse::<u32>().map_err(|_| unknown());
        let codec = match s.split_once('/') {
            None => match s {
                "f32" => Codec::F32,
                "f16" => Codec::F16,
                "int8" => Codec::Int8 {
                    block: Self::INT8_BLOCK,
                },
                "int8ans" => Codec::Int8Ans {
                    block: Self::INT8_BLOCK,
                },
                "sparse" => Codec::Sparse {
                    chunk: Self::SPARSE_CHUNK,
                    k: Self::SPARSE_K,
                    bits: Self::SPARSE_BITS,
                },
                _ => return Err(unknown()),
            },
            Some(("int8", block)) => Codec::Int8 {
                block: number(block)?,
            },
            Some(("int8ans", block)) => Codec::Int8Ans {
                block: number(block)?,
            },
            Some(("sparse", rest)) => {
                let (k, rest) = rest.split_once("of").ok_or_else(unknown)?;
                let (chunk, bits) = rest.split_once('/').ok_or_else(unknown)?;
                let bits = bits.strip_suffix("bit").ok_or_else(unknown)?;
                Codec::Sparse {
                    chunk: number(chunk)?,
                    k: number(k)?,
                    bits: u8::try_from(number(bits)?).map_err(|_| unknown())?,
                }
            }
            Some(_) => return Err(unknown()),
        };
        codec.validate()?;
        Ok(codec)
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Codec::F32 => f.write_str("f32"),
            Codec::F16 => f.write_str("f16"),
            Codec::Int8 { block } => write!(f, "int8/{block}"),
            Codec::Int8Ans { block } => write!(f, "int8ans/{block}"),
            Codec::Sparse { chunk, k, bits } => write!(f, "sparse/{k}of{chunk}/{bits}bit"),
        }
    }
}

/// Writes the per-block scales of `x` to `out` and returns its values quantized to -127..=127.
fn int8_quantize(x: &[f32], block: usize, out: &mut Vec<u8>) -> Vec<i8> {
    let mut values = Vec::with_capacity(x.len());
    for b in x.chunks(block) {
        let s = b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        out.extend_from_slice(&s.to_le_bytes());
        values.extend(b.iter().map(|&v| {
            if s > 0.0 {
                (v / s).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        }));
    }
    values
}

/// The per-block scales at the start of an int8 body of `n` values, and the rest of the body.
fn int8_scales(body: &[u8], n: usize, block: usize) -> Result<(Vec<f32>, &[u8]), DecodeError> {
    let (scales, rest) = body.split_at((4 * n.div_ceil(block)).min(body.len()));
    let scales: Vec<f32> = scales
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
        return Err(DecodeError::NonFinite);
    }
    Ok((scales, rest))
}

fn int8_values(scales: &[f32], values: impl Iterator<Item = i8>, block: usize) -> Vec<f32> {
    values
        .enumerate()
        .map(|(i, q)| f32::from(q) * scales[i / block])
        .collect()
}

fn index_bits(chunk: u32) -> usize {
    (u32::BITS - (chunk - 1).leading_zeros()).max(1) as usize
}

fn entry_bits(chunk: u32, bits: u8) -> usize {
    index_bits(chunk) + bits as usize
}

fn sparse_entries(n: usize, chunk: usize, k: usize) -> usize {
    (0..n.div_ceil(chunk))
        .map(|c| k.min(n - c * chunk).min(chunk))
        .sum()
}

struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter<'_> {
    fn put(&mut self, value: u64, bits: usize) {
        self.acc |= value << self.n;
        self.n += bits as u32;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn finish(self) {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
}

impl BitReader<'_> {
    fn get(&mut self, bits: usize) -> Option<u64> {
        while (self.n as usize) < bits {
            let b = *self.bytes.get(self.pos)?;
            self.acc |= u64::from(b) << self.n;
            self.pos += 1;
            self.n += 8;
        }
        let v = self.acc & ((1u64 << bits) - 1);
        self.acc >>= bits;
        self.n -= bits as u32;
        Some(v)
    }
}

fn levels(bits: u8) -> u32 {
    1u32 << (bits - 1)
}

/// The magnitude that level `j` of `levels` decodes to between `lo` and `hi`.
fn level_value(j: u32, levels: u32, lo: f32, hi: f32) -> f32 {
    if levels == 1 {
        0.5 * (lo + hi)
    } else {
        lo + (hi - lo) * j as f32 / (levels - 1) as f32
    }
}

fn encode_sparse(x: &[f32], chunk: u32, k: u32, bits: u8, out: &mut Vec<u8>) {
    let l = levels(bits);
    let ib = index_bits(chunk);
    // The picks of every chunk back to back (at most k each), sorted within a chunk; one
    // scratch order reused across chunks (a model's worth of indices would be 8 bytes a
    // parameter).
    let per = (k as usize).min(chunk as usize);
    let mut picks: Vec<usize> = Vec::with_capacity(x.len().div_ceil(chunk as usize) * per);
    let mut order: Vec<usize> = Vec::with_capacity(chunk as usize);
    let mut bounds = Vec::with_capacity(x.len().div_ceil(chunk as usize) + 1);
    bounds.push(0);
    for c in x.chunks(chunk as usize) {
        order.clear();
        order.extend(0..c.len());
        // Largest magnitude first, lower index on ties: a total, deterministic order.
        order.sort_unstable_by(|&a, &b| c[b].abs().total_cmp(&c[a].abs()).then(a.cmp(&b)));
        order.truncate((k as usize).min(c.len()));
        order.sort_unstable();
        let (lo, hi) = order.iter().fold((f32::INFINITY, 0f32), |(lo, hi), &i| {
            (lo.min(c[i].abs()), hi.max(c[i].abs()))
        });
        out.extend_from_slice(&lo.to_le_bytes());
        out.extend_from_slice(&hi.to_le_bytes());
        picks.extend_from_slice(&order);
        bounds.push(picks.len());
    }
    let mut w = BitWriter { out, acc: 0, n: 0 };
    for (i, c) in x.chunks(chunk as usize).enumerate() {
        let idx = &picks[bounds[i]..bounds[i + 1]];
        let (lo, hi) = idx.iter().fold((f32::INFINITY, 0f32), |(lo, hi), &i| {
            (lo.min(c[i].abs()), hi.max(c[i].abs()))
        });
        for &i in idx {
            let v = c[i];
            let j = if l == 1 || hi <= lo {
                0
            } else {
                (((v.abs() - lo) / (hi - lo)) * (l - 1) as f32)
                    .round()
                    .clamp(0.0, (l - 1) as f32) as u64
            };
            w.put(i as u64, ib);
            w.put(u64::from(v.is_sign_negative()), 1);
            if bits > 1 {
                w.put(j, bits as usize - 1);
            }
        }
    }
    w.finish();
}

fn decode_sparse(
    body: &[u8],
    n: usize,
    chunk: u32,
    k: u32,
    bits: u8,
) -> Result<Vec<f32>, DecodeError> {
    let chunks = n.div_ceil(chunk as usize);
    let (scales, packed) = body.split_at(8 * chunks);
    let mut r = BitReader {
        bytes: packed,
        pos: 0,
        acc: 0,
        n: 0,
    };
    let l = levels(bits);
    let ib = index_bits(chunk);
    let mut out = vec![0f32; n];
    for c in 0..chunks {
        let err = |reason| DecodeError::Sparse { chunk: c, reason };
        let s = &scales[8 * c..8 * c + 8];
        let lo = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        let hi = f32::from_le_bytes([s[4], s[5], s[6], s[7]]);
        if !(lo.is_finite() && hi.is_finite() && lo >= 0.0 && lo <= hi) {
            return Err(err("scales not finite or out of order"));
        }
        let start = c * chunk as usize;
        let len = (chunk as usize).min(n - start);
        let mut prev: Option<u64> = None;
        for _ in 0..(k as usize).min(len) {
            let i = r.get(ib).ok_or(err("truncated"))?;
            let neg = r.get(1).ok_or(err("truncated"))? == 1;
            let j = if bits > 1 {
                r.get(bits as usize - 1).ok_or(err("truncated"))? as u32
            } else {
                0
            };
            if i as usize >= len || prev.is_some_and(|p| p >= i) {
                return Err(err("indices out of range or not increasing"));
            }
            prev = Some(i);
            let m = level_value(j, l, lo, hi);
            out[start + i as usize] = if neg { -m } else { m };
        }
    }
    Ok(out)
}

/// Error feedback: what a lossy codec did not send is added to the next round's input, so over
/// rounds the sum of what was sent plus the residual equals the sum of the inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorFeedback {
    pub residual: Vec<f32>,
}

impl ErrorFeedback {
    pub fn new(n: usize) -> Self {
        Self {
            residual: vec![0.0; n],
        }
    }

    /// Encodes `residual + delta` and keeps what the payload does not carry; returns the
    /// payload and what the receivers will decode from it.
    pub fn compress(
        &mut self,
        codec: &Codec,
        delta: &[f32],
    ) -> Result<(Vec<u8>, Vec<f32>), EncodeError> {
        // In place: the residual becomes the accumulated sum, then what was not sent (no
        // copies of a model-sized vector beyond what the receivers decode).
        if let Some(index) = delta.iter().position(|d| !d.is_finite()) {
            return Err(EncodeError::NonFinite { index });
        }
        let acc = &mut self.residual;
        acc.iter_mut().zip(delta).for_each(|(r, d)| *r += d);
        let encoded = codec.encode(acc).and_then(|bytes| {
            let sent = codec
                .decode(&bytes, acc.len())
                .map_err(|_| EncodeError::SelfCheck)?;
            Ok((bytes, sent))
        });
        match encoded {
            Ok((bytes, sent)) => {
                acc.iter_mut().zip(&sent).for_each(|(a, s)| *a -= s);
                Ok((bytes, sent))
            }
            Err(e) => {
                // Refused: the residual goes back to what it was (up to rounding; a sum that
                // overflowed stays infinite, and every later round is refused as well).
                acc.iter_mut().zip(delta).for_each(|(r, d)| *r -= d);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codecs() -> Vec<Codec> {
        vec![
            Codec::F32,
            Codec::F16,
            Codec::Int8 { block: 7 },
            Codec::Int8 { block: 256 },
            Codec::Int8Ans { block: 7 },
            Codec::Int8Ans { block: 256 },
            Codec::Sparse {
                chunk: 16,
                k: 3,
                bits: 2,
            },
            Codec::Sparse {
                chunk: 64,
                k: 64,
                bits: 4,
            },
            Codec::Sparse {
                chunk: 4096,
                k: 64,
                bits: 2,
            },
            Codec::Sparse {
                chunk: 5,
                k: 2,
                bits: 1,
            },
        ]
    }

    fn values() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![-1e3f32..1e3, -1e-3f32..1e-3, Just(0.0f32),],
            0..600,
        )
    }

    /// The per-element error bound of the module docs.
    fn within_bound(codec: &Codec, x: &[f32], y: &[f32]) -> Result<(), String> {
        match *codec {
            Codec::F32 => (x == y).then_some(()).ok_or("f32 not exact".into()),
            Codec::F16 => x.iter().zip(y).try_for_each(|(a, b)| {
                let bound = (a.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
                ((a - b).abs() <= bound)
                    .then_some(())
                    .ok_or(format!("f16 {a} -> {b}"))
            }),
            Codec::Int8 { block } | Codec::Int8Ans { block } => x
                .chunks(block as usize)
                .zip(y.chunks(block as usize))
                .try_for_each(|(xs, ys)| {
                    let scale = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                    xs.iter().zip(ys).try_for_each(|(a, b)| {
                        ((a - b).abs() <= scale * 0.5 * (1.0 + 1e-4) + f32::MIN_POSITIVE)
                            .then_some(())
                            .ok_or(format!("int8 {a} -> {b} scale {scale}"))
                    })
                }),
            Codec::Sparse { chunk, k, bits } => x
                .chunks(chunk as usize)
                .zip(y.chunks(chunk as usize))
                .try_for_each(|(xs, ys)| {
                    let mut mags: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
                    mags.sort_by(|a, b| b.total_cmp(a));
                    let kept = (k as usize).min(xs.len());
                    let (hi, lo) = (mags[0], mags[kept - 1]);
                    let l = levels(bits);
                    let q = if l == 1 {
                        (hi - lo) / 2.0
                    } else {
                        (hi - lo) / (2 * (l - 1)) as f32
                    };
                    let bound = lo.max(q) * (1.0 + 1e-5) + 1e-30;
                    let nonzero = ys.iter().filter(|v| **v != 0.0).count();
                    if nonzero > kept {
                        return Err(format!("{nonzero} values sent, k is {kept}"));
                    }
                    xs.iter().zip(ys).try_for_each(|(a, b)| {
                        ((a - b).abs() <= bound)
                            .then_some(())
                            .ok_or(format!("sparse {a} -> {b} bound {bound}"))
                    })
                }),
        }
    }

    proptest! {
        #[test]
        fn round_trip_within_the_stated_bound(x in values()) {
            for codec in codecs() {
                let bytes = codec.encode(&x).unwrap();
                if let Codec::Int8Ans { .. } = codec {
                    prop_assert!(bytes.len() <= codec.encoded_len(x.len()), "{}", codec);
                } else {
                    prop_assert_eq!(bytes.len(), codec.encoded_len(x.len()), "{}", codec);
                }
                let y = codec.decode(&bytes, x.len()).unwrap();
                prop_assert_eq!(y.len(), x.len());
                if let Err(e) = within_bound(&codec, &x, &y) {
                    prop_assert!(false, "{}: {}", codec, e);
                }
            }
        }

        #[test]
        fn sent_plus_residual_equals_the_sum_of_inputs(
            rounds in prop::collection::vec(prop::collection::vec(-10f32..10.0, 40), 1..8)
        ) {
            for codec in codecs() {
                let mut ef = ErrorFeedback::new(40);
                let mut sent_sum = vec![0f64; 40];
                let mut in_sum = vec![0f64; 40];
                for r in &rounds {
                    let (_, sent) = ef.compress(&codec, r).unwrap();
                    for i in 0..40 {
                        sent_sum[i] += f64::from(sent[i]);
                        in_sum[i] += f64::from(r[i]);
                    }
                }
                for i in 0..40 {
                    let total = sent_sum[i] + f64::from(ef.residual[i]);
                    // Only f32 rounding of the running sums separates the two.
                    let tol = 1e-5 * (1.0 + rounds.len() as f64 * 10.0);
                    prop_assert!((total - in_sum[i]).abs() <= tol, "{}: {} vs {}", codec, total, in_sum[i]);
                }
            }
        }

        #[test]
        fn garbage_is_refused_or_decodes_to_finite_values(bytes in prop::collection::vec(any::<u8>(), 0..200), n in 0usize..40) {
            for codec in codecs() {
                if let Ok(v) = codec.decode(&bytes, n) {
                    prop_assert_eq!(v.len(), n);
                    prop_assert!(v.iter().all(|x| x.is_finite()));
                }
            }
        }
    }

    fn any_codec() -> impl Strategy<Value = Codec> {
        prop_oneof![
            Just(Codec::F32),
            Just(Codec::F16),
            (1u32..=1 << 20).prop_map(|block| Codec::Int8 { block }),
            (1u32..=1 << 20).prop_map(|block| Codec::Int8Ans { block }),
            (2u32..=1 << 24, 1u8..=8)
                .prop_flat_map(|(chunk, bits)| (Just(chunk), 1..=chunk, Just(bits)))
                .prop_map(|(chunk, k, bits)| Codec::Sparse { chunk, k, bits }),
        ]
    }

    proptest! {
        #[test]
        fn a_codec_parses_back_from_its_name(c in any_codec()) {
            prop_assert_eq!(c.to_string().parse::<Codec>(), Ok(c));
        }
    }

    #[test]
    fn parametrised_names_are_checked() {
        assert_eq!(
            "sparse/128of4096/3bit".parse(),
            Ok(Codec::Sparse {
                chunk: 4096,
                k: 128,
                bits: 3
            })
        );
        assert_eq!("int8/4096".parse(), Ok(Codec::Int8 { block: 4096 }));
        assert_eq!("int8ans".parse(), Ok(Codec::Int8Ans { block: 256 }));
        assert_eq!("int8ans/4096".parse(), Ok(Codec::Int8Ans { block: 4096 }));
        for bad in [
            "int8/0",
            "int8ans/0",
            "sparse/5of4/2bit",
            "sparse/1of4/9bit",
        ] {
            assert!(
                matches!(bad.parse::<Codec>(), Err(ParseCodecError::Range(_))),
                "{bad}"
            );
        }
        for bad in [
            "int8/",
            "int8/x",
            "int8ans/x",
            "sparse/64of4096",
            "sparse/64/4096/2bit",
            "f32/1",
            "sparse/1of4/300bit",
        ] {
            assert!(
                matches!(bad.parse::<Codec>(), Err(ParseCodecError::Unknown(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sizes_are_exact_and_sparse_is_small() {
        let n = 1_000_000;
        assert_eq!(Codec::F32.encoded_len(n), 5 + 4 * n);
        assert_eq!(Codec::F16.encoded_len(n), 5 + 2 * n);
        let int8: Codec = "int8".parse().unwrap();
        assert_eq!(int8.encoded_len(n), 5 + n + 4 * n.div_ceil(256));
        let sparse: Codec = "sparse".parse().unwrap();
        // 245 chunks; 244 full ones carry 64 entries of 12 + 2 bits, the last 64 too.
        assert_eq!(
            sparse.encoded_len(n),
            5 + 8 * 245 + (245 * 64 * 14usize).div_ceil(8)
        );
        let ratio = Codec::F32.encoded_len(n) as f64 / sparse.encoded_len(n) as f64;
        assert!(ratio > 130.0, "{ratio}");
    }

    #[test]
    fn int8ans_codes_the_int8_values_in_fewer_bytes_and_the_same_error() {
        // Values spread like a pseudo-gradient's: most small, a few large per block.
        let x: Vec<f32> = (0..100_000u32)
            .map(|i| {
                let u = ((i.wrapping_mul(2_654_435_761) >> 8) as f32 / (1 << 24) as f32) - 0.5;
                u * u * u * 8.0
            })
            .collect();
        let (raw, ans) = (Codec::Int8 { block: 4096 }, Codec::Int8Ans { block: 4096 });
        let (a, b) = (raw.encode(&x).unwrap(), ans.encode(&x).unwrap());
        assert_eq!(raw.decode(&a, x.len()), ans.decode(&b, x.len()));
        assert!(
            b.len() * 10 < a.len() * 9,
            "{} vs {} bytes",
            b.len(),
            a.len()
        );
        // Deterministic: the same values give the same bytes.
        assert_eq!(ans.encode(&x).unwrap(), b);
        // Values that coding would not shrink are stored raw, one byte more than int8.
        let flat: Vec<f32> = (0..2000).map(|i| (i % 255) as f32 - 127.0).collect();
        let (a, b) = (raw.encode(&flat).unwrap(), ans.encode(&flat).unwrap());
        assert_eq!(b.len(), a.len() + 1);
        assert_eq!(raw.decode(&a, 2000), ans.decode(&b, 2000));
        // A corrupted coded body, an unknown mode, a raw body of the wrong size: refused.
        let mut bad = ans.encode(&x).unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 0x21;
        assert!(ans.decode(&bad, x.len()).is_err());
        let mode_at = 5 + 4 * x.len().div_ceil(4096);
        let mut bad = ans.encode(&x).unwrap();
        bad[mode_at] = 7;
        assert!(matches!(
            ans.decode(&bad, x.len()),
            Err(DecodeError::Entropy(_))
        ));
        let mut bad = ans.encode(&x).unwrap();
        bad[mode_at] = 0;
        assert!(matches!(
            ans.decode(&bad, x.len()),
            Err(DecodeError::Length { .. })
        ));
    }

    #[test]
    fn hostile_payloads_are_refused() {
        let c = Codec::Sparse {
            chunk: 8,
            k: 2,
            bits: 2,
        };
        let good = c
            .encode(&[0.0, 5.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 3.0])
            .unwrap();
        assert!(c.decode(&good, 9).is_ok());
        assert!(matches!(
            c.decode(&good, 10),
            Err(DecodeError::WrongCount { .. })
        ));
        assert!(matches!(
            Codec::F32.decode(&good, 9),
            Err(DecodeError::WrongCodec { .. })
        ));
        assert!(matches!(
            c.decode(&good[..good.len() - 1], 9),
            Err(DecodeError::Length { .. })
        ));
        let mut nan = good.clone();
        nan[5..9].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(c.decode(&nan, 9), Err(DecodeError::Sparse { .. })));
        // Same index twice.
        let mut dup = Vec::from(&good[..5 + 16]);
        let mut w = BitWriter {
            out: &mut dup,
            acc: 0,
            n: 0,
        };
        for _ in 0..2 {
            w.put(1, 3);
            w.put(0, 2);
        }
        w.put(0, 5);
        w.finish();
        dup.truncate(good.len());
        dup.resize(good.len(), 0);
        assert!(matches!(c.decode(&dup, 9), Err(DecodeError::Sparse { .. })));
        assert_eq!(
            Codec::F16.encode(&[1.0, f32::INFINITY]),
            Err(EncodeError::NonFinite { index: 1 })
        );
        assert!("int4".parse::<Codec>().is_err());
        assert!(Codec::Sparse {
            chunk: 4,
            k: 5,
            bits: 2
        }
        .validate()
        .is_err());
    }
}
