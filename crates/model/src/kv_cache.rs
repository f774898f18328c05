//! Per-layer key/value caches for one sequence, preallocated and grown by doubling, with
//! truncation so a session can roll back (failover replay, speculative steps).

use candle_core::{Result, Tensor};

/// K and V of one layer: `[1, kv_heads, capacity, head_dim]`, the first `len` rows valid.
#[derive(Clone, Debug, Default)]
struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

/// The cache of one sequence for the layers of one stage.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    /// Hard limit: the model's context length.
    max_len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
            max_len,
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

    /// Forgets everything after the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held by the cache's buffers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Appends `k`, `v` (`[1, kv_heads, new, head_dim]`) for `layer` at the current length and
    /// returns views of all cached keys and values including them. Call for every layer, then
    /// [`KvCache::advance`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let total = self.len + new;
        let slot = &mut self.layers[layer];
        let k = store(&mut slot.k, k, self.len, total)?;
        let v = store(&mut slot.v, v, self.len, total)?;
        Ok((k, v))
    }

    /// Marks `new` positions as written in every layer.
    pub fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

fn store(buf: &mut Option<Tensor>, src: &Tensor, at: usize, total: usize) -> Result<Tensor> {
    let capacity = buf.as_ref().map_or(0, |b| b.dim(2).unwrap_or(0));
    if total > capacity {
        let (b, h, _, d) = src.dims4()?;
        let new_cap = total.next_power_of_two().max(64);
        let grown = Tensor::zeros((b, h, new_cap, d), src.dtype(), src.device())?;
        if let Some(old) = buf.as_ref() {
            if at > 0 {
                grown.slice_set(&old.narrow(2, 0, at)?.contiguous()?, 2, 0)?;
            }
        }
        *buf = Some(grown);
    }
    let Some(b) = buf.as_ref() else {
        candle_core::bail!("kv buffer missing after allocation")
    };
    b.slice_set(&src.contiguous()?, 2, at)?;
    b.narrow(2, 0, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn append_grow_truncate() {
        let mut c = KvCache::new(1, 1000);
        let a = Tensor::ones((1, 2, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let (k, _) = c.append(0, &a, &a).unwrap();
        c.advance(3);
        assert_eq!(k.dims(), &[1, 2, 3, 4]);
        let big = Tensor::zeros((1, 2, 100, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let (k, _) = c.append(0, &big, &big).unwrap();
        c.advance(100);
        assert_eq!(k.dims(), &[1, 2, 103, 4]);
        let first: f32 = k
            .narrow(2, 0, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(first, 8.0, "old rows survive growth");
        c.truncate(2);
        assert_eq!(c.len(), 2);
        let (k, _) = c.append(0, &a, &a).unwrap();
        assert_eq!(k.dims(), &[1, 2, 5, 4]);
    }
}
