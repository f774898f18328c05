//! Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
//! as 1, 2, 3", SC'11), the generator behind JAX's and cuRAND's counter mode.
//!
//! A draw is `philox(key = seed, counter = (stream, position, index))`: there is no state to
//! advance, so the draw for token position 1000 costs the same as for position 0 and any verifier
//! recomputes it from the same three numbers.

/// Domain separation of the draws one seed feeds (the `stream` word of the counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Stream {
    /// The sampler's draw for one token position.
    Sampling = 1,
    /// Weight initialisation of a freshly created model.
    Init = 2,
    /// Data order and example generation in training.
    Data = 3,
    /// Audit draws.
    Audit = 4,
}

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The Philox4x32 block function with 10 rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = u64::from(M0) * u64::from(c[0]);
        let p1 = u64::from(M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// 128 random bits for `(seed, stream, position, index)`.
pub fn bits(seed: u64, stream: Stream, position: u64, index: u32) -> [u32; 4] {
    philox4x32_10(
        [
            position as u32,
            (position >> 32) as u32,
            index,
            stream as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// A uniform double in `[0, 1)` with 53 random bits, for `(seed, stream, position, index)`.
pub fn uniform(seed: u64, stream: Stream, position: u64, index: u32) -> f64 {
    let b = bits(seed, stream, position, index);
    let x = (u64::from(b[0]) << 32 | u64::from(b[1])) >> 11;
    x as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A deterministic sequence of uniforms from one `(seed, stream, position)`, for code that needs
/// many draws at one position (weight initialisation, shuffles). Still counter-based: the i-th
/// value is `uniform(seed, stream, position, i)`.
#[derive(Clone, Debug)]
pub struct CounterRng {
    seed: u64,
    stream: Stream,
    position: u64,
    index: u32,
}

impl CounterRng {
    pub fn new(seed: u64, stream: Stream, position: u64) -> Self {
        Self {
            seed,
            stream,
            position,
            index: 0,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let b = bits(self.seed, self.stream, self.position, self.index);
        self.index = self.index.wrapping_add(1);
        if self.index == 0 {
            self.position = self.position.wrapping_add(1 << 32);
        }
        u64::from(b[0]) << 32 | u64::from(b[1])
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `[0, n)` (Lemire's multiply-shift; bias below 2^-32 for n < 2^32).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Standard normal (Box-Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Known-answer tests from the Random123 distribution (kat_vectors, philox4x32 10 rounds).
    #[test]
    fn random123_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn streams_are_separated() {
        assert_ne!(
            uniform(7, Stream::Sampling, 3, 0),
            uniform(7, Stream::Init, 3, 0)
        );
    }

    proptest! {
        #[test]
        fn uniform_in_unit_interval(seed: u64, pos: u64, idx: u32) {
            let u = uniform(seed, Stream::Sampling, pos, idx);
            prop_assert!((0.0..1.0).contains(&u));
            prop_assert_eq!(u, uniform(seed, Stream::Sampling, pos, idx));
        }

        #[test]
        fn below_is_in_range(seed: u64, n in 1u64..1_000_000) {
            let mut r = CounterRng::new(seed, Stream::Data, 0);
            for _ in 0..16 {
                prop_assert!(r.below(n) < n);
            }
        }
    }

    #[test]
    fn uniform_mean_is_about_half() {
        let n = 20_000;
        let mean: f64 = (0..n)
            .map(|i| uniform(42, Stream::Sampling, i, 0))
            .sum::<f64>()
            / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    }
}
