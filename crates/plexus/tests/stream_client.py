#!/usr/bin/env python3
"""Streams one chat completion with the official `openai` client and reports each chunk.

    python3 crates/plexus/tests/stream_client.py http://127.0.0.1:PORT MODEL MAX_TOKENS PROMPT [SEED]

Greedy (temperature 0) without SEED; with it, sampled at temperature 0.8, top_p 0.95 with that
seed (the same seed gives the same text).

Prints {"start": unix_seconds} just before the request goes out, one JSON line per content
chunk, {"i": n, "t": unix_seconds, "text": "..."}, then
{"done": true, "finish": reason} (or {"error": "..."} and exit 1). The test that runs it
(crates/plexus/tests/takeover.rs) kills nodes while it reads these lines.
"""

import json
import sys
import time

try:
    from openai import OpenAI
except ImportError:
    print("the `openai` package is not importable; pip install -r scripts/requirements-ci.txt",
          file=sys.stderr)
    sys.exit(3)

url, model, max_tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if len(sys.argv) > 5:
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": int(sys.argv[5])}
else:
    sampling = {"temperature": 0}
client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
print(json.dumps({"start": time.time()}), flush=True)
try:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        stream=True,
        **sampling,
    )
    i = 0
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            print(json.dumps({"i": i, "t": time.time(), "text": choice.delta.content}), flush=True)
            i += 1
        if choice.finish_reason:
            finish = choice.finish_reason
    print(json.dumps({"done": True, "finish": finish}), flush=True)
except Exception as e:  # noqa: BLE001 - report any failure to the test
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    sys.exit(1)
