#!/usr/bin/env python
"""Plot peak RSS vs model size for the PEFT path and streammerge, from bench_merge.py JSON results.

    python bench/plot_rss.py                                  # newest bench/results/*.json
    python bench/plot_rss.py bench/results/A.json B.json -o bench/results/rss.png
    python bench/plot_rss.py --all                            # every JSON in bench/results

Left: peak RSS (kernel ru_maxrss of the contender's process) against base checkpoint size,
with y = x (holding the whole model once) and the streammerge bound (~0.5 GB runtime +
--max-memory) for reference. Right: RSS over time of each run (sampled at ~20 Hz).
Needs matplotlib (`pip install matplotlib`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GB = 1e9
STYLE = {
    "peft": ("PEFT merge_and_unload", "tab:red", "o"),
    "sm16": ("streammerge merged_16bit", "tab:blue", "s"),
    "sm4": ("streammerge merged_4bit", "tab:cyan", "D"),
    "cp": ("cp", "tab:gray", "^"),
}


def parse_size(s: str) -> float:
    import re
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", s, re.I)
    if not m:
        return float("nan")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).upper()]
    if m.group(3):
        mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return float(m.group(1)) * mult


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="result files (default: the newest in bench/results)")
    ap.add_argument("--all", action="store_true", help="use every JSON in bench/results")
    ap.add_argument("-o", "--out", default=None, help="PNG path (default: next to the first JSON, -rss.png)")
    a = ap.parse_args()

    try:
        import matplotlib
    except ImportError:
        print("matplotlib is missing: pip install matplotlib", file=sys.stderr)
        return 2
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res_dir = HERE / "results"
    files = [Path(p) for p in a.json]
    if a.all or not files:
        # bench_merge.py's results (<date>-<tag>.json); other benchmarks' JSON have other fields
        allf = sorted(res_dir.glob("[0-9][0-9][0-9][0-9]-*.json"), key=lambda p: p.stat().st_mtime)
        allf = [p for p in allf if "options" in json.loads(p.read_text())]
        files = allf if a.all else allf[-1:]
    if not files:
        print("no result JSON found; run bench/bench_merge.py first", file=sys.stderr)
        return 1

    points = {k: [] for k in STYLE}  # contender -> [(size_gb, rss_gb, label)]
    series = []  # (label, contender, [(t, rss)])
    budgets = set()
    title_bits = []
    for f in files:
        rep = json.loads(Path(f).read_text())
        budgets.add(rep["options"]["max_memory"])
        title_bits.append(f"{rep['date']} {rep['tag']}")
        for mod in rep["models"]:
            size = mod.get("inputs", {}).get("base_bytes")
            if not size:
                continue
            for c, r in mod["results"].items():
                if c not in STYLE or r.get("status") != "ok":
                    continue
                points[c].append((size / GB, r["ru_maxrss_bytes"] / GB, mod["name"]))
                if r.get("rss_series") and c != "cp":
                    series.append((f"{mod['name']} {STYLE[c][0]}", c, r["rss_series"]))

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    xmax = max([p[0] for pts in points.values() for p in pts] + [1.0]) * 1.15
    ax.plot([0, xmax], [0, xmax], ":", color="0.6", label="y = model size")
    for b in sorted(budgets):
        bound = 0.5 + parse_size(b) / GB
        ax.axhline(bound, ls="--", color="tab:blue", alpha=0.4, lw=1,
                   label=f"design bound: ~0.5 GB runtime + --max-memory {b}")
    for c, pts in points.items():
        if not pts:
            continue
        pts.sort()
        name, color, marker = STYLE[c]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=name,
                ls="-" if len(pts) > 1 else "none")
        for x, y, lab in pts:
            ax.annotate(f"{lab}: {y:.2f}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, None)
    ax.set_xlabel("base checkpoint size (GB)")
    ax.set_ylabel("peak RSS (GB, ru_maxrss)")
    ax.set_title("peak RSS vs model size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    for label, c, ser in series:
        name, color, _ = STYLE[c]
        ls = "-" if "1b" in label else "--"
        ax2.plot([t for t, _ in ser], [r / GB for _, r in ser], ls, color=color, label=label, lw=1.2)
    ax2.set_xlabel("time since start (s)")
    ax2.set_ylabel("RSS of the process tree (GB, sampled ~20 Hz)")
    ax2.set_title("RSS over time")
    ax2.grid(alpha=0.3)
    if series:
        ax2.legend(fontsize=8)
    fig.suptitle("streammerge vs PEFT — " + ", ".join(title_bits), fontsize=10)
    fig.tight_layout()

    out = Path(a.out) if a.out else files[0].with_name(files[0].stem + "-rss.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
