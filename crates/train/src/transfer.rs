//! Fetching a global state in byte ranges from several peers at once, so a state of any size
//! travels in messages under the frame limit and a joiner does not depend on one peer's link.
//!
//! The state's bytes are [`state_bytes`]: the round (u64 little-endian), then the weights and
//! the outer momentum as f32 little-endian values in the run's layout: `8 + 8 n` bytes for
//! `n` parameters, a length the asker knows from its own layout before it asks. The asker names
//! the state by its digest (the one the peers' statuses agree on,
//! [`crate::protocol::choose_target`]) and asks each holder for some of the ranges
//! ([`StateFetch`]); a holder answers only for that digest. A range that does not come back
//! (timeout, refusal, wrong length) is asked of the next holder; the assembled bytes are checked
//! against the digest as a whole ([`state_from_bytes`] and then [`GlobalState::digest`]), since
//! one range cannot be: a caller whose assembly fails the check fetches again from one holder at
//! a time, among those that delivered every range they were asked for, so a holder that sends
//! wrong bytes costs a joiner one more download, and one that does not answer is not asked
//! again.

use crate::outer::OuterState;
use crate::protocol::{f32_bytes, f32s_from, MessageError, WorkerStateTransfer};
use crate::round::GlobalState;
use crate::worker::WorkerState;
use plexus_model::train::{Layout, Params};
use std::ops::Range;
use std::sync::Arc;

/// Largest range asked in one message: well under the stage frame limit, and small enough to
/// cross a slow home uplink (1 Mbit/s: 8.4 s) inside one call's timeout.
pub const MAX_RANGE_BYTES: usize = 1 << 20;
/// Ranges asked of one holder at a time: a holder serves a joiner without running into the
/// transport's limit of concurrent streams per connection, and a hostile holder can answer at
/// most this many asks with oversized messages at once.
pub const IN_FLIGHT_PER_HOLDER: usize = 2;

/// Bytes of a state of `n` parameters.
pub fn state_len(n: usize) -> usize {
    8 + 8 * n
}

/// The bytes a state travels as (module docs).
pub fn state_bytes(state: &GlobalState) -> Vec<u8> {
    let mut out = Vec::with_capacity(state_len(state.params.values.len()));
    out.extend_from_slice(&state.round.to_le_bytes());
    out.extend(f32_bytes(&state.params.values));
    out.extend(f32_bytes(&state.outer.momentum));
    out
}

/// The state `bytes` hold in the run's `layout` (size and finiteness checked; the caller
/// checks the digest).
pub fn state_from_bytes(bytes: &[u8], layout: Arc<Layout>) -> Result<GlobalState, MessageError> {
    let n = layout.len();
    let round = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .unwrap_or_default();
    if bytes.len() != state_len(n) {
        return Err(MessageError::StateSize {
            round,
            got: bytes.len().saturating_sub(8),
            expected: 8 * n,
        });
    }
    let (params, momentum) = bytes[8..].split_at(4 * n);
    let values = f32s_from(params, n).ok_or(MessageError::NonFinite)?;
    let momentum = f32s_from(momentum, n).ok_or(MessageError::NonFinite)?;
    Ok(GlobalState {
        round,
        params: Params { layout, values },
        outer: OuterState { momentum },
    })
}

/// Bytes of a worker's start state of `n` parameters, as an auditor fetches it in ranges from
/// the worker it audits: the AdamW step (u64 little-endian), its first and second moments and
/// the error-feedback residual (f32 little-endian): [`WorkerStateTransfer`]'s `opt` then
/// `residual`, `8 + 12 n` bytes.
pub fn start_len(n: usize) -> usize {
    8 + 12 * n
}

/// Bytes `range` of `state`'s start-state bytes ([`start_len`]), read from its vectors without
/// building the whole (a served range costs its own size, not the state's); `None` when the
/// range is empty, longer than [`MAX_RANGE_BYTES`] or past the end.
pub fn start_slice(state: &WorkerState, range: Range<usize>) -> Option<Vec<u8>> {
    let n = state.opt.m.len();
    if range.is_empty() || range.len() > MAX_RANGE_BYTES || range.end > start_len(n) {
        return None;
    }
    let mut out = Vec::with_capacity(range.len());
    let step = state.opt.step.to_le_bytes();
    let lo = range.start.min(8);
    let hi = range.end.min(8);
    out.extend_from_slice(&step[lo..hi]);
    let sections = [&state.opt.m, &state.opt.v, &state.feedback.residual];
    for (k, values) in sections.into_iter().enumerate() {
        let base = 8 + 4 * n * k;
        let lo = range.start.max(base);
        let hi = range.end.min(base + 4 * values.len());
        if lo >= hi {
            continue;
        }
        let (first, last) = ((lo - base) / 4, (hi - base).div_ceil(4));
        let bytes: Vec<u8> = values[first..last]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let skip = lo - base - 4 * first;
        out.extend_from_slice(&bytes[skip..skip + (hi - lo)]);
    }
    Some(out)
}

/// The start state of `round` that `bytes` ([`start_len`]) hold for `n` parameters (sizes and
/// finiteness checked; the auditor checks the commitment's digests).
pub fn start_from_bytes(round: u64, bytes: &[u8], n: usize) -> Result<WorkerState, MessageError> {
    if bytes.len() != start_len(n) {
        return Err(MessageError::StateSize {
            round,
            got: bytes.len(),
            expected: start_len(n),
        });
    }
    // Read from the slices (a large model's start state is gigabytes: no copies of them).
    let (opt, residual) = bytes.split_at(8 + 8 * n);
    WorkerStateTransfer::decode(round, opt, residual, n)
}

/// `total` bytes cut into ranges for `holders` peers: at least one range per holder (when
/// there are that many bytes), none longer than [`MAX_RANGE_BYTES`], lengths within one byte
/// of each other, in order and covering every byte once.
pub fn ranges(total: usize, holders: usize) -> Vec<Range<usize>> {
    if total == 0 {
        return Vec::new();
    }
    let count = holders
        .max(1)
        .max(total.div_ceil(MAX_RANGE_BYTES))
        .min(total);
    let (base, extra) = (total / count, total % count);
    let mut start = 0;
    (0..count)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// The ranges of one state being fetched from `holders` peers: range `i` is asked of holder
/// `i mod holders` first, then of the next holder each time it does not come back, and fails
/// once every holder has been asked for it `tries` times ([`StateFetch::with_tries`]; once by
/// default). A holder has at most [`IN_FLIGHT_PER_HOLDER`] ranges asked of it at a time, and
/// gets the next as soon as one comes back ([`StateFetch::next_asks`]: a window, not waves
/// that wait for their slowest range).
#[derive(Debug)]
pub struct StateFetch {
    buf: Vec<u8>,
    ranges: Vec<Range<usize>>,
    /// Per range: how many holders were asked for it and did not deliver it.
    misses: Vec<usize>,
    done: Vec<bool>,
    /// Per range: asked and not answered yet.
    asking: Vec<bool>,
    /// Per range: the holder it was last asked of.
    asked_of: Vec<usize>,
    holders: usize,
    /// Per holder: whether it missed a range it was asked for.
    missed: Vec<bool>,
    /// Times each holder may be asked for one range.
    tries: usize,
}

impl StateFetch {
    /// A fetch of `total` bytes from `holders` peers (at least one).
    pub fn new(total: usize, holders: usize) -> Self {
        Self::with_tries(total, holders, 1)
    }

    /// A fetch that asks each holder for a range up to `tries` times (at least once): from one
    /// holder (an audited worker's start state, thousands of ranges for a large model), one
    /// lost range must not lose the whole.
    pub fn with_tries(total: usize, holders: usize, tries: usize) -> Self {
        let holders = holders.max(1);
        let ranges = ranges(total, holders);
        Self {
            buf: vec![0; total],
            misses: vec![0; ranges.len()],
            done: vec![false; ranges.len()],
            asking: vec![false; ranges.len()],
            asked_of: vec![0; ranges.len()],
            ranges,
            holders,
            missed: vec![false; holders],
            tries: tries.max(1),
        }
    }

    /// What to ask now: `(range index, byte range, holder index)` for ranges neither delivered
    /// nor being asked, each of the holder whose turn it is, while that holder has fewer than
    /// [`IN_FLIGHT_PER_HOLDER`] asks out; they count as being asked until their answer comes
    /// ([`StateFetch::on_answer`]). Empty when every range is in or being asked, or once one
    /// range has been missed by every holder ([`StateFetch::failed`]).
    pub fn next_asks(&mut self) -> Vec<(usize, Range<usize>, usize)> {
        if self.failed() {
            return Vec::new();
        }
        let mut out_of = vec![0usize; self.holders];
        for i in (0..self.ranges.len()).filter(|&i| self.asking[i]) {
            out_of[self.asked_of[i]] += 1;
        }
        let mut out = Vec::new();
        for i in 0..self.ranges.len() {
            if self.done[i] || self.asking[i] {
                continue;
            }
            let h = self.holder_of(i);
            if out_of[h] < IN_FLIGHT_PER_HOLDER {
                out_of[h] += 1;
                self.asking[i] = true;
                self.asked_of[i] = h;
                out.push((i, self.ranges[i].clone(), h));
            }
        }
        out
    }

    /// Ranges asked and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.asking.iter().filter(|a| **a).count()
    }

    /// The holder whose turn it is to be asked for range `i`: the next one from `i` plus its
    /// misses that has not missed a range yet (a holder that stalled once gets no more of the
    /// ranges while another has not), or that one if all have.
    fn holder_of(&self, i: usize) -> usize {
        let turn = (i + self.misses[i]) % self.holders;
        (0..self.holders)
            .map(|k| (turn + k) % self.holders)
            .find(|&h| !self.missed[h])
            .unwrap_or(turn)
    }

    /// The holders that delivered every range they were asked for.
    pub fn never_missed(&self) -> Vec<usize> {
        (0..self.holders).filter(|&h| !self.missed[h]).collect()
    }

    /// The answer to range `i`: its bytes, or `None` (no answer, refused, or another length:
    /// the holder missed it).
    pub fn on_answer(&mut self, i: usize, bytes: Option<&[u8]>) {
        let Some(range) = self.ranges.get(i).cloned() else {
            return;
        };
        if self.done[i] {
            return;
        }
        let h = if self.asking[i] {
            self.asked_of[i]
        } else {
            self.holder_of(i)
        };
        self.asking[i] = false;
        match bytes {
            Some(b) if b.len() == range.len() => {
                self.buf[range].copy_from_slice(b);
                self.done[i] = true;
            }
            _ => {
                self.missed[h] = true;
                self.misses[i] += 1;
            }
        }
    }

    /// Whether some range was missed by every holder, `tries` times each.
    pub fn failed(&self) -> bool {
        self.misses.iter().any(|&m| m >= self.holders * self.tries)
    }

    /// The bytes, once every range is in.
    pub fn finish(self) -> Option<Vec<u8>> {
        self.done.iter().all(|d| *d).then_some(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_from_one_holder_with_tries_survives_lost_ranges_but_not_endless_ones() {
        let total = 3 * MAX_RANGE_BYTES;
        let mut f = StateFetch::with_tries(total, 1, 3);
        let (i, _, _) = f.next_asks()[0];
        f.on_answer(i, None);
        assert!(!f.failed());
        // The lost range is asked again at once (range 1 is still out: a window of 2).
        let again = f.next_asks();
        assert_eq!(again.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0]);
        f.on_answer(i, None);
        assert!(!f.failed());
        let (i, _, _) = f.next_asks()[0];
        f.on_answer(i, None);
        assert!(f.failed() && f.next_asks().is_empty());
        // With the default one try, one lost range fails a one-holder fetch.
        let mut once = StateFetch::new(total, 1);
        let (i, _, _) = once.next_asks()[0];
        once.on_answer(i, None);
        assert!(once.failed());
    }

    /// A holder that missed a range is asked for no more while another has missed none.
    #[test]
    fn a_holder_that_missed_gets_no_more_ranges_while_others_deliver() {
        let total = 12 * MAX_RANGE_BYTES;
        let bytes = vec![1u8; MAX_RANGE_BYTES];
        let mut f = StateFetch::new(total, 3);
        // Holder 0 misses the first range it is asked for; every other answer comes.
        let mut asked_of_0 = 0;
        let mut missed_one = false;
        loop {
            let asks = f.next_asks();
            if asks.is_empty() {
                break;
            }
            // Asks made after the miss (not those of its own wave, already out).
            let after_miss = missed_one;
            for (i, _, h) in asks {
                asked_of_0 += usize::from(h == 0 && after_miss);
                if h == 0 && !missed_one {
                    missed_one = true;
                    f.on_answer(i, None);
                } else {
                    f.on_answer(i, Some(&bytes));
                }
            }
        }
        assert!(missed_one);
        assert_eq!(asked_of_0, 0, "holder 0 stalled once and was asked again");
        assert_eq!(f.finish().map(|b| b.len()), Some(total));
    }

    /// A holder gets its next range as soon as one comes back, never more than the window.
    #[test]
    fn each_holder_keeps_a_window_of_asks_refilled_as_answers_come() {
        let total = 5 * MAX_RANGE_BYTES;
        let mut f = StateFetch::new(total, 1);
        let first = f.next_asks();
        assert_eq!(first.iter().map(|a| a.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!(f.next_asks().is_empty(), "the window is full");
        let bytes = vec![7u8; MAX_RANGE_BYTES];
        f.on_answer(1, Some(&bytes));
        assert_eq!(f.in_flight(), 1);
        assert_eq!(
            f.next_asks().iter().map(|a| a.0).collect::<Vec<_>>(),
            vec![2]
        );
        for i in [0, 2, 3, 4] {
            f.next_asks();
            f.on_answer(i, Some(&bytes));
        }
        assert_eq!(f.in_flight(), 0);
        assert_eq!(f.finish(), Some(vec![7u8; total]));
    }

    #[test]
    fn start_slices_are_the_bytes_of_the_whole_start_state_and_read_back() {
        let n = 37;
        let mut st = WorkerState::new(n);
        st.opt.step = 0x0102_0304_0506_0708;
        for i in 0..n {
            st.opt.m[i] = i as f32 * 0.5 - 3.0;
            st.opt.v[i] = i as f32 * 0.25;
            st.feedback.residual[i] = -(i as f32) / 7.0;
        }
        let t = WorkerStateTransfer::of(4, &st);
        let whole: Vec<u8> = t.opt.iter().chain(&t.residual).copied().collect();
        assert_eq!(whole.len(), start_len(n));
        // Every range, aligned or not, is the same bytes; ranges past the end are refused.
        for start in 0..whole.len() {
            for len in [1, 3, 4, 9, 64, whole.len()] {
                let end = (start + len).min(whole.len());
                assert_eq!(
                    start_slice(&st, start..end).as_deref(),
                    (start < end).then(|| &whole[start..end]),
                    "{start}..{end}"
                );
            }
        }
        assert_eq!(start_slice(&st, 0..whole.len() + 1), None);
        let assembled: Vec<u8> = ranges(whole.len(), 3)
            .into_iter()
            .flat_map(|r| start_slice(&st, r).unwrap())
            .collect();
        assert_eq!(start_from_bytes(4, &assembled, n).unwrap(), st);
        assert!(start_from_bytes(4, &assembled[1..], n).is_err());
    }
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_cover_every_byte_once_in_bounded_nearly_equal_pieces(
            total in 0usize..(3 * MAX_RANGE_BYTES),
            holders in 0usize..9,
        ) {
            let r = ranges(total, holders);
            let mut next = 0;
            for x in &r {
                prop_assert_eq!(x.start, next);
                prop_assert!(!x.is_empty() && x.len() <= MAX_RANGE_BYTES);
                next = x.end;
            }
            prop_assert_eq!(next, total);
            if total > 0 {
                prop_assert!(r.len() >= holders.max(1).min(total));
                let (lo, hi) = (r.iter().map(|x| x.len()).min().unwrap(), r.iter().map(|x| x.len()).max().unwrap());
                prop_assert!(hi - lo <= 1);
            }
        }

        /// Whatever the holders miss, the fetch ends with the exact bytes or fails, and fails
        /// only when one range was missed by every holder.
        #[test]
        fn a_fetch_assembles_the_bytes_or_fails_only_when_every_holder_missed_a_range(
            blob in proptest::collection::vec(any::<u8>(), 1..2000),
            holders in 1usize..5,
            // Per holder: whether it answers, and whether it answers with the wrong length.
            answers in proptest::collection::vec((any::<bool>(), any::<bool>()), 5),
        ) {
            let mut f = StateFetch::new(blob.len(), holders);
            let mut steps = 0;
            loop {
                let asks = f.next_asks();
                if asks.is_empty() {
                    break;
                }
                steps += 1;
                prop_assert!(steps <= holders * blob.len());
                for h in 0..holders {
                    prop_assert!(asks.iter().filter(|a| a.2 == h).count() <= IN_FLIGHT_PER_HOLDER);
                }
                for (i, r, h) in asks {
                    prop_assert!(h < holders);
                    let (answers_at_all, short) = answers[h];
                    let bytes = &blob[r.clone()];
                    let wrong = &bytes[..bytes.len() - 1];
                    f.on_answer(i, answers_at_all.then_some(if short { wrong } else { bytes }));
                }
            }
            let good = answers[..holders].iter().any(|(a, s)| *a && !*s);
            prop_assert_eq!(f.failed(), !good);
            // A holder that answered wrong, and was asked, is never listed as never missing.
            for h in f.never_missed() {
                prop_assert!(answers[h].0 && !answers[h].1 || h >= blob.len());
            }
            match f.finish() {
                Some(b) => prop_assert_eq!(b, blob),
                None => prop_assert!(!good),
            }
        }
    }

    #[test]
    fn a_state_round_trips_through_its_bytes_and_bad_bytes_are_refused() {
        use crate::local::{prepare, TaskSetup};
        let setup = TaskSetup {
            task: plexus_model::train::task::Task::Reverse { len: 3 },
            hidden: 32,
            layers: 1,
            init_seed: 1,
            eval_examples: 4,
        };
        let (_, _, params) = prepare(&setup, 1).unwrap();
        let n = params.values.len();
        let layout = params.layout.clone();
        let state = GlobalState {
            round: 7,
            params,
            outer: OuterState {
                momentum: (0..n).map(|i| -(i as f32) * 1e-3).collect(),
            },
        };
        let bytes = state_bytes(&state);
        assert_eq!(bytes.len(), state_len(n));
        let back = state_from_bytes(&bytes, layout.clone()).unwrap();
        assert_eq!(back.digest(), state.digest());
        assert!(matches!(
            state_from_bytes(&bytes[..bytes.len() - 4], layout.clone()),
            Err(MessageError::StateSize { round: 7, .. })
        ));
        let mut nan = bytes.clone();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            state_from_bytes(&nan, layout).unwrap_err(),
            MessageError::NonFinite
        );
    }
}
