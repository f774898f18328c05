#!/usr/bin/env python3
"""What audits cost a `plexus up` network in decode speed: the same greedy chats through the
same layout with every job audited (no ledger: nothing at stake, so Proof of Sampling audits
every job; nodes load each other's spans to check them) and with audits off
(`--audit-probability 0`), started one after the other in one run, so the figure is a ratio.

    python3 bench/audit_cost.py --plexus target/debug/plexus --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf

Prints one JSON object: per configuration the completion tokens, wall seconds and tokens/s of
CHATS sequential chats of TOKENS tokens (after one warm-up chat), the gateway's audit counters,
and the ratio of the audited to the unaudited tokens/s.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request


def post(url, body):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def metrics(base):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for name in ("plexus_audits_total", "plexus_audits_unavailable_total", "plexus_audit_calls_passed_total"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else None
    return out


def run(args, extra):
    cache = tempfile.mkdtemp(prefix="plexus-audit-cost-")
    cmd = [args.plexus, "up", "--nodes", str(args.nodes), "--threads", "1", "--port", "0",
           "--ledger", "none", "--model", args.model] + extra
    env = dict(os.environ, PLEXUS_CACHE_DIR=cache)
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        base = None
        deadline = time.time() + 180
        while time.time() < deadline:
            line = up.stdout.readline()
            if not line:
                break
            if line.startswith("API: "):
                base = line.split()[1].rstrip("/").removesuffix("/v1")
                break
        if base is None:
            sys.exit("plexus up did not print its API URL")
        # Let the nodes settle (spans loaded ahead for checks) before timing.
        time.sleep(args.settle)
        models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=30).read())
        model = models["data"][0]["id"]

        def chat(i):
            return post(base + "/v1/chat/completions", {
                "model": model, "temperature": 0, "max_tokens": args.tokens,
                "messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
            })

        chat(-1)
        before = metrics(base)
        t0 = time.time()
        tokens = sum(chat(i)["usage"]["completion_tokens"] for i in range(args.chats))
        wall = time.time() - t0
        after = metrics(base)
        return {
            "args": extra,
            "completion_tokens": tokens,
            "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "audits": {k: (after[k] - before[k]) if after[k] is not None and before[k] is not None else None
                       for k in after},
        }
    finally:
        up.terminate()
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plexus", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--chats", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--settle", type=float, default=8.0)
    args = p.parse_args()
    audited = run(args, [])
    plain = run(args, ["--audit-probability", "0"])
    print(json.dumps({
        "nodes": args.nodes,
        "audited": audited,
        "unaudited": plain,
        "ratio": round(audited["tokens_per_s"] / plain["tokens_per_s"], 3),
        "machine": f"{os.uname().nodename}, {os.cpu_count()} cpus",
    }, indent=1))


if __name__ == "__main__":
    main()
