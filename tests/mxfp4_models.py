"""MXFP4 (gpt-oss) checkpoints built at test time.

`reference_quantize` is the bit-level MX quantizer of triton_kernels' torch reference
(`downcast_to_mxfp_torch`, scales rounded up) expressed on float32 bit patterns: the golden test
holds it (and the codec) to that reference's own output. `reference_dequantize` is transformers'
`convert_moe_packed_tensors`, what its CPU loader dequantizes gpt-oss with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# gpt-oss's own list: attention, router, embeddings and head stay 16-bit
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def mxfp4_config() -> dict:
    return {"modules_to_not_convert": list(NOT_CONVERTED), "quant_method": "mxfp4"}


def reference_quantize(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's [E, in, out] -> (blocks uint8 [E, out, in/32, 16], scales uint8 [E, out, in/32])."""
    e, width, out = param.shape
    x = param.float().transpose(1, 2).contiguous().view(e, out, width // 32, 32)
    amax = x.abs().amax(-1, keepdim=True)
    scale_bits = ((amax / 6.0).view(torch.int32) + 0x7FFFFF) & 0x7F800000
    scale = scale_bits.view(torch.float32)
    q = (x * torch.where(scale == 0, 0.0, 1.0 / scale)).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = (q >> 31) << 3
    exponent = (q >> 23) & 0xFF
    mantissa = q & 0x7FFFFF
    # below 1.0 the implicit bit joins the mantissa, shifted to e2m1's subnormal position
    shift = (126 - exponent).clamp(0, 40)
    mantissa = torch.where(exponent < 127, (0x400000 | (mantissa >> 1)) >> shift, mantissa)
    exponent = exponent.clamp(min=126) - 126
    code = ((((exponent << 2) | (mantissa >> 21)) + 1) >> 1).clamp(max=7) | sign
    code = code.to(torch.uint8).view(e, out, width // 32, 16, 2)
    blocks = code[..., 0] | (code[..., 1] << 4)
    return blocks.contiguous(), (scale_bits.squeeze(-1) >> 23).to(torch.uint8)


def reference_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' dequantization to the model's [E, in, out] float32 parameter."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def is_expert_param(name: str) -> bool:
    return name.endswith(tuple(f".mlp.experts.{p}" for p in EXPERT_PARAMS))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _copy_side_files(src: Path, dst: Path, config: dict) -> None:
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def quantize_folder(dense: Path, out: Path) -> Path:
    """A copy of the gpt-oss model in `dense` with its expert parameters in MXFP4 (`_blocks` + `_scales`)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in _tensors(dense).items():
        if is_expert_param(name):
            blocks, scales = reference_quantize(value)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = mxfp4_config()
    _copy_side_files(dense, out, config)
    return out


def dequantized_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an MXFP4 folder as float32 under the model's names, the experts dequantized."""
    tensors = _tensors(folder)
    out = {}
    for name, value in tensors.items():
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            param = name.removesuffix("_blocks")
            out[param] = reference_dequantize(value, tensors[param + "_scales"])
        else:
            out[name] = value.float()
    return out


def dequantized_folder(folder: Path, out: Path) -> Path:
    """The MXFP4 model of `folder` as a float32 checkpoint (what PEFT trains the oracle adapter on)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dequantized_state(folder).items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    _copy_side_files(folder, out, config)
    return out
