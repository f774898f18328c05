//! Log-probabilities in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
//! top_logprobs}], "refusal": null}` and the legacy completions' `{tokens, token_logprobs,
//! top_logprobs, text_offset}`. The engine reports token ids ([`TokenLogprobs`]); the text of
//! each token is its bytes ([`Tokenizer::token_bytes`]), shown lossily as a string.
//!
//! The values are the log-softmax over the whole vocabulary of the logits the sampler used,
//! after `logit_bias` and the penalties, before top-k/top-p/min-p and temperature
//! ([`plexus_model::sampler`]).

use plexus_model::sampler::TokenLogprobs;
use plexus_model::Tokenizer;
use serde_json::{json, Map, Value};

/// A JSON number for a log-probability; -inf (a token the bias made impossible) is sent as
/// -9999.0, as OpenAI does, since JSON has no infinities.
fn num(lp: f32) -> Value {
    if lp.is_finite() {
        json!(lp)
    } else {
        json!(-9999.0)
    }
}

fn entry(tok: &Tokenizer, id: u32, lp: f32) -> Map<String, Value> {
    let bytes = tok.token_bytes(id);
    let mut m = Map::new();
    m.insert(
        "token".into(),
        Value::String(String::from_utf8_lossy(&bytes).into_owned()),
    );
    m.insert("logprob".into(), num(lp));
    m.insert("bytes".into(), json!(bytes));
    m
}

/// Chat's `content` items for `scores`.
pub fn chat_content(tok: &Tokenizer, scores: &[TokenLogprobs]) -> Vec<Value> {
    scores
        .iter()
        .map(|s| {
            let mut e = entry(tok, s.token, s.logprob);
            let top: Vec<Value> = s
                .top
                .iter()
                .map(|&(id, lp)| Value::Object(entry(tok, id, lp)))
                .collect();
            e.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(e)
        })
        .collect()
}

/// Chat's `logprobs` object.
pub fn chat(tok: &Tokenizer, scores: &[TokenLogprobs]) -> Value {
    json!({"content": chat_content(tok, scores), "refusal": null})
}

/// The legacy completions' `logprobs` object; `offset` is the character offset of the first
/// token in the completion text, advanced past the tokens rendered.
pub fn completion(tok: &Tokenizer, scores: &[TokenLogprobs], offset: &mut usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    for s in scores {
        let text = String::from_utf8_lossy(&tok.token_bytes(s.token)).into_owned();
        text_offset.push(json!(*offset));
        *offset += text.chars().count();
        tokens.push(Value::String(text.clone()));
        token_logprobs.push(num(s.logprob));
        // The k most likely, plus the chosen token (so up to k + 1 entries, as OpenAI says).
        let mut top = Map::new();
        for &(id, lp) in &s.top {
            let t = String::from_utf8_lossy(&tok.token_bytes(id)).into_owned();
            top.entry(t).or_insert_with(|| num(lp));
        }
        top.entry(text).or_insert_with(|| num(s.logprob));
        top_logprobs.push(Value::Object(top));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    })
}
