"""One merge as 1 or 2 partitions on this machine, against `cp` of the same shards, in one run.

    python bench/bench_partitions.py [--work bench/work/partitions] [--max-memory 1GB] [--shard 500MB]

Input: bench_merge's TinyLlama-1.1B-shaped bf16 checkpoint with a rank-16 LoRA on every linear
layer, re-sharded by --max-shard-size so each partition has several shards. Contenders (each a child
process tree, wall time including fsync of the output, peak RSS = the largest process's):

  cp            cp -r of the base shards
  whole         streammerge merge (one process)
  2 partitions  --partition 0/2 and 1/2 started together, then `streammerge finalize`
  ray 2         --ray with a local Ray, 2 partitions (Ray's start included)

Each partition gets half of --max-memory, as --ray gives it. Results: stdout and
bench/results/<date>-partitions.{json,md}; the outputs' shards are compared byte for byte.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import filecmp
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench_merge as bm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(HERE / "work" / "partitions"))
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--shard", default="500MB")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = bm.model_spec("1b", 0)
    d, info = bm.ensure_inputs(work, "1b", spec, rebuild=False)
    base, adapter = d / "base", d / "adapter"
    half = str(bm.parse_size(args.max_memory) // 2)
    merge = [bm.PY, "-m", "streammerge", "merge", str(base), str(adapter), "--max-shard-size", args.shard, "--quiet"]
    runs = work / "runs"

    def out(label: str) -> Path:
        return runs / label.replace(" ", "-") / "out"

    parts = " ".join(f"{' '.join(merge)} --out '{out('2 partitions')}' --max-memory {half} --partition {i}/2 & p{i}=$!;"
                     for i in range(2))
    contenders = {
        "cp": ["cp", "-r", str(base), str(out("cp"))],
        "whole": [*merge, "--out", str(out("whole")), "--max-memory", args.max_memory],
        "2 partitions": ["bash", "-c", f"set -e; {parts} wait $p0; wait $p1; {bm.PY} -m streammerge finalize '{out('2 partitions')}' --quiet"],
        "ray 2": [bm.PY, "-c", "import sys, streammerge.cluster as c; c.merge_on_ray(sys.argv[1], sys.argv[2], sys.argv[3], "
                  "partitions=2, max_shard_size=sys.argv[4], max_memory=sys.argv[5])",
                  str(base), str(adapter), str(out("ray 2")), args.shard, args.max_memory],
    }
    report = {"machine": bm.machine_info(work), "model": info, "max_memory": args.max_memory, "shard": args.shard, "results": {}}
    for label, cmd in contenders.items():
        bm.rmtree(runs / label.replace(" ", "-"))
        (runs / label.replace(" ", "-")).mkdir(parents=True)
        report["results"][label] = bm.measure(label, cmd, runs / label.replace(" ", "-") / "run", out(label), [base, adapter], args.timeout)
    same = {}
    whole_shards = sorted(p.name for p in out("whole").glob("*.safetensors")) + ["model.safetensors.index.json"]
    for label in ("2 partitions", "ray 2"):
        match, mismatch, errors = filecmp.cmpfiles(out("whole"), out(label), whole_shards, shallow=False)
        same[label] = not mismatch and not errors
    report["byte_identical_to_whole"] = same
    cp = report["results"]["cp"]["wall_s"]
    whole = report["results"]["whole"]["wall_s"]
    lines = [f"# Partitions bench ({_dt.date.today()}, {report['machine']['cpu_model']}, {report['machine']['cpu_count']} cores)",
             "", f"1.1B bf16, rank-16 LoRA on every linear layer, --max-shard-size {args.shard}, --max-memory {args.max_memory} "
             "(half per partition)", "",
             "| contender | wall s | × cp | vs whole | peak RSS GB (one process) | shards equal to whole |", "|---|---|---|---|---|---|"]
    for label, r in report["results"].items():
        lines.append(f"| {label} | {r['wall_s']:.1f} | {r['wall_s'] / cp:.2f} | {whole / r['wall_s']:.2f}× | "
                     f"{r['ru_maxrss_bytes'] / 1e9:.2f} | {same.get(label, '—')} |" + ("" if r["status"] == "ok" else f" {r['status']}"))
    text = "\n".join(lines)
    print(text)
    stem = HERE / "results" / f"{_dt.date.today()}-partitions"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(text + "\n")
    for label in contenders:
        bm.rmtree(runs / label.replace(" ", "-"))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
