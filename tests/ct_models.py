"""compressed-tensors FP8 checkpoints built at test time with compressed-tensors' own functions.

`reference_quantize` is the oracle for every byte: compressed-tensors' `calculate_qparams` on the
weight's min/max per group (what llm-compressor's min-max observer hands it), the scale stored in
the checkpoint's scale dtype, then its `quantize` to e4m3. The config is llm-compressor's preset
scheme (FP8_DYNAMIC: per channel; FP8: per tensor with static input scales; FP8_BLOCK: tiles) as
`QuantizationConfig` writes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PRESETS = {"channel": "FP8_DYNAMIC", "tensor": "FP8", "block": "FP8_BLOCK"}


def scheme(strategy: str, block: int = 32):
    from compressed_tensors.quantization import preset_name_to_scheme

    s = preset_name_to_scheme(PRESETS[strategy], ["Linear"])
    if strategy == "block":
        s.weights.block_structure = [block, block]
        s.input_activations.group_size = block
    return s


def ct_config(strategy: str, block: int = 32) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": scheme(strategy, block)}, format="float-quantized",
                            quantization_status="compressed", ignore=["lm_head"])
    return qc.to_dict()


def _min_max(w: torch.Tensor, strategy: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    if strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    rows, cols = w.shape
    padded = torch.full((-(-rows // block) * block, -(-cols // block) * block), float("nan"))
    padded[:rows, :cols] = w
    tiles = padded.unflatten(0, (-1, block)).unflatten(2, (-1, block)).transpose(1, 2).flatten(2)
    return tiles.nan_to_num(float("inf")).amin(-1), tiles.nan_to_num(float("-inf")).amax(-1)


def reference_quantize(weight: torch.Tensor, strategy: str, scale_dtype: torch.dtype, block: int = 32):
    """(e4m3 codes [out, in], weight_scale) of a float32 weight, through compressed-tensors."""
    from compressed_tensors.quantization import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = scheme(strategy, block).weights
    w = weight.float()
    lo, hi = _min_max(w, strategy, block)
    scale, zero_point = calculate_qparams(lo, hi, args)
    scale = scale.to(scale_dtype)  # llm-compressor stores it in its weight_scale parameter's dtype
    codes = quantize(w, scale, zero_point, args, dtype=torch.float8_e4m3fn)
    return codes, scale


def is_linear_weight(name: str) -> bool:
    return name.endswith("_proj.weight")


def quantize_folder(dense: Path, out: Path, strategy: str, block: int = 32) -> Path:
    """A copy of the model in `dense` with its linear layers (not lm_head) in compressed-tensors FP8,
    the scales in the weights' dtype; per-tensor schemes get static input scales as llm-compressor
    calibrates them (any positive value serves here)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(dense.glob("*.safetensors")):
        for name, value in load_file(str(f)).items():
            if is_linear_weight(name):
                codes, scale = reference_quantize(value, strategy, value.dtype, block)
                tensors[name], tensors[name + "_scale"] = codes, scale
                if strategy == "tensor":
                    tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor([0.0123], dtype=value.dtype)
            else:
                tensors[name] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = ct_config(strategy, block)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in dense.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out


def dequantized_state(folder: Path) -> dict[str, torch.Tensor]:
    """The parameters transformers' compressed-tensors loader gives (dequantized on the CPU), float32."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def dequantized_folder(folder: Path, out: Path) -> Path:
    """The model of `folder` as transformers dequantizes it, saved as a float32 checkpoint (for PEFT)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in dequantized_state(folder).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in folder.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out
