//! A model's identity: the sha256 of its weight files' bytes (one GGUF file: exactly
//! `sha256sum model.gguf`; sharded safetensors: the files concatenated in name order).
//!
//! Hashing a multi-gigabyte model takes seconds, so the result is cached in a small file keyed by
//! each file's path, size and modification time; a changed file gets a new key and is rehashed.

use plexus_core::{Digest, Sha256Stream};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// Why the identity could not be computed.
#[derive(Debug, thiserror::Error)]
#[error("cannot hash {path}")]
pub struct IdentityError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn cache_key(files: &[PathBuf]) -> Result<Digest, IdentityError> {
    let mut s = Sha256Stream::new();
    for f in files {
        let err = |source| IdentityError {
            path: f.clone(),
            source,
        };
        let meta = std::fs::metadata(f).map_err(err)?;
        let canon = std::fs::canonicalize(f).map_err(err)?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        s.update(canon.to_string_lossy().as_bytes());
        s.update(&meta.len().to_le_bytes());
        s.update(&mtime.to_le_bytes());
    }
    Ok(s.finish())
}

/// Total bytes of `files`.
pub fn total_size(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// Hashes `files` (calling `progress(done, total)` as it goes), or returns the cached result from
/// `cache_dir` when the files have not changed.
pub fn identity(
    files: &[PathBuf],
    cache_dir: Option<&Path>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Digest, IdentityError> {
    let key = cache_key(files)?;
    let cached = cache_dir.map(|d| d.join("identity").join(format!("{key}.sha256")));
    if let Some(c) = &cached {
        if let Some(d) = std::fs::read_to_string(c)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(d);
        }
    }
    let total = total_size(files);
    let mut done = 0u64;
    let mut s = Sha256Stream::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let err = |source| IdentityError {
            path: f.clone(),
            source,
        };
        let mut file = std::fs::File::open(f).map_err(err)?;
        loop {
            let n = file.read(&mut buf).map_err(err)?;
            if n == 0 {
                break;
            }
            s.update(&buf[..n]);
            done += n as u64;
            progress(done, total);
        }
    }
    let digest = s.finish();
    if let Some(c) = &cached {
        // Best effort: a read-only cache only costs a rehash next time. Write then rename, so a
        // concurrent reader never sees half a file.
        if let Some(dir) = c.parent() {
            let _ = std::fs::create_dir_all(dir);
            let tmp = c.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, digest.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, c);
            }
        }
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.bin");
        std::fs::write(&f, b"abc").unwrap();
        let cache = dir.path().join("cache");
        let d = identity(std::slice::from_ref(&f), Some(&cache), |_, _| {}).unwrap();
        assert_eq!(d, Digest::of(b"abc"));
        let mut calls = 0;
        let again = identity(std::slice::from_ref(&f), Some(&cache), |_, _| calls += 1).unwrap();
        assert_eq!(again, d);
        assert_eq!(calls, 0, "second call must come from the cache");
    }
}
