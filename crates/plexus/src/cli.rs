//! Command-line flags (the raw layer). Every flag has a documented default.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "plexus",
    version,
    about = "Plexus: verified AI compute on ordinary machines"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text from a prompt; prints only the generated text to stdout.
    Generate(GenerateArgs),
    /// Chat interactively with a model using its chat template.
    Chat(ChatArgs),
    /// Train a starter model on a synthetic task.
    Train(TrainArgs),
    /// Measure prefill and decode speed and peak memory.
    Bench(BenchArgs),
    /// Serve a model over the OpenAI-compatible HTTP API.
    Gateway(crate::cmd::gateway::GatewayArgs),
    /// Inspect models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

impl Command {
    pub fn threads(&self) -> Option<usize> {
        match self {
            Command::Generate(a) => a.common.threads,
            Command::Chat(a) => a.common.threads,
            Command::Bench(a) => a.threads,
            Command::Train(a) => a.threads,
            Command::Gateway(a) => a.threads,
            Command::Models { .. } => None,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Seed of the counter-based sampler (same seed, same tokens).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Nucleus sampling threshold; 1 disables.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Keep only the K most likely tokens; 0 disables.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Drop tokens below this fraction of the top probability; 0 disables.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty over the last 64 tokens; 1 disables.
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Frequency penalty; 0 disables.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Presence penalty; 0 disables.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
}

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long, short)]
    pub model: PathBuf,
    /// CPU threads for the engine (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The prompt text (raw, unless --chat).
    #[arg(long, short)]
    pub prompt: String,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Print the generated token ids as JSON on stderr after the timing line.
    #[arg(long)]
    pub print_tokens: bool,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Maximum tokens per reply.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, short)]
    pub model: PathBuf,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated for the decode measurement.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Runs of each measurement; the mean is reported.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Synthetic task: addition, reverse or sort.
    #[arg(long, default_value = "addition")]
    pub task: String,
    /// Output directory for the checkpoint (safetensors + config.json + tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1500)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Warmup steps (linear), then cosine decay to 10% of the peak.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Gradient clipping by global norm.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Seed for initialisation and data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on the held-out split every N steps.
    #[arg(long, default_value_t = 250)]
    pub eval_every: usize,
    /// Held-out examples evaluated by exact match.
    #[arg(long, default_value_t = 500)]
    pub eval_examples: usize,
    /// Largest operand digits (addition) or sequence length (reverse, sort).
    #[arg(long, default_value_t = 3)]
    pub size: usize,
    /// Model width.
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    /// Model depth.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Architecture, sizes, quantization, tokenizer and identity hash of a model.
    Inspect {
        /// A .gguf file or a Hugging Face model directory.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a known model into the cache (unless it is there) and print its path.
    Fetch {
        /// Which model.
        #[arg(
            default_value = crate::fetch::SMOLLM2_135M_INSTRUCT,
            value_parser = [crate::fetch::SMOLLM2_135M_INSTRUCT]
        )]
        model: String,
        /// Download again even if the cache has it.
        #[arg(long)]
        force: bool,
    },
}
