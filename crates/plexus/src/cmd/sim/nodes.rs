//! The simulated population: who serves which span, how, and what happened to it.

use plexus_ledger::Address;
use plexus_verify::reputation::Record;

/// The two spans of the simulated chain: layers `0..SPLIT` and `SPLIT..num_layers`.
pub const SPLIT: usize = 15;

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Honest,
    /// Last stage: emits random tokens without computing.
    RandomTokens,
    /// Serves its span from another model (`--substitute-model`, default: this one in Q4_0).
    Substitute,
    /// First stage: computes only the first half of its layers.
    SkipLayers,
    /// Last stage: stops after half the tokens with a made-up EOS.
    Truncation,
    /// Last stage: returns the tokens of the previous job it served, computing nothing.
    Copy,
    /// Serves honestly; as an auditor returns a fabricated fingerprint without computing.
    LazyAuditor,
    /// Last stage: emits random tokens; its partner auditor covers for it.
    Colluder,
    /// Serves and audits honestly, except that it vouches for its partner [`Kind::Colluder`].
    ColludingAuditor,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Honest => "honest",
            Kind::RandomTokens => "random_tokens",
            Kind::Substitute => "substitute_model",
            Kind::SkipLayers => "skip_layers",
            Kind::Truncation => "truncation",
            Kind::Copy => "copy",
            Kind::LazyAuditor => "lazy_auditor",
            Kind::Colluder => "collusion",
            Kind::ColludingAuditor => "colluding_auditor",
        }
    }

    /// Whether it cheats as a provider.
    pub fn cheats_providing(self) -> bool {
        !matches!(
            self,
            Kind::Honest | Kind::LazyAuditor | Kind::ColludingAuditor
        )
    }

    /// Whether it is in its span's auditor pool.
    pub fn audits(self) -> bool {
        matches!(
            self,
            Kind::Honest | Kind::LazyAuditor | Kind::ColludingAuditor
        )
    }

    /// Whether it is reported as a cheater (honest ones must never be slashed).
    pub fn is_cheater(self) -> bool {
        self != Kind::Honest
    }
}

/// One simulated node.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub span: usize,
    pub threads: usize,
    pub chunk: usize,
    pub scalar: bool,
    pub addr: Address,
    pub record: Record,
    pub excluded: bool,
    /// Jobs served as a provider.
    pub jobs: u64,
    /// Jobs (and, for auditor kinds, audits) it cheated on.
    pub cheated: u64,
    /// Audits it performed (as auditor or referee).
    pub audits_done: u64,
    /// Times its own work was audited (first audits, not referee replays).
    pub audited: u64,
    /// Its own job (or audit, for a lazy auditor) count when it was convicted.
    pub caught_at: Option<u64>,
    pub slashed: bool,
    /// What its compute cost it, micro-PLX.
    pub cost: u64,
    /// The output of the last job it served (what a copier returns).
    pub last_tokens: Vec<u32>,
}

fn addr(i: usize) -> Address {
    let mut a = [0u8; 20];
    a[0] = 0xaa;
    a[12..20].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    Address::from(a)
}

/// The population: honest nodes with different thread counts, prefill chunkings and kernel
/// backends on both spans, and one node of each cheating kind.
pub fn population() -> Vec<Node> {
    let spec: [(&str, Kind, usize, usize, usize, bool); 14] = [
        ("honest-a1", Kind::Honest, 0, 1, 8, false),
        ("honest-a2", Kind::Honest, 0, 2, 64, false),
        ("honest-a3", Kind::Honest, 0, 2, 16, true),
        ("substitute-a", Kind::Substitute, 0, 2, 64, false),
        ("skip-layers-a", Kind::SkipLayers, 0, 2, 64, false),
        ("lazy-auditor-a", Kind::LazyAuditor, 0, 2, 64, false),
        ("honest-b1", Kind::Honest, 1, 1, 32, false),
        ("honest-b2", Kind::Honest, 1, 2, 64, false),
        ("honest-b3", Kind::Honest, 1, 2, 5, true),
        ("random-b", Kind::RandomTokens, 1, 2, 64, false),
        ("truncation-b", Kind::Truncation, 1, 2, 64, false),
        ("copy-b", Kind::Copy, 1, 2, 64, false),
        ("colluder-b", Kind::Colluder, 1, 2, 64, false),
        (
            "colluding-auditor-b",
            Kind::ColludingAuditor,
            1,
            2,
            64,
            false,
        ),
    ];
    spec.iter()
        .enumerate()
        .map(|(i, &(name, kind, span, threads, chunk, scalar))| Node {
            name: name.into(),
            kind,
            span,
            threads,
            chunk,
            scalar,
            addr: addr(i),
            record: Record::default(),
            excluded: false,
            jobs: 0,
            cheated: 0,
            audits_done: 0,
            audited: 0,
            caught_at: None,
            slashed: false,
            cost: 0,
            last_tokens: Vec::new(),
        })
        .collect()
}
