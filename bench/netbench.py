#!/usr/bin/env python3
"""Network benchmarks of the plexus binary: split inference on loopback, and slow links.

    netbench.py split --plexus BIN --model M [--rounds 3] [--tokens 128] [--json OUT]
    netbench.py slow  --plexus BIN --model M [--delay-ms 20] [--rate 100mbit] [--tokens 32]

`split`: the whole model in one process (`plexus gateway --model M`, no bootstrap) against
chains of 2 and 3 `plexus node` processes on 127.0.0.1 behind `plexus gateway --bootstrap`,
with f16 and f32 activations, node processes at `--threads 1` and at the default (all cores).
Every configuration serves the same greedy completion (fixed prompt, N tokens) through the
OpenAI API with `stream: true`; per-token latency is the time between the first and the last
SSE chunk over the chunks between (one chunk per token: the client keeps up, so the gateway
never merges pieces), tokens/s its inverse; median over rounds. Bytes per token come from the
gateway's /metrics (`plexus_wire_sent_bytes_total + plexus_wire_received_bytes_total` over
`plexus_chain_tokens_total`, prompt included). Configurations are interleaved round by round,
and each round runs the in-process baseline again, so every ratio compares runs minutes apart.

`slow`: the same chains (1, 2, 3 stages), every node in its own network namespace behind a
rate-limited veth (bench/netns.sh) and a delaying relay (bench/delay_relay.py); prints the
measured per-token latency against stages x RTT + compute + transfer, where compute is the
same chain's per-token latency through the same relays at 0 ms.
"""

import argparse
import json
import os
import tempfile
import statistics
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
# Every process gets its own data dir, hence its own key: processes sharing the default data
# dir share one peer id and cannot see each other.
SCRATCH = tempfile.TemporaryDirectory(prefix="plexus-netbench-")
_dirs = [0]


def fresh_dir():
    _dirs[0] += 1
    return os.path.join(SCRATCH.name, str(_dirs[0]))
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle:"
MODEL_ID = "SmolLM2-135M-Instruct"


class Procs:
    """Child processes, killed (by pid) on exit."""

    def __init__(self):
        self.procs = []

    def start(self, argv, **kw):
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p)


def read_until(p, prefix):
    """Reads p's stdout until a line starting with prefix; returns (the rest, lines read)."""
    seen = []
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before printing {prefix!r}: {seen}")
        line = line.strip()
        seen.append(line)
        if line.startswith(prefix):
            return line[len(prefix):], seen


def start_node(procs, plexus, model, span, listen, threads, ns=None, data_dir=None):
    argv = [plexus, "node", "--model", model, "--span", span, "--listen", listen]
    data_dir = data_dir or fresh_dir()
    if threads:
        argv += ["--threads", str(threads)]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if ns:
        argv = ["ip", "netns", "exec", ns] + argv
    p = procs.start(argv, stderr=subprocess.DEVNULL)
    addr, seen = read_until(p, "listening on ")
    peer = next(l.split()[1] for l in seen if l.startswith("peer "))
    return p, peer, addr


def start_gateway(procs, plexus, model, boot, wire="f16", threads=None, extra=()):
    argv = [plexus, "gateway", "--model", model, "--port", "0", "--max-concurrent", "64"]
    argv += ["--data-dir", fresh_dir(), "--listen", "/ip4/127.0.0.1/tcp/0"] if boot else []
    for b in boot:
        argv += ["--bootstrap", b]
    if boot:
        argv += ["--wire", wire]
    if threads:
        argv += ["--threads", str(threads)]
    argv += list(extra)
    p = procs.start(argv, stderr=subprocess.DEVNULL)
    url, _ = read_until(p, "listening on ")
    return p, url


def stream(url, max_tokens, prompt=PROMPT):
    """One streamed greedy completion; returns (text, chunk arrival times, request time)."""
    body = json.dumps(
        {
            "model": MODEL_ID,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    req = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    sent = time.perf_counter()
    times, text = [], []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            piece = json.loads(line[6:])["choices"][0].get("text", "")
            if piece:
                times.append(now)
                text.append(piece)
    return "".join(text), times, sent


def per_token_ms(times):
    return (times[-1] - times[0]) * 1e3 / (len(times) - 1)


def metrics(url):
    out = {}
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def wire_bytes_and_tokens(url):
    m = metrics(url)
    return (
        m.get("plexus_wire_sent_bytes_total", 0) + m.get("plexus_wire_received_bytes_total", 0),
        m.get("plexus_chain_tokens_total", 0),
    )


def wait_ready(url, timeout=90):
    deadline = time.time() + timeout
    while True:
        try:
            stream(url, 2)
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


SPLITS = {1: ["0..30"], 2: ["0..15", "15..30"], 3: ["0..10", "10..20", "20..30"]}


class Chain:
    """Nodes + a gateway bootstrapping to them (or the in-process gateway for stages=0)."""

    def __init__(self, procs, a, stages, wire, threads):
        self.name = "in-process" if stages == 0 else f"{stages} nodes, {wire}, node threads {threads or 'default'}"
        self.stages, self.wire, self.threads = stages, wire, threads
        self.nodes = []
        if stages == 0:
            self.gw, self.url = start_gateway(procs, a.plexus, a.model, [], threads=a.local_threads)
        else:
            boot = []
            for span in SPLITS[stages]:
                p, peer, addr = start_node(procs, a.plexus, a.model, span, "/ip4/127.0.0.1/tcp/0", threads)
                self.nodes.append(p)
                boot.append(addr)
            self.gw, self.url = start_gateway(procs, a.plexus, a.model, boot, wire)
        wait_ready(self.url)
        stream(self.url, 16)  # warm-up

    def stop(self, procs):
        for p in [self.gw] + self.nodes:
            procs.stop(p)


def split(a):
    procs = Procs()
    configs = [(0, None, None)]
    for stages in (2, 3):
        for wire in ("f16", "f32"):
            for threads in (1, None):
                configs.append((stages, wire, threads))
    results = {c: {"ms": [], "bytes": [], "text": None} for c in configs}
    try:
        for r in range(a.rounds):
            for c in configs:
                # One configuration's processes at a time: nodes of other chains would
                # compete for the two cores.
                chain = Chain(procs, a, *c)
                try:
                    b0, t0 = (wire_bytes_and_tokens(chain.url) if c[0] else (0, 0))
                    text, times, _ = stream(chain.url, a.tokens)
                    b1, t1 = (wire_bytes_and_tokens(chain.url) if c[0] else (0, 0))
                finally:
                    chain.stop(procs)
                ms = per_token_ms(times)
                res = results[c]
                res["ms"].append(ms)
                res["chunks"] = len(times)
                if t1 > t0:
                    res["bytes"].append((b1 - b0) / (t1 - t0))
                res["text"] = res["text"] or text
                print(f"round {r + 1} | {chain.name}: {ms:.2f} ms/token ({len(times)} chunks)", file=sys.stderr, flush=True)
    finally:
        procs.stop_all()
    base = statistics.median(results[configs[0]]["ms"])
    base_text = results[configs[0]]["text"]
    print(f"| configuration | per-token ms (median of {a.rounds}) | tok/s | vs in-process | added ms per boundary | bytes/token | text = in-process |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for c in configs:
        res = results[c]
        ms = statistics.median(res["ms"])
        stages = c[0]
        added = (ms - base) / (stages - 1) if stages > 1 else 0.0
        by = statistics.median(res["bytes"]) if res["bytes"] else 0.0
        same = "yes" if res["text"] == base_text else "no"
        name = "in-process (plexus gateway, no bootstrap)" if stages == 0 else f"{stages} nodes, {c[1]} wire, node `--threads {c[2] or 'default'}`"
        print(f"| {name} | {ms:.2f} | {1e3 / ms:.1f} | {ms / base:.2f}x | {added:+.2f} | {by:.0f} | {same} |")
        rows.append({"config": name, "stages": stages, "wire": c[1], "threads": c[2], "ms": res["ms"], "median_ms": ms, "bytes_per_token": by, "same_text": same})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"baseline_ms": base, "rows": rows}, f, indent=1)


def slow(a):
    procs = Procs()
    name, b, k = "plxbn", str(a.subnet), "3"
    netns = os.path.join(HERE, "netns.sh")
    subprocess.run(["bash", netns, "down", name, b, k], capture_output=True)
    subprocess.run(["bash", netns, "up", name, b, k, a.rate], check=True)
    rate_bits = float(a.rate.replace("mbit", "e6").replace("gbit", "e9"))
    relays = []
    try:
        print(f"| stages | compute ms/token (relays at 0 ms) | measured ms/token at {a.delay_ms:g} ms each way | model = stages x {2 * a.delay_ms:g} ms + compute + transfer | measured / model | relay bytes/token | relay lateness max ms |")
        print("|---|---|---|---|---|---|---|")
        for stages in (1, 2, 3):
            nodes, relays, boot = [], [], []
            for i, span in enumerate(SPLITS[stages], start=1):
                ip = f"10.{b}.{i}.2"
                p, peer, addr = start_node(procs, a.plexus, a.model, span, f"/ip4/{ip}/tcp/0", a.node_threads, ns=f"{name}{i}")
                port = addr.split("/tcp/")[1].split("/")[0]
                r = procs.start([sys.executable, os.path.join(HERE, "delay_relay.py"), "--listen", "127.0.0.1:0", "--target", f"{ip}:{port}", "--delay-ms", "0", "--mark", b])
                rport = read_until(r, "listening on ")[0].rsplit(":", 1)[1]
                nodes.append(p)
                relays.append(r)
                boot.append(f"/ip4/127.0.0.1/tcp/{rport}/p2p/{peer}")
            gw, url = start_gateway(procs, a.plexus, a.model, boot, a.wire)
            wait_ready(url)
            stream(url, 8)

            def relay_cmd(r, cmd):
                r.stdin.write(cmd + "\n")
                r.stdin.flush()
                return r.stdout.readline().strip()

            def relay_stats():
                tot, late = 0, 0
                for r in relays:
                    f = dict(kv.split("=") for kv in relay_cmd(r, "stats").split()[1:])
                    tot += int(f["up"]) + int(f["down"])
                    late = max(late, int(f["late_us_max"]))
                return tot, late

            compute = statistics.median(per_token_ms(stream(url, a.tokens)[1]) for _ in range(2))
            for r in relays:
                relay_cmd(r, f"delay {a.delay_ms}")
            b0, _ = relay_stats()
            _, t0 = wire_bytes_and_tokens(url)
            text, times, _ = stream(url, a.tokens)
            b1, late = relay_stats()
            _, t1 = wire_bytes_and_tokens(url)
            measured = per_token_ms(times)
            per_tok = (b1 - b0) / max(1, t1 - t0)
            transfer = per_tok * 8 / rate_bits * 1e3
            model = stages * 2 * a.delay_ms + compute + transfer
            print(f"| {stages} | {compute:.1f} | {measured:.1f} | {model:.1f} | {measured / model:.2f} | {per_tok:.0f} | {late / 1e3:.1f} |", flush=True)
            for p in [gw] + nodes + relays:
                procs.stop(p)
    finally:
        procs.stop_all()
        subprocess.run(["bash", netns, "down", name, b, k], capture_output=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["split", "slow"])
    p.add_argument("--plexus", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--local-threads", type=int, default=None)
    p.add_argument("--json")
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--wire", default="f16")
    p.add_argument("--node-threads", type=int, default=1)
    p.add_argument("--subnet", type=int, default=212)
    a = p.parse_args()
    {"split": split, "slow": slow}[a.mode](a)


if __name__ == "__main__":
    main()
