//! Proof-of-Sampling audits of stage calls, run by the chain driver (the gateway).
//!
//! ```text
//! provider answers call 1 with a signed receipt (commitment = digest of the fingerprint of
//! its output rows, and of its sampled token)          ── the provider has committed
//!   └─ draw: HMAC(gateway key, request, commitment) < p ?   (p from price and stake, PoSP)
//!        no  ─▶ Unaudited (nothing more for this provider in this generation)
//!        yes ─▶ pick an auditor serving the same span (not the provider): one on the
//!               provider's build when there is one (exact comparison), else one of another
//!               build (comparison within the published band)
//!               Shadowed: call 1, then every later call of the provider, is also sent to the
//!               auditor under a session of its own (ordinary stage calls: the auditor is not
//!               told the provider's commitment, the provider sees nothing)
//!                 answers agree ─▶ pass (the answer goes on down the chain)
//!                 differ ─▶ Dispute: k referees (same span, neither party; on the provider's
//!                          build for an exact dispute, any build across builds) each get one
//!                          replay of everything the provider was fed (an ordinary failover
//!                          replay); their answers vote (plexus_verify::arbitration)
//!                     provider cheated ─▶ on one build: convicted (excluded from routing,
//!                          slashed, its work in this generation unpaid); across builds: the
//!                          same for a gross miss, else the miss recorded, convicted once
//!                          improbable for an honest node;
//!                          either way the call fails over (the text stays the honest one)
//!                     false accusation ─▶ the same for the auditor; the answer goes on
//!                     inconclusive ─▶ nobody slashed; the call fails over
//! ```
//!
//! Comparisons on one build are exact: the engine gives the same bits whatever the thread
//! count, chunking, batching and SIMD kernels, so an honest recomputation has the same
//! commitment and one mismatch is conclusive. Builds whose arithmetic differs (a node announces
//! its build as `version`) give honest answers a few % apart, so across builds each window of
//! activation rows (the sketch fingerprint of the rows the gateway received) must sit inside
//! `plexus_verify::compare::Tolerance::PUBLISHED` and a sampled token must be equal or a near tie
//! under the checker's draw (the auditor and referees of another build report their top
//! log-probabilities: [`checker_call`], `plexus_verify::near_tie`). A miss the referees
//! confirm far outside the band (`CrossCheck::gross`) is conclusive; a marginal one is
//! one observation per call, and only a binomial tail under 1e-6 at the measured honest rate
//! convicts (Gonka's rule; [`AuditBook::on_cross_check`]). Without cross-build audits a node
//! could escape every audit by announcing a build nobody else runs.
//! For activations the gateway recomputes the commitment from the rows it received (a node
//! cannot commit to something other than what it sent); a last stage's commitment covers the
//! logits it sampled from, which only a recomputation can check.
//!
//! The pure parts (draw, pair check, votes, dispute) take time and keys as arguments and are
//! unit-tested here; the network calls are [`crate::client`]'s transport, in `impl NetTransport`
//! at the end of this file.

pub mod book;
pub mod book_file;

pub use book::AuditBook;
pub use book_file::{BookFile, BookFileError};

use crate::chain::Transport as _;
use crate::client::NetTransport;
use crate::directory::Directory;
use plexus_core::receipt::Receipt;
use plexus_core::sampling::MAX_TOP_LOGPROBS;
use plexus_core::wire::{Activations, Forward, Request, Response, SessionId};
use plexus_core::Digest;
use plexus_ledger::Address;
use plexus_net::{CallError, PeerId};
use plexus_verify::arbitration::{ArbitrationError, Case, State, Verdict, Vote};
use plexus_verify::commitment::{call_commitment, call_fingerprint};
use plexus_verify::compare::{Answer, CrossCheck};
use plexus_verify::draw::DrawKey;
use plexus_verify::near_tie::TokenDraw;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use tracing::{info, warn};

/// What a dispute's referees said, beside the verdict: whether any was heard, and whether
/// every one found both answers acceptable (across builds, both within the band of its own:
/// then nobody is blamed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard {
    Nobody,
    BothAccepted,
    Votes,
}

/// A verdict for the ledger: `offender` is slashed, `challenger` paid its share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conviction {
    /// A cheating provider, or an auditor whose accusation the referees rejected.
    pub offender: Address,
    /// Who brought (or withstood) the accusation.
    pub challenger: Address,
    /// Referees who backed the losing side (their recomputation reproduced a computation the
    /// majority did not): slashed too.
    pub colluders: Vec<Address>,
}

/// How a gateway audits.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// Audit probability for every provider (tests, demos); `None`: per provider by
    /// [`plexus_verify::draw::network_probability`] from its price and stake.
    pub probability: Option<f64>,
    /// Share of auditors assumed to collude with a cheater, in `[0, 1)`.
    pub collusion: f64,
    /// Referees of a dispute (odd; fewer when fewer nodes can serve).
    pub referees: usize,
    /// The gateway's secret draw key.
    pub key: DrawKey,
    /// The least time a drawn auditor has for its first call (the replay of everything the
    /// provider was fed, often a whole prompt, and for a node that loads the span only to
    /// check it, the load): bounded by the provider's own time alone, a cheater answering at
    /// once would leave an honest auditor too little and escape its audit.
    pub first_check_wait: std::time::Duration,
}

impl AuditConfig {
    /// Defaults: PoSP probability, collusion share 0.1, 3 referees, a fresh random key.
    pub fn new() -> Self {
        let mut secret = [0u8; 32];
        if getrandom::fill(&mut secret).is_err() {
            // No system randomness: at least not a constant.
            secret = Digest::of(
                format!("{:?}{}", std::time::Instant::now(), std::process::id()).as_bytes(),
            )
            .0;
        }
        Self {
            probability: None,
            collusion: 0.1,
            referees: 3,
            key: DrawKey::new(secret),
            first_check_wait: FIRST_CHECK_WAIT,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// What the receipt of `answer` to a call of `positions` new positions from `position` must
/// commit to, as the caller can recompute it: for activations, the commitment of the rows it
/// received (the call's last `rows` positions); for a sampled token, the node's `claimed`
/// commitment as it is (it covers logits the caller never sees: an audit checks it).
pub fn expected_commitment(
    position: u32,
    positions: u32,
    answer: &Response,
    claimed: [u8; 32],
) -> [u8; 32] {
    match answer {
        Response::Hidden { hidden, .. } => call_commitment(
            hidden.cols as usize,
            first_row(position, positions, hidden),
            &hidden.to_f32(),
            &[],
        ),
        _ => claimed,
    }
}

/// The absolute position of the first row of `hidden`, the reply to a call of `positions` new
/// positions from `position` (a reply covers the call's last rows).
fn first_row(position: u32, positions: u32, hidden: &Activations) -> u64 {
    u64::from(position) + u64::from(positions.saturating_sub(hidden.rows))
}

/// The id of one provider's job in a generation (what the draw is keyed on with the
/// commitment).
pub fn job_id(session: SessionId, provider: &PeerId) -> [u8; 32] {
    let mut bytes = session.0.to_vec();
    bytes.extend_from_slice(&provider.to_bytes());
    Digest::of(&bytes).0
}

/// One party's answer to an audited call as the gateway saw it: the build the node announces,
/// the commitment its receipt carries, and what of the answer can be compared across builds.
#[derive(Clone, Debug)]
pub struct Seen {
    pub version: String,
    pub commitment: [u8; 32],
    pub answer: Option<Answer>,
}

impl Seen {
    /// `answer` (unwrapped from its receipt) to the call `f`, by a node announcing `version`,
    /// committed to `commitment`. A last stage's reported log-probabilities make its draw
    /// (used only when this node is the checker).
    pub fn of(version: &str, f: &Forward, answer: &Response, commitment: [u8; 32]) -> Self {
        let positions = f.tokens.len() as u32;
        let answer = match answer {
            Response::Hidden { hidden, .. } => call_fingerprint(
                hidden.cols as usize,
                first_row(f.position, positions, hidden),
                &hidden.to_f32(),
            )
            .map(Answer::Rows),
            Response::Token { token, .. } => Some(Answer::Token {
                token: *token,
                draw: None,
            }),
            Response::Scored {
                token, logprobs, ..
            } => Some(Answer::Token {
                token: *token,
                // A report about another token than the one returned is no draw.
                draw: f
                    .sampling
                    .as_deref()
                    .filter(|_| logprobs.token == *token)
                    .map(|params| {
                        let at = u64::from(f.position) + u64::from(positions);
                        TokenDraw::new(*token, logprobs.top.clone(), params, at)
                    }),
            }),
            _ => None,
        };
        Self {
            version: version.to_string(),
            commitment,
            answer,
        }
    }

    /// Whether the two answers come from nodes announcing different builds.
    pub fn cross_build(&self, other: &Seen) -> bool {
        self.version != other.version
    }
}

/// How an answer compares with a checker's answer `b` to the same call across builds (`None`
/// on one build, where only the commitments count, or when either answer cannot be compared).
pub fn cross_check(a: &Seen, b: &Seen) -> Option<CrossCheck> {
    if !a.cross_build(b) {
        return None;
    }
    Some(a.answer.as_ref()?.cross_check(b.answer.as_ref()?))
}

/// Whether an answer agrees with a checker's answer `b` to the same call: on one build the
/// commitments are equal (the engine is bit-exact), across builds every window of rows is
/// inside the published band and a sampled token is the same or a near tie under the
/// checker's draw.
pub fn agree(a: &Seen, b: &Seen) -> bool {
    if a.cross_build(b) {
        cross_check(a, b).is_some_and(|c| c.agrees())
    } else {
        a.commitment == b.commitment
    }
}

/// The outcome of comparing the provider's answer to a call with the auditor's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairCheck {
    Pass,
    Dispute,
    /// The auditor gave no accepted answer: the audit is abandoned (nobody is blamed).
    AuditorLost,
}

pub fn check_pair(provider: &Seen, auditor: Option<&Seen>) -> PairCheck {
    match auditor {
        None => PairCheck::AuditorLost,
        Some(a) if agree(provider, a) => PairCheck::Pass,
        Some(_) => PairCheck::Dispute,
    }
}

/// A referee's vote from its recomputation (`None`: it did not answer, or, across builds, its
/// rows are within the band of both parties' rows: no vote). A token the referee's draw admits
/// is a vote for the provider even when the auditor's token is admitted too: the dispute asks
/// whether the provider's token is one an honest node could draw, and the auditor (whose own
/// report opened it) must not be able to fail an answer every referee accepts.
pub fn vote(referee: Option<&Seen>, provider: &Seen, auditor: &Seen) -> Option<Vote> {
    let r = referee?;
    let token = matches!(provider.answer, Some(Answer::Token { .. }));
    match (agree(provider, r), agree(auditor, r)) {
        (true, false) => Some(Vote::Provider),
        (false, true) => Some(Vote::Accuser),
        (false, false) => Some(Vote::Neither),
        (true, true) if token => Some(Vote::Provider),
        (true, true) => None,
    }
}

/// What the referees' `answers` say beside their votes ([`Heard`]).
pub fn heard(answers: &[(PeerId, Option<Seen>)], provider: &Seen, auditor: &Seen) -> Heard {
    if answers.iter().all(|(_, a)| a.is_none()) {
        Heard::Nobody
    } else if answers
        .iter()
        .all(|(_, a)| a.is_some() && vote(a.as_ref(), provider, auditor).is_none())
    {
        Heard::BothAccepted
    } else {
        Heard::Votes
    }
}

/// Default [`AuditConfig::first_check_wait`].
pub const FIRST_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Milliseconds referees have to answer.
pub const REFEREE_TIMEOUT_MS: u64 = 120_000;

/// Decides a dispute from the referees' recomputations (`answers`: each referee's answer,
/// `None` when it gave none), at `now` (ms) with the answers in; referees that did not answer
/// abstain, and a strict majority of all of them is still needed.
pub fn arbitrate(
    job: [u8; 32],
    provider: PeerId,
    auditor: PeerId,
    provider_answer: &Seen,
    auditor_answer: &Seen,
    answers: &[(PeerId, Option<Seen>)],
    now: u64,
) -> Result<Verdict<PeerId>, ArbitrationError> {
    let referees: Vec<PeerId> = answers.iter().map(|(p, _)| *p).collect();
    let mut case = Case::open(job, provider, auditor, referees, now, REFEREE_TIMEOUT_MS)?;
    for (referee, answer) in answers {
        if let Some(v) = vote(answer.as_ref(), provider_answer, auditor_answer) {
            if case.vote(*referee, v)?.is_some() {
                break;
            }
        }
    }
    // Missing votes abstain: the deadline is what ends the case now.
    case.tick(now.saturating_add(REFEREE_TIMEOUT_MS));
    Ok(match case.state() {
        State::Decided(v) => v.clone(),
        State::AwaitingReferees { .. } => Verdict::Inconclusive,
    })
}

/// Up to `n` of `candidates`, in an order the gateway's key makes unpredictable to nodes (so
/// a provider cannot arrange for its accomplice to audit it), odd when `odd` (a referee panel).
pub fn pick(
    key: &DrawKey,
    job: &[u8; 32],
    candidates: &[PeerId],
    n: usize,
    odd: bool,
) -> Vec<PeerId> {
    let mut order: Vec<(u64, PeerId)> = candidates
        .iter()
        .map(|p| {
            let mut msg = job.to_vec();
            msg.extend_from_slice(&p.to_bytes());
            (
                (key.uniform_for(b"plexus/pick/v1", &msg) * 2f64.powi(53)) as u64,
                *p,
            )
        })
        .collect();
    order.sort();
    order.dedup_by_key(|(_, p)| *p);
    let mut out: Vec<PeerId> = order.into_iter().take(n).map(|(_, p)| p).collect();
    if odd && out.len().is_multiple_of(2) {
        out.pop();
    }
    out
}

/// Everything one provider was fed in a generation, in calls: what a referee replays.
#[derive(Clone, Debug, Default)]
pub struct CallLog {
    tokens: Vec<u32>,
    hidden: Vec<Activations>,
    chunks: Vec<u32>,
}

impl CallLog {
    /// What a forked session holds before its first call: `tokens`, fed as one call, with the
    /// activations that entered the stage (`None` for a first stage).
    pub fn shared(tokens: &[u32], hidden: Option<Activations>) -> Self {
        Self {
            tokens: tokens.to_vec(),
            hidden: hidden.into_iter().collect(),
            chunks: vec![tokens.len() as u32],
        }
    }

    pub fn positions(&self) -> usize {
        self.tokens.len()
    }

    pub fn push(&mut self, f: &Forward) {
        self.tokens.extend_from_slice(&f.tokens);
        self.hidden.extend(f.hidden.clone());
        self.chunks
            .extend(f.chunk_sizes().into_iter().map(|c| c as u32));
    }

    /// One call replaying the whole log for a fresh `session`, like a failover replay: its
    /// answer covers the final chunk, i.e. the positions of `last` (the disputed call).
    pub fn replay(&self, last: &Forward, session: SessionId) -> Forward {
        Forward {
            session,
            position: 0,
            tokens: self.tokens.clone(),
            hidden: Activations::concat(&self.hidden),
            chunks: self.chunks.clone(),
            // As the call replayed asked: a failover replay feeding another replacement wants
            // every row, and the provider's answer then covers them all.
            all_rows: last.all_rows,
            ..last.clone()
        }
    }
}

/// Where the audit of one provider stands in a generation.
#[derive(Debug)]
enum HopAudit {
    /// Not drawn, no auditor available, or finished.
    Unaudited,
    /// Every call goes to the auditor too.
    Shadowed {
        auditor: PeerId,
        session: SessionId,
        /// Positions the auditor's session holds.
        position: u32,
        log: CallLog,
        /// The auditor announces another build than the provider.
        cross_build: bool,
    },
}

/// The audits of one generation (one chain), kept by its transport.
#[derive(Debug, Default)]
pub struct ChainAudits {
    hops: HashMap<PeerId, HopAudit>,
    /// A forked chain's stages already hold the shared prompt when their job starts: what each
    /// was fed for it, so that a drawn auditor gets those positions too (its session starts
    /// empty) and the provider cannot tell an audit from a fork.
    shared: HashMap<PeerId, CallLog>,
}

impl ChainAudits {
    /// The audits of a chain forked after `shared` positions (one log per stage).
    pub fn forked(shared: HashMap<PeerId, CallLog>) -> Self {
        Self {
            hops: HashMap::new(),
            shared,
        }
    }
}

/// The ledger account of a peer, from its announced public key.
pub fn account_of(dir: &Directory, peer: &PeerId) -> Option<Address> {
    dir.get(peer)
        .and_then(|a| libp2p_identity::PublicKey::try_decode_protobuf(&a.public_key).ok())
        .and_then(|k| plexus_ledger::address_of(&k))
}

/// The peers offering `model` (on build `version` when given, none of `not`) whose offer
/// `fits`.
fn offering(
    dir: &Directory,
    model: &Digest,
    version: Option<&str>,
    not: &[PeerId],
    fits: impl Fn(&plexus_core::announce::ModelOffer) -> bool,
) -> Vec<PeerId> {
    dir.offers(model)
        .into_iter()
        .filter(|(p, a, o)| fits(o) && version.is_none_or(|v| a.version == v) && !not.contains(p))
        .map(|(p, _, _)| p)
        .collect()
}

/// Who may check `start..end`: the nodes serving that span that `ok` accepts; when there are
/// fewer than `wanted` of them, nodes that load other spans to check them
/// (`ModelOffer::check_layers`) and can hold this one as well (so a span with a single
/// server, or whose other servers were convicted, is audited too).
fn checkers(
    dir: &Directory,
    model: &Digest,
    (start, end): (u32, u32),
    version: Option<&str>,
    not: &[PeerId],
    ok: impl Fn(&PeerId) -> bool,
    wanted: usize,
) -> Vec<PeerId> {
    let serves = |o: &plexus_core::announce::ModelOffer| (o.start, o.end) == (start, end);
    let mut out = offering(dir, model, version, not, serves);
    out.retain(&ok);
    if out.len() < wanted {
        let loads = |o: &plexus_core::announce::ModelOffer| {
            !serves(o) && o.check_layers >= end.saturating_sub(start)
        };
        for p in offering(dir, model, version, not, loads) {
            if ok(&p) && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The referees a dispute may ask ([`checkers`] of `version`), and whether they are of other
/// builds because no other node of `version` can check the span: a dispute on one build
/// (provider and auditor differ bit for bit) is then refereed within the band, rather than
/// left without a referee (which would cost a cheater nothing more than a miss).
pub fn referee_candidates(
    dir: &Directory,
    model: &Digest,
    span: (u32, u32),
    version: Option<&str>,
    not: &[PeerId],
    ok: impl Fn(&PeerId) -> bool,
    wanted: usize,
) -> (Vec<PeerId>, bool) {
    let same = checkers(dir, model, span, version, not, &ok, wanted);
    if !same.is_empty() || version.is_none() {
        return (same, false);
    }
    let any = checkers(dir, model, span, None, not, &ok, wanted);
    let fell_back = !any.is_empty();
    (any, fell_back)
}

/// Whether an answer is a sampled token (a last stage's) rather than activation rows.
fn is_token(answer: &Response) -> bool {
    matches!(answer, Response::Token { .. } | Response::Scored { .. })
}

/// The call a checker (auditor or referee) gets for `f`: the same call, and across builds a
/// last stage also reports its top log-probabilities, which make its draw for the near-tie
/// check ([`plexus_verify::near_tie`]; they do not change the token or the commitment).
pub fn checker_call(mut f: Forward, cross_build: bool) -> Forward {
    if cross_build {
        if let Some(params) = f.sampling.as_deref_mut() {
            params.logprobs = Some(MAX_TOP_LOGPROBS);
        }
    }
    f
}

/// What a provider's call came to after its audit.
pub(crate) type Audited = Result<Response, crate::chain::CallFailed>;

impl NetTransport {
    /// The call to send the auditor beside `f` to `peer`, when `peer` is shadowed and the
    /// auditor's session is where the provider's is.
    pub(crate) fn shadow_call(&self, peer: &PeerId, f: &Forward) -> Option<(PeerId, Forward)> {
        match self.audits.hops.get(peer)? {
            HopAudit::Shadowed {
                auditor,
                session,
                position,
                cross_build,
                ..
            } if *position == f.position && f.position > 0 => Some((
                *auditor,
                checker_call(
                    Forward {
                        session: *session,
                        ..f.clone()
                    },
                    *cross_build,
                ),
            )),
            _ => None,
        }
    }

    /// Audits the provider `peer`'s accepted answer to `f` (its receipt committed to
    /// `commitment`); `shadow` is the auditor's answer to the same call when it was sent
    /// alongside.
    pub(crate) fn audit(
        &mut self,
        peer: PeerId,
        f: &Forward,
        answer: Response,
        commitment: [u8; 32],
        shadow: Option<(PeerId, Forward, Result<Response, CallError>)>,
    ) -> Audited {
        if f.position == 0 {
            // A new session on this provider (the chain opened or replayed it): a new job.
            // Audits are per provider; a chain names each peer once.
            self.end_audit(&peer);
        }
        let shadowed = self
            .audits
            .hops
            .get(&peer)
            .map(|h| matches!(h, HopAudit::Shadowed { .. }));
        let shadow = match (shadowed, shadow) {
            (Some(true), Some(s)) => s,
            (Some(_), _) => {
                // Unaudited, or shadowed but the auditor's session went out of step.
                self.end_audit(&peer);
                self.audits.hops.insert(peer, HopAudit::Unaudited);
                return Ok(answer);
            }
            (None, _) => match self.draw(peer, f, commitment) {
                Some(s) => s,
                None => {
                    self.audits.hops.insert(peer, HopAudit::Unaudited);
                    return Ok(answer);
                }
            },
        };
        let (auditor, sent, reply) = shadow;
        let version = self.version_of(&peer);
        let provider_seen = Seen::of(&version, f, &answer, commitment);
        let auditor_seen = self.metered_seen(auditor, &sent, reply.ok());
        if let Some(HopAudit::Shadowed { log, position, .. }) = self.audits.hops.get_mut(&peer) {
            log.push(f);
            *position = f.position + f.tokens.len() as u32;
        }
        let m = &self.client.metrics;
        match check_pair(&provider_seen, auditor_seen.as_ref()) {
            PairCheck::Pass => {
                m.audit_calls_passed.fetch_add(1, Ordering::Relaxed);
                let mut book = self.client.book();
                book.on_audit(peer, true);
                if let Some(check) = auditor_seen
                    .as_ref()
                    .and_then(|a| cross_check(&provider_seen, a))
                {
                    m.audit_band_comparisons.fetch_add(1, Ordering::Relaxed);
                    m.audit_token_near_ties
                        .fetch_add(check.near_ties, Ordering::Relaxed);
                    m.audit_token_wide_near_ties
                        .fetch_add(check.wide_near_ties, Ordering::Relaxed);
                    m.audit_token_undecided
                        .fetch_add(check.undecided, Ordering::Relaxed);
                    let token = is_token(&answer);
                    book.on_cross_check(peer, token, false);
                    book.on_cross_check(auditor, token, false);
                    if token && book.on_token_tie(peer, auditor, &check) {
                        let counts = book.tie_counts(&peer);
                        drop(book);
                        warn!(%peer, tokens = counts.tokens, near_ties = counts.near_ties, wide = counts.wide, "cross-build audits: this last stage's near ties are improbable for an honest node");
                        m.audit_near_tie_convictions.fetch_add(1, Ordering::Relaxed);
                        self.convict(peer, auditor, &[]);
                        self.end_audit(&peer);
                        self.audits.hops.insert(peer, HopAudit::Unaudited);
                        return Err(crate::chain::CallFailed {
                            retryable: true,
                            message: format!(
                                "{peer} picks among near ties more than an honest node would"
                            ),
                        });
                    }
                }
                Ok(answer)
            }
            PairCheck::AuditorLost => {
                warn!(%peer, %auditor, "the auditor did not answer; audit abandoned");
                self.client.book().on_call(auditor, false);
                self.end_audit(&peer);
                self.audits.hops.insert(peer, HopAudit::Unaudited);
                Ok(answer)
            }
            PairCheck::Dispute => {
                m.audit_disputes.fetch_add(1, Ordering::Relaxed);
                let Some(auditor_seen) = auditor_seen else {
                    return Ok(answer); // unreachable: a dispute has the auditor's answer
                };
                let (verdict, heard) =
                    self.dispute(peer, auditor, f, &provider_seen, &auditor_seen);
                self.end_audit(&peer);
                self.audits.hops.insert(peer, HopAudit::Unaudited);
                if provider_seen.cross_build(&auditor_seen) {
                    let check = cross_check(&provider_seen, &auditor_seen)
                        .unwrap_or(CrossCheck::INCOMPARABLE);
                    self.apply_cross_build(verdict, heard, peer, auditor, (f, &sent), check, answer)
                } else {
                    self.apply(verdict, heard, peer, auditor, answer)
                }
            }
        }
    }

    /// Draws whether to audit `peer`'s job; when drawn and an auditor exists, sends it the
    /// first call and returns its answer.
    fn draw(
        &mut self,
        peer: PeerId,
        f: &Forward,
        commitment: [u8; 32],
    ) -> Option<(PeerId, Forward, Result<Response, CallError>)> {
        let dir = self.client.directory();
        let announcement = dir.get(&peer)?;
        let config = &self.client.config.audit;
        // Audited when the keyed uniform falls under p (`DrawKey::audits`); p is the set one,
        // or PoSP's from price and stake, `cross_build_probability` of it when no auditor
        // shares the provider's build. The directory is searched for auditors only when the
        // uniform falls under the larger of the two (most jobs are not drawn).
        let job = job_id(f.session, &peer);
        let u = config.key.uniform(&job, &commitment);
        let (p, p_cross) = match config.probability {
            Some(p) => (p, p),
            None => {
                let stake = account_of(&dir, &peer).map_or(0, |a| self.client.book().stake(&a));
                let p = plexus_verify::draw::network_probability(
                    announcement.price,
                    stake,
                    config.collusion,
                );
                (p, plexus_verify::draw::cross_build_probability(p))
            }
        };
        if u >= p.max(p_cross) {
            return None;
        }
        // An auditor on the provider's build compares exactly (one mismatch is conclusive);
        // without one, a node of another build compares within the published band, so a
        // provider cannot escape audits by announcing a build nobody else runs.
        let book = self.client.book();
        let eligible = |version: Option<&str>| -> Vec<PeerId> {
            checkers(
                &dir,
                &f.model,
                (f.start, f.end),
                version,
                &[peer],
                |p| !book.is_convicted(p),
                1,
            )
        };
        let mut candidates = eligible(Some(&announcement.version));
        let cross_build = candidates.is_empty();
        if cross_build {
            candidates = eligible(None);
        }
        drop(book);
        let p = if cross_build { p_cross } else { p };
        if u >= p {
            return None;
        }
        // The auditor's fresh session must be fed everything the provider holds before `f`:
        // known only from position 0, or for a forked session's shared positions. A job whose
        // first accepted call comes later (an earlier answer was not receipted) cannot be
        // replayed faithfully and is not audited (an auditor fed `f` alone would commit to
        // other positions, and referees replaying the same log would convict an honest node).
        let log = match self.audits.shared.get(&peer) {
            _ if f.position == 0 => CallLog::default(),
            Some(shared) if f.position as usize == shared.positions() => shared.clone(),
            _ => return None,
        };
        let m = &self.client.metrics;
        m.audits.fetch_add(1, Ordering::Relaxed);
        let Some(&auditor) = pick(&config.key, &job, &candidates, 1, false).first() else {
            m.audits_unavailable.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if cross_build {
            m.audits_cross_build.fetch_add(1, Ordering::Relaxed);
        }
        let session = SessionId(crate::client::rand_session());
        // A forked session's job starts with positions the provider holds from the fork: the
        // auditor's fresh session is fed them with the first call, as one replay.
        let sent = if f.position == 0 {
            Forward {
                session,
                ..f.clone()
            }
        } else {
            let mut with = log.clone();
            with.push(f);
            with.replay(f, session)
        };
        let sent = checker_call(sent, cross_build);
        info!(provider = %peer, %auditor, "audit drawn: shadowing the provider's calls");
        // Bounded like every shadowed call, so a stalling auditor does not hold the stream; by
        // the provider's time scaled to the positions the auditor is fed (a forked chain's
        // auditor computes the shared prompt too).
        let scale = (sent.tokens.len() / f.tokens.len().max(1)).max(1) as u32;
        let limit = crate::client::auditor_grace(self.provider_took * scale)
            .max(self.client.config.audit.first_check_wait);
        let reply = self.send_within(auditor, sent.clone(), limit);
        self.audits.hops.insert(
            peer,
            HopAudit::Shadowed {
                auditor,
                session,
                position: 0,
                log,
                cross_build,
            },
        );
        Some((auditor, sent, reply))
    }

    /// One stage call, blocking, given up (as a timeout) after `limit`.
    fn send_within(
        &self,
        peer: PeerId,
        f: Forward,
        limit: std::time::Duration,
    ) -> Result<Response, CallError> {
        let client = &self.client;
        client.runtime.block_on(async {
            tokio::time::timeout(limit, client.handle.call(peer, Request::Forward(f)))
                .await
                .unwrap_or(Err(CallError::Timeout(peer)))
        })
    }

    /// The build `peer` announces (empty when unknown).
    fn version_of(&self, peer: &PeerId) -> String {
        self.client
            .directory()
            .get(peer)
            .map(|a| a.version.clone())
            .unwrap_or_default()
    }

    /// Meters an audit call's answer like any other (auditors and referees are paid for their
    /// work); the answer as seen, when its receipt was accepted.
    fn metered_seen(
        &mut self,
        peer: PeerId,
        sent: &Forward,
        reply: Option<Response>,
    ) -> Option<Seen> {
        let (price, version) = self
            .client
            .directory()
            .get(&peer)
            .map(|a| (a.price, a.version.clone()))?;
        let expected = Receipt::for_call(sent, price, Digest([0; 32]));
        let reply = reply?;
        if matches!(reply, Response::Error { .. }) {
            return None;
        }
        let (answer, commitment) = self.meter(peer, Some(expected), reply);
        Some(Seen::of(&version, sent, &answer, commitment?))
    }

    /// Sends every referee the replay of what `peer` was fed and decides the case.
    fn dispute(
        &mut self,
        peer: PeerId,
        auditor: PeerId,
        f: &Forward,
        provider_answer: &Seen,
        auditor_answer: &Seen,
    ) -> (Verdict<PeerId>, Heard) {
        let Some(HopAudit::Shadowed { log, .. }) = self.audits.hops.get(&peer) else {
            return (Verdict::Inconclusive, Heard::Nobody);
        };
        let log = log.clone();
        let dir = self.client.directory();
        let job = job_id(f.session, &peer);
        let book = self.client.book();
        // On one build, referees of that build (exact votes); across builds, any build.
        let version = (!provider_answer.cross_build(auditor_answer))
            .then_some(provider_answer.version.as_str());
        let wanted = self.client.config.audit.referees;
        let (candidates, fell_back) = referee_candidates(
            &dir,
            &f.model,
            (f.start, f.end),
            version,
            &[peer, auditor],
            |p| !book.is_convicted(p),
            wanted,
        );
        drop(book);
        let referees = pick(
            &self.client.config.audit.key,
            &job,
            &candidates,
            self.client.config.audit.referees,
            true,
        );
        warn!(provider = %peer, %auditor, referees = referees.len(), "audit mismatch: asking referees");
        if referees.is_empty() {
            return (Verdict::Inconclusive, Heard::Nobody);
        }
        // Referees of another build report what the near-tie check needs, and vote within
        // the band (`vote` compares across builds by the answers' versions).
        let cross_build = provider_answer.cross_build(auditor_answer) || fell_back;
        let calls: Vec<(PeerId, Forward)> = referees
            .iter()
            .map(|r| {
                let replay = log.replay(f, SessionId(crate::client::rand_session()));
                (*r, checker_call(replay, cross_build))
            })
            .collect();
        // All referees at once.
        let client = self.client.clone();
        let pending: Vec<_> = calls
            .iter()
            .map(|(r, c)| {
                let (handle, r, c) = (client.handle.clone(), *r, c.clone());
                client
                    .runtime
                    .spawn(async move { handle.call(r, Request::Forward(c)).await })
            })
            .collect();
        let replies: Vec<Option<Response>> = pending
            .into_iter()
            .map(|h| client.runtime.block_on(h).ok().and_then(Result::ok))
            .collect();
        let mut answers = Vec::new();
        for ((referee, sent), reply) in calls.iter().zip(replies) {
            let seen = self.metered_seen(*referee, sent, reply);
            if seen.is_none() {
                // A referee that did not answer (or not with an answer it is paid for) is
                // recorded like any call it failed.
                self.client.book().on_call(*referee, false);
            }
            answers.push((*referee, seen));
            self.close(*referee, sent.session);
        }
        let heard = heard(&answers, provider_answer, auditor_answer);
        let now = crate::discovery::now_ms();
        let verdict = arbitrate(
            job,
            peer,
            auditor,
            provider_answer,
            auditor_answer,
            &answers,
            now,
        )
        .unwrap_or(Verdict::Inconclusive);
        (verdict, heard)
    }

    /// Acts on a verdict: convictions for the ledger and routing, and what the chain gets.
    fn apply(
        &mut self,
        verdict: Verdict<PeerId>,
        heard: Heard,
        provider: PeerId,
        auditor: PeerId,
        answer: Response,
    ) -> Audited {
        let failed = |message: String| crate::chain::CallFailed {
            retryable: true,
            message,
        };
        match verdict {
            Verdict::ProviderCheated { colluders, .. } => {
                self.convict(provider, auditor, &colluders);
                Err(failed(format!(
                    "{provider} was convicted by audit (its output differs from the honest recomputation)"
                )))
            }
            Verdict::FalseAccusation { colluders, .. } => {
                self.convict(auditor, provider, &colluders);
                self.client.book().on_audit(provider, true);
                Ok(answer)
            }
            // Every referee answered and found both answers within the band of its own (across
            // builds): the provider's answer is one an honest node gives; nobody is blamed.
            Verdict::Inconclusive if heard == Heard::BothAccepted => {
                let mut book = self.client.book();
                book.on_audit(provider, true);
                book.on_audit(auditor, true);
                Ok(answer)
            }
            // No referee heard, or no majority: a miss for both sides (on one build one of them
            // is wrong, and nobody could say which), and the call fails over.
            Verdict::Inconclusive => {
                let mut book = self.client.book();
                book.on_audit(provider, false);
                book.on_audit(auditor, false);
                drop(book);
                Err(failed(format!(
                    "{provider}'s output is disputed and no referee majority decided"
                )))
            }
        }
    }

    /// Acts on the verdict of a dispute between nodes of different builds, whose honest answers
    /// differ a little. The side the referees found outside the band is convicted at once when
    /// the difference is gross ([`CrossCheck::gross`]: far beyond what honest builds differ
    /// by, as conclusive as an exact mismatch on one build); a marginal miss proves nothing
    /// alone (Gonka's rule) and is recorded, convicting only once the node's record is
    /// improbable for an honest one ([`AuditBook::on_cross_check`]; the other side is recorded
    /// as agreeing). Referees are never slashed for a vote across builds. An answer the
    /// referees reject is not used (the call fails over), so the client's text stays the
    /// majority's.
    #[allow(clippy::too_many_arguments)]
    fn apply_cross_build(
        &mut self,
        verdict: Verdict<PeerId>,
        heard: Heard,
        provider: PeerId,
        auditor: PeerId,
        (provider_call, auditor_call): (&Forward, &Forward),
        check: CrossCheck,
        answer: Response,
    ) -> Audited {
        let failed = |message: String| crate::chain::CallFailed {
            retryable: true,
            message,
        };
        let (off, fine) = match &verdict {
            Verdict::ProviderCheated { .. } => (provider, auditor),
            Verdict::FalseAccusation { .. } => (auditor, provider),
            Verdict::Inconclusive => return self.apply(verdict, heard, provider, auditor, answer),
        };
        let token = is_token(&answer);
        let m = &self.client.metrics;
        m.audit_band_comparisons.fetch_add(1, Ordering::Relaxed);
        m.audit_band_misses.fetch_add(1, Ordering::Relaxed);
        let convicts = {
            let mut book = self.client.book();
            book.on_audit(off, false);
            book.on_audit(fine, true);
            book.on_cross_check(fine, token, false);
            book.on_cross_check(off, token, true) || check.gross()
        };
        warn!(%off, windows_outside = check.missed, of = check.compared, worst = check.worst, convicts, "cross-build audit: the referees found this node outside the band");
        if convicts {
            self.convict(off, fine, &[]);
        } else {
            // Not proof of cheating, but not an answer the client is charged for either.
            let call = if off == provider {
                provider_call
            } else {
                auditor_call
            };
            self.unpay(off, call);
        }
        if off == provider {
            Err(failed(format!(
                "{provider}'s output is outside the band of the other builds' recomputations"
            )))
        } else {
            Ok(answer)
        }
    }

    /// Convicts `offender`: never routed to again, its work in this generation unpaid, and a
    /// [`Conviction`] for the ledger (with the colluding referees).
    fn convict(&mut self, offender: PeerId, challenger: PeerId, colluders: &[PeerId]) {
        warn!(%offender, %challenger, "convicted by audit: excluded and slashed");
        self.client
            .metrics
            .audit_convictions
            .fetch_add(1, Ordering::Relaxed);
        {
            let mut book = self.client.book();
            book.convict(offender);
            colluders.iter().for_each(|c| book.convict(*c));
        }
        let dir = self.client.directory();
        let (Some(off), Some(ch)) = (account_of(&dir, &offender), account_of(&dir, &challenger))
        else {
            warn!(%offender, "no ledger account to slash");
            return;
        };
        self.usage.providers.retain(|(a, _), _| *a != off);
        self.usage.convictions.push(Conviction {
            offender: off,
            challenger: ch,
            colluders: colluders
                .iter()
                .filter_map(|c| account_of(&dir, c))
                .collect(),
        });
    }

    /// Takes `peer`'s rejected answer to its call `f` out of what the generation pays it (at
    /// the price it announces, which its receipt was checked against).
    fn unpay(&mut self, peer: PeerId, f: &Forward) {
        let dir = self.client.directory();
        let (Some(account), Some(price)) =
            (account_of(&dir, &peer), dir.get(&peer).map(|a| a.price))
        else {
            return;
        };
        let work = Receipt::for_call(f, price, Digest([0; 32])).work();
        if self.usage.unrecord(account, price, work) {
            self.usage.refused += 1;
            self.client
                .metrics
                .audit_unpaid_calls
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops auditing `peer` in this chain, closing the auditor's session.
    fn end_audit(&mut self, peer: &PeerId) {
        if let Some(HopAudit::Shadowed {
            auditor, session, ..
        }) = self.audits.hops.remove(peer)
        {
            self.close(auditor, session);
        }
    }

    /// Closes every auditor session of this chain (it ended).
    pub(crate) fn end_audits(&mut self) {
        let peers: Vec<PeerId> = self.audits.hops.keys().copied().collect();
        for p in peers {
            self.end_audit(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::wire::DType;
    use std::collections::BTreeSet;

    /// Admits to `dir` a fresh node serving `span` of `model` (of build `version`, if given),
    /// loading up to `check_layers` more to check others; its peer id.
    fn announce_span(
        dir: &mut Directory,
        model: Digest,
        version: Option<&str>,
        (start, end): (u32, u32),
        check_layers: u32,
    ) -> PeerId {
        use plexus_core::announce::ModelOffer;
        use plexus_core::keys::NodeKey;
        let key = NodeKey::generate();
        let mut a = crate::directory::tests::bare(&key, 1_000);
        if let Some(v) = version {
            a.version = v.into();
        }
        a.models.push(ModelOffer {
            model,
            name: "m".into(),
            num_layers: 30,
            start,
            end,
            hidden: 64,
            decode_s_per_layer: 1e-3,
            prefill_s_per_layer: 1e-4,
            layer_bytes: 1 << 20,
            kv_positions: 1000,
            kv_free_positions: 1000,
            check_layers,
        });
        dir.admit(&a.sign(&key).encode(), None, 1_000).unwrap();
        key.peer_id()
    }

    /// Issue 11: who checks a span. Its other servers first; nodes that load spans to check
    /// them when there are too few (a single server), counting only the ones `ok` accepts (a
    /// convicted other server does not leave the span unaudited); never a node that announces
    /// it checks nothing or fewer layers than the span has.
    #[test]
    fn a_span_is_checked_by_its_servers_then_by_nodes_that_load_it() {
        let model = Digest([3; 32]);
        let mut dir = Directory::default();
        let mut node = |start, end, check_layers| {
            announce_span(&mut dir, model, None, (start, end), check_layers)
        };
        let provider = node(0, 10, 30);
        let replica = node(0, 10, 30);
        let checker = node(10, 30, 30);
        let no_checks = node(10, 30, 0);
        let too_small = node(20, 30, 5);
        let span = (0, 10);
        let all = |_: &PeerId| true;
        let got = |ok: &dyn Fn(&PeerId) -> bool, wanted| {
            let mut v = checkers(&dir, &model, span, None, &[provider], ok, wanted);
            v.sort();
            v
        };
        assert_eq!(got(&all, 1), [replica]);
        let mut both = vec![replica, checker];
        both.sort();
        assert_eq!(got(&all, 2), both);
        let not_replica = |p: &PeerId| *p != replica;
        assert_eq!(got(&not_replica, 1), [checker]);
        assert!(!got(&all, 5).contains(&no_checks));
        assert!(!got(&all, 5).contains(&too_small));
    }

    /// A dispute on one build whose provider and auditor are the only nodes of that build
    /// able to check the span goes to referees of another build, not to none.
    #[test]
    fn a_dispute_with_no_referee_of_its_build_falls_back_to_other_builds() {
        let model = Digest([4; 32]);
        let mut dir = Directory::default();
        let node = |dir: &mut Directory, version: &str| {
            announce_span(dir, model, Some(version), (0, 10), 0)
        };
        let (provider, auditor) = (node(&mut dir, "a"), node(&mut dir, "a"));
        let other = node(&mut dir, "b");
        let all = |_: &PeerId| true;
        let pair = [provider, auditor];
        assert_eq!(
            referee_candidates(&dir, &model, (0, 10), Some("a"), &pair, all, 3),
            (vec![other], true)
        );
        // With a node of the build free to referee, only that build is asked.
        let same = node(&mut dir, "a");
        assert_eq!(
            referee_candidates(&dir, &model, (0, 10), Some("a"), &pair, all, 1),
            (vec![same], false)
        );
        // Across builds any build is asked anyway.
        let (any, fell_back) = referee_candidates(&dir, &model, (0, 10), None, &pair, all, 3);
        assert_eq!((any.len(), fell_back), (2, false));
    }

    /// An answer on build "v" committed to `c`.
    fn seen(c: [u8; 32]) -> Seen {
        Seen {
            version: "v".into(),
            commitment: c,
            answer: None,
        }
    }

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn pairs_pass_only_when_equal() {
        assert_eq!(
            check_pair(&seen([1; 32]), Some(&seen([1; 32]))),
            PairCheck::Pass
        );
        assert_eq!(
            check_pair(&seen([1; 32]), Some(&seen([2; 32]))),
            PairCheck::Dispute
        );
        assert_eq!(check_pair(&seen([1; 32]), None), PairCheck::AuditorLost);
    }

    /// Rows of a 64-wide hidden state for positions `first..first + n`, scaled by `1 + eps`
    /// in every other column (a relative difference of about `eps`).
    fn hidden_answer(version: &str, first: u32, n: usize, eps: f32) -> Seen {
        let rows: Vec<f32> = (0..n * 64)
            .map(|i| {
                let v = ((i as f32) * 0.37).sin() * 2.0;
                if i % 2 == 0 {
                    v * (1.0 + eps)
                } else {
                    v
                }
            })
            .collect();
        let answer = Response::Hidden {
            hidden: Activations::encode(&rows, n, 64, DType::F32),
            compute_us: 0,
        };
        let c = expected_commitment(first, n as u32, &answer, [0; 32]);
        Seen::of(version, &call(first, vec![0; n], 0), &answer, c)
    }

    #[test]
    fn across_builds_answers_agree_within_the_band_and_tokens_exactly() {
        let a = hidden_answer("1", 0, 70, 0.0);
        let slightly = hidden_answer("1+untiled", 0, 70, 0.01);
        let far = hidden_answer("1+untiled", 0, 70, 2.0);
        // On one build any difference is a dispute; across builds the band decides.
        assert!(!agree(&a, &hidden_answer("1", 0, 70, 0.01)));
        assert!(agree(&a, &slightly));
        assert_eq!(check_pair(&a, Some(&slightly)), PairCheck::Pass);
        assert_eq!(check_pair(&a, Some(&far)), PairCheck::Dispute);
        // 70 rows from position 0: windows 0, 1 and 2, every one outside, far beyond the
        // band (gross); 1% is inside it.
        let c = cross_check(&a, &far).unwrap();
        assert_eq!((c.compared, c.missed), (3, 3));
        assert!(c.gross(), "{c:?}");
        let c = cross_check(&a, &slightly).unwrap();
        assert_eq!((c.compared, c.missed), (3, 0));
        assert!(!c.gross() && c.worst < 1.0, "{c:?}");
        // A marginal miss: outside the 5% band, not gross.
        let c = cross_check(&a, &hidden_answer("2", 0, 70, 0.3)).unwrap();
        assert!(c.missed > 0 && !c.gross(), "{c:?}");
        assert_eq!(cross_check(&a, &hidden_answer("1", 0, 70, 0.5)), None);
        let greedy = |mut f: Forward| {
            f.sampling = Some(Box::new(plexus_core::sampling::SamplingParams::greedy()));
            f
        };
        let token = |version: &str, t: u32| {
            Seen::of(
                version,
                &greedy(call(5, vec![1], 1)),
                &Response::Token {
                    token: t,
                    compute_us: 0,
                },
                [t as u8; 32],
            )
        };
        assert!(agree(&token("1", 4), &token("2", 4)));
        assert!(!agree(&token("1", 4), &token("2", 5)));
        // A checker that reports its draw admits a near tie (greedy: within twice
        // NEAR_TIE_NATS of its top), not a token further down; a provider's own report
        // admits nothing.
        let scored = |version: &str, t: u32, top: Vec<(u32, f32)>| {
            Seen::of(
                version,
                &checker_call(greedy(call(5, vec![1], 1)), true),
                &Response::Scored {
                    token: t,
                    compute_us: 0,
                    logprobs: plexus_core::sampling::TokenLogprobs {
                        token: t,
                        logprob: top[0].1,
                        top,
                    },
                },
                [t as u8; 32],
            )
        };
        let checker = scored("2", 4, vec![(4, -0.6), (5, -0.8), (9, -3.0)]);
        assert!(agree(&token("1", 5), &checker));
        assert_eq!(cross_check(&token("1", 5), &checker).unwrap().near_ties, 1);
        assert!(!agree(&token("1", 9), &checker));
        assert!(!agree(&checker, &token("1", 5)));
        // A referee whose draw admits both tokens votes for the provider's.
        let referee = scored("3", 4, vec![(4, -0.6), (5, -0.7), (9, -3.0)]);
        assert_eq!(
            vote(Some(&referee), &token("1", 5), &checker),
            Some(Vote::Provider)
        );
        assert_eq!(
            vote(Some(&referee), &token("1", 9), &checker),
            Some(Vote::Accuser)
        );
        // Different kinds of answer never agree.
        assert!(!agree(&a, &token("2", 4)));
        // Referees across builds: a vote for the side within the band; none when both are.
        let referee = hidden_answer("1+untiled", 0, 70, 0.02);
        assert_eq!(vote(Some(&referee), &far, &a), Some(Vote::Accuser));
        assert_eq!(vote(Some(&referee), &a, &far), Some(Vote::Provider));
        assert_eq!(
            vote(Some(&hidden_answer("3", 0, 70, 6.0)), &a, &far),
            Some(Vote::Neither)
        );
        // (a referee on the build of one party compares exactly with that party)
        let third = hidden_answer("3", 0, 70, 0.02);
        assert_eq!(vote(Some(&third), &a, &slightly), None);
        assert_eq!(vote(Some(&referee), &a, &slightly), Some(Vote::Provider));
    }

    #[test]
    fn near_ties_convict_a_picking_last_stage_against_two_checkers() {
        let p = peers(4);
        let (same, tie, wide) = (
            CrossCheck {
                compared: 1,
                ..CrossCheck::default()
            },
            CrossCheck {
                compared: 1,
                near_ties: 1,
                ..CrossCheck::default()
            },
            CrossCheck {
                compared: 1,
                near_ties: 1,
                wide_near_ties: 1,
                ..CrossCheck::default()
            },
        );
        let mut book = AuditBook::default();
        // An honest last stage: one near tie in 12 tokens, one in 250 wide, three checkers.
        for t in 0..3000u32 {
            let check = match t {
                _ if t % 250 == 0 => &wide,
                _ if t % 12 == 0 => &tie,
                _ => &same,
            };
            assert!(!book.on_token_tie(p[0], p[1 + (t % 3) as usize], check));
        }
        assert_eq!(book.tie_counts(&p[0]).tokens, 3000);
        // Wide near ties seen by one checker only convict nobody; a second checker's do.
        for _ in 0..200 {
            assert!(!book.on_token_tie(p[3], p[1], &wide));
        }
        assert!((0..50).any(|_| book.on_token_tie(p[3], p[2], &wide)));
        // Misses and undecided tokens are judged elsewhere.
        let missed = CrossCheck {
            compared: 1,
            missed: 1,
            ..CrossCheck::default()
        };
        assert!(!book.on_token_tie(p[0], p[1], &missed));
        assert_eq!(book.tie_counts(&p[0]).tokens, 3000);
    }

    /// Across builds two answers may each sit within the band of a referee's and not of each
    /// other's: then the referees accept both (nobody is blamed); referees not heard at all
    /// teach nothing of either side.
    #[test]
    fn referees_that_accept_both_sides_or_are_not_heard_are_told_apart() {
        let p = peers(2);
        let referee = hidden_answer("r", 0, 70, 0.0);
        let e = (1..200)
            .map(|i| i as f32 * 0.005)
            .find(|&e| {
                let (a, b) = (hidden_answer("a", 0, 70, e), hidden_answer("b", 0, 70, -e));
                agree(&referee, &a) && agree(&referee, &b) && !agree(&a, &b)
            })
            .expect("two answers apart that a referee accepts both of");
        let (provider, auditor) = (hidden_answer("a", 0, 70, e), hidden_answer("b", 0, 70, -e));
        let both = [(p[0], Some(referee.clone())), (p[1], Some(referee.clone()))];
        assert_eq!(heard(&both, &provider, &auditor), Heard::BothAccepted);
        assert_eq!(
            heard(&[(p[0], None), (p[1], None)], &provider, &auditor),
            Heard::Nobody
        );
        assert_eq!(heard(&[], &provider, &auditor), Heard::Nobody);
        // One accepting both and one silent: no majority, and not every referee accepted.
        assert_eq!(
            heard(&[(p[0], Some(referee)), (p[1], None)], &provider, &auditor),
            Heard::Votes
        );
        // A referee far from both votes (neither).
        let far = hidden_answer("c", 0, 70, 2.0);
        assert_eq!(
            heard(&[(p[0], Some(far))], &provider, &auditor),
            Heard::Votes
        );
    }

    #[test]
    fn referees_decide_by_majority() {
        let p = peers(5);
        let (provider, auditor) = (p[0], p[1]);
        let (honest, cheat) = (seen([7u8; 32]), seen([9u8; 32]));
        // The provider cheated: two of three referees recompute the auditor's answer.
        let v = arbitrate(
            [0; 32],
            provider,
            auditor,
            &cheat,
            &honest,
            &[
                (p[2], Some(honest.clone())),
                (p[3], Some(cheat.clone())),
                (p[4], Some(honest.clone())),
            ],
            1_000,
        )
        .unwrap();
        assert_eq!(
            v,
            Verdict::ProviderCheated {
                provider,
                challenger: auditor,
                colluders: vec![p[3]]
            }
        );
        // A false accusation: the referees side with the provider.
        let v = arbitrate(
            [0; 32],
            provider,
            auditor,
            &honest,
            &cheat,
            &[(p[2], Some(honest.clone()))],
            1_000,
        )
        .unwrap();
        assert_eq!(
            v,
            Verdict::FalseAccusation {
                accuser: auditor,
                colluders: vec![]
            }
        );
        // Silent or third-answer referees: nobody is convicted.
        for answers in [
            vec![(p[2], None)],
            vec![(p[2], Some(seen([3; 32])))],
            vec![(p[2], None), (p[3], Some(honest.clone())), (p[4], None)],
        ] {
            let v = arbitrate([0; 32], provider, auditor, &cheat, &honest, &answers, 5).unwrap();
            assert_eq!(v, Verdict::Inconclusive, "{answers:?}");
        }
        // A panel must be odd and exclude the parties.
        assert!(arbitrate([0; 32], provider, auditor, &cheat, &honest, &[], 0).is_err());
        assert!(arbitrate(
            [0; 32],
            provider,
            auditor,
            &cheat,
            &honest,
            &[(provider, Some(cheat.clone()))],
            0
        )
        .is_err());
    }

    #[test]
    fn picks_are_keyed_bounded_and_odd() {
        let p = peers(6);
        let key = DrawKey::new([1; 32]);
        let a = pick(&key, &[2; 32], &p, 3, true);
        assert_eq!(a.len(), 3);
        assert_eq!(a, pick(&key, &[2; 32], &p, 3, true));
        assert!(a.iter().all(|x| p.contains(x)));
        assert_eq!(pick(&key, &[2; 32], &p[..2], 3, true).len(), 1);
        assert!(pick(&key, &[2; 32], &[], 3, true).is_empty());
        // Another job (or key) orders differently somewhere among many.
        let orders: BTreeSet<Vec<PeerId>> = (0..20u8)
            .map(|j| pick(&key, &[j; 32], &p, 6, false))
            .collect();
        assert!(orders.len() > 1);
    }

    fn call(position: u32, tokens: Vec<u32>, rows: usize) -> Forward {
        Forward {
            session: SessionId([1; 16]),
            model: Digest::of(b"m"),
            start: 3,
            end: 6,
            position,
            tokens,
            hidden: Some(Activations::encode(
                &vec![0.5; rows * 4],
                rows,
                4,
                DType::F32,
            )),
            chunks: vec![],
            sampling: None,
            reply_dtype: DType::F32,
            all_rows: false,
            prompt_len: 0,
        }
    }

    #[test]
    fn the_referee_replay_is_everything_fed_in_the_original_calls() {
        let mut log = CallLog::default();
        let mut first = call(0, vec![1, 2, 3], 3);
        first.chunks = vec![2, 1];
        let second = call(3, vec![4], 1);
        log.push(&first);
        log.push(&second);
        let r = log.replay(&second, SessionId([9; 16]));
        assert_eq!(r.position, 0);
        assert_eq!(r.tokens, vec![1, 2, 3, 4]);
        assert_eq!(r.chunks, vec![2, 1, 1]);
        assert_eq!(r.hidden.as_ref().map(|h| h.rows), Some(4));
        assert_eq!((r.start, r.end, r.session), (3, 6, SessionId([9; 16])));
        assert!(!r.all_rows);
    }

    #[test]
    fn expected_commitments_follow_the_rows_received() {
        let hidden = Activations::encode(
            &[0.25, -1.0, 2.0, 0.5, 1.0, 1.0, 3.0, -2.0],
            2,
            4,
            DType::F32,
        );
        let answer = Response::Hidden {
            hidden: hidden.clone(),
            compute_us: 0,
        };
        // A call of 5 positions from 10 whose reply covers its last 2: positions 13 and 14.
        let c = expected_commitment(10, 5, &answer, [0; 32]);
        assert_eq!(c, call_commitment(4, 13, &hidden.to_f32(), &[]));
        // Another window (the sketch sums a window's rows: windows, not positions within
        // one, are bound).
        assert_ne!(c, expected_commitment(40, 5, &answer, [0; 32]));
        let token = Response::Token {
            token: 3,
            compute_us: 0,
        };
        assert_eq!(expected_commitment(0, 1, &token, [5; 32]), [5; 32]);
    }
}
