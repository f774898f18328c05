#!/usr/bin/env python3
"""Table and plot of `plexus bench train` results (one JSON object per line).

Usage: train_table.py RESULTS.jsonl [MORE.jsonl ...] (e.g. further seeds of some settings).
Prints a Markdown table (mean and spread over seeds per configuration, each DiLoCo figure
against the synchronous run of the same invocation, and whether the issue's target is met) and
writes an SVG plot of held-out loss against bytes sent per worker (log scale) next to the first
file.
"""
import json
import math
import statistics
import sys
from collections import defaultdict


def target(h, codec, ef):
    """The issue's target for a setting: (max loss ratio - 1, min bytes ratio) or None."""
    if codec.startswith("sparse") and ef:
        return (0.03, 1000)
    if h == 100 and codec.startswith("int8"):
        return (0.02, 400)
    if h == 100 and codec == "f32":
        return (0.02, 100)
    return None


def pct(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def main(paths):
    path = paths[0]
    rows = [json.loads(l) for p in paths for l in open(p) if l.strip()]
    groups = defaultdict(list)
    for r in rows:
        key = (r["inner_steps"], r["codec"], r["error_feedback"])
        groups[key].append(r)
    print("| H | codec | seeds | sync loss | DiLoCo loss | DiLoCo vs sync loss | sync acc | DiLoCo acc "
          "| bytes/worker sync | bytes/worker DiLoCo | fewer bytes | rejected / offered "
          "| modelled s sync / DiLoCo | target | met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    points = []
    order = sorted(groups, key=lambda k: (not k[1].startswith("f32"), k[1], k[0]))
    for key in order:
        g = groups[key]
        vals = lambda f: [f(r) for r in g]
        m = lambda f: statistics.mean(vals(f))
        sd = lambda f: statistics.pstdev(vals(f)) if len(g) > 1 else 0.0
        acc = lambda side: (lambda r: float("nan") if r[side]["accuracy"] is None else r[side]["accuracy"])
        rel = lambda r: r["diloco"]["loss"] / r["sync"]["loss"] - 1
        fewer = m(lambda r: r["sync"]["bytes_per_worker"] / r["diloco"]["bytes_per_worker"])
        offered = m(lambda r: r["contributions_applied"] + r["contributions_rejected"])
        t = target(*key)
        if t is None:
            goal, met = "", ""
        else:
            worst = max(vals(rel))
            goal = f"<= +{100 * t[0]:.0f}% at >= {t[1]}x"
            ok_loss, ok_bytes = worst <= t[0], fewer >= t[1]
            met = ("yes" if ok_loss and ok_bytes else
                   "no: " + ", ".join(w for w, bad in (("loss", not ok_loss), ("bytes", not ok_bytes)) if bad))
        print(f"| {key[0]} | {key[1]}{'+EF' if key[2] else ''} | {len(g)} "
              f"| {m(lambda r: r['sync']['loss']):.4f} ± {sd(lambda r: r['sync']['loss']):.4f} "
              f"| {m(lambda r: r['diloco']['loss']):.4f} ± {sd(lambda r: r['diloco']['loss']):.4f} "
              f"| {100 * m(rel):+.1f}% (seeds {', '.join(f'{100 * x:+.1f}%' for x in vals(rel))}) "
              f"| {pct(m(acc('sync')))} "
              f"| {pct(m(acc('diloco')))} "
              f"| {m(lambda r: r['sync']['bytes_per_worker']):.3g} "
              f"| {m(lambda r: r['diloco']['bytes_per_worker']):.3g} "
              f"| {fewer:.1f}x "
              f"| {m(lambda r: r['contributions_rejected']):.1f} / {offered:.0f} "
              f"| {m(lambda r: r['sync']['modelled_seconds_100mbit_50ms']):.0f} / "
              f"{m(lambda r: r['diloco']['modelled_seconds_100mbit_50ms']):.0f} "
              f"| {goal} | {met} |")
        label = f"H={key[0]} {key[1]}{'+EF' if key[2] else ''}"
        points.append((label, m(lambda r: r["diloco"]["bytes_per_worker"]), m(lambda r: r["diloco"]["loss"])))
    # One synchronous run per seed (every line of an invocation repeats it).
    sync = list({r["seed"]: (r["sync"]["bytes_per_worker"], r["sync"]["loss"]) for r in rows}.values())
    points.append(("sync", statistics.mean(b for b, _ in sync), statistics.mean(l for _, l in sync)))
    svg = path.rsplit(".", 1)[0] + ".svg"
    title = f"{rows[0]['task']}, {rows[0]['workers']} workers, {rows[0]['tokens']:.3g} tokens a side, " \
            f"mean of {len(set(r['seed'] for r in rows))} seed(s)"
    open(svg, "w").write(plot(points, title))
    print(f"\nplot: {svg}", file=sys.stderr)


def plot(points, title):
    w, h, pad = 720, 420, 60
    xs = [math.log10(b) for _, b, _ in points]
    ys = [l for _, _, l in points]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    y0, y1 = min(ys) * 0.95, max(ys) * 1.05
    sx = lambda x: pad + (x - x0) / max(x1 - x0, 1e-9) * (w - 2 * pad)
    sy = lambda y: h - pad - (y - y0) / max(y1 - y0, 1e-9) * (h - 2 * pad)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">bytes sent per worker (log10)</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">held-out loss</text>']
    for e in range(x0, x1 + 1):
        out.append(f'<text x="{sx(e)}" y="{h - pad + 15}" text-anchor="middle">1e{e}</text>')
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{pad - 5}" y="{sy(y) + 4}" text-anchor="end">{y:.3g}</text>')
    for (label, b, l) in points:
        x, y = sx(math.log10(b)), sy(l)
        color = "crimson" if label == "sync" else "steelblue"
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
        out.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
