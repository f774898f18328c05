#!/usr/bin/env python3
"""Gateway overhead: latency the gateway adds between a backend producing a token and the
client receiving it, at C concurrent SSE streams.

Runs against `plexus gateway --bench-echo-ms PACE` (its "tokens" are the unix microseconds at
which the backend handed them to the gateway). For every received chunk: added = receive time -
stamp. Reports p50 / p99 / max over all chunks of all streams, per concurrency level.

    python3 bench/gateway_overhead.py http://127.0.0.1:PORT 1 32

With PLEXUS_KEY set, every request carries `Authorization: Bearer $PLEXUS_KEY` (a gateway
with a ledger meters and charges it).

Stdlib only (asyncio sockets, HTTP/1.1), so the client's own cost is small and the same at
every level; it is included in the figure (an upper bound on the gateway's share).
"""

import asyncio
import json
import os
import sys
import time
from urllib.parse import urlparse

TOKENS = 64
KEY = os.environ.get("PLEXUS_KEY", "")
AUTH = f"Authorization: Bearer {KEY}\r\n" if KEY else ""


async def stream(host, port, model, samples):
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": TOKENS,
        "stream": True,
    }).encode()
    writer.write(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{AUTH}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
    )
    await writer.drain()
    while True:
        line = await reader.readline()
        if not line:
            break
        now = time.time_ns() // 1000
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            chunk = json.loads(line[6:])
        except ValueError:
            continue
        for c in chunk.get("choices", []):
            text = (c.get("delta") or {}).get("content") or ""
            # Merged pieces carry several stamps; the first is the oldest.
            stamps = [int(s) for s in text.split()]
            samples.extend(now - s for s in stamps)
    writer.close()


async def level(url, model, c):
    u = urlparse(url)
    samples = []
    await asyncio.gather(*(stream(u.hostname, u.port, model, samples) for _ in range(c)))
    samples.sort()
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] / 1000
    return len(samples), pick(0.5), pick(0.99), samples[-1] / 1000


def main():
    url, levels = sys.argv[1], [int(x) for x in sys.argv[2:]] or [1, 32]
    import urllib.request
    req = urllib.request.Request(url + "/v1/models",
                                 headers={"Authorization": f"Bearer {KEY}"} if KEY else {})
    models = json.load(urllib.request.urlopen(req))
    model = models["data"][0]["id"]
    print("| streams | chunks | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for c in levels:
        n, p50, p99, worst = asyncio.run(level(url, model, c))
        print(f"| {c} | {n} | {p50:.2f} | {p99:.2f} | {worst:.2f} |")


if __name__ == "__main__":
    main()
