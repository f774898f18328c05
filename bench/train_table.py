#!/usr/bin/env python3
"""Table and plot of `plexus bench train` results (one JSON object per line).

Prints a Markdown table (mean and spread over seeds per configuration) and writes an SVG plot
of held-out loss against bytes sent per worker (log scale) next to the input file.
"""
import json
import math
import statistics
import sys
from collections import defaultdict


def main(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    groups = defaultdict(list)
    for r in rows:
        key = (r["inner_steps"], r["codec"], r["error_feedback"])
        groups[key].append(r)
    print("| H | codec | seeds | sync loss | DiLoCo loss | loss vs sync | sync acc | DiLoCo acc "
          "| bytes/worker sync | bytes/worker DiLoCo | fewer bytes | rejected | modelled s sync / DiLoCo |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    points = []
    order = sorted(groups, key=lambda k: (k[1] != "f32", k[1], k[0]))
    for key in order:
        g = groups[key]
        m = lambda f: statistics.mean(f(r) for r in g)
        sd = lambda f: statistics.pstdev([f(r) for r in g]) if len(g) > 1 else 0.0
        ratio = m(lambda r: r["diloco"]["loss"] / r["sync"]["loss"])
        fewer = m(lambda r: r["sync"]["bytes_per_worker"] / r["diloco"]["bytes_per_worker"])
        print(f"| {key[0]} | {key[1]}{'+EF' if key[2] else ''} | {len(g)} "
              f"| {m(lambda r: r['sync']['loss']):.4f} ± {sd(lambda r: r['sync']['loss']):.4f} "
              f"| {m(lambda r: r['diloco']['loss']):.4f} ± {sd(lambda r: r['diloco']['loss']):.4f} "
              f"| {100 * (ratio - 1):+.1f}% "
              f"| {100 * m(lambda r: r['sync']['accuracy']):.1f}% "
              f"| {100 * m(lambda r: r['diloco']['accuracy']):.1f}% "
              f"| {m(lambda r: r['sync']['bytes_per_worker']):.3g} "
              f"| {m(lambda r: r['diloco']['bytes_per_worker']):.3g} "
              f"| {fewer:.0f}x "
              f"| {m(lambda r: r['contributions_rejected']):.1f} "
              f"| {m(lambda r: r['sync']['modelled_seconds_100mbit_50ms']):.0f} / "
              f"{m(lambda r: r['diloco']['modelled_seconds_100mbit_50ms']):.0f} |")
        label = f"H={key[0]} {key[1]}{'+EF' if key[2] else ''}"
        points.append((label, m(lambda r: r["diloco"]["bytes_per_worker"]), m(lambda r: r["diloco"]["loss"])))
    sync = [(r["sync"]["bytes_per_worker"], r["sync"]["loss"]) for r in rows]
    points.append(("sync", statistics.mean(b for b, _ in sync), statistics.mean(l for _, l in sync)))
    svg = path.rsplit(".", 1)[0] + ".svg"
    open(svg, "w").write(plot(points))
    print(f"\nplot: {svg}", file=sys.stderr)


def plot(points):
    w, h, pad = 640, 400, 60
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
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">bytes sent per worker (log10)</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">held-out loss</text>']
    for e in range(x0, x1 + 1):
        out.append(f'<text x="{sx(e)}" y="{h - pad + 15}" text-anchor="middle">1e{e}</text>')
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{pad - 5}" y="{sy(y) + 4}" text-anchor="end">{y:.3f}</text>')
    for (label, b, l) in points:
        x, y = sx(math.log10(b)), sy(l)
        color = "crimson" if label == "sync" else "steelblue"
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
        out.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1])
