#!/usr/bin/env python3
"""Record llama.cpp reference outputs (tokenization + greedy generation) for a GGUF model.

Starts llama-server on 127.0.0.1 (free port, `-t 2 -c 2048 --seed 0 -np 1`), queries
/tokenize, /apply-template and /completion, and writes one JSON fixture that the Rust
engine's tests compare against, so CI does not need llama.cpp.

Standard library only. Usage (from the repo root):

    python3 scripts/llamacpp_reference.py \
        [--llama-server PATH] [--model PATH] [--out PATH] [--allow-short]

Fixture layout (all token ids are plain ints):
  model_file, model_sha256, llama_cpp_version, server_args, notes,
  chat_template            -- the GGUF chat template as llama-server reports it (/props)
  tokenize: [{name, text, tokens, pieces}]
      /tokenize {"content": text, "add_special": false, "parse_special": true}
      pieces: per token, the UTF-8 string, or a list of byte values when the piece
      alone is not valid UTF-8 (llama-server's "with_pieces" format).
  generate: [{name, kind, messages?, prompt, prompt_tokens, output_tokens, output_text,
              n_generated, stop_type, stopped_eos, top_logprobs, near_tie_positions}]
      prompt_tokens: /tokenize of `prompt` with parse_special=true, add_special=false
        (checked equal to add_special=true, which is what /completion uses; the GGUF has
        add_bos_token=false, so no BOS is added).
      top_logprobs[i]: the top-5 [token_id, logprob] pairs at generated position i, from
        the full-vocabulary softmax of the raw logits (n_probs=5, post_sampling_probs=false).
      near_tie_positions: positions i where p(top2) >= 0.99 * p(top1).
"""

import argparse
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SERVER = os.path.expanduser(
    "~/.cache/anchors/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server")
DEFAULT_MODEL = os.path.join(REPO_ROOT, "..", "shared", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "llamacpp", "smollm2-135m-q4_1.json")

N_PREDICT = 48
MIN_GENERATED = 32
N_PROBS = 5

# --------------------------------------------------------------------------------------
# Test cases
# --------------------------------------------------------------------------------------

TOKENIZE_CASES = [
    ("ascii_hello", "Hello, world! This is a simple sentence."),
    ("accents", "Café résumé naïve façade Ångström señor Zürich œuvre"),
    ("cjk", "東京は日本の首都です。我爱北京天安门。한국어를 배우고 있어요."),
    ("emoji", "I love 🍕 and 🚀! 👍🏽 ❤️ 😂😂"),
    ("emoji_zwj", "Family: 👨‍👩‍👧‍👦, rainbow flag: 🏳️‍🌈, technologist: 👩🏾‍💻"),
    ("whitespace_runs", "a  b   c    d\t\te\n\nf\n\n\n  g \t \n h     \n\n\n\n"),
    ("leading_spaces", "   leading spaces and trailing   "),
    ("leading_newlines", "\n\n\tIndented after newlines"),
    ("single_space", " "),
    ("digits", "12345 67.89 1,000,000 3.14159 0x1F 2024-01-15 007 999999999999"),
    ("python_code",
     "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
     "class Foo:\n\tdef __init__(self):\n\t\tself.x = [i ** 2 for i in range(10)]  # squares\n"),
    ("rust_code",
     "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * 2).collect();\n    for (i, x) in v.iter().enumerate() {\n"
     "        println!(\"{i}: {x:?}\");\n    }\n}\n"),
    ("contractions", "don't I'll we've they're she'd it's DON'T I'M You'Re"),
    ("mixed_case", "MiXeD CaSe WoRdS camelCaseIdentifier snake_case_name SCREAMING_CASE HTTPServer"),
    ("punctuation_runs", "Wait... what?!?! (really) [yes] {no} <maybe> --- *** ;;; ... !!! ??? \"quoted\" 'single'"),
    ("empty", ""),
    ("special_chat", "<|im_start|>user\nhi<|im_end|>"),
    ("special_full_turn", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\nSure.<|im_end|>\n"),
    ("special_endoftext", "first document<|endoftext|>second document"),
    ("url_email", "Visit https://example.com/path?q=1&r=2#frag or mail me@example.org today."),
    ("non_latin", "Привет, как дела? Γειά σου κόσμε. مرحبا بالعالم. नमस्ते दुनिया"),
    ("long_words", "supercalifragilisticexpialidocious antidisestablishmentarianism aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
]

# (name, kind, plain prompt text | chat messages)
GENERATE_CASES = [
    ("capital_france", "plain", "The capital of France is"),
    ("fibonacci", "plain", "def fibonacci(n):"),
    ("once_upon", "plain", "Once upon a time, in a small village,"),
    ("list_numbers", "plain", "1, 2, 3, 4,"),
    ("french", "plain", "La cuisine française est célèbre pour"),
    ("rust_fn", "plain", "// Compute the greatest common divisor of two numbers.\nfn gcd(a: u64, b: u64) -> u64 {"),
    ("chat_boiling", "chat", [
        {"role": "user", "content": "What is the boiling point of water?"},
    ]),
    ("chat_haiku", "chat", [
        {"role": "user", "content": "Write a haiku about the sea, then explain what each line means."},
    ]),
    ("chat_recursion", "chat", [
        {"role": "user", "content": "Explain recursion to a child."},
    ]),
    ("chat_system_user", "chat", [
        {"role": "system", "content": "You are a friendly cooking assistant who gives step-by-step instructions."},
        {"role": "user", "content": "How do I make a cup of tea?"},
    ]),
    ("chat_two_turn", "chat", [
        {"role": "user", "content": "Hi! What is your name?"},
        {"role": "assistant", "content": "I'm SmolLM, a small language model. How can I help you today?"},
        {"role": "user", "content": "Can you list three fruits and describe each one?"},
    ]),
]

# Long generations (`--long`, a fixture of their own): past position 256, where llama.cpp's
# decode of a row alone in its ubatch splits the keys by its thread count (`-t 2`), and
# prompts of more than one 512-row ubatch whose last ubatch has one row (split-KV too) or
# 28 rows (one-chunk). Greedy with ignore_eos, so every case runs to n_predict.
# (name, kind, plain prompt text | chat messages | number of tokens of LONG_TEXT, n_predict)
LONG_TEXT = (
    "The history of the lighthouse begins in the ancient world, where fires were lit on hills "
    "and towers to guide ships into harbour. The most famous of these was the Pharos of "
    "Alexandria, built in the third century before the common era, which stood for more than a "
    "thousand years before earthquakes brought it down. In the centuries that followed, "
    "lighthouses spread along the coasts of Europe, each one a tower of stone with a fire or a "
    "lamp at its top, tended by keepers who lived beside them with their families. The keepers "
    "trimmed the wicks, polished the lenses, wound the clockwork that turned the lights, and "
    "wrote in their logs what the weather had done. In storms they stayed awake through the "
    "night; in fog they sounded horns and bells. The invention of the Fresnel lens in the "
    "nineteenth century changed everything: a lens of many rings of glass could bend the light "
    "of a single lamp into a beam seen twenty miles out to sea. Later came electricity, then "
    "automatic lamps, and finally the satellites that told every ship where it was, so that "
    "one by one the keepers left their towers. Today most lighthouses run on their own, their "
    "lamps switched by sensors and their lenses turned by small motors, and many have become "
    "museums where visitors climb the stairs to look out over the water. Yet sailors still "
    "watch for them, and on a dark night a light on the shore means the same thing it meant "
    "two thousand years ago: here is land, here is danger, here is the way home. "
) * 4

LONG_CASES = [
    ("long_story", "plain", "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper who", 300),
    ("long_chat_essay", "chat", [
        {"role": "user", "content": "Write a long essay about the history of bread, with many details."},
    ], 320),
    ("long_prompt_513", "tokens", 513, 40),
    ("long_prompt_540", "tokens", 540, 40),
]

# --------------------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------------------


def http_json(base, path, body=None, timeout=600):
    data = None
    headers = {}
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        raise RuntimeError(f"{path} -> HTTP {e.code}: {detail}") from None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Server:
    def __init__(self, binary, model, port):
        self.args = ["-m", model, "--host", "127.0.0.1", "--port", str(port),
                     "-t", "2", "-c", "2048", "--seed", "0", "-np", "1"]
        self.cmd = [binary] + self.args
        self.base = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self.proc = None

    def start(self, timeout=180):
        print("starting:", " ".join(self.cmd), file=sys.stderr)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; log: {self.log.name}\n"
                                   + self.tail())
            try:
                h = http_json(self.base, "/health", timeout=5)
                if h.get("status") == "ok":
                    return
            except (urllib.error.URLError, ConnectionError, RuntimeError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server not healthy after {timeout}s; log: {self.log.name}\n" + self.tail())

    def tail(self, n=30):
        try:
            with open(self.log.name, "r", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------


def tokenize(base, text, add_special=False, with_pieces=False):
    body = {"content": text, "add_special": add_special, "parse_special": True}
    if with_pieces:
        body["with_pieces"] = True
    toks = http_json(base, "/tokenize", body)["tokens"]
    if with_pieces:
        return [int(t["id"]) for t in toks], [t["piece"] for t in toks]
    return [int(t) for t in toks], None


def record_tokenize(base):
    out = []
    for name, text in TOKENIZE_CASES:
        ids, pieces = tokenize(base, text, with_pieces=True)
        plain, _ = tokenize(base, text)
        if plain != ids:
            raise RuntimeError(f"tokenize {name}: with_pieces ids differ from plain ids")
        out.append({"name": name, "text": text, "tokens": ids, "pieces": pieces})
    return out


def record_generate(base, cases=None):
    out = []
    for case in cases or [(n, k, s, N_PREDICT) for n, k, s in GENERATE_CASES]:
        name, kind, spec, n_predict = case
        if kind == "chat":
            messages = spec
            prompt = http_json(base, "/apply-template", {"messages": messages})["prompt"]
        elif kind == "tokens":
            messages = None
            prompt = None
            prompt_tokens = tokenize(base, LONG_TEXT, add_special=False)[0][:spec]
            if len(prompt_tokens) != spec:
                raise RuntimeError(f"{name}: LONG_TEXT has only {len(prompt_tokens)} tokens")
        else:
            messages = None
            prompt = spec
        if prompt is not None:
            prompt_tokens, _ = tokenize(base, prompt, add_special=False)
            with_special, _ = tokenize(base, prompt, add_special=True)
            if with_special != prompt_tokens:
                raise RuntimeError(f"{name}: add_special changes the prompt tokens: {with_special[:4]}...")
        body = {
            "prompt": prompt if prompt is not None else prompt_tokens, "n_predict": n_predict,
            "temperature": 0, "top_k": 1, "seed": 0,
            "cache_prompt": False, "n_probs": N_PROBS, "return_tokens": True,
        }
        if cases is not None:
            body["ignore_eos"] = True
        resp = http_json(base, "/completion", body)
        output_tokens = [int(t) for t in resp["tokens"]]
        if resp.get("tokens_evaluated") not in (None, len(prompt_tokens)):
            raise RuntimeError(f"{name}: server evaluated {resp['tokens_evaluated']} prompt tokens, "
                               f"/tokenize gave {len(prompt_tokens)}")
        probs = resp.get("completion_probabilities", [])
        if len(probs) != len(output_tokens):
            raise RuntimeError(f"{name}: {len(probs)} prob entries for {len(output_tokens)} tokens")
        top = []
        near_ties = []
        for i, (tok, p) in enumerate(zip(output_tokens, probs)):
            if int(p["id"]) != tok:
                raise RuntimeError(f"{name}: prob entry {i} is for token {p['id']}, generated {tok}")
            cands = [[int(c["id"]), float(c["logprob"])] for c in p["top_logprobs"]]
            if cands and cands[0][0] != tok:
                print(f"warning: {name} pos {i}: greedy token {tok} is not top-1 {cands[0][0]}",
                      file=sys.stderr)
            if len(cands) >= 2 and math.exp(cands[1][1] - cands[0][1]) >= 0.99:
                near_ties.append(i)
            top.append(cands)
        entry = {"name": name, "kind": kind}
        if messages is not None:
            entry["messages"] = messages
        entry.update({
            "prompt": prompt if prompt is not None else "",
            "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens,
            "output_text": resp["content"],
            "n_generated": len(output_tokens),
            "stop_type": resp.get("stop_type"),
            "stopped_eos": resp.get("stop_type") == "eos",
            "top_logprobs": top,
            "near_tie_positions": near_ties,
        })
        print(f"{name}: {len(prompt_tokens)} prompt tokens, {len(output_tokens)} generated "
              f"({entry['stop_type']}), near ties {near_ties}: {resp['content'][:70]!r}", file=sys.stderr)
        out.append(entry)
    return out


def server_version(binary):
    try:
        r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


def dumps_compact_lists(obj):
    """json.dumps(indent=1, ensure_ascii=False), except that a list whose items are all scalars
    (token ids, pieces) or all lists of scalars ([id, logprob] pairs) is written on one line."""

    def scalar(x):
        return x is None or isinstance(x, (bool, int, float, str))

    def inline(x):
        return isinstance(x, list) and all(
            scalar(y) or (isinstance(y, list) and all(scalar(z) for z in y)) for y in x)

    def enc(o, level):
        pad = " " * (level + 1)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [pad + json.dumps(k, ensure_ascii=False) + ": " + enc(v, level + 1) for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
        if isinstance(o, list):
            if inline(o):
                return json.dumps(o, ensure_ascii=False)
            items = [pad + enc(v, level + 1) for v in o]
            return "[\n" + ",\n".join(items) + "\n" + " " * level + "]"
        return json.dumps(o, ensure_ascii=False)

    text = enc(obj, 0)
    assert json.loads(text) == obj
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=DEFAULT_SERVER)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--long", action="store_true",
                    help="record the long generations (LONG_CASES) into --out instead "
                         "(default tests/fixtures/llamacpp/smollm2-135m-q4_1-long.json)")
    ap.add_argument("--allow-short", action="store_true",
                    help=f"do not fail when a generation has fewer than {MIN_GENERATED} tokens")
    a = ap.parse_args()
    if a.long and a.out == DEFAULT_OUT:
        a.out = DEFAULT_OUT.replace(".json", "-long.json")

    if not os.path.isfile(a.llama_server):
        sys.exit(f"llama-server not found at {a.llama_server} (build it as in ANCHORS.md)")
    if not os.path.isfile(a.model):
        sys.exit(f"model not found at {a.model}")

    server = Server(a.llama_server, a.model, free_port())
    try:
        server.start()
        props = http_json(server.base, "/props")
        if a.long:
            tok = []
            gen = record_generate(server.base, LONG_CASES)
        else:
            tok = record_tokenize(server.base)
            gen = record_generate(server.base)
    finally:
        server.stop()

    version = server_version(a.llama_server)
    short = [(g["name"], g["n_generated"]) for g in gen if g["n_generated"] < MIN_GENERATED]
    server_args = ["-m", os.path.basename(a.model)] + server.args[2:]
    server_args = [x for i, x in enumerate(server_args)
                   if not (x == "--port" or (i > 0 and server_args[i - 1] == "--port"))]
    fixture = {
        "model_file": os.path.basename(a.model),
        "model_sha256": sha256_file(a.model),
        "llama_cpp_version": {
            "build_info": props.get("build_info"),
            "version_output": version,
        },
        "server_args": server_args,
        "notes": [
            "Recorded by scripts/llamacpp_reference.py with llama-server; do not edit by hand.",
            "tokenize: POST /tokenize {content, add_special: false, parse_special: true}.",
            ("generate (--long): POST /completion {prompt (text, or token ids for kind tokens: the "
             "first N tokens of LONG_TEXT), n_predict (per case), temperature: 0, top_k: 1, seed: 0, "
             "cache_prompt: false, n_probs: %d, return_tokens: true, ignore_eos: true}" % N_PROBS
             if a.long else
             "generate: POST /completion {prompt, n_predict: %d, temperature: 0, top_k: 1, seed: 0, "
             "cache_prompt: false, n_probs: %d, return_tokens: true}" % (N_PREDICT, N_PROBS))
            + "; chat prompts rendered by POST /apply-template {messages} (GGUF chat template, "
            "add_generation_prompt).",
            "prompt_tokens: /tokenize of prompt, parse_special true; identical with add_special true/false "
            "(add_bos_token=false).",
            "top_logprobs[i]: top-%d [token_id, natural-log prob] over the full vocabulary (raw logits "
            "softmax, before sampling) at generated position i; output_tokens[i] is its top-1." % N_PROBS,
            "near_tie_positions: positions where p(top2) >= 0.99 * p(top1); greedy outputs may "
            "legitimately diverge there.",
        ],
        "chat_template": props.get("chat_template"),
        "eos_token": props.get("eos_token"),
        "tokenize": tok,
        "generate": gen,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(dumps_compact_lists(fixture))
        f.write("\n")
    print(f"wrote {a.out}: {len(tok)} tokenize cases, {len(gen)} generate cases", file=sys.stderr)
    if short:
        msg = f"generations shorter than {MIN_GENERATED} tokens: {short}"
        if a.allow_short:
            print("warning: " + msg, file=sys.stderr)
        else:
            sys.exit(msg + " (change those prompts, or pass --allow-short)")


if __name__ == "__main__":
    main()
