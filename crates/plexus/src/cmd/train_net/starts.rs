//! This worker's start states of its last rounds, kept for its auditors on disk: a start state
//! is the optimizer's moments and the error-feedback residual (12 bytes a parameter: 1.6 GB
//! at 135M), and a worker of an audited run keeps two of them ([`super::shared::KEPT_STARTS`])
//! beside its own, which in memory put an audited worker's peak near twice an unaudited one's.
//! Each is one file in the transfer layout ([`start_len`]: step, then `m`, `v` and residual as
//! little-endian f32), so a range an auditor asks is read from the file as it is sent
//! ([`StartFile::slice`]), and the whole is read back only to re-execute this worker's own
//! round ([`StartFile::load`]).

use plexus_train::transfer::{start_from_bytes, start_len, MAX_RANGE_BYTES};
use plexus_train::worker::WorkerState;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// One kept start state on disk; the file goes with it.
#[derive(Debug)]
pub struct StartFile {
    pub round: u64,
    /// Parameters of the state.
    pub n: usize,
    path: PathBuf,
}

impl StartFile {
    /// Writes `state` as `dir/round-<round>.bin` (creating `dir`).
    pub fn write(dir: &Path, round: u64, state: &WorkerState) -> std::io::Result<Self> {
        let n = state.opt.m.len();
        if state.opt.v.len() != n || state.feedback.residual.len() != n {
            return Err(std::io::Error::other(format!(
                "a start state of {n} moments with {} second moments and a residual of {}",
                state.opt.v.len(),
                state.feedback.residual.len()
            )));
        }
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("round-{round}.bin"));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&path)?);
        out.write_all(&state.opt.step.to_le_bytes())?;
        let mut buf = Vec::with_capacity(1 << 20);
        for values in [&state.opt.m, &state.opt.v, &state.feedback.residual] {
            for chunk in values.chunks(1 << 18) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                out.write_all(&buf)?;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_data()?;
        Ok(Self { round, n, path })
    }

    /// Bytes `range` of the state ([`start_len`] in all), as
    /// [`plexus_train::transfer::start_slice`] gives them from memory; `None` when the range
    /// is empty, longer than [`MAX_RANGE_BYTES`] or past the end, or the file cannot be read.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Option<Vec<u8>> {
        if range.is_empty() || range.len() > MAX_RANGE_BYTES || range.end > start_len(self.n) {
            return None;
        }
        let mut out = vec![0; range.len()];
        File::open(&self.path)
            .and_then(|f| f.read_exact_at(&mut out, range.start as u64))
            .ok()?;
        Some(out)
    }

    /// The whole state, read back.
    pub fn load(&self) -> anyhow::Result<WorkerState> {
        self.reader().load()
    }

    /// What reads the whole state back without holding this entry (so a caller can read it
    /// outside the lock that holds the entry); it fails once the entry is gone.
    pub fn reader(&self) -> StartReader {
        StartReader {
            round: self.round,
            n: self.n,
            path: self.path.clone(),
        }
    }
}

/// See [`StartFile::reader`].
#[derive(Clone, Debug)]
pub struct StartReader {
    round: u64,
    n: usize,
    path: PathBuf,
}

impl StartReader {
    pub fn load(&self) -> anyhow::Result<WorkerState> {
        let bytes = std::fs::read(&self.path)?;
        Ok(start_from_bytes(self.round, &bytes, self.n)?)
    }
}

impl Drop for StartFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_train::transfer::start_slice;

    #[test]
    fn a_start_file_serves_the_ranges_and_state_the_memory_did_and_goes_with_it() {
        let n = 1000;
        let mut state = WorkerState::new(n);
        state.opt.step = 7;
        for i in 0..n {
            state.opt.m[i] = i as f32 * 0.5;
            state.opt.v[i] = 1.0 / (i as f32 + 1.0);
            state.feedback.residual[i] = -(i as f32);
        }
        let dir = tempfile::tempdir().unwrap();
        let file = StartFile::write(dir.path(), 3, &state).unwrap();
        let total = start_len(n);
        for range in [0..total, 0..5, 5..13, 8..4008, 4005..8011, total - 3..total] {
            assert_eq!(
                file.slice(range.clone()),
                start_slice(&state, range.clone()),
                "{range:?}"
            );
        }
        assert_eq!(file.slice(0..0), None);
        assert_eq!(file.slice(total - 3..total + 1), None);
        let back = file.load().unwrap();
        assert_eq!(back.opt.step, 7);
        assert_eq!(back.opt.digest(), state.opt.digest());
        assert_eq!(back.residual_digest(), state.residual_digest());
        let path = dir.path().join("round-3.bin");
        assert!(path.exists());
        drop(file);
        assert!(!path.exists(), "the file goes with its entry");
    }
}
