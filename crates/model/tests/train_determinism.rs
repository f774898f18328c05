//! The inner loop gives the same bytes whatever the thread count: the same run is executed in
//! child processes with `RAYON_NUM_THREADS` = 1, 2 and 3 (candle sizes its matmul split from
//! that variable) and the weights and optimizer state they end with must hash the same.

#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_model::train::task::Task;
use plexus_model::train::{
    init_weights, task_model_config, AdamWState, Params, TaskShard, TrainConfig, Trainer,
};
use std::sync::Arc;

const CHILD: &str = "PLEXUS_DETERMINISM_CHILD";
const NAME: &str = "inner_loop_is_bit_identical_across_thread_counts";

/// Four steps from seed-7 weights on task examples 1000.., then the hashes.
fn run() -> (String, f32, f32) {
    let mut tc = TrainConfig::new(Task::Addition { digits: 3 });
    tc.hidden = 128;
    tc.layers = 2;
    tc.steps = 100;
    tc.warmup = 2;
    let shard = TaskShard::new(tc.task, 5).unwrap();
    let cfg = Arc::new(task_model_config(&tc, shard.tokenizer().get_vocab_size(true)).unwrap());
    let params = Params::from_tensors(&init_weights(&cfg, 7).unwrap()).unwrap();
    let opt = AdamWState::new(params.values.len());
    let mut t = Trainer::from_params(cfg, params, opt, tc.inner()).unwrap();
    let ids: Vec<u64> = (1000..1000 + 4 * 48).collect();
    let reports = t.run(&shard, &ids, 48, 10).unwrap();
    let digest = format!(
        "{} {}",
        t.params().unwrap().digest(),
        t.opt_state().digest()
    );
    (digest, reports[0].loss, reports[3].loss)
}

#[test]
fn inner_loop_is_bit_identical_across_thread_counts() {
    if std::env::var_os(CHILD).is_some() {
        let (digest, first, last) = run();
        println!("digest {digest} loss {first} {last}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut seen = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = std::process::Command::new(&exe)
            .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
            .env(CHILD, "1")
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child with {threads} threads: {stdout}"
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("digest ").map(|(_, d)| d))
            .unwrap_or_else(|| panic!("no digest from the child: {stdout}"))
            .to_string();
        seen.push((threads, line));
    }
    let first = &seen[0].1;
    for (threads, line) in &seen {
        assert_eq!(line, first, "{threads} threads differ from 1 thread");
    }
    // Training happened: the loss of the last step is below the first.
    let mut parts = first.split_whitespace().skip(3);
    let l0: f32 = parts.next().unwrap().parse().unwrap();
    let l3: f32 = parts.next().unwrap().parse().unwrap();
    assert!(l3 < l0, "loss {l0} -> {l3}");
}

#[test]
fn resuming_from_exported_state_equals_an_uninterrupted_run() {
    let mut tc = TrainConfig::new(Task::Reverse { len: 4 });
    tc.hidden = 64;
    tc.layers = 1;
    tc.steps = 20;
    tc.warmup = 2;
    let shard = TaskShard::new(tc.task, 1).unwrap();
    let cfg = Arc::new(task_model_config(&tc, shard.tokenizer().get_vocab_size(true)).unwrap());
    let params = Params::from_tensors(&init_weights(&cfg, 3).unwrap()).unwrap();
    let ids: Vec<u64> = (0..6 * 8).collect();

    let opt = AdamWState::new(params.values.len());
    let mut whole =
        Trainer::from_params(cfg.clone(), params.clone(), opt.clone(), tc.inner()).unwrap();
    whole.run(&shard, &ids, 8, 0).unwrap();

    let mut first = Trainer::from_params(cfg.clone(), params, opt, tc.inner()).unwrap();
    first.run(&shard, &ids[..24], 8, 0).unwrap();
    let (p, o) = first.into_state().unwrap();
    // Through bytes, as a worker joining from a peer's state would.
    let o = AdamWState::from_bytes(&o.to_bytes(), p.values.len()).unwrap();
    let mut second = Trainer::from_params(cfg, p, o, tc.inner()).unwrap();
    second.run(&shard, &ids[24..], 8, 3).unwrap();
    assert_eq!(
        second.params().unwrap().digest(),
        whole.params().unwrap().digest()
    );
    assert_eq!(second.opt_state(), whole.opt_state());
}
