//! One module per subcommand; `run` dispatches.

mod bench;
mod bench_batch;
pub mod bench_settle;
mod bench_train;
mod chat;
pub mod gateway;
mod generate;
pub mod ledger;
mod models;
mod net;
pub mod node;
mod placement;
pub mod sim;
mod train;
mod train_net;
mod up;
mod up_train;
pub mod wallet;

use crate::cli::{BenchCommand, Cli, Command, CommonArgs, ModelsCommand, SamplingArgs};
use anyhow::Context as _;
use plexus_model::{LoadedModel, SamplingParams};
use std::path::PathBuf;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Bench(a) => match a.what {
            Some(BenchCommand::Train(t)) => bench_train::run(t),
            Some(BenchCommand::Settle(s)) => bench_settle::run(s),
            None => bench::run(a),
        },
        Command::Train(a) => train::run(*a),
        Command::Gateway(a) => gateway::run(a),
        Command::Models {
            command: ModelsCommand::Inspect { path, json },
        } => models::inspect(&path, json),
        Command::Models {
            command: ModelsCommand::Fetch { model, force },
        } => models::fetch(&model, force),
        Command::Models {
            command: ModelsCommand::Requantize { path, to, out },
        } => models::requantize(&path, &to, &out),
        Command::Node(a) => node::run(a),
        Command::Up(a) => up::run(a),
        Command::Placement(a) => placement::run(a),
        Command::Keys { command } => ledger::keys(command),
        Command::Status(a) => ledger::status(a),
        Command::Wallet(a) => wallet::run(a),
        Command::Sim(a) => sim::run(a),
    }
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            penalty_last_n: 64,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }
}

/// Loads the model named by `--model` (default: [`model_path`]'s), with a spinner.
pub fn load_model(common: &CommonArgs) -> anyhow::Result<LoadedModel> {
    let path = model_path(common.model.as_deref())?;
    let pb = crate::progress::spinner(&format!("loading {}", path.display()));
    let model = plexus_model::load(&path)
        .with_context(|| format!("cannot load model {}", path.display()))?;
    pb.finish_and_clear();
    Ok(model)
}

/// The model a command runs: `--model` when given (a missing path is refused with a hint at
/// the default), else SmolLM2-135M-Instruct from the model cache, fetched first if needed.
pub fn model_path(given: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) if !p.exists() => anyhow::bail!(
            "model path {} does not exist\n  hint: `plexus models fetch` downloads \
             SmolLM2-135M-Instruct into the model cache and prints its path; `plexus up`, `chat`, \
             `generate` and `bench` use it when --model is left out",
            p.display()
        ),
        Some(p) => Ok(p.to_path_buf()),
        None => {
            let cache = cache_dir().context(
                "no cache directory for the default model: set PLEXUS_CACHE_DIR or give --model",
            )?;
            crate::fetch::default_model(&cache, true)
        }
    }
}

/// Where derived data (identity hashes) is cached: `$PLEXUS_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/plexus`, else `~/.cache/plexus`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PLEXUS_CACHE_DIR") {
        return Some(d.into());
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("plexus"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("plexus"))
}

/// Warns on stderr when the model's vocabulary has no token for some characters of `text`
/// (its tokenizer would drop them without a word), naming them.
pub fn warn_untokenizable(tokenizer: &plexus_model::Tokenizer, text: &str) {
    let missing = tokenizer.untokenizable(text);
    if !missing.is_empty() {
        eprintln!(
            "warning: the model's vocabulary has no token for {}: left out of the prompt",
            plexus_model::tokenizer::name_chars(&missing)
        );
    }
}
