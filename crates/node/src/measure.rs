//! Measures this node's speed on its own stage (seconds per layer per token, decode and
//! prefill) for announcements and placement, and reads free memory.

use plexus_model::{Logits, Stage, StageInput};
use std::time::Instant;

/// Seconds per layer per token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speed {
    pub decode_s_per_layer: f64,
    pub prefill_s_per_layer: f64,
}

/// Runs a short prefill (a 64-position prompt, on the tiled attention kernel as llama.cpp
/// computes it) and 8 decode steps through `stage`; a model whose context holds fewer than
/// 72 positions (a small trained checkpoint) is measured on a prompt that leaves room for the
/// decode steps.
pub fn measure(stage: &Stage) -> Result<Speed, plexus_model::stage::ForwardError> {
    let hidden = stage.config().hidden_size;
    let layers = stage.span().len().max(1) as f64;
    let context = stage.config().max_position_embeddings.max(2);
    let steps = 8.min(context / 2);
    let prefill = 64.min(context - steps);
    let mut cache = stage.new_cache();
    cache.set_prompt(0..prefill);
    let input = |n: usize| -> Result<StageInput<'static>, plexus_model::stage::ForwardError> {
        if stage.is_first() {
            static TOKENS: [u32; 64] = [1; 64];
            Ok(StageInput::Tokens(&TOKENS[..n]))
        } else {
            let values: Vec<f32> = (0..n * hidden)
                .map(|i| ((i % 17) as f32 - 8.0) / 16.0)
                .collect();
            Ok(StageInput::Hidden(candle_core::Tensor::from_vec(
                values,
                (1, n, hidden),
                &candle_core::Device::Cpu,
            )?))
        }
    };
    let t = Instant::now();
    stage.forward(input(prefill)?, &mut cache, Logits::Last)?;
    let prefill_s = t.elapsed().as_secs_f64() / prefill as f64 / layers;
    let t = Instant::now();
    for _ in 0..steps {
        stage.forward(input(1)?, &mut cache, Logits::Last)?;
    }
    let decode_s = t.elapsed().as_secs_f64() / steps as f64 / layers;
    Ok(Speed {
        decode_s_per_layer: decode_s,
        prefill_s_per_layer: prefill_s,
    })
}

/// Bytes of memory available (`MemAvailable` of /proc/meminfo), if known.
pub fn free_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The default KV cache budget of an engine: half of the memory available at start (the rest
/// is for the weights' page cache and everything else), 4 GiB when it cannot be read.
pub fn default_kv_budget() -> u64 {
    free_memory().map_or(4 << 30, |m| m / 2)
}
