#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! End to end: the real `plexus gateway` binary serving the real SmolLM2 model on a free port
//! with its default ledger (SQLite in the data dir), driven by the official `openai` Python
//! client (tests/openai_client.py with a key from `plexus keys create`, then
//! tests/openai_billing.py: exact charges, cancelled streams, 402 and 401, then
//! tests/structured_client.py: JSON schemas and tool calls that always validate, then
//! tests/dialects_client.py: the Anthropic, Responses and Ollama dialects with their official
//! clients), then stopped with SIGTERM, which must end it cleanly.
//!
//! Python comes from `PLEXUS_PYTHON` (default `python3`) and needs the `openai` package:
//! `pip install -r scripts/requirements-ci.txt` (`.ci/run` sets up a venv with it).

#[path = "support/served.rs"]
mod served;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const INSTALL: &str = "pip install -r scripts/requirements-ci.txt";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> String {
    std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Fails (does not skip) when the client library is missing, saying how to install it.
fn require_openai(python: &str) {
    let out = Command::new(python)
        .args(["-c", "import openai; print(openai.__version__)"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} ({e}); set PLEXUS_PYTHON to a Python 3 with the `openai` package: {INSTALL}"));
    assert!(
        out.status.success(),
        "the `openai` Python package is not importable by {python}; install it with `{INSTALL}` \
         (or point PLEXUS_PYTHON at a venv that has it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `plexus keys create --data-dir DIR --faucet AMOUNT`: the printed API key.
fn create_key(data: &Path, faucet: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(["keys", "create", "--faucet", faucet, "--data-dir"])
        .arg(data)
        .output()
        .expect("run plexus keys create");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("API key: "))
        .unwrap_or_else(|| panic!("no key in {stdout}"))
        .to_owned()
}

#[test]
fn openai_python_client_against_the_real_model() {
    let python = python();
    require_openai(&python);
    let model = plexus_testkit::real_model();
    assert!(model.exists(), "missing {}", model.display());

    let data = tempfile::tempdir().unwrap();
    let funded = create_key(data.path(), "100PLX");
    let poor = create_key(data.path(), "10");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_plexus"));
    cmd.args(["gateway", "--model"])
        .arg(&model)
        .args(["--port", "0", "--price", "3", "--data-dir"])
        .arg(data.path())
        .env(
            "PLEXUS_CACHE_DIR",
            std::env::temp_dir().join("plexus-test-cache"),
        );
    let (server, url) = served::start(cmd);
    assert!(
        url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"),
        "{url}"
    );

    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/openai_client.py"))
        .arg(&url)
        .arg(&funded)
        .output()
        .expect("run the python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the openai client checks failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");

    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/openai_billing.py"))
        .args([&url, &funded, &poor, "3"])
        .output()
        .expect("run the python billing checks");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all billing checks passed"),
        "the billing checks failed ({}):\n{stdout}\n{stderr}",
        out.status
    );

    // Structured outputs and tool calls through the local engine: every answer parses and
    // validates (tests/structured_client.py).
    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/structured_client.py"))
        .args([&url, &funded])
        .output()
        .expect("run the python structured-output checks");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all structured checks passed"),
        "the structured-output checks failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The Anthropic, Responses and Ollama dialects with their official clients: the same
    // greedy text as the chat completion, streamed and not, tools, refusals, billing
    // (tests/dialects_client.py).
    let out = Command::new(&python)
        .arg(repo().join("crates/plexus/tests/dialects_client.py"))
        .args([&url, &funded, "3"])
        .output()
        .expect("run the python dialect checks");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all dialect checks passed"),
        "the dialect checks failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM: the gateway stops accepting, finishes and exits 0.
    let mut server = server;
    let pid = server.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the gateway did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
}
