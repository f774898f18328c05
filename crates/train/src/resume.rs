//! A worker's checkpoint between rounds: the global state it holds (round, weights, outer
//! momentum) and its own state (AdamW moments, error-feedback residual), so a restarted worker
//! resumes where it stopped instead of starting the run over.
//!
//! File: `"plexus-train-resume-v1\n"`, the postcard body, then the sha256 of everything before
//! it. Written to a temporary name, synced and renamed into place: a crash mid-write leaves
//! the previous checkpoint. A file that fails its hash, names another run or does not fit the
//! run's model is refused (the worker then starts from its peers or from round 0).

use crate::outer::OuterState;
use crate::protocol::{f32_bytes, f32s_from, WorkerStateTransfer};
use crate::round::GlobalState;
use crate::worker::WorkerState;
use plexus_core::Digest;
use plexus_model::train::{Layout, Params};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

const MAGIC: &[u8] = b"plexus-train-resume-v1\n";

#[derive(Serialize, Deserialize)]
struct Body {
    run: Digest,
    round: u64,
    params: Vec<u8>,
    momentum: Vec<u8>,
    opt: Vec<u8>,
    residual: Vec<u8>,
}

/// Why a checkpoint was not usable.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a training checkpoint or is damaged (hash mismatch)")]
    Damaged(std::path::PathBuf),
    #[error("{0} belongs to another run")]
    OtherRun(std::path::PathBuf),
    #[error("{0} does not fit this run's model")]
    WrongSize(std::path::PathBuf),
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
    // The worker's own state is encoded as it travels to an auditor.
    let WorkerStateTransfer { opt, residual, .. } = WorkerStateTransfer::of(global.round, worker);
    let body = Body {
        run,
        round: global.round,
        params: f32_bytes(&global.params.values),
        momentum: f32_bytes(&global.outer.momentum),
        opt,
        residual,
    };
    let mut bytes = MAGIC.to_vec();
    bytes.extend(postcard::to_allocvec(&body).unwrap_or_default());
    let digest = Digest::of(&bytes);
    bytes.extend_from_slice(digest.as_bytes());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
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
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ResumeError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let damaged = || ResumeError::Damaged(path.to_owned());
    if bytes.len() < MAGIC.len() + 32 || !bytes.starts_with(MAGIC) {
        return Err(damaged());
    }
    let (content, digest) = bytes.split_at(bytes.len() - 32);
    if Digest::of(content).as_bytes() != digest {
        return Err(damaged());
    }
    let body: Body = postcard::from_bytes(&content[MAGIC.len()..]).map_err(|_| damaged())?;
    if body.run != run {
        return Err(ResumeError::OtherRun(path.to_owned()));
    }
    let n = layout.len();
    let wrong = || ResumeError::WrongSize(path.to_owned());
    let values = f32s_from(&body.params, n).ok_or_else(wrong)?;
    let momentum = f32s_from(&body.momentum, n).ok_or_else(wrong)?;
    let worker = WorkerStateTransfer {
        round: body.round,
        opt: body.opt,
        residual: body.residual,
    }
    .into_state(n)
    .map_err(|_| wrong())?;
    Ok(Some((
        GlobalState {
            round: body.round,
            params: Params { layout, values },
            outer: OuterState { momentum },
        },
        worker,
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
