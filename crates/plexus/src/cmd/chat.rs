//! `plexus chat`: an interactive conversation using the model's chat template. Reads one user
//! message per line from stdin; `/reset` clears the history, `/exit` (or end of input) quits.

use crate::cli::ChatArgs;
use anyhow::{bail, Context as _};
use plexus_model::chat::Message;
use plexus_model::generate::{generate, Flow, GenerateRequest};
use std::io::{BufRead, IsTerminal, Write};

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    let model = super::load_model(&a.common)?;
    let Some(template) = &model.chat_template else {
        bail!("the model has no chat template; use `plexus generate` instead");
    };
    let interactive = std::io::stdin().is_terminal();
    let system: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut history = system.clone();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut stdout = std::io::stdout();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read stdin")?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = system.clone();
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", line));
        let prompt = template.render(&history, true)?;
        let req = GenerateRequest {
            prompt_tokens: model.tokenizer.encode(&prompt, true)?,
            max_tokens: a.max_tokens,
            sampling: a.common.sampling.params(),
            stop: a.common.stop.clone(),
        };
        let done = generate(
            std::slice::from_ref(&model.stage),
            &model.tokenizer,
            &req,
            |p| {
                let _ = stdout.write_all(p.text.as_bytes());
                let _ = stdout.flush();
                Flow::Continue
            },
        );
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                // Keep the session alive: drop the turn that did not fit and say why.
                history.pop();
                eprintln!("error: {e}");
                continue;
            }
        };
        writeln!(stdout)?;
        history.push(Message::new("assistant", done.text));
    }
    Ok(())
}
