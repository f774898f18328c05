//! AdamW over flat f32 vectors, with its state in the open so a round can be re-executed from a
//! commitment: `(step, m, v)` serialise to bytes and hash.
//!
//! Same update as PyTorch's and candle's AdamW (decoupled weight decay, bias-corrected moments):
//! `theta *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//! theta -= lr * m_hat / (sqrt(v_hat) + eps)`. The loop is sequential scalar code, so the result
//! does not depend on the thread count.

use plexus_core::{Digest, Sha256Stream};
use serde::{Deserialize, Serialize};

/// AdamW hyperparameters (the learning rate is passed per step by the schedule).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The moments and step count of an AdamW run.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    /// Steps taken so far.
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// Why optimizer state bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeStateError {
    #[error("optimizer state is {got} bytes, expected {expected} for {params} parameters")]
    Length {
        got: usize,
        expected: usize,
        params: usize,
    },
    #[error("optimizer state holds a non-finite moment")]
    NonFinite,
}

const TAG: &[u8] = b"plexus-adamw-v1";

impl AdamWState {
    /// Fresh state for `n` parameters.
    pub fn new(n: usize) -> Self {
        Self {
            step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    pub fn len(&self) -> usize {
        self.m.len()
    }

    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    /// `step` (u64 LE), then `m`, then `v` as f32 LE.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * self.m.len());
        out.extend_from_slice(&self.step.to_le_bytes());
        for x in self.m.iter().chain(&self.v) {
            out.extend_from_slice(&x.to_le_bytes());
        }
        out
    }

    /// Parses [`Self::to_bytes`] for `n` parameters.
    pub fn from_bytes(bytes: &[u8], n: usize) -> Result<Self, DecodeStateError> {
        let expected = 8 + 8 * n;
        if bytes.len() != expected {
            return Err(DecodeStateError::Length {
                got: bytes.len(),
                expected,
                params: n,
            });
        }
        let mut step = [0u8; 8];
        step.copy_from_slice(&bytes[..8]);
        let floats: Vec<f32> = bytes[8..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if floats.iter().any(|x| !x.is_finite()) || floats[n..].iter().any(|&v| v < 0.0) {
            return Err(DecodeStateError::NonFinite);
        }
        Ok(Self {
            step: u64::from_le_bytes(step),
            m: floats[..n].to_vec(),
            v: floats[n..].to_vec(),
        })
    }

    pub fn digest(&self) -> Digest {
        let mut h = Sha256Stream::new();
        h.update(TAG);
        // The bytes of `to_bytes`, streamed (a large model's state is gigabytes).
        h.update(&self.step.to_le_bytes());
        super::params::hash_f32s(&mut h, &self.m);
        super::params::hash_f32s(&mut h, &self.v);
        h.finish()
    }

    /// [`Self::digest`] of [`Self::new`]`(n)`, without holding it (gigabytes for a large
    /// model).
    pub fn fresh_digest(n: usize) -> Digest {
        let mut h = Sha256Stream::new();
        h.update(TAG);
        h.update(&0u64.to_le_bytes());
        super::params::hash_zero_f32s(&mut h, n);
        super::params::hash_zero_f32s(&mut h, n);
        h.finish()
    }

    /// One AdamW step at learning rate `lr`.
    pub fn step(&mut self, cfg: &AdamWConfig, params: &mut [f32], grads: &[f32], lr: f64) {
        debug_assert_eq!(params.len(), self.m.len());
        let k = self.begin_step(cfg, lr);
        self.apply(&k, 0, params, grads);
    }

    /// Counts one step and gives its coefficients, for [`Self::apply`] to update the weights
    /// slice by slice (a trainer steps one tensor at a time, so no flat copy of the weights
    /// is needed). The same arithmetic as [`Self::step`], bit for bit.
    pub fn begin_step(&mut self, cfg: &AdamWConfig, lr: f64) -> StepCoefficients {
        self.step += 1;
        let t = self.step as i32;
        StepCoefficients {
            b1: cfg.beta1 as f32,
            b2: cfg.beta2 as f32,
            c1: (1.0 - cfg.beta1.powi(t)) as f32,
            c2: (1.0 - cfg.beta2.powi(t)) as f32,
            decay: (1.0 - lr * cfg.weight_decay) as f32,
            lr: lr as f32,
            eps: cfg.eps as f32,
        }
    }

    /// Applies the step `k` to `params`, the weights at `offset..offset + params.len()` of
    /// the flat vector the moments cover, with their gradients `grads`.
    ///
    /// # Panics
    /// If the slice runs past the moments or `grads` is shorter than `params`.
    pub fn apply(
        &mut self,
        k: &StepCoefficients,
        offset: usize,
        params: &mut [f32],
        grads: &[f32],
    ) {
        let end = offset + params.len();
        assert!(end <= self.m.len() && grads.len() >= params.len());
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m[offset..end].iter_mut())
            .zip(self.v[offset..end].iter_mut())
        {
            *m = k.b1 * *m + (1.0 - k.b1) * g;
            *v = k.b2 * *v + (1.0 - k.b2) * g * g;
            let m_hat = *m / k.c1;
            let v_hat = *v / k.c2;
            *p = *p * k.decay - k.lr * m_hat / (v_hat.sqrt() + k.eps);
        }
    }
}

/// One step's constants ([`AdamWState::begin_step`]).
#[derive(Clone, Copy, Debug)]
pub struct StepCoefficients {
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    decay: f32,
    lr: f32,
    eps: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_states_digest_is_known_without_holding_it() {
        for n in [0, 1, 4095, 4096, 4097, 10_000] {
            assert_eq!(
                AdamWState::fresh_digest(n),
                AdamWState::new(n).digest(),
                "{n}"
            );
        }
        let mut moved = AdamWState::new(3);
        moved.step = 1;
        assert_ne!(AdamWState::fresh_digest(3), moved.digest());
    }

    #[test]
    fn state_round_trips_and_refuses_bad_bytes() {
        let mut s = AdamWState::new(3);
        let mut p = vec![1.0f32, -2.0, 0.5];
        s.step(&AdamWConfig::default(), &mut p, &[0.1, -0.2, 0.3], 1e-2);
        let b = s.to_bytes();
        assert_eq!(AdamWState::from_bytes(&b, 3).unwrap(), s);
        assert!(matches!(
            AdamWState::from_bytes(&b, 4),
            Err(DecodeStateError::Length { .. })
        ));
        let mut bad = b.clone();
        bad[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            AdamWState::from_bytes(&bad, 3),
            Err(DecodeStateError::NonFinite)
        );
    }

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // Bias correction makes the first step `lr * sign(g)` (plus decay).
        let mut s = AdamWState::new(2);
        let mut p = vec![0.0f32, 0.0];
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        s.step(&cfg, &mut p, &[3.0, -0.01], 0.1);
        assert!((p[0] + 0.1).abs() < 1e-5, "{p:?}");
        assert!((p[1] - 0.1).abs() < 1e-4, "{p:?}");
    }
}
