#!/usr/bin/env python3
"""Streams the same greedy chat N times through a running gateway with the official `openai`
client and prints the texts as one JSON line: `{"texts": [...]}`.

    python3 crates/plexus/tests/audit_client.py http://127.0.0.1:PORT API_KEY N \
        [SYSTEM_REPEATS [MAX_TOKENS [vary]]]

SYSTEM_REPEATS > 0 adds a system prompt of that many sentences (about 25 tokens each), for
prompts long enough to take the tiled attention kernel (64 rows or more). MAX_TOKENS is 24 by
default. `vary` asks a different question in each chat (cycling through a list), so that the
answers are not the same N times.

Used by tests/audit.rs: while a cheating node is caught mid-stream, every stream must still
complete with the honest text. Exits 3 when the `openai` package is missing (install: pip
install -r scripts/requirements-ci.txt).
"""

import json
import sys

try:
    from openai import OpenAI
except ImportError:
    print(
        "the `openai` package is not importable; install it with "
        "`pip install -r scripts/requirements-ci.txt`",
        file=sys.stderr,
    )
    sys.exit(3)


def main():
    url, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    max_tokens = int(sys.argv[5]) if len(sys.argv) > 5 else 24
    mode = sys.argv[6] if len(sys.argv) > 6 else "same"
    if mode not in ("same", "vary"):
        sys.exit(f"unknown question mode {mode!r}: same or vary")
    vary = mode == "vary"
    system = (
        "You are a careful assistant. Answer in plain English, in short paragraphs, with "
        "concrete examples, and say when you are unsure. "
    ) * repeats
    messages = [{"role": "system", "content": system}] if repeats else []
    questions = [
        "Name three colours of the rainbow.",
        "Why is the sky blue?",
        "Give me a tip for learning to cook.",
        "What does a bee do all day?",
        "Describe a rainy morning in a small town.",
        "How do I keep a plant alive indoors?",
        "Write two lines about the sea.",
        "What is a good name for a grey cat?",
        "Explain what a library is to a child.",
        "Suggest a weekend walk near a river.",
        "What should I pack for a day at the beach?",
        "Tell me something surprising about the moon.",
    ]
    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    texts = []
    for i in range(n):
        question = questions[i % len(questions)] if vary else questions[0]
        stream = client.chat.completions.create(
            model=model,
            messages=messages + [{"role": "user", "content": question}],
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
        )
        parts = []
        finish = None
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        text = "".join(parts)
        print(f"stream {i}: finish={finish} text={text!r}", file=sys.stderr)
        if finish not in ("stop", "length") or not text:
            raise AssertionError(f"stream {i} did not complete: {finish} {text!r}")
        texts.append(text)
    print(json.dumps({"texts": texts}))


if __name__ == "__main__":
    main()
