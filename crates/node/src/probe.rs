//! Placement's check on the speed peers announce: a node's `decode_s_per_layer` is a claim
//! (a node claiming to be fast would be given most of the model's layers), so every node
//! placing itself times stage calls to the peers serving its model, announces what it
//! measured, and placement takes a node's claim only while the measurements of it agree.
//!
//! ```text
//! rebalance tick ─▶ Probes::due: a peer offering the model not probed for REPROBE_MS
//!   ─▶ probe_peer: Describe (the round trip) ─▶ PROBE_STEPS one-position Forward calls of a
//!      fresh session (decode-sized, greedy at the last stage) ─▶ Close
//!   ─▶ (fastest call − round trip) / layers ─▶ Probes::record (per model and peer)
//!      (a call not answered in CALL_TIMEOUT, or refused: stalled_speed, a timed-out call)
//! announce ─▶ Announcement::observed: this node's fresh measurements
//! rebalance ─▶ checked_speed(claim, what the other nodes announced of it) ─▶ plan
//! ```
//!
//! Every node plans from the same signed announcements (claims and observations alike), so
//! the checked speeds, and so the plans, agree from node to node. A measured call holds more
//! than the layers' compute: the peer's per-call work (decoding the call, batching, hashing
//! and signing the receipt) and its other sessions' load. So a claim stands while the
//! measured call time exceeds [`CLAIM_TOLERANCE`] times the claimed one by at most
//! [`CALL_ALLOWANCE`] (in the lower median over the observers); past that the lower median of
//! the measured speeds replaces it, per-call work included (an honest claim is not replaced
//! by every slower measurement, which would move layers at every probe; a caught one pays
//! for its calls' whole time). On this project's 2-vCPU test machine two honest one-thread
//! nodes on SmolLM2 measured each other at 0.51-0.56 ms a layer, against the 0.54-0.70 ms
//! they measured themselves at start. One lying observer among honest ones cannot make an honest node slow (the lower
//! median); observers colluding with a node, as many as the honest ones, can vouch for its
//! lie, and a lie small against the allowance goes through.

use plexus_core::announce::{limits::MAX_OBSERVATIONS, ModelOffer, Observation};
use plexus_core::sampling::SamplingParams;
use plexus_core::wire::{Activations, DType, ErrorCode, Forward, Request, Response, SessionId};
use plexus_core::Digest;
use plexus_net::{NetHandle, PeerId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Decode steps timed per probe (one fresh session, one position each).
pub const PROBE_STEPS: u32 = 4;
/// A peer is probed again after this long (ms).
pub const REPROBE_MS: u64 = 20_000;
/// Measurements older than this are no longer announced (ms).
pub const OBSERVATION_TTL_MS: u64 = 120_000;
/// Longest wait for one call of a probe.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much faster than its peers measured it a node may claim to compute...
pub const CLAIM_TOLERANCE: f64 = 2.0;
/// ... plus this much per call (its per-call work and load), before placement takes the
/// measurement instead.
pub const CALL_ALLOWANCE: Duration = Duration::from_millis(2);
/// Peers whose measurements are kept, per model (the oldest go first).
const MAX_KEPT: usize = 4 * MAX_OBSERVATIONS;
/// Probes under way at once (one hostile peer stalling its probes must not stop the others').
pub const MAX_IN_FLIGHT: usize = 4;

/// Why a probe measured nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The peer did not answer a call in time, or refused a well-formed one (busy, or an
    /// error of its own): it is taken as [`stalled_speed`], so a node cannot keep its claim
    /// by dodging the probes.
    Stalled(String),
    /// The peer is unreachable, or no longer serves the span probed (it moved): nothing is
    /// recorded; the directory and the next probe tell.
    Gone(String),
}

/// The speed recorded for a peer that stalled a probe of `layers` layers: a call that took
/// the whole [`CALL_TIMEOUT`].
pub fn stalled_speed(layers: u32) -> f64 {
    CALL_TIMEOUT.as_secs_f64() / f64::from(layers.max(1))
}

/// One peer's measured speed.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Measured {
    s_per_layer: f64,
    layers: u32,
    at_ms: u64,
}

/// What this node measured of its peers, and when it last tried each.
#[derive(Debug, Default)]
pub struct Probes {
    measured: HashMap<(Digest, PeerId), Measured>,
    tried: HashMap<(Digest, PeerId), u64>,
}

impl Probes {
    /// The peer among `candidates` to probe now, if any: one never tried first, then the one
    /// tried longest ago, once [`REPROBE_MS`] has passed since its last try.
    pub fn due(&self, model: Digest, candidates: &[PeerId], now_ms: u64) -> Option<PeerId> {
        candidates
            .iter()
            .map(|p| (self.tried.get(&(model, *p)).copied(), p))
            .filter(|(at, _)| at.is_none_or(|t| now_ms.saturating_sub(t) >= REPROBE_MS))
            .min_by_key(|(at, p)| (*at, p.to_bytes()))
            .map(|(_, p)| *p)
    }

    /// A probe of `peer` started at `now_ms`.
    pub fn tried(&mut self, model: Digest, peer: PeerId, now_ms: u64) {
        self.tried.insert((model, peer), now_ms);
        if self.tried.len() > MAX_KEPT {
            if let Some(old) = self.tried.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                self.tried.remove(&old);
            }
        }
    }

    /// `peer` measured at `s_per_layer` seconds per layer per decoded token over `layers`.
    pub fn record(
        &mut self,
        model: Digest,
        peer: PeerId,
        s_per_layer: f64,
        layers: u32,
        now_ms: u64,
    ) {
        if !(s_per_layer.is_finite() && s_per_layer > 0.0) || layers == 0 {
            return;
        }
        self.measured.insert(
            (model, peer),
            Measured {
                s_per_layer,
                layers,
                at_ms: now_ms,
            },
        );
        if self.measured.len() > MAX_KEPT {
            if let Some(old) = self
                .measured
                .iter()
                .min_by_key(|(_, m)| m.at_ms)
                .map(|(k, _)| *k)
            {
                self.measured.remove(&old);
            }
        }
    }

    /// The measurements of `model` to announce: those younger than [`OBSERVATION_TTL_MS`],
    /// newest first, at most [`MAX_OBSERVATIONS`], each within the announcement's limits.
    pub fn observations(&self, model: Digest, now_ms: u64) -> Vec<Observation> {
        let mut fresh: Vec<(&PeerId, &Measured)> = self
            .measured
            .iter()
            .filter(|((m, _), x)| {
                *m == model && now_ms.saturating_sub(x.at_ms) < OBSERVATION_TTL_MS
            })
            .map(|((_, p), x)| (p, x))
            .collect();
        fresh.sort_by_key(|(p, x)| (std::cmp::Reverse(x.at_ms), p.to_bytes()));
        let max = f64::from(plexus_core::announce::limits::MAX_SECONDS_PER_LAYER);
        fresh
            .into_iter()
            .take(MAX_OBSERVATIONS)
            .map(|(p, x)| Observation {
                peer: p.to_string(),
                model,
                decode_s_per_layer: x.s_per_layer.clamp(1e-12, max) as f32,
                layers: x.layers,
            })
            .collect()
    }
}

/// What each of `observers` (a node, and the measurements it announced) measured of the
/// others on `model`, by measured node: seconds per layer, over how many layers. One
/// measurement per observer and node; a node's word on itself is left out.
pub fn observed_speeds<'a>(
    observers: impl IntoIterator<Item = (PeerId, &'a [Observation])>,
    model: Digest,
) -> HashMap<PeerId, Vec<(f64, u32)>> {
    let mut by_node: HashMap<PeerId, Vec<(f64, u32)>> = HashMap::new();
    let mut counted = std::collections::HashSet::new();
    for (observer, list) in observers {
        for o in list.iter().filter(|o| o.model == model) {
            let Ok(node) = o.peer.parse::<PeerId>() else {
                continue;
            };
            if node != observer && counted.insert((observer, node)) {
                by_node
                    .entry(node)
                    .or_default()
                    .push((f64::from(o.decode_s_per_layer), o.layers));
            }
        }
    }
    by_node
}

/// The speed placement uses for a node claiming `claim` seconds per layer that its peers
/// measured at `observed` (seconds per layer, over how many layers): the claim, unless in the
/// lower median a measured call took more than [`CLAIM_TOLERANCE`] times the claimed compute
/// plus [`CALL_ALLOWANCE`]; then the lower median of the measured speeds.
pub fn checked_speed(claim: f64, mut observed: Vec<(f64, u32)>) -> f64 {
    observed.retain(|(s, l)| s.is_finite() && *s > 0.0 && *l > 0);
    if observed.is_empty() {
        return claim;
    }
    let lower_median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[(v.len() - 1) / 2]
    };
    let excess = lower_median(
        observed
            .iter()
            .map(|(s, l)| (s - CLAIM_TOLERANCE * claim) * f64::from(*l))
            .collect(),
    );
    if excess > CALL_ALLOWANCE.as_secs_f64() {
        lower_median(observed.iter().map(|(s, _)| *s).collect())
    } else {
        claim
    }
}

/// Seconds per layer from the probe's call times: the fastest call less the round trip (the
/// fastest is the least disturbed by the peer's other work), over `layers`.
pub fn per_layer(calls: &[Duration], rtt: Duration, layers: usize) -> Option<f64> {
    let fastest = calls.iter().min()?;
    let compute = fastest.saturating_sub(rtt).as_secs_f64();
    (layers > 0).then(|| (compute / layers as f64).max(1e-9))
}

/// Times `offer`'s stage at `peer`: see the module docs. The peer's seconds per layer per
/// decoded token, or why the probe failed.
pub async fn probe_peer(
    net: &NetHandle,
    peer: PeerId,
    offer: &ModelOffer,
    session: SessionId,
) -> Result<f64, ProbeFailure> {
    let call = |request: Request| async move {
        match tokio::time::timeout(CALL_TIMEOUT, net.call(peer, request)).await {
            Ok(Ok(Response::Error {
                code: ErrorCode::UnknownModel,
                message,
            })) => Err(ProbeFailure::Gone(message)),
            Ok(Ok(Response::Error { code, message })) => {
                Err(ProbeFailure::Stalled(format!("{code:?}: {message}")))
            }
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(ProbeFailure::Gone(e.to_string())),
            Err(_) => Err(ProbeFailure::Stalled(format!(
                "no answer in {CALL_TIMEOUT:?}"
            ))),
        }
    };
    let asked = Instant::now();
    call(Request::Describe).await?;
    let rtt = asked.elapsed();
    let hidden = offer.hidden as usize;
    let mut times = Vec::new();
    let mut failed = None;
    for position in 0..PROBE_STEPS {
        let values: Vec<f32> = (0..hidden)
            .map(|i| ((i + position as usize) % 17) as f32 / 16.0 - 0.5)
            .collect();
        let forward = Forward {
            session,
            model: offer.model,
            start: offer.start,
            end: offer.end,
            position,
            tokens: vec![1],
            hidden: (offer.start > 0).then(|| Activations::encode(&values, 1, hidden, DType::F16)),
            chunks: Vec::new(),
            sampling: (offer.end == offer.num_layers).then(|| Box::new(SamplingParams::greedy())),
            reply_dtype: DType::F16,
            all_rows: false,
            prompt_len: 0,
        };
        let started = Instant::now();
        match call(Request::Forward(forward)).await {
            Ok(_) => times.push(started.elapsed()),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let _ = call(Request::Close { session }).await;
    if let Some(why) = failed {
        return Err(why);
    }
    // The first call opens the session: the decode steps after it are what is timed.
    per_layer(
        times.get(1..).unwrap_or_default(),
        rtt,
        (offer.end - offer.start) as usize,
    )
    .ok_or_else(|| ProbeFailure::Gone("nothing timed".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::announce::Announcement;
    use plexus_core::keys::NodeKey;

    fn peer() -> PeerId {
        NodeKey::generate().peer_id()
    }

    fn announcing(observed: Vec<Observation>) -> Announcement {
        Announcement {
            observed,
            ..crate::directory::tests::bare(&NodeKey::generate(), 0)
        }
    }

    fn seen(of: PeerId, model: Digest, s: f32) -> Observation {
        Observation {
            peer: of.to_string(),
            model,
            decode_s_per_layer: s,
            layers: 10,
        }
    }

    #[test]
    fn a_claim_stands_until_measured_calls_exceed_twice_it_by_more_than_the_allowance() {
        let ten = |s: f64| (s, 10);
        assert_eq!(checked_speed(1e-4, vec![]), 1e-4);
        // 10 layers claimed at 0.1 ms: 1 ms, doubled, plus 2 ms per call.
        assert_eq!(checked_speed(1e-4, vec![ten(3.9e-4)]), 1e-4);
        assert_eq!(checked_speed(1e-4, vec![ten(4.1e-4)]), 4.1e-4);
        assert_eq!(checked_speed(1e-7, vec![ten(8e-4)]), 8e-4);
        // Over 20 layers the same per-layer measurement is 3.8 ms over: a lie.
        assert_eq!(checked_speed(1e-4, vec![(3.9e-4, 20)]), 3.9e-4);
        // The lower median: one slow-saying observer among honest ones changes nothing...
        assert_eq!(
            checked_speed(1e-4, vec![ten(1e-4), ten(5.0), ten(1.2e-4)]),
            1e-4
        );
        // ... nor does one vouching for a liar when two honest observers measured it.
        assert_eq!(
            checked_speed(1e-7, vec![ten(1e-7), ten(8e-4), ten(9e-4)]),
            8e-4
        );
        // A peer that stalls its probes is not spared by them.
        assert_eq!(
            checked_speed(1e-7, vec![(stalled_speed(15), 15)]),
            stalled_speed(15)
        );
        assert!(
            stalled_speed(1) <= f64::from(plexus_core::announce::limits::MAX_SECONDS_PER_LAYER)
        );
        // Nonsense measurements are not measurements.
        assert_eq!(
            checked_speed(1e-4, vec![ten(f64::NAN), ten(-1.0), ten(0.0), (1.0, 0)]),
            1e-4
        );
    }

    proptest::proptest! {
        /// A caught claim is replaced by something slower, never by something faster.
        #[test]
        fn the_checked_speed_is_never_faster_than_the_claim(
            claim in 1e-7f64..1e-2,
            observed in proptest::collection::vec((1e-7f64..1.0, 1u32..64), 0..9),
        ) {
            proptest::prop_assert!(checked_speed(claim, observed) >= claim);
        }

        /// Observers fewer than the honest ones (who agree on one measurement) change nothing,
        /// whatever they announce.
        #[test]
        fn a_minority_of_observers_cannot_move_the_checked_speed(
            claim in 1e-7f64..1e-2,
            honest in (1e-7f64..1.0, 1u32..64),
            n_honest in 1usize..6,
            liars in proptest::collection::vec((1e-9f64..60.0, 1u32..4096), 0..6),
        ) {
            let liars = &liars[..liars.len().min(n_honest - 1)];
            let alone = checked_speed(claim, vec![honest; n_honest]);
            let mut all = vec![honest; n_honest];
            all.extend_from_slice(liars);
            proptest::prop_assert_eq!(checked_speed(claim, all), alone);
        }
    }

    #[test]
    fn only_other_nodes_measurements_of_the_node_on_the_model_count() {
        let (model, other_model) = (Digest::of(b"m"), Digest::of(b"n"));
        let (liar, a, b) = (peer(), peer(), peer());
        let by_a = announcing(vec![seen(liar, model, 2e-4), seen(b, model, 1e-4)]);
        let by_b = announcing(vec![seen(liar, other_model, 9.0), seen(a, model, 3e-4)]);
        let by_liar = announcing(vec![seen(liar, model, 1e-9)]);
        let all = [(a, &by_a), (b, &by_b), (liar, &by_liar), (a, &by_a)]
            .map(|(p, ann)| (p, ann.observed.as_slice()));
        let measured = observed_speeds(all, model);
        assert_eq!(measured[&liar], vec![(2e-4_f32 as f64, 10)]);
        assert_eq!(measured[&a], vec![(3e-4_f32 as f64, 10)]);
    }

    #[test]
    fn peers_are_probed_never_tried_first_then_oldest_and_not_too_often() {
        let model = Digest::of(b"m");
        let (a, b) = (peer(), peer());
        let mut probes = Probes::default();
        let first = probes.due(model, &[a, b], 0).unwrap();
        probes.tried(model, first, 0);
        let second = probes.due(model, &[a, b], 10).unwrap();
        assert_ne!(first, second);
        probes.tried(model, second, 10);
        assert_eq!(probes.due(model, &[a, b], REPROBE_MS - 1), None);
        assert_eq!(probes.due(model, &[a, b], REPROBE_MS), Some(first));
        // Another model's tries are its own.
        assert!(probes.due(Digest::of(b"n"), &[a], 10).is_some());
    }

    #[test]
    fn measurements_are_announced_while_fresh_and_bounded() {
        let model = Digest::of(b"m");
        let mut probes = Probes::default();
        let a = peer();
        probes.record(model, a, 2e-4, 15, 1_000);
        probes.record(model, peer(), f64::NAN, 15, 1_000);
        probes.record(model, peer(), 1e-4, 0, 1_000);
        let seen = probes.observations(model, 1_000);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].peer, a.to_string());
        assert_eq!((seen[0].decode_s_per_layer, seen[0].layers), (2e-4, 15));
        assert!(probes.observations(Digest::of(b"n"), 1_000).is_empty());
        assert!(probes
            .observations(model, 1_000 + OBSERVATION_TTL_MS)
            .is_empty());
        for i in 0..(3 * MAX_OBSERVATIONS) as u64 {
            probes.record(model, peer(), 1e-4, 1, 2_000 + i);
        }
        let seen = probes.observations(model, 2_000 + 3 * MAX_OBSERVATIONS as u64);
        assert_eq!(seen.len(), MAX_OBSERVATIONS);
        assert!(probes.measured.len() <= MAX_KEPT);
    }

    #[test]
    fn a_probe_times_the_fastest_call_less_the_round_trip() {
        let ms = Duration::from_millis;
        assert_eq!(per_layer(&[ms(9), ms(7), ms(8)], ms(1), 3), Some(0.002));
        assert_eq!(per_layer(&[], ms(1), 3), None);
        assert_eq!(per_layer(&[ms(1)], ms(5), 3), Some(1e-9));
    }
}
