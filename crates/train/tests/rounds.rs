//! Rounds without processes: refusal of bad contributions, Gauntlet scoring, agreement of
//! independent machines, adaptive deadline with a crashed worker, re-execution of a round from
//! its commitment, and a small DiLoCo run that must learn its task.

#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_core::Digest;
use plexus_model::train::task::Task;
use plexus_model::train::{AdamWConfig, InnerConfig, Params, TaskShard};
use plexus_model::ModelConfig;
use plexus_train::audit::{check_start, reexecute, AuditError, Before, StartCheck, Verdict};
use plexus_train::commit::{Contribution, Signed};
use plexus_train::deadline::DeadlinePolicy;
use plexus_train::local::{prepare, run_diloco, worker_key, TaskSetup};
use plexus_train::outer::OuterState;
use plexus_train::round::{GlobalState, Refusal, RoundMachine};
use plexus_train::score::HeldOutScorer;
use plexus_train::worker::{fresh_digests, work_round, WorkerState};
use plexus_train::{Codec, OuterConfig, RoundConfig, ScorePolicy};
use std::sync::Arc;

fn setup() -> TaskSetup {
    TaskSetup {
        task: Task::Reverse { len: 3 },
        hidden: 32,
        layers: 1,
        init_seed: 1,
        eval_examples: 64,
    }
}

fn config(codec: Codec, error_feedback: bool) -> RoundConfig {
    RoundConfig {
        run: Digest::of(b"test run"),
        seed: 11,
        inner_steps: 3,
        batch_size: 8,
        inner: InnerConfig {
            lr: 3e-3,
            warmup: 2,
            min_lr_ratio: 0.1,
            schedule_steps: 60,
            clip: 1.0,
            adamw: AdamWConfig::default(),
        },
        codec,
        error_feedback,
        outer: OuterConfig::default(),
        deadline: DeadlinePolicy {
            initial_ms: 10_000,
            min_ms: 100,
            slack: 0.25,
            ..DeadlinePolicy::default()
        },
        score: ScorePolicy {
            examples: 32,
            tolerance: 0.0,
        },
        max_workers: 64,
    }
}

struct World {
    cfg: RoundConfig,
    model: Arc<ModelConfig>,
    shard: Arc<TaskShard>,
    global: GlobalState,
    keys: Vec<plexus_core::keys::NodeKey>,
    states: Vec<WorkerState>,
}

fn world(cfg: RoundConfig, workers: usize) -> World {
    let (model, shard, params) = prepare(&setup(), cfg.seed).unwrap();
    let n = params.values.len();
    World {
        global: GlobalState {
            round: 0,
            params,
            outer: OuterState::new(n),
        },
        keys: (0..workers).map(|i| worker_key(99, i)).collect(),
        states: (0..workers).map(|_| WorkerState::new(n)).collect(),
        cfg,
        model,
        shard,
    }
}

impl World {
    fn machine(&self) -> RoundMachine {
        let ids = self.keys.iter().map(|k| k.peer_id().to_bytes());
        RoundMachine::new(self.cfg.clone(), self.global.clone(), ids, 0)
    }

    fn scorer(&self) -> HeldOutScorer {
        HeldOutScorer {
            model: self.model.clone(),
            shard: self.shard.clone(),
            seed: self.cfg.seed,
            examples: self.cfg.score.examples,
        }
    }

    fn contribute(&mut self, i: usize, round: u64, start: &Params) -> Contribution {
        let (c, _) = work_round(
            &self.cfg,
            &self.model,
            self.shard.as_ref(),
            &self.keys[i],
            round,
            start,
            &mut self.states[i],
        )
        .unwrap();
        c
    }
}

#[test]
fn forged_stale_replayed_and_wrong_round_contributions_are_refused() {
    let mut w = world(config(Codec::F32, false), 3);
    let mut m = w.machine();
    let start = w.global.params.clone();
    let c0 = w.contribute(0, 0, &start);
    let c1 = w.contribute(1, 0, &start);
    let late = w.contribute(2, 0, &start);

    // Altered after signing.
    let mut altered = c0.clone();
    altered.signed.commitment.payload_len += 1;
    assert!(matches!(m.offer(&altered, 1), Err(Refusal::Forged(_))));
    // Re-signed by someone else in the victim's name.
    let mut stolen = c0.clone();
    stolen.signed = Signed::sign(&w.keys[1], c0.signed.commitment.clone());
    assert!(matches!(m.offer(&stolen, 1), Err(Refusal::Forged(_))));
    // Payload swapped (garbage) under an honest commitment.
    let mut garbage = c0.clone();
    let mut bytes = garbage.payload.to_vec();
    bytes[100] ^= 0xff;
    garbage.payload = bytes.into();
    assert_eq!(m.offer(&garbage, 1), Err(Refusal::PayloadDigest));
    // Garbage that the worker signed itself: digest matches, but it does not decode.
    let mut cm = c0.signed.commitment.clone();
    let junk = vec![7u8; 64];
    cm.payload = Digest::of(&junk);
    cm.payload_len = 64;
    let signed_junk = Contribution {
        signed: Signed::sign(&w.keys[0], cm),
        payload: junk.into(),
    };
    assert!(matches!(m.offer(&signed_junk, 1), Err(Refusal::Payload(_))));
    // Wrong round, wrong run, wrong start weights, honestly signed.
    let resign = |f: &dyn Fn(&mut plexus_train::commit::Commitment)| {
        let mut cm = c0.signed.commitment.clone();
        f(&mut cm);
        Contribution {
            signed: Signed::sign(&w.keys[0], cm),
            payload: c0.payload.clone(),
        }
    };
    let future = resign(&|c| {
        c.round = 1;
        c.first_step = 3;
    });
    assert!(matches!(m.offer(&future, 1), Err(Refusal::Future { .. })));
    assert_eq!(
        m.offer(&resign(&|c| c.run = Digest::of(b"other")), 1),
        Err(Refusal::WrongRun)
    );
    assert_eq!(
        m.offer(&resign(&|c| c.start_weights = Digest::of(b"x")), 1),
        Err(Refusal::WrongStart)
    );
    assert_eq!(
        m.offer(&resign(&|c| c.inner_steps = 1), 1),
        Err(Refusal::WrongSettings)
    );

    m.offer(&c0, 5).unwrap();
    assert_eq!(m.offer(&c0, 6), Err(Refusal::Replayed));
    assert_eq!(m.offer(&signed_junk, 6), Err(Refusal::Equivocation));
    m.offer(&c1, 7).unwrap();
    assert!(
        !m.should_close(8),
        "worker 2 is expected and the deadline is far"
    );
    // Worker 2 is slow: the round closes at its deadline without it.
    let deadline = m.deadline_at();
    assert_eq!(deadline, 10_000);
    assert!(m.should_close(deadline));
    assert!(matches!(
        m.offer(&late, deadline),
        Err(Refusal::PastDeadline { .. })
    ));
    let out = m.close(deadline, &mut w.scorer()).unwrap();
    assert_eq!(out.applied.len() + out.rejected.len(), 2);
    // Its pseudo-gradient arriving now is never applied to round 1.
    assert!(matches!(
        m.offer(&late, deadline + 1),
        Err(Refusal::Stale {
            round: 0,
            current: 1
        })
    ));
    // Deadline now follows the measured arrivals (5 and 7 ms), not the initial guess.
    assert_eq!(m.deadline_at(), deadline + 100);
}

#[test]
fn a_rounds_deadline_counts_from_when_training_starts_and_survives_adopting_a_state() {
    let mut w = world(config(Codec::F32, false), 1);
    let mut m = w.machine();
    let start = w.global.params.clone();
    let c = w.contribute(0, 0, &start);
    m.offer(&c, 4_000).unwrap();
    let mut scorer = w.scorer();
    // Round 0 closes at 4 s; closing (scoring, saving) takes 30 s before round 1's training
    // starts; its contribution takes the 4 s of round 0 again.
    m.close(4_000, &mut scorer).unwrap();
    m.start_clock(34_000);
    let started = m.deadline_at();
    assert!(
        started > 38_000,
        "the deadline {started} is before training ends"
    );
    m.start_clock(1_000); // never moves back
    assert_eq!(m.deadline_at(), started);
    let next = m.state().params.clone();
    let c = w.contribute(0, 1, &next);
    m.offer(&c, 38_000).unwrap();
    // A worker that adopts another state keeps the measured times: a fresh machine would wait
    // the initial deadline (10 s here), this one the measured 5 s.
    let mut adopted = RoundMachine::new(w.cfg.clone(), w.global.clone(), [], 50_000);
    assert_eq!(adopted.deadline_at(), 50_000 + w.cfg.deadline.initial_ms);
    adopted.keep_deadline_of(&m);
    assert_eq!(adopted.deadline_at(), 55_000);
}

/// A straggler's late arrival does not stretch the deadline for everyone; when most of a
/// round's work arrives late (every worker slowed down), the round closes empty but the
/// deadline restarts from the late times, so the next round takes their work.
#[test]
fn when_most_work_arrives_late_the_deadline_learns_it_and_a_straggler_does_not_stretch_it() {
    let mut w = world(config(Codec::F32, false), 3);
    let mut m = w.machine();
    let mut scorer = w.scorer();
    // Every worker's work of round r takes `took[i]` ms; the round closes when all are in or
    // at its deadline. Returns the contributions taken.
    let mut opened = 0;
    let mut round = |m: &mut RoundMachine, took: [u64; 3]| {
        let start = m.state().params.clone();
        let r = m.round();
        let mut taken = 0;
        for (i, ms) in took.iter().enumerate() {
            let c = w.contribute(i, r, &start);
            taken += usize::from(m.offer(&c, opened + ms).is_ok());
        }
        let closed_at = opened + took.iter().max().unwrap();
        m.close(closed_at, &mut scorer).unwrap();
        opened = closed_at;
        (taken, m.deadline_at() - opened)
    };
    for _ in 0..4 {
        assert_eq!(round(&mut m, [1_000, 1_000, 1_000]).0, 3);
    }
    let (_, steady) = round(&mut m, [1_000, 1_000, 1_000]);
    assert_eq!(steady, 1_250, "median 1 s plus the slack");
    // One straggler at 5 s: refused, and the deadline stays.
    let (taken, after) = round(&mut m, [1_000, 1_000, 5_000]);
    assert_eq!((taken, after), (2, steady));
    // Everyone at 3 s: the round closes with nothing, and the deadline learns it (each late
    // time counted at most twice the deadline it missed, 2.5 s, plus the slack)...
    let (taken, after) = round(&mut m, [3_000, 3_000, 3_000]);
    assert_eq!(taken, 0);
    assert_eq!(after, 3_125);
    // ...so the next round at the same speed takes everyone's work.
    assert_eq!(round(&mut m, [3_000, 3_000, 3_000]).0, 3);
    // Late work of workers that did none the round before is no measurement: a machine that
    // expects nobody keeps its deadline when strangers arrive late.
    let mut fresh = RoundMachine::new(w.cfg.clone(), w.global.clone(), [], 0);
    let start = fresh.state().params.clone();
    for i in 0..3 {
        let c = w.contribute(i, 0, &start);
        assert!(fresh.offer(&c, 20_000).is_err());
    }
    fresh.close(20_000, &mut w.scorer()).unwrap();
    assert_eq!(fresh.deadline_at(), 20_000 + w.cfg.deadline.initial_ms);
}

#[test]
fn contribution_that_raises_held_out_loss_is_not_applied() {
    let mut w = world(config(Codec::F32, false), 3);
    let start = w.global.params.clone();
    let honest: Vec<Contribution> = (0..2).map(|i| w.contribute(i, 0, &start)).collect();
    // Worker 2 sends noise of the size of the weights, honestly signed.
    let c = w.contribute(2, 0, &start);
    let delta: Vec<f32> = (0..start.values.len())
        .map(|i| 0.3 * (i as f32 * 0.7).sin())
        .collect();
    let payload = Codec::F32.encode(&delta).unwrap();
    let mut cm = c.signed.commitment.clone();
    cm.payload = Digest::of(&payload);
    cm.payload_len = payload.len() as u64;
    let evil = Contribution {
        signed: Signed::sign(&w.keys[2], cm),
        payload: payload.into(),
    };

    let mut with_evil = w.machine();
    let mut without = w.machine();
    for c in &honest {
        with_evil.offer(c, 1).unwrap();
        without.offer(c, 1).unwrap();
    }
    with_evil.offer(&evil, 2).unwrap();
    let a = with_evil.close(3, &mut w.scorer()).unwrap();
    let b = without.close(3, &mut w.scorer()).unwrap();
    assert_eq!(a.rejected.len(), 1, "{a:?}");
    assert_eq!(a.rejected[0].worker, w.keys[2].peer_id().to_bytes());
    assert!(a.rejected[0].loss > a.loss_before);
    assert_eq!(a.applied.len(), 2);
    assert!(a.applied.iter().all(|s| s.loss < a.loss_before));
    // The poisoned round ends exactly where the clean one does.
    assert_eq!(
        with_evil.state().params.digest(),
        without.state().params.digest()
    );
    assert_ne!(a.set, b.set);
}

#[test]
fn machines_holding_the_same_set_agree_bit_for_bit() {
    for codec in [Codec::Int8 { block: 64 }, Codec::Int8Ans { block: 64 }] {
        let mut w = world(config(codec, true), 3);
        let start = w.global.params.clone();
        let cs: Vec<Contribution> = (0..3).map(|i| w.contribute(i, 0, &start)).collect();
        let mut a = w.machine();
        let mut b = w.machine();
        for c in &cs {
            a.offer(c, 10).unwrap();
        }
        for c in cs.iter().rev() {
            b.offer(c, 20).unwrap();
        }
        assert!(a.should_close(10), "all expected workers are in");
        let oa = a.close(30, &mut w.scorer()).unwrap();
        // Closed in steps (the driver scores without holding the machine): same outcome, and
        // no contribution is taken while the set is out.
        let closing = b.begin_close();
        assert!(matches!(
            b.offer(&cs[0], 25),
            Err(plexus_train::round::Refusal::Closing { round: 0 })
        ));
        let scored = closing.score(&mut w.scorer()).unwrap();
        let ob = b.finish_close(scored, 40);
        assert_eq!(oa.set, ob.set);
        assert_eq!(oa.next, ob.next);
        assert_eq!(a.state(), b.state());
        assert_ne!(a.start(), start.digest());
        // The kept digest is the state's, before and after closing.
        assert_eq!(
            (oa.next, a.state_digest()),
            (a.state().digest(), a.state().digest())
        );
        assert_eq!(w.machine().state_digest(), w.global.digest());
    }
}

#[test]
fn a_dropped_contribution_is_not_aggregated_nor_taken_again_and_the_outcome_names_it() {
    let mut w = world(config(Codec::F16, false), 3);
    let start = w.global.params.clone();
    let cs: Vec<Contribution> = (0..3).map(|i| w.contribute(i, 0, &start)).collect();
    let (mut dropping, mut without) = (w.machine(), w.machine());
    for c in &cs {
        dropping.offer(c, 10).unwrap();
    }
    for c in &cs[..2] {
        without.offer(c, 10).unwrap();
    }
    // The draw's key is the set held now, and what the outcome will report if nothing changes.
    let before_drop = dropping.held_set();
    assert_ne!(before_drop, without.held_set());
    let third = cs[2].signed.commitment.worker.clone();
    assert!(dropping.drop_contribution(&third));
    assert_eq!(dropping.held_set(), without.held_set());
    assert_eq!(dropping.offer(&cs[2], 11), Err(Refusal::Dropped));
    let od = dropping.close(30, &mut w.scorer()).unwrap();
    let ow = without.close(30, &mut w.scorer()).unwrap();
    assert_eq!(od.dropped, vec![third.clone()]);
    assert!(ow.dropped.is_empty());
    assert_eq!(od.set, ow.set);
    assert_eq!(od.next, ow.next);
    assert_eq!(od.applied.len() + od.rejected.len(), 2);
    // A drop holds for its round only: the next round takes the worker's contribution.
    let next = dropping.state().params.clone();
    let c = w.contribute(2, 1, &next);
    dropping.offer(&c, 40).unwrap();
}

#[test]
fn reexecuting_a_round_from_its_commitment_reproduces_the_payload_bytes() {
    // Sparse with error feedback: round 1 depends on the residual and optimizer state that
    // round 0 left, so the auditor needs (and checks) all of them.
    let cfg = config(
        Codec::Sparse {
            chunk: 256,
            k: 8,
            bits: 2,
        },
        true,
    );
    let mut w = world(cfg, 2);
    let mut m = w.machine();
    let start = w.global.params.clone();
    let mut round0 = Vec::new();
    for i in 0..2 {
        let c = w.contribute(i, 0, &start);
        m.offer(&c, 1).unwrap();
        round0.push(c.signed.commitment);
    }
    m.close(2, &mut w.scorer()).unwrap();
    let fresh = fresh_digests(start.values.len());
    // Round 0 starts fresh: sound however little the auditor holds.
    for before in [Before::Unknown, Before::Closed(None)] {
        assert_eq!(check_start(&round0[0], before, fresh), StartCheck::Sound);
    }
    let global1 = m.state().params.clone();
    let before = w.states[0].clone();
    let c = w.contribute(0, 1, &global1);
    m.offer(&c, 3).unwrap();
    let cm = &c.signed.commitment;
    let (cfg, model, shard) = (&w.cfg, &w.model, w.shard.as_ref());
    assert_eq!(
        reexecute(cfg, model, shard, cm, &global1, before.clone()).unwrap(),
        Verdict::Match
    );
    // A worker that lies about its payload is caught; so is one that claims another end
    // state than its round computed (its next round could start from it).
    let mut lie = cm.clone();
    lie.payload = Digest::of(b"made up");
    assert!(matches!(
        reexecute(cfg, model, shard, &lie, &global1, before.clone()).unwrap(),
        Verdict::Mismatch {
            what: "pseudo-gradient",
            ..
        }
    ));
    for field in [0, 1] {
        let mut lie = cm.clone();
        *[&mut lie.end_optimizer, &mut lie.end_residual][field] = Digest::of(b"chosen");
        assert!(matches!(
            reexecute(cfg, model, shard, &lie, &global1, before.clone()).unwrap(),
            Verdict::Mismatch { what, .. } if what.contains("ended in")
        ));
    }
    // Round 1 starts where its worker's round 0 ended: sound against the set holding that;
    // a start state of its own choosing is a lie against it, unproven against a set without
    // it, unchecked by an auditor that did not close round 0.
    assert_eq!(
        check_start(cm, Before::Closed(Some(&round0[0])), fresh),
        StartCheck::Sound
    );
    let mut chosen = cm.clone();
    chosen.start_residual = Digest::of(b"a residual that sends anything");
    assert_eq!(
        check_start(&chosen, Before::Closed(Some(&round0[0])), fresh),
        StartCheck::Broken
    );
    assert_eq!(
        check_start(&chosen, Before::Closed(None), fresh),
        StartCheck::Unproven
    );
    assert_eq!(
        check_start(&chosen, Before::Unknown, fresh),
        StartCheck::Unchecked
    );
    // Another worker's end state is not this worker's to start from.
    assert_eq!(
        check_start(cm, Before::Closed(Some(&round0[1])), fresh),
        StartCheck::Broken
    );
    // Start state that is not the committed one is refused before any work.
    assert!(matches!(
        reexecute(cfg, model, shard, cm, &global1, w.states[0].clone()),
        Err(AuditError::StartState { .. })
    ));
    assert!(matches!(
        reexecute(cfg, model, shard, cm, &start, before.clone()),
        Err(AuditError::StartState { what: "weights" })
    ));
}

#[test]
fn diloco_with_four_workers_learns_the_task() {
    let setup = TaskSetup {
        task: Task::Reverse { len: 4 },
        hidden: 64,
        layers: 2,
        init_seed: 0,
        eval_examples: 256,
    };
    let mut cfg = config(Codec::F16, false);
    cfg.inner_steps = 15;
    cfg.batch_size = 16;
    cfg.inner.lr = 1e-2;
    cfg.inner.warmup = 20;
    // Workers run one after another here; scheduling noise must not make one miss a round.
    cfg.deadline.min_ms = 3_600_000;
    let rounds = 20;
    cfg.inner.schedule_steps = rounds * cfg.inner_steps as usize;
    let (mut applied, mut rejected, mut late) = (0, 0, 0);
    let d = run_diloco(&setup, &cfg, 4, rounds, |p| {
        applied += p.outcome.applied.len();
        rejected += p.outcome.rejected.len();
        late += p.late;
    })
    .unwrap();
    eprintln!(
        "diloco loss {} acc {} bytes {} applied {applied} rejected {rejected} late {late}",
        d.loss, d.accuracy, d.bytes_per_worker
    );
    assert_eq!(late, 0);
    assert!(applied >= rounds * 3, "{applied} contributions applied");
    assert!(d.accuracy >= 0.9, "held-out exact match {}", d.accuracy);
    assert!(d.loss < 0.1, "held-out loss {}", d.loss);
    // Each worker sent one f16 pseudo-gradient per round.
    let n = d.params.values.len();
    assert_eq!(
        d.bytes_per_worker,
        (rounds * Codec::F16.encoded_len(n)) as u64
    );
}

#[test]
fn a_round_holds_at_most_the_runs_workers() {
    let mut cfg = config(Codec::F16, false);
    cfg.max_workers = 1;
    let mut w = world(cfg, 2);
    let mut m = w.machine();
    let start = w.global.params.clone();
    let a = w.contribute(0, 0, &start);
    let b = w.contribute(1, 0, &start);
    m.offer(&a, 1).unwrap();
    assert_eq!(m.offer(&b, 2), Err(Refusal::Full { max: 1 }));
}

/// Records the weights it is asked to score and answers the given losses in call order.
struct Recorder {
    seen: Vec<Vec<f32>>,
    losses: Vec<f32>,
}

impl plexus_train::round::Scorer for Recorder {
    fn loss(
        &mut self,
        _round: u64,
        params: &Params,
    ) -> Result<f32, plexus_model::train::TrainError> {
        self.seen.push(params.values.clone());
        Ok(self.losses[self.seen.len() - 1])
    }
}

#[test]
fn a_contribution_is_scored_at_its_share_of_the_average_within_the_tolerance() {
    for (tolerance, applied) in [(0.0, 0), (0.01, 1), (0.03, 2)] {
        let mut cfg = config(Codec::F32, false);
        cfg.score.tolerance = tolerance;
        let mut w = world(cfg, 2);
        let start = w.global.params.clone();
        let cs: Vec<Contribution> = (0..2).map(|i| w.contribute(i, 0, &start)).collect();
        let mut machine = w.machine();
        for c in &cs {
            machine.offer(c, 1).unwrap();
        }
        // Scored in worker-id order: the first raises the loss by 0.5%, the second by 2%.
        let order: Vec<Vec<u8>> = machine.contributors().cloned().collect();
        let mut s = Recorder {
            seen: Vec::new(),
            losses: vec![1.0, 1.005, 1.02],
        };
        let out = machine.close(2, &mut s).unwrap();
        assert_eq!(s.seen.len(), 3, "loss before, then one per contribution");
        assert_eq!(s.seen[0], start.values);
        for (i, id) in order.iter().enumerate() {
            let c = cs
                .iter()
                .find(|c| c.signed.commitment.worker == *id)
                .unwrap();
            let delta = Codec::F32.decode(&c.payload, start.values.len()).unwrap();
            // Two contributions: each is judged as half of the step.
            let expected: Vec<f32> = start
                .values
                .iter()
                .zip(&delta)
                .map(|(p, d)| p - d * 0.5)
                .collect();
            assert_eq!(s.seen[i + 1], expected, "candidate of contribution {i}");
        }
        assert_eq!(out.applied.len(), applied, "tolerance {tolerance}: {out:?}");
        assert_eq!(out.applied.len() + out.rejected.len(), 2);
        if applied == 1 {
            assert_eq!(out.applied[0].worker, order[0]);
        }
    }
}
