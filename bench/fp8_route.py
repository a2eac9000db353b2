"""The route to a merged FP8 model people take today, as one child process for bench_fp8.py:

    python bench/fp8_route.py BASE ADAPTER OUT

1. dequantize: each shard loaded whole, every FP8 weight times its weight_scale_inv, saved as bf16
   (what DeepSeek's inference/fp8_cast_bf16.py does, its Triton kernel replaced by the same product);
2. merge: each bf16 shard loaded whole, W' = bf16(f32(W) + s·B@A) for the adapter's targets;
3. requantize: each merged shard loaded whole, the weights that were FP8 quantized again with
   transformers' fine-grained FP8 quantizer (Fp8Quantize), saved with the base's index and config.
Temporary bf16 copies live in OUT/.route (twice the model on disk at the peak) and are removed.
Prints each step's wall time.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def dequantize(base: Path, out: Path) -> set[str]:
    fp8 = set()
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(str(shard))
        result = {}
        for name, value in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            scale = tensors.get(name + "_scale_inv")
            if scale is None:
                result[name] = value
                continue
            fp8.add(name)
            w = value.float()
            s = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
            result[name] = (w * s).to(torch.bfloat16)
        save_file(result, str(out / shard.name), metadata={"format": "pt"})
    return fp8


def merge(src: Path, adapter: Path, out: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for shard in sorted(src.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name in list(tensors):
            key = "base_model.model." + name.removesuffix(".weight")
            if key + ".lora_A.weight" in lora:
                a, b = lora[key + ".lora_A.weight"].float(), lora[key + ".lora_B.weight"].float()
                tensors[name] = (tensors[name].float() + scale * (b @ a)).to(torch.bfloat16)
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})


def requantize(src: Path, fp8: set[str], out: Path) -> None:
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128))))
    for shard in sorted(src.glob("*.safetensors")):
        tensors = load_file(str(shard))
        result = {}
        for name, value in tensors.items():
            result.update(quantizer._quantize_one(name, value) if name in fp8 else {name: value})
        save_file(result, str(out / shard.name), metadata={"format": "pt"})


def main() -> int:
    base, adapter, out = (Path(a) for a in sys.argv[1:4])
    work = out / ".route"
    (work / "bf16").mkdir(parents=True)
    (work / "merged").mkdir()
    times = {}
    t = time.perf_counter()
    fp8 = dequantize(base, work / "bf16")
    times["dequantize"] = time.perf_counter() - t
    t = time.perf_counter()
    merge(work / "bf16", adapter, work / "merged")
    shutil.rmtree(work / "bf16")
    times["merge"] = time.perf_counter() - t
    t = time.perf_counter()
    requantize(work / "merged", fp8, out)
    shutil.rmtree(work)
    for f in ("config.json", "model.safetensors.index.json"):
        shutil.copy(base / f, out / f)
    times["requantize"] = time.perf_counter() - t
    print(json.dumps({k: round(v, 1) for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
