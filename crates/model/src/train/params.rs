//! Model parameters as one flat f32 vector with a named layout: the form the distributed
//! protocol works on (pseudo-gradients are `global - local` element by element, codecs see one
//! slice, hashes cover every byte in a fixed order).
//!
//! The layout lists tensors sorted by Hugging Face name; `values` holds them back to back in
//! that order. [`Params::digest`] hashes the layout (names and shapes) and the little-endian
//! bytes of the values, so equal digests mean bit-identical weights under the same names.

use super::TrainError;
use candle_core::{Device, Tensor};
use plexus_core::{Digest, Sha256Stream};
use std::collections::HashMap;
use std::sync::Arc;

/// Names and shapes of the tensors in a [`Params`], sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    entries: Vec<(String, Vec<usize>)>,
}

impl Layout {
    /// `(name, shape)` in storage order.
    pub fn entries(&self) -> &[(String, Vec<usize>)] {
        &self.entries
    }

    /// Total number of values.
    pub fn len(&self) -> usize {
        self.entries
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hash of the names and shapes.
    pub fn digest(&self) -> Digest {
        let mut h = Sha256Stream::new();
        self.hash_into(&mut h);
        h.finish()
    }

    fn hash_into(&self, h: &mut Sha256Stream) {
        h.update(b"plexus-layout-v1");
        h.update(&(self.entries.len() as u64).to_le_bytes());
        for (name, shape) in &self.entries {
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(&(shape.len() as u64).to_le_bytes());
            for d in shape {
                h.update(&(*d as u64).to_le_bytes());
            }
        }
    }
}

/// Weights as a flat vector under a [`Layout`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params {
    pub layout: Arc<Layout>,
    pub values: Vec<f32>,
}

impl Params {
    /// Flattens tensors by name (any float dtype is read as f32).
    pub fn from_tensors(map: &HashMap<String, Tensor>) -> Result<Self, TrainError> {
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        let mut values = Vec::with_capacity(map.values().map(|t| t.elem_count()).sum());
        for name in names {
            let t = &map[name];
            entries.push((name.clone(), t.dims().to_vec()));
            values.extend(
                t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(Self {
            layout: Arc::new(Layout { entries }),
            values,
        })
    }

    /// The tensors by name.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let mut out = HashMap::with_capacity(self.layout.entries.len());
        let mut off = 0;
        for (name, shape) in &self.layout.entries {
            let n: usize = shape.iter().product();
            let t = Tensor::from_slice(&self.values[off..off + n], shape.as_slice(), &Device::Cpu)?;
            out.insert(name.clone(), t);
            off += n;
        }
        Ok(out)
    }

    /// Sha256 of the layout and the little-endian bytes of every value.
    pub fn digest(&self) -> Digest {
        let mut h = Sha256Stream::new();
        self.layout.hash_into(&mut h);
        hash_f32s(&mut h, &self.values);
        h.finish()
    }
}

/// Feeds `values` as little-endian bytes to `h`.
pub fn hash_f32s(h: &mut Sha256Stream, values: &[f32]) {
    let mut buf = Vec::with_capacity(4096 * 4);
    for chunk in values.chunks(4096) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        h.update(&buf);
    }
}

/// Feeds `n` zero f32s to `h`, as [`hash_f32s`] would feed `n` zeros (without holding them).
pub fn hash_zero_f32s(h: &mut Sha256Stream, n: usize) {
    let zeros = [0.0f32; 4096];
    for start in (0..n).step_by(zeros.len()) {
        hash_f32s(h, &zeros[..(n - start).min(zeros.len())]);
    }
}

/// Sha256 of `n` zero f32s as [`digest_f32s`] gives it, without holding them.
pub fn digest_zero_f32s(tag: &[u8], n: usize) -> Digest {
    let mut h = Sha256Stream::new();
    h.update(tag);
    h.update(&(n as u64).to_le_bytes());
    hash_zero_f32s(&mut h, n);
    h.finish()
}

/// Sha256 of a vector of f32 (little-endian bytes), with a domain tag.
pub fn digest_f32s(tag: &[u8], values: &[f32]) -> Digest {
    let mut h = Sha256Stream::new();
    h.update(tag);
    h.update(&(values.len() as u64).to_le_bytes());
    hash_f32s(&mut h, values);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hashes_every_bit() {
        let mut m = HashMap::new();
        m.insert(
            "b".to_string(),
            Tensor::from_vec(vec![1f32, 2., 3., 4.], (2, 2), &Device::Cpu).unwrap(),
        );
        m.insert(
            "a".to_string(),
            Tensor::from_vec(vec![5f32], 1, &Device::Cpu).unwrap(),
        );
        let p = Params::from_tensors(&m).unwrap();
        assert_eq!(p.values, vec![5., 1., 2., 3., 4.]);
        assert_eq!(p.layout.len(), 5);
        let back = Params::from_tensors(&p.to_tensors().unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.digest(), p.digest());
        let mut q = p.clone();
        q.values[3] = f32::from_bits(q.values[3].to_bits() ^ 1);
        assert_ne!(q.digest(), p.digest());
    }
}
