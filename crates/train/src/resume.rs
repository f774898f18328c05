//! A worker's checkpoint between rounds: the global state it holds (round, weights, outer
//! momentum) and its own state (AdamW moments, error-feedback residual), so a restarted worker
//! resumes where it stopped instead of starting the run over.
//!
//! File: `"plexus-train-resume-v2\n"`, the run id (32 bytes), the round and the parameter
//! count `n` (u64 LE), then weights, outer momentum, the AdamW step (u64 LE), first and second
//! moments and the residual (`n` f32 LE each), then the sha256 of everything before it. It is
//! streamed both ways, so a large model's checkpoint never sits in memory as one more copy of
//! its state (five of them for a 135M model: 2.7 GB). Written to a temporary name, synced and
//! renamed into place: a crash mid-write leaves the previous checkpoint. A file that fails its
//! hash, names another run or does not fit the run's model is refused (the worker then starts
//! from its peers or from round 0).

use crate::codec::ErrorFeedback;
use crate::outer::OuterState;
use crate::round::GlobalState;
use crate::worker::WorkerState;
use plexus_core::{Digest, Sha256Stream};
use plexus_model::train::{AdamWState, Layout, Params};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;

const MAGIC: &[u8] = b"plexus-train-resume-v2\n";
/// Values converted per chunk when streaming.
const CHUNK: usize = 1 << 16;

/// Why a checkpoint was not usable.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a training checkpoint of this build or is damaged (hash mismatch)")]
    Damaged(std::path::PathBuf),
    #[error("{0} belongs to another run")]
    OtherRun(std::path::PathBuf),
    #[error("{0} does not fit this run's model")]
    WrongSize(std::path::PathBuf),
}

/// A writer that hashes what it writes.
struct Hashing<W> {
    inner: W,
    hash: Sha256Stream,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.inner.write_all(bytes)
    }

    fn put_f32s(&mut self, values: &[f32], buf: &mut Vec<u8>) -> std::io::Result<()> {
        for chunk in values.chunks(CHUNK) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
            self.put(buf)?;
        }
        Ok(())
    }
}

/// A reader that hashes what it reads.
struct Hashed<R> {
    inner: R,
    hash: Sha256Stream,
}

impl<R: Read> Hashed<R> {
    fn take(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(out)?;
        self.hash.update(out);
        Ok(())
    }

    fn u64(&mut self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn f32s(&mut self, n: usize, buf: &mut Vec<u8>) -> std::io::Result<Vec<f32>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let k = (n - out.len()).min(CHUNK);
            buf.resize(4 * k, 0);
            self.take(buf)?;
            out.extend(
                buf.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        Ok(out)
    }
}

/// Writes the checkpoint of `run` at `path` (atomically).
pub fn save(
    path: &Path,
    run: Digest,
    global: &GlobalState,
    worker: &WorkerState,
) -> Result<(), ResumeError> {
    let io = |source| ResumeError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = Hashing {
            inner: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256Stream::new(),
        };
        let mut buf = Vec::with_capacity(4 * CHUNK);
        w.put(MAGIC)?;
        w.put(run.as_bytes())?;
        w.put(&global.round.to_le_bytes())?;
        w.put(&(global.params.values.len() as u64).to_le_bytes())?;
        w.put_f32s(&global.params.values, &mut buf)?;
        w.put_f32s(&global.outer.momentum, &mut buf)?;
        w.put(&worker.opt.step.to_le_bytes())?;
        w.put_f32s(&worker.opt.m, &mut buf)?;
        w.put_f32s(&worker.opt.v, &mut buf)?;
        w.put_f32s(&worker.feedback.residual, &mut buf)?;
        let Hashing { mut inner, hash } = w;
        inner.write_all(hash.finish().as_bytes())?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Reads the checkpoint at `path` for `run` with the model `layout`; `Ok(None)` if there is
/// none.
pub fn load(
    path: &Path,
    run: Digest,
    layout: Arc<Layout>,
) -> Result<Option<(GlobalState, WorkerState)>, ResumeError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ResumeError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let damaged = || ResumeError::Damaged(path.to_owned());
    let wrong = || ResumeError::WrongSize(path.to_owned());
    let n = layout.len();
    let expected_len = (MAGIC.len() + 32 + 8 + 8 + 8 + 32 + 20 * n) as u64;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = Hashed {
        inner: BufReader::with_capacity(1 << 20, file),
        hash: Sha256Stream::new(),
    };
    let mut magic = vec![0u8; MAGIC.len()];
    if r.take(&mut magic).is_err() || magic != MAGIC {
        return Err(damaged());
    }
    let mut id = [0u8; 32];
    r.take(&mut id).map_err(|_| damaged())?;
    let round = r.u64().map_err(|_| damaged())?;
    let count = r.u64().map_err(|_| damaged())?;
    if Digest(id) != run {
        return Err(ResumeError::OtherRun(path.to_owned()));
    }
    if count != n as u64 {
        return Err(wrong());
    }
    if len != expected_len {
        return Err(damaged());
    }
    let mut buf = Vec::with_capacity(4 * CHUNK);
    let mut body = || -> std::io::Result<_> {
        let values = r.f32s(n, &mut buf)?;
        let momentum = r.f32s(n, &mut buf)?;
        let step = r.u64()?;
        let m = r.f32s(n, &mut buf)?;
        let v = r.f32s(n, &mut buf)?;
        let residual = r.f32s(n, &mut buf)?;
        Ok((values, momentum, AdamWState { step, m, v }, residual))
    };
    let (values, momentum, opt, residual) = body().map_err(|_| damaged())?;
    let mut digest = [0u8; 32];
    r.inner.read_exact(&mut digest).map_err(|_| damaged())?;
    if r.hash.finish().as_bytes() != &digest {
        return Err(damaged());
    }
    let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
    if ![&values, &momentum, &opt.m, &opt.v, &residual]
        .iter()
        .all(|v| finite(v))
        || opt.v.iter().any(|&x| x < 0.0)
    {
        return Err(damaged());
    }
    Ok(Some((
        GlobalState {
            round,
            params: Params { layout, values },
            outer: OuterState { momentum },
        },
        WorkerState {
            opt,
            feedback: ErrorFeedback { residual },
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::{prepare, TaskSetup};
    use plexus_model::train::task::Task;

    #[test]
    fn a_checkpoint_round_trips_and_damage_or_another_run_is_refused() {
        let setup = TaskSetup {
            task: Task::Reverse { len: 3 },
            hidden: 32,
            layers: 1,
            init_seed: 0,
            eval_examples: 1,
        };
        let (_, _, params) = prepare(&setup, 0).unwrap();
        let n = params.values.len();
        let layout = params.layout.clone();
        let mut global = GlobalState {
            round: 7,
            params,
            outer: OuterState::new(n),
        };
        global.outer.momentum[3] = 0.5;
        let mut worker = WorkerState::new(n);
        worker.opt.step = 21;
        worker.feedback.residual[1] = -0.25;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        let run = Digest::of(b"run");
        assert!(load(&path, run, layout.clone()).unwrap().is_none());
        save(&path, run, &global, &worker).unwrap();
        let (g, w) = load(&path, run, layout.clone()).unwrap().unwrap();
        assert_eq!(g, global);
        assert_eq!(w, worker);
        assert!(matches!(
            load(&path, Digest::of(b"other"), layout.clone()),
            Err(ResumeError::OtherRun(_))
        ));
        let fewer = Arc::new(
            plexus_model::train::Params::from_tensors(&Default::default())
                .unwrap()
                .layout
                .as_ref()
                .clone(),
        );
        assert!(matches!(
            load(&path, run, fewer),
            Err(ResumeError::WrongSize(_))
        ));
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            load(&path, run, layout),
            Err(ResumeError::Damaged(_))
        ));
    }
}
