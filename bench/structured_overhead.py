#!/usr/bin/env python3
"""Constrained decoding overhead per token: decode time per token of the same greedy chat
request with and without a JSON schema, through a running gateway, streamed.

    python3 bench/structured_overhead.py http://127.0.0.1:PORT [ROUNDS] [API_KEY]

Per request: time from the first streamed token to the last, divided by the completion tokens
after the first (so prefill is left out). Free and schema requests alternate ROUNDS times
(default 5); prints the median ms/token of each, their ratio, and the mean time the gateway
spent computing a mask (its `/metrics` counters `plexus_grammar_mask_microseconds` /
`plexus_grammar_masks`). Start the gateway with a
release build, e.g.

    target/release/plexus gateway --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --port 8090 --ledger none

It also runs against llama-server (no /metrics there); bench/structured_overhead.sh runs both
in one go.
"""

import statistics
import sys
import time
import urllib.request

from openai import OpenAI

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "maxLength": 60}, "city": {"type": "string", "maxLength": 40}},
            "required": ["street", "city"],
        },
    },
    "required": ["name", "age", "hobbies", "address"],
}
MESSAGES = [{"role": "user", "content": "Describe a person who lives in Paris, as JSON."}]
MAX_TOKENS = 96


def per_token(client, model, schema):
    extra = {}
    if schema:
        extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, **extra,
    )
    first = last = None
    tokens = chunks = 0
    for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if any(c.delta.content for c in chunk.choices):
            first = first or now
            last = now
            chunks += 1
    # A server that sends no usage (or a zero count) streams one token per chunk.
    tokens = tokens or chunks
    if tokens < 2 or first is None:
        raise SystemExit(f"too few tokens ({tokens}) to time")
    return (last - first) / (tokens - 1) * 1000.0, tokens


def main():
    url = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    key = sys.argv[3] if len(sys.argv) > 3 else "unused"
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=key, max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    per_token(client, model, True)  # warm-up: builds the model's token trie once
    free, guided = [], []
    for _ in range(rounds):
        ms, n_free = per_token(client, model, False)
        free.append(ms)
        ms, n_guided = per_token(client, model, True)
        guided.append(ms)
    f, g = statistics.median(free), statistics.median(guided)
    print(f"free text:   {f:.2f} ms/token (median of {rounds}, {n_free} tokens)")
    print(f"json_schema: {g:.2f} ms/token (median of {rounds}, {n_guided} tokens)")
    print(f"overhead:    {g - f:+.2f} ms/token ({g / f:.2f}x)")
    # The gateway's own count of the time spent computing masks (all requests so far).
    req = urllib.request.Request(url.rstrip("/") + "/metrics", headers={"Authorization": f"Bearer {key}"})
    try:
        page = urllib.request.urlopen(req, timeout=30).read().decode()
    except OSError:
        return  # not a Plexus gateway (llama-server): no mask counters

    found = {}
    for line in page.splitlines():
        for name in ("plexus_grammar_masks_total", "plexus_grammar_mask_microseconds_total"):
            if line.startswith(name + " "):
                found[name] = float(line.split()[1])
    if len(found) == 2 and found["plexus_grammar_masks_total"] > 0:
        per = found["plexus_grammar_mask_microseconds_total"] / found["plexus_grammar_masks_total"]
        print(f"mask compute: {per / 1000:.3f} ms/token over {int(found['plexus_grammar_masks_total'])} masks (/metrics)")


if __name__ == "__main__":
    main()
