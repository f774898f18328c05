//! Well-formed calls that are wrong for this node (sessions, positions, models, vocabulary,
//! context), activations no honest stage sends, and floods. None of these is an offence: the
//! node answers each with a precise error or a result, and keeps serving.

use crate::support::*;
use futures::future::join_all;
use plexus_core::wire::{
    encode_frame, Activations, DType, ErrorCode, Forward, Request, Response, SessionId,
};
use plexus_core::Digest;
use plexus_model::LayerSpan;
use std::time::Instant;

#[track_caller]
fn token(resp: &Response) -> u32 {
    match resp {
        Response::Token { token, .. } => *token,
        other => panic!("expected a token, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_calls_get_precise_errors_and_leave_sessions_intact() {
    let reference = Reference::load();
    let node = start_node(None, |_| {}).await;
    let c = caller(&node).await;
    let f = |s: SessionId, position: u32, tokens: &[u32]| {
        forward(&node, &reference, s, position, tokens)
    };

    // A session never opened, continued.
    assert_error(
        &c.forward(f(session(1), 5, &[1, 2])).await,
        ErrorCode::UnknownSession,
    );

    // Open one and check the answer.
    let t1 = token(&c.forward(f(session(2), 0, &PROMPT)).await);
    assert_eq!(t1, reference.next_token(&PROMPT));
    let mut history = PROMPT.to_vec();
    history.push(t1);

    // Replayed or skipped positions are refused and leave the session as it was.
    for wrong in [3, 5, 7, 100, u32::MAX - 1] {
        assert_error(
            &c.forward(f(session(2), wrong, &[t1])).await,
            ErrorCode::PositionMismatch,
        );
    }

    // Another model, another span.
    for (model, start, end) in [
        (Digest::of(b"another model"), 0, 2),
        (node.model, 0, 1),
        (node.model, 1, 2),
        (node.model, 0, 3),
    ] {
        let wrong = Forward {
            model,
            start,
            end,
            ..f(session(2), 6, &[t1])
        };
        assert_error(&c.forward(wrong).await, ErrorCode::UnknownModel);
    }

    // Token ids outside the vocabulary.
    for id in [VOCAB, VOCAB + 1, u32::MAX] {
        assert_error(
            &c.forward(f(session(2), 6, &[1, id])).await,
            ErrorCode::BadRequest,
        );
    }

    // The first stage fed activations; the last stage without sampling parameters.
    let with_hidden = Forward {
        hidden: Some(Activations::encode(&[0.5; HIDDEN], 1, HIDDEN, DType::F32)),
        ..f(session(2), 6, &[t1])
    };
    assert_error(&c.forward(with_hidden).await, ErrorCode::BadRequest);
    let no_sampling = Forward {
        sampling: None,
        ..f(session(2), 6, &[t1])
    };
    assert_error(&c.forward(no_sampling).await, ErrorCode::BadRequest);

    // Another peer cannot see, continue or close this session.
    let other = caller(&node).await;
    assert_error(
        &other.forward(f(session(2), 6, &[t1])).await,
        ErrorCode::UnknownSession,
    );
    assert_eq!(
        other
            .call(Request::Close {
                session: session(2)
            })
            .await,
        Response::Closed
    );

    // After all that, the session continues exactly where it was.
    let t2 = token(&c.forward(f(session(2), 6, &[t1])).await);
    assert_eq!(t2, reference.next_token(&history));

    // Past the context (256): refused, and rolled back so the caller can go on.
    let long: Vec<u32> = (0..300).map(|i| (i * 7 % VOCAB as usize) as u32).collect();
    assert_error(
        &c.forward(f(session(3), 0, &long)).await,
        ErrorCode::ContextOverflow,
    );
    let chunked = Forward {
        chunks: vec![200, 100],
        ..f(session(3), 0, &long)
    };
    assert_error(&c.forward(chunked).await, ErrorCode::ContextOverflow);
    let t = token(&c.forward(f(session(4), 0, &long[..250])).await);
    assert_error(
        &c.forward(f(session(4), 250, &long[250..260])).await,
        ErrorCode::ContextOverflow,
    );
    let mut fed = long[..250].to_vec();
    fed.push(t);
    assert_eq!(
        token(&c.forward(f(session(4), 250, &[t])).await),
        reference.next_token(&fed)
    );

    // A prompt length past everything (the kernel choice is the caller's, for its own
    // session): only the positions computed take kernels from it, answered, and the session
    // goes on.
    let hostile = Forward {
        prompt_len: u32::MAX,
        ..f(session(5), 0, &PROMPT)
    };
    let t5 = token(&c.forward(hostile).await);
    assert!(t5 < VOCAB);
    let next = Forward {
        prompt_len: u32::MAX,
        ..f(session(5), PROMPT.len() as u32, &[t5])
    };
    assert!(token(&c.forward(next).await) < VOCAB);

    // Closed sessions are gone.
    assert_eq!(
        c.call(Request::Close {
            session: session(2)
        })
        .await,
        Response::Closed
    );
    assert_error(
        &c.forward(f(session(2), 7, &[t2])).await,
        ErrorCode::UnknownSession,
    );

    assert_serves(&[&node], &reference).await;
    node.stop().await;
}

/// Activations of the right length whose values or shape are nonsense.
fn odd_activations(n: usize) -> Vec<(&'static str, Activations, Option<ErrorCode>)> {
    let f32s = |v: f32| Activations::encode(&vec![v; n * HIDDEN], n, HIDDEN, DType::F32);
    let alternating: Vec<f32> = (0..n * HIDDEN)
        .map(|i| {
            if i % 2 == 0 {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mut i8_bogus = Activations::encode(&vec![0.25; n * HIDDEN], n, HIDDEN, DType::I8);
    for (row, scale) in [f32::NAN, f32::INFINITY, -1e38, 0.0, f32::MIN_POSITIVE, 3e38]
        .into_iter()
        .cycle()
        .take(n)
        .enumerate()
    {
        i8_bogus.data[row * 4..row * 4 + 4].copy_from_slice(&scale.to_le_bytes());
    }
    let mut i8_extreme = Activations::encode(&vec![1.0; n * HIDDEN], n, HIDDEN, DType::I8);
    i8_extreme.data[n * 4..].fill(0x80); // -128, outside the symmetric range
    let mut f16_nan = Activations::encode(&vec![0.0; n * HIDDEN], n, HIDDEN, DType::F16);
    for pair in f16_nan.data.chunks_exact_mut(2) {
        pair.copy_from_slice(&[0x00, 0x7e]);
    }
    vec![
        (
            "zero width",
            Activations {
                dtype: DType::F32,
                rows: n as u32,
                cols: 0,
                data: Vec::new(),
            },
            Some(ErrorCode::BadRequest),
        ),
        (
            "one column short",
            Activations::encode(&vec![0.1; n * (HIDDEN - 1)], n, HIDDEN - 1, DType::F16),
            Some(ErrorCode::BadRequest),
        ),
        (
            "the widest allowed",
            Activations::encode(
                &vec![0.0; n * plexus_core::wire::MAX_HIDDEN],
                n,
                plexus_core::wire::MAX_HIDDEN,
                DType::I8,
            ),
            Some(ErrorCode::BadRequest),
        ),
        ("all NaN", f32s(f32::NAN), None),
        ("largest finite", f32s(f32::MAX), None),
        ("smallest subnormal", f32s(f32::from_bits(1)), None),
        (
            "alternating infinities",
            Activations::encode(&alternating, n, HIDDEN, DType::F32),
            None,
        ),
        ("f16 NaN", f16_nan, None),
        ("int8 with NaN, infinite and huge scales", i8_bogus, None),
        ("int8 at -128", i8_extreme, None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_activations_are_refused_or_computed_and_never_break_a_stage() {
    let reference = Reference::load();
    let first = start_node(Some(LayerSpan::new(0, 1)), |_| {}).await;
    let last = start_node(Some(LayerSpan::new(1, 2)), |_| {}).await;
    let c = caller(&last).await;
    let want = reference.next_token(&PROMPT);
    let good = |s: u8| forward(&last, &reference, session(s), 0, &PROMPT);
    assert_eq!(token(&c.forward(good(1)).await), want);

    for (i, (what, hidden, expect)) in odd_activations(PROMPT.len()).into_iter().enumerate() {
        let s = session(10 + i as u8);
        let resp = c
            .forward(Forward {
                hidden: Some(hidden),
                ..good(10 + i as u8)
            })
            .await;
        match expect {
            Some(code) => assert!(
                matches!(&resp, Response::Error { code: c, .. } if *c == code),
                "{what}: {resp:?}"
            ),
            None => assert!(
                matches!(resp, Response::Token { token, .. } if token < VOCAB),
                "{what}: {resp:?}"
            ),
        }
        // The same session continues from whatever that left (nothing, or 6 positions), and
        // a fresh one still computes exactly.
        let held = if expect.is_some() {
            0
        } else {
            PROMPT.len() as u32
        };
        let next = c.forward(forward(&last, &reference, s, held, &[1])).await;
        assert!(matches!(next, Response::Token { .. }), "{what}: {next:?}");
        assert_eq!(token(&c.forward(good(1)).await), want, "after {what}");
    }

    // The first stage returns every dtype with the shape asked for.
    let cf = caller(&first).await;
    let exact = reference.hidden_after_first(&PROMPT);
    for dtype in [DType::F32, DType::F16, DType::I8] {
        for (chunks, all_rows, rows) in [
            (vec![], false, PROMPT.len()),
            (vec![2, 3, 1], false, 1),
            (vec![2, 3, 1], true, PROMPT.len()),
            (vec![1; PROMPT.len()], true, PROMPT.len()),
        ] {
            let f = Forward {
                reply_dtype: dtype,
                chunks: chunks.clone(),
                all_rows,
                ..forward(&first, &reference, session(1), 0, &PROMPT)
            };
            match cf.forward(f).await {
                Response::Hidden { hidden, .. } => {
                    hidden.validate().unwrap();
                    assert_eq!(
                        (hidden.dtype, hidden.rows as usize, hidden.cols as usize),
                        (dtype, rows, HIDDEN),
                        "{chunks:?} all_rows={all_rows}"
                    );
                    if dtype == DType::F32 && chunks.is_empty() {
                        assert_eq!(hidden.to_f32(), exact);
                    }
                }
                other => panic!("{dtype:?} {chunks:?}: {other:?}"),
            }
        }
    }
    assert_serves(&[&first, &last], &reference).await;
    first.stop().await;
    last.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_calls_is_answered_or_refused_and_never_hangs() {
    const FLOOD: usize = 500;
    let reference = Reference::load();
    let node = start_node(None, |c| c.engine.queue = 2).await;
    let want = reference.next_token(&PROMPT);
    let call = |i: usize| {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        forward(&node, &reference, SessionId(id), 0, &PROMPT)
    };

    // Raw: 500 streams at once from five peers, far past the node's 64 stream slots per
    // connection and its engine queue (cut to 2 here so the queue overflows for sure).
    let mut flooders = Vec::new();
    for _ in 0..5 {
        let mut p = RawPeer::new(1024);
        assert!(p.connect(&node.addr).await);
        flooders.push(p);
    }
    let started = Instant::now();
    let floods = flooders.into_iter().enumerate().map(|(k, mut p)| {
        let frames = (0..FLOOD / 5)
            .map(|i| RawFrame::new(encode_frame(&Request::Forward(call(k * FLOOD + i))).unwrap()))
            .collect();
        let peer = node.peer;
        tokio::spawn(async move { p.call_many(peer, frames).await })
    });
    let replies: Vec<RawReply> = join_all(floods)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    assert_eq!(replies.len(), FLOOD);
    let (mut served, mut busy, mut dropped) = (0, 0, 0);
    for r in &replies {
        match r.response() {
            Some(Ok(Response::Token { token, .. })) => {
                assert_eq!(token, want);
                served += 1;
            }
            Some(Ok(Response::Error {
                code: ErrorCode::Busy,
                ..
            })) => busy += 1,
            None => dropped += 1,
            other => panic!("unexpected answer to a flood call: {other:?}"),
        }
    }
    eprintln!(
        "raw flood of {FLOOD} from 5 peers: {served} served, {busy} busy, {dropped} refused, in {:?}",
        started.elapsed()
    );
    assert!(served > 0 && busy > 0, "{served} served, {busy} busy");

    // Through plexus_net: 500 concurrent calls from one peer (its own 64-stream limit
    // refuses the excess locally).
    let c = caller(&node).await;
    let started = Instant::now();
    let results = within(
        std::time::Duration::from_secs(30),
        "the flood resolves",
        join_all((0..FLOOD).map(|i| c.handle.call(c.node, Request::Forward(call(i))))),
    )
    .await;
    let (mut served, mut busy, mut failed) = (0, 0, 0);
    for r in results {
        match r.map(|r| r.into_parts().0) {
            Ok(Response::Token { token, .. }) => {
                assert_eq!(token, want);
                served += 1;
            }
            Ok(Response::Error {
                code: ErrorCode::Busy,
                ..
            }) => busy += 1,
            Err(_) => failed += 1,
            Ok(other) => panic!("unexpected answer to a flood call: {other:?}"),
        }
    }
    eprintln!(
        "net flood of {FLOOD}: {served} served, {busy} busy, {failed} failed, in {:?}",
        started.elapsed()
    );
    assert!(served > 0);

    assert_serves(&[&node], &reference).await;
    node.stop().await;
}

/// Regression (hostile input issue): the session table was shared least-recently-used, so one
/// peer opening `max_sessions` sessions evicted every other peer's generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_one_peer_opening_many_sessions_evicts_its_own_not_others() {
    let reference = Reference::load();
    let node = start_node(None, |c| c.engine.max_sessions = 16).await;
    let honest = caller(&node).await;
    let t1 = token(
        &honest
            .forward(forward(&node, &reference, session(1), 0, &PROMPT))
            .await,
    );
    let greedy = caller(&node).await;
    let mut held = Vec::new();
    for i in 0..100u32 {
        let mut id = [0xEE; 16];
        id[..4].copy_from_slice(&i.to_le_bytes());
        let resp = greedy
            .forward(forward(&node, &reference, SessionId(id), 0, &PROMPT))
            .await;
        token(&resp);
        held.push(SessionId(id));
    }
    // The honest session survived the flood of sessions and continues exactly.
    let mut history = PROMPT.to_vec();
    history.push(t1);
    let t2 = token(
        &honest
            .forward(forward(&node, &reference, session(1), 6, &[t1]))
            .await,
    );
    assert_eq!(t2, reference.next_token(&history));
    // The greedy peer kept its most recent sessions and lost its oldest.
    let last = *held.last().unwrap();
    token(
        &greedy
            .forward(forward(&node, &reference, last, 6, &[t1]))
            .await,
    );
    assert_error(
        &greedy
            .forward(forward(&node, &reference, held[0], 6, &[t1]))
            .await,
        ErrorCode::UnknownSession,
    );
    node.stop().await;
}
