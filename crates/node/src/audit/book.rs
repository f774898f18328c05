//! The gateway's audit book: what it has learnt from audits (convictions, doubts, each node's
//! record of calls, audits and cross-build comparisons, near ties), shared by its chains, and
//! the [`Snapshot`] of it that outlives the process ([`super::book_file`]).

use plexus_ledger::Address;
use plexus_net::PeerId;
use plexus_verify::compare::CrossCheck;
use plexus_verify::reputation::Record;
use plexus_verify::stats::MissRecord;
use plexus_verify::ties::{TieBook, TieCounts};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The measured honest miss rate across builds of one comparison of sampled tokens (`token`)
/// or of a call's activation rows.
pub(crate) fn band_rate(token: bool) -> f64 {
    if token {
        plexus_verify::compare::CROSS_BUILD_TOKEN_FPR
    } else {
        plexus_verify::compare::CROSS_BUILD_ROWS_FPR
    }
}

/// Most peers the gateway keeps an audit record of.
pub(crate) const MAX_RECORDS: usize = 4096;

/// Most convictions a gateway remembers; beyond them the oldest is forgotten (a conviction
/// takes a dispute, with referees' replays, so this many cost a cheater far more than the
/// stakes it lost).
pub const MAX_CONVICTIONS: usize = 65_536;

/// Largest count a restored record may hold (2^53): beyond it a file was not written by a
/// gateway, and sums of counts could overflow.
const MAX_COUNT: u64 = 1 << 53;

/// What a gateway has learnt from audits, shared by its chains: convicted nodes (never routed
/// to again), reputation records, and the stakes of accounts (for the audit probability).
#[derive(Clone, Debug, Default)]
pub struct AuditBook {
    convicted: BTreeSet<PeerId>,
    /// The same peers in the order they were convicted, oldest first (at most
    /// [`MAX_CONVICTIONS`]); the gateway announces the latest ([`Self::verdicts`]).
    order: std::collections::VecDeque<PeerId>,
    records: BTreeMap<PeerId, Record>,
    stakes: HashMap<Address, u64>,
    /// Cross-build comparisons of each node's answers and the misses referees confirmed, per
    /// kind of answer (`true`: sampled tokens, `false`: windows of rows).
    band: BTreeMap<(PeerId, bool), MissRecord>,
    /// Cross-build token comparisons of each last stage, per checker: its near ties.
    ties: TieBook<PeerId>,
    /// The band records (keys of `band`) that doubt their node ([`MissRecord::doubts`]):
    /// misses the referees confirmed, improbable for an honest node but short of a conviction.
    doubted: BTreeSet<(PeerId, bool)>,
    /// What changed since the book was made ([`Self::changes`]).
    changes: Changes,
}

/// How often an [`AuditBook`] changed: every recorded call, audit and comparison (`records`),
/// and the changes of its verdicts, convictions and doubts (`verdicts`). A kept book
/// ([`super::book_file`]) is saved soon after a verdict changes, less often for records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub records: u64,
    pub verdicts: u64,
}

impl AuditBook {
    pub fn is_convicted(&self, peer: &PeerId) -> bool {
        self.convicted.contains(peer)
    }

    /// How many peers the book holds convicted.
    pub fn convicted_count(&self) -> usize {
        self.convicted.len()
    }

    /// The latest peers convicted, oldest first, at most
    /// [`plexus_core::announce::limits::MAX_VERDICTS`]: the gateway announces them, and nodes
    /// that trust its verdicts plan placement without them.
    pub fn verdicts(&self) -> Vec<PeerId> {
        let n = self.order.len();
        let latest = n.saturating_sub(plexus_core::announce::limits::MAX_VERDICTS);
        self.order.range(latest..).copied().collect()
    }

    /// The peers this gateway doubts, not convicted: their cross-build
    /// misses, confirmed by referees, are improbable for an honest node but short of a
    /// conviction ([`MissRecord::doubts`], with hysteresis). Only referee-confirmed misses
    /// count: an inconclusive dispute doubts nobody, so an auditor cannot get an honest node
    /// doubted by disputing it. The gateway announces them beside its convictions, and nodes
    /// that trust its verdicts put a spare beside each (see [`crate::placement`]).
    ///
    /// Most suspicious first (the least honest tail of its records), so that an announcement
    /// that keeps only the first [`plexus_core::announce::limits::MAX_VERDICTS`] keeps those.
    pub fn doubted(&self) -> Vec<PeerId> {
        let mut ranked: Vec<(f64, PeerId)> = self
            .doubted
            .iter()
            .filter(|(p, _)| !self.is_convicted(p))
            .map(|&(p, token)| {
                let tail = self.band_record(&p, token).honest_tail(band_rate(token));
                (tail, p)
            })
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut seen = BTreeSet::new();
        ranked
            .into_iter()
            .filter(|(_, p)| seen.insert(*p))
            .map(|(_, p)| p)
            .collect()
    }

    /// Whether this gateway doubts `peer` ([`Self::doubted`]).
    pub fn is_doubted(&self, peer: &PeerId) -> bool {
        !self.is_convicted(peer)
            && (self.doubted.contains(&(*peer, false)) || self.doubted.contains(&(*peer, true)))
    }

    /// The published reputation ([`Record::score`], [`crate::reputation`]) of `peer`, with
    /// `latency` its decode seconds per layer as this gateway measured them and `reference`
    /// the median of those over the model's nodes (speed factor 1 while either is unknown).
    pub fn score(&self, peer: &PeerId, latency: Option<f64>, reference: Option<f64>) -> f64 {
        if self.is_convicted(peer) {
            return 0.0;
        }
        let record = Record {
            latency: latency.unwrap_or(0.0),
            doubted: self.is_doubted(peer),
            ..self.records.get(peer).copied().unwrap_or_default()
        };
        record.score(reference.unwrap_or(0.0))
    }

    pub fn record(&self, peer: &PeerId) -> Record {
        self.records.get(peer).copied().unwrap_or_default()
    }

    fn entry(&mut self, peer: PeerId) -> &mut Record {
        if self.records.len() >= MAX_RECORDS && !self.records.contains_key(&peer) {
            // Forget the record with the least history.
            if let Some(victim) = self
                .records
                .iter()
                .min_by_key(|(_, r)| r.calls.saturating_add(r.audits_passed))
                .map(|(p, _)| *p)
            {
                self.records.remove(&victim);
            }
        }
        self.records.entry(peer).or_default()
    }

    pub fn on_call(&mut self, peer: PeerId, answered: bool) {
        self.changes.records += 1;
        let r = self.entry(peer);
        r.calls += 1;
        r.answered += u64::from(answered);
    }

    pub fn on_audit(&mut self, peer: PeerId, passed: bool) {
        self.changes.records += 1;
        let r = self.entry(peer);
        if passed {
            r.audits_passed += 1;
        } else {
            r.audits_missed += 1;
        }
    }

    pub fn convict(&mut self, peer: PeerId) {
        self.changes.records += 1;
        self.changes.verdicts += 1;
        if self.convicted.insert(peer) {
            if self.order.len() >= MAX_CONVICTIONS {
                if let Some(oldest) = self.order.pop_front() {
                    self.convicted.remove(&oldest);
                }
            }
            self.order.push_back(peer);
        }
        self.entry(peer).convicted = true;
        // What it reported of others as a checker is no longer evidence.
        self.ties.forget(&peer);
        self.doubted.retain(|(p, _)| *p != peer);
    }

    /// Records one cross-build comparison of `peer`'s answer to a call (a sampled token when
    /// `token`, else activation rows), `missed` when the referees confirmed it outside the
    /// band; whether its record now convicts it (a binomial tail under 1e-6 at the honest rate
    /// of that kind of answer). Auditors are recorded as well as providers, so an honest
    /// auditor's lost disputes are weighed against all the calls it compared.
    pub fn on_cross_check(&mut self, peer: PeerId, token: bool, missed: bool) -> bool {
        if self.band.len() >= MAX_RECORDS && !self.band.contains_key(&(peer, token)) {
            // Forget the least suspicious record: fewest misses, then least history.
            if let Some(victim) = self
                .band
                .iter()
                .min_by_key(|(_, r)| (r.misses, r.comparisons))
                .map(|(k, _)| *k)
            {
                self.band.remove(&victim);
                self.doubted.remove(&victim);
            }
        }
        self.changes.records += 1;
        let r = self.band.entry((peer, token)).or_default();
        r.record(missed);
        let rate = band_rate(token);
        let was = self.doubted.contains(&(peer, token));
        let doubts = r.doubts(rate, was) && !self.convicted.contains(&peer);
        let convicts = missed && r.convicts(rate);
        if doubts {
            self.doubted.insert((peer, token));
        } else {
            self.doubted.remove(&(peer, token));
        }
        if doubts != was {
            self.changes.verdicts += 1;
        }
        convicts
    }

    /// Records a token of `provider`'s that `checker`'s draw (another build's) judged the same
    /// or a near tie (`check`, one token); whether `provider`'s near ties now convict it
    /// ([`plexus_verify::ties`]). Undecided tokens are not observations.
    pub fn on_token_tie(&mut self, provider: PeerId, checker: PeerId, check: &CrossCheck) -> bool {
        if check.undecided > 0 || check.missed > 0 {
            return false;
        }
        self.changes.records += 1;
        self.ties.record(
            provider,
            checker,
            check.near_ties > 0,
            check.wide_near_ties > 0,
        )
    }

    /// `peer`'s near ties as a last stage across builds.
    pub fn tie_counts(&self, peer: &PeerId) -> TieCounts {
        self.ties.counts(peer)
    }

    /// `peer`'s cross-build record for tokens (`token`) or windows of rows.
    pub fn band_record(&self, peer: &PeerId, token: bool) -> MissRecord {
        self.band.get(&(*peer, token)).copied().unwrap_or_default()
    }

    pub fn set_stakes(&mut self, stakes: HashMap<Address, u64>) {
        self.stakes = stakes;
    }

    pub(crate) fn stakes_mut(&mut self) -> &mut HashMap<Address, u64> {
        &mut self.stakes
    }

    pub fn stake(&self, account: &Address) -> u64 {
        self.stakes.get(account).copied().unwrap_or(0)
    }

    /// How often the book changed since it was made (or read from disk).
    pub fn changes(&self) -> Changes {
        self.changes
    }

    /// What of the book outlives the process (everything but the stakes, which the ledger
    /// gives again).
    pub fn snapshot(&self) -> Snapshot {
        let peer = |p: &PeerId| p.to_string();
        Snapshot {
            format: Snapshot::FORMAT,
            convicted: self.order.iter().map(peer).collect(),
            records: self.records.iter().map(|(p, r)| (peer(p), *r)).collect(),
            band: self
                .band
                .iter()
                .map(|(&(p, token), r)| BandEntry {
                    peer: peer(&p),
                    token,
                    doubted: self.doubted.contains(&(p, token)),
                    record: *r,
                })
                .collect(),
            ties: self
                .ties
                .entries()
                .map(|(provider, checker, counts)| TieEntry {
                    provider: peer(&provider),
                    checker: peer(&checker),
                    counts,
                })
                .collect(),
        }
    }

    /// The book a [`Snapshot`] describes (no stakes), or what is wrong with it: another
    /// format, a peer id that does not parse, a peer listed twice, more entries than a book
    /// keeps, counts no gateway could have recorded, evidence of a convicted node still kept.
    pub fn restore(s: &Snapshot) -> Result<Self, String> {
        if s.format != Snapshot::FORMAT {
            return Err(format!(
                "format {}, this build reads format {}",
                s.format,
                Snapshot::FORMAT
            ));
        }
        let peer = |text: &str| -> Result<PeerId, String> {
            text.parse()
                .map_err(|e| format!("{text:?} is not a peer id: {e}"))
        };
        let at_most = |what: &str, n: usize, max: usize| {
            if n > max {
                Err(format!("{n} {what}, a book keeps at most {max}"))
            } else {
                Ok(())
            }
        };
        let counts = |what: &str, who: &str, ok: bool, values: &[u64]| {
            if ok && values.iter().all(|v| *v <= MAX_COUNT) {
                Ok(())
            } else {
                Err(format!(
                    "{what} of {who} are not counts a gateway records: {values:?}"
                ))
            }
        };
        at_most("convicted nodes", s.convicted.len(), MAX_CONVICTIONS)?;
        at_most("records", s.records.len(), MAX_RECORDS)?;
        at_most("band records", s.band.len(), MAX_RECORDS)?;
        let mut book = Self::default();
        for p in &s.convicted {
            let id = peer(p)?;
            if !book.convicted.insert(id) {
                return Err(format!("{p} is convicted twice"));
            }
            book.order.push_back(id);
        }
        for (p, r) in &s.records {
            let r = *r;
            counts(
                "the calls and audits",
                p,
                r.answered <= r.calls,
                &[r.calls, r.answered, r.audits_passed, r.audits_missed],
            )?;
            book.records.insert(peer(p)?, r);
        }
        for b in &s.band {
            let p = peer(&b.peer)?;
            let r = b.record;
            counts(
                "the cross-build comparisons",
                &b.peer,
                r.misses <= r.comparisons,
                &[r.comparisons, r.misses],
            )?;
            if book.band.insert((p, b.token), r).is_some() {
                return Err(format!(
                    "two band records of {} (token {})",
                    b.peer, b.token
                ));
            }
            if b.doubted && !book.convicted.contains(&p) {
                book.doubted.insert((p, b.token));
            }
        }
        let mut seen = BTreeSet::new();
        for t in &s.ties {
            let (provider, checker) = (peer(&t.provider)?, peer(&t.checker)?);
            let c = t.counts;
            counts(
                "the near ties",
                &t.provider,
                c.wide <= c.near_ties && c.near_ties <= c.tokens,
                &[c.tokens, c.near_ties, c.wide],
            )?;
            if book.convicted.contains(&provider) || book.convicted.contains(&checker) {
                return Err(format!(
                    "near ties of {} checked by {}, one of them convicted (a conviction drops them)",
                    t.provider, t.checker
                ));
            }
            if !seen.insert((provider, checker)) {
                return Err(format!(
                    "two near-tie records of {} checked by {}",
                    t.provider, t.checker
                ));
            }
            if !book.ties.restore(provider, checker, c) {
                return Err(format!(
                    "more near-tie records than a book keeps (at {} checked by {})",
                    t.provider, t.checker
                ));
            }
        }
        Ok(book)
    }
}

/// The part of an [`AuditBook`] that outlives the gateway process, as
/// [`super::book_file::BookFile`] keeps it (JSON): peers by their ids.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`Snapshot::FORMAT`].
    pub format: u32,
    /// Convicted peers, oldest first.
    pub convicted: Vec<String>,
    pub records: BTreeMap<String, Record>,
    pub band: Vec<BandEntry>,
    pub ties: Vec<TieEntry>,
}

impl Snapshot {
    pub const FORMAT: u32 = 1;
}

/// One node's cross-build record for one kind of answer (`token`: sampled tokens, else
/// windows of rows), and whether it doubts the node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BandEntry {
    pub peer: String,
    pub token: bool,
    pub doubted: bool,
    #[serde(flatten)]
    pub record: MissRecord,
}

/// A last stage's tokens compared across builds by one checker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TieEntry {
    pub provider: String,
    pub checker: String,
    #[serde(flatten)]
    pub counts: TieCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn cross_build_misses_convict_only_when_improbable_for_an_honest_node() {
        let p = peers(3);
        let mut book = AuditBook::default();
        // An honest node of another build: a long run of calls with a few confirmed misses.
        for call in 0..800 {
            assert!(!book.on_cross_check(p[0], false, call % 200 == 0));
        }
        assert_eq!(book.band_record(&p[0], false).comparisons, 800);
        assert_eq!(book.band_record(&p[0], false).misses, 4);
        // Marginal misses on every call: three in a row are not enough at 1% (tail 1e-6), four are.
        for _ in 0..3 {
            assert!(!book.on_cross_check(p[1], false, true));
        }
        assert!(book.on_cross_check(p[1], false, true));
        // Tokens (near ties admitted) at 5%: 4 in a row are not enough, 5 are.
        for _ in 0..4 {
            assert!(!book.on_cross_check(p[2], true, true));
        }
        assert!(book.on_cross_check(p[2], true, true));
        // An agreeing call never convicts, whatever the record holds.
        assert!(!book.on_cross_check(p[2], true, false));
    }

    #[test]
    fn confirmed_misses_doubt_a_node_until_a_clean_run_clears_it_and_disputes_alone_never() {
        let p = peers(3);
        let mut book = AuditBook::default();
        // An honest node of another build (1 confirmed miss in 200) is never doubted.
        for call in 0..800 {
            book.on_cross_check(p[0], false, call % 200 == 0);
            assert!(book.doubted().is_empty(), "call {call}");
        }
        // Two confirmed misses in three calls: doubted, not convicted.
        book.on_cross_check(p[1], false, true);
        assert!(book.doubted().is_empty(), "one miss");
        book.on_cross_check(p[1], false, false);
        assert!(!book.on_cross_check(p[1], false, true));
        assert_eq!(book.doubted(), vec![p[1]]);
        assert!(!book.is_convicted(&p[1]));
        // It stays doubted through a short clean run (hysteresis), and is cleared by a long one.
        for _ in 0..10 {
            book.on_cross_check(p[1], false, false);
        }
        assert_eq!(book.doubted(), vec![p[1]]);
        for _ in 0..200 {
            book.on_cross_check(p[1], false, false);
        }
        assert!(book.doubted().is_empty());
        // Failed audits (all an inconclusive dispute records, `apply`) are not confirmed
        // misses: no doubt.
        for _ in 0..20 {
            book.on_audit(p[2], false);
        }
        assert!(book.doubted().is_empty());
        // Tokens (5% honest rate): three misses in three doubt a node. Once convicted it
        // is excluded, not doubted.
        for _ in 0..3 {
            book.on_cross_check(p[2], true, true);
        }
        assert_eq!(book.doubted(), vec![p[2]]);
        book.convict(p[2]);
        assert!(book.doubted().is_empty());
        book.on_cross_check(p[2], true, true);
        assert!(book.doubted().is_empty());
    }

    #[test]
    fn the_book_convicts_scores_and_stays_bounded() {
        let p = peers(2);
        let mut book = AuditBook::default();
        assert!((book.score(&p[0], None, None) - 0.5).abs() < 1e-9);
        for _ in 0..8 {
            book.on_audit(p[0], true);
            book.on_call(p[0], true);
        }
        assert!(book.score(&p[0], None, None) > 0.8);
        book.on_audit(p[1], false);
        assert!(book.score(&p[1], None, None) < book.score(&p[0], None, None));
        book.convict(p[1]);
        assert!(book.is_convicted(&p[1]));
        assert_eq!(book.score(&p[1], None, None), 0.0);
        for _ in 0..MAX_RECORDS + 10 {
            book.on_call(PeerId::random(), true);
        }
        assert!(book.records.len() <= MAX_RECORDS);
    }

    /// Convictions are kept up to [`MAX_CONVICTIONS`], the oldest forgotten first; the
    /// announced verdicts are the latest.
    #[test]
    fn convictions_are_bounded_and_the_oldest_go_first() {
        let mut book = AuditBook::default();
        let first = PeerId::random();
        book.convict(first);
        book.convict(first);
        let p = peers(MAX_CONVICTIONS);
        for q in &p {
            book.convict(*q);
        }
        assert!(!book.is_convicted(&first));
        assert!(p.iter().all(|q| book.is_convicted(q)));
        let limit = plexus_core::announce::limits::MAX_VERDICTS;
        assert_eq!(book.verdicts(), p[p.len() - limit..].to_vec());
        let back = AuditBook::restore(&book.snapshot()).unwrap();
        assert_eq!(back.verdicts(), book.verdicts());
        assert!(!back.is_convicted(&first) && back.is_convicted(&p[0]));
    }
}
