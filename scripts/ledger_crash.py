#!/usr/bin/env python3
"""Crash safety of the ledger: SIGKILL a settlement loop at random points, restart it on the same
ledger, repeat; then let it finish and check every invariant and that nothing was paid twice or
lost (see crates/ledger-store/src/bin/ledger-crash-loop.rs).

    scripts/ledger_crash.py --bin target/debug/ledger-crash-loop --url sqlite:///tmp/l.db \
        --kills 100 --requests 400 --seed 1

The URL must name an empty ledger (a new SQLite path or an empty PostgreSQL database).
"""
import argparse
import random
import signal
import subprocess
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", required=True, help="the ledger-crash-loop executable")
    p.add_argument("--url", required=True, help="sqlite://PATH or postgres://... (empty)")
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--max-delay", type=float, default=0.4,
                   help="seconds: each run is killed after a uniform random delay up to this")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    killed = finished_early = 0
    start = time.time()
    for k in range(a.kills):
        proc = subprocess.Popen([a.bin, "run", a.url, str(a.requests)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.0, a.max_delay))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        if proc.returncode not in (0, -signal.SIGKILL):
            err = proc.stderr.read().decode(errors="replace")
            print(f"run {k} failed with {proc.returncode}:\n{err}", file=sys.stderr)
            return 1
        if proc.returncode == 0:
            finished_early += 1
    final = subprocess.run([a.bin, "run", a.url, str(a.requests)], capture_output=True, text=True)
    if final.returncode != 0:
        print(f"final run failed:\n{final.stderr}", file=sys.stderr)
        return 1
    check = subprocess.run([a.bin, "check", a.url, str(a.requests)], capture_output=True, text=True)
    resumed = final.stdout.split("\n")[0]
    print(f"{killed} SIGKILLs at random points ({finished_early} runs finished before their kill) "
          f"in {time.time() - start:.1f} s; the final run: {resumed}")
    print(check.stdout.strip())
    if check.returncode != 0:
        print(f"check failed:\n{check.stderr}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
