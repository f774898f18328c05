//! This worker's start states of its last rounds, kept for its auditors on disk: a start state
//! is the optimizer's moments and the error-feedback residual (12 bytes a parameter: 1.6 GB
//! at 135M), and a worker of an audited run keeps two of them ([`super::shared::KEPT_STARTS`])
//! beside its own, which in memory put an audited worker's peak near twice an unaudited one's.
//! Each is an anonymous file in the data directory (`tempfile::tempfile_in`: unlinked from
//! the start, so the space returns when the entry is dropped, when a write fails half way or
//! when the process dies, however it dies, and two workers never see each other's), in the
//! transfer layout ([`start_len`]: step, then `m`, `v` and residual as little-endian f32): a
//! range an auditor asks is read from the file as it is sent ([`StartReader::answer_range`]:
//! 1 MiB, off the serve loop and the shared lock), and the whole is read back only to
//! re-execute this worker's own round ([`StartReader::load`]). Not synced: nothing reads
//! them after a restart.

use plexus_train::protocol::TrainResponse;
use plexus_train::transfer::{start_from_bytes, start_len, MAX_RANGE_BYTES};
use plexus_train::worker::WorkerState;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// One kept start state on disk; the space goes with the last of it and its readers.
#[derive(Debug)]
pub struct StartFile {
    pub round: u64,
    /// Parameters of the state.
    pub n: usize,
    file: Arc<File>,
}

impl StartFile {
    /// Writes `state` to an anonymous file in `dir` (created if missing).
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
        let mut out = BufWriter::with_capacity(1 << 20, tempfile::tempfile_in(dir)?);
        out.write_all(&state.opt.step.to_le_bytes())?;
        let mut buf = Vec::with_capacity(1 << 20);
        for values in [&state.opt.m, &state.opt.v, &state.feedback.residual] {
            for chunk in values.chunks(1 << 18) {
                buf.clear();
                buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
                out.write_all(&buf)?;
            }
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        Ok(Self {
            round,
            n,
            file: Arc::new(file),
        })
    }

    /// The whole state, read back.
    pub fn load(&self) -> anyhow::Result<WorkerState> {
        self.reader().load()
    }

    /// What reads the whole state back without holding this entry (so a caller can read it
    /// outside the lock that holds the entry; the file lasts until it is done).
    pub fn reader(&self) -> StartReader {
        StartReader {
            round: self.round,
            n: self.n,
            file: Arc::clone(&self.file),
        }
    }
}

/// See [`StartFile::reader`].
#[derive(Clone, Debug)]
pub struct StartReader {
    round: u64,
    n: usize,
    file: Arc<File>,
}

impl StartReader {
    /// Bytes `range` of the state ([`start_len`] in all), as
    /// [`plexus_train::transfer::start_slice`] gives them from memory; `Ok(None)` when the
    /// range is empty, longer than [`MAX_RANGE_BYTES`] or past the end.
    pub fn slice(&self, range: std::ops::Range<usize>) -> std::io::Result<Option<Vec<u8>>> {
        if range.is_empty() || range.len() > MAX_RANGE_BYTES || range.end > start_len(self.n) {
            return Ok(None);
        }
        let mut out = vec![0; range.len()];
        self.file.read_exact_at(&mut out, range.start as u64)?;
        Ok(Some(out))
    }

    /// The answer to a peer's ask for bytes `offset..offset + len` of this state.
    pub fn answer_range(&self, offset: u64, len: u32) -> TrainResponse {
        let (round, total) = (self.round, start_len(self.n));
        let end = offset.saturating_add(u64::from(len));
        let range = usize::try_from(offset).unwrap_or(usize::MAX)
            ..usize::try_from(end).unwrap_or(usize::MAX);
        match self.slice(range) {
            Ok(Some(bytes)) => TrainResponse::StartRange {
                round,
                offset,
                total: total as u64,
                bytes,
            },
            Ok(None) => TrainResponse::Refused(format!(
                "bytes {offset}..{end} of a start state of {total} (ranges of at most {MAX_RANGE_BYTES})"
            )),
            Err(e) => {
                tracing::warn!(round = round + 1, "the kept start state could not be read: {e}");
                TrainResponse::Refused(format!(
                    "its start state of round {} could not be read: {e}",
                    round + 1
                ))
            }
        }
    }

    pub fn load(&self) -> anyhow::Result<WorkerState> {
        let mut bytes = vec![0; start_len(self.n)];
        self.file.read_exact_at(&mut bytes, 0)?;
        Ok(start_from_bytes(self.round, &bytes, self.n)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_train::transfer::start_slice;

    #[test]
    fn a_start_file_serves_the_ranges_and_state_the_memory_did_and_leaves_nothing() {
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
                file.reader().slice(range.clone()).unwrap(),
                start_slice(&state, range.clone()),
                "{range:?}"
            );
        }
        assert_eq!(file.reader().slice(0..0).unwrap(), None);
        assert_eq!(file.reader().slice(total - 3..total + 1).unwrap(), None);
        let reader = file.reader();
        drop(file);
        // A reader taken before the entry went still reads the whole.
        let back = reader.load().unwrap();
        assert_eq!(back.opt.step, 7);
        assert_eq!(back.opt.digest(), state.opt.digest());
        assert_eq!(back.residual_digest(), state.residual_digest());
        // Nothing is ever named in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn ranges_are_answered_as_the_protocol_says() {
        let state = WorkerState::new(100);
        let dir = tempfile::tempdir().unwrap();
        let reader = StartFile::write(dir.path(), 4, &state).unwrap().reader();
        let total = start_len(100);
        match reader.answer_range(8, 400) {
            TrainResponse::StartRange {
                round,
                offset,
                total: t,
                bytes,
            } => {
                assert_eq!((round, offset, t), (4, 8, total as u64));
                assert_eq!(Some(bytes), start_slice(&state, 8..408));
            }
            other => panic!("{other:?}"),
        }
        for (offset, len) in [(total as u64 - 3, 4), (0, 0), (u64::MAX, 1)] {
            assert!(
                matches!(reader.answer_range(offset, len), TrainResponse::Refused(_)),
                "{offset} {len}"
            );
        }
    }

    #[test]
    fn a_malformed_state_is_refused_before_anything_is_written() {
        let mut state = WorkerState::new(10);
        state.feedback.residual.pop();
        let dir = tempfile::tempdir().unwrap();
        let e = StartFile::write(dir.path(), 0, &state).unwrap_err();
        assert!(e.to_string().contains("residual of 9"), "{e}");
    }
}
