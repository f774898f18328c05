#!/usr/bin/env python3
"""A TCP relay that delays every chunk by a fixed one-way delay, in both directions.

The kernel here has no `netem` qdisc, so the slow-link benchmarks (bench/slow_link.sh) and
test (crates/plexus/tests/slow_link.rs) put this relay between the client and each node; rate
limits stay in `tc tbf` on the veth pairs.

    delay_relay.py --listen 127.0.0.1:0 --target 10.211.1.2:4001 --delay-ms 20 [--mark 42]

- Each chunk read from one side is written to the other side `delay` after it was read, in
  order (one FIFO per direction, so nothing is reordered); reading goes on while earlier
  chunks wait, so throughput is not limited by the delay (TCP's own acknowledgements end at
  the relay and are not delayed: the relay models propagation delay, not a window limit).
- `--mark` sets SO_MARK on the sockets to the target, so a policy-routing rule can make the
  target reachable from this relay only (bench/netns.sh).
- Prints `listening on HOST:PORT` once bound. Commands on stdin, one a line:
  `stats` prints `stats up=BYTES down=BYTES chunks=N late_us_max=US late_us_mean=US`
  (up: client to target; late: how far past its due time a chunk was written);
  `delay MS` changes the delay for chunks read from then on. End of stdin stops the relay
  (after printing the stats once more). With RELAY_LOG=FILE every chunk written is logged
  there as `TIME >|< BYTES`.
"""

import argparse
import asyncio
import os
import socket
import sys


class Stats:
    def __init__(self):
        self.up = 0
        self.down = 0
        self.chunks = 0
        self.late_max = 0.0
        self.late_sum = 0.0

    def line(self):
        mean = self.late_sum / self.chunks if self.chunks else 0.0
        return (
            f"stats up={self.up} down={self.down} chunks={self.chunks} "
            f"late_us_max={self.late_max * 1e6:.0f} late_us_mean={mean * 1e6:.0f}"
        )


STATS = Stats()
LOG = open(os.environ["RELAY_LOG"], "a") if os.environ.get("RELAY_LOG") else None
DELAY = [0.0]


def nodelay(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pump(reader, writer, up):
    """Copies reader -> writer, each chunk `DELAY` after it was read, in order."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(maxsize=4096)

    async def read_side():
        try:
            while True:
                data = await reader.read(1 << 16)
                due = loop.time() + DELAY[0]
                await queue.put((due, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await queue.put((loop.time(), b""))

    async def write_side():
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                late = max(0.0, loop.time() - due)
                if LOG:
                    print(f"{loop.time():.4f} {'>' if up else '<'} {len(data)}", file=LOG, flush=True)
                writer.write(data)
                if up:
                    STATS.up += len(data)
                else:
                    STATS.down += len(data)
                STATS.chunks += 1
                STATS.late_sum += late
                STATS.late_max = max(STATS.late_max, late)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    await asyncio.gather(read_side(), write_side())


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--target", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--mark", type=int, default=0)
    a = p.parse_args()
    DELAY[0] = a.delay_ms / 1000.0
    lhost, lport = a.listen.rsplit(":", 1)
    thost, tport = a.target.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    # Tighter timers than the default: asyncio wakes a sleeper up to `clock_resolution`
    # early and epoll rounds timeouts up to whole milliseconds.
    loop.slow_callback_duration = 1.0

    async def on_client(creader, cwriter):
        try:
            await relay(creader, cwriter)
        except asyncio.CancelledError:
            pass  # shutting down

    async def relay(creader, cwriter):
        nodelay(cwriter)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if a.mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, a.mark)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (thost, int(tport)))
            treader, twriter = await asyncio.open_connection(sock=sock)
        except OSError as e:
            print(f"connect to {a.target} failed: {e}", file=sys.stderr, flush=True)
            sock.close()
            cwriter.close()
            return
        nodelay(twriter)
        await asyncio.gather(
            pump(creader, twriter, True), pump(treader, cwriter, False)
        )
        for w in (twriter, cwriter):
            w.close()

    server = await asyncio.start_server(on_client, lhost, int(lport))
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)

    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while True:
        line = (await stdin.readline()).decode().strip()
        if not line and stdin.at_eof():
            break
        if line == "stats":
            print(STATS.line(), flush=True)
        elif line.startswith("delay "):
            DELAY[0] = float(line.split()[1]) / 1000.0
            print(f"delay {DELAY[0] * 1000:g}", flush=True)
    print(STATS.line(), flush=True)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
