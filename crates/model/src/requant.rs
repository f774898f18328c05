//! Rewriting a GGUF model with its weight matrices in another quantization type: the same
//! weights at another precision (e.g. Q4_1 -> Q4_0 or Q8_0). Used to make the "substitute
//! model" a verifier must tell apart from the real one (`plexus models requantize`,
//! `plexus sim`), and for users who want a smaller or faster file.
//!
//! Every 2-D tensor whose rows are whole blocks of the target type is dequantized to f32 and
//! quantized again; vectors (norms, biases) and everything else are copied unchanged, and so is
//! all metadata. The output is GGUF v2, 32-byte aligned (what candle's writer produces).

use crate::gguf::{GgufError, GgufFile, Value};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// Why a model could not be requantized.
#[derive(Debug, thiserror::Error)]
pub enum RequantizeError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("cannot convert tensor {name}")]
    Tensor {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the GGUF file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
}

/// What [`requantize`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequantizeReport {
    pub converted: usize,
    pub copied: usize,
}

fn convert(v: &Value) -> gguf_file::Value {
    use gguf_file::Value as V;
    match v {
        Value::U8(x) => V::U8(*x),
        Value::I8(x) => V::I8(*x),
        Value::U16(x) => V::U16(*x),
        Value::I16(x) => V::I16(*x),
        Value::U32(x) => V::U32(*x),
        Value::I32(x) => V::I32(*x),
        Value::U64(x) => V::U64(*x),
        Value::I64(x) => V::I64(*x),
        Value::F32(x) => V::F32(*x),
        Value::F64(x) => V::F64(*x),
        Value::Bool(x) => V::Bool(*x),
        Value::String(x) => V::String(x.clone()),
        Value::Array(items) => V::Array(items.iter().map(convert).collect()),
    }
}

/// Writes `src` to `dst` with its matrices in `dtype`.
pub fn requantize(
    src: &Path,
    dst: &Path,
    dtype: GgmlDType,
) -> Result<RequantizeReport, RequantizeError> {
    let g = GgufFile::open(src)?;
    let mut report = RequantizeReport {
        converted: 0,
        copied: 0,
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(g.tensors.len());
    for (name, info) in &g.tensors {
        let q = g.tensor(name)?;
        let err = |source| RequantizeError::Tensor {
            name: name.clone(),
            source,
        };
        let matrix =
            info.shape.len() == 2 && info.shape[1] % dtype.block_size() == 0 && info.dtype != dtype;
        if matrix {
            let dense = q.dequantize(&Device::Cpu).map_err(err)?;
            tensors.push((name.clone(), QTensor::quantize(&dense, dtype).map_err(err)?));
            report.converted += 1;
        } else {
            tensors.push((name.clone(), q));
            report.copied += 1;
        }
    }
    let values: Vec<(String, gguf_file::Value)> = g
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), convert(v)))
        .collect();
    let meta: Vec<(&str, &gguf_file::Value)> =
        values.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let io = |source| RequantizeError::Io {
        path: dst.to_owned(),
        source,
    };
    let file = std::fs::File::create(dst).map_err(io)?;
    let mut w = std::io::BufWriter::new(file);
    gguf_file::write(&mut w, &meta, &refs).map_err(|source| RequantizeError::Write {
        path: dst.to_owned(),
        source,
    })?;
    use std::io::Write as _;
    w.flush().map_err(io)?;
    Ok(report)
}
