//! The kept fuzz corpus of stage-protocol frames (`tests/corpus/wire/*.bin`) and a seeded
//! mutation fuzzer over it.
//!
//! - Every corpus file is one frame as it travels: a 4-byte little-endian length, then the
//!   postcard body. `req-*` files are requests, `resp-*` responses, `mut-*` minimised mutants
//!   that reached a distinct outcome; every file goes through both decoders.
//! - [`corpus_is_current`] checks the hand-written files against [`generate`], so a change of
//!   the wire format shows up here. `PLEXUS_REGEN_CORPUS=1` rewrites the corpus instead (run
//!   only that test: `-E 'binary(wire_corpus) & test(corpus_is_current)'`).
//! - [`corpus_and_its_mutations_decode_safely`] decodes every file plus thousands of seeded
//!   mutations of each (bit flips, byte sets, truncations, splices, insertions, deletions,
//!   length-prefix edits) and asserts: no panic, decoding allocates at most the frame's size
//!   plus a small constant, and whatever decodes re-encodes to a frame that decodes to the same
//!   value. `SEED=<n>` and `PLEXUS_FUZZ_MUTATIONS=<n>` override the defaults; the seed is
//!   printed.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_core::announce::{Announcement, ModelOffer, Observation};
use plexus_core::keys::NodeKey;
use plexus_core::rng::{CounterRng, Stream};
use plexus_core::sampling::SamplingParams;
use plexus_core::wire::{
    decode_request, decode_response, encode, encode_frame, frame_len, Activations, DType,
    DecodeError, ErrorCode, Forward, Request, Response, SessionId, MAX_FRAME_BYTES, MAX_HIDDEN,
    MAX_POSITIONS,
};
use plexus_core::Digest;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Allocation accounting: the live and peak bytes of the current thread, so a test can bound
// what one decode allocates.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call forwards to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it held allocated at once.
fn peak_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get);
    (r, (peak - base).max(0) as usize)
}

/// What one decode may allocate beyond the frame's own size (small fixed-size values, error
/// messages, a list's first reservation).
const ALLOC_SLACK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// The corpus.

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/wire")
}

fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn forward() -> Forward {
    Forward {
        session: SessionId(*b"plexus-session-1"),
        model: Digest::of(b"tiny model"),
        start: 0,
        end: 2,
        position: 0,
        tokens: vec![0, 17, 399, 42],
        hidden: None,
        chunks: Vec::new(),
        sampling: Some(Box::new(SamplingParams::greedy())),
        reply_dtype: DType::F16,
        all_rows: false,
        prompt_len: 0,
    }
}

fn hidden(dtype: DType, rows: usize, cols: usize) -> Activations {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 251) as f32 / 25.0 - 5.0)
        .collect();
    Activations::encode(&values, rows, cols, dtype)
}

fn later_stage(dtype: DType) -> Forward {
    Forward {
        start: 1,
        position: 4,
        tokens: vec![5, 6, 7],
        hidden: Some(hidden(dtype, 3, 8)),
        ..forward()
    }
}

fn announcement() -> Vec<u8> {
    let key = NodeKey::from_secret([7; 32]).unwrap();
    Announcement {
        public_key: key.public().encode_protobuf(),
        peer: key.peer_id().to_string(),
        issued_at_ms: 1_700_000_000_000,
        ttl_ms: 30_000,
        version: "0.1.0".into(),
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
        threads: 2,
        free_memory: 1 << 30,
        sessions: 1,
        max_sessions: 64,
        queue: 0,
        price: 10,
        models: vec![ModelOffer {
            model: Digest::of(b"tiny model"),
            name: "tiny".into(),
            num_layers: 2,
            start: 0,
            end: 2,
            hidden: 64,
            decode_s_per_layer: 1e-4,
            prefill_s_per_layer: 2e-5,
            layer_bytes: 1 << 20,
            kv_positions: 100_000,
            kv_free_positions: 90_000,
            check_layers: 2,
        }],
        observed: vec![Observation {
            peer: NodeKey::from_secret([8; 32]).unwrap().peer_id().to_string(),
            model: Digest::of(b"tiny model"),
            decode_s_per_layer: 2e-4,
            layers: 2,
        }],
        convicted: vec![NodeKey::from_secret([9; 32]).unwrap().peer_id().to_string()],
        doubted: vec![NodeKey::from_secret([10; 32])
            .unwrap()
            .peer_id()
            .to_string()],
    }
    .sign(&key)
    .encode()
}

/// Postcard varint of `v`.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// The body of `Request::Forward(f)` with `tokens` replaced by `raw` (already encoded, length
/// varint included).
fn forward_with_raw_tokens(f: &Forward, raw: &[u8]) -> Vec<u8> {
    let empty = encode(&Request::Forward(Forward {
        tokens: Vec::new(),
        ..f.clone()
    }))
    .unwrap();
    let one = encode(&Request::Forward(Forward {
        tokens: vec![0x55],
        ..f.clone()
    }))
    .unwrap();
    // The token list starts at the first byte where the two encodings differ (its length).
    let at = empty.iter().zip(&one).take_while(|(a, b)| a == b).count();
    assert_eq!((empty[at], one[at], one[at + 1]), (0, 1, 0x55));
    let mut out = empty[..at].to_vec();
    out.extend_from_slice(raw);
    out.extend_from_slice(&empty[at + 1..]);
    out
}

/// The hand-written corpus: a valid frame of every variant and dtype, and frames that probe one
/// check each. Regenerated byte for byte by [`corpus_is_current`].
fn generate() -> BTreeMap<String, Vec<u8>> {
    let mut c = BTreeMap::new();
    let mut req = |name: &str, r: Request| {
        c.insert(format!("req-{name}.bin"), encode_frame(&r).unwrap());
    };
    req("ok-forward-first", Request::Forward(forward()));
    for (name, dtype) in [("f32", DType::F32), ("f16", DType::F16), ("i8", DType::I8)] {
        req(
            &format!("ok-forward-hidden-{name}"),
            Request::Forward(later_stage(dtype)),
        );
    }
    // The session's prompt length: a prompt of 76 rows, and a hostile maximum (only the
    // positions a node computes take kernels from it).
    for (name, prompt_len) in [("76", 76), ("max", u32::MAX)] {
        req(
            &format!("ok-forward-prompt-{name}"),
            Request::Forward(Forward {
                prompt_len,
                ..forward()
            }),
        );
    }
    req(
        "ok-forward-chunks-all-rows",
        Request::Forward(Forward {
            chunks: vec![2, 1],
            all_rows: true,
            sampling: None,
            ..later_stage(DType::F32)
        }),
    );
    req(
        "ok-forward-sampling",
        Request::Forward(Forward {
            sampling: Some(Box::new(SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.05,
                repetition_penalty: 1.1,
                frequency_penalty: 0.5,
                presence_penalty: 0.25,
                penalty_last_n: 64,
                seed: u64::MAX,
                logit_bias: vec![(7, -100.0), (12, 2.5)],
                logprobs: Some(20),
                allowed: Some(vec![u32::MAX, 1]),
            })),
            ..forward()
        }),
    );
    req(
        "ok-close",
        Request::Close {
            session: SessionId([0xAB; 16]),
        },
    );
    req("ok-describe", Request::Describe);
    req(
        "ok-voucher",
        Request::Voucher {
            voucher: br#"{"voucher":{},"chain_id":31337,"signature":"0x00"}"#.to_vec(),
        },
    );
    // The training protocol's bytes are opaque here (plexus_train decodes them).
    req(
        "ok-train",
        Request::Train {
            msg: vec![0, 1, 2, 3],
        },
    );
    req(
        "ok-fork",
        Request::Fork {
            from: SessionId([0xAB; 16]),
            to: SessionId([0xCD; 16]),
            positions: 300,
        },
    );
    req(
        "invalid-fork-onto-itself",
        Request::Fork {
            from: SessionId([0xAB; 16]),
            to: SessionId([0xAB; 16]),
            positions: 3,
        },
    );
    req(
        "invalid-fork-no-positions",
        Request::Fork {
            from: SessionId([0xAB; 16]),
            to: SessionId([0xCD; 16]),
            positions: 0,
        },
    );
    // Decodes: the decoder checks shapes, the engine checks them against its model.
    req(
        "ok-forward-hidden-cols-zero",
        Request::Forward(Forward {
            hidden: Some(Activations {
                dtype: DType::F32,
                rows: 3,
                cols: 0,
                data: Vec::new(),
            }),
            ..later_stage(DType::F32)
        }),
    );
    let mut nan = hidden(DType::I8, 3, 8);
    nan.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    nan.data[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    nan.data[8..12].copy_from_slice(&(-1e38f32).to_le_bytes());
    req(
        "ok-forward-hidden-i8-nan-scales",
        Request::Forward(Forward {
            hidden: Some(nan),
            ..later_stage(DType::I8)
        }),
    );
    req(
        "ok-forward-sampling-nan",
        Request::Forward(Forward {
            sampling: Some(Box::new(SamplingParams {
                temperature: f32::NAN,
                top_k: usize::MAX,
                top_p: f32::NEG_INFINITY,
                min_p: f32::NAN,
                repetition_penalty: 0.0,
                penalty_last_n: usize::MAX,
                ..SamplingParams::default()
            })),
            ..forward()
        }),
    );
    // Refused by validation.
    req(
        "invalid-no-tokens",
        Request::Forward(Forward {
            tokens: Vec::new(),
            ..forward()
        }),
    );
    req(
        "invalid-empty-span",
        Request::Forward(Forward {
            start: 2,
            end: 2,
            ..forward()
        }),
    );
    req(
        "invalid-chunks-sum-wrong",
        Request::Forward(Forward {
            chunks: vec![1, 1],
            ..forward()
        }),
    );
    req(
        "invalid-chunk-zero",
        Request::Forward(Forward {
            chunks: vec![0, 4],
            ..forward()
        }),
    );
    req(
        "invalid-hidden-rows-mismatch",
        Request::Forward(Forward {
            hidden: Some(hidden(DType::F16, 2, 8)),
            ..later_stage(DType::F16)
        }),
    );
    let mut short = hidden(DType::I8, 3, 8);
    short.data.truncate(20);
    req(
        "invalid-hidden-short-data",
        Request::Forward(Forward {
            hidden: Some(short),
            ..later_stage(DType::I8)
        }),
    );
    req(
        "invalid-hidden-too-wide",
        Request::Forward(Forward {
            hidden: Some(Activations {
                dtype: DType::F32,
                rows: 3,
                cols: MAX_HIDDEN as u32 + 1,
                data: Vec::new(),
            }),
            ..later_stage(DType::F32)
        }),
    );
    req(
        "invalid-position-overflow",
        Request::Forward(Forward {
            position: u32::MAX,
            ..forward()
        }),
    );

    let mut resp = |name: &str, r: Response| {
        c.insert(format!("resp-{name}.bin"), encode_frame(&r).unwrap());
    };
    for (name, dtype) in [("f32", DType::F32), ("f16", DType::F16), ("i8", DType::I8)] {
        resp(
            &format!("ok-hidden-{name}"),
            Response::Hidden {
                hidden: hidden(dtype, 2, 8),
                compute_us: 1234,
            },
        );
    }
    resp(
        "ok-token",
        Response::Token {
            token: 399,
            compute_us: u64::MAX,
        },
    );
    resp(
        "ok-scored",
        Response::Scored {
            token: 399,
            compute_us: 17,
            logprobs: plexus_core::sampling::TokenLogprobs {
                token: 399,
                logprob: -0.25,
                top: vec![(399, -0.25), (4, -1.5), (0, f32::NEG_INFINITY)],
            },
        },
    );
    resp("ok-closed", Response::Closed);
    resp(
        "ok-voucher-kept",
        Response::VoucherKept { cumulative: 1_234 },
    );
    resp("ok-train", Response::Train { msg: vec![4, 5, 6] });
    resp("ok-forked", Response::Forked { positions: 300 });
    resp("ok-described", Response::Described(announcement()));
    for code in [
        ErrorCode::BadRequest,
        ErrorCode::UnknownModel,
        ErrorCode::UnknownSession,
        ErrorCode::PositionMismatch,
        ErrorCode::ContextOverflow,
        ErrorCode::Busy,
        ErrorCode::Internal,
    ] {
        resp(
            &format!("ok-error-{code:?}").to_lowercase(),
            Response::Error {
                code,
                message: format!("{code:?} happened"),
            },
        );
    }
    resp(
        "invalid-error-message-too-long",
        Response::Error {
            code: ErrorCode::Internal,
            message: "x".repeat(4097),
        },
    );
    resp(
        "invalid-hidden-rows-beyond-max",
        Response::Hidden {
            hidden: Activations {
                dtype: DType::F16,
                rows: MAX_POSITIONS as u32 + 1,
                cols: 0,
                data: Vec::new(),
            },
            compute_us: 0,
        },
    );

    // Raw bytes no encoder produces.
    let describe = encode(&Request::Describe).unwrap();
    c.insert("req-truncated-empty-file.bin".into(), Vec::new());
    c.insert(
        "req-truncated-prefix-only.bin".into(),
        10u32.to_le_bytes().to_vec(),
    );
    c.insert(
        "req-toolarge-prefix-over-limit.bin".into(),
        ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes().to_vec(),
    );
    c.insert(
        "req-toolarge-prefix-u32-max.bin".into(),
        [u32::MAX.to_le_bytes().to_vec(), describe.clone()].concat(),
    );
    c.insert(
        "req-ok-prefix-shorter-than-data.bin".into(),
        [1u32.to_le_bytes().to_vec(), vec![2, 9, 9]].concat(),
    );
    c.insert(
        "req-trailing-byte.bin".into(),
        frame_of(&[describe.clone(), vec![0]].concat()),
    );
    c.insert("req-malformed-unknown-variant.bin".into(), frame_of(&[3]));
    c.insert(
        "req-malformed-overlong-variant-varint.bin".into(),
        frame_of(&[0x82, 0x80, 0x80, 0x80, 0x80, 0x00]),
    );
    c.insert("req-malformed-empty-body.bin".into(), frame_of(&[]));
    let f = forward();
    let mut huge = varint(u32::MAX.into());
    huge.extend_from_slice(&[1, 2, 3]);
    c.insert(
        "req-malformed-tokens-claim-4g.bin".into(),
        frame_of(&forward_with_raw_tokens(&f, &huge)),
    );
    let mut over = varint(MAX_POSITIONS as u64 + 1);
    over.extend(std::iter::repeat_n(0u8, MAX_POSITIONS + 1));
    c.insert(
        "req-malformed-tokens-over-max.bin".into(),
        frame_of(&forward_with_raw_tokens(&f, &over)),
    );
    let mut wide = varint(2);
    wide.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f, 1]);
    c.insert(
        "req-malformed-token-varint-overflow.bin".into(),
        frame_of(&forward_with_raw_tokens(&f, &wide)),
    );
    let mut bad_utf8 = encode(&Response::Error {
        code: ErrorCode::Busy,
        message: "abcd".into(),
    })
    .unwrap();
    let n = bad_utf8.len();
    bad_utf8[n - 2] = 0xC3;
    bad_utf8[n - 1] = 0x28;
    c.insert(
        "resp-malformed-error-bad-utf8.bin".into(),
        frame_of(&bad_utf8),
    );
    c
}

fn read_corpus() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.insert(name, std::fs::read(&path).unwrap());
        }
    }
    out
}

fn regen() -> bool {
    std::env::var_os("PLEXUS_REGEN_CORPUS").is_some_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------------------
// Decoding a frame the way the stage codec reads one.

/// What became of a frame; the key under which mutants are kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Shorter than the 4-byte prefix, or shorter than the prefix says: the stream ends early.
    Truncated,
    TooLarge,
    /// Decoded; which variant.
    Ok(&'static str),
    Malformed(String),
    Trailing,
    Invalid(String),
}

fn classify(e: &DecodeError) -> Outcome {
    // Keep the kind of complaint, not its numbers.
    let words = |m: &str| {
        m.split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| w.len() > 2)
            .take(3)
            .collect::<Vec<_>>()
            .join("-")
    };
    match e {
        DecodeError::TooLarge(_) => Outcome::TooLarge,
        DecodeError::Malformed(m) => Outcome::Malformed(words(m)),
        DecodeError::Trailing(_) => Outcome::Trailing,
        DecodeError::Invalid(m) => Outcome::Invalid(words(m)),
    }
}

fn request_variant(r: &Request) -> &'static str {
    match r {
        Request::Forward(f) if f.hidden.is_some() => "forward-hidden",
        Request::Forward(_) => "forward",
        Request::Close { .. } => "close",
        Request::Describe => "describe",
        Request::Voucher { .. } => "voucher",
        Request::Train { .. } => "train",
        Request::Fork { .. } => "fork",
    }
}

fn response_variant(r: &Response) -> &'static str {
    match r {
        Response::Hidden { .. } => "hidden",
        Response::Token { .. } => "token",
        Response::Scored { .. } => "scored",
        Response::Closed => "closed",
        Response::Described(_) => "described",
        Response::Error { .. } => "error",
        Response::Receipted { .. } => "receipted",
        Response::VoucherKept { .. } => "voucher-kept",
        Response::Train { .. } => "train",
        Response::Forked { .. } => "forked",
    }
}

/// Splits a frame like the codec: the prefix is checked before the body is read, and only
/// `len` body bytes are read.
fn body_of(frame: &[u8]) -> Result<&[u8], Outcome> {
    let Some(prefix) = frame.get(..4) else {
        return Err(Outcome::Truncated);
    };
    let len = frame_len(prefix.try_into().unwrap()).map_err(|e| classify(&e))?;
    frame.get(4..4 + len).ok_or(Outcome::Truncated)
}

/// Decodes `frame` with both decoders, checking the allocation bound and the round trip of
/// whatever decodes. Returns the outcome of the decoder the file is meant for.
fn check(frame: &[u8], as_request: bool) -> Result<Outcome, String> {
    let body = match body_of(frame) {
        Ok(body) => body,
        Err(outcome) => return Ok(outcome),
    };
    let limit = body.len() + ALLOC_SLACK;
    let (req, bytes) = peak_alloc(|| decode_request(body));
    if bytes > limit {
        return Err(format!(
            "decode_request allocated {bytes} bytes for a {} byte body",
            body.len()
        ));
    }
    let (resp, bytes) = peak_alloc(|| decode_response(body));
    if bytes > limit {
        return Err(format!(
            "decode_response allocated {bytes} bytes for a {} byte body",
            body.len()
        ));
    }
    let req_outcome = match &req {
        Ok(r) => {
            round_trip(r, decode_request)?;
            Outcome::Ok(request_variant(r))
        }
        Err(e) => classify(e),
    };
    let resp_outcome = match &resp {
        Ok(r) => {
            round_trip(r, decode_response)?;
            Outcome::Ok(response_variant(r))
        }
        Err(e) => classify(e),
    };
    Ok(if as_request {
        req_outcome
    } else {
        resp_outcome
    })
}

/// A decoded value re-encodes to a frame that decodes to the same value. Compared through the
/// encoding, which is canonical and treats a NaN like any other bit pattern.
fn round_trip<T: serde::Serialize + std::fmt::Debug>(
    value: &T,
    decode: impl Fn(&[u8]) -> Result<T, DecodeError>,
) -> Result<(), String> {
    let frame = encode_frame(value).unwrap();
    let body = body_of(&frame).map_err(|o| format!("re-encoded frame is {o:?}"))?;
    let again = decode(body).map_err(|e| format!("{value:?} re-encoded does not decode: {e}"))?;
    if encode(&again).unwrap() != body {
        return Err(format!("{value:?} decoded back as {again:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mutations.

const DEFAULT_SEED: u64 = 0x5EED_F00D;
const DEFAULT_MUTATIONS: usize = 5000;

fn seed() -> u64 {
    std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

fn mutations() -> usize {
    std::env::var("PLEXUS_FUZZ_MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_MUTATIONS)
}

/// Applies one to three random edits to `frame`; `other` is a second corpus frame to splice
/// from.
fn mutate(rng: &mut CounterRng, frame: &[u8], other: &[u8]) -> Vec<u8> {
    let mut m = frame.to_vec();
    let below = |rng: &mut CounterRng, n: usize| rng.below(n.max(1) as u64) as usize;
    for _ in 0..1 + below(rng, 3) {
        match below(rng, 8) {
            // Flip a few bits.
            0 => {
                for _ in 0..1 + below(rng, 4) {
                    if !m.is_empty() {
                        let i = below(rng, m.len());
                        m[i] ^= 1 << below(rng, 8);
                    }
                }
            }
            // Set a byte to an edge value.
            1 => {
                if !m.is_empty() {
                    let i = below(rng, m.len());
                    const EDGES: [u8; 6] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff];
                    m[i] = if rng.below(2) == 0 {
                        EDGES[below(rng, EDGES.len())]
                    } else {
                        rng.next_u64() as u8
                    };
                }
            }
            // Truncate, keeping the prefix as it was.
            2 => {
                let at = below(rng, m.len() + 1);
                m.truncate(at);
            }
            // Splice the tail of another frame after a head of this one.
            3 => {
                let at = below(rng, m.len() + 1);
                let from = below(rng, other.len() + 1);
                m.truncate(at);
                m.extend_from_slice(&other[from..]);
            }
            // Edit the length prefix.
            4 => {
                if m.len() >= 4 {
                    let body = (m.len() - 4) as i64;
                    let len = match below(rng, 6) {
                        0 => 0,
                        1 => body + 1,
                        2 => (body - 1).max(0),
                        3 => MAX_FRAME_BYTES as i64,
                        4 => MAX_FRAME_BYTES as i64 + 1,
                        _ => i64::from(u32::MAX),
                    };
                    m[..4].copy_from_slice(&(len as u32).to_le_bytes());
                }
            }
            // Insert bytes: random, or a huge varint where a length might be read.
            5 => {
                let at = below(rng, m.len() + 1);
                let ins: Vec<u8> = if rng.below(2) == 0 {
                    vec![0xff, 0xff, 0xff, 0xff, 0x0f]
                } else {
                    (0..1 + below(rng, 8))
                        .map(|_| rng.next_u64() as u8)
                        .collect()
                };
                m.splice(at..at, ins);
            }
            // Delete a range.
            6 => {
                let a = below(rng, m.len() + 1);
                let b = (a + 1 + below(rng, 16)).min(m.len());
                m.drain(a..b);
            }
            // Repeat a range.
            _ => {
                let a = below(rng, m.len() + 1);
                let b = (a + 1 + below(rng, 32)).min(m.len());
                let copy = m[a..b].to_vec();
                m.splice(b..b, copy);
            }
        }
    }
    // Most edits leave the prefix stale; usually fix it so the body reaches the decoder.
    if m.len() >= 4 && rng.below(4) != 0 {
        let len = (m.len() - 4) as u32;
        m[..4].copy_from_slice(&len.to_le_bytes());
    }
    m
}

/// Shrinks a mutant while it keeps its outcome: drop ranges of bytes, halving their size.
fn minimise(frame: &[u8], as_request: bool, outcome: &Outcome) -> Vec<u8> {
    let fix = |mut f: Vec<u8>| {
        if f.len() >= 4 {
            let len = (f.len() - 4) as u32;
            f[..4].copy_from_slice(&len.to_le_bytes());
        }
        f
    };
    let mut best = frame.to_vec();
    let mut width = (best.len() / 2).max(1);
    while width >= 1 {
        let mut i = 4;
        while i < best.len() {
            let mut cand = best.clone();
            cand.drain(i..(i + width).min(cand.len()));
            let cand = fix(cand);
            if check(&cand, as_request).as_ref() == Ok(outcome) {
                best = cand;
            } else {
                i += width;
            }
        }
        if width == 1 {
            break;
        }
        width /= 2;
    }
    best
}

fn slug(o: &Outcome) -> String {
    let s = match o {
        Outcome::Truncated => "truncated".to_string(),
        Outcome::TooLarge => "toolarge".to_string(),
        Outcome::Ok(v) => format!("ok-{v}"),
        Outcome::Malformed(m) => format!("malformed-{m}"),
        Outcome::Trailing => "trailing".to_string(),
        Outcome::Invalid(m) => format!("invalid-{m}"),
    };
    s.to_lowercase()
}

/// Runs the seeded mutations of every file; returns the shortest mutant of each new outcome.
fn fuzz(
    corpus: &BTreeMap<String, Vec<u8>>,
    seed: u64,
    per_file: usize,
) -> BTreeMap<(bool, Outcome), Vec<u8>> {
    let files: Vec<(&String, &Vec<u8>)> = corpus.iter().collect();
    let mut found: BTreeMap<(bool, Outcome), Vec<u8>> = BTreeMap::new();
    for (k, (name, frame)) in files.iter().enumerate() {
        let as_request = !name.starts_with("resp-") && !name.starts_with("mut-resp-");
        let mut rng = CounterRng::new(seed, Stream::Data, k as u64);
        for i in 0..per_file {
            let other = files[rng.below(files.len() as u64) as usize].1;
            let m = mutate(&mut rng, frame, other);
            let outcome = std::panic::catch_unwind(|| check(&m, as_request))
                .unwrap_or_else(|_| Err("the decoder panicked".to_string()));
            match outcome {
                Ok(o) => {
                    let slot = found.entry((as_request, o)).or_insert_with(|| m.clone());
                    if m.len() < slot.len() {
                        *slot = m;
                    }
                }
                Err(why) => panic!(
                    "{name}, mutation {i} (seed {seed}): {why}\nframe: {}",
                    hex::encode(&m)
                ),
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn corpus_is_current() {
    let want = generate();
    if regen() {
        let dir = corpus_dir();
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &want {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        // Mutants: the shortest, then minimised, frame of every outcome the plain corpus does
        // not already reach.
        let seed = DEFAULT_SEED;
        let mut known = std::collections::BTreeSet::new();
        for (name, frame) in &want {
            let as_request = !name.starts_with("resp-");
            known.insert((as_request, check(frame, as_request).unwrap()));
        }
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("mut-"))
            {
                std::fs::remove_file(path).unwrap();
            }
        }
        for ((as_request, outcome), frame) in fuzz(&want, seed, DEFAULT_MUTATIONS) {
            if known.contains(&(as_request, outcome.clone())) {
                continue;
            }
            let small = minimise(&frame, as_request, &outcome);
            let kind = if as_request { "req" } else { "resp" };
            let name = format!("mut-{kind}-{}.bin", slug(&outcome));
            std::fs::write(dir.join(name), small).unwrap();
        }
        eprintln!("wire corpus regenerated in {}", dir.display());
        return;
    }
    let have = read_corpus();
    for (name, bytes) in &want {
        assert_eq!(
            have.get(name),
            Some(bytes),
            "{name} is missing or differs from the generator (the wire format changed?); \
             regenerate with PLEXUS_REGEN_CORPUS=1 cargo nextest run --workspace \
             -E 'binary(wire_corpus) & test(corpus_is_current)'"
        );
    }
    assert!(
        have.keys().any(|n| n.starts_with("mut-")),
        "no minimised mutants in the corpus"
    );
}

/// Every file lands where its name says: `{req,resp}-{class}-...` with class `ok`, `invalid`,
/// `malformed`, `trailing`, `toolarge` or `truncated`; a `mut-` file's name is its full outcome.
#[test]
fn corpus_files_decode_as_labelled() {
    let corpus = read_corpus();
    assert!(corpus.len() >= 30, "only {} corpus files", corpus.len());
    let mut classes = std::collections::BTreeSet::new();
    for (name, frame) in &corpus {
        let as_request = !name.starts_with("resp-") && !name.starts_with("mut-resp-");
        let outcome = check(frame, as_request).unwrap_or_else(|e| panic!("{name}: {e}"));
        let slug = slug(&outcome);
        if let Some(rest) = name.strip_prefix("mut-") {
            let kind = if as_request { "req" } else { "resp" };
            assert_eq!(
                format!("{kind}-{slug}.bin"),
                rest,
                "{name} no longer reaches its outcome"
            );
            continue;
        }
        let class = name.split('-').nth(1).unwrap();
        let got = slug.split('-').next().unwrap();
        assert_eq!(got, class, "{name}: {outcome:?}");
        classes.insert((as_request, got.to_string()));
    }
    for class in [
        "ok",
        "invalid",
        "malformed",
        "trailing",
        "toolarge",
        "truncated",
    ] {
        assert!(
            classes.contains(&(true, class.to_string())),
            "no request file of class {class}"
        );
    }
    for class in ["ok", "invalid", "malformed"] {
        assert!(
            classes.contains(&(false, class.to_string())),
            "no response file of class {class}"
        );
    }
}

#[test]
fn corpus_and_its_mutations_decode_safely() {
    let seed = seed();
    let per_file = mutations();
    eprintln!("wire corpus fuzz: seed {seed}, {per_file} mutations per file (SEED=, PLEXUS_FUZZ_MUTATIONS= to change)");
    let corpus = read_corpus();
    let found = fuzz(&corpus, seed, per_file);
    eprintln!(
        "{} files x {per_file} mutations reached {} outcomes",
        corpus.len(),
        found.len()
    );
    assert!(found.keys().any(|(_, o)| matches!(o, Outcome::Ok(_))));
    assert!(found.keys().any(|(_, o)| matches!(o, Outcome::Invalid(_))));
}

/// A frame that claims millions of tokens and holds them: refused before a vector of them is
/// built (serde's `Vec` would have grown to four bytes per one-byte varint).
#[test]
fn regression_token_list_longer_than_max_positions_is_refused_without_allocating() {
    let n = 1 << 20;
    let mut raw = varint(n);
    raw.extend(std::iter::repeat_n(0u8, n as usize));
    let body = forward_with_raw_tokens(&forward(), &raw);
    let (result, bytes) = peak_alloc(|| decode_request(&body));
    assert!(
        bytes < ALLOC_SLACK,
        "{bytes} bytes allocated for a {} byte frame",
        body.len()
    );
    assert!(
        matches!(result, Err(DecodeError::Malformed(_))),
        "{result:?}"
    );
    // The largest list allowed still decodes.
    let f = Forward {
        tokens: vec![1; MAX_POSITIONS],
        chunks: vec![1; MAX_POSITIONS],
        ..forward()
    };
    let body = encode(&Request::Forward(f.clone())).unwrap();
    assert_eq!(decode_request(&body), Ok(Request::Forward(f)));
}
