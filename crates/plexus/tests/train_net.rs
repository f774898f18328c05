//! `plexus train --distributed`: DiLoCo workers as separate processes on loopback, talking
//! libp2p. A SIGKILLed worker does not stop the run and a late joiner catches up and
//! contributes; hostile workers' garbage and stale contributions are refused, a harmful one is
//! not applied, a lazy one is caught by the round audits, and a peer lying about its round is
//! not followed; killing every worker and starting them again resumes from their checkpoints;
//! `plexus up --train` restarts each killed worker. The trained model's held-out
//! exact match is asserted; `plexus generate` loads the final checkpoint and `plexus up
//! --model` serves it.

#![allow(unused_crate_dependencies, clippy::unwrap_used)]

#[path = "support/procs.rs"]
mod procs;
use procs::children_of;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_plexus");
/// Generous: four trainers share two loaded cores.
const RUN_TIMEOUT: Duration = Duration::from_secs(400);

/// Writes a signed spec of `rounds` rounds of H=10 for `min` workers on reverse-3, with a
/// first-round deadline of `initial_ms`.
fn spec(dir: &Path, rounds: u64, min: u32, initial_ms: u64) -> PathBuf {
    spec_with(dir, rounds, min, initial_ms, &[])
}

/// [`spec`] with more `plexus train spec` flags.
fn spec_with(dir: &Path, rounds: u64, min: u32, initial_ms: u64, extra: &[&str]) -> PathBuf {
    let out = dir.join("spec.json");
    let o = train_spec(dir, &out)
        .args([
            "--task", "reverse", "--size", "3", "--hidden", "64", "--layers", "2",
        ])
        .args([
            "--rounds",
            &rounds.to_string(),
            "--workers-min",
            &min.to_string(),
        ])
        .args(["--inner-steps", "10", "--batch-size", "16", "--lr", "1e-2"])
        .args(["--warmup", "20", "--codec", "f16", "--score-examples", "16"])
        .args([
            "--eval-examples",
            "128",
            "--deadline-initial-ms",
            &initial_ms.to_string(),
        ])
        .args(["--deadline-min-ms", "3000"])
        // At H=10 DiLoCo's outer Nesterov momentum of 0.9 overshoots: with a kill and a join
        // about one run in six stalled at 30-56% exact match (CI failed on one); 0.5 and 0
        // reached 100% in 6 of 6 runs each.
        .args(["--outer-momentum", "0.5"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// `plexus train spec --out OUT`, signed with the creator key kept in `dir`; the caller adds
/// the spec's flags and runs it.
fn train_spec(dir: &Path, out: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["train", "spec", "--out"])
        .arg(out)
        .arg("--data-dir")
        .arg(dir.join("creator"));
    cmd
}

/// The parameter count a worker prints when it starts (`... | N parameters | ...`).
fn params_of(text: &str) -> usize {
    text.split(" parameters")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no parameter count in {text:?}"))
}

/// One worker process; its stdout and stderr lines are collected as they come.
struct Worker {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    addr: String,
}

fn collect(r: impl std::io::Read + Send + 'static, lines: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
}

impl Worker {
    fn start(name: &str, spec: &Path, dir: &Path, peers: &[&str], extra: &[&str]) -> Worker {
        let mut cmd = Command::new(BIN);
        cmd.args(["train", "--distributed"])
            .arg(spec)
            .arg("--data-dir")
            .arg(dir.join(name))
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1"])
            .args(extra);
        for p in peers {
            cmd.args(["--peer", p]);
        }
        let mut w = Worker::spawn(name, &mut cmd);
        let line = w.wait_for("listening on /ip4/127.0.0.1/tcp/", Duration::from_secs(60));
        w.addr = line.trim_start_matches("listening on ").to_string();
        w
    }

    /// Starts `cmd` with its stdout and stderr collected (no address yet).
    fn spawn(name: &str, cmd: &mut Command) -> Worker {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), lines.clone());
        collect(child.stderr.take().unwrap(), lines.clone());
        Worker {
            name: name.into(),
            child,
            lines,
            addr: String::new(),
        }
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first line containing `what`, waiting up to `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(what)) {
                return l.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader threads a moment to drain the pipes.
                std::thread::sleep(Duration::from_millis(200));
                if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(what)) {
                    return l.clone();
                }
                panic!(
                    "{} exited ({status}) before {what:?}:\n{}",
                    self.name,
                    self.text()
                );
            }
            assert!(
                Instant::now() < until,
                "{} printed no {what:?} in {timeout:?}:\n{}",
                self.name,
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether a line containing `what` appears within `timeout`.
    fn has_within(&self, what: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if self.lines.lock().unwrap().iter().any(|l| l.contains(what)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The first line containing `all[0]` and any of the rest.
    fn wait_for_all(&mut self, all: &[&str], timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(all[0]) && all[1..].iter().any(|a| l.contains(a)))
                .cloned();
            if let Some(l) = found {
                return l;
            }
            assert!(
                Instant::now() < until,
                "{} printed no {all:?}:\n{}",
                self.name,
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the worker's final line and exit; its held-out exact match (%), held-out
    /// loss and final state digest.
    fn finish(&mut self) -> (f64, f64, String) {
        let line = self.finish_line();
        let pct: f64 = field(&line, "held-out exact match ")
            .trim_end_matches('%')
            .parse()
            .unwrap();
        let loss: f64 = field(&line, "held-out loss ").parse().unwrap();
        (pct, loss, field(&line, "state ").to_string())
    }

    /// Waits for the worker's final line and a clean exit; the line.
    fn finish_line(&mut self) -> String {
        self.finish_line_of("final |")
    }

    /// Waits for a line containing `what` and a clean exit; the line.
    fn finish_line_of(&mut self, what: &str) -> String {
        let line = self.wait_for(what, RUN_TIMEOUT);
        let until = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < until, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "{} failed:\n{}", self.name, self.text());
        line
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    /// Kills the process; when a test failed, prints what every worker said (a failure in one
    /// worker is often explained by what another did).
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_millis(200));
            eprintln!("\n----- {} said:\n{}", self.name, self.text());
        }
    }
}

/// A worker's progress lines, one per closed round.
fn round_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("round ") && l.contains(" | held-out loss "))
        .collect()
}

/// The peer id a worker printed in its first line.
fn worker_id(w: &Worker) -> String {
    w.text()
        .lines()
        .find_map(|l| {
            l.split("| worker ")
                .nth(1)
                .map(|s| s.split_whitespace().next().unwrap().to_string())
        })
        .unwrap()
}

/// The word after `key` in `line`.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(key)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key:?} in {line:?}"))
}

/// Every worker's final model reverses at least this share of the held-out problems. (Runs of
/// this spec with a kill and a join ended at 100%; with the outer momentum at DiLoCo's 0.9
/// instead of 0.5 about one in six ended on the task's plateau at 30-56%.)
const TARGET_EXACT_MATCH: f64 = 80.0;

fn assert_learned(w: &Worker, pct: f64, loss: f64) {
    eprintln!("{}: held-out exact match {pct}% (loss {loss})", w.name);
    assert!(
        pct >= TARGET_EXACT_MATCH,
        "{}: held-out exact match {pct}% (loss {loss}):\n{}",
        w.name,
        w.text()
    );
}

#[test]
fn a_sigkilled_worker_does_not_stop_the_run_and_a_late_joiner_contributes() {
    let tmp = tempfile::tempdir().unwrap();
    // 40 rounds: with 30, one CI run in seven (under a training benchmark's load) left the
    // run on the task's plateau at 79.7% (held-out loss 0.20, still falling) where others
    // reach 100% (loss 0.0002).
    let spec = spec(tmp.path(), 40, 4, 60_000);
    let mut w0 = Worker::start("w0", &spec, tmp.path(), &[], &[]);
    let a0 = w0.addr.clone();
    // w1 trains honestly but flips a bit of every value in the state ranges it serves.
    let w1 = Worker::start("w1", &spec, tmp.path(), &[&a0], &["--cheat", "bad-state"]);
    let w2 = Worker::start("w2", &spec, tmp.path(), &[&a0, &w1.addr], &[]);
    let mut w3 = Worker::start("w3", &spec, tmp.path(), &[&a0, &w1.addr, &w2.addr], &[]);
    w0.wait_for("applied 4/4", RUN_TIMEOUT);
    w3.wait_for("round 5/40", RUN_TIMEOUT);
    w3.kill();
    let mut joiner = Worker::start("late", &spec, tmp.path(), &[&a0, &w1.addr], &[]);
    let caught = joiner.wait_for("caught up: at round 0", RUN_TIMEOUT);
    let joined_at: u64 = field(&caught, "state of round ").parse().unwrap();
    // The joiner asked every holder for ranges at once. The state never comes from w1; when
    // w1 was among the holders (it is unless it was between rounds when the joiner looked),
    // its flipped bytes failed the digest and the state came from one honest holder alone.
    let bad = worker_id(&w1);
    let fetching = joiner.wait_for("fetching the state of round", RUN_TIMEOUT);
    assert!(
        !caught.split(" from ").nth(1).unwrap().contains(&bad),
        "{caught}"
    );
    if fetching.contains(&bad) {
        let refused = joiner.wait_for("does not match the digest they announced", RUN_TIMEOUT);
        assert!(refused.contains(&bad), "{refused}");
    } else {
        eprintln!("w1 was not among the holders the joiner asked: {fetching}");
    }
    // w3 closed round 5 before it was killed; the others may still have been closing it.
    assert!(joined_at >= 4, "{caught}");
    // The joiner's pseudo-gradient was applied, beside others', in a round after it joined
    // (the final states agree below, so every worker applied the same set).
    let applied = joiner.wait_for_all(
        &["mine applied", "applied 2/", "applied 3/", "applied 4/"],
        RUN_TIMEOUT,
    );
    let round: u64 = field(&applied, "round ")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(round > joined_at, "{applied}");
    let (mut finals, mut texts) = (Vec::new(), Vec::new());
    for mut w in [w0, w1, w2, joiner] {
        let (pct, loss, state) = w.finish();
        assert_learned(&w, pct, loss);
        finals.push(state);
        texts.push(format!("----- {}:\n{}", w.name, w.text()));
    }
    assert!(
        finals.windows(2).all(|p| p[0] == p[1]),
        "final states differ: {finals:?}\n{}",
        texts.join("\n")
    );
    // The final checkpoint is a model `plexus generate` loads.
    let o = Command::new(BIN)
        .args(["generate", "--model"])
        .arg(tmp.path().join("w0/model"))
        .args([
            "--prompt",
            "abc|",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "cba");
    // ... and `plexus up --model` serves to the official client, refusing a prompt with a
    // character the model has no token for (its tokenizer would leave it out).
    let (text, refusal) = complete_with_up(&tmp.path().join("w0/model"), tmp.path(), "abc|", 4);
    assert_eq!(text, "cba");
    assert!(
        refusal.contains("Error code: 400") && refusal.contains("no token for 'H'"),
        "{refusal}"
    );
}

/// Serves the checkpoint `model` with `plexus up --model` (two node processes, every other
/// setting its default, its ledger and API key included) and asks for a greedy completion of
/// `prompt` through the official `openai` client (`PLEXUS_PYTHON`, with its defaults), then
/// for one of `Hello|`; stops `up` with Ctrl-C. The completion's text, and the error the
/// second request raised in the client (or `no error`).
fn complete_with_up(model: &Path, dir: &Path, prompt: &str, max_tokens: u32) -> (String, String) {
    let python = std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut up = Worker::spawn(
        "up",
        Command::new(BIN)
            .args(["up", "--model"])
            .arg(model)
            .args(["--nodes", "2", "--port", "0", "--threads", "1"])
            .env("PLEXUS_CACHE_DIR", dir.join("up-cache")),
    );
    let api = up.wait_for("API: ", Duration::from_secs(180));
    let key = up.wait_for("API key: ", Duration::from_secs(10));
    // The hint's example request is one the model takes (its prompt in the vocabulary).
    let hint = up.wait_for("/v1/completions", Duration::from_secs(10));
    let hinted = field(&hint, "\"prompt\":\"")
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let url = api.trim_start_matches("API: ").trim().to_string();
    let key = key.trim_start_matches("API key: ").trim().to_string();
    let script = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2])
model = client.models.list().data[0].id
client.completions.create(model=model, prompt=sys.argv[5], max_tokens=2)
r = client.completions.create(model=model, prompt=sys.argv[3], max_tokens=int(sys.argv[4]), temperature=0)
print(repr(r.choices[0].text))
try:
    client.completions.create(model=model, prompt="Hello|", max_tokens=2)
    print("no error")
except Exception as e:
    print(e)
"#;
    let o = Command::new(&python)
        .args([
            "-c",
            script,
            &url,
            &key,
            prompt,
            &max_tokens.to_string(),
            &hinted,
        ])
        .output()
        .expect("run the python client");
    let pid = up.child.id();
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while up.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < until, "plexus up did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        o.status.success(),
        "the client failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        up.text()
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (text, refusal) = out.split_once('\n').unwrap_or((&out, ""));
    let text = text.trim().trim_matches('\'').to_string();
    (text, refusal.trim().to_string())
}

#[test]
fn garbage_stale_and_harmful_contributions_of_hostile_workers_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // The hostile workers never contribute validly, so every round lasts its deadline. No
    // audits: the harmful worker's contribution must be stopped by its held-out score alone.
    let spec = spec_with(tmp.path(), 4, 5, 10_000, &["--audit-rate", "0"]);
    let h0 = Worker::start("h0", &spec, tmp.path(), &[], &[]);
    let h1 = Worker::start("h1", &spec, tmp.path(), &[&h0.addr], &[]);
    let garbage = Worker::start(
        "garbage",
        &spec,
        tmp.path(),
        &[&h0.addr, &h1.addr],
        &["--cheat", "garbage"],
    );
    let stale = Worker::start(
        "stale",
        &spec,
        tmp.path(),
        &[&h0.addr, &h1.addr],
        &["--cheat", "stale"],
    );
    let harmful = Worker::start(
        "harmful",
        &spec,
        tmp.path(),
        &[&h0.addr, &h1.addr],
        &["--cheat", "harmful"],
    );
    let mut states = Vec::new();
    let mut stale_refusals = 0;
    for mut h in [h0, h1] {
        let (_, _, state) = h.finish();
        states.push(state);
        let text = h.text();
        let garbage_id = worker_id(&garbage);
        let stale_id = worker_id(&stale);
        let harmful_id = worker_id(&harmful);
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("from {garbage_id} "))
                    && l.contains("payload does not decode")),
            "{}: no refusal of the garbage worker:\n{text}",
            h.name
        );
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("from {stale_id} ")) && l.contains("refused")),
            "{}: no refusal of the stale worker:\n{text}",
            h.name
        );
        stale_refusals += text
            .lines()
            .filter(|l| {
                l.contains(&format!("from {stale_id} "))
                    && l.contains("stale contribution for round")
            })
            .count();
        assert!(text.contains("malformed training message"), "{text}");
        // The harmful pseudo-gradient was held (it is valid) and never applied; nothing else
        // but the two honest ones was even held.
        let rejected: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("not applied the contribution of"))
            .collect();
        // From the random first weights a reversed step can still lower the loss (seen in
        // round 1: "applied 3/3"); from round 2 on it raises it and is stopped. (Audits are what
        // catch a contribution that is not the committed work; they are off here.)
        assert!(
            rejected.len() >= 2 && rejected.iter().all(|l| l.contains(&harmful_id)),
            "{}: the harmful contribution was not stopped by its score (or another was):\n{text}",
            h.name
        );
        let rounds = round_lines(&text);
        assert_eq!(rounds.len(), 4, "{text}");
        for l in &rounds {
            let (applied, held) = field(l, "applied ").split_once('/').unwrap();
            let (applied, held): (u32, u32) = (applied.parse().unwrap(), held.parse().unwrap());
            assert!((1..=3).contains(&applied) && held <= 3, "{l}\n{text}");
        }
        assert!(rounds.iter().any(|l| l.contains("applied 2/3")), "{text}");
        let first: f64 = field(rounds[0], "held-out loss ").parse().unwrap();
        let last: f64 = field(rounds[3], "held-out loss ").parse().unwrap();
        assert!(last < first, "held-out loss did not fall: {text}");
    }
    assert!(stale_refusals > 0, "no contribution was refused as stale");
    assert_eq!(states[0], states[1]);
}

/// What `plexus train --distributed SPEC --data-dir DIR ARGS` says when it refuses to start.
fn refused_start(spec: &Path, dir: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> String {
    let o = Command::new(BIN)
        .args(["train", "--distributed"])
        .arg(spec)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success());
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `name`'s output shows the lazy worker (`lazy_id`) dropped and convicted by an audit, and
/// no other contribution dropped.
fn assert_only_the_lazy_worker_convicted(name: &str, text: &str, lazy_id: &str) {
    let drops: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("dropped the contribution of"))
        .collect();
    assert!(
        drops.iter().all(|l| l.contains(lazy_id)),
        "{name}: an honest contribution was dropped:\n{text}"
    );
    assert!(
        drops
            .iter()
            .any(|l| l.contains("not the committed")
                && l.contains("refused for the rest of the run")),
        "{name}: the lazy worker was not convicted:\n{text}"
    );
}

/// `plexus wallet ARGS` for the account of the key in `dir` on the ledger at `url`.
fn wallet(dir: &Path, url: &str, args: &[&str]) -> std::process::Output {
    let o = Command::new(BIN)
        .arg("wallet")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--ledger", url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// A bucket's amount in `plexus wallet` output (`staked     2000000`).
fn bucket(o: &std::process::Output, name: &str) -> u64 {
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A worker that starts its rounds from optimizer moments of its own choosing (and commits to
/// them, and serves them) could make an honest-looking round send any pseudo-gradient, and a
/// re-execution from those moments reproduces it. The start check convicts it: its start
/// state of round 2 is neither fresh nor where its signed contribution to round 1 ended. The
/// honest workers are never dropped and end on the same state.
#[test]
fn a_worker_starting_from_moments_of_its_choosing_is_convicted() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_with(tmp.path(), 3, 3, 30_000, &["--audit-rate", "1"]);
    let h0 = Worker::start("h0", &spec, tmp.path(), &[], &[]);
    let h1 = Worker::start("h1", &spec, tmp.path(), &[&h0.addr], &[]);
    let peers = [h0.addr.as_str(), h1.addr.as_str()];
    let chooser = Worker::start(
        "chooser",
        &spec,
        tmp.path(),
        &peers,
        &["--cheat", "chosen-start"],
    );
    let chooser_id = worker_id(&chooser);
    let mut states = Vec::new();
    for mut h in [h0, h1] {
        let (_, _, state) = h.finish();
        states.push(state);
        let text = h.text();
        let drops: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("dropped the contribution of"))
            .collect();
        assert!(
            drops.iter().all(|l| l.contains(&chooser_id)),
            "{}: an honest contribution was dropped:\n{text}",
            h.name
        );
        assert!(
            drops.iter().any(|l| l.contains("audit of round 2")
                && l.contains("neither fresh nor where its signed contribution to round 1 ended")
                && l.contains("refused for the rest of the run")),
            "{}: the chooser was not convicted by the start check:\n{text}",
            h.name
        );
    }
    assert_eq!(states[0], states[1]);
    drop(chooser);
}

/// Every contribution is audited (`--audit-rate 1`) and every worker stakes 2 PLX on the run's
/// ledger (`--min-stake 2PLX`, a SQLite file all four share): every worker re-executes the
/// others' rounds from their commitments before closing. A lazy worker (trained on another
/// id's examples, committed as if on its own: it passes every check a receiver makes and
/// lowers the loss) is caught in its first round, dropped, refused from then on and slashed
/// once on the ledger (each honest auditor brings the verdict; the first recorded takes the
/// challenger's half), while the honest workers' audits of each other all pass and their
/// stakes stay. A worker that claims a later round than it holds, with a made-up state to
/// match, is never followed; nor is the convicted worker's state (its own fork), even when it
/// is a round ahead. A worker without the stake does not start, and the run's ledger is asked
/// for by name.
#[test]
fn a_lazy_worker_is_caught_by_the_audits_and_slashed_and_a_peer_lying_about_its_round_is_not_followed(
) {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", tmp.path().join("run-ledger.db").display());
    let spec = spec_with(
        tmp.path(),
        5,
        4,
        30_000,
        &["--audit-rate", "1", "--min-stake", "2PLX"],
    );
    let stake = 2_000_000u64;
    for name in ["h0", "h1", "lazy", "liar"] {
        let dir = tmp.path().join(name);
        wallet(&dir, &url, &["faucet", "5PLX"]);
        assert_eq!(
            bucket(&wallet(&dir, &url, &["stake", "2PLX"]), "staked"),
            stake
        );
    }
    let refused = |args: &[&str]| refused_start(&spec, &tmp.path().join("unstaked"), args);
    let e = refused(&["--ledger", &url]);
    assert!(
        e.contains("asks every worker to hold 2000000 staked"),
        "{e}"
    );
    let e = refused(&[]);
    assert!(e.contains("--ledger URL"), "{e}");

    let with_ledger = ["--ledger", url.as_str()];
    let h0 = Worker::start("h0", &spec, tmp.path(), &[], &with_ledger);
    let h1 = Worker::start("h1", &spec, tmp.path(), &[&h0.addr], &with_ledger);
    let peers = [h0.addr.as_str(), h1.addr.as_str()];
    let lazy = Worker::start(
        "lazy",
        &spec,
        tmp.path(),
        &peers,
        &["--cheat", "lazy", "--ledger", &url],
    );
    let liar = Worker::start(
        "liar",
        &spec,
        tmp.path(),
        &peers,
        &["--cheat", "ahead", "--ledger", &url],
    );
    let (lazy_id, liar_id) = (worker_id(&lazy), worker_id(&liar));
    let mut states = Vec::new();
    let mut slashes = Vec::new();
    for mut h in [h0, h1] {
        let (_, _, state) = h.finish();
        states.push(state);
        let text = h.text();
        assert_only_the_lazy_worker_convicted(&h.name, &text, &lazy_id);
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("from {lazy_id} "))
                    && l.contains("convicted by the audit")),
            "{}: the convicted worker's next contribution was not refused:\n{text}",
            h.name
        );
        for (who, id) in [
            ("the liar", &liar_id),
            ("the convicted lazy worker", &lazy_id),
        ] {
            assert!(
                !text
                    .lines()
                    .any(|l| l.contains("caught up") && l.contains(id.as_str())),
                "{}: followed {who}:\n{text}",
                h.name
            );
        }
        let rounds = round_lines(&text);
        assert_eq!(rounds.len(), 5, "{text}");
        // The round that convicted the lazy worker audited it and the two honest others.
        assert!(
            rounds.iter().any(|l| l.contains("audits passed 2/3")),
            "{}: {text}",
            h.name
        );
        assert!(
            rounds.iter().all(|l| !l.contains("audits passed 0/0")),
            "{}: a round without audits: {text}",
            h.name
        );
        let first: f64 = field(rounds[0], "held-out loss ").parse().unwrap();
        let last: f64 = field(rounds[4], "held-out loss ").parse().unwrap();
        assert!(last < first, "held-out loss did not fall: {text}");
        assert!(
            !text.contains("not staked") && !text.contains("could not slash"),
            "{}: {text}",
            h.name
        );
        let slashed = text
            .lines()
            .any(|l| l.starts_with(&format!("slashed {lazy_id} {stake} on the run's ledger")));
        let second = text.lines().any(|l| {
            l.starts_with(&lazy_id)
                && (l.contains("was already slashed") || l.contains("nothing left to slash"))
        });
        assert!(slashed != second, "{}: {text}", h.name);
        slashes.push(slashed);
    }
    assert_eq!(states[0], states[1]);
    // The liar audits honestly: it may be the one whose verdict was recorded.
    let liar_text = liar.text();
    slashes.push(
        liar_text
            .lines()
            .any(|l| l.starts_with(&format!("slashed {lazy_id} {stake} on the run's ledger"))),
    );
    drop((lazy, liar));

    // One slash, its challenger's half to the worker that recorded it, the honest workers'
    // and the liar's stakes untouched.
    assert_eq!(
        slashes.iter().filter(|s| **s).count(),
        1,
        "{slashes:?}\n{liar_text}"
    );
    let balance = |name: &str| wallet(&tmp.path().join(name), &url, &["balance"]);
    let lazy = balance("lazy");
    assert_eq!(
        (bucket(&lazy, "staked"), bucket(&lazy, "unbonding")),
        (0, 0)
    );
    for (name, slashed) in ["h0", "h1", "liar"].into_iter().zip(slashes) {
        let b = balance(name);
        assert_eq!(bucket(&b, "staked"), stake, "{name}");
        let reward = if slashed { stake / 2 } else { 0 };
        assert_eq!(bucket(&b, "available"), 3_000_000 + reward, "{name}");
    }
}

/// Delegated auditors (`--auditors 1`, every contribution drawn): each contribution is
/// re-executed by the one worker the round's nonces name, and the others take its verdict. A
/// lazy worker is caught by its auditor; the others re-execute it themselves on the auditor's
/// word of a mismatch before dropping it. The honest workers end on the same state, and
/// re-execute far fewer rounds than if each audited every other contribution.
#[test]
fn delegated_auditors_catch_a_lazy_worker_and_spare_the_others_their_re_executions() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_with(
        tmp.path(),
        5,
        4,
        30_000,
        &["--audit-rate", "1", "--auditors", "1"],
    );
    let h0 = Worker::start("h0", &spec, tmp.path(), &[], &[]);
    let h1 = Worker::start("h1", &spec, tmp.path(), &[&h0.addr], &[]);
    let peers = [h0.addr.as_str(), h1.addr.as_str()];
    let h2 = Worker::start("h2", &spec, tmp.path(), &peers, &[]);
    let lazy = Worker::start("lazy", &spec, tmp.path(), &peers, &["--cheat", "lazy"]);
    let lazy_id = worker_id(&lazy);
    let (mut states, mut reexecuted, mut on_word) = (Vec::new(), 0, 0);
    for mut h in [h0, h1, h2] {
        let (_, _, state) = h.finish();
        states.push(state);
        let text = h.text();
        assert_only_the_lazy_worker_convicted(&h.name, &text, &lazy_id);
        let rounds = round_lines(&text);
        assert_eq!(rounds.len(), 5, "{text}");
        for l in &rounds {
            let audited: usize = field(l, "audits passed ")
                .split_once('/')
                .unwrap()
                .1
                .parse()
                .unwrap();
            reexecuted += audited;
            on_word += field(l, "(+").parse::<usize>().unwrap();
        }
    }
    assert_eq!(states[0], states[1]);
    assert_eq!(states[1], states[2]);
    // Each honest worker auditing every other contribution: 3 x 3 in the round with the lazy
    // worker, 3 x 2 in each of the 4 after: 33 re-executions. One auditor each: about 17.
    eprintln!("re-executions {reexecuted}, kept on a delegate's word {on_word}");
    assert!(reexecuted <= 22 && on_word >= 8, "{reexecuted} {on_word}");
    drop(lazy);
}

/// A model larger than one message's worth of start state (3.2M parameters: AdamW moments and
/// residual are 38 MB, over the 32 MiB frame) is still audited: the auditors fetch the drawn
/// worker's start state in 1 MiB ranges, re-execute its round, pass the honest workers and
/// convict the lazy one.
#[test]
fn a_model_whose_start_state_exceeds_a_message_is_audited_in_ranges() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("spec.json");
    let o = train_spec(tmp.path(), &spec)
        .args([
            "--task", "reverse", "--size", "3", "--hidden", "256", "--layers", "4",
        ])
        .args(["--rounds", "3", "--workers-min", "3", "--inner-steps", "4"])
        .args(["--batch-size", "8", "--lr", "3e-3", "--warmup", "4"])
        .args([
            "--codec",
            "f16",
            "--score-examples",
            "8",
            "--eval-examples",
            "16",
        ])
        .args(["--audit-rate", "1", "--deadline-initial-ms", "120000"])
        // Rounds close when every expected contribution is in; a deadline learned from a few
        // fast rounds (median x 1.25) would drop every contribution of a round slowed by the
        // load of parallel tests (seen: both honest workers missed round 3).
        .args(["--deadline-min-ms", "30000"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let h0 = Worker::start("h0", &spec, tmp.path(), &[], &[]);
    let params = params_of(&h0.text());
    assert!(12 * params > 32 << 20, "{params} parameters");
    let h1 = Worker::start("h1", &spec, tmp.path(), &[&h0.addr], &[]);
    let peers = [h0.addr.as_str(), h1.addr.as_str()];
    let lazy = Worker::start("lazy", &spec, tmp.path(), &peers, &["--cheat", "lazy"]);
    let lazy_id = worker_id(&lazy);
    let mut states = Vec::new();
    for mut h in [h0, h1] {
        let (_, _, state) = h.finish();
        states.push(state);
        let text = h.text();
        assert_only_the_lazy_worker_convicted(&h.name, &text, &lazy_id);
        // Every round re-executed the other honest worker's contribution and passed it.
        let rounds = round_lines(&text);
        assert_eq!(rounds.len(), 3, "{text}");
        for l in rounds {
            let (passed, _) = field(l, "audits passed ").split_once('/').unwrap();
            assert!(passed.parse::<u32>().unwrap() >= 1, "{}: {l}", h.name);
        }
    }
    assert_eq!(states[0], states[1]);
    drop(lazy);
}

/// A pseudo-gradient larger than one message (16.8M parameters in f32: 67 MB, over the 32 MiB
/// frame) is offered and its payload fetched in 1 MiB ranges: three workers close round 1 on
/// all three contributions (each received both peers' payloads whole, and audited one by
/// re-executing it), although the third offers and serves its own to one peer only
/// (`--cheat one-sided`): the other gets it relayed, commitment first and then the payload in
/// ranges from that peer. The third is then SIGKILLed, and the other two go on without it,
/// ending on the same state with a lower held-out loss.
#[test]
fn a_contribution_larger_than_a_message_travels_in_ranges_and_a_crash_does_not_stop_it() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("spec.json");
    let o = train_spec(tmp.path(), &spec)
        .args([
            "--task", "reverse", "--size", "3", "--hidden", "512", "--layers", "4",
        ])
        .args(["--rounds", "3", "--workers-min", "3", "--inner-steps", "3"])
        .args(["--batch-size", "8", "--lr", "3e-3", "--warmup", "3"])
        .args([
            "--codec",
            "f32",
            "--score-examples",
            "8",
            "--eval-examples",
            "16",
        ])
        .args(["--audit-rate", "1", "--deadline-initial-ms", "120000"])
        .args(["--deadline-min-ms", "20000"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut h0 = Worker::start("h0", &spec, tmp.path(), &[], &[]);
    let params = params_of(&h0.text());
    let payload = 4 * params as u64;
    assert!(payload > 32 << 20, "{params} parameters");
    let mut h1 = Worker::start("h1", &spec, tmp.path(), &[&h0.addr], &[]);
    let peers = [h0.addr.as_str(), h1.addr.as_str()];
    let mut victim = Worker::start(
        "victim",
        &spec,
        tmp.path(),
        &peers,
        &["--cheat", "one-sided"],
    );
    // Killed once both have closed round 1 (whose audit fetches its start state from it).
    h0.wait_for("round 1/3", Duration::from_secs(300));
    h1.wait_for("round 1/3", Duration::from_secs(300));
    victim.kill();
    let mut states = Vec::new();
    let mut relayed = 0;
    for mut h in [h0, h1] {
        let (_, _, state) = h.finish();
        states.push(state);
        let text = h.text();
        let rounds = round_lines(&text);
        assert_eq!(rounds.len(), 3, "{text}");
        // Round 1: all three contributions were in the set (applied or scored out).
        let (_, of) = field(rounds[0], "applied ").split_once('/').unwrap();
        assert_eq!(of, "3", "{}: {}", h.name, rounds[0]);
        let received: u64 = field(rounds[0], "received ").parse().unwrap();
        assert!(received >= 2 * payload, "{}: {}", h.name, rounds[0]);
        let (passed, _) = field(rounds[0], "audits passed ").split_once('/').unwrap();
        assert!(
            passed.parse::<u32>().unwrap() >= 1,
            "{}: {}",
            h.name,
            rounds[0]
        );
        relayed += rounds[0]
            .split(" fetched)")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap();
        let first: f64 = field(rounds[0], "held-out loss ").parse().unwrap();
        let last: f64 = field(&text, "final | 3 rounds | held-out loss ")
            .parse()
            .unwrap();
        assert!(last < first, "{}: held-out loss {first} -> {last}", h.name);
        assert!(
            !text.lines().any(|l| l.starts_with("refused")),
            "{}: {text}",
            h.name
        );
    }
    assert_eq!(states[0], states[1]);
    assert!(
        relayed >= 1,
        "the one-sided contribution reached the other peer relayed"
    );
}

/// A worker that says it is still at round 0, forever, and sends nothing, would hold
/// every round open to its deadline (the honest workers wait for peers still behind). Seen
/// behind for two rounds in a row, it is no longer waited for: the honest workers' rounds close
/// as soon as their contributions are in ("closed all-in") from then on, and they end on the
/// same state.
#[test]
fn a_peer_that_says_it_is_behind_forever_holds_rounds_open_for_two_rounds_only() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_with(tmp.path(), 6, 3, 4_000, &["--audit-rate", "0"]);
    let h0 = Worker::start("h0", &spec, tmp.path(), &[], &[]);
    let h1 = Worker::start("h1", &spec, tmp.path(), &[&h0.addr], &[]);
    let peers = [h0.addr.as_str(), h1.addr.as_str()];
    let liar = Worker::start("behind", &spec, tmp.path(), &peers, &["--cheat", "behind"]);
    let mut states = Vec::new();
    for mut h in [h0, h1] {
        let (_, _, state) = h.finish();
        states.push(state);
        let text = h.text();
        let rounds = round_lines(&text);
        assert_eq!(rounds.len(), 6, "{text}");
        let closed: Vec<&str> = rounds.iter().map(|l| field(l, "closed ")).collect();
        eprintln!("{}: closed {closed:?}", h.name);
        // Believed at first (an honest straggler looks the same)...
        assert!(
            closed[..3].contains(&"deadline"),
            "{}: the claim never held a round open: {closed:?}\n{text}",
            h.name
        );
        // ...then not waited for any more.
        assert!(
            closed[3..].iter().all(|c| *c == "all-in"),
            "{}: rounds still held open by the peer stuck behind: {closed:?}\n{text}",
            h.name
        );
    }
    assert_eq!(states[0], states[1]);
    drop(liar);
}

#[test]
fn a_worker_that_leaves_tells_its_peers_and_is_not_waited_for() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_with(tmp.path(), 8, 3, 4_000, &["--audit-rate", "0"]);
    let mut h0 = Worker::start("h0", &spec, tmp.path(), &[], &[]);
    let h1 = Worker::start("h1", &spec, tmp.path(), &[&h0.addr], &[]);
    let peers = [h0.addr.as_str(), h1.addr.as_str()];
    let mut leaver = Worker::start("leaver", &spec, tmp.path(), &peers, &[]);
    h0.wait_for("round 3/8", RUN_TIMEOUT);
    let pid = leaver.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // It says so, tells both peers and exits cleanly.
    let left = leaver.finish_line_of("left the run at round ");
    assert!(left.contains("told 2 peers"), "{left}");
    let at: usize = field(&left, "at round ")
        .trim_end_matches(':')
        .parse()
        .unwrap();
    let mut states = Vec::new();
    for mut h in [h0, h1] {
        let (_, _, state) = h.finish();
        states.push(state);
        let text = h.text();
        let rounds = round_lines(&text);
        assert_eq!(rounds.len(), 8, "{text}");
        let closed: Vec<&str> = rounds.iter().map(|l| field(l, "closed ")).collect();
        eprintln!(
            "{}: the leaver left in round {at}; closed {closed:?}",
            h.name
        );
        // From the round it left in on, no round waits for it (a crash would hold that round
        // open to its deadline).
        assert!(
            closed[at - 1..].iter().all(|c| *c != "deadline"),
            "{}: a round waited for the worker that left in round {at}: {closed:?}\n{text}",
            h.name
        );
    }
    assert_eq!(states[0], states[1]);
}

#[test]
fn killing_every_worker_and_restarting_them_resumes_from_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    // Four workers: with three, DiLoCo on this task learns too unevenly for a fixed bar (the
    // in-process `plexus bench train --workers 3` reached 9-30% exact match at these settings).
    let spec = spec(tmp.path(), 30, 4, 60_000);
    let names = ["r0", "r1", "r2", "r3"];
    let mut first = Worker::start(names[0], &spec, tmp.path(), &[], &[]);
    let a0 = first.addr.clone();
    let mut ws = vec![Worker::start(names[1], &spec, tmp.path(), &[&a0], &[])];
    ws.push(Worker::start(
        names[2],
        &spec,
        tmp.path(),
        &[&a0, &ws[0].addr],
        &[],
    ));
    let peers = [a0.as_str(), &ws[0].addr, &ws[1].addr];
    ws.push(Worker::start(names[3], &spec, tmp.path(), &peers, &[]));
    if !first.has_within("round 10/30", RUN_TIMEOUT) {
        let logs: Vec<String> = ws
            .iter()
            .map(|w| format!("{}:\n{}", w.name, w.text()))
            .collect();
        panic!(
            "r0 never closed round 10:\n{}\n{}",
            first.text(),
            logs.join("\n")
        );
    }
    for w in ws.iter_mut().chain(std::iter::once(&mut first)) {
        w.kill();
    }
    drop(ws);
    drop(first);
    let mut r0 = Worker::start(names[0], &spec, tmp.path(), &[], &[]);
    let a0 = r0.addr.clone();
    let mut rest = vec![Worker::start(names[1], &spec, tmp.path(), &[&a0], &[])];
    rest.push(Worker::start(
        names[2],
        &spec,
        tmp.path(),
        &[&a0, &rest[0].addr],
        &[],
    ));
    let peers = [a0.as_str(), &rest[0].addr, &rest[1].addr];
    rest.push(Worker::start(names[3], &spec, tmp.path(), &peers, &[]));
    let mut finals = Vec::new();
    for w in std::iter::once(&mut r0).chain(rest.iter_mut()) {
        let line = w.wait_for("resumed from checkpoint at round ", Duration::from_secs(60));
        let at: u64 = field(&line, "round ").parse().unwrap();
        assert!(at >= 9, "{}: {line}", w.name);
        // The resumed run goes on from there: no round before the checkpoint is run again.
        let text = w.text();
        let after = text.split(&line).nth(1).unwrap_or_default().to_string();
        assert!(!after.contains("round 1/30 "), "{after}");
    }
    for w in std::iter::once(&mut r0).chain(rest.iter_mut()) {
        let (pct, loss, state) = w.finish();
        let text = w.text();
        let after = text.split("resumed from checkpoint").nth(1).unwrap();
        assert!(
            !after.contains("round 1/30 "),
            "{}: ran round 1 again:\n{text}",
            w.name
        );
        assert_learned(w, pct, loss);
        finals.push(state);
    }
    let logs: Vec<String> = std::iter::once(&r0)
        .chain(rest.iter())
        .map(|w| format!("{}:\n{}", w.name, w.text()))
        .collect();
    assert!(
        finals.windows(2).all(|p| p[0] == p[1]),
        "final states differ: {finals:?}\n{}",
        logs.join("\n")
    );
}

#[test]
fn bad_flags_and_bad_specs_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec(tmp.path(), 2, 1, 10_000);
    let run = |args: &[&str]| {
        let o = Command::new(BIN).args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let s = spec.to_str().unwrap();
    assert!(run(&["train", "--task", "reverse"]).contains("--out is required"));
    assert!(run(&["train", "--distributed", s, "--steps", "5"]).contains("--steps"));
    assert!(run(&["train", "--peer", "/ip4/127.0.0.1/tcp/1"]).contains("--distributed"));
    let dir = tmp.path().join("w").to_str().unwrap().to_string();
    let err = run(&[
        "train",
        "--distributed",
        s,
        "--data-dir",
        &dir,
        "--cheat",
        "lies",
    ]);
    assert!(err.contains("--cheat \"lies\""), "{err}");
    // `up --train`: serving flags and a worker count outside the spec's are refused by name.
    let err = run(&["up", "--train", s, "--port", "9000"]);
    assert!(err.contains("--port"), "{err}");
    let err = run(&["up", "--train", s, "--nodes", "65"]);
    assert!(err.contains("--nodes 65"), "{err}");
    let err = run(&["up", "--train", s, "--text", "/etc/hostname"]);
    assert!(err.contains("--text"), "{err}");
    // The deadline's headroom is the creator's to set, within range.
    let slack = |value: &str| {
        train_spec(tmp.path(), tmp.path().join("slack.json"))
            .arg(format!("--deadline-slack={value}"))
            .output()
            .unwrap()
    };
    let o = slack("-1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("slack"), "{err}");
    assert!(slack("1.5").status.success());
    let written = std::fs::read_to_string(tmp.path().join("slack.json")).unwrap();
    assert!(written.contains("\"slack\": 1.5"), "{written}");
    let text = std::fs::read_to_string(&spec).unwrap();
    let edited = tmp.path().join("edited.json");
    for (from, to, want) in [
        (
            "\"rounds\": 2",
            "\"rounds\": 200",
            "signature does not verify",
        ),
        (
            "\"rounds\": 2",
            "\"rounds\": 2, \"colour\": 1",
            "unknown field `colour`",
        ),
    ] {
        assert!(text.contains(from));
        std::fs::write(&edited, text.replacen(from, to, 1)).unwrap();
        let err = run(&[
            "train",
            "--distributed",
            edited.to_str().unwrap(),
            "--data-dir",
            &dir,
        ]);
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// About 20,000 characters of sentences of words drawn by a seeded generator.
fn sentences(seed: u64) -> String {
    const WORDS: [&str; 16] = [
        "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "we", "pack",
        "my", "box", "with", "jugs",
    ];
    let mut x = seed;
    let mut out = String::new();
    while out.len() < 20_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
        out.push_str(if (x >> 20).is_multiple_of(7) {
            ". "
        } else {
            " "
        });
    }
    out
}

/// A text run: the spec names the text's digest; a worker without the text or with another
/// one is refused before it joins; two workers train on it over libp2p, agree on the final
/// state, and the held-out loss ends below the text's unigram loss (the model learned
/// context, not only character frequencies). A third worker seals audit nonces it never
/// tells: its contributions are dropped, and the rounds do not wait for its nonce.
#[test]
fn a_text_run_trains_across_workers_and_refuses_another_text() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("corpus.txt");
    std::fs::write(&text, sentences(1)).unwrap();
    let other = tmp.path().join("other.txt");
    std::fs::write(&other, sentences(2)).unwrap();
    let spec = tmp.path().join("spec.json");
    let o = train_spec(tmp.path(), &spec)
        .arg("--text")
        .arg(&text)
        .args(["--seq-len", "16", "--hidden", "64", "--layers", "2"])
        .args(["--rounds", "8", "--workers-min", "2", "--inner-steps", "10"])
        .args(["--batch-size", "8", "--lr", "1e-2", "--warmup", "10"])
        .args([
            "--codec",
            "f16",
            "--score-examples",
            "16",
            "--eval-examples",
            "64",
        ])
        .args([
            "--deadline-initial-ms",
            "60000",
            "--deadline-min-ms",
            "3000",
        ])
        .args(["--outer-momentum", "0.5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec).unwrap()).unwrap();
    assert_eq!(json["spec"]["data"]["task"], "text", "{json}");

    let refused =
        |args: &[&std::ffi::OsStr]| refused_start(&spec, &tmp.path().join("refused"), args);
    let e = refused(&[]);
    assert!(e.contains("--text FILE"), "{e}");
    let e = refused(&["--text".as_ref(), other.as_os_str()]);
    assert!(e.contains("digest"), "{e}");

    let text_arg = text.to_str().unwrap();
    let mut a = Worker::start("a", &spec, tmp.path(), &[], &["--text", text_arg]);
    let mut b = Worker::start("b", &spec, tmp.path(), &[&a.addr], &["--text", text_arg]);
    let withholder = Worker::start(
        "withholder",
        &spec,
        tmp.path(),
        &[&a.addr, &b.addr],
        &["--text", text_arg, "--cheat", "withhold"],
    );
    let withholder_id = worker_id(&withholder);
    let unigram = plexus_model::train::text::TextShard::open(&text, 16)
        .unwrap()
        .unigram_loss();
    let mut states = Vec::new();
    for w in [&mut a, &mut b] {
        let line = w.finish_line();
        assert!(line.contains("held-out exact match n/a"), "{line}");
        let loss: f64 = field(&line, "held-out loss ").parse().unwrap();
        assert!(
            loss < unigram,
            "{}: held-out loss {loss} not below the unigram loss {unigram}:\n{}",
            w.name,
            w.text()
        );
        states.push(field(&line, "state ").to_string());
        // The audits' draw (rate 0.05) is keyed by the members' nonces, told once each had
        // fixed the round's set. The withholder's never opens its seal: its contribution is
        // dropped by both honest workers in every round it sent one, and nobody waits for
        // the deadline (60 s, with 8 rounds inside the run's timeout) once it has answered
        // without it; the honest workers' nonces always came.
        let text = w.text();
        let drops: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("its audit nonce did not come in time"))
            .collect();
        assert!(
            drops.iter().all(|l| l.contains(&withholder_id)),
            "{}: {text}",
            w.name
        );
        assert!(drops.len() >= 4, "{}: {text}", w.name);
        let rounds = round_lines(&text);
        // Waiting out the deadline for its nonce would take 60 s.
        let secs = |l: &str| {
            l.split(" | ")
                .find_map(|p| p.strip_suffix('s')?.parse::<f64>().ok())
                .unwrap()
        };
        assert!(
            rounds.iter().all(|l| secs(l) < 30.0),
            "{}: {rounds:?}",
            w.name
        );
        let deadline = rounds
            .iter()
            .filter(|l| field(l, "closed ") == "deadline")
            .count();
        assert!(deadline <= 1, "{}: {rounds:?}", w.name);
    }
    assert_eq!(states[0], states[1]);
    drop(withholder);
}

/// Fine-tuning the real model (SmolLM2-135M-Instruct, GGUF Q4_1, read as f32) on a text with
/// its own tokenizer: the spec names the model's digest; a worker without the model, or given
/// something else, is refused; two workers exchange sparse pseudo-gradients (the only codec
/// whose 135M-parameter message fits), end on the same state with a held-out loss below the
/// model's own at the start, and `plexus generate` loads the saved checkpoint, which keeps the
/// model's chat template.
#[test]
fn fine_tuning_the_real_model_on_a_text_lowers_its_held_out_loss() {
    let model = plexus_testkit::real_model();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("words.txt");
    std::fs::write(&text, sentences(1)).unwrap();
    let spec = tmp.path().join("spec.json");
    let o = train_spec(tmp.path(), &spec)
        .arg("--checkpoint")
        .arg(&model)
        .arg("--text")
        .arg(&text)
        .args(["--seq-len", "16", "--rounds", "2", "--workers-min", "2"])
        .args(["--inner-steps", "3", "--batch-size", "2", "--lr", "3e-4"])
        .args(["--warmup", "1", "--codec", "sparse", "--audit-rate", "0"])
        .args(["--score-examples", "4", "--eval-examples", "32"])
        .args(["--deadline-initial-ms", "600000", "--outer-momentum", "0.5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec).unwrap()).unwrap();
    assert_eq!(json["spec"]["model"]["layers"], 30, "{json}");
    assert!(json["spec"]["model"]["checkpoint"].is_string(), "{json}");

    let text_arg = text.to_str().unwrap();
    let refused =
        |args: &[&std::ffi::OsStr]| refused_start(&spec, &tmp.path().join("refused"), args);
    let e = refused(&["--text".as_ref(), text.as_os_str()]);
    assert!(e.contains("--checkpoint PATH"), "{e}");
    let e = refused(&[
        "--text".as_ref(),
        text.as_os_str(),
        "--checkpoint".as_ref(),
        text.as_os_str(),
    ]);
    assert!(e.contains("cannot read the model"), "{e}");
    // `plexus up --train` checks the same before it starts a worker: its refusal (stderr).
    let up_refused = |checkpoint: Option<&std::path::Path>| {
        let mut cmd = Command::new(BIN);
        cmd.args(["up", "--nodes", "2", "--train"])
            .arg(&spec)
            .arg("--text")
            .arg(&text);
        if let Some(c) = checkpoint {
            cmd.arg("--checkpoint").arg(c);
        }
        let o = cmd.output().unwrap();
        assert!(!o.status.success(), "up --train started");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = up_refused(None);
    assert!(e.contains("--checkpoint PATH"), "{e}");
    // It reads the model's files, not its weights (each worker loads those): a file that is
    // not a model is refused.
    let e = up_refused(Some(&text));
    assert!(e.contains("cannot read the model"), "{e}");
    // Another model is refused by its digest.
    let other = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny/smollm2/model-f32.gguf");
    let e = up_refused(Some(&other));
    assert!(e.contains("digest"), "{e}");

    let m = model.to_str().unwrap();
    let args = ["--text", text_arg, "--checkpoint", m];
    let mut a = Worker::start("a", &spec, tmp.path(), &[], &args);
    let mut b = Worker::start("b", &spec, tmp.path(), &[&a.addr], &args);
    let mut states = Vec::new();
    for w in [&mut a, &mut b] {
        let line = w.finish_line();
        let start = w.wait_for("start | model", Duration::from_secs(1));
        let before: f64 = field(&start, "held-out loss ").parse().unwrap();
        let after: f64 = field(&line, "held-out loss ").parse().unwrap();
        // Measured: 7.76 -> 6.73.
        assert!(
            after < 0.95 * before,
            "{}: held-out loss {before} -> {after}:\n{}",
            w.name,
            w.text()
        );
        // The bytes are counted, not estimated: round 1 sent the one peer the sparse payload
        // of every parameter (3.9 MB, not the 538 MB of f32) plus the signed commitment and
        // the round's small messages.
        let text = w.text();
        let params = params_of(&text);
        let payload = "sparse"
            .parse::<plexus_train::Codec>()
            .unwrap()
            .encoded_len(params);
        let sent: usize = field(round_lines(&text)[0], "sent ").parse().unwrap();
        assert!(
            (payload..payload + 16 * 1024).contains(&sent),
            "{}: sent {sent} B in round 1, the payload is {payload} B",
            w.name
        );
        states.push(field(&line, "state ").to_string());
    }
    assert_eq!(states[0], states[1]);
    let saved = tmp.path().join("a/model");
    let tc = std::fs::read_to_string(saved.join("tokenizer_config.json")).unwrap();
    assert!(tc.contains("chat_template"), "{tc}");
    let o = Command::new(BIN)
        .args(["generate", "--model"])
        .arg(&saved)
        .args([
            "--prompt",
            "the quick",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
}

/// `plexus up --train SPEC`: the spec's run on this machine with two worker processes. Each
/// is SIGKILLed mid-run in turn, worker 1 first and then worker 0 (the one the others joined
/// through); `up` starts each again, it resumes from its checkpoint, and both end on the same
/// state; the trained model is where `up` says. The spec asks a stake: `up` stakes each
/// worker on its own ledger, so they start (and start again).
#[test]
fn plexus_up_trains_a_spec_and_restarts_a_killed_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec_with(tmp.path(), 60, 2, 60_000, &["--min-stake", "1PLX"]);
    let mut up = Worker::spawn(
        "up",
        Command::new(BIN)
            .args(["up", "--train"])
            .arg(&spec)
            .args(["--nodes", "2", "--threads", "1"])
            .env("PLEXUS_CACHE_DIR", tmp.path().join("cache")),
    );
    let pid = up.child.id();
    up.wait_for("worker 0 | round 3/60", RUN_TIMEOUT);
    kill_worker(pid, 1);
    up.wait_for("worker 1 exited", RUN_TIMEOUT);
    let resumed = up.wait_for("worker 1 | resumed from checkpoint", RUN_TIMEOUT);
    let at: u64 = field(&resumed, "at round ").parse().unwrap();
    // Worker 0 once worker 1 is back and a round has closed since (`up` relays worker 0's
    // round lines).
    up.wait_for(&format!("worker 0 | round {}/60", at + 2), RUN_TIMEOUT);
    kill_worker(pid, 0);
    up.wait_for("worker 0 exited", RUN_TIMEOUT);
    up.wait_for("worker 0 | resumed from checkpoint", RUN_TIMEOUT);
    let done = up.finish_line_of("trained: ");
    let finals: Vec<String> = up
        .text()
        .lines()
        .filter(|l| l.contains("| final |"))
        .map(|l| field(l, "state ").to_string())
        .collect();
    assert_eq!(finals.len(), 2, "{}", up.text());
    assert_eq!(finals[0], finals[1], "{}", up.text());
    let staked = "worker 0 | stake: account ";
    let starts = up
        .text()
        .lines()
        .filter(|l| l.starts_with(staked) && l.contains(" holds 1000000 staked "))
        .count();
    assert_eq!(starts, 2, "worker 0 started twice, staked: {}", up.text());
    let model = field(&done, "trained: ");
    assert!(Path::new(model).join("config.json").exists(), "{done}");
}

/// SIGKILLs the worker process of `plexus up` (`pid`) whose data directory is `worker-{i}`.
fn kill_worker(pid: u32, i: usize) {
    let workers = children_of(pid);
    assert_eq!(workers.len(), 2, "{workers:?}");
    let marker = format!("worker-{i}");
    let victim = *workers
        .iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&marker))
        })
        .unwrap();
    assert!(Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap()
        .success());
}
