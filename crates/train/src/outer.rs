//! The outer optimizer: the step the round applies to the global weights with the mean
//! pseudo-gradient (global minus local weights) of the accepted contributions.
//!
//! Nesterov as in PyTorch's SGD (DiLoCo's choice, lr 0.7, momentum 0.9):
//! `b = mu b + g; theta -= lr (g + mu b)`. Plain SGD with `lr = 1` makes the round the plain
//! average of the workers' models.

use serde::{Deserialize, Serialize};

/// Outer optimizer settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum OuterConfig {
    Nesterov { lr: f32, momentum: f32 },
    Sgd { lr: f32 },
}

impl Default for OuterConfig {
    fn default() -> Self {
        OuterConfig::Nesterov {
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

/// Momentum buffer of the outer optimizer (part of the global state a joiner fetches).
#[derive(Clone, Debug, PartialEq)]
pub struct OuterState {
    pub momentum: Vec<f32>,
}

impl OuterState {
    pub fn new(n: usize) -> Self {
        Self {
            momentum: vec![0.0; n],
        }
    }

    /// Applies the outer step for mean pseudo-gradient `g` to `theta`.
    pub fn step(&mut self, cfg: &OuterConfig, theta: &mut [f32], g: &[f32]) {
        match *cfg {
            OuterConfig::Nesterov { lr, momentum } => {
                for ((t, b), &g) in theta.iter_mut().zip(&mut self.momentum).zip(g) {
                    *b = momentum * *b + g;
                    *t -= lr * (g + momentum * *b);
                }
            }
            OuterConfig::Sgd { lr } => {
                for (t, &g) in theta.iter_mut().zip(g) {
                    *t -= lr * g;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesterov_matches_pytorch_by_hand() {
        let mut s = OuterState::new(1);
        let mut t = vec![1.0f32];
        let cfg = OuterConfig::default();
        s.step(&cfg, &mut t, &[0.1]);
        // b = 0.1, step = 0.7 * (0.1 + 0.09) = 0.133
        assert!((t[0] - 0.867).abs() < 1e-6, "{t:?}");
        s.step(&cfg, &mut t, &[0.1]);
        // b = 0.19, step = 0.7 * (0.1 + 0.171) = 0.1897
        assert!((t[0] - 0.6773).abs() < 1e-5, "{t:?}");
        let mut t = vec![1.0f32];
        OuterState::new(1).step(&OuterConfig::Sgd { lr: 1.0 }, &mut t, &[0.25]);
        assert_eq!(t, vec![0.75]);
    }
}
