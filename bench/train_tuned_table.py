#!/usr/bin/env python3
"""Tables of a learning-rate grid of `plexus bench train` runs (bench/train_tuned.sh).

Usage: train_tuned_table.py RESULTS.jsonl [MORE.jsonl ...]

Prints two Markdown tables:
1. the grid: mean held-out loss over the seeds of the synchronous run and of every DiLoCo
   setting at every inner learning rate;
2. each side at its own best learning rate (the lowest mean held-out loss over the seeds, among
   learning rates every seed ran): DiLoCo against the synchronous run at the synchronous run's
   best learning rate, seed by seed, and whether the issue's target is met on the worst seed.

Rows of `--no-sync` runs (sync null) take the synchronous run from the other files (the same
seed and learning rate); "fewer bytes" divides that run's bytes by DiLoCo's.
"""
import json
import statistics
import sys
from collections import defaultdict

from train_table import target


def label(key):
    h, codec, ef, outer = key
    return f"H={h} {codec}{'+EF' if ef else ''}" + (f", outer {outer}" if outer else "")


# The outer step `plexus bench train` uses when not told: DiLoCo's Nesterov for dense codecs,
# SparseLoCo's plain SGD (error feedback in place of momentum) for sparse ones.
DEFAULT_OUTER = {False: "Nesterov { lr: 0.7, momentum: 0.9 }", True: "Sgd { lr: 1.0 }"}


def outer_label(r):
    """The run's outer step, empty when it is its codec's default."""
    o = r.get("outer", "")
    if o == DEFAULT_OUTER[r["codec"].startswith("sparse")]:
        return ""
    return o.replace("{ ", "").replace(" }", "").replace("lr: ", "").replace("momentum: ", "m ")


def best(losses_by_lr, seeds):
    """The learning rate with the lowest mean loss among those every seed ran."""
    full = {lr: v for lr, v in losses_by_lr.items() if set(v) >= seeds}
    if not full:
        return None
    return min(full, key=lambda lr: statistics.mean(full[lr][s] for s in seeds))


def main(paths):
    rows = [json.loads(l) for p in paths for l in open(p) if l.strip()]
    seeds = {r["seed"] for r in rows}
    sync = defaultdict(dict)  # lr -> seed -> (loss, accuracy)
    sync_bytes = {}  # seed -> bytes per worker (the same at every learning rate)
    dil = defaultdict(lambda: defaultdict(dict))  # key -> lr -> seed -> row
    for r in rows:
        if "inner_lr" not in r:
            sys.exit("a row without inner_lr: runs of `plexus bench train` before af448da")
        lr, seed = r["inner_lr"], r["seed"]
        if r["sync"] is not None:
            seen = (r["sync"]["loss"], r["sync"]["accuracy"])
            if sync[lr].setdefault(seed, seen) != seen:
                sys.exit(f"two synchronous runs at lr {lr:g}, seed {seed} disagree")
            sync_bytes[seed] = r["sync"]["bytes_per_worker"]
        key = (r["inner_steps"], r["codec"], r["error_feedback"], outer_label(r))
        dil[key][lr][seed] = r
    lrs = sorted(set(sync) | {lr for k in dil for lr in dil[k]})
    keys = sorted(dil, key=lambda k: (not k[1].startswith("f32"), k[1], k[0]))
    s = sorted(seeds)

    print(f"Mean held-out loss over seeds {', '.join(map(str, s))} at each inner learning rate "
          "(the best of each row in bold):\n")
    print("| setting | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("|---|" + "---|" * len(lrs))
    grid = [("sync", {lr: {sd: v[0] for sd, v in sync[lr].items()} for lr in sync})]
    grid += [(label(k), {lr: {sd: r["diloco"]["loss"] for sd, r in dil[k][lr].items()}
                         for lr in dil[k]}) for k in keys]
    for name, by_lr in grid:
        top = best(by_lr, seeds)
        cells = []
        for lr in lrs:
            v = by_lr.get(lr, {})
            if set(v) >= seeds:
                m = f"{statistics.mean(v[sd] for sd in s):.4f}"
                cells.append(f"**{m}**" if lr == top else m)
            else:
                cells.append("")
        print(f"| {name} | " + " | ".join(cells) + " |")

    sync_loss = {lr: {sd: v[0] for sd, v in sync[lr].items()} for lr in sync}
    sync_lr = best(sync_loss, seeds)
    if sync_lr is None:
        sys.exit("no learning rate has a synchronous run for every seed")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    print(f"\nEach at its own best learning rate; DiLoCo against sync at lr {sync_lr:g}:\n")
    print("| setting | best lr | loss (seeds) | sync loss at its best lr | DiLoCo vs sync (seeds) "
          "| exact match sync / DiLoCo | fewer bytes | target | met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in keys:
        by_lr = {lr: {sd: r["diloco"]["loss"] for sd, r in dil[k][lr].items()} for lr in dil[k]}
        lr = best(by_lr, seeds)
        if lr is None:
            continue
        runs = [dil[k][lr][sd] for sd in s]
        ratios = [r["diloco"]["loss"] / sync_loss[sync_lr][sd] - 1 for r, sd in zip(runs, s)]
        fewer = statistics.mean(sync_bytes[sd] / r["diloco"]["bytes_per_worker"]
                                for r, sd in zip(runs, s))
        accs_s = [sync[sync_lr][sd][1] for sd in s]
        accs_d = [r["diloco"]["accuracy"] for r in runs]
        acc = (f"{pct(statistics.mean(accs_s))} / {pct(statistics.mean(accs_d))}"
               if None not in accs_s + accs_d else "n/a")
        t = target(*k[:3])
        if t is None:
            goal, met = "", ""
        else:
            goal = f"<= +{100 * t[0]:.0f}% at >= {t[1]}x"
            bad = [w for w, b in (("loss", max(ratios) > t[0]), ("bytes", fewer < t[1])) if b]
            met = "yes" if not bad else "no: " + ", ".join(bad)
        print(f"| {label(k)} | {lr:g} "
              f"| {', '.join('%.4f' % r['diloco']['loss'] for r in runs)} "
              f"| {', '.join(f'{sync_loss[sync_lr][sd]:.4f}' for sd in s)} "
              f"| {100 * statistics.mean(ratios):+.1f}% ({', '.join(f'{100 * x:+.1f}%' for x in ratios)}) "
              f"| {acc} | {fewer:.1f}x | {goal} | {met} |")


if __name__ == "__main__":
    main(sys.argv[1:])
