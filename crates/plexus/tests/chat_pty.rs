#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! `plexus chat` on a pseudo-terminal, as a user meets it: the banner, line editing with the
//! arrow keys, history, `/help` answered by plexus (not the model), Ctrl-C stopping a reply
//! without ending the program, Ctrl-C at the prompt clearing the line, and Ctrl-D quitting
//! with success; a second session recalls the first one's lines from the history file. The
//! real model writes a reply long enough to be interrupted.

use rexpect::session::{spawn_with_options, PtySession};
use std::process::Command;

const TIMEOUT_MS: u64 = 120_000;

fn start(data_dir: &std::path::Path) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plexus"));
    cmd.env("PLEXUS_DATA_DIR", data_dir);
    cmd.arg("chat")
        .arg("--model")
        .arg(plexus_testkit::real_model())
        .args([
            "--temperature",
            "0",
            "--max-tokens",
            "400",
            "--threads",
            "2",
        ])
        .env("RUST_BACKTRACE", "0")
        .env("TERM", "xterm");
    spawn_with_options(
        cmd,
        rexpect::reader::Options::new()
            .timeout_ms(Some(TIMEOUT_MS))
            .strip_ansi_escape_codes(true),
    )
    .unwrap()
}

#[test]
fn chat_on_a_terminal_edits_lines_and_ctrl_c_stops_only_the_reply() {
    let data = tempfile::tempdir().unwrap();
    let mut p = start(data.path());
    // The banner says how to get help and how to quit.
    p.exp_string("plexus chat:").unwrap();
    p.exp_string("/help for commands").unwrap();
    p.exp_string(">>> ").unwrap();

    // "/hlp", two steps left, "e": the line editor makes it "/help".
    p.send("/hlp").unwrap();
    p.send("\x1b[D\x1b[D").unwrap();
    p.send("e\r").unwrap();
    p.flush().unwrap();
    p.exp_string("forget the conversation").unwrap();
    p.exp_string(">>> ").unwrap();

    // Up recalls "/help" from the history.
    p.send("\x1b[A\r").unwrap();
    p.flush().unwrap();
    p.exp_string("forget the conversation").unwrap();
    p.exp_string(">>> ").unwrap();

    // An unknown command is refused by name, never sent to the model.
    p.send("/model smol\r").unwrap();
    p.flush().unwrap();
    p.exp_string("unknown command /model").unwrap();
    p.exp_string(">>> ").unwrap();

    // Ctrl-C at the prompt clears the line and keeps the program.
    p.send("half a line").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("Ctrl-D or /exit quits").unwrap();
    p.exp_string(">>> ").unwrap();

    // A long reply: Ctrl-C once it is being written stops it, and the prompt comes back.
    p.send("Write a long story about a dragon who learns to cook.\r")
        .unwrap();
    p.flush().unwrap();
    // The echo of the line, then some words of the reply.
    p.exp_string("cook.").unwrap();
    p.exp_regex("[A-Za-z]{3,}").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("(stopped)").unwrap();
    p.exp_string(">>> ").unwrap();

    // Still alive: commands work after the interrupted reply.
    p.send("/reset\r").unwrap();
    p.flush().unwrap();
    p.exp_string("conversation cleared").unwrap();
    p.exp_string(">>> ").unwrap();

    // Ctrl-D quits with success.
    quit(p);

    // The next session's Up recalls the last line typed in this one ("/reset").
    let kept = std::fs::read_to_string(data.path().join("chat_history")).unwrap();
    assert!(kept.contains("/reset") && kept.contains("dragon"), "{kept}");
    let mut p = start(data.path());
    p.exp_string(">>> ").unwrap();
    p.send("\x1b[A\r").unwrap();
    p.flush().unwrap();
    p.exp_string("conversation cleared").unwrap();
    p.exp_string(">>> ").unwrap();
    quit(p);
}

/// Ctrl-D: the program ends with success.
fn quit(mut p: PtySession) {
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    let status = p.process().wait().unwrap();
    assert_eq!(
        format!("{status:?}").split(", ").last(),
        Some("0)"),
        "{status:?}"
    );
}
