#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! The `plexus` binary as users run it: output contract of `generate`, determinism, clear errors
//! on bad input (one message, non-zero exit, no panic, nothing on stdout), and training a
//! starter model to the accuracy target.

#[path = "support/served.rs"]
mod served;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// `plexus ARGS` with the tests' cache and no backtraces.
fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_plexus"));
    c.args(args)
        .env(
            "PLEXUS_CACHE_DIR",
            std::env::temp_dir().join("plexus-test-cache"),
        )
        .env("RUST_BACKTRACE", "0");
    c
}

fn plexus(args: &[&str]) -> Output {
    command(args).output().expect("run plexus")
}

/// [`plexus`], killed (and the test failed) if it runs longer than `limit`.
fn plexus_within(limit: Duration, args: &[&str]) -> Output {
    let mut child = command(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run plexus");
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("plexus {args:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny")
        .join(name)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure whose message contains `needle`.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(
        o.stdout.is_empty(),
        "partial output on stdout: {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "missing {needle:?} in: {err}"
    );
}

#[test]
fn generate_prints_only_text_and_is_seed_deterministic() {
    let model = tiny("llama2").join("model-q8_0.gguf");
    let m = model.to_str().unwrap();
    let run = |seed: &str| {
        plexus(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "The quick",
            "--max-tokens",
            "12",
            "--temperature",
            "0.9",
            "--seed",
            seed,
            "--threads",
            "1",
        ])
    };
    let a = run("7");
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(
        stderr(&a).contains("generated: 12 tokens"),
        "{}",
        stderr(&a)
    );
    assert!(
        !String::from_utf8_lossy(&a.stdout).contains("tok/s"),
        "timing must go to stderr"
    );
    let b = run("7");
    assert_eq!(a.stdout, b.stdout, "same seed, same text");
    let others: Vec<Vec<u8>> = ["8", "9", "10"].iter().map(|s| run(s).stdout).collect();
    assert!(
        others.iter().any(|o| *o != a.stdout),
        "different seeds should differ somewhere"
    );
}

/// The README's first commands run without `--model`: the model comes from the cache that
/// `plexus models fetch` fills (here a link to the real model, and no network to fetch from).
#[test]
fn commands_without_model_use_the_cached_default() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("models/smollm2-135m-instruct");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(
        plexus_testkit::real_model(),
        dir.join(plexus_testkit::MODEL_FILE),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(["generate", "--prompt", "The capital of France is"])
        .args(["--temperature", "0", "--max-tokens", "4", "--threads", "2"])
        .env("PLEXUS_CACHE_DIR", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("PLEXUS_PYPI_URL", "http://127.0.0.1:9/simple")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("generated: 4 tokens"), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
}

#[test]
fn inspect_reports_architecture_and_identity() {
    let path = tiny("qwen2").join("model-f32.gguf");
    let o = plexus(&["models", "inspect", path.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["architecture"], "qwen2");
    assert_eq!(v["qkv_bias"], true);
    assert_eq!(v["layers"], 2);
    let bytes = std::fs::read(&path).unwrap();
    let id = v["identity"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    // The identity of a GGUF file is its sha256: check against an independent implementation.
    let out = Command::new("sha256sum").arg(&path).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(id));
    assert!(!bytes.is_empty());

    // The text form is for people: no Rust debug text such as `Some(1)`.
    let o = plexus(&["models", "inspect", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.contains("Some(") && !text.contains("None"), "{text}");
    assert!(text.contains("qkv bias yes"), "{text}");
    let tokenizer = text.lines().find(|l| l.starts_with("tokenizer")).unwrap();
    assert!(tokenizer.contains(", bos "), "{tokenizer}");
}

fn patched(src: &Path, dir: &Path, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    patch(&mut b);
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle")
}

#[test]
fn bad_inputs_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tiny("llama2").join("model-f32.gguf");
    let gen = |model: &Path| {
        plexus(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
        ])
    };

    let truncated = patched(&src, tmp.path(), "trunc.gguf", |b| b.truncate(b.len() / 2));
    assert_clean_failure(&gen(&truncated), "truncated");
    let header_cut = patched(&src, tmp.path(), "cut.gguf", |b| b.truncate(100));
    assert_clean_failure(&gen(&header_cut), "truncated");

    let not_gguf = tmp.path().join("notes.gguf");
    std::fs::write(&not_gguf, "hello, this is not a model").unwrap();
    assert_clean_failure(&gen(&not_gguf), "not a GGUF");

    let arch = patched(&src, tmp.path(), "arch.gguf", |b| {
        // general.architecture's value: type (u32) + length (u64) + "llama".
        let at = find(b, b"general.architecture") + "general.architecture".len() + 12;
        b[at..at + 5].copy_from_slice(b"gpt9x");
    });
    assert_clean_failure(&gen(&arch), "unknown architecture \"gpt9x\"");

    let quant = patched(&src, tmp.path(), "quant.gguf", |b| {
        // token_embd.weight's tensor info: name, rank (u32), 2 dims (u64), type (u32).
        let at = find(b, b"token_embd.weight") + "token_embd.weight".len() + 4 + 16;
        b[at..at + 4].copy_from_slice(&16u32.to_le_bytes()); // IQ2_XXS
    });
    assert_clean_failure(&gen(&quant), "unsupported type IQ2_XXS");

    let no_tok = tmp.path().join("no-tokenizer");
    std::fs::create_dir(&no_tok).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(tiny("llama2").join(f), no_tok.join(f)).unwrap();
    }
    assert_clean_failure(&gen(&no_tok), "no tokenizer");

    let missing = gen(&tmp.path().join("missing.gguf"));
    assert_clean_failure(&missing, "does not exist");
    assert!(
        stderr(&missing).contains("plexus models fetch"),
        "{}",
        stderr(&missing)
    );

    let long = "word ".repeat(400);
    let o = plexus(&[
        "generate",
        "--model",
        src.to_str().unwrap(),
        "--prompt",
        &long,
    ]);
    assert_clean_failure(&o, "context holds 256");

    let out = tmp.path().join("never");
    let o = plexus(&[
        "train",
        "--task",
        "juggling",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "unknown task");
    assert!(
        !out.exists(),
        "a failed run must not leave an output directory"
    );
}

#[test]
fn starter_model_trains_to_target_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("reverse");
    let o = plexus(&[
        "train",
        "--task",
        "reverse",
        "--size",
        "5",
        "--steps",
        "350",
        "--eval-every",
        "350",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let pct: f64 = text
        .split("held-out exact match ")
        .nth(1)
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no eval line in {text}"));
    assert!(pct >= 95.0, "held-out exact match {pct}% < 95%:\n{text}");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let o = plexus(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "abcde|",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "edcba");

    // After training, the output says how to prompt the model: run that command as printed.
    let hint = text
        .lines()
        .find_map(|l| l.strip_prefix("try it: plexus generate "))
        .unwrap_or_else(|| panic!("no hint in {text}"));
    let prompt = hint.split('\'').nth(1).unwrap();
    assert!(prompt.ends_with('|') && prompt.len() == 6, "{hint}");
    assert!(text.contains("abcdefghijklmnopqrstuvwxyz"), "{text}");
    let o = plexus(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        "6",
    ]);
    let mut expected: Vec<char> = prompt.trim_end_matches('|').chars().collect();
    expected.reverse();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        expected.into_iter().collect::<String>()
    );

    // Characters outside the vocabulary are named, not dropped in silence.
    let o = plexus(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "ABCDE|",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no token for 'A', 'B', 'C', 'D', 'E'"),
        "{}",
        stderr(&o)
    );

    // `plexus gateway --model` serves the checkpoint: a completion as `generate` gives it, and
    // a prompt with characters outside the vocabulary refused by name (400), not cut.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plexus"));
    cmd.args(["gateway", "--model"])
        .arg(&out)
        .args(["--port", "0", "--ledger", "none"]);
    let (_server, url) = served::start(cmd);
    let (status, body) = post_json(
        &url,
        "/v1/completions",
        r#"{"model":"reverse","prompt":"abcde|","max_tokens":8,"temperature":0}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], "edcba", "{body}");
    let (status, body) = post_json(
        &url,
        "/v1/completions",
        r#"{"model":"reverse","prompt":"ABCDE|","max_tokens":8}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("no token for 'A', 'B', 'C', 'D', 'E'") && body.contains("\"prompt\""),
        "{body}"
    );
}

/// `POST path` with a JSON `body` to the server at `url`; its status and body.
fn post_json(url: &str, path: &str, body: &str) -> (u16, String) {
    let resp = ureq::post(&format!("{url}{path}"))
        .config()
        .http_status_as_error(false)
        .build()
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().read_to_string().unwrap())
}

#[test]
fn chat_answers_each_line_and_survives_an_oversized_turn() {
    use std::io::Write;
    let model = tiny("smollm2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "6",
            "--temperature",
            "0",
        ])
        // One line per reply, whatever the random-weight model says.
        .args(["--stop", "\n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let long = "word ".repeat(400);
    let input = format!("hello there\n{long}\n/reset\nsecond question\n/exit\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let replies = String::from_utf8_lossy(&o.stdout).lines().count();
    assert_eq!(
        replies,
        2,
        "one reply per answered turn: {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(stderr(&o).contains("context holds 256"), "{}", stderr(&o));
}

#[test]
fn bench_train_prints_sync_and_diloco_side_by_side() {
    let o = plexus(&[
        "bench",
        "train",
        "--workers",
        "2",
        "--inner-steps",
        "5",
        "--total-steps",
        "10",
        "--codec",
        "int8",
        "--task",
        "reverse",
        "--size",
        "3",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--batch-size",
        "4",
        "--eval-examples",
        "16",
        "--score-examples",
        "8",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for side in ["sync", "diloco"] {
        for key in ["loss", "accuracy", "bytes_per_worker"] {
            assert!(v[side][key].is_number(), "{side}.{key} in {v}");
        }
    }
    assert_eq!(v["workers"], 2);
    assert_eq!(v["inner_steps"], 5);
    assert_eq!(v["codec"], "int8");
    // 2 workers x 10 steps x 4 sequences x 8 tokens, the same on both sides.
    assert_eq!(v["tokens"], 640);
    assert_eq!(v["sync_tokens"], 640);
    // Sync sends an f32 gradient each of 10 steps, DiLoCo an int8 one each of 2 rounds.
    let n = v["model"]["params"].as_u64().unwrap();
    assert_eq!(v["sync"]["bytes_per_worker"], 10 * (5 + 4 * n));
    assert_eq!(
        v["diloco"]["bytes_per_worker"],
        2 * (5 + n + 4 * n.div_ceil(256))
    );
    assert!(v["diloco"]["loss"].as_f64().unwrap() < (41f64).ln(), "{v}");

    let o = plexus(&["bench", "train", "--data", "text:/nonexistent/x.txt"]);
    assert_clean_failure(&o, "/nonexistent/x.txt");
    let o = plexus(&["bench", "train", "--data", "csv:x.csv"]);
    assert_clean_failure(&o, "expected text:FILE");
    let o = plexus(&["bench", "train", "--data", "text:x.txt", "--task", "sort"]);
    assert_clean_failure(&o, "drop --task");
    let o = plexus(&["bench", "train", "--seq-len", "16"]);
    assert_clean_failure(&o, "--seq-len is for --data");
    let o = plexus(&["bench", "train", "--codec", "int4"]);
    assert_clean_failure(&o, "unknown codec");
    let o = plexus(&["bench", "train", "--runs", "10:f32", "--codec", "int8"]);
    assert_clean_failure(&o, "drop --inner-steps and --codec");
    let o = plexus(&["bench", "train", "--runs", "10"]);
    assert_clean_failure(&o, "expected H:CODEC");
    let o = plexus(&["bench", "train", "--checkpoint", "/nonexistent/m.gguf"]);
    assert_clean_failure(&o, "--data");
    let o = plexus(&[
        "bench",
        "train",
        "--data",
        "text:x.txt",
        "--checkpoint",
        "/nonexistent/m.gguf",
    ]);
    assert_clean_failure(&o, "--checkpoint /nonexistent/m.gguf");
    let o = plexus(&[
        "bench",
        "train",
        "--inner-steps",
        "7",
        "--total-steps",
        "10",
    ]);
    assert_clean_failure(&o, "multiple of H = 7");
}

#[test]
fn bench_train_runs_several_settings_on_a_text() {
    let tmp = tempfile::tempdir().unwrap();
    let text: String = (0..300)
        .map(|i| format!("Line {i} of a small text, {} words long.\n", i % 17))
        .collect();
    let file = tmp.path().join("text.txt");
    std::fs::write(&file, &text).unwrap();
    let data = format!("text:{}", file.display());
    // A small run on the text: `runs` and `extra` flags added.
    let bench = |runs: &str, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "train",
            "--workers",
            "2",
            "--runs",
            runs,
            "--total-steps",
            "10",
            "--data",
            &data,
            "--seq-len",
            "15",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--batch-size",
            "2",
            "--eval-examples",
            "16",
            "--score-examples",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        plexus(&args)
    };
    let o = bench("5:f32 5:sparse/8of256/2bit", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = o
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one JSON line per setting");
    let n = lines[0]["model"]["params"].as_u64().unwrap();
    for (v, codec) in lines.iter().zip(["f32", "sparse/8of256/2bit"]) {
        assert_eq!(v["codec"], codec);
        // Text has no exact answers; one synchronous run serves both lines.
        assert!(v["sync"]["accuracy"].is_null() && v["diloco"]["accuracy"].is_null());
        assert_eq!(v["sync"], lines[0]["sync"]);
        // 2 workers x 10 steps x 2 sequences x 16 tokens on both sides.
        assert_eq!(
            (v["tokens"].as_u64(), v["sync_tokens"].as_u64()),
            (Some(640), Some(640))
        );
        assert_eq!(v["sync"]["bytes_per_worker"], 10 * (5 + 4 * n));
        assert!(v["diloco"]["loss"].as_f64().unwrap().is_finite());
        assert!(v["text"]["unigram_loss"].as_f64().unwrap() > 1.0);
    }
    assert_eq!(lines[1]["error_feedback"], true);

    // --no-sync leaves the synchronous run out and changes nothing else: the DiLoCo side comes
    // out bit-identical.
    let o = bench("5:f32", &["--no-sync"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["sync"].is_null() && v["sync_tokens"].is_null(), "{v}");
    assert!(
        v["loss_ratio"].is_null() && v["bytes_ratio"].is_null(),
        "{v}"
    );
    assert_eq!(v["diloco"]["loss"], lines[0]["diloco"]["loss"]);
    assert_eq!(
        v["diloco"]["bytes_per_worker"],
        lines[0]["diloco"]["bytes_per_worker"]
    );
    assert_eq!(v["tokens"], lines[0]["tokens"]);
}

#[test]
fn node_nat_flags_are_checked_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("llama2").join("model-f32.gguf");
    let node = |extra: &[&str]| {
        let mut args = vec![
            "node",
            "--model",
            model.to_str().unwrap(),
            "--data-dir",
            tmp.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        plexus(&args)
    };
    // Relay bounds without --relay would be ignored: refused.
    assert_clean_failure(&node(&["--relay-max-circuits", "5"]), "--relay");
    // A relay address must name the relay.
    assert_clean_failure(
        &node(&["--relay-via", "/ip4/127.0.0.1/tcp/1"]),
        "/p2p/<relay peer id>",
    );
    assert_clean_failure(&node(&["--relay-via", "not an address"]), "--relay-via");
    assert_clean_failure(
        &node(&["--relay", "--relay-circuit-secs", "0"]),
        "--relay-circuit-secs",
    );
}

/// `--ledger none` has no balances, stakes or charges: `plexus up --node-stake/--faucet/--price`
/// and `plexus gateway --price` are refused by name before anything starts, not ignored.
#[test]
fn ledger_flags_are_refused_without_a_ledger() {
    let model = tiny("smollm2/model-f32.gguf");
    let model = model.to_str().unwrap();
    for (flag, value) in [
        ("--node-stake", "5PLX"),
        ("--faucet", "5PLX"),
        ("--price", "3"),
    ] {
        let out = plexus(&[
            "up", "--model", model, "--nodes", "2", "--ledger", "none", flag, value, "--port", "0",
        ]);
        assert_clean_failure(&out, flag);
    }
    let out = plexus(&[
        "gateway", "--model", model, "--ledger", "none", "--price", "3", "--port", "0",
    ]);
    assert_clean_failure(&out, "--price");
}

/// `plexus up` sets its nodes' price, so a `--max-price` below `--node-price` could only wait
/// for a route that never comes: refused by name before anything starts.
#[test]
fn up_refuses_a_max_price_below_its_nodes_price() {
    let model = tiny("smollm2/model-f32.gguf");
    let model = model.to_str().unwrap();
    let out = plexus(&[
        "up",
        "--model",
        model,
        "--nodes",
        "2",
        "--node-price",
        "10",
        "--max-price",
        "5",
        "--port",
        "0",
    ]);
    assert_clean_failure(&out, "--max-price 5 is below --node-price 10");
}

/// The hidden test flag that makes a node lie about its speed still refuses a speed no
/// announcement may carry (peers would refuse every announcement of the node).
#[test]
fn node_refuses_a_claimed_speed_announcements_cannot_carry() {
    let model = tiny("smollm2/model-f32.gguf");
    let dir = tempfile::tempdir().unwrap();
    let out = plexus(&[
        "node",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--claim-decode-s-per-layer",
        "0",
    ]);
    assert_clean_failure(&out, "--claim-decode-s-per-layer 0 is not a speed");
}

/// A network gateway whose audit book (`audits.json` in its data directory) is damaged
/// refuses to start, naming the file: starting with an empty book would forgive every node
/// it convicted.
#[test]
fn gateway_refuses_a_damaged_audit_book() {
    let model = tiny("smollm2/model-f32.gguf");
    let dir = tempfile::tempdir().unwrap();
    let book = dir.path().join("audits.json");
    std::fs::write(&book, br#"{"format": 1, "convicted": ["#).unwrap();
    // (Bounded: a gateway that started anyway would serve until killed.)
    let out = plexus_within(
        Duration::from_secs(60),
        &[
            "gateway",
            "--model",
            model.to_str().unwrap(),
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--ledger",
            "none",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWHHzSeKaY8xuZVzkLbKFfvNgPPeKhFBGrMbNzbm5akpqu",
            "--port",
            "0",
        ],
    );
    assert_clean_failure(&out, &book.display().to_string());
    assert_clean_failure(&out, "move it aside");
    // Refused before it joins the network: nothing listens, no key is written.
    assert!(!dir.path().join("node.key").exists());
}
