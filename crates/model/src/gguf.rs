//! GGUF (v2/v3) reading: a bounds-checked parser over a memory map, the model configuration from
//! its metadata, and tensors as candle `QTensor`s.
//!
//! - `GgufFile::open` maps the file and parses the header, metadata and tensor table; every
//!   length is checked against the bytes left, so a corrupt or hostile file yields a
//!   [`GgufError`], never a panic or a huge allocation.
//! - `GgufFile::tensor` copies one tensor out of the map into candle storage and tells the kernel
//!   it may drop those mapped pages, so peak memory stays near one copy of the weights.
//! - `GgufFile::model_config` turns `{arch}.*` metadata into a [`ModelConfig`].

use crate::config::{Architecture, ModelConfig, RopeLayout, RopeScaling};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;
use memmap2::{Mmap, UncheckedAdvice};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: GgmlDType,
    /// candle order (outermost first): `[rows, cols]` for a matrix.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub size_in_bytes: usize,
}

/// Why a GGUF file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("file is truncated or corrupt: {what} at byte {offset} runs past the end of the file")]
    Truncated { what: &'static str, offset: usize },
    #[error("corrupt GGUF: {0}")]
    Corrupt(String),
    #[error("tensor {name} has unsupported type {type_name} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)")]
    UnsupportedTensorType { name: String, type_name: String },
    #[error("tensor {0} is not in the file")]
    MissingTensor(String),
    #[error("metadata key {0} is missing or has the wrong type")]
    MissingKey(String),
    #[error("unknown architecture {0:?} (supported: llama, mistral, qwen2)")]
    UnknownArchitecture(String),
    #[error("invalid model configuration")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot build tensor {name}: {message}")]
    Tensor { name: String, message: String },
}

/// ggml type ids (ggml.h `enum ggml_type`) and their names.
fn ggml_type(id: u32) -> Result<GgmlDType, String> {
    Ok(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        other => {
            const NAMES: [&str; 40] = [
                "F32",
                "F16",
                "Q4_0",
                "Q4_1",
                "Q4_2",
                "Q4_3",
                "Q5_0",
                "Q5_1",
                "Q8_0",
                "Q8_1",
                "Q2_K",
                "Q3_K",
                "Q4_K",
                "Q5_K",
                "Q6_K",
                "Q8_K",
                "IQ2_XXS",
                "IQ2_XS",
                "IQ3_XXS",
                "IQ1_S",
                "IQ4_NL",
                "IQ3_S",
                "IQ2_S",
                "IQ4_XS",
                "I8",
                "I16",
                "I32",
                "I64",
                "F64",
                "IQ1_M",
                "BF16",
                "Q4_0_4_4",
                "Q4_0_4_8",
                "Q4_0_8_8",
                "TQ1_0",
                "TQ2_0",
                "IQ4_NL_4_4",
                "IQ4_NL_4_8",
                "IQ4_NL_8_8",
                "MXFP4",
            ];
            return Err(NAMES
                .get(other as usize)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("type id {other}")));
        }
    })
}

/// Short name of a candle ggml dtype, as llama.cpp prints it.
pub fn dtype_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(GgufError::Truncated {
                what,
                offset: self.pos,
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in the remaining bytes at `min_size` bytes per item.
    fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(GgufError::Truncated { what, offset: at });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let n = self.count(what, 1)?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        // Some real vocabularies carry invalid UTF-8 pieces; keep them lossily rather than fail.
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) if what == "array string" => Ok(String::from_utf8_lossy(bytes).into_owned()),
            Err(_) => Err(GgufError::Corrupt(format!(
                "{what} at byte {at} is not UTF-8"
            ))),
        }
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>("u8")?[0]),
            1 => Value::I8(self.array::<1>("i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(i32::from_le_bytes(self.array("i32")?)),
            6 => Value::F32(f32::from_le_bytes(self.array("f32")?)),
            7 => Value::Bool(self.array::<1>("bool")?[0] != 0),
            8 => Value::String(self.string(if depth > 0 { "array string" } else { "string" })?),
            9 => {
                if depth > 2 {
                    return Err(GgufError::Corrupt(
                        "metadata arrays nested too deeply".into(),
                    ));
                }
                let elem = self.u32("array type")?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = self.count("array length", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(i64::from_le_bytes(self.array("i64")?)),
            12 => Value::F64(f64::from_le_bytes(self.array("f64")?)),
            other => {
                return Err(GgufError::Corrupt(format!(
                    "unknown metadata value type {other} at byte {}",
                    self.pos
                )))
            }
        })
    }
}

/// An open, parsed GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl GgufFile {
    /// Maps and parses `path`. Cheap: tensor data is not touched.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file truncated underneath us by another process could
        // fault, the same contract every mmap-based model loader (llama.cpp, safetensors) has.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (version, metadata, tensors) = parse(&map)?;
        Ok(Self {
            path: path.to_owned(),
            map,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_size(&self) -> usize {
        self.map.len()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| GgufError::MissingKey(key.into()))
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The raw bytes of one tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor(name.into()))?;
        Ok(&self.map[info.offset..info.offset + info.size_in_bytes])
    }

    /// Copies one tensor into candle storage, then lets the kernel drop the mapped pages.
    pub fn tensor(&self, name: &str) -> Result<QTensor, GgufError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| GgufError::MissingTensor(name.into()))?;
        let bytes = self.tensor_bytes(name)?;
        let q = qtensor_from_ggml(info.dtype, bytes, info.shape.clone(), &Device::Cpu).map_err(
            |e| GgufError::Tensor {
                name: name.into(),
                message: e.to_string(),
            },
        )?;
        self.release(info.offset, info.size_in_bytes);
        Ok(q)
    }

    /// Reads an F32 vector tensor (norms, rope factors) whatever its stored float type.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self.tensor(name)?;
        t.dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| GgufError::Tensor {
                name: name.into(),
                message: e.to_string(),
            })
    }

    fn release(&self, offset: usize, len: usize) {
        const PAGE: usize = 4096;
        let start = offset.div_ceil(PAGE) * PAGE;
        let end = (offset + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the pages belong to a read-only private file mapping; DONTNEED only makes
            // later reads fault them in again from the file, it cannot change what they hold.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    /// The architecture named in `general.architecture`.
    pub fn architecture(&self) -> Result<(Architecture, &str), GgufError> {
        let name = self
            .get_str("general.architecture")
            .ok_or_else(|| GgufError::MissingKey("general.architecture".into()))?;
        let arch =
            Architecture::parse(name).ok_or_else(|| GgufError::UnknownArchitecture(name.into()))?;
        Ok((arch, name))
    }

    /// The model configuration from `{arch}.*` metadata and the tensor table.
    pub fn model_config(&self) -> Result<ModelConfig, GgufError> {
        let (architecture, arch) = self.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| self.get_u64(&key(k)).map(|v| v as usize);
        let f = |k: &str| self.get(&key(k)).and_then(Value::as_f64);
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let num_kv_heads = u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = u("attention.key_length")
            .or_else(|_| u("rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads.max(1));
        let embd = self
            .tensors
            .get("token_embd.weight")
            .ok_or_else(|| GgufError::MissingTensor("token_embd.weight".into()))?;
        let vocab_size = match self.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
            Some(tokens) => tokens.len(),
            None => embd.shape[0],
        };
        if embd.shape != [vocab_size, hidden_size] {
            return Err(GgufError::Corrupt(format!(
                "token_embd.weight has shape {:?}, expected [{vocab_size}, {hidden_size}]",
                embd.shape
            )));
        }
        let rope_scaling = if self.tensors.contains_key("rope_freqs.weight") {
            RopeScaling::Factors(self.tensor_f32("rope_freqs.weight")?)
        } else {
            RopeScaling::None
        };
        let eos = self.get_u64("tokenizer.ggml.eos_token_id").ok();
        let eot = self.get_u64("tokenizer.ggml.eot_token_id").ok();
        let mut eos_token_ids: Vec<u32> = eos.into_iter().chain(eot).map(|x| x as u32).collect();
        eos_token_ids.dedup();
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: f("rope.freq_base").unwrap_or(10_000.0),
            rope_layout: match architecture {
                Architecture::Qwen2 => RopeLayout::HalfSplit,
                Architecture::Llama | Architecture::Mistral => RopeLayout::Interleaved,
            },
            rope_scaling,
            max_position_embeddings: u("context_length").unwrap_or(2048),
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            qkv_bias: self.tensors.contains_key("blk.0.attn_q.bias"),
            bos_token_id: self
                .get_u64("tokenizer.ggml.bos_token_id")
                .ok()
                .map(|x| x as u32),
            eos_token_ids,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

type Parsed = (u32, BTreeMap<String, Value>, BTreeMap<String, TensorInfo>);

fn parse(bytes: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic: [u8; 4] = c.array("magic")?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = c.count("tensor count", 24)?;
    let n_kv = c.count("metadata count", 12)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32("metadata type")?;
        let value = c.value(ty, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(GgufError::Corrupt(format!("bad general.alignment {v:?}"))),
        },
    };
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Corrupt(format!(
                "tensor {name} has rank {n_dims}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64("tensor dimension")?);
        }
        let type_id = c.u32("tensor type")?;
        let offset = c.u64("tensor offset")?;
        raw.push((name, dims, type_id, offset));
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let mut tensors = BTreeMap::new();
    for (name, dims, type_id, offset) in raw {
        let dtype = ggml_type(type_id).map_err(|type_name| GgufError::UnsupportedTensorType {
            name: name.clone(),
            type_name,
        })?;
        let corrupt = |m: &str| GgufError::Corrupt(format!("tensor {name}: {m}"));
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n > 0 && n < 1 << 40)
            .ok_or_else(|| corrupt("bad dimensions"))? as usize;
        if !(dims[0] as usize).is_multiple_of(dtype.block_size()) {
            return Err(corrupt("row length is not a multiple of the block size"));
        }
        let size_in_bytes = elems / dtype.block_size() * dtype.type_size();
        let start = (offset as usize)
            .checked_add(data_start)
            .filter(|s| s % alignment == 0 || offset == 0)
            .ok_or_else(|| corrupt("bad offset"))?;
        if start
            .checked_add(size_in_bytes)
            .is_none_or(|end| end > bytes.len())
        {
            return Err(GgufError::Truncated {
                what: "tensor data",
                offset: start,
            });
        }
        let shape = dims.iter().rev().map(|&d| d as usize).collect();
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                offset: start,
                size_in_bytes,
            },
        );
    }
    Ok((version, metadata, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(version.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    }

    #[test]
    fn rejects_bad_magic_and_version() {
        assert!(matches!(
            parse(b"GGML\0\0\0\0"),
            Err(GgufError::BadMagic(_))
        ));
        assert!(matches!(
            parse(&header(7, 0, 0)),
            Err(GgufError::UnsupportedVersion(7))
        ));
    }

    #[test]
    fn huge_counts_are_truncation_not_allocation() {
        let b = header(3, u64::MAX, 0);
        assert!(matches!(parse(&b), Err(GgufError::Truncated { .. })));
        let mut b = header(3, 0, 1);
        b.extend(u64::MAX.to_le_bytes()); // key length
        assert!(matches!(parse(&b), Err(GgufError::Truncated { .. })));
    }

    #[test]
    fn empty_file_is_truncated() {
        assert!(matches!(parse(&[]), Err(GgufError::Truncated { .. })));
    }

    #[test]
    fn reads_every_supported_block_type_written_by_candle() {
        use candle_core::quantized::gguf_file;
        use candle_core::Tensor;
        let src = Tensor::randn(0f32, 1.0, (4, 256), &Device::Cpu).unwrap();
        let types = [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        let qs: Vec<(String, QTensor)> = types
            .iter()
            .map(|&t| {
                (
                    dtype_name(t).to_owned(),
                    QTensor::quantize(&src, t).unwrap(),
                )
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("types.gguf");
        let mut f = File::create(&path).unwrap();
        let md = [(
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        )];
        let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md, &ts).unwrap();
        drop(f);
        let g = GgufFile::open(&path).unwrap();
        for (name, q) in &qs {
            let info = &g.tensors[name];
            assert_eq!(info.dtype, q.dtype(), "{name}");
            assert_eq!(info.shape, vec![4, 256], "{name}");
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = g
                .tensor(name)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn parses_metadata() {
        let mut b = header(3, 0, 1);
        b.extend(3u64.to_le_bytes());
        b.extend(b"key");
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(b"hi");
        let (_, md, _) = parse(&b).unwrap();
        assert_eq!(md["key"].as_str(), Some("hi"));
    }
}
