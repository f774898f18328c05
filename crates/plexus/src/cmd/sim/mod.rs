//! `plexus sim`: an adversarial simulation of Proof-of-Sampling audits over real engine calls.
//!
//! Every job runs the real model as a two-stage chain (layers `0..15` and `15..30`), each stage
//! served by a simulated provider; every audit, referee vote and planted known-answer audit
//! is a real teacher-forced replay. Payments, slashes and refunds go through a real
//! `plexus-ledger` state machine. What is simulated is only the network: the nodes live in
//! this process and time advances one second per job.
//!
//! Per job: protocol seed -> route (reputation-weighted) -> providers compute (cheaters cheat
//! on a share `--cheat-rate` of their jobs) -> commitments (fingerprint digests) -> escrow and
//! settlement -> keyed draw per provider at `max(PoSP p, 0.1 / (1 + audits passed))` (newcomers
//! are watched more) -> audit by
//! another node of the span (told nothing of the provider's answer) -> exact comparison and
//! token check -> on a mismatch, three referees and a majority verdict -> slash the cheater
//! (or the false accuser) and exclude it. With probability 0.1 per audit, the auditor also
//! gets a planted audit: a past job whose answer a referee majority confirmed. A conviction
//! re-examines the audits the convicted node passed (a colluding auditor vouched for them).

mod nodes;

use anyhow::{bail, Context as _};
use clap::Args;
use nodes::{population, Kind, Node, SPLIT};
use plexus_core::rng::{bits, Stream};
use plexus_ledger::{Address, Config as LedgerConfig, Ledger, Payout, RequestId};
use plexus_model::{LayerSpan, ModelFiles, SamplingParams, Stage};
use plexus_verify::arbitration::{Case, State, Verdict, Vote};
use plexus_verify::compare::{compare, Mode};
use plexus_verify::draw::{DrawKey, Posp};
use plexus_verify::fingerprint::{fingerprint, Fingerprint, Scheme};
use plexus_verify::known_answer::{check_planted, plants, PlantedOutcome};
use plexus_verify::replay::{replay, run_chain, Input, LastStage};
use plexus_verify::seed::{commit_secret, protocol_seed};
use plexus_verify::tokens::check_tokens;
use plexus_verify::Commitment;
use sha2::{Digest as _, Sha256};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `plexus sim` flags.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// Jobs (requests) to run.
    #[arg(long, default_value_t = 200)]
    pub jobs: u64,
    /// Seed of everything random in the run (routes, draws, cheating, secrets).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model file (default: SmolLM2-135M-Instruct from the cache, fetched if missing).
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// The model the substitute cheater serves (default: the model re-quantized to Q4_0).
    #[arg(long)]
    pub substitute_model: Option<PathBuf>,
    /// Tokens generated per job.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// Share of its jobs (audits, for the lazy auditor) each cheater cheats on.
    #[arg(long, default_value_t = 1.0)]
    pub cheat_rate: f64,
    /// Print one JSON object (otherwise a summary table).
    #[arg(long)]
    pub json: bool,
}

/// Price of one stage-job, what it costs an honest provider, and stake, in micro-PLX.
const PRICE: u64 = 2_000;
const COST: u64 = 1_000;
const STAKE: u64 = 1_000_000;
/// Planting rate of known-answer audits, per audit sent.
const PLANT_RATE: f64 = 0.1;
/// Audit probability of a node with no passed audit (it decays as `1 / (1 + passed)` down to
/// the PoSP probability).
const NEWCOMER_RATE: f64 = 0.1;
/// Known answers kept to plant: answers a referee majority confirmed.
const KNOWN_ANSWERS: usize = 8;
/// Referees per case.
const REFEREES: usize = 3;
const SCHEMES: [Scheme; 1] = [Scheme::DEFAULT];

const PROMPTS: [&str; 8] = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Three reasons to learn Rust are",
    "In 1969, the first humans",
    "The capital of France is",
    "A recipe for pancakes:",
    "Explain photosynthesis to a child.",
];

/// The engine state shared by every simulated node.
struct Engine {
    real: Vec<Stage>,
    sub: Vec<Stage>,
    skip: Stage,
    eos: Vec<u32>,
    vocab: usize,
    prompts: Vec<Vec<u32>>,
    pools: Vec<rayon::ThreadPool>,
}

/// A node's answer to an audit: its fingerprint and whether the provider's tokens check out.
#[derive(Clone, Debug, PartialEq)]
struct Answer {
    print: Fingerprint,
    tokens_ok: bool,
}

/// What an audit is about.
struct Job<'a> {
    slot: usize,
    input: &'a Input,
    prompt: &'a [u32],
    tokens: &'a [u32],
    params: &'a SamplingParams,
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn load_stages(path: &std::path::Path, layers: &[LayerSpan]) -> anyhow::Result<Vec<Stage>> {
    let files =
        ModelFiles::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    layers
        .iter()
        .map(|&s| {
            files
                .stage(Some(s), plexus_model::layers::Mode::Infer)
                .with_context(|| format!("cannot load layers {s} of {}", path.display()))
        })
        .collect()
}

impl Engine {
    fn load(model: &std::path::Path, substitute: &std::path::Path) -> anyhow::Result<Self> {
        let files =
            ModelFiles::open(model).with_context(|| format!("cannot open {}", model.display()))?;
        let n = files.config.num_layers;
        if n <= SPLIT {
            bail!("the simulation splits the model at layer {SPLIT}; this one has {n} layers");
        }
        let spans = [LayerSpan::new(0, SPLIT), LayerSpan::new(SPLIT, n)];
        let real = load_stages(model, &spans)?;
        let sub = load_stages(substitute, &spans)?;
        if sub[1].config().vocab_size != files.config.vocab_size
            || sub[0].config().hidden_size != files.config.hidden_size
        {
            bail!(
                "the substitute model {} does not have the model's vocabulary and hidden size",
                substitute.display()
            );
        }
        let skip = load_stages(model, &[LayerSpan::new(0, SPLIT / 2)])?.remove(0);
        let tok = files.tokenizer()?;
        let prompts = PROMPTS
            .iter()
            .map(|p| tok.encode(p, true))
            .collect::<Result<Vec<_>, _>>()?;
        let pools = (1..=2)
            .map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            real,
            sub,
            skip,
            eos: files.config.eos_token_ids.clone(),
            vocab: files.config.vocab_size,
            prompts,
            pools,
        })
    }

    fn on<R: Send>(&self, node: &Node, f: impl FnOnce() -> R + Send) -> R {
        let pool = &self.pools[node.threads.clamp(1, 2) - 1];
        if node.scalar {
            pool.install(|| {
                plexus_model::kernels::with_backend(plexus_model::kernels::Backend::Scalar, f)
            })
        } else {
            pool.install(f)
        }
    }

    /// An honest recomputation of `job` on `node`'s settings.
    fn recompute(&self, node: &Node, job: &Job<'_>) -> anyhow::Result<Answer> {
        let stage = &self.real[job.slot];
        let r = self.on(node, || {
            replay(stage, job.input, 4096, &SCHEMES, job.prompt.len())
        })?;
        let tokens_ok = match &r.logits {
            Some(l) => {
                check_tokens(l, self.vocab, job.prompt, job.tokens, job.params)?.mismatches() == 0
            }
            None => true,
        };
        let print = r.prints.into_iter().next().context("no fingerprint")?;
        Ok(Answer { print, tokens_ok })
    }

    /// What a lazy auditor returns: a fingerprint of nothing, in the right layout, and "fine".
    fn fabricate(&self, job: &Job<'_>) -> anyhow::Result<Answer> {
        let last = job.slot == 1;
        let width = if last {
            self.vocab
        } else {
            self.real[0].config().hidden_size
        };
        let from = if last { job.prompt.len() - 1 } else { 0 };
        let rows = job.input.positions() - from;
        let print = fingerprint(SCHEMES[0], width, from as u64, &vec![0.0; rows * width])?;
        Ok(Answer {
            print,
            tokens_ok: true,
        })
    }
}

/// A job whose answer a referee majority confirmed: (slot, input, prompt, tokens, params,
/// answer).
type Known = (usize, Input, Vec<u32>, Vec<u32>, SamplingParams, Answer);

/// An audit that passed: who vouched for whose answer, and the job to replay it.
struct Passed {
    provider: usize,
    auditor: usize,
    slot: usize,
    input: Input,
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    params: SamplingParams,
    claimed: Answer,
    request: RequestId,
}

/// Passed audits kept for re-examination (bounded memory).
const PASSED_KEPT: usize = 512;

/// Counters of one run.
#[derive(Default)]
struct Tally {
    audits: u64,
    planted: u64,
    cases: u64,
    referee_replays: u64,
    honest_comparisons: u64,
    honest_false_alarms: u64,
    provider_time: Duration,
    audit_time: Duration,
    provider_positions: u64,
    audit_positions: u64,
    fingerprint_bytes: u64,
    chain_positions: u64,
    tokens: u64,
}

struct Sim {
    engine: Engine,
    nodes: Vec<Node>,
    ledger: Ledger,
    key: DrawKey,
    seed: u64,
    p_posp: f64,
    cheat_rate: f64,
    max_tokens: usize,
    client: Address,
    gateway: Address,
    known: Vec<Known>,
    /// Audits that passed, still inside the challenge window (the most recent
    /// [`PASSED_KEPT`]): re-examined when their provider is convicted.
    passed: std::collections::VecDeque<Passed>,
    t: Tally,
}

pub fn run(a: SimArgs) -> anyhow::Result<()> {
    let report = simulate(&a)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Runs the simulation and returns its JSON report.
pub fn simulate(a: &SimArgs) -> anyhow::Result<serde_json::Value> {
    if !(0.0..=1.0).contains(&a.cheat_rate) {
        bail!("--cheat-rate must be in [0, 1], got {}", a.cheat_rate);
    }
    if a.jobs == 0 || a.max_tokens == 0 {
        bail!("--jobs and --max-tokens must be at least 1");
    }
    let model = super::model_path(a.model.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let substitute = match &a.substitute_model {
        Some(p) => p.clone(),
        None => {
            let p = tmp.path().join("substitute-q4_0.gguf");
            plexus_model::requant::requantize(&model, &p, candle_core::quantized::GgmlDType::Q4_0)
                .context("cannot make the default substitute (the model in Q4_0)")?;
            p
        }
    };
    let engine = Engine::load(&model, &substitute)?;
    let nodes = population();
    let auditors_b = nodes
        .iter()
        .filter(|n| n.span == 1 && n.kind.audits())
        .count();
    let colluding = nodes
        .iter()
        .filter(|n| n.kind == Kind::ColludingAuditor)
        .count();
    let collusion = colluding as f64 / auditors_b as f64;
    let posp = Posp {
        cost: COST,
        reward: PRICE,
        slash: STAKE,
        collusion,
        margin: 2.0,
        floor: 0.01,
    };
    let p_posp = posp.probability()?;
    let mut ledger = Ledger::new(LedgerConfig::default());
    let (client, gateway) = (Address::from([0xc1; 20]), Address::from([0x9a; 20]));
    let mut fund = |who: Address, amount: u64, stake: bool| -> anyhow::Result<()> {
        ledger.deposit(who, amount, 0)?;
        if stake {
            ledger.stake(who, amount, 0)?;
        }
        Ok(())
    };
    fund(client, a.jobs * PRICE * 2 + 1, false)?;
    for n in &nodes {
        fund(n.addr, STAKE, true)?;
    }
    let mut sim = Sim {
        engine,
        nodes,
        ledger,
        key: DrawKey::new(hash(&[b"plexus/sim/key", &a.seed.to_le_bytes()])),
        seed: a.seed,
        p_posp,
        cheat_rate: a.cheat_rate,
        max_tokens: a.max_tokens,
        client,
        gateway,
        known: Vec::new(),
        passed: std::collections::VecDeque::new(),
        t: Tally::default(),
    };
    let started = Instant::now();
    for j in 0..a.jobs {
        sim.job(j).with_context(|| format!("job {j}"))?;
    }
    sim.ledger
        .check_invariants()
        .map_err(|e| anyhow::anyhow!("ledger invariants: {e:?}"))?;
    Ok(sim.report(a, posp, started.elapsed()))
}

impl Sim {
    fn u(&self, label: &[u8], parts: &[u64]) -> f64 {
        let msg: Vec<u8> = parts.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.key.uniform_for(label, &msg)
    }

    /// A reputation-weighted pick among the live nodes of `span` passing `ok`.
    fn pick(&self, span: usize, ok: impl Fn(&Node) -> bool, salt: &[u64]) -> Option<usize> {
        let live: Vec<(usize, f64)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.span == span && !n.excluded && ok(n))
            .map(|(i, n)| (i, n.record.score(1.0).max(1e-3)))
            .collect();
        let total: f64 = live.iter().map(|x| x.1).sum();
        let mut x = self.u(b"plexus/sim/pick", salt) * total;
        for &(i, w) in &live {
            if x < w {
                return Some(i);
            }
            x -= w;
        }
        live.last().map(|x| x.0)
    }

    fn audit_rate(&self, node: &Node) -> f64 {
        self.p_posp
            .max(NEWCOMER_RATE / (1.0 + node.record.audits_passed as f64))
    }

    fn job(&mut self, j: u64) -> anyhow::Result<()> {
        let now = 1_000 + j * 1_000;
        let request = RequestId(hash(&[
            b"plexus/sim/request",
            &self.seed.to_le_bytes(),
            &j.to_le_bytes(),
        ]));
        let secret = hash(&[
            b"plexus/sim/secret",
            &self.seed.to_le_bytes(),
            &j.to_le_bytes(),
        ]);
        let params = SamplingParams {
            seed: protocol_seed(&request.0, &commit_secret(&secret)),
            ..SamplingParams::default()
        };
        let prompt = self.engine.prompts[(j as usize) % self.engine.prompts.len()].clone();
        let a = self
            .pick(0, |_| true, &[j, 0])
            .context("no provider for the first span")?;
        let b = self
            .pick(1, |_| true, &[j, 1])
            .context("no provider for the last span")?;
        let cheats = |s: &Self, i: usize| {
            s.nodes[i].kind.cheats_providing()
                && s.u(b"plexus/sim/cheat", &[j, i as u64]) < s.cheat_rate
        };
        let (cheat_a, cheat_b) = (cheats(self, a), cheats(self, b));
        let e = &self.engine;
        let stage_a = match (cheat_a, self.nodes[a].kind) {
            (true, Kind::Substitute) => &e.sub[0],
            (true, Kind::SkipLayers) => &e.skip,
            _ => &e.real[0],
        };
        let stage_b = match (cheat_b, self.nodes[b].kind) {
            (true, Kind::Substitute) => &e.sub[1],
            _ => &e.real[1],
        };
        let random: Vec<u32> = (0..self.max_tokens as u64)
            .map(|i| bits(self.seed ^ j, Stream::Audit, i, 77)[0] % e.vocab as u32)
            .collect();
        let last = match (cheat_b, self.nodes[b].kind) {
            (true, Kind::RandomTokens | Kind::Colluder) => LastStage::Scripted(random),
            (true, Kind::Copy) if !self.nodes[b].last_tokens.is_empty() => {
                LastStage::Scripted(self.nodes[b].last_tokens.clone())
            }
            (true, Kind::Copy) => LastStage::Scripted(random),
            (true, Kind::Truncation) => LastStage::Truncate {
                after: self.max_tokens / 2,
                eos: e.eos.first().copied().unwrap_or(0),
            },
            _ => LastStage::Honest,
        };
        let t0 = Instant::now();
        let chain = [stage_a, stage_b];
        let run = e.on(&self.nodes[a], || {
            run_chain(
                &chain,
                &prompt,
                self.max_tokens,
                &params,
                self.nodes[a].chunk,
                &SCHEMES,
                &e.eos,
                &last,
            )
        })?;
        self.t.provider_time += t0.elapsed();
        let fed = (prompt.len() + run.tokens.len() - 1) as u64;
        self.t.provider_positions += run.computed.iter().sum::<u64>();
        self.t.chain_positions += fed;
        self.t.tokens += run.tokens.len() as u64;
        let commits: Vec<Commitment> = run
            .stages
            .iter()
            .enumerate()
            .map(|(s, (_, prints))| Commitment {
                fingerprint: prints[0].clone(),
                tokens: if s == 1 {
                    run.tokens.clone()
                } else {
                    Vec::new()
                },
            })
            .collect();
        self.t.fingerprint_bytes += commits.iter().map(|c| c.bytes() as u64).sum::<u64>();
        // Pay both providers for the job through escrow and settlement.
        self.ledger
            .open_escrow(request, self.client, self.gateway, 2 * PRICE, now)?;
        self.ledger.settle(
            request,
            vec![
                Payout {
                    provider: self.nodes[a].addr,
                    amount: PRICE,
                },
                Payout {
                    provider: self.nodes[b].addr,
                    amount: PRICE,
                },
            ],
            now,
        )?;
        for (slot, (i, cheated)) in [(a, cheat_a), (b, cheat_b)].into_iter().enumerate() {
            let n = &mut self.nodes[i];
            n.jobs += 1;
            n.cheated += u64::from(cheated);
            n.record.calls += 1;
            n.record.answered += 1;
            n.cost += COST * run.computed[slot].min(fed) / fed.max(1);
        }
        self.nodes[b].last_tokens = run.tokens.clone();
        for (slot, &provider) in [a, b].iter().enumerate() {
            if self.nodes[provider].excluded {
                continue;
            }
            let p = self.audit_rate(&self.nodes[provider]);
            if !self.key.audits(&request.0, &commits[slot].digest(), p) {
                continue;
            }
            let job = Job {
                slot,
                input: &run.stages[slot].0,
                prompt: &prompt,
                tokens: &run.tokens,
                params: &params,
            };
            self.audit(j, now, request, provider, &job, &commits[slot])?;
        }
        Ok(())
    }

    /// `node`'s answer to an audit of `job`, provided by `provider` (real compute, counted).
    fn answer(
        &mut self,
        node: usize,
        provider: usize,
        job: &Job<'_>,
        claimed: &Answer,
    ) -> anyhow::Result<Answer> {
        self.nodes[node].audits_done += 1;
        let n = &self.nodes[node];
        if n.kind == Kind::ColludingAuditor && self.nodes[provider].kind == Kind::Colluder {
            self.nodes[node].cheated += 1;
            return Ok(claimed.clone());
        }
        if n.kind == Kind::LazyAuditor
            && self.u(b"plexus/sim/lazy", &[node as u64, n.audits_done]) < self.cheat_rate
        {
            self.nodes[node].cheated += 1;
            return self.engine.fabricate(job);
        }
        let t0 = Instant::now();
        let ans = self.engine.recompute(n, job)?;
        self.t.audit_time += t0.elapsed();
        self.t.audit_positions += job.input.positions() as u64;
        Ok(ans)
    }

    fn agrees(a: &Answer, b: &Answer) -> bool {
        compare(&a.print, &b.print, Mode::Exact).passes() && a.tokens_ok == b.tokens_ok
    }

    fn audit(
        &mut self,
        j: u64,
        now: u64,
        request: RequestId,
        provider: usize,
        job: &Job<'_>,
        commit: &Commitment,
    ) -> anyhow::Result<()> {
        let span = self.nodes[provider].span;
        let Some(auditor) = self
            .pick(span, |n| n.kind.audits(), &[j, 100 + job.slot as u64])
            .filter(|&x| x != provider)
            .or_else(|| {
                self.pick(
                    span,
                    |n| n.kind.audits() && n.addr != self.nodes[provider].addr,
                    &[j, 200 + job.slot as u64],
                )
            })
        else {
            return Ok(());
        };
        self.t.audits += 1;
        self.nodes[provider].audited += 1;
        // What the provider claims: its fingerprint, and that its tokens are right.
        let claimed = Answer {
            print: commit.fingerprint.clone(),
            tokens_ok: true,
        };
        let verdict = self.answer(auditor, provider, job, &claimed)?;
        self.planted(j, now, auditor)?;
        let honest_pair =
            self.nodes[provider].kind == Kind::Honest && self.nodes[auditor].kind == Kind::Honest;
        let agrees = Self::agrees(&verdict, &claimed);
        if honest_pair {
            self.t.honest_comparisons += 1;
            self.t.honest_false_alarms += u64::from(!agrees);
        }
        if agrees {
            self.nodes[provider].record.audits_passed += 1;
            if self.passed.len() == PASSED_KEPT {
                self.passed.pop_front();
            }
            self.passed.push_back(Passed {
                provider,
                auditor,
                slot: job.slot,
                input: job.input.clone(),
                prompt: job.prompt.to_vec(),
                tokens: job.tokens.to_vec(),
                params: job.params.clone(),
                claimed: claimed.clone(),
                request,
            });
            return Ok(());
        }
        self.case(j, now, request, provider, auditor, job, &claimed, &verdict)
    }

    /// A planted known-answer audit for `auditor`, at rate [`PLANT_RATE`].
    fn planted(&mut self, j: u64, now: u64, auditor: usize) -> anyhow::Result<()> {
        let id = hash(&[
            b"plexus/sim/audit",
            &j.to_le_bytes(),
            &(auditor as u64).to_le_bytes(),
        ]);
        let span = self.nodes[auditor].span;
        let Some(k) = self.known.iter().position(|k| k.0 == span) else {
            return Ok(());
        };
        if !plants(&self.key, &id, PLANT_RATE) {
            return Ok(());
        }
        self.t.planted += 1;
        let (slot, input, prompt, tokens, params, known) = self.known[k].clone();
        let job = Job {
            slot,
            input: &input,
            prompt: &prompt,
            tokens: &tokens,
            params: &params,
        };
        // Planted audits name a real past job; the auditor cannot tell them apart.
        let ans = self.answer(auditor, auditor, &job, &known)?;
        if let PlantedOutcome::Lazy { .. } = check_planted(&known.print, &ans.print, Mode::Exact) {
            let at = self.nodes[auditor].audits_done;
            self.convict(auditor, self.gateway, None, now, at)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn case(
        &mut self,
        j: u64,
        now: u64,
        request: RequestId,
        provider: usize,
        accuser: usize,
        job: &Job<'_>,
        claimed: &Answer,
        accusation: &Answer,
    ) -> anyhow::Result<()> {
        self.t.cases += 1;
        let span = self.nodes[provider].span;
        let mut referees: Vec<usize> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                n.span == span && !n.excluded && n.kind.audits() && *i != provider && *i != accuser
            })
            .map(|(i, _)| i)
            .collect();
        // A keyed shuffle, then the largest odd count up to REFEREES.
        referees.sort_by(|&x, &y| {
            self.u(b"plexus/sim/referee", &[j, x as u64])
                .total_cmp(&self.u(b"plexus/sim/referee", &[j, y as u64]))
        });
        let k = referees.len().min(REFEREES);
        referees.truncate(if k.is_multiple_of(2) {
            k.saturating_sub(1)
        } else {
            k
        });
        if referees.is_empty() {
            return Ok(());
        }
        let mut case = Case::open(request.0, provider, accuser, referees.clone(), now, 60_000)?;
        for r in referees {
            let ans = self.answer(r, provider, job, claimed)?;
            self.t.referee_replays += 1;
            let (with_p, with_a) = (Self::agrees(&ans, claimed), Self::agrees(&ans, accusation));
            let vote = match (with_p, with_a) {
                (true, false) => Vote::Provider,
                (false, true) => Vote::Accuser,
                _ => Vote::Neither,
            };
            if case.vote(r, vote)?.is_some() {
                break;
            }
        }
        let verdict = match case.tick(now + 60_000) {
            Some(v) => v.clone(),
            None => return Ok(()),
        };
        debug_assert!(matches!(case.state(), State::Decided(_)));
        // The answer the majority confirmed is a known answer (three or more independent
        // computations agree), to plant in later audits.
        let confirmed = match &verdict {
            Verdict::ProviderCheated { .. } => Some(accusation.clone()),
            Verdict::FalseAccusation { .. } => Some(claimed.clone()),
            Verdict::Inconclusive => None,
        };
        if let Some(answer) = confirmed {
            if self.known.len() < KNOWN_ANSWERS {
                self.known.push((
                    job.slot,
                    job.input.clone(),
                    job.prompt.to_vec(),
                    job.tokens.to_vec(),
                    job.params.clone(),
                    answer,
                ));
            }
        }
        let (losers, challenger) = match verdict {
            Verdict::ProviderCheated {
                provider,
                challenger,
                colluders,
            } => {
                let mut l = vec![provider];
                l.extend(colluders);
                (l, self.nodes[challenger].addr)
            }
            Verdict::FalseAccusation { accuser, colluders } => {
                let mut l = vec![accuser];
                l.extend(colluders);
                (l, self.nodes[provider].addr)
            }
            Verdict::Inconclusive => return Ok(()),
        };
        for i in losers {
            let at = if self.nodes[i].kind.cheats_providing() {
                self.nodes[i].jobs
            } else {
                self.nodes[i].audits_done
            };
            self.convict(i, challenger, Some(request), now, at)?;
            self.reexamine(i, j, now)?;
        }
        Ok(())
    }

    /// After `convicted` is caught, every audit of it that passed inside the window is replayed
    /// by a fresh auditor; when the replay contradicts the answer the auditor vouched for, that
    /// auditor is the defendant of a new case (a colluder, or a lazy auditor, is convicted).
    fn reexamine(&mut self, convicted: usize, j: u64, now: u64) -> anyhow::Result<()> {
        let (mine, rest): (Vec<Passed>, Vec<Passed>) =
            self.passed.drain(..).partition(|p| p.provider == convicted);
        self.passed = rest.into();
        for (k, p) in mine.into_iter().enumerate() {
            if self.nodes[p.auditor].excluded {
                continue;
            }
            let span = self.nodes[convicted].span;
            let salt = [j, 300 + k as u64];
            let Some(fresh) = self.pick(
                span,
                |n| {
                    n.kind.audits()
                        && n.addr != self.nodes[p.auditor].addr
                        && n.addr != self.nodes[convicted].addr
                },
                &salt,
            ) else {
                continue;
            };
            self.t.audits += 1;
            let job = Job {
                slot: p.slot,
                input: &p.input,
                prompt: &p.prompt,
                tokens: &p.tokens,
                params: &p.params,
            };
            let ans = self.answer(fresh, convicted, &job, &p.claimed)?;
            if !Self::agrees(&ans, &p.claimed) {
                // The auditor that passed it now stands accused; referees decide, as for any
                // mismatch (a lazy fresh auditor must not convict an honest one).
                self.case(j, now, p.request, p.auditor, fresh, &job, &p.claimed, &ans)?;
            }
        }
        Ok(())
    }

    /// Slashes everything `i` has at stake, excludes it and zeroes its reputation.
    fn convict(
        &mut self,
        i: usize,
        challenger: Address,
        request: Option<RequestId>,
        now: u64,
        at: u64,
    ) -> anyhow::Result<()> {
        let n = &mut self.nodes[i];
        if n.excluded {
            return Ok(());
        }
        n.excluded = true;
        n.record.convicted = true;
        n.caught_at = Some(at);
        let view = self.ledger.account(n.addr);
        let amount = view.staked + view.unbonding + view.locked;
        if let Some(r) = request {
            // Freeze the earnings of the disputed request first (the settlement entry point).
            let _ = self.ledger.challenge(r, n.addr, challenger, now);
        }
        if amount > 0 {
            self.ledger
                .slash(n.addr, amount, challenger, request, now)?;
            n.slashed = true;
        }
        Ok(())
    }

    fn net_profit(&self, n: &Node) -> i64 {
        let v = self.ledger.account(n.addr);
        let total = v.available + v.staked + v.unbonding + v.locked;
        total as i64 - STAKE as i64 - n.cost as i64
    }

    fn report(&self, a: &SimArgs, posp: Posp, elapsed: Duration) -> serde_json::Value {
        let cheaters: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .filter(|n| n.kind.is_cheater())
            .map(|n| {
                serde_json::json!({
                    "kind": n.kind.name(),
                    "node": n.name,
                    "caught": n.caught_at.is_some(),
                    "jobs_to_detection": n.caught_at,
                    "jobs": n.jobs,
                    "cheated_jobs": n.cheated,
                    "audits_done": n.audits_done,
                    "audited": n.audited,
                    "audits_passed": n.record.audits_passed,
                    "net_profit": self.net_profit(n),
                })
            })
            .collect();
        let honest: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.kind == Kind::Honest)
            .collect();
        let honest_slashed = honest.iter().filter(|n| n.slashed || n.excluded).count();
        let total = self.t.provider_time + self.t.audit_time;
        let overhead = self.t.audit_time.as_secs_f64() / total.as_secs_f64().max(1e-9);
        let overhead_positions = self.t.audit_positions as f64
            / (self.t.provider_positions + self.t.audit_positions).max(1) as f64;
        serde_json::json!({
            "jobs": a.jobs,
            "seed": a.seed,
            "max_tokens": a.max_tokens,
            "cheat_rate": a.cheat_rate,
            "audits": self.t.audits,
            "planted_audits": self.t.planted,
            "cases": self.t.cases,
            "referee_replays": self.t.referee_replays,
            "honest_slashed": honest_slashed,
            "honest_net_profit_min": honest.iter().map(|n| self.net_profit(n)).min(),
            "cheaters": cheaters,
            "false_positive_rate": self.t.honest_false_alarms as f64 / self.t.honest_comparisons.max(1) as f64,
            "honest_comparisons": self.t.honest_comparisons,
            "audit_overhead": overhead,
            "audit_overhead_positions": overhead_positions,
            "commitment_bytes_per_token": self.t.fingerprint_bytes as f64 / self.t.chain_positions.max(1) as f64,
            "audit_probability_posp": self.p_posp,
            "posp": { "cost": posp.cost, "reward": posp.reward, "slash": posp.slash, "collusion": posp.collusion, "margin": posp.margin, "floor": posp.floor },
            "tokens": self.t.tokens,
            "provider_seconds": self.t.provider_time.as_secs_f64(),
            "audit_seconds": self.t.audit_time.as_secs_f64(),
            "seconds": elapsed.as_secs_f64(),
        })
    }
}
