//! Fetching a file from a Hugging Face style hub:
//! `{endpoint}/{repo}/resolve/{revision}/{file}` -> a partial file in the cache, verified
//! against the pinned size and digest before the caller installs it.

use super::{http, FetchSpec, Partial};
use anyhow::{ensure, Context as _};

/// Where a model file lives on a hub.
#[derive(Debug, Clone)]
pub struct HubSource {
    /// Base URL, e.g. `https://huggingface.co` (`$HF_ENDPOINT` overrides it).
    pub endpoint: String,
    /// `owner/name` of the model repository.
    pub repo: String,
    /// A commit id (immutable) or a branch name.
    pub revision: String,
    /// Path of the file inside the repository.
    pub file: String,
}

impl HubSource {
    pub fn url(&self) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint.trim_end_matches('/'),
            self.repo,
            self.revision,
            self.file
        )
    }
}

/// Downloads the file into a partial file in `dir` and checks it against `spec`.
pub fn fetch(
    agent: &ureq::Agent,
    src: &HubSource,
    spec: &FetchSpec,
    dir: &std::path::Path,
    progress: bool,
) -> anyhow::Result<Partial> {
    let url = src.url();
    let mut part = Partial::create(dir, &spec.file_name)?;
    let bar = super::bar(
        progress,
        &format!("{} from {}", spec.file_name, host(&url)),
        None,
    );
    let got = http::download(agent, &url, part.file()?, &bar);
    bar.finish_and_clear();
    let got = got?;
    ensure!(
        got.len == spec.size,
        "{url} sent {} bytes, expected {}",
        got.len,
        spec.size
    );
    super::check_digest(&got.sha256, &spec.sha256)
        .with_context(|| format!("{url} sent other bytes"))?;
    Ok(part)
}

/// `https://host/path` -> `host`, for short progress messages.
pub fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}
