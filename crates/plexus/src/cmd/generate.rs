//! `plexus generate`: one prompt in, the generated text streamed to stdout, timing on stderr.

use crate::cli::GenerateArgs;
use anyhow::{bail, Context as _};
use plexus_model::chat::Message;
use plexus_model::generate::{generate, Flow, GenerateRequest};
use std::io::Write;

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let model = super::load_model(&a.common)?;
    let text = if a.chat {
        let Some(t) = &model.chat_template else {
            bail!("--chat: the model has no chat template");
        };
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s.clone()));
        }
        msgs.push(Message::new("user", a.prompt.clone()));
        t.render(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    super::warn_untokenizable(&model.tokenizer, &a.prompt);
    let prompt_tokens = model.tokenizer.encode(&text, true)?;
    let req = GenerateRequest {
        prompt_tokens,
        max_tokens: a.max_tokens,
        sampling: a.common.sampling.params(),
        stop: a.common.stop.clone(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let done = generate(
        std::slice::from_ref(&model.stage),
        &model.tokenizer,
        &req,
        |piece| match out
            .write_all(piece.text.as_bytes())
            .and_then(|_| out.flush())
        {
            Ok(()) => Flow::Continue,
            Err(e) => {
                write_err = Some(e);
                Flow::Stop
            }
        },
    )
    .context("generation failed")?;
    if let Some(e) = write_err {
        // A closed pipe (e.g. `| head`) is the reader's choice, not a failure.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to stdout");
        }
    }
    let _ = writeln!(out).and_then(|_| out.flush());
    let per_s = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | finish: {} | seed {}",
        done.prompt_tokens,
        per_s(done.prompt_tokens, done.prefill_time),
        done.tokens.len(),
        per_s(done.tokens.len(), done.decode_time),
        done.finish.as_str(),
        req.sampling.seed,
    );
    if a.print_tokens {
        eprintln!("tokens: {}", serde_json::to_string(&done.tokens)?);
    }
    Ok(())
}
