"""Block-FP8 checkpoints built at test time with transformers' own fine-grained FP8 quantizer.

`reference_quantize` is the oracle for every FP8 byte: transformers' `Fp8Quantize` (the quantizer
its FP8 models save with) applied to a float32 weight. It leaves shapes that are not a multiple of
the tile unquantized, so an edge tile is quantized on the weight zero-padded to whole tiles (the
zeros change no tile maximum) and the result sliced back: the layout DeepSeek's checkpoints use.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

SCALE = "_scale_inv"


def fp8_config(block: int) -> dict:
    """config.json's quantization_config as DeepSeek-V3 ships it (block side `block`)."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [block, block]}


def reference_quantize(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes as uint8 [out, in], float32 weight_scale_inv) of transformers' Fp8Quantize."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(block, block))))
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // block) * block, -(-cols // block) * block, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    out = quantizer._quantize_one("w.weight", padded)
    codes, inv = out["w.weight"], out["w.weight_scale_inv"]
    assert codes.dtype == torch.float8_e4m3fn and inv.dtype == torch.float32
    return codes[:rows, :cols].contiguous().view(torch.uint8), inv


def reference_dequantize(codes: torch.Tensor, inv: torch.Tensor, block: int) -> torch.Tensor:
    """float32(code) · scale of its tile, one float32 product per element."""
    w = codes.view(torch.float8_e4m3fn).float()
    s = inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[: w.shape[0], : w.shape[1]]
    return w * s


def is_linear_weight(name: str) -> bool:
    """The weights DeepSeek-V3 stores as FP8: every projection (MLA's kv_a_proj_with_mqa too), experts included."""
    return name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def quantize_folder(dense: Path, out: Path, block: int, select: Callable[[str], bool] = is_linear_weight,
                    shards: int = 1) -> Path:
    """A copy of the safetensors model in `dense` with the `select`ed weights in block FP8 (e4m3 codes
    + weight_scale_inv) and config.json's quantization_config set; other tensors as they were; in
    `shards` files (names in order, a weight and its scale together) with an index when more than one."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(dense.glob("*.safetensors")):
        for name, value in load_file(str(f)).items():
            if select(name) and value.dim() == 2:
                codes, inv = reference_quantize(value, block)
                tensors[name] = codes.view(torch.float8_e4m3fn)
                tensors[name + SCALE] = inv
            else:
                tensors[name] = value
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(n for n in tensors if not n.endswith(SCALE))
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {}
            for n in names[i * per:(i + 1) * per]:
                part[n] = tensors[n]
                if n + SCALE in tensors:
                    part[n + SCALE] = tensors[n + SCALE]
            save_file(part, str(out / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = fp8_config(block)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in dense.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    return out


def dequantized_state(folder: Path, block: int) -> dict[str, torch.Tensor]:
    """Every tensor of a block-FP8 folder as float32, the FP8 weights dequantized (scales dropped)."""
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = {}
    for name, value in tensors.items():
        if name.endswith(SCALE):
            continue
        if value.dtype == torch.float8_e4m3fn:
            out[name] = reference_dequantize(value.view(torch.uint8), tensors[name + SCALE], block)
        else:
            out[name] = value.float()
    return out


def header(file: Path) -> dict:
    """A safetensors file's header entries in file order (metadata left out)."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        entries = json.loads(fh.read(n))
    entries.pop("__metadata__", None)
    return dict(sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]))

