"""A DeepSeek-V3-shaped (671B) block-FP8 checkpoint as sparse files, and the time to plan a merge of it.

    python bench/deepseek_headers.py DIR [--layers 61] [--experts 256] [--keep]

Writes DIR/base: every tensor name, dtype and shape of deepseek-ai/DeepSeek-V3 (61 layers, the
first 3 dense, 256 routed experts + 1 shared, MLA, block-FP8 weights with their weight_scale_inv,
the multi-token-prediction layer 61) in 163 shards whose headers are real and whose data regions
are holes (no disk used), the index and config.json; and DIR/lora: a real rank-8 adapter on the MLA
projections of every layer. Then times `streammerge plan` of it (a fresh process: imports included)
and prints the counts. The data is never read: planning reads headers only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from streammerge.formats.safetensors import TensorSpec, build_header, save_order  # noqa: E402

HIDDEN, VOCAB, INTER, MOE_INTER = 7168, 129280, 18432, 2048
Q_LORA, KV_LORA, NOPE, ROPE, V, HEADS = 1536, 512, 128, 64, 128, 128
SHARDS = 163


def _scale(shape):
    return (-(-shape[0] // 128), -(-shape[1] // 128))


def _linear(prefix: str, shape) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", "F8_E4M3", shape), TensorSpec(f"{prefix}.weight_scale_inv", "F32", _scale(shape))]


def _mlp(prefix: str, inter: int) -> list[TensorSpec]:
    return (_linear(f"{prefix}.gate_proj", (inter, HIDDEN)) + _linear(f"{prefix}.up_proj", (inter, HIDDEN))
            + _linear(f"{prefix}.down_proj", (HIDDEN, inter)))


def layer(i: int, experts: int, dense: bool) -> list[TensorSpec]:
    p = f"model.layers.{i}"
    out = [TensorSpec(f"{p}.input_layernorm.weight", "BF16", (HIDDEN,)),
           TensorSpec(f"{p}.post_attention_layernorm.weight", "BF16", (HIDDEN,)),
           TensorSpec(f"{p}.self_attn.q_a_layernorm.weight", "BF16", (Q_LORA,)),
           TensorSpec(f"{p}.self_attn.kv_a_layernorm.weight", "BF16", (KV_LORA,))]
    out += _linear(f"{p}.self_attn.q_a_proj", (Q_LORA, HIDDEN))
    out += _linear(f"{p}.self_attn.q_b_proj", (HEADS * (NOPE + ROPE), Q_LORA))
    out += _linear(f"{p}.self_attn.kv_a_proj_with_mqa", (KV_LORA + ROPE, HIDDEN))
    out += _linear(f"{p}.self_attn.kv_b_proj", (HEADS * (NOPE + V), KV_LORA))
    out += _linear(f"{p}.self_attn.o_proj", (HIDDEN, HEADS * V))
    if dense:
        return out + _mlp(f"{p}.mlp", INTER)
    out += [TensorSpec(f"{p}.mlp.gate.weight", "BF16", (experts, HIDDEN)),
            TensorSpec(f"{p}.mlp.gate.e_score_correction_bias", "F32", (experts,))]
    for e in range(experts):
        out += _mlp(f"{p}.mlp.experts.{e}", MOE_INTER)
    return out + _mlp(f"{p}.mlp.shared_experts", MOE_INTER)


def all_tensors(layers: int, experts: int) -> list[TensorSpec]:
    out = [TensorSpec("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]
    for i in range(layers):
        out += layer(i, experts, dense=i < 3)
    mtp = f"model.layers.{layers}"  # the multi-token-prediction layer DeepSeek ships (transformers skips it)
    out += layer(layers, experts, dense=False)
    out += [TensorSpec(f"{mtp}.embed_tokens.weight", "BF16", (VOCAB, HIDDEN)),
            TensorSpec(f"{mtp}.enorm.weight", "BF16", (HIDDEN,)), TensorSpec(f"{mtp}.hnorm.weight", "BF16", (HIDDEN,)),
            TensorSpec(f"{mtp}.eh_proj.weight", "BF16", (HIDDEN, 2 * HIDDEN)),
            TensorSpec(f"{mtp}.shared_head.norm.weight", "BF16", (HIDDEN,)),
            TensorSpec(f"{mtp}.shared_head.head.weight", "BF16", (VOCAB, HIDDEN))]
    return out + [TensorSpec("model.norm.weight", "BF16", (HIDDEN,)), TensorSpec("lm_head.weight", "BF16", (VOCAB, HIDDEN))]


def write_base(root: Path, layers: int, experts: int) -> tuple[int, int]:
    tensors = all_tensors(layers, experts)
    total = sum(t.nbytes for t in tensors)
    per_shard = total / SHARDS
    groups, current, size = [], [], 0
    for t in tensors:  # in model order, as DeepSeek's shards are cut
        current.append(t)
        size += t.nbytes
        if size >= per_shard and len(groups) < SHARDS - 1:
            groups.append(current)
            current, size = [], 0
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):06d}.safetensors"
        header, _ = build_header(save_order(group), {"format": "pt"})
        with open(root / name, "wb") as fh:
            fh.write(header)
            fh.truncate(len(header) + sum(t.nbytes for t in group))  # a hole: no data written
        weight_map.update({t.name: name for t in group})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "moe_intermediate_size": MOE_INTER, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "n_routed_experts": experts, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "q_lora_rank": Q_LORA, "kv_lora_rank": KV_LORA,
        "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": V, "n_group": 8, "topk_group": 4,
        "vocab_size": VOCAB, "max_position_embeddings": 163840, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return len(tensors), total


def write_adapter(root: Path, layers: int, rank: int = 8) -> int:
    import torch
    from safetensors.torch import save_file

    shapes = {"q_a_proj": (Q_LORA, HIDDEN), "q_b_proj": (HEADS * (NOPE + ROPE), Q_LORA),
              "kv_a_proj_with_mqa": (KV_LORA + ROPE, HIDDEN), "kv_b_proj": (HEADS * (NOPE + V), KV_LORA),
              "o_proj": (HIDDEN, HEADS * V)}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for m, (out_f, in_f) in shapes.items():
            p = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{p}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * 0.01).to(torch.bfloat16)
            tensors[f"{p}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": sorted(shapes), "bias": "none", "base_model_name_or_path": "deepseek-ai/DeepSeek-V3",
    }))
    return len(tensors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep DIR's files (sparse: they use no disk)")
    args = ap.parse_args()
    root = Path(args.dir)
    base, lora = root / "base", root / "lora"
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    lora.mkdir()
    t0 = time.perf_counter()
    n, total = write_base(base, args.layers, args.experts)
    n_lora = write_adapter(lora, args.layers)
    print(f"wrote {n} tensor headers ({total / 1e9:.1f} GB of holes) in {len(list(base.glob('*.safetensors')))} shards "
          f"and a {n_lora}-tensor adapter in {time.perf_counter() - t0:.1f} s")
    for method in ("merged_fp8", "merged_16bit"):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "streammerge", "plan", str(base), str(lora), "--method", method],
                           capture_output=True, text=True, cwd=str(REPO))
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stderr.strip())
            return 1
        lines = [line for line in r.stdout.splitlines() if line.startswith(("tensors:", "formats:", "output:"))]
        print(f"plan --method {method}: {wall:.1f} s (a fresh process, imports included)")
        for line in lines:
            print("   ", line)
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
