//! A worker's round: H inner steps from the global weights on the examples the seed assigns to
//! it, the pseudo-gradient `global - local`, encoded (with error feedback if the run uses it),
//! committed and signed.
//!
//! [`compute_round`] is the deterministic core shared with the auditor
//! ([`crate::audit::reexecute`]): same start state, same payload bytes.

use crate::assign::{example_ids, ids_digest};
use crate::codec::{EncodeError, ErrorFeedback};
use crate::commit::{Commitment, Contribution, Signed};
use crate::config::RoundConfig;
use plexus_core::keys::NodeKey;
use plexus_core::Digest;
use plexus_model::train::params::digest_f32s;
use plexus_model::train::{AdamWState, Params, Shard, StepReport, TrainError, Trainer};
use plexus_model::ModelConfig;
use std::sync::Arc;

/// What a worker carries from round to round.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerState {
    pub opt: AdamWState,
    /// Error-feedback residual (all zeros when the run has no feedback).
    pub feedback: ErrorFeedback,
}

impl WorkerState {
    pub fn new(n: usize) -> Self {
        Self {
            opt: AdamWState::new(n),
            feedback: ErrorFeedback::new(n),
        }
    }

    /// Digest of the residual, as a commitment names it.
    pub fn residual_digest(&self) -> Digest {
        digest_f32s(RESIDUAL_TAG, &self.feedback.residual)
    }
}

const RESIDUAL_TAG: &[u8] = b"plexus-residual-v1";

/// The digests a commitment names for a fresh state of `n` parameters (optimizer state,
/// residual), computed without holding one.
pub fn fresh_digests(n: usize) -> (Digest, Digest) {
    (
        AdamWState::fresh_digest(n),
        plexus_model::train::params::digest_zero_f32s(RESIDUAL_TAG, n),
    )
}

/// Why a round could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error("inner loop failed")]
    Train(#[from] TrainError),
    #[error("cannot encode the pseudo-gradient")]
    Encode(#[from] EncodeError),
    #[error("worker state covers {state} parameters, the model has {params}")]
    StateSize { state: usize, params: usize },
}

/// The outcome of [`compute_round`].
pub struct RoundWork {
    pub commitment: Commitment,
    pub payload: Vec<u8>,
    pub reports: Vec<StepReport>,
}

/// Runs `worker`'s round `round` from `global`, updating `state`; returns the unsigned
/// commitment and the payload.
pub fn compute_round(
    cfg: &RoundConfig,
    model: &Arc<ModelConfig>,
    shard: &dyn Shard,
    worker: &[u8],
    round: u64,
    global: &Params,
    state: &mut WorkerState,
) -> Result<RoundWork, WorkError> {
    let n = global.values.len();
    if state.opt.len() != n || state.feedback.residual.len() != n {
        return Err(WorkError::StateSize {
            state: state.opt.len(),
            params: n,
        });
    }
    let ids = example_ids(cfg.seed, round, worker, cfg.examples_per_round());
    let first_step = round * u64::from(cfg.inner_steps);
    let start_optimizer = state.opt.digest();
    let start_residual = state.residual_digest();
    // The optimizer state moves into the trainer (a model-sized copy saved); a failed round
    // leaves the worker without one, which the size check above refuses from then on.
    let opt = std::mem::replace(&mut state.opt, AdamWState::new(0));
    let mut trainer = Trainer::from_weights(model.clone(), global, opt, cfg.inner)?;
    let reports = trainer.run(shard, &ids, cfg.batch_size as usize, first_step as usize)?;
    let (local, opt) = trainer.into_state()?;
    // The pseudo-gradient `global - local`, written over the local weights (one model-sized
    // buffer fewer at the round's peak).
    let mut delta = local.values;
    delta
        .iter_mut()
        .zip(&global.values)
        .for_each(|(d, g)| *d = g - *d);
    let payload = if cfg.error_feedback {
        state.feedback.compress(&cfg.codec, &delta)?.0
    } else {
        cfg.codec.encode(&delta)?
    };
    state.opt = opt;
    let (end_optimizer, end_residual) = (state.opt.digest(), state.residual_digest());
    let commitment = Commitment {
        run: cfg.run,
        round,
        worker: worker.to_vec(),
        start_weights: global.digest(),
        start_optimizer,
        start_residual,
        examples: ids_digest(&ids),
        seed: cfg.seed,
        first_step,
        inner_steps: cfg.inner_steps,
        batch_size: cfg.batch_size,
        hyper: cfg.hyper_digest(),
        payload: Digest::of(&payload),
        payload_len: payload.len() as u64,
        end_optimizer,
        end_residual,
        reveal: Digest([0; 32]),
    };
    Ok(RoundWork {
        commitment,
        payload,
        reports,
    })
}

impl RoundWork {
    /// The contribution `key` signs for this work, sealing its audit nonce for the round
    /// ([`crate::reveal`]), and the inner steps' reports.
    pub fn signed(mut self, key: &NodeKey) -> (Contribution, Vec<StepReport>) {
        let c = &mut self.commitment;
        c.reveal = crate::reveal::sealed(&crate::reveal::nonce(key, c.run, c.round));
        (
            Contribution {
                signed: Signed::sign(key, self.commitment),
                payload: self.payload.into(),
            },
            self.reports,
        )
    }
}

/// [`compute_round`] for `key`'s worker, signed.
pub fn work_round(
    cfg: &RoundConfig,
    model: &Arc<ModelConfig>,
    shard: &dyn Shard,
    key: &NodeKey,
    round: u64,
    global: &Params,
    state: &mut WorkerState,
) -> Result<(Contribution, Vec<StepReport>), WorkError> {
    let worker = key.peer_id().to_bytes();
    Ok(compute_round(cfg, model, shard, &worker, round, global, state)?.signed(key))
}
