//! The engine side of an audit: recording what a stage computed during a job, and replaying it.
//!
//! - The provider (and the gateway, which relays every activation in Plexus' star topology)
//!   feeds each stage call's input and output to a [`Recorder`]: inputs are logged for replay,
//!   outputs go into the fingerprinters.
//! - An auditor holding the same span runs [`replay`]: the logged inputs in one teacher-forced
//!   pass (or its own chunking), `Logits::All` for a last stage, fingerprinting the same
//!   positions the provider covered, and returns its fingerprints and the logits a token check
//!   needs.
//!
//! Coverage: a stage that outputs hidden states covers every position; a last stage produces
//! logits only where it samples (the last prompt position, then each fed output token), so its
//! fingerprint covers positions `prompt_len - 1 ..`.

use crate::fingerprint::{Fingerprint, FingerprintError, Fingerprinter, Scheme};
use plexus_model::stage::ForwardError;
use plexus_model::{Logits, Stage, StageInput, StageOutput};

/// What a stage consumed over a job, in position order.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Tokens(Vec<u32>),
    /// Hidden-state rows `[positions, width]`.
    Hidden {
        rows: Vec<f32>,
        width: usize,
    },
}

impl Input {
    pub fn positions(&self) -> usize {
        match self {
            Input::Tokens(t) => t.len(),
            Input::Hidden { rows, width } => rows.len() / (*width).max(1),
        }
    }
}

/// Why recording or replaying failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the stage's forward pass failed")]
    Forward(#[from] ForwardError),
    #[error("tensor operation failed")]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    #[error("the input does not fit the stage: {0}")]
    Input(&'static str),
}

/// Records one stage's calls during a job.
#[derive(Debug)]
pub struct Recorder {
    input: Input,
    prints: Vec<Fingerprinter>,
    out_width: usize,
    position: u64,
    /// Stage output rows fingerprinted so far.
    pub rows: u64,
}

impl Recorder {
    /// A recorder for a stage whose output rows are `width` wide, for each scheme.
    pub fn new(
        first_stage: bool,
        in_width: usize,
        out_width: usize,
        schemes: &[Scheme],
    ) -> Result<Self, ReplayError> {
        let input = if first_stage {
            Input::Tokens(Vec::new())
        } else {
            Input::Hidden {
                rows: Vec::new(),
                width: in_width,
            }
        };
        let prints = schemes
            .iter()
            .map(|&s| Fingerprinter::new(s, out_width))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            input,
            prints,
            out_width,
            position: 0,
            rows: 0,
        })
    }

    /// Logs one call: its input (`tokens` or hidden `rows`) and output rows. For a last stage
    /// `output` holds one logits row (the call's last position); otherwise one row per input
    /// position.
    pub fn record(
        &mut self,
        tokens: Option<&[u32]>,
        hidden: Option<&[f32]>,
        output: &[f32],
    ) -> Result<(), ReplayError> {
        let n = match (&mut self.input, tokens, hidden) {
            (Input::Tokens(log), Some(t), None) => {
                log.extend_from_slice(t);
                t.len()
            }
            (Input::Hidden { rows, width }, None, Some(h)) => {
                rows.extend_from_slice(h);
                h.len() / (*width).max(1)
            }
            _ => {
                return Err(ReplayError::Input(
                    "tokens for a later stage or hidden states for the first",
                ))
            }
        };
        if n == 0 {
            return Err(ReplayError::Input("an empty call"));
        }
        let out_rows = output.len() / self.out_width;
        if out_rows > n || !output.len().is_multiple_of(self.out_width) {
            return Err(ReplayError::Input("output rows do not match the call"));
        }
        // One output row per position, or one (the last) for a last stage.
        let first = self.position + n as u64 - out_rows as u64;
        if out_rows > 0 {
            for p in &mut self.prints {
                p.push(first, output)?;
            }
        }
        self.rows += out_rows as u64;
        self.position += n as u64;
        Ok(())
    }

    /// The logged input and the fingerprints, one per scheme.
    pub fn finish(self) -> (Input, Vec<Fingerprint>) {
        (
            self.input,
            self.prints.into_iter().map(Fingerprinter::finish).collect(),
        )
    }
}

/// An auditor's recomputation of one stage.
#[derive(Clone, Debug)]
pub struct Replayed {
    /// One per scheme asked for.
    pub prints: Vec<Fingerprint>,
    /// A last stage's logits rows `[positions, vocab]` for every input position.
    pub logits: Option<Vec<f32>>,
    pub positions: usize,
}

/// Replays `stage` over `input` from position 0, `chunk` positions per call (the whole input
/// in one teacher-forced pass when `chunk >= positions`), for a generation whose prompt had
/// `prompt_len` tokens: every row takes the attention kernel the provider's did
/// (`plexus_model::attention::kernel_at` of the declared prompt), and a last stage's fingerprint
/// covers positions `prompt_len - 1..` (those that sampled a token).
pub fn replay(
    stage: &Stage,
    input: &Input,
    chunk: usize,
    schemes: &[Scheme],
    prompt_len: usize,
) -> Result<Replayed, ReplayError> {
    let positions = input.positions();
    if positions == 0 || chunk == 0 || prompt_len == 0 {
        return Err(ReplayError::Input("nothing to replay"));
    }
    let cover_from = prompt_len - 1;
    let mut cache = stage.new_cache();
    cache.set_prompt(0..prompt_len);
    let cfg = stage.config();
    let out_width = if stage.is_last() {
        cfg.vocab_size
    } else {
        cfg.hidden_size
    };
    let mut prints: Vec<Fingerprinter> = schemes
        .iter()
        .map(|&s| Fingerprinter::new(s, out_width))
        .collect::<Result<_, _>>()?;
    let mut logits = stage.is_last().then(Vec::new);
    let mut at = 0usize;
    while at < positions {
        let end = (at + chunk).min(positions);
        let out = match input {
            Input::Tokens(t) => {
                stage.forward(StageInput::Tokens(&t[at..end]), &mut cache, Logits::All)?
            }
            Input::Hidden { rows, width } => {
                let h = candle_core::Tensor::from_slice(
                    &rows[at * width..end * width],
                    (1, end - at, *width),
                    &candle_core::Device::Cpu,
                )?;
                stage.forward(StageInput::Hidden(h), &mut cache, Logits::All)?
            }
        };
        match out {
            StageOutput::Hidden(h) => {
                let rows: Vec<f32> = h.flatten_all()?.to_vec1()?;
                for p in &mut prints {
                    p.push(at as u64, &rows)?;
                }
            }
            StageOutput::Logits(l) => {
                let rows: Vec<f32> = l.flatten_all()?.to_vec1()?;
                let skip = cover_from.saturating_sub(at).min(end - at);
                for p in &mut prints {
                    p.push((at + skip) as u64, &rows[skip * out_width..])?;
                }
                if let Some(all) = &mut logits {
                    all.extend_from_slice(&rows);
                }
            }
        }
        at = end;
    }
    Ok(Replayed {
        prints: prints.into_iter().map(Fingerprinter::finish).collect(),
        logits,
        positions,
    })
}

/// How the last stage of [`run_chain`] picks tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LastStage {
    /// Computes its layers and samples with the request's params.
    Honest,
    /// Computes nothing and emits these tokens (made up, or copied from another job), with
    /// fabricated (all-zero) logits rows; past their end it emits EOS (`eos[0]`) and stops.
    Scripted(Vec<u32>),
    /// Computes honestly but, after `after` tokens, emits `eos` and stops (truncated work).
    Truncate { after: usize, eos: u32 },
}

/// What one job produced through a chain.
#[derive(Clone, Debug)]
pub struct ChainRun {
    pub tokens: Vec<u32>,
    /// Per stage: the logged input and its fingerprints (one per scheme).
    pub stages: Vec<(Input, Vec<Fingerprint>)>,
    /// Positions each stage computed (0 for a stage that computed nothing).
    pub computed: Vec<u64>,
}

/// Drives `stages` (in order, the last one with the head) for one job the way the gateway
/// drives a chain: prefill of `prompt` in `chunk`-position calls, then one call per token,
/// sampling with `params` (whose seed is the protocol seed) until `max_tokens` or an EOS in
/// `eos`; every stage call is recorded.
#[allow(clippy::too_many_arguments)]
pub fn run_chain(
    stages: &[&Stage],
    prompt: &[u32],
    max_tokens: usize,
    params: &plexus_model::SamplingParams,
    chunk: usize,
    schemes: &[Scheme],
    eos: &[u32],
    last: &LastStage,
) -> Result<ChainRun, ReplayError> {
    let Some(tail) = stages.last() else {
        return Err(ReplayError::Input("an empty chain"));
    };
    if !tail.is_last() || prompt.is_empty() || chunk == 0 {
        return Err(ReplayError::Input(
            "a chain needs a head, a prompt and a chunk size",
        ));
    }
    let cfg = tail.config();
    let (hidden, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let mut recorders: Vec<Recorder> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Recorder::new(
                i == 0,
                hidden,
                if s.is_last() { vocab } else { hidden },
                schemes,
            )
        })
        .collect::<Result<_, _>>()?;
    let mut caches: Vec<_> = stages
        .iter()
        .map(|s| {
            let mut c = s.new_cache();
            c.set_prompt(0..prompt.len());
            c
        })
        .collect();
    let mut computed = vec![0u64; stages.len()];
    let mut history: Vec<u32> = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut feed: Vec<u32> = prompt.to_vec();
    let zeros = vec![0f32; vocab];
    while tokens.len() < max_tokens {
        let mut logits_row: Option<Vec<f32>> = None;
        let pieces = feed.len().div_ceil(chunk);
        for (k, piece) in feed.chunks(chunk).enumerate() {
            // A last stage samples only from the final piece's logits, so only that row is
            // its output (and fingerprinted): the same rows whatever the chunking.
            let sampled = k + 1 == pieces;
            let mut x: Option<Vec<f32>> = None;
            for (i, stage) in stages.iter().enumerate() {
                let is_last = i + 1 == stages.len();
                let n = piece.len();
                if is_last && matches!(last, LastStage::Scripted(_)) {
                    let out: &[f32] = if sampled { &zeros } else { &[] };
                    recorders[i].record(None, x.as_deref(), out)?;
                    break;
                }
                let input = match &x {
                    None => StageInput::Tokens(piece),
                    Some(rows) => StageInput::Hidden(candle_core::Tensor::from_slice(
                        rows,
                        (1, n, hidden),
                        &candle_core::Device::Cpu,
                    )?),
                };
                let out = stage.forward(input, &mut caches[i], Logits::Last)?;
                computed[i] += n as u64;
                let rows: Vec<f32> = match out {
                    StageOutput::Hidden(h) | StageOutput::Logits(h) => {
                        h.flatten_all()?.to_vec1()?
                    }
                };
                let (tok, hid) = if i == 0 {
                    (Some(piece), None)
                } else {
                    (None, x.as_deref())
                };
                let out: &[f32] = if is_last && !sampled { &[] } else { &rows };
                recorders[i].record(tok, hid, out)?;
                if is_last {
                    logits_row = Some(rows);
                } else {
                    x = Some(rows);
                }
            }
        }
        let position = history.len() as u64;
        let token = match last {
            LastStage::Scripted(script) => match script.get(tokens.len()) {
                Some(&t) => t,
                None => eos.first().copied().unwrap_or(0),
            },
            LastStage::Truncate { after, eos } if tokens.len() >= *after => *eos,
            _ => {
                let row = logits_row
                    .as_deref()
                    .ok_or(ReplayError::Input("no logits"))?;
                plexus_model::sampler::sample(row, &history, params, position)
            }
        };
        tokens.push(token);
        history.push(token);
        if eos.contains(&token)
            || matches!(last, LastStage::Truncate { after, .. } if tokens.len() > *after)
        {
            break;
        }
        feed = vec![token];
    }
    let stages = recorders.into_iter().map(Recorder::finish).collect();
    Ok(ChainRun {
        tokens,
        stages,
        computed,
    })
}
