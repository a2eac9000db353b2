"""An MXFP4 (gpt-oss-120b shaped) base -> merged_mxfp4 and merged_16bit, against `cp` of the same
shards, measured in one run on one machine.

    python bench/bench_mxfp4.py [--layers 2] [--work bench/work/mxfp4] [--max-memory 2GB]

The base is gpt-oss-120b's real widths (hidden 2880, 128 experts of intermediate 2880, 64 query
heads of 64, 8 KV heads, its 201,088-token vocabulary) with `--layers` layers, written directly as
safetensors: valid e2m1 codes, E8M0 scales around 2**-4, bf16 elsewhere. The adapter is a rank-8
PEFT LoRA on q_proj/o_proj and, through `target_parameters`, on every expert of gate_up_proj and
down_proj (A [r*E, in], B [out, r*E], as PEFT's ParamWrapper saves them), so every expert tensor is
decoded, merged and requantized. Contenders: cp; merged_mxfp4 (experts back to MXFP4); merged_16bit
(the experts dequantized, 4x the bytes). Each is a child process (bench/measure_child.py: wall time
includes fsync, peak RSS is its kernel high-water mark). Results: bench/results/<date>-mxfp4.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import bench_fp8 as bf  # noqa: E402
import bench_merge as bm  # noqa: E402
from streammerge.formats.safetensors import TensorSpec  # noqa: E402

HIDDEN, INTER, EXPERTS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2880, 2880, 128, 64, 8, 64, 201088
RANK = 8


def tensors(layers: int) -> list[TensorSpec]:
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN)),
             TensorSpec("lm_head.weight", "BF16", (VOCAB, HIDDEN)), TensorSpec("model.norm.weight", "BF16", (HIDDEN,))]
    for i in range(layers):
        p = f"model.layers.{i}"
        attn = {"q_proj": HEADS * HEAD_DIM, "k_proj": KV_HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM}
        for proj, out in attn.items():
            specs += [TensorSpec(f"{p}.self_attn.{proj}.weight", "BF16", (out, HIDDEN)),
                      TensorSpec(f"{p}.self_attn.{proj}.bias", "BF16", (out,))]
        specs += [TensorSpec(f"{p}.self_attn.o_proj.weight", "BF16", (HIDDEN, HEADS * HEAD_DIM)),
                  TensorSpec(f"{p}.self_attn.o_proj.bias", "BF16", (HIDDEN,)),
                  TensorSpec(f"{p}.self_attn.sinks", "BF16", (HEADS,)),
                  TensorSpec(f"{p}.input_layernorm.weight", "BF16", (HIDDEN,)),
                  TensorSpec(f"{p}.post_attention_layernorm.weight", "BF16", (HIDDEN,)),
                  TensorSpec(f"{p}.mlp.router.weight", "BF16", (EXPERTS, HIDDEN)),
                  TensorSpec(f"{p}.mlp.router.bias", "BF16", (EXPERTS,))]
        for proj, out, width in (("gate_up_proj", 2 * INTER, HIDDEN), ("down_proj", HIDDEN, INTER)):
            e = f"{p}.mlp.experts.{proj}"
            specs += [TensorSpec(f"{e}_blocks", "U8", (EXPERTS, out, width // 32, 16)),
                      TensorSpec(f"{e}_scales", "U8", (EXPERTS, out, width // 32)),
                      TensorSpec(f"{e}_bias", "BF16", (EXPERTS, out))]
    return specs


def _fill(fh, spec: TensorSpec, rng) -> None:
    import math

    import numpy as np

    n = math.prod(spec.shape)
    step = 1 << 24
    for start in range(0, n, step):
        k = min(step, n - start)
        if spec.name.endswith("_scales"):
            fh.write(rng.integers(120, 126, k, dtype=np.uint8).tobytes())
        elif spec.dtype == "U8":
            fh.write(rng.integers(0, 256, k, dtype=np.uint8).tobytes())
        else:
            fh.write(((rng.standard_normal(k, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16).tobytes())


def write_base(root: Path, layers: int, shard_bytes: int = 4 * 10**9) -> int:
    total = bf.write_shards(root, tensors(layers), _fill, shard_bytes)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "torch_dtype": "bfloat16",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_local_experts": EXPERTS, "num_experts_per_tok": 4,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "num_hidden_layers": layers, "layer_types": ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
        "tie_word_embeddings": False,
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}}))
    return total


def write_adapter(lora: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {}

    def pair(key: str, rows_a: int, in_f: int, out_f: int) -> None:
        t[f"base_model.model.{key}.lora_A.weight"] = (torch.randn(rows_a, in_f, generator=g) * 0.01).to(torch.bfloat16)
        t[f"base_model.model.{key}.lora_B.weight"] = (torch.randn(out_f, rows_a, generator=g) * 0.01).to(torch.bfloat16)

    for i in range(layers):
        p = f"model.layers.{i}"
        pair(f"{p}.self_attn.q_proj", RANK, HIDDEN, HEADS * HEAD_DIM)
        pair(f"{p}.self_attn.o_proj", RANK, HEADS * HEAD_DIM, HIDDEN)
        # PEFT nests one ParamWrapper per targeted parameter: the outer one wraps the last (down_proj)
        pair(f"{p}.mlp.experts", RANK * EXPERTS, INTER, HIDDEN)
        pair(f"{p}.mlp.experts.base_layer", RANK * EXPERTS, HIDDEN, 2 * INTER)
    lora.mkdir(parents=True, exist_ok=True)
    save_file(t, str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "o_proj"], "bias": "none",
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", default=str(HERE / "work" / "mxfp4"))
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--methods", default="merged_mxfp4,merged_16bit")
    args = ap.parse_args()
    work = Path(args.work)
    base, lora, runs = work / "base", work / "lora", work / "runs"
    stamp = work / f"built-{args.layers}.json"
    if not stamp.exists():
        bm.rmtree(work)
        work.mkdir(parents=True)
        bm.log(f"writing a {args.layers}-layer gpt-oss-120b shaped MXFP4 base")
        total = write_base(base, args.layers)
        write_adapter(lora, args.layers)
        stamp.write_text(json.dumps({"bytes": total}))
    total = json.loads(stamp.read_text())["bytes"]
    contenders = {"cp": ["cp", "-r", str(base), str(runs / "cp" / "out")]}
    for m in args.methods.split(","):
        contenders[m] = [bm.PY, "-m", "streammerge", "merge", str(base), str(lora), "--out", str(runs / m / "out"),
                         "--method", m, "--max-memory", args.max_memory, "--quiet"]
    results = {}
    for label, cmd in contenders.items():
        out = runs / label / "out"
        bm.rmtree(runs / label)
        (runs / label).mkdir(parents=True)
        r = bm.measure(label, cmd, runs / label / "run", out, [base, lora], args.timeout)
        r["out_bytes"] = bm.dir_bytes(out) if out.exists() else 0
        r.pop("rss_series", None)
        results[label] = r
        bm.rmtree(out)
    cp = results["cp"]["wall_s"]
    machine = bm.machine_info(work)
    lines = [f"# MXFP4 bench ({_dt.date.today()}, {machine['cpu_model']}, {machine['cpu_count']} cores, "
             f"--max-memory {args.max_memory})", "",
             f"gpt-oss-120b widths, {args.layers} layers, {total / 1e9:.2f} GB base; LoRA on q/o and every expert", "",
             "| contender | wall s | × cp | peak RSS GB | out GB |", "|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['wall_s']:.1f} | {r['wall_s'] / cp:.2f} | {r['ru_maxrss_bytes'] / 1e9:.2f} | "
                     f"{r['out_bytes'] / 1e9:.2f} |" + ("" if r["status"] == "ok" else f" {r['status']}: {r.get('error')}"))
    text = "\n".join(lines)
    print(text)
    stem = HERE / "results" / f"{_dt.date.today()}-mxfp4"
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "layers": args.layers, "bytes": total,
                                                     "max_memory": args.max_memory, "results": results}, indent=2, default=str))
    stem.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
