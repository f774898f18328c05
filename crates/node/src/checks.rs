//! Checks of spans this node does not serve: an audit (or a dispute) of a span that no other
//! node serves goes to a node that holds the model file and loads that span for it.
//!
//! ```text
//! Forward opening a session on another span ─▶ Checks::needs_stage ─▶ held (Checks::hold)
//!   first one held ─▶ load the span off the event loop ─▶ EngineHandle::check_blocking
//!   loaded ─▶ Checks::loaded ─▶ the held calls go to the engine (new sessions open on it)
//! announcement tick ─▶ a span with a single other server, a spare slot (or one whose span
//!   has gained another server since) ─▶ Checks::prefetch ─▶ the same load, with no call
//!   waiting (audits of a sole server find the stage ready)
//! ```
//!
//! Any peer may send such a call (a node cannot tell a gateway from anyone else), so what it
//! can cost is bounded: the engine keeps at most [`MAX_CHECK_STAGES`] check stages, the oldest
//! dropped first together with the sessions opened on it (so evicted stages are not kept
//! alive); loads start at most one per [`LOAD_EVERY`]; at most [`MAX_HELD`] calls wait for a
//! load (more are refused `Busy`); and a span must fit in the layers the node announces it
//! checks (`check_layers`: its free memory less its unused KV budget, shared by the stages it
//! keeps). This module mirrors which spans the engine keeps, so a call for a kept span goes
//! straight to the engine; only a session's first call (position 0) needs the stage.

use crate::engine::MAX_CHECK_STAGES;
use plexus_core::wire::Forward;
use plexus_core::Digest;
use plexus_model::LayerSpan;
use plexus_net::{PeerId, Reply};
use std::time::{Duration, Instant};

/// Calls held while a check stage loads.
pub const MAX_HELD: usize = 32;

/// Least time between the starts of two loads.
pub const LOAD_EVERY: Duration = Duration::from_secs(2);

/// How long after placement moved a node off a span calls for it are not checks: they are
/// stale routes (a gateway that has not seen the move), and get the engine's `UnknownModel`
/// so the caller re-routes, rather than a load of the span the node just gave up.
pub const LEFT_FOR: Duration = Duration::from_secs(60);

/// A call waiting for its span to load (`R`: where its answer goes).
pub struct Held<R = Reply> {
    pub peer: PeerId,
    pub forward: Box<Forward>,
    pub reply: R,
    span: LayerSpan,
}

/// What became of a call [`Checks::hold`] was given.
#[derive(Debug, PartialEq)]
pub enum Hold<R = Reply> {
    /// Held; load this span after this long (nothing else is loading).
    Load(LayerSpan, Duration),
    /// Held until the load under way finishes.
    Queued,
    /// Too many calls held: answer this one `Busy`.
    Full(R),
}

/// The check stages of one node (see the module docs).
pub struct Checks<R = Reply> {
    /// Spans the engine keeps, oldest first (as the engine evicts them).
    kept: Vec<LayerSpan>,
    loading: Option<LayerSpan>,
    held: Vec<Held<R>>,
    /// When the latest load started (or is due to).
    last_load: Option<Instant>,
    /// Spans placement moved this node off, and when.
    left: Vec<(LayerSpan, Instant)>,
    /// The kept span the load under way will make the engine drop (put back if it fails).
    dropping: Option<LayerSpan>,
    /// Whether the load under way is a prefetch (not rate-limited: the node's own guess).
    guessing: bool,
    /// Spans whose prefetch failed, and when: not guessed again within [`LEFT_FOR`].
    failed: Vec<(LayerSpan, Instant)>,
}

impl<R> Default for Checks<R> {
    fn default() -> Self {
        Self {
            kept: Vec::new(),
            loading: None,
            held: Vec::new(),
            last_load: None,
            left: Vec::new(),
            dropping: None,
            guessing: false,
            failed: Vec::new(),
        }
    }
}

impl<R> Checks<R> {
    /// The span `f` needs a check stage of, when it opens a session on a span of `model`
    /// other than `served` that the engine does not keep, that fits in `capacity` layers of a
    /// model of `layers` layers, and that this node did not leave within [`LEFT_FOR`] of
    /// `now`; `None` sends the call to the engine as it is (which answers calls for unknown
    /// spans with an error).
    pub fn needs_stage(
        &self,
        f: &Forward,
        model: &Digest,
        (served, layers): (LayerSpan, usize),
        capacity: usize,
        now: Instant,
    ) -> Option<LayerSpan> {
        let (start, end) = (f.start as usize, f.end as usize);
        if &f.model != model || f.position != 0 || start >= end || end > layers {
            return None;
        }
        let span = LayerSpan::new(start, end);
        if span == served || span.len() > capacity || self.kept.contains(&span) {
            return None;
        }
        if within(&self.left, span, now) {
            return None;
        }
        Some(span)
    }

    /// Placement moved this node off `span` at `now`.
    pub fn leave(&mut self, span: LayerSpan, now: Instant) {
        remember(&mut self.left, span, now);
    }

    /// Holds a call until `span` is loaded (`now`: the time of the call).
    pub fn hold(
        &mut self,
        peer: PeerId,
        forward: Box<Forward>,
        reply: R,
        span: LayerSpan,
        now: Instant,
    ) -> Hold<R> {
        if self.held.len() >= MAX_HELD {
            return Hold::Full(reply);
        }
        self.held.push(Held {
            peer,
            forward,
            reply,
            span,
        });
        if self.loading.is_some() {
            return Hold::Queued;
        }
        Hold::Load(span, self.start(span, now))
    }

    /// Whether to load `span` now, before any call asks for it: when the node has a stage
    /// slot to spare, or keeps a stage of a span not in `needed` (the spans a guess is for,
    /// those a single other node serves: one kept for a span that has since gained another
    /// server goes for the guess, see [`Self::replacing`]; a guess never evicts a needed
    /// stage), nothing loads or waits, and `span` is not `served`, kept, left within
    /// [`LEFT_FOR`] of `now`, nor a span whose guess failed within that time. The node prefetches the spans a single node serves, whose audits go
    /// to nodes that load them: an audited call then finds the stage ready instead of waiting
    /// for the load beside the provider's answer. A prefetch starts at once and does not
    /// count for [`LOAD_EVERY`], so a call that needs another span right after it is not
    /// made to wait for the guess's turn.
    pub fn prefetch(
        &mut self,
        span: LayerSpan,
        served: LayerSpan,
        now: Instant,
        needed: &[LayerSpan],
    ) -> bool {
        let stale = self.kept.iter().position(|k| !needed.contains(k));
        if self.loading.is_some()
            || !self.held.is_empty()
            || (self.kept.len() >= MAX_CHECK_STAGES && stale.is_none())
            || self.kept.contains(&span)
            || span == served
            || within(&self.left, span, now)
            || within(&self.failed, span, now)
        {
            return false;
        }
        if self.kept.len() >= MAX_CHECK_STAGES {
            // The engine is asked to drop this one ([`Self::replacing`]); calls for it wait for
            // a load of their own from now on.
            self.dropping = stale.map(|i| self.kept.remove(i));
        }
        self.loading = Some(span);
        self.guessing = true;
        true
    }

    /// The kept span the guess under way is to replace, if any: the engine is to drop that
    /// one or refuse the guess (a call's load lets it drop its oldest unused stage).
    pub fn replacing(&self) -> Option<LayerSpan> {
        self.dropping.filter(|_| self.guessing)
    }

    /// Starts loading `span`: how long to wait first, so loads start [`LOAD_EVERY`] apart.
    fn start(&mut self, span: LayerSpan, now: Instant) -> Duration {
        let after = self.last_load.map_or(Duration::ZERO, |t| {
            (t + LOAD_EVERY).saturating_duration_since(now)
        });
        self.last_load = Some(now + after);
        self.loading = Some(span);
        self.guessing = false;
        // The engine drops its oldest check stage when this one arrives: from now on calls
        // for that span wait for a load of their own rather than reach a stage about to go.
        if !self.kept.contains(&span) && self.kept.len() >= MAX_CHECK_STAGES {
            self.dropping = Some(self.kept.remove(0));
        }
        after
    }

    /// The load of `span` finished: `kept` is what the engine keeps now (`None`: the load
    /// failed). Returns the calls that waited for it (to submit, or to refuse when `span` is
    /// not kept) and the next span to load with the wait before it, if calls wait for another.
    pub fn loaded(
        &mut self,
        span: LayerSpan,
        kept: Option<Vec<LayerSpan>>,
        now: Instant,
    ) -> (Vec<Held<R>>, Option<(LayerSpan, Duration)>) {
        self.loading = None;
        let dropping = self.dropping.take();
        match kept {
            Some(kept) => {
                // A guess the engine refused (the stage it was to replace is in use) is not
                // tried again for a while either.
                if self.guessing && !kept.contains(&span) {
                    remember(&mut self.failed, span, now);
                }
                self.kept = kept
            }
            None => {
                // The engine kept what it had: the stage the load was to replace included.
                if let Some(d) = dropping {
                    self.kept.insert(0, d);
                }
                if self.guessing {
                    remember(&mut self.failed, span, now);
                }
            }
        }
        self.guessing = false;
        let (done, rest): (Vec<Held<R>>, Vec<Held<R>>) =
            self.held.drain(..).partition(|h| h.span == span);
        self.held = rest;
        let next = self.held.first().map(|h| h.span);
        (done, next.map(|n| (n, self.start(n, now))))
    }

    /// The node now serves `span` (placement moved it): the engine drops a check stage of it.
    pub fn serving(&mut self, span: LayerSpan) {
        self.kept.retain(|s| *s != span);
    }

    /// Whether the engine keeps a check stage of `span`.
    pub fn keeps(&self, span: LayerSpan) -> bool {
        self.kept.contains(&span)
    }

    /// Layers of the check stages the engine keeps.
    pub fn kept_layers(&self) -> usize {
        self.kept.iter().map(|s| s.len()).sum()
    }
}

/// Whether `list` holds `span` from less than [`LEFT_FOR`] before `now`.
fn within(list: &[(LayerSpan, Instant)], span: LayerSpan, now: Instant) -> bool {
    list.iter()
        .any(|(s, at)| *s == span && now.duration_since(*at) < LEFT_FOR)
}

/// Records `span` at `now` in `list`, forgetting what is [`LEFT_FOR`] old (and `span`'s
/// earlier entry).
fn remember(list: &mut Vec<(LayerSpan, Instant)>, span: LayerSpan, now: Instant) {
    list.retain(|(s, at)| *s != span && now.duration_since(*at) < LEFT_FOR);
    list.push((span, now));
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::wire::{DType, SessionId};

    fn call(start: u32, end: u32, position: u32) -> Forward {
        Forward {
            session: SessionId([1; 16]),
            model: Digest([7; 32]),
            start,
            end,
            position,
            tokens: vec![1],
            hidden: None,
            chunks: Vec::new(),
            sampling: None,
            reply_dtype: DType::F32,
            all_rows: false,
            prompt_len: 0,
        }
    }

    #[test]
    fn prefetch_uses_a_spare_slot_only_and_never_races_a_load() {
        let t0 = Instant::now();
        let served = LayerSpan::new(0, 10);
        let (a, b, c) = (
            LayerSpan::new(10, 20),
            LayerSpan::new(20, 30),
            LayerSpan::new(5, 15),
        );
        let mut checks = Checks::<u32>::default();
        assert!(
            !checks.prefetch(served, served, t0, &[a, b, c]),
            "the served span"
        );
        assert!(checks.prefetch(a, served, t0, &[a, b, c]));
        assert!(
            !checks.prefetch(b, served, t0, &[a, b, c]),
            "a load is under way"
        );
        let (held, next) = checks.loaded(a, Some(vec![a]), t0);
        assert!(held.is_empty() && next.is_none());
        assert!(!checks.prefetch(a, served, t0, &[a, b, c]), "already kept");
        // A guess does not count for the rate limit: a call's load right after starts at once.
        let peer = PeerId::random();
        assert_eq!(
            checks.hold(peer, Box::new(call(5, 15, 0)), 1, c, t0),
            Hold::Load(c, Duration::ZERO)
        );
        assert!(
            !checks.prefetch(b, served, t0, &[a, b, c]),
            "a call waits for a load"
        );
        let (held, _) = checks.loaded(c, Some(vec![a, c]), t0);
        assert_eq!(held.len(), 1);
        assert!(
            !checks.prefetch(b, served, t0 + LOAD_EVERY, &[a, b, c]),
            "both slots taken: a guess never evicts"
        );
        // A failed guess is not tried again for a while.
        let mut checks = Checks::<u32>::default();
        assert!(checks.prefetch(b, served, t0, &[a, b, c]));
        checks.loaded(b, None, t0);
        assert!(!checks.prefetch(b, served, t0 + Duration::from_secs(1), &[a, b, c]));
        assert!(checks.prefetch(a, served, t0 + Duration::from_secs(1), &[a, b, c]));
        checks.loaded(a, Some(vec![a]), t0 + Duration::from_secs(1));
        assert!(checks.prefetch(b, served, t0 + LEFT_FOR, &[a, b, c]));
        // A span placement just moved the node off is not fetched back.
        let mut checks = Checks::<u32>::default();
        checks.leave(a, t0);
        assert!(!checks.prefetch(a, served, t0 + Duration::from_secs(1), &[a, b, c]));
        assert!(checks.prefetch(a, served, t0 + LEFT_FOR, &[a, b, c]));
    }

    #[test]
    fn a_guess_replaces_a_kept_stage_whose_span_gained_a_server_and_no_other() {
        let t0 = Instant::now();
        let served = LayerSpan::new(0, 10);
        let (a, b, c) = (
            LayerSpan::new(10, 20),
            LayerSpan::new(20, 30),
            LayerSpan::new(5, 15),
        );
        let mut checks = Checks::<u32>::default();
        checks.loaded(a, Some(vec![a, c]), t0);
        // Both kept spans still have a single server: the guess waits.
        assert!(!checks.prefetch(b, served, t0, &[a, b, c]));
        assert_eq!(checks.replacing(), None);
        // `a` gained another server: the guess of `b` replaces it (the engine is told which).
        assert!(checks.prefetch(b, served, t0, &[b, c]));
        assert_eq!(checks.replacing(), Some(a));
        assert!(
            !checks.keeps(a),
            "about to be dropped: calls for it wait for a load"
        );
        assert!(checks.keeps(c));
        let (held, next) = checks.loaded(b, Some(vec![c, b]), t0);
        assert!(held.is_empty() && next.is_none());
        assert_eq!(checks.replacing(), None);
        assert!(checks.keeps(b) && checks.keeps(c) && !checks.keeps(a));
        // A failed guess gives the stage it was to replace back.
        let mut checks = Checks::<u32>::default();
        checks.loaded(a, Some(vec![a, c]), t0);
        assert!(checks.prefetch(b, served, t0, &[b, a]));
        assert_eq!(checks.replacing(), Some(c));
        checks.loaded(b, None, t0);
        assert!(checks.keeps(a) && checks.keeps(c));
        // A guess the engine refused (the stage to replace was in use) waits as a failed one.
        let mut checks = Checks::<u32>::default();
        checks.loaded(a, Some(vec![a, c]), t0);
        assert!(checks.prefetch(b, served, t0, &[b, a]));
        checks.loaded(b, Some(vec![a, c]), t0);
        assert!(checks.keeps(a) && checks.keeps(c) && !checks.keeps(b));
        assert!(!checks.prefetch(b, served, t0 + Duration::from_secs(1), &[b, a]));
        assert!(checks.prefetch(b, served, t0 + LEFT_FOR, &[b, a]));
    }

    #[test]
    fn a_failed_load_gives_back_the_stage_it_was_to_replace() {
        let t0 = Instant::now();
        let (a, b, c) = (
            LayerSpan::new(0, 1),
            LayerSpan::new(1, 2),
            LayerSpan::new(2, 3),
        );
        let mut checks = Checks::<u32>::default();
        checks.loaded(a, Some(vec![a, b]), t0);
        let peer = PeerId::random();
        assert!(matches!(
            checks.hold(peer, Box::new(call(2, 3, 0)), 1, c, t0),
            Hold::Load(..)
        ));
        assert!(!checks.keeps(a), "about to be dropped");
        checks.loaded(c, None, t0);
        assert!(checks.keeps(a) && checks.keeps(b));
        assert_eq!(checks.kept_layers(), 2);
    }

    #[test]
    fn only_a_new_session_of_another_span_that_fits_needs_a_check_stage() {
        let checks = Checks::<u32>::default();
        let model = Digest([7; 32]);
        let served = LayerSpan::new(10, 20);
        let t = Instant::now();
        let needs =
            |f: &Forward, capacity| checks.needs_stage(f, &model, (served, 30), capacity, t);
        assert_eq!(needs(&call(0, 10, 0), 30), Some(LayerSpan::new(0, 10)));
        assert_eq!(needs(&call(10, 20, 0), 30), None, "the served span");
        assert_eq!(
            needs(&call(0, 10, 5), 30),
            None,
            "a later call of a session"
        );
        assert_eq!(
            needs(&call(0, 10, 0), 9),
            None,
            "more layers than it checks"
        );
        assert_eq!(needs(&call(0, 31, 0), 31), None, "past the model");
        assert_eq!(needs(&call(5, 5, 0), 30), None, "empty");
        let mut other = call(0, 10, 0);
        other.model = Digest([8; 32]);
        assert_eq!(needs(&other, 30), None, "another model");
    }

    #[test]
    fn kept_spans_mirror_the_engine_and_the_oldest_goes_first() {
        let mut checks = Checks::<u32>::default();
        let model = Digest([7; 32]);
        let served = LayerSpan::new(10, 20);
        let t = Instant::now();
        // The mirror is what the engine says it keeps after each load.
        let kept = |spans: &[(usize, usize)]| {
            Some(spans.iter().map(|&(s, e)| LayerSpan::new(s, e)).collect())
        };
        checks.start(LayerSpan::new(0, 10), t);
        checks.loaded(LayerSpan::new(0, 10), kept(&[(0, 10)]), t);
        checks.start(LayerSpan::new(20, 30), t);
        checks.loaded(LayerSpan::new(20, 30), kept(&[(0, 10), (20, 30)]), t);
        checks.start(LayerSpan::new(0, 5), t);
        checks.loaded(LayerSpan::new(0, 5), kept(&[(20, 30), (0, 5)]), t);
        assert_eq!(checks.kept.len(), MAX_CHECK_STAGES);
        assert_eq!(checks.kept_layers(), 15);
        let needs =
            |c: &Checks<u32>, s, e| c.needs_stage(&call(s, e, 0), &model, (served, 30), 30, t);
        assert_eq!(
            needs(&checks, 0, 10),
            Some(LayerSpan::new(0, 10)),
            "evicted"
        );
        assert_eq!(needs(&checks, 20, 30), None);
        assert_eq!(needs(&checks, 0, 5), None);
        // A failed load keeps nothing.
        checks.loaded(LayerSpan::new(5, 10), None, t);
        assert_eq!(needs(&checks, 5, 10), Some(LayerSpan::new(5, 10)));
        // A load about to evict the oldest kept span sends calls for it to a load of their
        // own at once (the engine may drop it before they reach it).
        checks.start(LayerSpan::new(5, 10), t);
        assert_eq!(needs(&checks, 20, 30), Some(LayerSpan::new(20, 30)));
        assert_eq!(needs(&checks, 0, 5), None);
        // Serving a span drops a check stage of it.
        checks.serving(LayerSpan::new(0, 5));
        assert_eq!(needs(&checks, 0, 5), Some(LayerSpan::new(0, 5)));
        // A span placement moved this node off is a stale route for LEFT_FOR, not a check.
        checks.leave(LayerSpan::new(5, 10), t);
        assert_eq!(needs(&checks, 5, 10), None);
        let later = |c: &Checks<u32>| {
            c.needs_stage(&call(5, 10, 0), &model, (served, 30), 30, t + LEFT_FOR)
        };
        assert_eq!(later(&checks), Some(LayerSpan::new(5, 10)));
    }

    #[test]
    fn calls_wait_for_their_span_one_load_at_a_time_and_the_queue_is_bounded() {
        let mut checks = Checks::<u32>::default();
        let (a, b) = (LayerSpan::new(0, 10), LayerSpan::new(20, 30));
        let peer = PeerId::random();
        let f = || Box::new(call(0, 10, 0));
        let t = Instant::now();
        assert_eq!(
            checks.hold(peer, f(), 1, a, t),
            Hold::Load(a, Duration::ZERO)
        );
        assert_eq!(checks.hold(peer, f(), 2, a, t), Hold::Queued);
        assert_eq!(checks.hold(peer, f(), 3, b, t), Hold::Queued);
        // Loaded 0.5 s later: the other span waits out the rest of LOAD_EVERY.
        let (done, next) = checks.loaded(a, Some(vec![a]), t + Duration::from_millis(500));
        assert_eq!(done.iter().map(|h| h.reply).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(next, Some((b, LOAD_EVERY - Duration::from_millis(500))));
        let (done, next) = checks.loaded(b, None, t + LOAD_EVERY);
        assert_eq!(done.iter().map(|h| h.reply).collect::<Vec<_>>(), [3]);
        assert_eq!(next, None);
        // However fast spans are asked for, loads start LOAD_EVERY apart.
        let c = LayerSpan::new(5, 10);
        assert_eq!(
            checks.hold(peer, f(), 4, c, t + LOAD_EVERY),
            Hold::Load(c, LOAD_EVERY)
        );
        checks.loaded(c, Some(vec![a, c]), t + 2 * LOAD_EVERY);
        assert!(checks.keeps(c) && checks.keeps(a));
        for i in 0..MAX_HELD as u32 {
            assert_ne!(checks.hold(peer, f(), i, a, t), Hold::Full(i));
        }
        assert_eq!(checks.hold(peer, f(), 99, a, t), Hold::Full(99));
    }
}
