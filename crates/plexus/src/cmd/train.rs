//! `plexus train`: trains a starter model on a synthetic task with a progress bar and periodic
//! held-out exact-match lines, then writes a checkpoint that `plexus generate` loads.
//! `plexus train spec` writes a signed run spec and `plexus train --distributed SPEC` joins
//! its run as a worker ([`super::train_net`]).

use crate::cli::{TrainArgs, TrainCommand};
use anyhow::Context as _;
use plexus_model::train::task::Task;
use plexus_model::train::{TaskTrainer, TrainConfig};
use std::time::Instant;

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    if let Some(TrainCommand::Spec(s)) = &a.command {
        return super::train_net::spec::write(s);
    }
    if let Some(spec) = a.distributed.clone() {
        return super::train_net::run(a, &spec);
    }
    let out = a
        .out
        .clone()
        .context("--out is required: the directory the checkpoint is written to")?;
    let task = Task::parse(&a.task, a.size)?;
    let mut tc = TrainConfig::new(task);
    tc.steps = a.steps;
    tc.batch_size = a.batch_size;
    tc.lr = a.lr;
    tc.warmup = a.warmup;
    tc.clip = a.clip;
    tc.seed = a.seed;
    tc.hidden = a.hidden;
    tc.layers = a.layers;
    let mut trainer = TaskTrainer::new(tc)?;
    let cfg = trainer.model_config.clone();
    eprintln!(
        "training {} (size {}) | model: {} layers, hidden {}, {} heads, vocab {} | {} steps x {} sequences",
        task.name(), a.size, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size, a.steps, a.batch_size
    );
    let pb = crate::progress::steps("train", a.steps as u64);
    let started = Instant::now();
    let mut last_eval = None;
    let mut loss_ema: Option<f32> = None;
    for step in 0..a.steps {
        let r = trainer
            .step(step)
            .with_context(|| format!("training step {step} failed"))?;
        let ema = loss_ema.map_or(r.loss, |e| 0.9 * e + 0.1 * r.loss);
        loss_ema = Some(ema);
        pb.set_position(step as u64 + 1);
        pb.set_prefix(format!("loss {ema:.4} lr {:.2e}", r.lr));
        let last = step + 1 == a.steps;
        if (a.eval_every > 0 && (step + 1) % a.eval_every == 0) || last {
            let e = trainer.evaluate(a.eval_examples)?;
            pb.suspend(|| {
                println!(
                    "step {:>6} | loss {:.4} | lr {:.2e} | grad norm {:.3} | held-out exact match {:.1}% ({}/{}) | {:.0}s",
                    step + 1, ema, r.lr, r.grad_norm, 100.0 * e.exact_match(), e.correct, e.total,
                    started.elapsed().as_secs_f64()
                )
            });
            last_eval = Some(e);
        }
    }
    pb.finish_and_clear();
    let e = last_eval.context("no evaluation ran")?;
    trainer.save(
        &out,
        serde_json::json!({
            "held_out_exact_match": e.exact_match(),
            "held_out_examples": e.total,
            "final_loss": loss_ema,
            "seconds": started.elapsed().as_secs_f64(),
        }),
    )?;
    println!(
        "saved {} (held-out exact match {:.1}%)",
        out.display(),
        100.0 * e.exact_match()
    );
    println!("{}", try_it(task, &out));
    Ok(())
}

/// How to prompt the trained model: the task's format by a held-out example, the command that
/// answers it, and the characters it knows.
fn try_it(task: Task, out: &std::path::Path) -> String {
    let example = task.held_out_example(0);
    let (_, answer_len) = task.lengths();
    format!(
        "try it: plexus generate --model {} --prompt '{}' --temperature 0 --max-tokens {}\n\
         (expected answer: {}; prompts of this task look like {:?} and may use only the \
         characters {:?}: others are not in the model's vocabulary)",
        out.display(),
        example.prompt,
        answer_len + 1,
        example.answer,
        example.prompt,
        plexus_model::train::task::CHARS,
    )
}
