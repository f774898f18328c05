#!/usr/bin/env python3
"""Serving throughput: N streamed chat completions with distinct prompts sent at once to an
OpenAI-compatible server (plexus gateway, plexus up, llama-server); prints one JSON line per
level: aggregate completion tokens per second over the wall time, median and worst time to
first content chunk. Stdlib only (asyncio + raw HTTP/1.1), so its own cost is the same for
every server.

    python3 bench/serving.py URL MODEL LEVEL [LEVEL...]
"""
import asyncio
import json
import os
import statistics
import sys
import time
from urllib.parse import urlparse

TOPICS = ["the sea", "bread", "a red bicycle", "winter", "owls", "chess", "rivers", "tea",
          "clocks", "mountains", "bees", "trains", "the moon", "gardens", "violins", "deserts"]


# `API_KEY` (the key `plexus up` prints) is sent as a bearer token when set.
AUTH = (f"Authorization: Bearer {os.environ['API_KEY']}\r\n"
        if os.environ.get("API_KEY") else "")


def prompt(i):
    return (f"Request {i}: write a short story about {TOPICS[i % len(TOPICS)]} "
            f"and number {i * 7 + 3}.")


async def one(url, model, i, max_tokens):
    u = urlparse(url)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt(i)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    path = (u.path.rstrip("/") or "") + "/v1/chat/completions"
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\n"
                  "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                  f"{AUTH}"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    await writer.drain()
    status = (await reader.readline()).decode()
    if " 200" not in status:
        rest = await reader.read()
        raise RuntimeError(f"{status.strip()} {rest[-300:]!r}")
    ttft, chunks, usage = None, 0, None
    while True:
        line = await reader.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        try:
            ev = json.loads(data)
        except ValueError:
            continue  # a chunked-encoding size line glued to nothing: skip
        if ev.get("usage"):
            usage = ev["usage"]
        for c in ev.get("choices") or []:
            if (c.get("delta") or {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - started
    writer.close()
    tokens = usage["completion_tokens"] if usage else chunks
    return ttft or 0.0, tokens


async def level(url, model, n, max_tokens):
    t = time.perf_counter()
    runs = await asyncio.gather(*(one(url, model, i, max_tokens) for i in range(n)))
    wall = time.perf_counter() - t
    tokens = sum(r[1] for r in runs)
    ttfts = [r[0] for r in runs]
    return {"streams": n, "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 1), "median_ttft_s": round(statistics.median(ttfts), 3),
            "worst_ttft_s": round(max(ttfts), 3)}


def main():
    url, model, levels = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3:]]
    max_tokens = 64
    asyncio.run(one(url, model, 999, 8))  # warm-up
    for n in levels:
        print(json.dumps(asyncio.run(level(url, model, n, max_tokens))), flush=True)


if __name__ == "__main__":
    main()
