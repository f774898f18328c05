//! The stage-call protocol: what a gateway (or any chain driver) sends to a stage node and what
//! comes back, plus activations as a compact tensor (dtype, shape, little-endian bytes).
//!
//! - [`Request::Forward`] feeds new positions of a session through the node's span of layers.
//!   The first stage gets token ids, later stages get the previous stage's [`Activations`]; every
//!   stage gets the token ids too (4 bytes a position) so the last stage can sample with the
//!   whole history. `position` must equal what the node already holds for the session: 0 opens
//!   (or restarts) it, anything else continues it, so a replayed or reordered call is refused
//!   instead of corrupting the KV cache.
//! - `chunks` splits the new positions into consecutive forward passes, so a replacement node
//!   rebuilding a session computes with exactly the chunking of the original run.
//! - Frames are length-prefixed postcard ([`frame_len`], [`encode_frame`]); [`decode_request`]
//!   / [`decode_response`] check sizes and shapes before anything is allocated for compute,
//!   allocate at most about the frame's own size, and never panic on hostile bytes
//!   (`tests/wire_corpus.rs` fuzzes them from the corpus kept in `tests/corpus/wire`).

use crate::receipt::{Receipt, SIGNATURE_BYTES};
use crate::sampling::{
    SamplingParams, TokenLogprobs, MAX_LOGIT_BIAS, MAX_MASK_WORDS, MAX_TOP_LOGPROBS,
};
use crate::Digest;
use half::f16;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The libp2p protocol name of stage calls.
pub const STAGE_PROTOCOL: &str = "/plexus/stage/3";
/// Largest frame a node reads (a 256-position chunk of an 8192-wide model in f32 is 8 MiB).
pub const MAX_FRAME_BYTES: usize = 32 << 20;
/// Most positions in one call.
pub const MAX_POSITIONS: usize = 8192;
/// Widest hidden state accepted.
pub const MAX_HIDDEN: usize = 65536;

/// A session id, chosen at random by the chain driver. Sessions are also keyed by the caller's
/// peer id, so one peer cannot touch another's sessions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Element type of activations on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    /// Symmetric int8 with one f32 scale per row (rows * 4 bytes of scales, then the values).
    I8,
}

impl DType {
    /// Bytes of a `rows x cols` tensor of this type.
    pub fn tensor_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            DType::F32 => rows * cols * 4,
            DType::F16 => rows * cols * 2,
            DType::I8 => rows * 4 + rows * cols,
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "int8" | "i8" => Ok(DType::I8),
            _ => Err(format!("unknown activation type {s:?} (f32, f16 or int8)")),
        }
    }
}

/// A `rows x cols` matrix of activations (one row per position).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Activations {
    pub dtype: DType,
    pub rows: u32,
    pub cols: u32,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for Activations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Activations({:?}, {}x{}, {} bytes)",
            self.dtype,
            self.rows,
            self.cols,
            self.data.len()
        )
    }
}

impl Activations {
    /// Encodes row-major f32 values.
    pub fn encode(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        let mut data = Vec::with_capacity(dtype.tensor_bytes(rows, cols));
        match dtype {
            DType::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
            DType::I8 => {
                // One scale per row even when rows are empty (cols = 0), so the bytes always
                // match the shape.
                let row = |r: usize| values.get(r * cols..(r + 1) * cols).unwrap_or(&[]);
                let scales: Vec<f32> = (0..rows)
                    .map(|r| row(r).iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0)
                    .collect();
                scales
                    .iter()
                    .for_each(|s| data.extend_from_slice(&s.to_le_bytes()));
                for (r, s) in scales.iter().enumerate() {
                    let inv = if *s > 0.0 { 1.0 / s } else { 0.0 };
                    data.extend(
                        row(r)
                            .iter()
                            .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
            }
        }
        Self {
            dtype,
            rows: rows as u32,
            cols: cols as u32,
            data,
        }
    }

    /// Checks that the bytes match the declared shape.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let (rows, cols) = (self.rows as usize, self.cols as usize);
        if rows > MAX_POSITIONS || cols > MAX_HIDDEN {
            return Err(DecodeError::Invalid(format!(
                "activations {rows}x{cols} exceed {MAX_POSITIONS}x{MAX_HIDDEN}"
            )));
        }
        let want = self.dtype.tensor_bytes(rows, cols);
        if self.data.len() != want {
            return Err(DecodeError::Invalid(format!(
                "activations {rows}x{cols} {:?} need {want} bytes, got {}",
                self.dtype,
                self.data.len()
            )));
        }
        Ok(())
    }

    /// Decodes to row-major f32 (call [`Self::validate`] first for untrusted input).
    pub fn to_f32(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows as usize, self.cols as usize);
        match self.dtype {
            DType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::I8 => {
                let (scales, values) = self.data.split_at((rows * 4).min(self.data.len()));
                let mut out = Vec::with_capacity(rows * cols);
                for (s, row) in scales.chunks_exact(4).zip(values.chunks(cols.max(1))) {
                    let s = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    out.extend(row.iter().map(|&q| q as i8 as f32 * s));
                }
                out
            }
        }
    }

    /// Stacks row blocks of one type and width (`None` if `parts` is empty or they differ).
    pub fn concat(parts: &[Activations]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.dtype != first.dtype || p.cols != first.cols)
        {
            return None;
        }
        let rows: u32 = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        match first.dtype {
            DType::F32 | DType::F16 => parts.iter().for_each(|p| data.extend_from_slice(&p.data)),
            DType::I8 => {
                for p in parts {
                    data.extend_from_slice(&p.data[..p.rows as usize * 4]);
                }
                for p in parts {
                    data.extend_from_slice(&p.data[p.rows as usize * 4..]);
                }
            }
        }
        Some(Self {
            dtype: first.dtype,
            rows,
            cols: first.cols,
            data,
        })
    }

    /// The first `rows` rows (what a forked session was fed: the shared prompt's positions).
    pub fn head_rows(&self, rows: usize) -> Self {
        let rows = rows.min(self.rows as usize);
        let cols = self.cols as usize;
        let data = match self.dtype {
            DType::F32 | DType::F16 => self.data[..self.dtype.tensor_bytes(rows, cols)].to_vec(),
            DType::I8 => {
                let n = self.rows as usize;
                let mut d = self.data[..rows * 4].to_vec();
                d.extend_from_slice(&self.data[n * 4..n * 4 + rows * cols]);
                d
            }
        };
        Self {
            dtype: self.dtype,
            rows: rows as u32,
            cols: self.cols,
            data,
        }
    }

    /// The last `rows` rows (a replay returns only the positions of its final chunk).
    pub fn tail_rows(&self, rows: usize) -> Self {
        let rows = rows.min(self.rows as usize);
        let cols = self.cols as usize;
        let skip = self.rows as usize - rows;
        let data = match self.dtype {
            DType::F32 | DType::F16 => {
                let width = self.dtype.tensor_bytes(1, cols);
                self.data[skip * width..].to_vec()
            }
            DType::I8 => {
                let n = self.rows as usize;
                let mut d = self.data[skip * 4..n * 4].to_vec();
                d.extend_from_slice(&self.data[n * 4 + skip * cols..]);
                d
            }
        };
        Self {
            dtype: self.dtype,
            rows: rows as u32,
            cols: self.cols,
            data,
        }
    }
}

/// Positions through one stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forward {
    pub session: SessionId,
    /// The model's identity.
    pub model: Digest,
    /// The span of layers the caller expects this node to run: `start..end`.
    pub start: u32,
    pub end: u32,
    /// Positions the node already holds for this session (0 opens it).
    pub position: u32,
    /// The token ids of the new positions.
    #[serde(deserialize_with = "bounded::positions")]
    pub tokens: Vec<u32>,
    /// The previous stage's output for the new positions (absent for the first stage).
    pub hidden: Option<Activations>,
    /// Consecutive forward passes over the new positions (sizes summing to their number);
    /// empty means one pass. The reply covers the final pass's positions only.
    #[serde(deserialize_with = "bounded::positions")]
    pub chunks: Vec<u32>,
    /// For the last stage: sample the next token with these parameters (boxed: they carry a
    /// token mask and logit biases, and most calls go to other stages).
    pub sampling: Option<Box<SamplingParams>>,
    /// Element type for the returned activations.
    pub reply_dtype: DType,
    /// Return the activations of every new position, not only the final chunk's (a replay
    /// through a replacement stage that feeds another replacement).
    pub all_rows: bool,
    /// The length of the session's prompt (positions `0..prompt_len`; 0: none declared): it
    /// picks llama.cpp's attention kernel of every position
    /// (`plexus_model::attention::kernel_at`: tiled for a prompt's rows in ubatches of 64 rows
    /// or more, split-KV for rows alone in their ubatch from position 256). The same on every
    /// call of a session, replays included, so a position's bits never depend on how the calls
    /// cut the positions.
    pub prompt_len: u32,
}

impl Forward {
    /// The chunk sizes to run (one chunk of everything when `chunks` is empty).
    pub fn chunk_sizes(&self) -> Vec<usize> {
        if self.chunks.is_empty() {
            vec![self.tokens.len()]
        } else {
            self.chunks.iter().map(|&c| c as usize).collect()
        }
    }
}

/// A call to a stage node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Forward(Forward),
    /// Forget the session's KV cache.
    Close {
        session: SessionId,
    },
    /// Ask for the node's current signed announcement.
    Describe,
    /// A payer's signed cumulative voucher for this node's work on one request (the JSON of
    /// `plexus_ledger::SignedVoucher`, at most [`MAX_VOUCHER_BYTES`]). The node verifies it and
    /// keeps the latest per request to redeem on the ledger. Appended last, like every new
    /// variant, so the others keep their encoding.
    Voucher {
        #[serde(with = "serde_bytes")]
        voucher: Vec<u8>,
    },
    /// A message of the training protocol (`plexus train --distributed`; postcard of
    /// `plexus_train::protocol::TrainRequest`). Peers that do not train answer `BadRequest`.
    /// Appended last, like every new variant.
    Train {
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    /// Open session `to` holding a copy of the first `positions` positions of the caller's
    /// session `from` (the prompt shared by the `n` choices of one request: each choice's
    /// chain continues from the copy instead of computing the prompt again). Answered
    /// [`Response::Forked`]; refused when `from` is unknown, busy or shorter, or when the
    /// node's stage would not give the same bits for positions computed in another split
    /// (then the caller opens `to` from position 0). Appended last, like every new variant.
    Fork {
        from: SessionId,
        to: SessionId,
        positions: u32,
    },
}

/// Largest voucher a [`Request::Voucher`] carries (a signed voucher's JSON is ~450 bytes).
pub const MAX_VOUCHER_BYTES: usize = 2048;

/// Why a stage refused or failed a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or inconsistent request.
    BadRequest,
    /// The node does not serve this model or span.
    UnknownModel,
    /// No such session (expired, evicted or never opened).
    UnknownSession,
    /// `position` does not match what the node holds.
    PositionMismatch,
    ContextOverflow,
    /// Too many sessions or a full queue; try another node.
    Busy,
    Internal,
}

/// A stage node's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Output activations of the final chunk.
    Hidden {
        hidden: Activations,
        compute_us: u64,
    },
    /// The sampled next token (last stage).
    Token {
        token: u32,
        compute_us: u64,
    },
    Closed,
    /// The node's announcement (`SignedAnnouncement` bytes).
    Described(#[serde(with = "serde_bytes")] Vec<u8>),
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The sampled next token with its log-probabilities (last stage, when the sampling
    /// params ask for them).
    Scored {
        token: u32,
        compute_us: u64,
        logprobs: TokenLogprobs,
    },
    /// A computed answer (`Hidden`, `Token` or `Scored`) with the node's signed receipt for
    /// the call (see [`crate::receipt`]). Appended last, so the other variants keep their
    /// encoding; a caller that wants no receipt simply unwraps it.
    Receipted {
        response: Box<Response>,
        receipt: Box<Receipt>,
    },
    /// A [`Request::Voucher`] verified and kept: the cumulative amount the node now holds a
    /// voucher for on that request (refusals are `Error { BadRequest }` naming the reason).
    VoucherKept {
        cumulative: u64,
    },
    /// The answer to a [`Request::Train`] (postcard of
    /// `plexus_train::protocol::TrainResponse`).
    Train {
        #[serde(with = "serde_bytes")]
        msg: Vec<u8>,
    },
    /// A [`Request::Fork`] done: the new session holds `positions` positions.
    Forked {
        positions: u32,
    },
}

impl Response {
    /// The answer without its receipt, and the receipt if there was one.
    pub fn into_parts(self) -> (Response, Option<Receipt>) {
        match self {
            Response::Receipted { response, receipt } => (*response, Some(*receipt)),
            other => (other, None),
        }
    }
}

/// Why bytes did not decode into a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// The body length a frame's 4-byte little-endian prefix announces, refused above
/// [`MAX_FRAME_BYTES`] before anything is read or allocated for the body.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(len));
    }
    Ok(len)
}

/// A whole frame: the 4-byte little-endian length, then the body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let body = encode(msg)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Bounded deserializers for lists whose length a peer controls.
mod bounded {
    use super::MAX_POSITIONS;
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use std::fmt;

    /// A `Vec<u32>` of at most [`MAX_POSITIONS`] items. serde's own `Vec` would accept any
    /// count the frame holds: a 32 MiB frame of one-byte varints becomes a 128 MiB vector
    /// before validation could refuse it. postcard announces the length up front, so a longer
    /// list is refused before anything is allocated.
    pub fn positions<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        struct Positions;
        impl<'de> Visitor<'de> for Positions {
            type Value = Vec<u32>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {MAX_POSITIONS} integers")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > MAX_POSITIONS {
                    return Err(A::Error::invalid_length(hint, &self));
                }
                let mut out = Vec::with_capacity(hint);
                while let Some(x) = seq.next_element()? {
                    if out.len() == MAX_POSITIONS {
                        return Err(A::Error::invalid_length(out.len() + 1, &self));
                    }
                    out.push(x);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(Positions)
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (msg, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot serialize the message: {0}")]
    Serialize(String),
    /// The peer would refuse the frame (and strike the sender), so it is never sent.
    #[error("message of {0} bytes exceeds the frame limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
}

/// Encodes a message body (the transport adds the length prefix). Never an empty or oversized
/// body: the caller gets an error instead, and fails the call.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    let body = postcard::to_allocvec(msg).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(EncodeError::TooLarge(body.len()));
    }
    Ok(body)
}

/// Decodes and validates a request from untrusted bytes.
pub fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let req: Request = decode(bytes)?;
    if let Request::Forward(f) = &req {
        validate_forward(f)?;
    }
    if let Request::Fork {
        from,
        to,
        positions,
    } = &req
    {
        if from == to {
            return Err(DecodeError::Invalid("a fork onto its own session".into()));
        }
        if *positions == 0 {
            return Err(DecodeError::Invalid("a fork of no positions".into()));
        }
    }
    if let Request::Voucher { voucher } = &req {
        if voucher.len() > MAX_VOUCHER_BYTES {
            return Err(DecodeError::Invalid(format!(
                "a voucher of {} bytes (at most {MAX_VOUCHER_BYTES})",
                voucher.len()
            )));
        }
    }
    Ok(req)
}

/// Decodes and validates a response from untrusted bytes.
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let resp: Response = decode(bytes)?;
    validate_response(&resp)?;
    Ok(resp)
}

fn validate_response(resp: &Response) -> Result<(), DecodeError> {
    if let Response::Receipted { response, receipt } = resp {
        if !matches!(
            **response,
            Response::Hidden { .. } | Response::Token { .. } | Response::Scored { .. }
        ) {
            return Err(DecodeError::Invalid(
                "a receipt on an answer that computed nothing".into(),
            ));
        }
        if receipt.signature.len() != SIGNATURE_BYTES {
            return Err(DecodeError::Invalid(format!(
                "a receipt signature of {} bytes (not {SIGNATURE_BYTES})",
                receipt.signature.len()
            )));
        }
        return validate_response(response);
    }
    if let Response::Hidden { hidden, .. } = &resp {
        hidden.validate()?;
    }
    if let Response::Described(bytes) = &resp {
        if bytes.len() > crate::announce::MAX_ANNOUNCEMENT_BYTES {
            return Err(DecodeError::Invalid("announcement too large".into()));
        }
    }
    if let Response::Error { message, .. } = &resp {
        if message.len() > 4096 {
            return Err(DecodeError::Invalid("error message over 4096 bytes".into()));
        }
    }
    if let Response::Scored { logprobs, .. } = &resp {
        if logprobs.top.len() > usize::from(MAX_TOP_LOGPROBS) {
            return Err(DecodeError::Invalid(
                "too many top log-probabilities".into(),
            ));
        }
    }
    Ok(())
}

fn validate_forward(f: &Forward) -> Result<(), DecodeError> {
    let invalid = |m: String| Err(DecodeError::Invalid(m));
    let n = f.tokens.len();
    if n == 0 || n > MAX_POSITIONS {
        return invalid(format!("{n} positions (1..={MAX_POSITIONS} allowed)"));
    }
    if f.start >= f.end {
        return invalid(format!("empty span {}..{}", f.start, f.end));
    }
    if let Some(h) = &f.hidden {
        h.validate()?;
        if h.rows as usize != n {
            return invalid(format!("{} rows of activations for {n} tokens", h.rows));
        }
    }
    if !f.chunks.is_empty() {
        if f.chunks.contains(&0) {
            return invalid("a chunk of zero positions".into());
        }
        let total: u64 = f.chunks.iter().map(|&c| c as u64).sum();
        if total != n as u64 {
            return invalid(format!("chunks cover {total} positions, not {n}"));
        }
    }
    if (f.position as usize).saturating_add(n) > u32::MAX as usize {
        return invalid("position overflow".into());
    }
    if let Some(s) = &f.sampling {
        if s.logit_bias.len() > MAX_LOGIT_BIAS {
            return invalid(format!(
                "{} logit_bias entries (at most {MAX_LOGIT_BIAS})",
                s.logit_bias.len()
            ));
        }
        if s.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return invalid(format!("at most {MAX_TOP_LOGPROBS} top log-probabilities"));
        }
        if s.allowed.as_ref().is_some_and(|m| m.len() > MAX_MASK_WORDS) {
            return invalid(format!("a token mask over {MAX_MASK_WORDS} words"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    /// Issue 7: `encode` used to fall back to an empty body on failure; an oversized message
    /// (which the peer refuses, striking the sender) is now an error for the caller.
    #[test]
    fn encoding_refuses_oversized_messages_issue_7() {
        let big = Response::Described(vec![7; MAX_FRAME_BYTES]);
        assert!(matches!(encode(&big), Err(EncodeError::TooLarge(n)) if n > MAX_FRAME_BYTES));
        assert!(encode_frame(&big).is_err());
        assert!(!encode(&Request::Describe).unwrap().is_empty());
    }

    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample_forward() -> Forward {
        Forward {
            session: SessionId([7; 16]),
            model: Digest::of(b"m"),
            start: 10,
            end: 20,
            position: 5,
            tokens: vec![1, 2, 3],
            hidden: Some(Activations::encode(&[0.5; 12], 3, 4, DType::F16)),
            chunks: vec![2, 1],
            sampling: Some(Box::new(SamplingParams::greedy())),
            reply_dtype: DType::F16,
            all_rows: false,
            prompt_len: 0,
        }
    }

    fn receipted(inner: Response, signature: usize) -> Response {
        let f = sample_forward();
        let out = crate::receipt::output_digest(&inner).unwrap_or(Digest([0; 32]));
        let mut receipt = Receipt::for_call(&f, 10, out);
        receipt.signature = vec![27; signature];
        Response::Receipted {
            response: Box::new(inner),
            receipt: Box::new(receipt),
        }
    }

    #[test]
    fn receipted_answers_round_trip_and_odd_ones_are_refused() {
        let token = Response::Token {
            token: 4,
            compute_us: 9,
        };
        let ok = receipted(token.clone(), 65);
        let back = decode_response(&encode(&ok).unwrap()).unwrap();
        assert_eq!(back, ok);
        assert_eq!(back.into_parts().0, token);
        for bad in [
            receipted(token.clone(), 64),
            receipted(Response::Closed, 65),
            receipted(receipted(token, 65), 65),
            receipted(
                Response::Hidden {
                    hidden: Activations {
                        dtype: DType::F32,
                        rows: 1,
                        cols: 2,
                        data: vec![0; 7],
                    },
                    compute_us: 0,
                },
                65,
            ),
        ] {
            assert!(
                matches!(
                    decode_response(&encode(&bad).unwrap()),
                    Err(DecodeError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn requests_round_trip() {
        let req = Request::Forward(sample_forward());
        assert_eq!(decode_request(&encode(&req).unwrap()).unwrap(), req);
        let close = Request::Close {
            session: SessionId([1; 16]),
        };
        assert_eq!(decode_request(&encode(&close).unwrap()).unwrap(), close);
    }

    #[test]
    fn inconsistent_requests_are_invalid() {
        let mut f = sample_forward();
        f.chunks = vec![1, 1];
        assert!(matches!(
            decode_request(&encode(&Request::Forward(f)).unwrap()),
            Err(DecodeError::Invalid(_))
        ));
        let mut f = sample_forward();
        f.hidden = Some(Activations::encode(&[0.5; 8], 2, 4, DType::F16));
        assert!(matches!(
            decode_request(&encode(&Request::Forward(f)).unwrap()),
            Err(DecodeError::Invalid(_))
        ));
        let mut f = sample_forward();
        if let Some(h) = &mut f.hidden {
            h.data.pop();
        }
        assert!(matches!(
            decode_request(&encode(&Request::Forward(f)).unwrap()),
            Err(DecodeError::Invalid(_))
        ));
        let mut bytes = encode(&Request::Forward(sample_forward())).unwrap();
        bytes.push(0);
        assert_eq!(decode_request(&bytes), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn activations_round_trip_within_their_precision() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 7.0).collect();
        for (dtype, tol) in [(DType::F32, 0.0), (DType::F16, 2e-3), (DType::I8, 0.04)] {
            let a = Activations::encode(&values, 4, 16, dtype);
            a.validate().unwrap();
            let back = a.to_f32();
            let worst = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= tol, "{dtype:?}: {worst}");
            let tail = a.tail_rows(1).to_f32();
            assert_eq!(tail, back[48..].to_vec(), "{dtype:?}");
            let parts = [a.tail_rows(4), a.tail_rows(2)];
            let joined = Activations::concat(&parts).unwrap();
            assert_eq!(joined.rows, 6);
            let mut want = back.clone();
            want.extend_from_slice(&back[32..]);
            assert_eq!(joined.to_f32(), want, "{dtype:?}");
        }
    }

    #[test]
    fn odd_values_and_zero_widths_encode_to_valid_activations() {
        let odd = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -0.0,
            f32::from_bits(1),
            1.0,
            -1.0,
        ];
        for dtype in [DType::F32, DType::F16, DType::I8] {
            let a = Activations::encode(&odd, 2, 4, dtype);
            a.validate().unwrap();
            assert_eq!(a.to_f32().len(), 8, "{dtype:?}");
            a.tail_rows(1).validate().unwrap();
            let empty = Activations::encode(&[], 3, 0, dtype);
            empty.validate().unwrap();
            assert!(empty.to_f32().is_empty());
            empty.tail_rows(2).validate().unwrap();
            Activations::concat(&[empty.clone(), empty.tail_rows(1)])
                .unwrap()
                .validate()
                .unwrap();
        }
        // A row with an infinity has no finite scale (it decodes to NaN); the finite rows keep
        // their values to int8 precision.
        let a = Activations::encode(&odd, 2, 4, DType::I8).to_f32();
        for (got, want) in a[4..].iter().zip(&odd[4..]) {
            assert!((got - want).abs() < 1e-6, "{a:?}");
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_mutated_frames(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&Request::Forward(sample_forward())).unwrap();
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            let _ = decode_request(&bytes);
            let len = cut.index(bytes.len() + 1);
            let _ = decode_request(&bytes[..len]);
        }
    }
}
