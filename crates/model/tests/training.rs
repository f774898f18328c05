//! A trained checkpoint reloads bit-exact through the ordinary model loader and generates the
//! same tokens as the in-memory model.

#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use plexus_model::generate::{generate, Flow, GenerateRequest};
use plexus_model::train::task::Task;
use plexus_model::train::{evaluate, TaskTrainer, TrainConfig};
use plexus_model::weights::{dense_map, HfTensors};
use plexus_model::{ModelFiles, SamplingParams};

#[test]
fn checkpoint_reloads_bit_exact_and_generates_the_same_tokens() {
    let mut tc = TrainConfig::new(Task::Addition { digits: 2 });
    tc.steps = 40;
    tc.batch_size = 16;
    tc.hidden = 64;
    tc.warmup = 5;
    let mut t = TaskTrainer::new(tc).unwrap();
    for s in 0..40 {
        t.step(s).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path(), serde_json::json!({})).unwrap();

    let files = ModelFiles::open(dir.path()).unwrap();
    assert_eq!(files.config, *t.model_config, "config.json round trip");
    let reloaded = dense_map(
        &HfTensors::open(&files.weight_files).unwrap(),
        &files.config,
    )
    .unwrap();
    let trained = t.weights().unwrap();
    assert_eq!(reloaded.len(), trained.len());
    for (name, w) in &trained {
        let a: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = reloaded[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs"
        );
    }

    // Same greedy answers from the in-memory model and the reloaded checkpoint.
    let model = files.load(None).unwrap();
    let eos = model.tokenizer.eos()[0];
    let mine = t.evaluate(64).unwrap();
    let theirs = evaluate(&model.stage, &t.tokenizer, t.config.task, eos, 64);
    assert_eq!(mine.predictions, theirs.unwrap().predictions);

    // And through the generation loop the CLI uses.
    let prompt = model.tokenizer.encode("12+34=", true).unwrap();
    let req = GenerateRequest {
        prompt_tokens: prompt,
        max_tokens: 4,
        sampling: SamplingParams::greedy(),
        stop: vec![],
    };
    let a = generate(
        std::slice::from_ref(&model.stage),
        &model.tokenizer,
        &req,
        |_| Flow::Continue,
    )
    .unwrap();
    let b = generate(
        std::slice::from_ref(&t.inference_stage().unwrap()),
        &model.tokenizer,
        &req,
        |_| Flow::Continue,
    )
    .unwrap();
    assert_eq!(a.tokens, b.tokens);
}
