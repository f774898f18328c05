#!/usr/bin/env python3
"""Generate tiny random-weight Llama-family test fixtures for Plexus.

Run from the repository root:

    python scripts/make_tiny_fixtures.py

(with the pinned packages from scripts/requirements-fixtures.txt installed).
It (re)writes tests/fixtures/tiny/<model>/ for llama2, llama3, smollm2, mistral
and qwen2: HF config/tokenizer/safetensors, GGUF files written like llama.cpp's
convert_hf_to_gguf.py, and expected.json with reference logits from an
independent float64 numpy implementation of the HF forward pass.

Everything is deterministic: fixed numpy seeds, fixed corpus, single-threaded
tokenizer training.
"""

from __future__ import annotations

import os

# Single-threaded, deterministic tokenizer training (must precede the import).
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import LlamaFileType as FT  # noqa: E402
from safetensors.numpy import save_file, load_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tiny"

# ---------------------------------------------------------------------------
# Shared hyper-parameters
# ---------------------------------------------------------------------------
HIDDEN = 64
N_LAYERS = 2
N_HEAD = 4
N_KV_HEAD = 2
HEAD_DIM = HIDDEN // N_HEAD  # 16
INTERMEDIATE = 128
RMS_EPS = 1e-5
MAX_POS = 256
W_STD = 0.08
NORM_STD = 0.1
TARGET_VOCAB = 400
N_TOKENS = 16

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
BOS_ID, EOS_ID = 0, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# name -> spec
MODELS = {
    "llama2": dict(seed=1001, model_type="llama", arch="llama", rope_theta=10000.0, rope_scaling=None,
                   tie=False, qkv_bias=False, add_bos=True),
    "llama3": dict(seed=1002, model_type="llama", arch="llama", rope_theta=500000.0,
                   rope_scaling=LLAMA3_ROPE_SCALING, tie=False, qkv_bias=False, add_bos=False),
    "smollm2": dict(seed=1003, model_type="llama", arch="llama", rope_theta=100000.0, rope_scaling=None,
                    tie=True, qkv_bias=False, add_bos=False, sharded=True),
    "mistral": dict(seed=1004, model_type="mistral", arch="llama", rope_theta=1000000.0, rope_scaling=None,
                    tie=False, qkv_bias=False, add_bos=False),
    "qwen2": dict(seed=1005, model_type="qwen2", arch="qwen2", rope_theta=1000000.0, rope_scaling=None,
                  tie=False, qkv_bias=True, add_bos=False),
}

# Extra GGUF encodings written for llama2 only: name -> (tensor type for 2-D weights, general.file_type)
LLAMA2_EXTRA = {
    "f16": (QT.F16, FT.MOSTLY_F16),
    "bf16": (QT.BF16, FT.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, FT.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, FT.MOSTLY_Q4_0),
    "q4_1": (QT.Q4_1, FT.MOSTLY_Q4_1),
}

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog was not amused, but the fox did not care.",
    "Once upon a time there was a little model that wanted to learn how to read and write.",
    "It read every book in the library, one page at a time, and wrote down all the words it found.",
    "In the morning the sun rises in the east, and in the evening it sets in the west.",
    "She said that the weather would be warm and sunny for the rest of the week.",
    "We are going to the market to buy some apples, bread, cheese and a bottle of water.",
    "Hello, world! How are you today? I am fine, thank you. What is your name?",
    "The answer to the question is not always simple, but it is often the one you least expect.",
    "A language model predicts the next token given all of the previous tokens in the sequence.",
    "Attention is all you need: queries, keys and values are projected from the hidden state.",
    "The numbers are 0 1 2 3 4 5 6 7 8 9 and 10 20 30 40 50 60 70 80 90 100.",
    "In 2024 the population was 8,118,835,999 and the budget was $1,234,567.89 for the year 1999.",
    "Call me at 555-0123 or 555-9876 before 10:30 on 2025-01-31; the code is 4242.",
    "def add(a, b):\n    return a + b\n",
    "def main():\n    for i in range(10):\n        print(i, i * i)\n    return 0\n",
    "class Model:\n    def __init__(self, hidden_size=64):\n        self.hidden_size = hidden_size\n",
    "if __name__ == \"__main__\":\n    import sys\n    sys.exit(main())\n",
    "fn main() {\n    let x: u32 = 42;\n    println!(\"{}\", x + 1);\n}\n",
    "for (int i = 0; i < n; i++) {\n    sum += a[i] * b[i];\n}\n",
    "let mut total = 0;\nfor value in values.iter() {\n    total += value;\n}\n",
    "The function returns the value of the sum of the squares of the first ten numbers.",
    "Please write a short story about a robot who learns to paint the sky at night.",
    "There are three things that matter: the data, the model and the time you have.",
    "    indented line with four spaces\n\ttabbed line\n\n\nthree newlines above",
    "import numpy as np\nx = np.zeros((4, 4), dtype=np.float32)\nprint(x.shape)\n",
    "The user asked the assistant a question, and the assistant gave a helpful answer.",
    "This is a test. This is only a test. If this were a real emergency, you would know.",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe \u65e5\u672c\u8a9e \u4e2d\u6587 \U0001F600 \U0001F44D",
]

TOKENIZE_CASES = [
    "12345 + 67890 = 80235",
    "hello    world  \t\t tabs   ",
    "line one\nline two\n\n  indented\n",
    "na\u00efve caf\u00e9 \u2014 Z\u00fcrich stra\u00dfe \u65e5\u672c\u8a9e",
    "emoji \U0001F642\U0001F44D\U0001F3FD done",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x**2  # square",
    "  Hello, World! It's 3.14159 o'clock.  ",
]

EXPECTED_TEXT_SOURCE = (
    "The quick brown fox jumps over the lazy dog in 2024, and then def add(a, b): return a + b "
    "was printed on the screen for everyone to read."
)

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
]


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def tokenizer_vocab_and_merges(tok_json: dict) -> tuple[list[str], list[str]]:
    vocab: dict[str, int] = dict(tok_json["model"]["vocab"])
    for at in tok_json["added_tokens"]:
        vocab[at["content"]] = at["id"]
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    assert all(tokens), "vocab ids are not dense"
    merges = []
    for m in tok_json["model"]["merges"]:
        if isinstance(m, str):
            merges.append(m)
        else:
            a, b = m
            assert " " not in a and " " not in b
            merges.append(f"{a} {b}")
    return tokens, merges


def render_chat_by_hand(messages, add_generation_prompt: bool) -> str:
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        s += "<|im_start|>assistant\n"
    return s


def render_chat(messages) -> str:
    rendered = render_chat_by_hand(messages, True)
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return rendered
    # Same environment settings as transformers' apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    via_jinja = env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert via_jinja == rendered, (via_jinja, rendered)
    return rendered


def pick_prompt(tok: Tokenizer, n: int) -> tuple[str, list[int]]:
    """A text whose encoding is exactly n tokens: the longest word-prefix of EXPECTED_TEXT_SOURCE
    with <= n tokens, topped up with "." or " " + single digits (each digit is its own token)."""
    words = EXPECTED_TEXT_SOURCE.split(" ")
    text = ""
    for k in range(1, len(words) + 1):
        cand = " ".join(words[:k])
        if len(tok.encode(cand, add_special_tokens=False).ids) > n:
            break
        text = cand
    m = len(tok.encode(text, add_special_tokens=False).ids)
    if m == n - 1:
        text += "."
    elif m < n - 1:
        text += " " + "".join(str((7 * i + 3) % 10) for i in range(n - m - 1))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == n and tok.decode(ids) == text, (text, ids)
    return text, ids


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

def make_weights(spec: dict, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec["seed"])

    def mat(rows, cols):
        return rng.normal(0.0, W_STD, size=(rows, cols)).astype(np.float32)

    def norm(n):
        return (1.0 + rng.normal(0.0, NORM_STD, size=(n,))).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    w["model.embed_tokens.weight"] = mat(vocab, HIDDEN)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(HIDDEN)
        w[f"{p}.self_attn.q_proj.weight"] = mat(N_HEAD * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.k_proj.weight"] = mat(N_KV_HEAD * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.v_proj.weight"] = mat(N_KV_HEAD * HEAD_DIM, HIDDEN)
        if spec["qkv_bias"]:
            w[f"{p}.self_attn.q_proj.bias"] = rng.normal(0.0, W_STD, size=(N_HEAD * HEAD_DIM,)).astype(np.float32)
            w[f"{p}.self_attn.k_proj.bias"] = rng.normal(0.0, W_STD, size=(N_KV_HEAD * HEAD_DIM,)).astype(np.float32)
            w[f"{p}.self_attn.v_proj.bias"] = rng.normal(0.0, W_STD, size=(N_KV_HEAD * HEAD_DIM,)).astype(np.float32)
        w[f"{p}.self_attn.o_proj.weight"] = mat(HIDDEN, N_HEAD * HEAD_DIM)
        w[f"{p}.post_attention_layernorm.weight"] = norm(HIDDEN)
        w[f"{p}.mlp.gate_proj.weight"] = mat(INTERMEDIATE, HIDDEN)
        w[f"{p}.mlp.up_proj.weight"] = mat(INTERMEDIATE, HIDDEN)
        w[f"{p}.mlp.down_proj.weight"] = mat(HIDDEN, INTERMEDIATE)
    w["model.norm.weight"] = norm(HIDDEN)
    if not spec["tie"]:
        w["lm_head.weight"] = mat(vocab, HIDDEN)
    return w


# ---------------------------------------------------------------------------
# Reference forward pass (HF semantics, float64, HF tensor layout)
# ---------------------------------------------------------------------------

def hf_inv_freq(rope_theta: float, rope_scaling: dict | None, dim: int = HEAD_DIM) -> np.ndarray:
    """transformers' _compute_default_rope_parameters / _compute_llama3_parameters, in float64."""
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if rope_scaling is None:
        return inv_freq
    assert rope_scaling["rope_type"] == "llama3"
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama)


def rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward_hf(w: dict[str, np.ndarray], spec: dict, tokens: list[int]) -> np.ndarray:
    """Full-sequence logits [T, vocab], HF Llama/Mistral/Qwen2 semantics, float64."""
    W = {k: v.astype(np.float64) for k, v in w.items()}
    T = len(tokens)
    x = W["model.embed_tokens.weight"][np.array(tokens)]
    inv_freq = hf_inv_freq(spec["rope_theta"], spec["rope_scaling"])
    freqs = np.outer(np.arange(T, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, hd]
    cos, sin = np.cos(emb)[None], np.sin(emb)[None]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    n_rep = N_HEAD // N_KV_HEAD
    for i in range(N_LAYERS):
        p = f"model.layers.{i}"
        h = rms_norm(x, W[f"{p}.input_layernorm.weight"])
        q = h @ W[f"{p}.self_attn.q_proj.weight"].T
        k = h @ W[f"{p}.self_attn.k_proj.weight"].T
        v = h @ W[f"{p}.self_attn.v_proj.weight"].T
        if spec["qkv_bias"]:
            q = q + W[f"{p}.self_attn.q_proj.bias"]
            k = k + W[f"{p}.self_attn.k_proj.bias"]
            v = v + W[f"{p}.self_attn.v_proj.bias"]
        q = q.reshape(T, N_HEAD, HEAD_DIM).transpose(1, 0, 2)
        k = k.reshape(T, N_KV_HEAD, HEAD_DIM).transpose(1, 0, 2)
        v = v.reshape(T, N_KV_HEAD, HEAD_DIM).transpose(1, 0, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, n_rep, axis=0)  # repeat_kv: head h uses kv head h // n_rep
        v = np.repeat(v, n_rep, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(HEAD_DIM) + mask
        o = softmax(scores) @ v  # [nh, T, hd]
        o = o.transpose(1, 0, 2).reshape(T, N_HEAD * HEAD_DIM)
        x = x + o @ W[f"{p}.self_attn.o_proj.weight"].T
        h = rms_norm(x, W[f"{p}.post_attention_layernorm.weight"])
        g = h @ W[f"{p}.mlp.gate_proj.weight"].T
        u = h @ W[f"{p}.mlp.up_proj.weight"].T
        x = x + (silu(g) * u) @ W[f"{p}.mlp.down_proj.weight"].T
    x = rms_norm(x, W["model.norm.weight"])
    head = W["lm_head.weight"] if "lm_head.weight" in W else W["model.embed_tokens.weight"]
    return x @ head.T


# ---------------------------------------------------------------------------
# GGUF (mirrors llama.cpp convert_hf_to_gguf.py)
# ---------------------------------------------------------------------------

def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim port of convert_hf_to_gguf.py LlamaModel.permute (torch -> numpy)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def unpermute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Inverse of permute()."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama3_rope_factors(hparams: dict) -> np.ndarray:
    """Port of convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_type == "llama3").

    NB: convert reads old_context_len from the TOP-LEVEL hparams key
    "original_max_position_embeddings" (default 8192), not from rope_scaling; the llama3
    config.json therefore carries that key at top level too (same value), so convert and HF agree.
    """
    rope_scaling = hparams["rope_scaling"]
    base = hparams.get("rope_theta", 10000.0)
    if (dim := hparams.get("head_dim")) is None:
        dim = hparams["hidden_size"] // hparams["num_attention_heads"]
    # torch.arange(0, dim, 2, dtype=torch.float32) / dim, then base ** (...) in float32
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    freqs = freqs.astype(np.float32)
    factor = rope_scaling.get("factor", 8.0)
    low_freq_factor = rope_scaling.get("low_freq_factor", 1.0)
    high_freq_factor = rope_scaling.get("high_freq_factor", 4.0)
    old_context_len = hparams.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    assert low_freq_wavelen != high_freq_wavelen
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    assert parts[0] == "model" and parts[1] == "layers", hf
    return f"blk.{parts[2]}.{HF_TO_GGUF_LAYER['.'.join(parts[3:])]}"


def write_gguf(path: Path, name: str, spec: dict, hparams: dict, w: dict[str, np.ndarray],
               tokens: list[str], merges: list[str], qtype, ftype) -> None:
    arch = spec["arch"]
    writer = gguf.GGUFWriter(str(path), arch)  # also writes general.architecture
    writer.add_type("model")
    writer.add_name(f"plexus-tiny-{name}")
    # TextModel.set_gguf_parameters
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    writer.add_rope_freq_base(hparams["rope_theta"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if (head_dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    # LlamaModel.set_gguf_parameters adds vocab_size; rope.dimension_count for all per fixture spec.
    if arch == "llama":
        writer.add_vocab_size(hparams["vocab_size"])
    writer.add_rope_dimension_count(hparams["hidden_size"] // hparams["num_attention_heads"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # _set_vocab_gpt2 + SpecialVocab.add_to_gguf
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(spec["add_bos"])
    writer.add_chat_template(CHAT_TEMPLATE)

    # LlamaModel.generate_extra_tensors comes first in convert's output
    if spec["rope_scaling"] is not None:
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(hparams))

    for hf, data in w.items():
        data = data.astype(np.float32)
        if arch == "llama":  # LlamaModel.modify_tensors (undo_permute); Qwen2 is NeoX: no permute
            if hf.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute(data, N_HEAD, N_HEAD)
            if hf.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute(data, N_HEAD, N_KV_HEAD)
        if data.ndim == 2 and qtype != QT.F32:
            writer.add_tensor(gguf_name(hf), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:  # 1-D tensors (norms, biases) stay F32
            writer.add_tensor(gguf_name(hf), data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, QT]]:
    """Read back a GGUF: (kv fields, dequantized float32 tensors in numpy (rows, cols) order, types)."""
    r = gguf.GGUFReader(str(path))
    kv = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        kv[f.name] = f.contents()
    tensors, types = {}, {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ne order -> numpy order
        data = np.asarray(t.data)
        arr = gguf.quants.dequantize(data, t.tensor_type).reshape(shape).astype(np.float32)
        tensors[t.name] = arr
        types[t.name] = t.tensor_type
    return kv, tensors, types


def gguf_to_hf(spec: dict, g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inv = {v: k for k, v in HF_TO_GGUF_LAYER.items()}
    out = {}
    for name, arr in g.items():
        if name == "rope_freqs.weight":
            continue
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        else:
            _, i, rest = name.split(".", 2)
            hf = f"model.layers.{i}.{inv[rest]}"
        if spec["arch"] == "llama":
            if hf.endswith(("q_proj.weight", "q_proj.bias")):
                arr = unpermute(arr, N_HEAD, N_HEAD)
            if hf.endswith(("k_proj.weight", "k_proj.bias")):
                arr = unpermute(arr, N_HEAD, N_KV_HEAD)
        out[hf] = arr
    return out


def forward_ggml(g: dict[str, np.ndarray], kv: dict, tokens: list[int]) -> np.ndarray:
    """Second, llama.cpp-style implementation on GGUF-layout tensors (self-check only):
    arch llama -> interleaved ("normal") rotary on permuted Q/K with rope_freqs divisors,
    arch qwen2 -> NeoX rotary."""
    arch = kv["general.architecture"]
    base = kv[f"{arch}.rope.freq_base"]
    n_dims = kv[f"{arch}.rope.dimension_count"]
    eps = kv[f"{arch}.attention.layer_norm_rms_epsilon"]
    nh, nkv = kv[f"{arch}.attention.head_count"], kv[f"{arch}.attention.head_count_kv"]
    hd = kv[f"{arch}.embedding_length"] // nh
    G = {k: v.astype(np.float64) for k, v in g.items()}
    ff = G.get("rope_freqs.weight", np.ones(n_dims // 2))
    T = len(tokens)
    theta = np.outer(np.arange(T), base ** (-2.0 * np.arange(n_dims // 2) / n_dims) / ff)  # [T, hd/2]
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(x):  # x: [T, heads, hd]
        y = x.copy()
        if arch == "qwen2":
            a, b = x[..., : hd // 2], x[..., hd // 2:]
            y[..., : hd // 2], y[..., hd // 2:] = a * c - b * s, a * s + b * c
        else:
            a, b = x[..., 0::2], x[..., 1::2]
            y[..., 0::2], y[..., 1::2] = a * c - b * s, a * s + b * c
        return y

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

    x = G["token_embd.weight"][np.array(tokens)]
    for i in range(kv[f"{arch}.block_count"]):
        b = f"blk.{i}."
        h = norm(x, G[b + "attn_norm.weight"])
        q, k, v = (h @ G[b + f"attn_{n}.weight"].T + G.get(b + f"attn_{n}.bias", 0.0) for n in "qkv")
        q, k, v = q.reshape(T, nh, hd), k.reshape(T, nkv, hd), v.reshape(T, nkv, hd)
        q, k = rope(q), rope(k)
        o = np.zeros((T, nh, hd))
        for hh in range(nh):
            kh = hh // (nh // nkv)
            sc = q[:, hh] @ k[:, kh].T / math.sqrt(hd)
            sc = sc + np.triu(np.full((T, T), -np.inf), 1)
            o[:, hh] = softmax(sc) @ v[:, kh]
        x = x + o.reshape(T, nh * hd) @ G[b + "attn_output.weight"].T
        h = norm(x, G[b + "ffn_norm.weight"])
        x = x + (silu(h @ G[b + "ffn_gate.weight"].T) * (h @ G[b + "ffn_up.weight"].T)) @ G[b + "ffn_down.weight"].T
    x = norm(x, G["output_norm.weight"])
    return x @ G.get("output.weight", G["token_embd.weight"]).T


# ---------------------------------------------------------------------------
# HF files
# ---------------------------------------------------------------------------

def hf_config(name: str, spec: dict, vocab: int) -> dict:
    mt = spec["model_type"]
    arch_cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[mt]
    c: dict = {"architectures": [arch_cls]}
    if mt == "llama":
        c["attention_bias"] = False
    c["attention_dropout"] = 0.0
    c["bos_token_id"] = BOS_ID
    c["eos_token_id"] = EOS_ID
    if mt in ("llama", "mistral"):
        c["head_dim"] = HEAD_DIM
    c["hidden_act"] = "silu"
    c["hidden_size"] = HIDDEN
    c["initializer_range"] = 0.02
    c["intermediate_size"] = INTERMEDIATE
    c["max_position_embeddings"] = MAX_POS
    if mt == "qwen2":
        c["max_window_layers"] = N_LAYERS
    if mt == "llama":
        c["mlp_bias"] = False
    c["model_type"] = mt
    c["num_attention_heads"] = N_HEAD
    c["num_hidden_layers"] = N_LAYERS
    c["num_key_value_heads"] = N_KV_HEAD
    if spec["rope_scaling"] is not None:
        # Read by llama.cpp's convert_hf_to_gguf (top-level key), see llama3_rope_factors().
        c["original_max_position_embeddings"] = spec["rope_scaling"]["original_max_position_embeddings"]
    if mt == "llama":
        c["pretraining_tp"] = 1
    c["rms_norm_eps"] = RMS_EPS
    c["rope_scaling"] = spec["rope_scaling"]
    c["rope_theta"] = spec["rope_theta"]
    if mt in ("mistral", "qwen2"):
        c["sliding_window"] = None
    c["tie_word_embeddings"] = spec["tie"]
    c["torch_dtype"] = "float32"
    c["use_cache"] = True
    if mt == "qwen2":
        c["use_sliding_window"] = False
    c["vocab_size"] = vocab
    return c


def tokenizer_config(spec: dict) -> dict:
    return {
        "add_bos_token": spec["add_bos"],
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, s in enumerate(SPECIALS)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": MAX_POS,
        "pad_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def write_safetensors(d: Path, w: dict[str, np.ndarray], sharded: bool) -> None:
    if not sharded:
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(w)
    split = [n for n in names if n == "model.embed_tokens.weight" or n.startswith("model.layers.0.")]
    shards = [
        ("model-00001-of-00002.safetensors", {n: w[n] for n in names if n in split}),
        ("model-00002-of-00002.safetensors", {n: w[n] for n in names if n not in split}),
    ]
    weight_map = {}
    for fname, part in shards:
        save_file(part, str(d / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
    index = {
        "metadata": {"total_size": int(sum(a.nbytes for a in w.values()))},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_safetensors(d: Path) -> dict[str, np.ndarray]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        out = {}
        for f in sorted(set(json.loads(idx.read_text())["weight_map"].values())):
            out.update(load_file(str(d / f)))
        return out
    return load_file(str(d / "model.safetensors"))


# ---------------------------------------------------------------------------
# JSON helpers
# ---------------------------------------------------------------------------

def r6(x) -> float:
    return float(f"{float(x):.6g}")


def round_nested(a: np.ndarray):
    if a.ndim == 1:
        return [r6(v) for v in a]
    return [round_nested(v) for v in a]


def dump_expected(path: Path, obj: dict) -> None:
    """One top-level key per line, values compact (keeps the file small and diffable)."""
    lines = ["{"]
    items = list(obj.items())
    for i, (k, v) in enumerate(items):
        if isinstance(v, dict) and k in ("logits_quant",):
            inner = ",\n".join(f"    {json.dumps(kk)}: {json.dumps(vv, separators=(',', ':'))}" for kk, vv in v.items())
            val = "{\n" + inner + "\n  }"
        elif k == "logits_f32":
            val = "[\n" + ",\n".join("    " + json.dumps(row, separators=(",", ":")) for row in v) + "\n  ]"
        else:
            val = json.dumps(v, ensure_ascii=False, separators=(", ", ": "))
        lines.append(f"  {json.dumps(k)}: {val}" + ("," if i + 1 < len(items) else ""))
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main() -> int:
    tok = train_tokenizer()
    tok2 = train_tokenizer()
    assert tok.to_str() == tok2.to_str(), "tokenizer training is not deterministic"
    tok_json = json.loads(tok.to_str())
    tokens, merges = tokenizer_vocab_and_merges(tok_json)
    vocab = len(tokens)
    assert vocab == tok.get_vocab_size(with_added_tokens=True)
    print(f"tokenizer: vocab {vocab}, merges {len(merges)}")

    tokenize_cases = []
    for text in TOKENIZE_CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, text
        tokenize_cases.append({"text": text, "ids": ids})
    chat = {"messages": CHAT_MESSAGES, "add_generation_prompt": True, "rendered": render_chat(CHAT_MESSAGES)}

    # llama3: verify the scaling really changes some (but not all) frequencies for head_dim 16
    base_f = hf_inv_freq(MODELS["llama3"]["rope_theta"], None)
    scaled_f = hf_inv_freq(MODELS["llama3"]["rope_theta"], LLAMA3_ROPE_SCALING)
    ratio = base_f / scaled_f
    assert np.isclose(ratio[0], 1.0) and np.isclose(ratio[-1], 8.0), ratio
    assert np.any((ratio > 1.0 + 1e-9) & (ratio < 8.0 - 1e-9)), "no smoothed (medium) frequency"
    print("llama3 inv_freq ratios (base/scaled):", np.round(ratio, 6).tolist())

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    for name, spec in MODELS.items():
        d = OUT / name
        d.mkdir()
        hparams = hf_config(name, spec, vocab)
        (d / "config.json").write_text(json.dumps(hparams, indent=2) + "\n")
        (d / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(spec), indent=2) + "\n")

        w = make_weights(spec, vocab)
        write_safetensors(d, w, spec.get("sharded", False))
        w_back = load_safetensors(d)
        assert set(w_back) == set(w) and all(np.array_equal(w_back[k], w[k]) for k in w)

        # prompt
        n_text = N_TOKENS - (1 if spec["add_bos"] else 0)
        text, ids = pick_prompt(tok, n_text)
        ids = ([BOS_ID] if spec["add_bos"] else []) + ids
        assert len(ids) == N_TOKENS

        logits = forward_hf(w, spec, ids)

        # GGUF files
        variants = {"f32": (QT.F32, FT.ALL_F32)}
        if name == "llama2":
            variants.update(LLAMA2_EXTRA)
        logits_quant = {}
        for fmt, (qtype, ftype) in variants.items():
            path = d / f"model-{fmt}.gguf"
            write_gguf(path, name, spec, hparams, w, tokens, merges, qtype, ftype)
            kv, g, types = read_gguf(path)
            # read-back checks
            assert kv["general.architecture"] == spec["arch"]
            assert kv["tokenizer.ggml.tokens"] == tokens
            assert kv["tokenizer.ggml.merges"] == merges
            assert kv["general.file_type"] == int(ftype)
            assert ("output.weight" in g) == (not spec["tie"])
            assert ("rope_freqs.weight" in g) == (spec["rope_scaling"] is not None)
            for tn, tt in types.items():
                if g[tn].ndim == 1:
                    assert tt == QT.F32, (tn, tt)
                else:
                    assert tt == qtype, (tn, tt)
            hf_back = gguf_to_hf(spec, g)
            assert set(hf_back) == set(w)
            if qtype == QT.F32:
                assert all(np.array_equal(hf_back[k], w[k]) for k in w), "f32 GGUF round-trip mismatch"
                if "rope_freqs.weight" in g:
                    rf = g["rope_freqs.weight"].astype(np.float64)
                    assert np.allclose(base_f / rf, scaled_f, rtol=1e-6), (base_f / rf, scaled_f)
                    print("  llama3 rope_freqs:", rf.tolist())
            # independent llama.cpp-style pass on the GGUF layout must agree with the HF-layout pass
            lg = forward_ggml(g, kv, ids)
            lh = forward_hf(hf_back, spec, ids)
            err = float(np.max(np.abs(lg - lh)))
            assert err < 1e-4, (name, fmt, err)
            if qtype == QT.F32:
                assert float(np.max(np.abs(lh - logits))) < 1e-12
            else:
                logits_quant[fmt] = [r6(v) for v in lh[-1]]
                print(f"  {name} {fmt}: max|last logits - f32| = {np.max(np.abs(lh[-1] - logits[-1])):.4g}")
            print(f"  {path.relative_to(ROOT)}: {path.stat().st_size} bytes, ggml-vs-hf max diff {err:.2e}")

        expected = {
            "model": name,
            "text": text,
            "add_bos": spec["add_bos"],
            "tokens": ids,
            "logits_f32": round_nested(logits),
        }
        if logits_quant:
            expected["logits_quant"] = logits_quant
        expected["tokenize"] = tokenize_cases
        expected["chat"] = chat
        dump_expected(d / "expected.json", expected)
        print(f"{name}: tokens {ids} argmax(last) {int(np.argmax(logits[-1]))}")

    (OUT / "README.md").write_text(README)
    return 0


README = """\
# Tiny random-weight fixtures

Generated by `scripts/make_tiny_fixtures.py` — do not edit by hand. Regenerate with

```sh
python3.11 -m venv ~/.cache/plexus-fixtures-venv
~/.cache/plexus-fixtures-venv/bin/pip install -r scripts/requirements-fixtures.txt
~/.cache/plexus-fixtures-venv/bin/python scripts/make_tiny_fixtures.py   # from the repo root
```

The output is deterministic (fixed numpy seeds, fixed corpus, single-threaded tokenizer training).

## Models

All: hidden 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), intermediate 128, rms_norm_eps 1e-5,
max_position_embeddings 256, float32, weights ~N(0, 0.08), norm weights ~1+N(0, 0.1), vocab 400.

| dir | HF model_type | GGUF arch | rope_theta | notes |
| --- | --- | --- | --- | --- |
| `llama2` | llama | llama | 1e4 | separate lm_head; `add_bos_token` true (BOS `<\\|endoftext\\|>` = 0 prepended to `tokens`); extra GGUFs f16/bf16/q8_0/q4_0/q4_1 |
| `llama3` | llama | llama | 5e5 | llama3 rope_scaling (factor 8, low 1, high 4, original_max_position_embeddings 64): freq 0 unscaled, freq 1 smoothed, freqs 2..7 divided by 8; GGUF carries `rope_freqs.weight` |
| `smollm2` | llama | llama | 1e5 | tied embeddings (no `lm_head.weight`, no `output.weight`); safetensors **sharded** in 2 files + `model.safetensors.index.json` |
| `mistral` | mistral | llama | 1e6 | `sliding_window: null`, separate lm_head |
| `qwen2` | qwen2 | qwen2 | 1e6 | random q/k/v biases (HF Qwen2Config has no `attention_bias` key: the biases are implied by model_type), NeoX rotary, Q/K not permuted in GGUF |

## Files per model

- `config.json`, `tokenizer.json` (one shared byte-level BPE, specials `<|endoftext|>`=0, `<|im_start|>`=1,
  `<|im_end|>`=2), `tokenizer_config.json` (bos `<|endoftext|>`, eos `<|im_end|>`, ChatML `chat_template`).
- `model.safetensors` (HF names, metadata `{"format":"pt"}`), or the two shards for `smollm2`.
- `model-f32.gguf` (+ the quantized variants for `llama2`): written with gguf-py's `GGUFWriter` the way
  llama.cpp's `convert_hf_to_gguf.py` does. For arch `llama` the Q/K rows are permuted with
  `LlamaModel.permute` (interleaved rotary); `qwen2` is not permuted. 1-D tensors (norms, biases,
  `rope_freqs`) are always F32; every 2-D tensor (token_embd and output included) has the file's type.
- `expected.json`:
  - `tokens` (16 ids), `text` (exactly what they encode to, BOS excluded: a short phrase topped up with
    single digits), `add_bos` (llama2: `tokens[0]` is BOS);
  - `logits_f32`: [16][vocab] logits from an independent float64 numpy implementation of the HF forward
    pass on the f32 weights, rounded to 6 significant digits;
  - `logits_quant` (llama2 only): format -> last-position logits of the same float64 forward using the
    dequantized weights of `model-<format>.gguf` (activations not quantized, so an engine using
    int8 activation dot products only matches approximately);
  - `tokenize`: `{text, ids}` pairs encoded with `add_special_tokens=False` (specials in the text are
    matched as special tokens);
  - `chat`: messages and the template rendered with `add_generation_prompt=true`.

The llama3 `config.json` also has a top-level `original_max_position_embeddings` (= 64, same as in
`rope_scaling`) because llama.cpp's converter reads it from there when computing `rope_freqs`.
"""


if __name__ == "__main__":
    sys.exit(main())
