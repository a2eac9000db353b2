"""Block-FP8 bases -> merged_fp8, against `cp` of the same shards and the dequantize -> merge ->
requantize route, measured in one run on one machine.

    python bench/bench_fp8.py [--cases many,slice] [--work bench/work/fp8] [--max-memory 2GB]

Cases (synthetic checkpoints written directly as safetensors, valid e4m3 codes, random scales;
a rank-8 LoRA on the attention projections):

  many   ~98k small tensors: 16 layers x 1024 experts x (gate, up, down) [128, 256] FP8 + their
         weight_scale_inv, and the attention the LoRA targets: per-tensor overhead (plan, journal,
         hashing, Python per tensor) against `cp`'s throughput (target: >= 70 % of it).
  slice  DeepSeek-V3's real widths, 2 layers (one dense, one MoE with 64 routed experts + 1 shared),
         its vocabulary; contenders: cp, streammerge merged_fp8, and the route people take today
         (bench/fp8_route.py: DeepSeek's fp8_cast_bf16 way of dequantizing each shard to bf16, a
         per-shard merge, transformers' Fp8Quantize of each shard).

Each contender is a child process (bench/measure_child.py: wall time includes fsync of its output,
peak RSS is its kernel high-water mark), inputs read once right before each (warm page cache).
Results: a table on stdout and bench/results/<date>-fp8.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import bench_merge as bm  # noqa: E402
import deepseek_headers as ds  # noqa: E402
from streammerge.formats.safetensors import TensorSpec, build_header, save_order  # noqa: E402

RANK = 8


def many_tensors() -> tuple[list[TensorSpec], dict]:
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (1024, 256)), TensorSpec("lm_head.weight", "BF16", (1024, 256))]
    for i in range(16):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs += ds._linear(f"{p}.self_attn.{proj}", (256, 256))
        for e in range(1024):
            for proj, shape in (("gate_proj", (128, 256)), ("up_proj", (128, 256)), ("down_proj", (256, 128))):
                specs += ds._linear(f"{p}.mlp.experts.{e}.{proj}", shape)
    targets = {f"model.layers.{i}.self_attn.{p}": (256, 256) for i in range(16) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    return specs, targets


def slice_tensors() -> tuple[list[TensorSpec], dict]:
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (ds.VOCAB, ds.HIDDEN))]
    specs += ds.layer(0, 64, dense=True) + ds.layer(1, 64, dense=False)
    specs += [TensorSpec("model.norm.weight", "BF16", (ds.HIDDEN,)), TensorSpec("lm_head.weight", "BF16", (ds.VOCAB, ds.HIDDEN))]
    shapes = {"q_a_proj": (ds.Q_LORA, ds.HIDDEN), "q_b_proj": (ds.HEADS * (ds.NOPE + ds.ROPE), ds.Q_LORA),
              "kv_a_proj_with_mqa": (ds.KV_LORA + ds.ROPE, ds.HIDDEN), "kv_b_proj": (ds.HEADS * (ds.NOPE + ds.V), ds.KV_LORA),
              "o_proj": (ds.HIDDEN, ds.HEADS * ds.V)}
    targets = {f"model.layers.{i}.self_attn.{m}": s for i in range(2) for m, s in shapes.items()}
    return specs, targets


def _fill(fh, spec: TensorSpec, rng) -> None:
    import numpy as np

    n = math.prod(spec.shape)
    step = 1 << 24
    for start in range(0, n, step):
        k = min(step, n - start)
        if spec.dtype == "F8_E4M3":
            codes = rng.integers(0, 256, k, dtype=np.uint8)
            codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
            fh.write(codes.tobytes())
        elif spec.dtype == "F32":  # scales (and the router bias)
            fh.write((rng.random(k, dtype=np.float32) * 1e-3 + 1e-4).tobytes())
        else:  # BF16: the top halves of float32 normals
            fh.write(((rng.standard_normal(k, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16).tobytes())


def write_shards(root: Path, specs: list[TensorSpec], fill, shard_bytes: int) -> int:
    """`specs` as safetensors shards of about `shard_bytes` (in order, each in save order) with their
    index, every tensor's bytes from `fill(fh, spec, rng)`; returns the tensor bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    groups, current, size = [], [], 0
    for s in specs:
        current.append(s)
        size += s.nbytes
        if size >= shard_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        ordered = save_order(group)
        header, _ = build_header(ordered, {"format": "pt"})
        with open(root / name, "wb") as fh:
            fh.write(header)
            for s in ordered:
                fill(fh, s, rng)
        weight_map.update({s.name: name for s in group})
    total = sum(s.nbytes for s in specs)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def write_checkpoint(root: Path, specs: list[TensorSpec], targets: dict, shard_bytes: int) -> int:
    import torch
    from safetensors.torch import save_file

    total = write_shards(root, specs, _fill, shard_bytes)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]}}))
    lora = root.parent / "lora"
    lora.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out_f, in_f) in targets.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=g) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[1] for m in targets}), "bias": "none"}))
    return total


def run_case(name: str, work: Path, max_memory: str, timeout: float) -> dict:
    specs, targets = many_tensors() if name == "many" else slice_tensors()
    case_dir = work / name
    base, lora = case_dir / "base", case_dir / "lora"
    stamp = case_dir / "built.json"
    if not stamp.exists():
        bm.log(f"{name}: writing {len(specs)} tensors")
        bm.rmtree(case_dir)
        total = write_checkpoint(base, specs, targets, 4 * 10**9 if name == "slice" else 400 * 10**6)
        stamp.write_text(json.dumps({"tensors": len(specs), "bytes": total}))
    info = json.loads(stamp.read_text())
    bm.log(f"{name}: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB")
    runs = case_dir / "runs"
    results = {}
    contenders = {
        "cp": ["cp", "-r", str(base), str(runs / "cp" / "out")],
        "merged_fp8": [bm.PY, "-m", "streammerge", "merge", str(base), str(lora), "--out", str(runs / "merged_fp8" / "out"),
                       "--method", "merged_fp8", "--max-memory", max_memory, "--quiet"],
    }
    if name == "slice":
        contenders["route"] = [bm.PY, str(HERE / "fp8_route.py"), str(base), str(lora), str(runs / "route" / "out")]
    for label, cmd in contenders.items():
        out = runs / label / "out"
        bm.rmtree(runs / label)
        (runs / label).mkdir(parents=True)
        r = bm.measure(label, cmd, runs / label / "run", out, [base, lora], timeout)
        r["out_bytes"] = bm.dir_bytes(out) if out.exists() else 0
        results[label] = r
        if label != "cp":
            bm.rmtree(out)
    cp = results["cp"]["wall_s"]
    for label, r in results.items():
        r["vs_cp"] = r["wall_s"] / cp if cp else None
        r["throughput_vs_cp"] = cp / r["wall_s"] if r["wall_s"] else None
    bm.rmtree(runs / "cp")
    return {"tensors": info["tensors"], "bytes": info["bytes"], "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="many,slice")
    ap.add_argument("--work", default=str(HERE / "work" / "fp8"))
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--tag", default="fp8")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": bm.machine_info(work), "max_memory": args.max_memory, "cases": {}}
    for name in args.cases.split(","):
        report["cases"][name] = run_case(name, work, args.max_memory, args.timeout)
    lines = [f"# FP8 bench ({_dt.date.today()}, {report['machine']['cpu_model']}, {report['machine']['cpu_count']} cores)", "",
             "| case | tensors | GB | contender | wall s | × cp | throughput vs cp | peak RSS GB | out GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, case in report["cases"].items():
        for label, r in case["results"].items():
            lines.append(f"| {name} | {case['tensors']} | {case['bytes'] / 1e9:.2f} | {label} | {r['wall_s']:.1f} | "
                         f"{r['vs_cp']:.2f} | {100 * r['throughput_vs_cp']:.0f} % | {r['ru_maxrss_bytes'] / 1e9:.2f} | "
                         f"{r['out_bytes'] / 1e9:.2f} |" + ("" if r["status"] == "ok" else f" {r['status']}: {r.get('error')}"))
    text = "\n".join(lines)
    print(text)
    results = HERE / "results"
    stem = results / f"{_dt.date.today()}-{args.tag}"
    for r in (c["results"].values() for c in report["cases"].values()):
        for x in r:
            x.pop("rss_series", None)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
