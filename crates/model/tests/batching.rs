//! Batched cached forward passes on the real SmolLM2-135M-Instruct: several sequences run
//! through `Stage::forward_many` together give each sequence exactly (bit for bit) the logits
//! and hidden states it gets alone, and a prompt prefilled in any split into chunks gives
//! exactly what one-shot prefill gives (issue 8).

#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_model::layers::Mode;
use plexus_model::stage::BatchItem;
use plexus_model::{KvCache, LayerSpan, Logits, ModelFiles, Stage, StageInput, StageOutput};
use std::sync::OnceLock;

fn files() -> &'static ModelFiles {
    static F: OnceLock<ModelFiles> = OnceLock::new();
    F.get_or_init(|| {
        let p = plexus_testkit::real_model();
        assert!(p.exists(), "{} is missing", p.display());
        ModelFiles::open(&p).unwrap()
    })
}

fn whole() -> &'static Stage {
    static S: OnceLock<Stage> = OnceLock::new();
    S.get_or_init(|| files().stage(None, Mode::Infer).unwrap())
}

/// splitmix64: the seeded source of the random mixes (the seed is in every failure message).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| 1 + self.below(40_000) as u32).collect()
    }
}

fn bits(t: &StageOutput) -> Vec<u32> {
    let t = match t {
        StageOutput::Hidden(t) | StageOutput::Logits(t) => t,
    };
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// One sequence alone: `calls` consecutive forward calls, the output of each, with `prompt`
/// declared as its prompt's positions (they pick each position's attention kernel).
fn solo_declared(
    stage: &Stage,
    calls: &[Vec<u32>],
    logits: Logits,
    prompt: std::ops::Range<usize>,
) -> Vec<Vec<u32>> {
    let mut cache = stage.new_cache();
    cache.set_prompt(prompt);
    calls
        .iter()
        .map(|c| {
            bits(
                &stage
                    .forward(StageInput::Tokens(c), &mut cache, logits)
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn chunked_prefill_is_bit_identical_to_one_shot_issue_8() {
    let stage = whole();
    let mut rng = Rng(8);
    // Longer than llama.cpp's 64-token switch, than one kernel tile, and than the 256
    // positions from which a row alone in its ubatch takes the split-KV path.
    let prompt = rng.tokens(300);
    // The kernel is chosen per position from the declared prompt (llama.cpp's tiled one for
    // the whole 300-token prompt; none declared: every position a decode step, one-chunk and
    // then split-KV from 256; a 64-row prompt fed at 64, tiled there), never from where the
    // calls cut.
    let mut outputs = Vec::new();
    for declared in [0..0, 0..300, 64..128] {
        let one_shot = solo_declared(
            stage,
            std::slice::from_ref(&prompt),
            Logits::All,
            declared.clone(),
        )
        .remove(0);
        for cuts in [
            vec![1],
            vec![7, 50, 51],
            vec![63, 64, 65],
            vec![255, 256, 257, 299],
        ] {
            let mut calls = Vec::new();
            let mut at = 0;
            for &c in &cuts {
                calls.push(prompt[at..c].to_vec());
                at = c;
            }
            calls.push(prompt[at..].to_vec());
            let chunked: Vec<u32> =
                solo_declared(stage, &calls, Logits::All, declared.clone()).concat();
            assert_eq!(
                chunked, one_shot,
                "declared {declared:?}, prefill cut at {cuts:?}"
            );
        }
        outputs.push(one_shot);
    }
    // And the kernels differ: the test compares something.
    assert_ne!(outputs[0], outputs[1]);
    assert_ne!(outputs[1], outputs[2]);
}

/// Decode steps over 500 positions (their heads split across the threads), in a batch beside
/// a prefill chunk or alone, give the same bits whatever the thread count.
#[test]
fn decode_over_many_keys_is_bit_identical_at_any_thread_count_issue_8() {
    let stage = whole();
    let mut rng = Rng(500);
    let prompt = rng.tokens(500);
    let other = rng.tokens(40);
    let run = |threads: usize| -> Vec<Vec<u32>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut a = stage.new_cache();
            a.set_prompt(0..prompt.len());
            stage
                .forward(StageInput::Tokens(&prompt), &mut a, Logits::Last)
                .unwrap();
            let mut outs = Vec::new();
            for t in [5u32, 6, 7] {
                outs.push(bits(
                    &stage
                        .forward(StageInput::Tokens(&[t]), &mut a, Logits::Last)
                        .unwrap(),
                ));
            }
            // Beside a prefill chunk of another sequence, in one batch.
            let mut b = stage.new_cache();
            b.set_prompt(0..other.len());
            let got = stage
                .forward_many(&mut [
                    BatchItem {
                        input: StageInput::Tokens(&[8]),
                        cache: &mut a,
                        logits: Some(Logits::Last),
                    },
                    BatchItem {
                        input: StageInput::Tokens(&other),
                        cache: &mut b,
                        logits: Some(Logits::Last),
                    },
                ])
                .unwrap();
            outs.extend(got.iter().map(bits));
            outs
        })
    };
    let want = run(1);
    for threads in [2, 3, 7] {
        assert_eq!(run(threads), want, "{threads} threads");
    }
}

/// Random mixes: sequences with different prompt lengths, some decoding, some prefilling, in
/// batches of 1 to 6; each item's output equals the solo run of the same calls.
#[test]
fn batched_sequences_equal_their_solo_runs_issue_8() {
    let stage = whole();
    for seed in 0..4u64 {
        let mut rng = Rng(seed);
        let n = 1 + rng.below(6);
        // Each sequence: a prompt, then a few single-token decode calls (or another chunk).
        let plans: Vec<Vec<Vec<u32>>> = (0..n)
            .map(|_| {
                let first = 1 + rng.below(70);
                let mut calls = vec![rng.tokens(first)];
                for _ in 0..1 + rng.below(3) {
                    let len = if rng.below(4) == 0 {
                        1 + rng.below(20)
                    } else {
                        1
                    };
                    calls.push(rng.tokens(len));
                }
                calls
            })
            .collect();
        let kinds: Vec<Logits> = (0..n)
            .map(|_| {
                if rng.below(3) == 0 {
                    Logits::All
                } else {
                    Logits::Last
                }
            })
            .collect();
        let want: Vec<Vec<Vec<u32>>> = plans
            .iter()
            .zip(&kinds)
            .map(|(p, &k)| solo_declared(stage, p, k, 0..p[0].len()))
            .collect();
        // Batched: at each step, every sequence with calls left (and that has "joined": a
        // random start step) contributes its next call. Prompts of 64 tokens or more take the
        // tiled kernel, in the same batches as the others.
        let joins: Vec<usize> = (0..n).map(|_| rng.below(3)).collect();
        let mut caches: Vec<KvCache> = plans
            .iter()
            .map(|p| {
                let mut c = stage.new_cache();
                c.set_prompt(0..p[0].len());
                c
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut got: Vec<Vec<Vec<u32>>> = vec![Vec::new(); n];
        for step in 0.. {
            let active: Vec<usize> = (0..n)
                .filter(|&i| joins[i] <= step && next[i] < plans[i].len())
                .collect();
            if active.is_empty() && next.iter().zip(&plans).all(|(&a, p)| a == p.len()) {
                break;
            }
            if active.is_empty() {
                continue;
            }
            let mut items: Vec<BatchItem> = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                if active.contains(&i) {
                    items.push(BatchItem {
                        input: StageInput::Tokens(&plans[i][next[i]]),
                        cache,
                        logits: Some(kinds[i]),
                    });
                }
            }
            let outs = stage.forward_many(&mut items).unwrap();
            for (&i, out) in active.iter().zip(&outs) {
                got[i].push(bits(out));
                next[i] += 1;
            }
        }
        for i in 0..n {
            assert_eq!(got[i], want[i], "seed {seed}: sequence {i} of {n}");
        }
    }
}

/// A split model: hidden states in and out of a middle stage, batched, equal the solo run.
#[test]
fn batched_hidden_states_equal_solo_through_split_stages_issue_8() {
    let first = files()
        .stage(Some(LayerSpan::new(0, 12)), Mode::Infer)
        .unwrap();
    let second = files()
        .stage(Some(LayerSpan::new(12, 30)), Mode::Infer)
        .unwrap();
    let mut rng = Rng(42);
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| rng.tokens(3 + 9 * i)).collect();
    let hidden = |p: &[u32]| match first
        .forward(StageInput::Tokens(p), &mut first.new_cache(), Logits::Last)
        .unwrap()
    {
        StageOutput::Hidden(h) => h,
        other => panic!("{other:?}"),
    };
    let hs: Vec<_> = prompts.iter().map(|p| hidden(p)).collect();
    let want: Vec<Vec<u32>> = hs
        .iter()
        .map(|h| {
            bits(
                &second
                    .forward(
                        StageInput::Hidden(h.clone()),
                        &mut second.new_cache(),
                        Logits::Last,
                    )
                    .unwrap(),
            )
        })
        .collect();
    let mut caches: Vec<KvCache> = (0..4).map(|_| second.new_cache()).collect();
    let mut items: Vec<BatchItem> = caches
        .iter_mut()
        .zip(&hs)
        .map(|(cache, h)| BatchItem {
            input: StageInput::Hidden(h.clone()),
            cache,
            logits: Some(Logits::Last),
        })
        .collect();
    let got: Vec<Vec<u32>> = second
        .forward_many(&mut items)
        .unwrap()
        .iter()
        .map(bits)
        .collect();
    assert_eq!(got, want);
}

#[test]
fn a_bad_item_fails_the_batch_without_touching_any_cache() {
    let stage = whole();
    let (mut a, mut b) = (stage.new_cache(), stage.new_cache());
    let mut items = vec![
        BatchItem {
            input: StageInput::Tokens(&[1, 2, 3]),
            cache: &mut a,
            logits: Some(Logits::Last),
        },
        BatchItem {
            input: StageInput::Tokens(&[u32::MAX]),
            cache: &mut b,
            logits: Some(Logits::Last),
        },
    ];
    assert!(stage.forward_many(&mut items).is_err());
    drop(items);
    assert_eq!((a.len(), b.len()), (0, 0));
}

mod engine {
    //! The batching engine ([`plexus_model::serve`]): generations run together, joining and
    //! leaving at random times with different prompts and sampling params, each give the
    //! tokens (and log-probabilities) of their solo run.

    use super::Rng;
    use plexus_model::constraint::{Constraint, ConstraintError, Grammar, Guided};
    use plexus_model::generate::{
        generate, generate_with, Completion, Flow, GenerateRequest, LocalChain,
    };
    use plexus_model::serve::{BatchHandle, OpenError, ServeConfig};
    use plexus_model::{LoadedModel, SamplingParams};
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    fn model() -> &'static LoadedModel {
        static M: OnceLock<LoadedModel> = OnceLock::new();
        M.get_or_init(|| {
            let p = plexus_testkit::real_model();
            plexus_model::load(&p).unwrap()
        })
    }

    fn engine(config: ServeConfig) -> BatchHandle {
        let m = model();
        BatchHandle::start(
            Arc::new(m.stage.clone()),
            m.tokenizer.eos_ids().iter().copied().collect(),
            config,
        )
    }

    fn request(rng: &mut Rng) -> GenerateRequest {
        let m = model();
        let words = [
            "the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far",
        ];
        // Up to 90 words: prompts on both sides of llama.cpp's 64-row switch to its tiled
        // attention kernel.
        let n = 1 + rng.below(90);
        let text: Vec<&str> = (0..n).map(|_| words[rng.below(words.len())]).collect();
        let mut sampling = SamplingParams::default();
        match rng.below(3) {
            0 => {} // greedy
            1 => {
                sampling.temperature = 0.8;
                sampling.top_p = 0.9;
                sampling.seed = rng.next();
            }
            _ => {
                sampling.temperature = 1.2;
                sampling.top_k = 40;
                sampling.repetition_penalty = 1.1;
                sampling.seed = rng.next();
                sampling.logprobs = Some(2);
            }
        }
        GenerateRequest {
            prompt_tokens: m.tokenizer.encode(&text.join(" "), false).unwrap(),
            max_tokens: 1 + rng.below(24),
            sampling,
            stop: Vec::new(),
        }
    }

    fn solo(req: &GenerateRequest) -> Completion {
        let m = model();
        generate(std::slice::from_ref(&m.stage), &m.tokenizer, req, |_| {
            Flow::Continue
        })
        .unwrap()
    }

    /// Every request on its own thread, all at once; the completions in request order.
    fn all_at_once(h: &BatchHandle, reqs: &[GenerateRequest]) -> Vec<Completion> {
        std::thread::scope(|s| {
            let joins: Vec<_> = reqs
                .iter()
                .map(|r| {
                    let h = h.clone();
                    s.spawn(move || batched(&h, r))
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        })
    }

    fn batched(h: &BatchHandle, req: &GenerateRequest) -> Completion {
        let m = model();
        let mut s = h
            .open(&req.prompt_tokens, &req.sampling, req.max_tokens)
            .unwrap();
        generate_with(&mut s, &m.tokenizer, req, |_| Flow::Continue).unwrap()
    }

    #[test]
    fn concurrent_generations_equal_their_solo_runs_issue_8() {
        // A small step budget so prompts are cut into chunks mixed with decodes.
        let h = engine(ServeConfig {
            step_positions: 24,
            ..ServeConfig::default()
        });
        for seed in [1u64, 2, 3] {
            let mut rng = Rng(seed);
            let reqs: Vec<(u64, GenerateRequest)> = (0..6)
                .map(|_| (rng.below(40) as u64, request(&mut rng)))
                .collect();
            let want: Vec<Completion> = reqs.iter().map(|(_, r)| solo(r)).collect();
            let got: Vec<Completion> = std::thread::scope(|s| {
                let joins: Vec<_> = reqs
                    .iter()
                    .map(|(delay, r)| {
                        let h = h.clone();
                        s.spawn(move || {
                            std::thread::sleep(Duration::from_millis(*delay));
                            batched(&h, r)
                        })
                    })
                    .collect();
                joins.into_iter().map(|j| j.join().unwrap()).collect()
            });
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.tokens, w.tokens, "seed {seed}, generation {i}");
                assert_eq!(g.text, w.text, "seed {seed}, generation {i}");
                assert_eq!(g.finish, w.finish, "seed {seed}, generation {i}");
                assert_eq!(g.logprobs, w.logprobs, "seed {seed}, generation {i}");
            }
            // The engine drops a finished sequence (and its reservation) right after sending
            // its last token, which the caller may read first.
            let started = std::time::Instant::now();
            while h.running_kv_bytes() != 0 {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "still reserved"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    #[test]
    fn a_cancelled_generation_leaves_and_the_others_finish_issue_8() {
        let h = engine(ServeConfig::default());
        let mut rng = Rng(77);
        let mut keep = request(&mut rng);
        keep.max_tokens = 20;
        let want = solo(&keep);
        let m = model();
        std::thread::scope(|s| {
            let quitter = s.spawn(|| {
                let mut r = request(&mut Rng(5));
                r.max_tokens = 500;
                let mut st = h.open(&r.prompt_tokens, &r.sampling, r.max_tokens).unwrap();
                let mut pieces = 0;
                let c = generate_with(&mut st, &m.tokenizer, &r, |_| {
                    pieces += 1;
                    if pieces == 3 {
                        Flow::Stop
                    } else {
                        Flow::Continue
                    }
                })
                .unwrap();
                c.finish
            });
            let got = batched(&h, &keep);
            assert_eq!(got.tokens, want.tokens);
            assert_eq!(
                quitter.join().unwrap(),
                plexus_model::generate::FinishReason::Cancelled
            );
        });
        // The cancelled sequence's reservation goes once the engine notices.
        let started = std::time::Instant::now();
        while h.running_kv_bytes() != 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "still reserved"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_generation_that_does_not_fit_the_kv_budget_is_refused_issue_8() {
        let bpp = model().stage.kv_bytes_per_position();
        let h = engine(ServeConfig {
            kv_budget: 100 * bpp,
            ..ServeConfig::default()
        });
        let p = SamplingParams::default();
        let running = h.open(&[1, 2, 3], &p, 60).unwrap();
        let err = h.open(&[1, 2, 3], &p, 60).err().unwrap();
        assert!(matches!(err, OpenError::Budget(_)), "{err}");
        assert!(err.to_string().contains("KV cache budget"), "{err}");
        drop(running);
    }

    /// Issue 9: the `n` choices of one request, opened together as the local backend opens
    /// them, prefill the prompt once (the others copy all but its last position from the
    /// first) and each still gives the tokens and log-probabilities of its solo run with its
    /// own seed. Without the prefix cache (a stage that is not split-invariant) nothing is
    /// shared.
    #[test]
    fn choices_of_one_prompt_share_its_rows_and_keep_their_solo_tokens_issue_9() {
        let m = model();
        let mut base = request(&mut Rng(9));
        base.prompt_tokens = m
            .tokenizer
            .encode(
                &"Tell me a short story about a lighthouse keeper. ".repeat(3),
                false,
            )
            .unwrap();
        base.max_tokens = 12;
        base.sampling.temperature = 1.0;
        base.sampling.logprobs = Some(2);
        let reqs: Vec<GenerateRequest> = (0..4u32)
            .map(|i| {
                let mut r = base.clone();
                r.sampling.seed = plexus_model::generate::choice_seed(7, i);
                r
            })
            .collect();
        let want: Vec<Completion> = reqs.iter().map(solo).collect();
        assert!(
            want.windows(2).any(|w| w[0].tokens != w[1].tokens),
            "the seeds should give different choices"
        );
        let prompt = base.prompt_tokens.len() as u64;
        for entries in [16, 0] {
            let h = engine(ServeConfig {
                step_positions: 16,
                prefix_entries: entries,
                ..ServeConfig::default()
            });
            let mut streams: Vec<_> = reqs
                .iter()
                .map(|r| h.open(&r.prompt_tokens, &r.sampling, r.max_tokens).unwrap())
                .collect();
            for (i, (st, (r, w))) in streams.iter_mut().zip(reqs.iter().zip(&want)).enumerate() {
                let g = generate_with(st, &m.tokenizer, r, |_| Flow::Continue).unwrap();
                assert_eq!(g.tokens, w.tokens, "prefix entries {entries}, choice {i}");
                assert_eq!(
                    g.logprobs, w.logprobs,
                    "prefix entries {entries}, choice {i}"
                );
            }
            let shared = h.shared_prompt_positions();
            if entries == 0 {
                assert_eq!(shared, 0);
            } else {
                assert_eq!(shared, 3 * (prompt - 1), "positions copied from choice 0");
            }
        }
    }

    /// Issue 8: the prefix cache on and off gives every generation its solo tokens, text,
    /// finish and log-probabilities, and on it does reuse positions: chats sharing a system
    /// prompt, a multi-turn chat resent with its reply and one more message, the same prompt
    /// twice, and a generation cancelled after its first token whose rows are reused.
    /// Sequential and concurrent.
    #[test]
    fn the_prefix_cache_on_and_off_gives_the_solo_tokens_issue_8() {
        let m = model();
        let system = "You are a helpful assistant who answers briefly and kindly. ".repeat(4);
        let mut rng = Rng(31);
        let mut reqs: Vec<GenerateRequest> = Vec::new();
        for i in 0..5 {
            let mut r = request(&mut rng);
            let user = m.tokenizer.decode(&r.prompt_tokens).unwrap();
            r.prompt_tokens = m
                .tokenizer
                .encode(&format!("{system}Question {i}: {user}"), false)
                .unwrap();
            reqs.push(r);
        }
        // A resent conversation: the first prompt, its reply, one more message.
        let first = solo(&reqs[0]);
        let mut turn = reqs[0].clone();
        turn.prompt_tokens.extend(&first.tokens);
        turn.prompt_tokens
            .extend(m.tokenizer.encode(" And then?", false).unwrap());
        reqs.push(turn);
        reqs.push(reqs[1].clone());
        // A short conversation (under llama.cpp's 64-row switch) resent past it: the first
        // turn's rows took the one-chunk kernel, the resent prompt's take the tiled one, so
        // none of them may be reused.
        let mut short = request(&mut rng);
        short.prompt_tokens = m.tokenizer.encode("Tell me a story.", false).unwrap();
        short.max_tokens = 8;
        // Log-probabilities show the last bit of a logit: the kernels' rounding differences
        // rarely change a greedy token.
        short.sampling = SamplingParams::greedy();
        short.sampling.logprobs = Some(5);
        let reply = solo(&short);
        let mut resent = short.clone();
        resent.prompt_tokens.extend(&reply.tokens);
        resent.prompt_tokens.extend(
            m.tokenizer
                .encode(&" Go on, please.".repeat(12), false)
                .unwrap(),
        );
        assert!(short.prompt_tokens.len() + reply.tokens.len() < 64);
        assert!(resent.prompt_tokens.len() >= 64);
        reqs.push(short);
        reqs.push(resent);
        let want: Vec<Completion> = reqs.iter().map(solo).collect();
        for entries in [0, 16] {
            let h = engine(ServeConfig {
                step_positions: 24,
                prefix_entries: entries,
                ..ServeConfig::default()
            });
            // A generation stopped after its first piece leaves its rows behind too.
            let mut quit = reqs[2].clone();
            quit.max_tokens = 50;
            let mut st = h.open(&quit.prompt_tokens, &quit.sampling, 50).unwrap();
            generate_with(&mut st, &m.tokenizer, &quit, |_| Flow::Stop).unwrap();
            drop(st);
            for (i, (r, w)) in reqs.iter().zip(&want).enumerate() {
                let g = batched(&h, r);
                assert_eq!(g.tokens, w.tokens, "prefix entries {entries}, request {i}");
                assert_eq!(g.text, w.text, "prefix entries {entries}, request {i}");
                assert_eq!(g.finish, w.finish, "prefix entries {entries}, request {i}");
                assert_eq!(
                    g.logprobs, w.logprobs,
                    "prefix entries {entries}, request {i}"
                );
            }
            let got = all_at_once(&h, &reqs);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.tokens, w.tokens,
                    "concurrent, entries {entries}, request {i}"
                );
                assert_eq!(
                    g.logprobs, w.logprobs,
                    "concurrent, entries {entries}, request {i}"
                );
            }
            let reused = h.prefix_reused_positions();
            if entries == 0 {
                assert_eq!(reused, 0);
            } else {
                // At least the system prompt of every sequential request after the first.
                let shared = m.tokenizer.encode(&system, false).unwrap().len() as u64;
                assert!(reused >= 6 * (shared - 2), "{reused} positions reused");
                // (The resent short conversation reused nothing: its tokens would have
                // agreed, its kernels did not; the test above checks its tokens.)
            }
        }
    }

    /// Past position 256 a decode step takes llama.cpp's split-KV path, and a prompt of 513
    /// tokens ends in a ubatch of one row that takes it too: through the batching engine
    /// (prompts cut into steps, prefix reuse of a prompt sent twice, generations side by side)
    /// every generation still gets its solo tokens and log-probabilities.
    #[test]
    fn generations_past_position_256_equal_their_solo_runs_issue_8() {
        let m = model();
        let text =
            "The keeper climbed the steps at dusk and lit the lamp above the sea. ".repeat(40);
        let all = m.tokenizer.encode(&text, false).unwrap();
        let mut reqs = Vec::new();
        for (len, max_tokens, temperature) in [
            (250, 30, 0.0),
            (250, 30, 0.0),
            (300, 12, 0.9),
            (513, 8, 0.0),
        ] {
            let mut sampling = SamplingParams::greedy();
            sampling.temperature = temperature;
            sampling.seed = len as u64;
            sampling.logprobs = Some(3);
            reqs.push(GenerateRequest {
                prompt_tokens: all[..len].to_vec(),
                max_tokens,
                sampling,
                stop: Vec::new(),
            });
        }
        let want: Vec<Completion> = reqs.iter().map(solo).collect();
        assert!(
            want[0].tokens.len() > 6,
            "the first generation stopped before position 256"
        );
        let h = engine(ServeConfig {
            step_positions: 96,
            prefix_entries: 8,
            ..ServeConfig::default()
        });
        for (i, (r, w)) in reqs.iter().zip(&want).enumerate() {
            let g = batched(&h, r);
            assert_eq!(g.tokens, w.tokens, "request {i}");
            assert_eq!(g.logprobs, w.logprobs, "request {i}");
        }
        assert!(
            h.prefix_reused_positions() >= 249,
            "the repeated prompt was not reused"
        );
        let got = all_at_once(&h, &reqs);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "concurrent, request {i}");
            assert_eq!(g.logprobs, w.logprobs, "concurrent, request {i}");
        }
    }

    /// Issue 8: what the prefix cache holds never refuses a generation: a budget for one
    /// generation, kept by a finished one in the cache, is given back to the next.
    #[test]
    fn the_prefix_cache_gives_its_budget_back_to_new_generations_issue_8() {
        let bpp = model().stage.kv_bytes_per_position();
        let h = engine(ServeConfig {
            kv_budget: 100 * bpp,
            ..ServeConfig::default()
        });
        let mut rng = Rng(3);
        for _ in 0..3 {
            let mut r = request(&mut rng);
            r.prompt_tokens.truncate(30);
            r.max_tokens = 100 - r.prompt_tokens.len();
            // The last generation leaves the engine just after its last token is read.
            let started = std::time::Instant::now();
            while h.running_kv_bytes() != 0 {
                assert!(started.elapsed() < Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(batched(&h, &r).tokens, solo(&r).tokens);
        }
        assert!(h.budget().used() <= 100 * bpp);
    }

    /// A grammar over token ids: any of `allowed` for `len` tokens, then end of sequence.
    struct Only {
        allowed: Vec<u32>,
        len: usize,
        eos: u32,
        vocab: usize,
    }

    #[derive(Clone)]
    struct OnlyState {
        g: Arc<Only>,
        at: usize,
    }

    struct Shared(Arc<Only>);

    impl Grammar for Shared {
        fn start(&self) -> Box<dyn Constraint> {
            Box::new(OnlyState {
                g: Arc::clone(&self.0),
                at: 0,
            })
        }
    }

    impl Constraint for OnlyState {
        fn mask(&mut self) -> Result<Vec<u32>, ConstraintError> {
            let mut m = vec![0u32; self.g.vocab.div_ceil(32)];
            let ids = if self.at < self.g.len {
                self.g.allowed.clone()
            } else {
                vec![self.g.eos]
            };
            for t in ids {
                m[t as usize / 32] |= 1 << (t % 32);
            }
            Ok(m)
        }

        fn advance(&mut self, _token: u32) -> Result<(), ConstraintError> {
            self.at += 1;
            Ok(())
        }
    }

    #[test]
    fn grammar_masks_apply_in_the_batch_as_alone() {
        let m = model();
        let h = engine(ServeConfig {
            step_positions: 24,
            ..ServeConfig::default()
        });
        let g = Arc::new(Shared(Arc::new(Only {
            allowed: (1000..1040).collect(),
            len: 12,
            eos: m.tokenizer.eos_ids()[0],
            vocab: m.tokenizer.vocab_size(),
        })));
        let mut rng = Rng(11);
        let reqs: Vec<GenerateRequest> = (0..4)
            .map(|_| {
                let mut r = request(&mut rng);
                r.max_tokens = 40;
                r
            })
            .collect();
        let want: Vec<Completion> = reqs
            .iter()
            .map(|r| {
                let chain = LocalChain::new(std::slice::from_ref(&m.stage), r.sampling.clone());
                let mut guided = Guided::new(chain, g.start());
                generate_with(&mut guided, &m.tokenizer, r, |_| Flow::Continue).unwrap()
            })
            .collect();
        let got: Vec<Completion> = std::thread::scope(|s| {
            let joins: Vec<_> = reqs
                .iter()
                .map(|r| {
                    let (h, g) = (h.clone(), Arc::clone(&g));
                    s.spawn(move || {
                        let mut st = h
                            .open_guided(
                                &r.prompt_tokens,
                                &r.sampling,
                                r.max_tokens,
                                Some(g.start()),
                            )
                            .unwrap();
                        generate_with(&mut st, &m.tokenizer, r, |_| Flow::Continue).unwrap()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "generation {i}");
            assert_eq!(g.logprobs, w.logprobs, "generation {i}");
            // Exactly the grammar's 12 tokens from the allowed set, then end of sequence.
            assert_eq!(g.tokens.len(), 12, "generation {i}: {:?}", g.tokens);
            assert!(
                g.tokens.iter().all(|t| (1000..1040).contains(t)),
                "{:?}",
                g.tokens
            );
            assert_eq!(g.finish, plexus_model::generate::FinishReason::Stop);
        }
    }
}
