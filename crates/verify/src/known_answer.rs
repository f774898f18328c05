//! Planted known-answer audits: catching the lazy auditor.
//!
//! An auditor is paid to recompute; one that returns without computing (a made-up or stale
//! fingerprint, or a blind "match") would make audits worthless. The gateway therefore sends
//! some audit requests whose answer it already knows: a job it has seen settled by a
//! referee majority, or one it computed itself. They look like any other audit call (same
//! message, a real job, replayed inputs). An auditor whose answer to a planted audit does not
//! match the known answer is slashed like a cheating provider, since it claimed work it did
//! not do.
//!
//! Which audits are planted is a keyed draw ([`crate::draw::DrawKey::uniform_for`]) over the
//! audit's id, at rate `q`: the auditor cannot tell them apart.

use crate::compare::{compare, Mode};
use crate::draw::DrawKey;
use crate::fingerprint::Fingerprint;

const LABEL: &[u8] = b"plexus/plant/v1";

/// Whether the audit `audit_id` is served from the pool of known answers, at rate `q`.
pub fn plants(key: &DrawKey, audit_id: &[u8; 32], q: f64) -> bool {
    key.uniform_for(LABEL, audit_id) < q
}

/// The outcome of a planted audit.
#[derive(Clone, Debug, PartialEq)]
pub enum PlantedOutcome {
    /// The auditor's answer matched the known one.
    Honest,
    /// It did not: the auditor did not do the work it claims.
    Lazy { reason: String },
}

/// Checks an auditor's answer to a planted audit.
pub fn check_planted(known: &Fingerprint, returned: &Fingerprint, mode: Mode) -> PlantedOutcome {
    let c = compare(returned, known, mode);
    if c.passes() {
        PlantedOutcome::Honest
    } else {
        PlantedOutcome::Lazy {
            reason: format!("{c:?}"),
        }
    }
}

/// Probability a lazy auditor that skips a share `s` of its audits survives `n` audits at
/// planting rate `q` (each skipped planted audit catches it).
pub fn lazy_survival(n: u64, q: f64, s: f64) -> f64 {
    (1.0 - q * s).powf(n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Tolerance;
    use crate::fingerprint::{fingerprint, Scheme};

    #[test]
    fn planting_rate_and_check() {
        let key = DrawKey::new([3; 32]);
        let planted = (0..10_000u32)
            .filter(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_le_bytes());
                plants(&key, &id, 0.1)
            })
            .count();
        assert!((900..1100).contains(&planted), "{planted}");
        let rows: Vec<f32> = (0..64 * 8).map(|i| (i as f32).cos()).collect();
        let known = fingerprint(Scheme::DEFAULT, 8, 0, &rows).unwrap();
        assert_eq!(
            check_planted(&known, &known, Mode::Exact),
            PlantedOutcome::Honest
        );
        let lazy = fingerprint(Scheme::DEFAULT, 8, 0, &vec![0.5; 64 * 8]).unwrap();
        assert!(matches!(
            check_planted(&known, &lazy, Mode::Within(Tolerance::PUBLISHED)),
            PlantedOutcome::Lazy { .. }
        ));
        assert!(lazy_survival(100, 0.1, 1.0) < 3e-5);
    }
}
