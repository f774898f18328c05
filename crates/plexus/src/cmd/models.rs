//! `plexus models inspect`: what a model file is, without loading its weights (the identity hash
//! reads the bytes once and is cached). `plexus models fetch`: a known model into the cache.

use anyhow::Context as _;
use plexus_model::config::RopeScaling;
use plexus_model::gguf::dtype_name;
use plexus_model::tokenizer::Tokenizer;
use plexus_model::{ModelFiles, ModelFormat};
use std::collections::BTreeMap;
use std::path::Path;

pub fn fetch(name: &str, force: bool) -> anyhow::Result<()> {
    let spec = crate::fetch::FetchSpec::by_name(name)
        .ok_or_else(|| anyhow::anyhow!("unknown model {name}"))?;
    let cache = super::cache_dir()
        .context("no cache directory: set PLEXUS_CACHE_DIR, XDG_CACHE_HOME or HOME")?;
    let path = crate::fetch::fetch(&spec, &cache, force, true)?;
    println!("{}", path.display());
    Ok(())
}

pub fn requantize(path: &Path, to: &str, out: &Path) -> anyhow::Result<()> {
    use candle_core::quantized::GgmlDType as T;
    let dtype = match to.to_ascii_lowercase().as_str() {
        "q4_0" => T::Q4_0,
        "q4_1" => T::Q4_1,
        "q5_0" => T::Q5_0,
        "q5_1" => T::Q5_1,
        "q8_0" => T::Q8_0,
        "q2_k" => T::Q2K,
        "q3_k" => T::Q3K,
        "q4_k" => T::Q4K,
        "q5_k" => T::Q5K,
        "q6_k" => T::Q6K,
        "f16" => T::F16,
        "f32" => T::F32,
        other => anyhow::bail!(
            "unknown --to type {other:?} (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16, f32)"
        ),
    };
    if out == path {
        anyhow::bail!("--out must differ from the input file");
    }
    let r = plexus_model::requant::requantize(path, out, dtype)
        .with_context(|| format!("cannot requantize {}", path.display()))?;
    eprintln!(
        "{} matrices converted to {}, {} tensors copied",
        r.converted,
        dtype_name(dtype),
        r.copied
    );
    println!("{}", out.display());
    Ok(())
}

pub fn inspect(path: &Path, json: bool) -> anyhow::Result<()> {
    let files =
        ModelFiles::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let cfg = &files.config;
    let tokenizer = files.tokenizer();
    let total = plexus_model::identity::total_size(&files.weight_files);
    let pb = crate::progress::bytes("hashing", total);
    let cache = super::cache_dir();
    let id = plexus_model::identity::identity(&files.weight_files, cache.as_deref(), |d, _| {
        pb.set_position(d)
    })?;
    pb.finish_and_clear();

    let mut types: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut params = 0u64;
    if let Some(g) = files.gguf() {
        for t in g.tensors.values() {
            let e = types.entry(dtype_name(t.dtype).to_owned()).or_default();
            e.0 += 1;
            e.1 += t.size_in_bytes as u64;
            params += t.shape.iter().product::<usize>() as u64;
        }
    }
    let rope = match &cfg.rope_scaling {
        RopeScaling::None => "none".to_string(),
        RopeScaling::Llama3(s) => format!("llama3 x{}", s.factor),
        RopeScaling::Factors(_) => "per-frequency factors (rope_freqs)".into(),
    };
    let tok = match &tokenizer {
        Ok(t) => serde_json::json!({
            "vocab": t.vocab_size(),
            "bos": t.bos(),
            "eos": t.eos(),
            "add_bos": t.adds_bos(),
            "model": files.gguf().and_then(|g| g.get_str("tokenizer.ggml.model")),
            "pre": files.gguf().and_then(|g| g.get_str("tokenizer.ggml.pre")),
        }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let out = serde_json::json!({
        "path": path.display().to_string(),
        "format": match files.format { ModelFormat::Gguf => "gguf", ModelFormat::HuggingFace => "huggingface" },
        "gguf_version": files.gguf().map(|g| g.version),
        "name": files.gguf().and_then(|g| g.get_str("general.name")),
        "architecture": cfg.architecture.name(),
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope,
        "tied_embeddings": cfg.tie_word_embeddings,
        "qkv_bias": cfg.qkv_bias,
        "parameters": (params > 0).then_some(params),
        "tensor_types": types.iter().map(|(k, (n, b))| (k.clone(), serde_json::json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
        "bytes": total,
        "tokenizer": tok,
        "chat_template": files.chat_template_source().is_some(),
        "identity": id.to_string(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("model         {}", path.display());
    println!("format        {}", out["format"].as_str().unwrap_or(""));
    println!(
        "architecture  {} ({} layers, hidden {}, ffn {}, {} heads / {} kv heads, head dim {})",
        cfg.architecture.name(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim
    );
    println!("vocabulary    {}", cfg.vocab_size);
    println!("context       {}", cfg.max_position_embeddings);
    println!("rope          theta {} scaling {}", cfg.rope_theta, rope);
    println!(
        "tied output   {}   qkv bias {}",
        yes_no(cfg.tie_word_embeddings),
        yes_no(cfg.qkv_bias)
    );
    if params > 0 {
        println!("parameters    {:.1} M", params as f64 / 1e6);
    }
    for (k, (n, b)) in &types {
        println!(
            "tensors       {k:<5} {n:>4} tensors {:>10.1} MiB",
            *b as f64 / (1 << 20) as f64
        );
    }
    println!("size          {:.1} MiB", total as f64 / (1 << 20) as f64);
    match &tokenizer {
        Ok(t) => println!(
            "tokenizer     {} vocab, bos {}, eos {}, add_bos {}{}",
            t.vocab_size(),
            token_list(t, t.bos().as_slice()),
            token_list(t, t.eos()),
            yes_no(t.adds_bos()),
            files
                .gguf()
                .and_then(|g| g.get_str("tokenizer.ggml.pre"))
                .map(|p| format!(", pre {p}"))
                .unwrap_or_default()
        ),
        Err(e) => println!("tokenizer     unavailable: {e}"),
    }
    println!(
        "chat template {}",
        yes_no(files.chat_template_source().is_some())
    );
    println!("identity      sha256:{id}");
    Ok(())
}

/// Token ids with their text as people read them: `1 "<|im_start|>"`, `2 "a", 7 "b"`, or
/// `none`.
fn token_list(t: &Tokenizer, ids: &[u32]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    let show = |id: &u32| match t.token_text(*id) {
        Some(text) => format!("{id} {text:?}"),
        None => id.to_string(),
    };
    ids.iter().map(show).collect::<Vec<_>>().join(", ")
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
