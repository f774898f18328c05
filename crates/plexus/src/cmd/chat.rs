//! `plexus chat`: an interactive conversation using the model's chat template, as users of
//! `ollama run` and `llama-cli` expect it. On a terminal: a banner, a line editor (arrow keys,
//! history), `/help`, `/reset`, `/exit` or Ctrl-D to quit, and Ctrl-C stops the reply being
//! written (at the prompt it clears the line). The lines typed are kept in a history file
//! (`chat_history` in the data directory, `--history FILE`, `--no-history`), so Up recalls
//! them in the next session too, as in `ollama run`. From a pipe: one user message per line,
//! replies on stdout, nothing else.

use crate::cli::ChatArgs;
use anyhow::{bail, Context as _};
use plexus_model::chat::Message;
use plexus_model::generate::{generate, Flow, GenerateRequest};
use plexus_model::LoadedModel;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const HELP: &str = "\
  /help          this list
  /reset         forget the conversation (the system message stays)
  /exit, /bye    quit (or Ctrl-D)
  Ctrl-C         stop the reply being written; at the prompt, clear the line
  Up/Down        earlier messages, this session's and the last ones' (--no-history: none kept)
  Left/Right, Home/End, Ctrl-W edit the line";

/// What a line of input asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Empty,
    Help,
    Reset,
    Exit,
    /// A line starting with `/` that is not a command (its first word): said so, never sent
    /// to the model.
    Unknown(&'a str),
    Message(&'a str),
}

fn parse(line: &str) -> Line<'_> {
    let t = line.trim();
    match t {
        "" => Line::Empty,
        "/help" | "/?" => Line::Help,
        "/reset" | "/clear" => Line::Reset,
        "/exit" | "/quit" | "/bye" => Line::Exit,
        _ if t.starts_with('/') => Line::Unknown(t.split_whitespace().next().unwrap_or(t)),
        _ => Line::Message(line),
    }
}

/// Where lines come from: the line editor on a terminal (with its history file, if any), plain
/// lines from a pipe.
enum Input {
    Editor(Box<rustyline::DefaultEditor>, Option<PathBuf>),
    Pipe(std::io::Lines<std::io::StdinLock<'static>>),
}

impl Input {
    /// The next line; `None` at the end of input (Ctrl-D).
    fn next(&mut self) -> anyhow::Result<Option<String>> {
        use rustyline::error::ReadlineError;
        match self {
            Input::Pipe(lines) => lines.next().transpose().context("cannot read stdin"),
            Input::Editor(ed, file) => loop {
                match ed.readline(">>> ") {
                    Ok(line) => {
                        if !line.trim().is_empty() && ed.add_history_entry(line.as_str())? {
                            if let Some(path) = file {
                                if let Err(e) = ed.append_history(path) {
                                    eprintln!(
                                        "(history not kept: cannot write {}: {e})",
                                        path.display()
                                    );
                                    *file = None;
                                }
                            }
                        }
                        return Ok(Some(line));
                    }
                    // Ctrl-C at the prompt drops the line, as in a shell.
                    Err(ReadlineError::Interrupted) => {
                        eprintln!("(Ctrl-D or /exit quits)");
                    }
                    Err(ReadlineError::Eof) => return Ok(None),
                    Err(e) => return Err(e).context("cannot read the terminal"),
                }
            },
        }
    }
}

/// Sets the returned flag on every Ctrl-C (SIGINT) instead of ending the process.
fn interrupt_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the Ctrl-C handler")?;
    // Registering before returning, so a Ctrl-C right after start is already caught.
    let mut sigint = rt
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        })
        .context("cannot catch Ctrl-C")?;
    let set = flag.clone();
    std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            rt.block_on(async move {
                while sigint.recv().await.is_some() {
                    set.store(true, Ordering::SeqCst);
                }
            })
        })
        .context("cannot start the Ctrl-C handler")?;
    Ok(flag)
}

fn banner(model: &LoadedModel, path: &str) -> String {
    format!(
        "plexus chat: {path} ({} layers, context {} tokens)\n\
         Type a message and press Enter. /help for commands, /exit or Ctrl-D to quit, \
         Ctrl-C stops a reply.",
        model.config.num_layers, model.config.max_position_embeddings
    )
}

/// The history file of this session, its earlier lines loaded into `ed`; `None` with
/// `--no-history`. A file that cannot be read is said once and left alone.
fn history_file(a: &ChatArgs, ed: &mut rustyline::DefaultEditor) -> Option<PathBuf> {
    if a.no_history {
        return None;
    }
    let path = a
        .history
        .clone()
        .unwrap_or_else(|| super::net::default_data_dir().join("chat_history"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("(history not kept: cannot create {}: {e})", dir.display());
            return None;
        }
    }
    match ed.load_history(&path) {
        Ok(()) => {}
        Err(rustyline::error::ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
        }
        Err(e) => {
            eprintln!("(history not kept: cannot read {}: {e})", path.display());
            return None;
        }
    }
    Some(path)
}

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    let model = super::load_model(&a.common)?;
    let Some(template) = &model.chat_template else {
        bail!("the model has no chat template; use `plexus generate` instead");
    };
    let interactive = std::io::stdin().is_terminal();
    let (mut input, stop) = if interactive {
        let mut ed = rustyline::DefaultEditor::new().context("cannot set up the line editor")?;
        let file = history_file(&a, &mut ed);
        let name = a
            .common
            .model
            .as_deref()
            .map_or("SmolLM2-135M-Instruct".into(), |p| p.display().to_string());
        eprintln!("{}", banner(&model, &name));
        (Input::Editor(Box::new(ed), file), Some(interrupt_flag()?))
    } else {
        (Input::Pipe(std::io::stdin().lock().lines()), None)
    };
    let system: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut history = system.clone();
    let mut stdout = std::io::stdout();
    loop {
        if let Some(s) = &stop {
            // A Ctrl-C pressed before this prompt is not meant for the next reply.
            s.store(false, Ordering::SeqCst);
        }
        let Some(line) = input.next()? else { break };
        let text = match parse(&line) {
            Line::Empty => continue,
            Line::Exit => break,
            Line::Help => {
                eprintln!("{HELP}");
                continue;
            }
            Line::Reset => {
                history = system.clone();
                if interactive {
                    eprintln!("(conversation cleared)");
                }
                continue;
            }
            Line::Unknown(cmd) => {
                eprintln!("unknown command {cmd}: /help lists the commands");
                continue;
            }
            Line::Message(text) => text.to_owned(),
        };
        super::warn_untokenizable(&model.tokenizer, &text);
        history.push(Message::new("user", text));
        let prompt = template.render(&history, true)?;
        let req = GenerateRequest {
            prompt_tokens: model.tokenizer.encode(&prompt, true)?,
            max_tokens: a.max_tokens,
            sampling: a.common.sampling.params(),
            stop: a.common.stop.clone(),
        };
        let mut stopped = false;
        let done = generate(
            std::slice::from_ref(&model.stage),
            &model.tokenizer,
            &req,
            |p| {
                if stop
                    .as_ref()
                    .is_some_and(|s| s.swap(false, Ordering::SeqCst))
                {
                    stopped = true;
                    return Flow::Stop;
                }
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
        if stopped {
            eprintln!("(stopped)");
        }
        // The words written before a stop are part of the conversation.
        history.push(Message::new("assistant", done.text));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_never_sent_to_the_model() {
        assert_eq!(parse("  "), Line::Empty);
        assert_eq!(parse("/help"), Line::Help);
        assert_eq!(parse("/reset"), Line::Reset);
        assert_eq!(parse(" /bye "), Line::Exit);
        assert_eq!(parse("/exit"), Line::Exit);
        assert_eq!(parse("/set verbose"), Line::Unknown("/set"));
        assert_eq!(parse("/model"), Line::Unknown("/model"));
        assert_eq!(parse("hello /help"), Line::Message("hello /help"));
    }
}
