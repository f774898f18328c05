//! `plexus`: the command-line entry point. Parses flags, sets up logging and threads, and hands
//! each subcommand to its module in `cmd/`. Errors print as one clear message (with causes) on
//! stderr and a non-zero exit.

mod cli;
mod cmd;
mod fetch;
mod progress;

// Dev-dependencies are for the integration tests in tests/.
#[cfg(test)]
use {plexus_testkit as _, rexpect as _, tempfile as _};

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PLEXUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Some(n) = cli.command.threads() {
        // Must happen before candle starts its thread pools (the first tensor op).
        // SAFETY: still single-threaded here.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
