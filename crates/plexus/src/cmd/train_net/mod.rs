//! `plexus train --distributed SPEC`: one worker of a DiLoCo run over libp2p. The protocol is
//! `plexus_train` (round machine, signed contributions, messages); this is the thin driver that
//! reads the clock and the network.
//!
//! Per round, every worker:
//! 1. says hello to its peers (run, round, state digest) and, if they are ahead or most of them
//!    hold another state ([`plexus_train::protocol::choose_target`]), fetches that state from
//!    one of them, checks it against the digest, and adopts it (a joiner, a restarted worker
//!    and a worker that fell behind all catch up this way; per-peer timeouts, next peer on
//!    failure);
//! 2. runs H inner steps from the round's start weights on the examples the seed assigns it,
//!    signs the encoded pseudo-gradient and pushes it to every peer (or, too large for one
//!    message, offers its commitment and serves the payload in ranges, [`offers`]);
//! 3. waits until every expected worker's contribution is in, the adaptive deadline passes, or
//!    a peer says hello from a later round;
//! 4. asks every peer which contributions it holds for the round and fetches the ones it
//!    misses (they are signed, so any peer can relay them), waiting for those a peer is still
//!    fetching ([`sync`]);
//! 5. audits: draws from the set's digest which contributions are re-executed (the spec's
//!    audit rate, [`plexus_train::audit::drawn`]), fetches each drawn worker's start state from
//!    it and re-executes its round from the commitment; a contribution that does not match (or
//!    whose worker sends no usable start state) is dropped, and a worker proven to have lied is
//!    refused for the rest of the run;
//! 6. closes the round: scoring, aggregation and the outer step are a pure function of the
//!    set, so workers holding the same set compute the same next state; one that ended up with
//!    another set is outvoted at the next hello and fetches the majority's state. No worker
//!    coordinates: any can die.
//! 7. prints progress and checkpoints its state in the data directory.
//!
//! A worker stopped by Ctrl-C or SIGTERM leaves: it tells its peers it is done, so they stop
//! waiting for it at once ([`leave_on`]); a crashed one holds the round open to its deadline.
//!
//! A peer's status is a claim: a worker moves to another state only when the most workers
//! hold it ([`choose_target`]), waiting first for peers still closing the last round
//! ([`wait_for_stragglers`]); it closes a round before its deadline only when every expected
//! contribution is in and no peer is behind, or when more than half of its peers have moved
//! past it ([`Worker::may_close`]). A peer that says it is behind for two of the worker's
//! rounds in a row is not waited for any more (an honest straggler catches up within one).
//!
//! A contribution for another round is never applied to this one: the machine refuses stale
//! and far-future ones; one for the next round waits until this one closes.

mod audit;
mod cheat;
mod offers;
mod peers;
mod shared;
pub mod spec;
mod stake;
mod starts;
mod sync;

use crate::cli::TrainArgs;
use crate::cmd::net::{default_data_dir, parse_addrs};
use anyhow::{bail, Context as _};
use audit::AuditTally;
use cheat::{choose_start, lazy_round, made_up_ahead, Cheat};
use peers::Peers;
use plexus_core::keys::NodeKey;
use plexus_core::wire::{ErrorCode, Request, Response};
use plexus_core::Digest;
use plexus_model::train::pretrained::Pretrained;
use plexus_model::train::text::TextShard;
use plexus_model::train::{checkpoint, Layout, Params};
use plexus_model::ModelConfig;
use plexus_net::{NetConfig, NetEvent, NetHandle, PeerId};
use plexus_train::commit::{Contribution, Signed};
use plexus_train::local::LocalData;
use plexus_train::outer::OuterState;
use plexus_train::protocol::{choose_target, encode, travels_whole, wait_for_stragglers};
use plexus_train::protocol::{Reveal, TrainResponse};
use plexus_train::reveal::nonce;
use plexus_train::round::{GlobalState, RoundMachine, RoundOutcome};
use plexus_train::score::HeldOutScorer;
use plexus_train::spec::{Data, SignedSpec};
use plexus_train::transfer::{state_from_bytes, state_len};
use plexus_train::worker::{work_round, WorkerState};
use plexus_train::{resume, RoundConfig};
use shared::{worker_name, Shared};
use stake::{RunLedger, StakeGate};
use starts::StartFile;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The per-round checkpoint in the data directory.
const CHECKPOINT: &str = "train-state.bin";
/// How long a finished worker keeps answering peers still closing the last round (at least; a
/// run whose payloads travel in ranges lingers as long as one may take to fetch, an audited
/// run as long as its start state may). It stops as soon as every peer says it is done.
const LINGER: Duration = Duration::from_secs(20);
/// How long a worker waits for peers still closing the last round before following a state
/// ahead that they might outvote.
const STRAGGLERS: Duration = Duration::from_secs(10);
/// How often a waiting worker looks again.
const POLL: Duration = Duration::from_millis(20);

/// What a round's progress line reports beside its outcome.
#[derive(Clone, Copy)]
struct RoundNotes {
    train_loss: f32,
    /// Contributions fetched from peers before closing.
    synced: usize,
    audits: AuditTally,
    began: Instant,
    closed: Closed,
}

/// Why a round closed ([`Worker::may_close`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closed {
    /// Every expected contribution was in and no peer was behind.
    AllIn,
    /// More than half of the peers had moved past it.
    PeersAhead,
    /// Its deadline passed.
    Deadline,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Closed::AllIn => "all-in",
            Closed::PeersAhead => "peers-ahead",
            Closed::Deadline => "deadline",
        })
    }
}

/// Whether a worker goes on into the round after `round` from the state its round ended in
/// (decided at the close, before the checkpoint, so that a restart resumes from exactly the
/// start it would have had): only when the set it closed `round` on holds its own commitment
/// to it (`last_own`), so that every auditor holding that set sees its start state chain on.
/// Otherwise (its contribution dropped or late; and after a catch-up, [`Worker::adopt`]) it
/// starts fresh, which every auditor accepts: an unproven start is dropped, and one that
/// contradicts a commitment an auditor holds convicts
/// ([`plexus_train::audit::check_start`]).
fn continues(s: &Shared, me: &[u8], round: u64, last_own: Option<Digest>) -> bool {
    match s.closed_commitment(round, me) {
        Some(Some(c)) => last_own == Some(c.digest()),
        _ => false,
    }
}

/// One worker of a run on data `D`: a synthetic task or a text.
struct Worker<D: LocalData> {
    spec: SignedSpec,
    cfg: RoundConfig,
    setup: D,
    model: Arc<ModelConfig>,
    shard: Arc<D::Shard>,
    /// The round-0 weights, until the run starts (then dropped: a model's worth of memory).
    init: Option<Params>,
    /// Parameters of the model.
    n: usize,
    layout: Arc<Layout>,
    key: NodeKey,
    me: Vec<u8>,
    checkpoint: PathBuf,
    /// Where this worker's kept start states go ([`starts`]).
    starts: PathBuf,
    out: PathBuf,
    cheat: Option<Cheat>,
    epoch: Instant,
    /// The run's ledger (`--ledger`), for a spec that asks a stake.
    ledger_url: Option<String>,
    /// Opened from `ledger_url` when the run starts.
    ledger: Option<Arc<RunLedger>>,
    /// Slashes being recorded on the ledger (awaited before the worker ends).
    slashes: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The digests of a fresh optimizer state and residual of `n` parameters (computed once,
    /// when first needed: hashing 12 bytes a parameter).
    fresh: std::sync::OnceLock<(Digest, Digest)>,
}

pub fn run(a: TrainArgs, spec_path: &Path) -> anyhow::Result<()> {
    let spec = SignedSpec::load(spec_path)
        .with_context(|| format!("cannot use the run spec {}", spec_path.display()))?;
    let cheat = match a.cheat.as_deref() {
        None => None,
        Some("garbage") => Some(Cheat::Garbage),
        Some("stale") => Some(Cheat::Stale),
        Some("lazy") => Some(Cheat::Lazy),
        Some("ahead") => Some(Cheat::Ahead),
        Some("harmful") => Some(Cheat::Harmful),
        Some("behind") => Some(Cheat::Behind),
        Some("withhold") => Some(Cheat::Withhold),
        Some("bad-state") => Some(Cheat::BadState),
        Some("one-sided") => Some(Cheat::OneSided),
        Some("chosen-start") => Some(Cheat::ChosenStart),
        Some(other) => {
            bail!(
                "--cheat {other:?}: expected garbage, stale, lazy, ahead, behind, harmful, withhold, bad-state, one-sided or chosen-start"
            )
        }
    };
    let data_dir = a.data_dir.clone().unwrap_or_else(default_data_dir);
    let min = spec.spec.min_stake();
    match (&a.ledger, min) {
        (None, 0) => {}
        (None, min) => bail!(
            "this run asks every worker to hold {min} staked on its ledger: pass the run's ledger with --ledger URL"
        ),
        (Some(_), 0) => bail!(
            "--ledger: this run asks no stake (its spec has none), so it has no ledger"
        ),
        (Some(url), _) => {
            let args = super::ledger::LedgerArgs {
                ledger: Some(url.clone()),
            };
            if args.url(&data_dir)?.is_none() {
                bail!("--ledger none: this run asks a stake of {min}, which lives on a ledger");
            }
        }
    }
    let key_path = data_dir.join("node.key");
    let key = NodeKey::load_or_create(&key_path)
        .with_context(|| format!("cannot load the node key {}", key_path.display()))?;
    let mut net = NetConfig::new(key.clone())
        .with_bootstrap(parse_addrs(&a.peer, "--peer")?)
        .with_request_timeout(Duration::from_secs(30));
    if !a.listen.is_empty() {
        net = net.with_listen(parse_addrs(&a.listen, "--listen")?);
    }
    let cfg = spec.round_config()?;
    match (spec.spec.data()?, &a.text) {
        (Data::Task(_), None) => {
            if a.checkpoint.is_some() {
                bail!("--checkpoint: this run trains a fresh model on a synthetic task");
            }
            let setup = spec.spec.setup()?;
            start(&a, spec, cfg, setup, key, cheat, &data_dir, net)
        }
        (Data::Task(_), Some(_)) => {
            bail!("--text: this run trains on a synthetic task ({}), not a text", spec.spec.data.task)
        }
        (Data::Text { seq_len, digest }, None) => bail!(
            "this run trains on a text (sha256 {digest}, windows of {seq_len}): pass the file with --text FILE"
        ),
        (Data::Text { seq_len, .. }, Some(path)) => {
            let setup = text_setup(&spec, seq_len, path, a.checkpoint.as_deref())?;
            start(&a, spec, cfg, setup, key, cheat, &data_dir, net)
        }
    }
}

/// The text run's setup from the file at `path` and, in a fine-tuning run, the model at
/// `checkpoint` (the text tokenized with its tokenizer): refused unless they are the spec's.
pub(super) fn text_setup(
    spec: &SignedSpec,
    seq_len: usize,
    path: &Path,
    checkpoint: Option<&Path>,
) -> anyhow::Result<plexus_train::local::TextSetup> {
    text_setup_of(spec, seq_len, path, checkpoint, Pretrained::open_checked)
}

/// Checks that the text at `path` and the model at `checkpoint` are the spec's, as
/// [`text_setup`] does, reading the model's files but not its weights (`plexus up --train`
/// checks once before its workers each load the model).
pub(super) fn check_text(
    spec: &SignedSpec,
    seq_len: usize,
    path: &Path,
    checkpoint: Option<&Path>,
) -> anyhow::Result<()> {
    text_setup_of(
        spec,
        seq_len,
        path,
        checkpoint,
        Pretrained::describe_checked,
    )
    .map(drop)
}

fn text_setup_of(
    spec: &SignedSpec,
    seq_len: usize,
    path: &Path,
    checkpoint: Option<&Path>,
    open: fn(&Path, Digest) -> Result<Pretrained, plexus_model::train::TrainError>,
) -> anyhow::Result<plexus_train::local::TextSetup> {
    let init = match (spec.spec.model.checkpoint, checkpoint) {
        (None, None) => None,
        (Some(digest), None) => bail!(
            "this run fine-tunes an existing model (digest {digest}): pass its file or directory with --checkpoint PATH"
        ),
        (None, Some(_)) => {
            bail!("--checkpoint: this run trains a fresh model (its spec names no checkpoint)")
        }
        (Some(digest), Some(p)) => Some(Arc::new(
            open(p, digest)
                .with_context(|| format!("--checkpoint {}", p.display()))?,
        )),
    };
    let shard = match &init {
        Some(p) => TextShard::open_with(path, seq_len, &p.tokenizer),
        None => TextShard::open(path, seq_len),
    }
    .with_context(|| format!("--text {}", path.display()))?;
    spec.spec
        .text_setup(Arc::new(shard), init)
        .with_context(|| format!("--text {}", path.display()))
}

/// Builds the round-0 state of data `setup` and runs the worker.
#[allow(clippy::too_many_arguments)]
fn start<D: LocalData + Send + Sync + 'static>(
    a: &TrainArgs,
    spec: SignedSpec,
    cfg: RoundConfig,
    setup: D,
    key: NodeKey,
    cheat: Option<Cheat>,
    data_dir: &Path,
    net: NetConfig,
) -> anyhow::Result<()> {
    let mut setup = setup;
    let (model, shard, init) = setup.prepare(cfg.seed)?;
    setup.release_weights();
    let worker = Worker {
        me: key.peer_id().to_bytes(),
        out: a.out.clone().unwrap_or_else(|| data_dir.join("model")),
        checkpoint: data_dir.join(CHECKPOINT),
        starts: data_dir.join("starts"),
        spec,
        cfg,
        setup,
        model,
        shard,
        n: init.values.len(),
        layout: init.layout.clone(),
        init: Some(init),
        key,
        cheat,
        epoch: Instant::now(),
        ledger_url: a.ledger.clone(),
        ledger: None,
        slashes: Mutex::new(Vec::new()),
        fresh: std::sync::OnceLock::new(),
    };
    let rt = super::net::runtime()?;
    let parent = a.parent_pid;
    let result = rt.block_on(async move {
        tokio::select! {
            r = worker.run(net) => r,
            _ = super::net::parent_gone(parent) => Ok(()),
            _ = super::net::stdin_closed(parent.is_some()) => Ok(()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answers peers' training messages (and refuses everything else) until the network stops.
async fn serve(
    handle: NetHandle,
    mut events: mpsc::Receiver<NetEvent>,
    shared: Arc<Mutex<Shared>>,
    epoch: Instant,
) {
    let run = lock(&shared).run;
    while let Some(event) = events.recv().await {
        match event {
            NetEvent::Request {
                peer,
                request: Request::Train { msg },
                reply,
            } => {
                let now = epoch.elapsed().as_millis() as u64;
                let req = lock(&shared).decode(peer, &msg);
                // A range of a kept start state: read from disk off this loop and the lock.
                let range = req.as_ref().ok().and_then(|r| lock(&shared).start_range(r));
                if let Some((reader, offset, len)) = range {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        let answer =
                            tokio::task::spawn_blocking(move || reader.answer_range(offset, len))
                                .await
                                .unwrap_or_else(|e| {
                                    TrainResponse::Refused(format!("the read failed: {e}"))
                                });
                        let msg = encode(&answer);
                        handle.respond(reply, Response::Train { msg }).await;
                    });
                    continue;
                }
                let (answer, offered) = {
                    let mut s = lock(&shared);
                    let answer = match req {
                        Ok(req) => s.answer(peer, req, now),
                        Err(refused) => refused,
                    };
                    (answer, s.offers.take_queue())
                };
                for offer in offered {
                    let peers = Peers {
                        net: handle.clone(),
                        run,
                    };
                    tokio::spawn(offers::fetch_offered(peers, shared.clone(), offer));
                }
                let msg = encode(&answer);
                handle.respond(reply, Response::Train { msg }).await;
            }
            NetEvent::Request { reply, .. } => {
                let response = Response::Error {
                    code: ErrorCode::BadRequest,
                    message: "a training worker answers only training messages".into(),
                };
                handle.respond(reply, response).await;
            }
            NetEvent::Listening(addr) => {
                let peer = handle.peer_id();
                match addr.clone().with_p2p(peer) {
                    Ok(full) => println!("listening on {full}"),
                    Err(_) => println!("listening on {addr}"),
                }
            }
            NetEvent::Disconnected(peer) => {
                let mut s = lock(&shared);
                s.peers.remove(&peer);
                s.behind_since.remove(&peer);
            }
            NetEvent::Announcement { .. } | NetEvent::Connected(_) | NetEvent::ListenExpired(_) => {
            }
        }
    }
}

/// Peer ids as people read them, comma-separated.
fn peer_names(peers: &[PeerId]) -> String {
    peers
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Leaves the run when `stop` resolves (Ctrl-C, SIGTERM): tells every peer this worker is done,
/// so the round it is in closes without waiting for it (a crash holds the round open to its
/// deadline), and exits. The checkpoint of the last closed round stays: started again, the
/// worker resumes from it and catches up like a joiner.
async fn leave_on(
    stop: impl std::future::Future<Output = ()>,
    peers: Peers,
    shared: Arc<Mutex<Shared>>,
) {
    stop.await;
    let me = {
        let mut s = lock(&shared);
        s.done = true;
        s.told()
    };
    let told = peers.hello_all(&me).await.len();
    println!("left the run at round {}: told {told} peers", me.round + 1);
    std::process::exit(0);
}

impl<D: LocalData + Send + Sync + 'static> Worker<D> {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn layout(&self) -> Arc<Layout> {
        self.layout.clone()
    }

    /// The run's round-0 state (from the round-0 weights, which it takes).
    fn fresh(&mut self) -> anyhow::Result<(GlobalState, WorkerState)> {
        let params = self
            .init
            .take()
            .context("the round-0 weights were already taken")?;
        let global = GlobalState {
            round: 0,
            params,
            outer: OuterState::new(self.n),
        };
        Ok((global, WorkerState::new(self.n)))
    }

    fn save(&self, global: &GlobalState, state: &WorkerState) {
        if let Err(e) = resume::save(&self.checkpoint, self.cfg.run, global, state) {
            eprintln!("warning: checkpoint not written: {e}");
        }
    }

    async fn run(mut self, net: NetConfig) -> anyhow::Result<()> {
        let run = self.cfg.run;
        if let Some(url) = &self.ledger_url {
            let me = plexus_ledger::address_of(&self.key.public())
                .context("the node key is not secp256k1: it has no ledger account")?;
            let min = self.spec.spec.min_stake();
            let ledger = RunLedger::open(url, me, min).await?;
            println!(
                "stake: account {me} holds {} staked on the run's ledger (the run asks {min})",
                ledger.staked(me).await
            );
            self.ledger = Some(Arc::new(ledger));
        }
        let (global, mut state) = match resume::load(&self.checkpoint, run, self.layout()) {
            Ok(Some((g, w))) => {
                println!("resumed from checkpoint at round {}", g.round);
                (g, w)
            }
            Ok(None) => self.fresh()?,
            Err(e) => {
                eprintln!("warning: {e}; starting without it");
                self.fresh()?
            }
        };
        self.init = None;
        println!(
            "run {} ({}) | worker {} | {} parameters | codec {} | H {} | {} rounds",
            run.short(),
            self.spec.spec.name,
            self.key.peer_id(),
            self.n,
            self.cfg.codec,
            self.cfg.inner_steps,
            self.spec.spec.rounds
        );
        // Registered before the address is printed, so a signal right after it is a leave.
        let stop = crate::cmd::net::shutdown_signal();
        let (handle, events) = plexus_net::start(net)?;
        let mut machine = RoundMachine::new(self.cfg.clone(), global, [], self.now());
        machine.expect(self.me.clone());
        let mut initial = Shared::new(run, machine);
        initial.claim_behind = self.cheat == Some(Cheat::Behind);
        initial.corrupt_state = self.cheat == Some(Cheat::BadState);
        if let Some(ledger) = &self.ledger {
            let mut gate = StakeGate::new(ledger.min());
            gate.update(ledger.read(true).await.unwrap_or_default());
            initial.stake = Some(gate);
        }
        let shared = Arc::new(Mutex::new(initial));
        if let Some(ledger) = &self.ledger {
            tokio::spawn(Arc::clone(ledger).keep_current(shared.clone()));
        }
        tokio::spawn(serve(handle.clone(), events, shared.clone(), self.epoch));
        let peers = Peers {
            net: handle.clone(),
            run,
        };
        tokio::spawn(leave_on(stop, peers.clone(), shared.clone()));
        if let Some(digest) = self.spec.spec.model.checkpoint {
            // With the network up: peers and `up --train` wait for the address, not for this.
            let (round, params) = {
                let s = lock(&shared);
                (s.machine.round(), s.machine.state().params.clone())
            };
            // Where fine-tuning starts from: the model's own loss on the held-out windows.
            let (loss, _) = tokio::task::block_in_place(|| {
                self.setup
                    .evaluate(&self.model, &self.shard, &params)
                    .map_err(anyhow::Error::from)
            })?;
            println!(
                "start | model {} | round {} | held-out loss {loss:.4}",
                digest.short(),
                round
            );
        }
        self.wait_for_workers(&peers, &shared).await;
        let mut scorer = HeldOutScorer {
            model: self.model.clone(),
            shard: self.shard.clone(),
            seed: self.cfg.seed,
            examples: self.cfg.score.examples,
        };
        let rounds = self.spec.spec.rounds;
        loop {
            self.catch_up(&peers, &shared, &mut state).await;
            // Shared, not copied: dropped when the round's training ends, before the close
            // steps the state in place.
            let (round, start) = {
                let s = lock(&shared);
                (s.machine.round(), s.machine.shared_state())
            };
            if round >= rounds {
                break;
            }
            if self.cheat == Some(Cheat::ChosenStart) && round > 0 {
                choose_start(&mut state);
            }
            let began = Instant::now();
            // Start states are kept for auditors only (a model's optimizer state and
            // residual: 12 bytes a parameter each), on disk, written outside the lock.
            if self.spec.spec.audit_rate() > 0.0 {
                lock(&shared).make_room_for_start(round);
                match tokio::task::block_in_place(|| StartFile::write(&self.starts, round, &state)) {
                    Ok(file) => lock(&shared).keep_start(file),
                    Err(e) => eprintln!(
                        "warning: the start state of round {} could not be kept for the auditors ({}): they will drop this worker's contribution: {e}",
                        round + 1,
                        self.starts.display()
                    ),
                }
            }
            lock(&shared).machine.start_clock(self.now());
            let trained = Instant::now();
            let (c, train_loss, next) = self.train(round, start, state).await?;
            // This worker's own commitment to the round (what its set must hold for it to go
            // on from this round's end state).
            let last_own = Some(c.signed.commitment.digest());
            let train_ms = trained.elapsed().as_millis() as u64;
            state = next;
            self.contribute(&peers, &shared, c, round).await;
            let closed = loop {
                match self.may_close(&shared, round) {
                    Some(why) => break why,
                    None => tokio::time::sleep(POLL).await,
                }
            };
            let synced = self.sync(&peers, &shared, round).await;
            let own = Reveal {
                worker: self.me.clone(),
                nonce: nonce(&self.key, run, round),
            };
            lock(&shared).fix_set(round, own);
            let audits = self.audit(&peers, &shared, round, train_ms).await;
            // Scored without holding the shared state: peers are answered meanwhile (scoring
            // a large model's set takes seconds, and a peer may be fetching this worker's
            // payload).
            let closing = lock(&shared).machine.begin_close();
            let mut goes_on = false;
            let scored = tokio::task::block_in_place(|| closing.score(&mut scorer))?;
            let (outcome, next) = tokio::task::block_in_place(|| {
                let mut s = lock(&shared);
                let outcome = s.machine.finish_close(scored, self.now());
                s.forget_gone();
                if self.cheat == Some(Cheat::Ahead) {
                    s.claim = Some(made_up_ahead(s.machine.state()));
                }
                let held = std::mem::take(&mut s.held);
                s.keep_closed(round, held, &self.me);
                goes_on = continues(&s, &self.me, round, last_own);
                s.closing = None;
                s.fixed_by.clear();
                for (_, c) in std::mem::take(&mut s.early) {
                    let now = self.now();
                    if let Err(why) = s.receive(c, now) {
                        eprintln!(
                            "refused an early contribution to round {}: {why}",
                            round + 1
                        );
                    }
                }
                (outcome, s.machine.shared_state())
            });
            if !goes_on && round + 1 < rounds {
                // Auditors accept only a fresh state or the end of this worker's commitment
                // in the set they closed this round on.
                println!(
                    "round {}: this worker starts the next round from a fresh optimizer state (its contribution is not in the set it closed this round on)",
                    round + 1
                );
                self.start_fresh(&mut state);
            }
            // Written without holding it either (gigabytes for a large model): the state the
            // next round starts from, exactly.
            tokio::task::block_in_place(|| self.save(&next, &state));
            // Released before the next close steps the state in place.
            drop(next);
            let notes = RoundNotes {
                train_loss,
                synced,
                audits,
                began,
                closed,
            };
            self.progress(&handle, &shared, &outcome, &notes);
        }
        // The optimizer moments (two model-sized vectors) are in the checkpoint: not needed
        // to evaluate and save the final model.
        drop(state);
        self.finish(&peers, &shared).await
    }

    /// Whether `round` should close now: the deadline passed; every expected contribution is
    /// in and no peer is still behind (a peer closing the last round joins this one at its next
    /// hello; a worker that closed rounds without waiting for it would run away alone on a
    /// state nobody else holds); or more than half of the peers have moved on to a later round
    /// or fixed this round's set (they hold the set they closed on, which the sync before
    /// closing fetches, and they wait for this worker's audit nonce; one peer
    /// claiming a later round does not cut the round short unless it is the only peer). Peers
    /// convicted by an audit, or under the run's stake, count for nothing.
    /// A peer that has said it is behind for [`shared::STUCK_ROUNDS`] rounds in a row counts
    /// for nothing here, like a convicted one. `None` while the round stays open.
    fn may_close(&self, shared: &Mutex<Shared>, round: u64) -> Option<Closed> {
        let s = lock(shared);
        let (mut counted, mut ahead, mut behind) = (0, 0, false);
        for (p, st) in &s.peers {
            if s.excluded(&p.to_bytes()) || s.stuck(p) {
                continue;
            }
            counted += 1;
            // A peer that asked for this round's nonces has fixed its set: it has moved on.
            ahead += usize::from(st.round > round || s.fixed_by.contains(p));
            // A peer whose contribution to this round is in is at it, whatever it said.
            behind |= !st.done && st.round < round && !s.machine.contributes(&p.to_bytes());
        }
        if s.machine.all_in() && !behind {
            Some(Closed::AllIn)
        } else if 2 * ahead > counted {
            Some(Closed::PeersAhead)
        } else if s.machine.past_deadline(self.now()) {
            Some(Closed::Deadline)
        } else {
            None
        }
    }

    /// Waits until the spec's minimum of workers is connected (or joins a run under way).
    async fn wait_for_workers(&self, peers: &Peers, shared: &Mutex<Shared>) {
        let min = self.spec.spec.workers.min as usize;
        let mut said = false;
        loop {
            let me = lock(shared).told();
            let statuses = peers.hello_all(&me).await;
            let under_way = statuses.iter().any(|(_, s)| s.round > 0);
            {
                let mut s = lock(shared);
                for (p, st) in &statuses {
                    s.note_peer(*p, st.clone());
                }
            }
            if statuses.len() + 1 >= min || under_way {
                println!("{} workers of the run connected", statuses.len() + 1);
                return;
            }
            if !said {
                println!(
                    "waiting for {min} workers ({} connected)",
                    statuses.len() + 1
                );
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Moves to the state the peers agree on if this worker is behind or outvoted.
    async fn catch_up(&self, peers: &Peers, shared: &Mutex<Shared>, state: &mut WorkerState) {
        let (me, told) = {
            let s = lock(shared);
            (s.status(), s.told())
        };
        let mine = (me.round, me.state);
        let asked = Instant::now();
        let (statuses, (round, digest)) = loop {
            let statuses = peers.hello_all(&told).await;
            let statuses = lock(shared).note_voters(statuses);
            let others: Vec<(u64, Digest)> =
                statuses.iter().map(|(_, s)| (s.round, s.state)).collect();
            let target = choose_target(mine, others.iter().copied(), self.spec.spec.rounds);
            // Peers stuck behind are not waited for (see `shared::STUCK_ROUNDS`).
            let waited: Vec<(u64, Digest)> = {
                let s = lock(shared);
                statuses
                    .iter()
                    .filter(|(p, _)| !s.stuck(p))
                    .map(|(_, st)| (st.round, st.state))
                    .collect()
            };
            if wait_for_stragglers(mine, &waited, target) && asked.elapsed() < STRAGGLERS {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            match target {
                Some(target) => break (statuses, target),
                None => return,
            }
        };
        let holders: Vec<PeerId> = statuses
            .iter()
            .filter(|(_, s)| s.round == round && s.state == digest)
            .map(|(p, _)| *p)
            .collect();
        if holders.is_empty() {
            eprintln!("no peer holds the state of round {round} any more; going on from this worker's own");
            return;
        }
        println!(
            "fetching the state of round {round} ({}) from {}",
            digest.short(),
            peer_names(&holders)
        );
        // Ranges from every holder at once; if the whole does not match the digest (a holder
        // sent wrong bytes), from one holder at a time among those that delivered every range
        // they were asked for, so one liar does not stop the catch-up.
        let (mut got, delivered) = self.fetch_state(peers, &holders, round, digest).await;
        let mut from = peer_names(&holders);
        if got.is_none() && holders.len() > 1 {
            for p in delivered {
                if let (Some(g), _) = self.fetch_state(peers, &[p], round, digest).await {
                    (got, from) = (Some(g), p.to_string());
                    break;
                }
            }
        }
        let Some(global) = got else {
            eprintln!("no peer sent the state of round {round}; going on from this worker's own");
            return;
        };
        let me = self.adopt(shared, global, state, &from, digest);
        // Tell the peers at once, so they expect this worker's contribution to this round.
        peers.hello_all(&me).await;
    }

    /// The state `digest` of `round`, in ranges from `from` and checked; and the holders that
    /// delivered every range they were asked for.
    async fn fetch_state(
        &self,
        peers: &Peers,
        from: &[PeerId],
        round: u64,
        digest: Digest,
    ) -> (Option<GlobalState>, Vec<PeerId>) {
        let names = peer_names(from);
        let total = state_len(self.layout().len());
        let (bytes, delivered) = peers.state_bytes(from, digest, total).await;
        let Some(bytes) = bytes else {
            eprintln!("the state of round {round} did not come from {names} (no answer in time, or not held)");
            return (None, delivered);
        };
        match state_from_bytes(&bytes, self.layout()) {
            Ok(g) if g.round == round && g.digest() == digest => (Some(g), delivered),
            Ok(_) => {
                eprintln!("the state from {names} does not match the digest they announced");
                (None, delivered)
            }
            Err(e) => {
                eprintln!("the state from {names} was refused: {e}");
                (None, delivered)
            }
        }
    }

    /// Replaces this worker's round machine with one on `global` (verified by the caller),
    /// keeps early contributions to that round, checkpoints; this worker's new status.
    fn adopt(
        &self,
        shared: &Mutex<Shared>,
        global: GlobalState,
        state: &mut WorkerState,
        from: &str,
        digest: Digest,
    ) -> plexus_train::protocol::Status {
        // The set of the round before is not this worker's: its next round starts fresh
        // (auditors that hold its last contribution could not see it chain on otherwise), and
        // the checkpoint below holds that.
        self.start_fresh(state);
        let round = global.round;
        let mut s = lock(shared);
        let expected: Vec<Vec<u8>> = s
            .peers
            .iter()
            .filter(|(_, st)| st.round == round && !st.done)
            .map(|(p, _)| p.to_bytes())
            .filter(|w| !s.excluded(w))
            .chain(std::iter::once(self.me.clone()))
            .collect();
        let at = s.machine.round();
        let mut machine = RoundMachine::new(self.cfg.clone(), global, expected, self.now());
        machine.keep_deadline_of(&s.machine);
        s.machine = machine;
        s.held.clear();
        s.forget_closed();
        s.closing = None;
        s.fixed_by.clear();
        for (_, c) in std::mem::take(&mut s.early) {
            if c.signed.commitment.round == round {
                let now = self.now();
                let _ = s.receive(c, now);
            }
        }
        self.save(s.machine.state(), state);
        println!(
            "caught up: at round {at}, adopted the state of round {round} ({}) from {from}",
            digest.short()
        );
        s.told()
    }

    /// Replaces `state` with a fresh one (the old one goes first: 12 bytes a parameter each).
    fn start_fresh(&self, state: &mut WorkerState) {
        *state = WorkerState::new(0);
        *state = WorkerState::new(self.n);
    }

    /// H inner steps off the async threads.
    async fn train(
        &self,
        round: u64,
        start: Arc<GlobalState>,
        mut state: WorkerState,
    ) -> anyhow::Result<(Contribution, f32, WorkerState)> {
        let (cfg, model, shard, key) = (
            self.cfg.clone(),
            self.model.clone(),
            self.shard.clone(),
            self.key.clone(),
        );
        let lazy = self.cheat == Some(Cheat::Lazy);
        let (c, reports, state) = tokio::task::spawn_blocking(move || {
            let work = if lazy { lazy_round } else { work_round };
            work(
                &cfg,
                &model,
                shard.as_ref(),
                &key,
                round,
                &start.params,
                &mut state,
            )
            .map(|(c, r)| (c, r, state))
        })
        .await??;
        let loss = reports.last().map_or(f32::NAN, |r| r.loss);
        Ok((c, loss, state))
    }

    /// Keeps this worker's contribution and sends it to every peer of the run.
    async fn contribute(&self, peers: &Peers, shared: &Mutex<Shared>, c: Contribution, round: u64) {
        let targets: Vec<PeerId> = {
            let connected = peers.net.connected_peers().await;
            let s = lock(shared);
            connected
                .into_iter()
                .filter(|p| s.peers.get(p).is_some_and(|st| !st.done))
                .collect()
        };
        let c = match self.cheat {
            Some(Cheat::Behind) => return, // Says it is still catching up: holds nothing.
            None
            | Some(
                Cheat::Lazy | Cheat::Ahead | Cheat::Withhold | Cheat::OneSided | Cheat::ChosenStart,
            ) => {
                let c = if self.cheat == Some(Cheat::Withhold) {
                    let mut cm = c.signed.commitment;
                    cm.reveal = Digest::of(&self.now().to_le_bytes());
                    Contribution {
                        signed: Signed::sign(&self.key, cm),
                        payload: c.payload,
                    }
                } else {
                    c
                };
                let now = self.now();
                if let Err(why) = lock(shared).receive(c.clone(), now) {
                    eprintln!("this worker's own contribution to round {round} missed: {why}");
                    // A lazy cheater sends anyway (after its conviction and slash, say):
                    // the others' refusal is what is tested.
                    if self.cheat != Some(Cheat::Lazy) {
                        return;
                    }
                }
                c
            }
            Some(cheat) => {
                for p in &targets {
                    let noise = vec![0xff; 64];
                    let _ = peers.ask_raw(*p, noise, Duration::from_secs(5)).await;
                }
                match self.cheat_on(cheat, c, round) {
                    Some(c) => c,
                    None => return,
                }
            }
        };
        let mut targets = targets;
        if self.cheat == Some(Cheat::OneSided) {
            targets.sort_by_key(|p| p.to_bytes());
            targets.truncate(1);
            lock(shared).serve_only = targets.first().copied();
        }
        let refusals = if travels_whole(c.payload.len()) {
            peers.push(&targets, &c).await
        } else {
            peers.offer(&targets, &c.signed).await
        };
        for (peer, why) in refusals {
            eprintln!("{peer} did not take this worker's contribution to round {round}: {why}");
        }
    }

    fn cheat_on(&self, cheat: Cheat, c: Contribution, round: u64) -> Option<Contribution> {
        let mut cm = c.signed.commitment;
        let mut payload = c.payload.to_vec();
        match cheat {
            Cheat::Lazy
            | Cheat::Ahead
            | Cheat::Behind
            | Cheat::Withhold
            | Cheat::BadState
            | Cheat::OneSided
            | Cheat::ChosenStart => {}
            Cheat::Garbage => {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(151) ^ 0x5a;
                }
                cm.payload = Digest::of(&payload);
            }
            Cheat::Stale => cm.round = round.checked_sub(1)?,
            Cheat::Harmful => {
                let n = self.n;
                let mut delta = self.cfg.codec.decode(&payload, n).ok()?;
                delta.iter_mut().for_each(|d| *d *= -4.0);
                payload = self.cfg.codec.encode(&delta).ok()?;
                cm.payload = Digest::of(&payload);
                cm.payload_len = payload.len() as u64;
            }
        }
        Some(Contribution {
            signed: Signed::sign(&self.key, cm),
            payload: payload.into(),
        })
    }

    fn progress(
        &self,
        handle: &NetHandle,
        shared: &Mutex<Shared>,
        o: &RoundOutcome,
        round: &RoundNotes,
    ) {
        let RoundNotes {
            train_loss,
            synced,
            audits,
            began,
            closed,
        } = *round;
        let counters = handle.counters();
        let sent = counters.sent.load(std::sync::atomic::Ordering::Relaxed);
        let received = counters.received.load(std::sync::atomic::Ordering::Relaxed);
        let mine = if o.applied.iter().any(|s| s.worker == self.me) {
            "applied"
        } else if o.rejected.iter().any(|s| s.worker == self.me) {
            "rejected"
        } else if o.dropped.contains(&self.me) {
            "dropped"
        } else {
            "missing"
        };
        for r in o.rejected.iter().filter(|r| r.worker != self.me) {
            eprintln!(
                "round {}: not applied the contribution of {}: with it the held-out loss is {:.4}, above {:.4} without it",
                o.round + 1,
                worker_name(&r.worker),
                r.loss,
                o.loss_before
            );
        }
        let (peers, refused) = {
            let s = lock(shared);
            (s.peers.values().filter(|st| !st.done).count(), s.refused)
        };
        println!(
            "round {}/{} | held-out loss {:.4} | train loss {:.4} | applied {}/{} (mine {mine}, {synced} fetched) | audits passed {}/{}{} | peers {peers} | refused {refused} | sent {sent} B | received {received} B | closed {closed} | {:.1}s | state {}",
            o.round + 1,
            self.spec.spec.rounds,
            o.loss_before,
            train_loss,
            o.applied.len(),
            o.applied.len() + o.rejected.len(),
            audits.passed,
            audits.audited,
            if self.spec.spec.audit_committee().is_some() {
                format!(" (+{} on delegates' word)", audits.delegated)
            } else {
                String::new()
            },
            began.elapsed().as_secs_f64(),
            o.next.short()
        );
    }

    /// Evaluates and saves the final model, then answers peers a while.
    async fn finish(&self, peers: &Peers, shared: &Mutex<Shared>) -> anyhow::Result<()> {
        let slashes = std::mem::take(&mut *self.slashes.lock().unwrap_or_else(|e| e.into_inner()));
        for task in slashes {
            let _ = task.await;
        }
        // Shared, not copied: the machine steps no more.
        let (state, digest) = {
            let mut s = lock(shared);
            s.done = true;
            (s.machine.shared_state(), s.machine.state_digest())
        };
        let params = &state.params;
        let (loss, accuracy) = tokio::task::block_in_place(|| {
            self.setup
                .evaluate(&self.model, &self.shard, params)
                .map_err(anyhow::Error::from)
        })?;
        let spec = &self.spec.spec;
        let tokenizer_config = self
            .setup
            .tokenizer_config()
            .unwrap_or_else(|| checkpoint::scratch_tokenizer_config(&self.model));
        checkpoint::save_with(
            &self.out,
            &self.model,
            &params.to_tensors()?,
            self.setup.tokenizer(&self.shard),
            tokenizer_config,
            serde_json::json!({
                "checkpoint": spec.model.checkpoint.map(|d| d.to_string()),
                "task": spec.data.task,
                "task_size": spec.data.size,
                "run": self.cfg.run.to_string(),
                "rounds": spec.rounds,
                "inner_steps": spec.inner_steps,
                "codec": spec.codec,
                "metrics": {
                    "held_out_loss": loss,
                    "held_out_exact_match": if accuracy.is_nan() { None } else { Some(accuracy) },
                    "held_out_examples": spec.eval_examples,
                },
            }),
        )?;
        println!(
            "final | {} rounds | held-out loss {loss:.4} | held-out exact match {} | state {} | saved {}",
            spec.rounds,
            if accuracy.is_nan() {
                "n/a (text)".to_string()
            } else {
                format!("{:.1}%", 100.0 * accuracy)
            },
            digest.short(),
            self.out.display()
        );
        // A peer still closing the last round may be fetching this worker's payload: a large
        // one is given its whole time on a slow link.
        // So may an auditor of the last round be, fetching this worker's start state.
        let largest = self.cfg.codec.encoded_len(self.n);
        let mut linger = LINGER;
        if !travels_whole(largest) {
            linger = linger.max(peers::payload_budget(largest));
        }
        if self.spec.spec.audit_rate() > 0.0 {
            linger = linger.max(peers::payload_budget(plexus_train::transfer::start_len(
                self.n,
            )));
        }
        let until = Instant::now() + linger;
        while Instant::now() < until {
            let me = lock(shared).told();
            let statuses = peers.hello_all(&me).await;
            if statuses.iter().all(|(_, s)| s.done) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }
}
