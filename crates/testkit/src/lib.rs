//! Test support shared by the workspace's crates (a dev-dependency only): where the real model
//! the tests run on is, so they work on a fresh clone as well as beside `../shared`.
//!
//! [`real_model`] looks, in order, at `$PLEXUS_TEST_MODEL`, at
//! `../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf` beside the workspace, and at the file
//! `plexus models fetch` writes (`<cache>/models/smollm2-135m-instruct/...`, the cache being
//! `$PLEXUS_CACHE_DIR`, else `$XDG_CACHE_HOME/plexus`, else `~/.cache/plexus`, as in
//! `crates/plexus/src/cmd/mod.rs`). When none has it, the test fails with one line saying
//! how to get it.

use std::path::{Path, PathBuf};

/// The file name of the real model (SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB).
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the real model may be, in the order [`real_model`] looks.
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("PLEXUS_TEST_MODEL").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    out.push(workspace().join("../shared/models").join(MODEL_FILE));
    let cache = if let Some(d) = std::env::var_os("PLEXUS_CACHE_DIR") {
        Some(PathBuf::from(d))
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        Some(PathBuf::from(d).join("plexus"))
    } else {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("plexus"))
    };
    if let Some(c) = cache {
        out.push(
            c.join("models")
                .join("smollm2-135m-instruct")
                .join(MODEL_FILE),
        );
    }
    out
}

/// The real model's path, if any candidate has it.
pub fn find_real_model() -> Option<PathBuf> {
    candidates().into_iter().find(|p| p.is_file())
}

/// The real model's path; panics with one line naming what is missing and how to get it.
pub fn real_model() -> PathBuf {
    match find_real_model() {
        Some(p) => p,
        None => panic!(
            "the real model {MODEL_FILE} is missing: run `cargo run -p plexus -- models fetch` \
             (or set PLEXUS_TEST_MODEL=PATH); looked at {}",
            candidates()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_copy_comes_before_the_cache() {
        let c = candidates();
        let shared = c
            .iter()
            .position(|p| p.ends_with(Path::new("shared/models").join(MODEL_FILE)))
            .unwrap_or(usize::MAX);
        let cached = c
            .iter()
            .position(|p| p.ends_with(Path::new("smollm2-135m-instruct").join(MODEL_FILE)))
            .unwrap_or(usize::MAX);
        assert!(shared < cached, "{c:?}");
    }
}
