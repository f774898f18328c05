//! Per-layer key/value caches for one sequence, in f16 (half the memory of f32, and the
//! precision llama.cpp's default cache keeps), laid out `[position][kv_head][head_dim]` so that
//! appending a token is a copy onto the end. Truncation lets a session roll back (failover
//! replay, speculative steps).

use half::f16;
use std::ops::Range;

/// K and V rows of one layer.
#[derive(Clone, Debug, Default)]
pub struct LayerKv {
    pub k: Vec<f16>,
    pub v: Vec<f16>,
}

/// The cache of one sequence for the layers of one stage.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// Values per position per layer: `kv_heads * head_dim`.
    row: usize,
    len: usize,
    /// Hard limit: the model's context length.
    max_len: usize,
    /// Positions the buffers may grow to ahead of need (a sequence's KV reservation), so
    /// capacity doubling never holds more than was reserved.
    grow_limit: usize,
    /// The latest prompt's positions (see [`KvCache::set_prompt`]).
    prompt: Range<usize>,
}

impl KvCache {
    pub fn new(num_layers: usize, row: usize, max_len: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
            row,
            len: 0,
            max_len,
            grow_limit: max_len,
            prompt: 0..0,
        }
    }

    /// Caps the capacity the buffers grow to ahead of need at `positions` (they still grow to
    /// whatever is appended), and gives back capacity beyond it (a cache taken over by a
    /// sequence with a smaller reservation).
    pub fn limit_growth(&mut self, positions: usize) {
        self.grow_limit = positions.min(self.max_len);
        let keep = self.grow_limit.max(self.len) * self.row;
        for l in &mut self.layers {
            l.k.shrink_to(keep);
            l.v.shrink_to(keep);
        }
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Declares the positions of the sequence's latest prompt, as it was fed to llama.cpp in
    /// one go: they pick the attention kernel of every position
    /// ([`crate::attention::kernel_at`]: the prompt's rows in ubatches of 64 or more take the
    /// tiled kernel, rows alone in their ubatch from position 256 the split-KV path). The
    /// kernel of every position written from now on follows it, whatever calls the positions
    /// arrive in, so a sequence gets the same bits fed in one call or in chunks, batched or
    /// alone, here or split across stages. Empty (the default): every position is a decode
    /// step. A declaration about positions, not about rows held: [`KvCache::truncate`] and
    /// [`KvCache::prefix`] keep it, so a sequence rolled back and fed again computes its
    /// positions with the same kernels.
    pub fn set_prompt(&mut self, prompt: Range<usize>) {
        self.prompt = prompt;
    }

    /// The positions declared by [`KvCache::set_prompt`].
    pub fn prompt(&self) -> Range<usize> {
        self.prompt.clone()
    }

    /// Forgets everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for l in &mut self.layers {
            l.k.truncate(self.len * self.row);
            l.v.truncate(self.len * self.row);
        }
    }

    /// A copy of the first `len` positions (at most what is held), its buffers sized to them:
    /// what a sequence sharing this one's prompt starts from.
    pub fn prefix(&self, len: usize) -> KvCache {
        let len = self.len.min(len);
        let n = len * self.row;
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerKv {
                    k: l.k[..n].to_vec(),
                    v: l.v[..n].to_vec(),
                })
                .collect(),
            row: self.row,
            len,
            max_len: self.max_len,
            grow_limit: self.grow_limit,
            prompt: self.prompt.clone(),
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes held by the cache's buffers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.capacity() + l.v.capacity()) * 2)
            .sum()
    }

    /// Appends the keys and values (`[new][kv_heads][head_dim]`, f32, rounded to f16) of
    /// `layer` after the current length and returns the layer's rows including them. Call for
    /// every layer, then [`KvCache::advance`].
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> &LayerKv {
        let slot = &mut self.layers[layer];
        slot.k.truncate(self.len * self.row);
        slot.v.truncate(self.len * self.row);
        let need = self.len * self.row + k.len().max(v.len());
        let limit = self.grow_limit * self.row;
        grow(&mut slot.k, need, limit);
        grow(&mut slot.v, need, limit);
        slot.k.extend(k.iter().map(|&x| f16::from_f32(x)));
        slot.v.extend(v.iter().map(|&x| f16::from_f32(x)));
        slot
    }

    /// Marks `new` positions as written in every layer.
    pub fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

/// Makes room for `need` values: double the capacity, but not past `limit`.
fn grow(v: &mut Vec<f16>, need: usize, limit: usize) {
    if v.capacity() < need {
        let target = need.max((v.capacity() * 2).min(limit));
        v.reserve_exact(target - v.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_advance_truncate() {
        let mut c = KvCache::new(2, 4, 100);
        for layer in 0..2 {
            let kv = c.append(layer, &[1.0; 12], &[2.0; 12]);
            assert_eq!(kv.k.len(), 12);
        }
        c.advance(3);
        assert_eq!(c.len(), 3);
        c.truncate(1);
        assert_eq!(c.len(), 1);
        let kv = c.append(0, &[3.0; 4], &[4.0; 4]);
        assert_eq!(kv.k.len(), 8);
        assert_eq!(kv.k[4].to_f32(), 3.0);
        assert!(c.allocated_bytes() >= 2 * 8 * 2);
    }

    #[test]
    fn growth_stops_at_the_limit() {
        let mut c = KvCache::new(1, 4, 1000);
        c.limit_growth(10);
        for _ in 0..10 {
            c.append(0, &[1.0; 4], &[1.0; 4]);
            c.advance(1);
        }
        // Exactly the 10 reserved positions (x 4 values x k and v x 2 bytes), no doubling slack.
        assert_eq!(c.allocated_bytes(), 10 * 4 * 2 * 2);
    }
}
