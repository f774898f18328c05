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
    /// Train a starter model on a synthetic task, or join a distributed DiLoCo run (`--distributed
    /// SPEC`; `train spec` writes one, on a task or a text).
    Train(Box<TrainArgs>),
    /// Measure prefill and decode speed and peak memory.
    Bench(BenchArgs),
    /// Serve a model over the OpenAI-compatible HTTP API.
    Gateway(crate::cmd::gateway::GatewayArgs),
    /// Inspect models.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Serve a span of a model's layers to the network.
    Node(NodeArgs),
    /// Start a local network (nodes + gateway) on loopback and serve the OpenAI API.
    Up(UpArgs),
    /// Print the placement plan for a model from the nodes that announce it.
    Placement(PlacementArgs),
    /// API keys mapped to ledger accounts.
    Keys {
        #[command(subcommand)]
        command: crate::cmd::ledger::KeysCommand,
    },
    /// Accounts, stakes, escrow and earnings on a ledger (this node's account marked).
    Status(crate::cmd::ledger::StatusArgs),
    /// This node's account: address, balance, faucet, stake, unbond, claim, withdraw, history.
    Wallet(crate::cmd::wallet::WalletArgs),
    /// Adversarial simulation of Proof-of-Sampling audits over real engine calls.
    Sim(crate::cmd::sim::SimArgs),
}

impl Command {
    pub fn threads(&self) -> Option<usize> {
        match self {
            Command::Generate(a) => a.common.threads,
            Command::Chat(a) => a.common.threads,
            Command::Bench(a) => match &a.what {
                Some(BenchCommand::Train(t)) => t.threads,
                Some(BenchCommand::Settle(_)) => None,
                None => a.threads,
            },
            Command::Train(a) => a.threads,
            Command::Gateway(a) => a.threads,
            Command::Models { .. } => None,
            Command::Node(a) => a.threads,
            Command::Up(_)
            | Command::Placement(_)
            | Command::Keys { .. }
            | Command::Status(_)
            | Command::Wallet(_) => None,
            // The simulation runs its providers on their own thread pools.
            Command::Sim(_) => None,
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
    /// A .gguf file or a Hugging Face model directory (default: SmolLM2-135M-Instruct from the
    /// model cache, fetched if missing).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
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
    /// On a terminal: where the messages typed are kept for Up/Down across sessions (default
    /// `chat_history` in $PLEXUS_DATA_DIR, else ~/.local/share/plexus).
    #[arg(long, value_name = "FILE", conflicts_with = "no_history")]
    pub history: Option<PathBuf>,
    /// Keep no history file (Up/Down recall this session's messages only).
    #[arg(long)]
    pub no_history: bool,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchCommand>,
    /// Model to measure (prefill and decode speed, peak memory; default: SmolLM2-135M-Instruct
    /// from the model cache, fetched if missing).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated for the decode measurement.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Positions of context already in the cache before each measurement starts (as
    /// llama-bench's `-d`): decode from position 256 on takes llama.cpp's split-KV path.
    #[arg(long, default_value_t = 0)]
    pub depth: usize,
    /// Runs of each measurement; the mean is reported.
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Measure the batching engine instead: this many generations (distinct prompts of
    /// --prompt-tokens, --gen-tokens each) sent at once, beside the same generations one
    /// after another; a comma-separated list runs each level (`--concurrency 1,4,8`).
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Synchronous data parallel vs DiLoCo at equal tokens on a synthetic task or a text, in
    /// one process.
    Train(BenchTrainArgs),
    /// Settlements per second on a ledger (one request = hold + vouchers + settle).
    Settle(crate::cmd::bench_settle::BenchSettleArgs),
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Workers (in-process).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Inner steps per round (H) [default: 30].
    #[arg(long)]
    pub inner_steps: Option<u32>,
    /// Pseudo-gradient codec [default: f32]: f32, f16, int8 (blocks of 256), int8ans (int8
    /// entropy-coded) or sparse (top 64 of 4096, 2 bits); with parameters: int8/BLOCK,
    /// int8ans/BLOCK, sparse/KofCHUNK/BITSbit.
    #[arg(long)]
    pub codec: Option<String>,
    /// Several DiLoCo runs against one synchronous run, e.g. "10:f32 100:int8 30:sparse"
    /// (H:CODEC, space- or comma-separated); one JSON line each. Replaces --inner-steps/--codec.
    #[arg(long)]
    pub runs: Option<String>,
    /// Error feedback: auto (on for sparse only), on or off.
    #[arg(long, default_value = "auto")]
    pub error_feedback: String,
    /// Inner steps per worker over the whole run (a multiple of H); sync runs as many steps.
    #[arg(long, default_value_t = 600)]
    pub total_steps: usize,
    /// Data: a synthetic task (the default, --task/--size) or `text:FILE`, a UTF-8 text
    /// tokenized by characters and cut into sequences of --seq-len predictions (1/16 of them
    /// held out by hash).
    #[arg(long)]
    pub data: Option<String>,
    /// Predictions per text sequence (with --data text:FILE) [default: 64].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Synthetic task [default: reverse]: addition, reverse or sort.
    #[arg(long)]
    pub task: Option<String>,
    /// Task size (digits or letters) [default: 5].
    #[arg(long)]
    pub size: Option<usize>,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Model depth.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Sequences per inner step per worker (sync steps on workers x this).
    #[arg(long, default_value_t = 16)]
    pub batch_size: u32,
    /// Peak inner learning rate (warmup then cosine over the run).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Inner warmup steps.
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    /// Outer learning rate (default: 0.7 Nesterov as DiLoCo; for sparse 1.0 plain SGD, error
    /// feedback in place of momentum, as SparseLoCo).
    #[arg(long)]
    pub outer_lr: Option<f32>,
    /// Outer Nesterov momentum; 0 means plain SGD (default 0.9, for sparse 0).
    #[arg(long)]
    pub outer_momentum: Option<f32>,
    /// Held-out examples each round scores contributions on; 0 disables scoring.
    #[arg(long, default_value_t = 64)]
    pub score_examples: usize,
    /// A contribution is applied if the held-out loss with its share of the average is at
    /// most the loss without it times (1 + this).
    #[arg(long, default_value_t = plexus_train::score::HONEST_TOLERANCE)]
    pub score_tolerance: f32,
    /// Held-out examples of the final evaluation.
    #[arg(long, default_value_t = 512)]
    pub eval_examples: usize,
    /// Seed of weights, data and worker keys.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Skip the synchronous run: it is a pure function of seed, data, model, batch, inner
    /// learning rate and steps (bit-identical in every run that shares them), so a grid takes
    /// it from one run and the others leave it out. "sync" and the ratios print as null.
    #[arg(long)]
    pub no_sync: bool,
    /// With --data text:FILE: fine-tune this existing model (a GGUF file, read as f32, or a
    /// checkpoint directory) instead of a fresh one, the text tokenized with its tokenizer.
    #[arg(long, value_name = "PATH", requires = "data", conflicts_with_all = ["hidden", "layers"])]
    pub checkpoint: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TrainArgs {
    #[command(subcommand)]
    pub command: Option<TrainCommand>,
    /// Join the distributed run of this signed spec file (see `plexus train spec`) as a worker:
    /// DiLoCo rounds with the spec's other workers over libp2p. The single-machine flags
    /// (--task, --steps, ...) are refused with it: the spec decides them.
    #[arg(long, value_name = "SPEC", conflicts_with_all = [
        "task", "steps", "batch_size", "lr", "warmup", "clip", "seed", "eval_every",
        "eval_examples", "size", "hidden", "layers",
    ])]
    pub distributed: Option<PathBuf>,
    /// With --distributed: addresses to listen on (default TCP and QUIC on all interfaces,
    /// ports chosen by the OS).
    #[arg(long, value_name = "ADDR", requires = "distributed")]
    pub listen: Vec<String>,
    /// With --distributed: peers of the run to join through (`/ip4/.../tcp/.../p2p/<peer id>`).
    #[arg(long, value_name = "ADDR", requires = "distributed")]
    pub peer: Vec<String>,
    /// With --distributed: the worker's key (`node.key`), per-round checkpoint
    /// (`train-state.bin`) and final model (`model/`, unless --out) live here (default
    /// $PLEXUS_DATA_DIR, else ~/.local/share/plexus).
    #[arg(long, value_name = "DIR", requires = "distributed")]
    pub data_dir: Option<PathBuf>,
    /// Test-only misbehaviour of a distributed worker: `garbage` (undecodable pseudo-gradients
    /// and messages), `stale` (last round's contribution re-sent as this round's), `lazy`
    /// (trains on examples other than its assigned ones and commits as if it had not), `ahead`
    /// (claims a later round than its own, with a made-up state to match), `behind` (claims to
    /// be at round 0, forever, and sends no contribution), `harmful` (its pseudo-gradient reversed and
    /// scaled by 4, validly committed), `withhold` (seals an audit nonce it never tells) or
    /// `bad-state` (flips a bit of every value in the ranges of the global state it serves).
    #[arg(long, hide = true, requires = "distributed")]
    pub cheat: Option<String>,
    /// With --distributed, for a run whose spec asks a stake: the run's ledger, the same for
    /// every worker (sqlite://PATH on one machine, postgres://USER:PASS@HOST/DB across
    /// machines). The worker's account (the address of its node key, `plexus wallet address`)
    /// must hold the spec's stake; other workers' contributions count only while theirs do,
    /// and a worker an audit convicts is slashed on it. Refused for a run without stake.
    #[arg(long, value_name = "URL", requires = "distributed")]
    pub ledger: Option<String>,
    /// With --distributed: the text file of a text run (the spec names its digest; another
    /// file is refused). Refused for a synthetic-task run.
    #[arg(long, value_name = "FILE", requires = "distributed")]
    pub text: Option<PathBuf>,
    /// With --distributed: the model a fine-tuning run starts from (a GGUF file or a checkpoint
    /// directory; the spec names its digest; another is refused). Refused for a run that
    /// trains a fresh model.
    #[arg(long, value_name = "PATH", requires = "distributed")]
    pub checkpoint: Option<PathBuf>,
    /// With --distributed: exit when this process id is gone or stdin closes (used by
    /// `plexus up --train`).
    #[arg(long, hide = true, requires = "distributed")]
    pub parent_pid: Option<u32>,
    /// Synthetic task: addition, reverse or sort.
    #[arg(long, default_value = "addition")]
    pub task: String,
    /// Output directory for the checkpoint (safetensors + config.json + tokenizer.json).
    /// Required without --distributed.
    #[arg(long)]
    pub out: Option<PathBuf>,
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
pub enum TrainCommand {
    /// Write a signed run spec for `plexus train --distributed` (signed with the node key of
    /// --data-dir, created on first use).
    Spec(TrainSpecArgs),
}

#[derive(Args, Debug)]
pub struct TrainSpecArgs {
    /// The spec file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Directory holding the creator's `node.key` (default $PLEXUS_DATA_DIR, else
    /// ~/.local/share/plexus).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Name of the run.
    #[arg(long, default_value = "diloco")]
    pub name: String,
    /// Synthetic task: addition, reverse or sort.
    #[arg(long, default_value = "reverse")]
    pub task: String,
    /// Task size (digits or letters).
    #[arg(long, default_value_t = 4)]
    pub size: usize,
    /// Train on this UTF-8 text instead of a synthetic task (character tokens, windows held
    /// out by hash): the spec records its sha256, and every worker passes the same file with
    /// `plexus train --distributed SPEC --text FILE`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["task", "size"])]
    pub text: Option<PathBuf>,
    /// With --text: predictions per training window (default 32).
    #[arg(long, requires = "text")]
    pub seq_len: Option<usize>,
    /// Fine-tune this existing model (a GGUF file, any quantization, read as f32; or a
    /// checkpoint directory) instead of training a fresh one: the spec records the digest of
    /// its files, the text is tokenized with its tokenizer, and every worker passes the same
    /// model with `--checkpoint PATH`. Needs --text.
    #[arg(long, value_name = "PATH", requires = "text", conflicts_with_all = [
        "hidden", "layers", "init_seed",
    ])]
    pub checkpoint: Option<PathBuf>,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Model depth.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    pub init_seed: u64,
    /// Seed of the data, its assignment to workers and the scoring draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Workers connected before round 0 starts (this one included).
    #[arg(long, default_value_t = 2)]
    pub workers_min: u32,
    /// Most contributions a round holds.
    #[arg(long, default_value_t = 64)]
    pub workers_max: u32,
    /// Rounds of the run.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Inner steps per round (H).
    #[arg(long, default_value_t = 30)]
    pub inner_steps: u32,
    /// Sequences per inner step per worker.
    #[arg(long, default_value_t = 16)]
    pub batch_size: u32,
    /// Peak inner AdamW learning rate (warmup, then cosine over the run's inner steps).
    #[arg(long, default_value_t = 1e-2)]
    pub lr: f64,
    /// Inner warmup steps.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Gradient clipping by global norm; 0 disables.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Outer learning rate (DiLoCo: 0.7).
    #[arg(long, default_value_t = 0.7)]
    pub outer_lr: f32,
    /// Outer Nesterov momentum; 0 means plain SGD.
    #[arg(long, default_value_t = 0.9)]
    pub outer_momentum: f32,
    /// Pseudo-gradient codec: f32, f16, int8 (blocks of 256), int8ans (int8 entropy-coded) or
    /// sparse (top 64 of 4096, 2 bits).
    #[arg(long, default_value = "f16")]
    pub codec: String,
    /// Error feedback: auto (on for sparse only), on or off.
    #[arg(long, default_value = "auto")]
    pub error_feedback: String,
    /// Round deadline before any round was measured, in ms.
    #[arg(long, default_value_t = 60_000)]
    pub deadline_initial_ms: u64,
    /// Shortest round deadline, in ms.
    #[arg(long, default_value_t = 1_000)]
    pub deadline_min_ms: u64,
    /// Longest round deadline, in ms.
    #[arg(long, default_value_t = 600_000)]
    pub deadline_max_ms: u64,
    /// Deadline = median + k x MAD of measured arrival times.
    #[arg(long, default_value_t = 3.0)]
    pub deadline_k: f64,
    /// ... and at least the median x (1 + slack): the headroom a round gives when arrival
    /// times barely vary (MAD near 0, as with two workers). The deadline only matters when a
    /// worker crashed or stalls (a round closes as soon as every expected contribution is in),
    /// so it is generous: at 0.25, two workers of a 135M fine-tune on one machine missed it
    /// when one's close slowed the other's training. A round in which every worker is slower
    /// than this closes empty (the deadline then restarts from those late times: one round
    /// lost, not the run).
    #[arg(long, default_value_t = 1.0)]
    pub deadline_slack: f64,
    /// Held-out examples each round scores contributions on; 0 disables scoring.
    #[arg(long, default_value_t = 32)]
    pub score_examples: usize,
    /// A contribution is applied if the held-out loss with its share of the average is at
    /// most the loss without it times (1 + this). 0 asks every contribution to improve the
    /// loss on its own, which honest ones fail by noise on a few examples.
    #[arg(long, default_value_t = plexus_train::score::HONEST_TOLERANCE)]
    pub score_tolerance: f32,
    /// Held-out examples of the final evaluation.
    #[arg(long, default_value_t = 256)]
    pub eval_examples: usize,
    /// Probability that a round's contribution is audited: every worker re-executes it from
    /// its commitment before closing the round (its own worker too), and one that does not
    /// match is dropped and its worker refused for the rest of the run. Each worker re-executes
    /// about this rate times the workers' count of rounds per round. 0 disables audits.
    #[arg(long, default_value_t = 0.05)]
    pub audit_rate: f64,
    /// Delegated auditors per drawn contribution: only these workers (drawn with the round's
    /// audit nonces) re-execute it; the others take their verdicts, and re-execute it
    /// themselves only on a mismatch or when no verdict comes. Default: every worker audits.
    #[arg(long, value_name = "K")]
    pub auditors: Option<u32>,
    /// Stake every worker must hold on the run's ledger (`1.5PLX` or ledger units) for its
    /// contributions to count; a worker an audit convicts is slashed there. Workers then join
    /// with `--ledger URL` (the operator's ledger, the same for all). Default: no stake.
    #[arg(long, value_name = "AMOUNT")]
    pub min_stake: Option<String>,
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
    /// Write a GGUF model with its weight matrices in another quantization type (the same
    /// weights at another precision, e.g. a substitute model for `plexus sim`).
    Requantize {
        /// The .gguf file to read.
        path: PathBuf,
        /// Target type: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16 or f32.
        #[arg(long)]
        to: String,
        /// Where to write the new file.
        #[arg(long)]
        out: PathBuf,
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

/// Flags shared by everything that joins the network.
#[derive(Args, Debug, Clone)]
pub struct NetArgs {
    /// Address to listen on (repeatable). Default: TCP and QUIC on all interfaces, OS-chosen
    /// ports.
    #[arg(long)]
    pub listen: Vec<String>,
    /// Peer to join through, as a multiaddr ending in /p2p/<peer id> (repeatable).
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// Find peers on the local network with mDNS.
    #[arg(long)]
    pub mdns: bool,
    /// Directory for the node key (created on first start). Default: $PLEXUS_DATA_DIR, else
    /// $XDG_DATA_HOME/plexus, else ~/.local/share/plexus.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long, short)]
    pub model: PathBuf,
    /// Layers to serve, as start..end, or `auto` to take the span placement assigns and move
    /// as nodes join or leave (default: all).
    #[arg(long)]
    pub span: Option<String>,
    /// With `--span auto` or `--follow-placement`: stages per chain (default: the fewest whose
    /// memory holds the model).
    #[arg(long)]
    pub stages: Option<usize>,
    /// With `--span a..b`: start on that span, then move to the span placement assigns as
    /// nodes join and leave (survivors take over the layers of a node that died).
    #[arg(long)]
    pub follow_placement: bool,
    /// Placement treats every node as equally fast (`plexus up`: nodes on one machine).
    #[arg(long, hide = true)]
    pub plan_equal_speeds: bool,
    #[command(flatten)]
    pub net: NetArgs,
    /// Most sessions (KV caches) held at once; the least recently used goes first.
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,
    /// Seconds an idle session is kept.
    #[arg(long, default_value_t = 300)]
    pub session_ttl: u64,
    /// Stage calls waiting for the engine before new ones are refused as busy.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// KV cache memory for all sessions, in MiB; a call whose session cannot grow evicts idle
    /// sessions, else it is refused as busy. Default: half the memory available at start.
    #[arg(long)]
    pub kv_budget_mib: Option<u64>,
    /// Positions per batched engine step (decodes of all sessions plus chunks of prompts).
    #[arg(long, default_value_t = plexus_model::batch::STEP_POSITIONS)]
    pub step_positions: usize,
    /// Most positions one stage call may carry.
    #[arg(long, default_value_t = plexus_core::wire::MAX_POSITIONS)]
    pub max_call_positions: usize,
    /// Asking price, micro-PLX per 1000 positions through one layer (announced, and signed into
    /// the receipt of every stage call; gateways pay it into this node's account, the address
    /// of its node key). At most 1000000000.
    #[arg(long, default_value_t = 0)]
    pub price: u64,
    /// CPU threads for the engine (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Exit when this process id is gone (used by `plexus up`).
    #[arg(long, hide = true)]
    pub parent_pid: Option<u32>,
    /// Never load layers outside the served span. By default a node does, to check other
    /// nodes' work: for the gateways' audits of spans that no other node serves (announced as
    /// `check_layers`: what free memory holds beyond the unused KV budget).
    #[arg(long)]
    pub no_checks: bool,
    /// Trust this gateway's verdicts (its peer id; repeatable): nodes it announces as
    /// convicted by audit are left out of placement, so the layers a convicted node served
    /// alone are taken over by the others; beside a node it doubts (audit misses improbable
    /// for an honest node, short of a conviction) placement puts a spare node, if any.
    #[arg(long, value_name = "PEER")]
    pub trust_verdicts: Vec<String>,
    /// Tests only: return wrong results (`random`, `noise` or `token`, see plexus_node::cheat), so
    /// audits can be tested against a real cheating process.
    #[arg(long, hide = true, value_name = "KIND")]
    pub cheat: Option<plexus_node::cheat::Cheat>,
    /// Tests only: compute prompts with another honest arithmetic (`untiled`: as builds before
    /// the tiled attention kernel), announced as another build, so audits across builds are
    /// tested against a real difference.
    #[arg(long, hide = true, value_name = "KIND", default_value = "current")]
    pub arithmetic: plexus_node::engine::Arithmetic,
    /// Tests only: announce this decode speed (seconds per layer per token) instead of the
    /// measured one, so placement's check of claimed speeds is tested against a real liar.
    #[arg(long, hide = true, value_name = "SECONDS")]
    pub claim_decode_s_per_layer: Option<f64>,
    #[command(flatten)]
    pub nat: NatArgs,
}

/// NAT traversal flags of `plexus node`. Without them a node still learns from AutoNAT whether
/// it can be dialed and, if not, listens through up to two relays among its peers.
#[derive(Args, Debug, Clone)]
pub struct NatArgs {
    /// Serve as a circuit relay v2 for nodes behind NAT (this node must be publicly reachable
    /// at its listen addresses; relays are bounded by the --relay-* flags below).
    #[arg(long)]
    pub relay: bool,
    /// Listen through this relay (a multiaddr ending in /p2p/<relay peer id>) whatever AutoNAT
    /// says; repeatable.
    #[arg(long, value_name = "ADDR")]
    pub relay_via: Vec<String>,
    /// With --relay: nodes holding a reservation (a relayed address) at once.
    #[arg(long, requires = "relay", default_value_t = 128)]
    pub relay_max_reservations: usize,
    /// With --relay: relayed connections at once.
    #[arg(long, requires = "relay", default_value_t = 64)]
    pub relay_max_circuits: usize,
    /// With --relay: relayed connections at once per peer (either end).
    #[arg(long, requires = "relay", default_value_t = 8)]
    pub relay_max_circuits_per_peer: usize,
    /// With --relay: seconds after which a relayed connection is closed (its peers dial again).
    #[arg(long, requires = "relay", default_value_t = 600)]
    pub relay_circuit_secs: u64,
    /// With --relay: MiB (both directions) after which a relayed connection is closed.
    #[arg(long, requires = "relay", default_value_t = 256)]
    pub relay_circuit_mib: u64,
}

#[derive(Args, Debug)]
pub struct PlacementArgs {
    /// Model identity (sha256 hex or a prefix of it) or name, as announced by nodes.
    #[arg(long)]
    pub model: String,
    #[command(flatten)]
    pub net: NetArgs,
    /// Stages per chain (default: the fewest whose memory holds the model).
    #[arg(long)]
    pub stages: Option<usize>,
    /// Seconds to listen for announcements before planning.
    #[arg(long, default_value_t = 3.0)]
    pub wait: f64,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Node processes to split the model across (with --train: training workers).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Run the distributed training of this signed spec (`plexus train spec`) on this machine
    /// instead of serving: --nodes worker processes that find each other on loopback and are
    /// restarted from their checkpoints if one fails. A spec that asks a stake settles on
    /// --ledger (default a SQLite file in the run's directory), each worker staked from its
    /// faucet. The serving flags are refused with it.
    #[arg(long, value_name = "SPEC", conflicts_with_all = [
        "port", "host", "model", "wire", "static_spans", "api_key", "cors_origins", "alias",
        "challenge_window", "faucet", "price", "node_price", "stages", "node_stake",
        "cheat", "max_price", "time_value", "audit_probability", "collusion", "audit_referees",
        "node0_arithmetic",
    ])]
    pub train: Option<PathBuf>,
    /// With --train: the text file of a text run (the spec names its digest).
    #[arg(long, value_name = "FILE", requires = "train")]
    pub text: Option<PathBuf>,
    /// With --train: the model a fine-tuning run starts from (a GGUF file or a checkpoint
    /// directory; the spec names its digest).
    #[arg(long, value_name = "PATH", requires = "train")]
    pub checkpoint: Option<PathBuf>,
    /// Port of the OpenAI-compatible API (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Host to bind the API to.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Model file or directory (default: SmolLM2-135M-Instruct from the cache, fetched if
    /// missing).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// CPU threads per node process (default: all cores for every node: only one stage of a
    /// chain computes at a time, see BENCHMARKS.md).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Activations between stages: f32 (default: exact, the tokens of one process), f16 or
    /// int8 (half or a quarter of the bytes for slow links; answers may part from the
    /// single-process ones where two tokens nearly tie).
    #[arg(long, default_value = "f32")]
    pub wire: String,
    /// Keep every node on its first span. By default nodes follow placement, so when one dies
    /// the survivors load its layers and streams go on.
    #[arg(long)]
    pub static_spans: bool,
    /// Require this static key from clients (`Authorization: Bearer KEY` or `x-api-key: KEY`);
    /// /health stays open. Only with `--ledger none`: with a ledger, clients authenticate with
    /// their per-account keys instead, and giving both is refused.
    #[arg(long, env = "PLEXUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Also allow browser pages from this origin (repeatable; `*`: any). Pages served from
    /// localhost are always allowed.
    #[arg(long = "cors-origin")]
    pub cors_origins: Vec<String>,
    /// The name clients put in "model" and see in /v1/models (llama-server's `--alias`;
    /// default: the file name without .gguf and quant tag, which is accepted too).
    #[arg(long, visible_alias = "model-id")]
    pub alias: Option<String>,
    #[command(flatten)]
    pub ledger: crate::cmd::ledger::LedgerArgs,
    #[command(flatten)]
    pub rules: crate::cmd::ledger::LedgerRulesArgs,
    /// Starting balance of the dev API key `plexus up` creates (micro-PLX, or e.g. `100PLX`;
    /// default 100PLX). Refused with `--ledger none`, which has no balances.
    #[arg(long, value_parser = crate::cmd::ledger::parse_amount, value_name = "AMOUNT")]
    pub faucet: Option<plexus_ledger::Amount>,
    /// Price per completion token, in micro-PLX (default 1). Refused with `--ledger none`,
    /// which charges nothing.
    #[arg(long)]
    pub price: Option<plexus_ledger::Amount>,
    /// Asking price of every node, micro-PLX per 1000 positions per layer (what `plexus node
    /// --price` announces). Each node is paid its receipted work at this price out of the
    /// client's charge; the gateway keeps the rest.
    #[arg(long, default_value_t = 10)]
    pub node_price: u64,
    /// Stages per chain (default: --nodes, one chain without replicas). Fewer stages than
    /// nodes gives spans several servers, which audits need (an auditor serves the same span).
    #[arg(long)]
    pub stages: Option<usize>,
    /// Stake each node's account bonds on the ledger at start (micro-PLX, or e.g. `100PLX`;
    /// from the local faucet). A provider's audit probability falls as its stake grows; a
    /// caught cheater loses it. Default 100PLX; refused with `--ledger none`.
    #[arg(long, value_parser = crate::cmd::ledger::parse_amount, value_name = "AMOUNT")]
    pub node_stake: Option<plexus_ledger::Amount>,
    /// Tests only: node 0 cheats this way (`plexus node --cheat`) and asks price 0, so routing
    /// prefers it.
    #[arg(long, hide = true, value_name = "KIND")]
    pub cheat: Option<plexus_node::cheat::Cheat>,
    /// Start the nodes with `--no-checks`: they never load each other's spans to audit them,
    /// so a span with a single server goes unaudited.
    #[arg(long)]
    pub no_node_checks: bool,
    /// Tests only: node 0 computes with this arithmetic (`plexus node --arithmetic`), so it
    /// announces a build no other node has, and asks price 0 so routing prefers it.
    #[arg(long, hide = true, value_name = "KIND", default_value = "current")]
    pub node0_arithmetic: plexus_node::engine::Arithmetic,
    #[command(flatten)]
    pub routing: crate::cmd::gateway::RoutingArgs,
}
