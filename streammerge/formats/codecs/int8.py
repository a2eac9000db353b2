"""bitsandbytes LLM.int8() weights as transformers saves them (``load_in_8bit=True``).

On disk, for a ``Linear8bitLt`` module ``<m>``::

    <m>.weight         int8    [out, in]   row-wise absmax quantization: round(W * 127 / SCB[row])
    <m>.SCB            float32 [out]       per-row absmax of the fp16 weight
    <m>.weight_format  uint8   []          0 == "row" (the only layout bitsandbytes still loads)

Rows are independent, so any row chunk dequantizes on its own. The formula is bitsandbytes'
``int8_vectorwise_dequant`` (used by transformers' and PEFT's ``dequantize_bnb_weight``):
``(A * SCB[:, None]) * 7.874015718698502e-3`` evaluated in float32, in that order.
It is pure torch, so this module never needs bitsandbytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

# bitsandbytes' literal for 1/127 (backends/default ops, int8_vectorwise_dequant)
INV_127 = 7.874015718698502e-3
# bitsandbytes.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING; only "row" (0) can be loaded
WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


@dataclass(frozen=True)
class Int8Format:
    """Shape of one LLM.int8() weight (JSON-friendly, goes into the MergePlan)."""

    shape: tuple[int, int]
    weight_format: str = "row"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"8-bit weight must be 2-D [out, in] with positive sizes, got {list(self.shape)}")
        if self.weight_format != "row":
            raise ValueError(f"only the 'row' 8-bit weight format is supported, got {self.weight_format!r}")

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "weight_format": self.weight_format}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Int8Format":
        unknown = set(d) - {"shape", "weight_format"}
        if unknown:
            raise ValueError(f"unknown Int8Format field(s) {sorted(unknown)}")
        return cls(shape=tuple(d["shape"]), weight_format=d.get("weight_format", "row"))


def _module_prefix(name: str) -> str:
    if not name.endswith(".weight") and name != "weight":
        raise ValueError(f"8-bit tensor name must end with '.weight', got {name!r}")
    return name[: -len("weight")]


def int8_weight_names(names: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Weight names (``<m>.weight``) that have an ``<m>.SCB`` companion among ``names``."""
    names = set(names)
    out = []
    for n in sorted(names):
        if n.endswith(".SCB") and n[: -len("SCB")] + "weight" in names:
            out.append(n[: -len("SCB")] + "weight")
    return out


def companion_names(name: str) -> list[str]:
    """The tensors stored next to 8-bit weight ``name`` (``<m>.weight``), in state-dict order."""
    p = _module_prefix(name)
    return [f"{p}SCB", f"{p}weight_format"]


def parse_int8(name: str, tensors: Mapping[str, torch.Tensor]) -> Int8Format:
    """Check the tensors of 8-bit weight ``name`` (``<m>.weight``) and return its format.

    ``<m>.weight`` and ``<m>.SCB`` may be ``meta`` tensors (only dtype/shape are checked);
    ``<m>.weight_format`` must hold its value. A missing ``weight_format`` means "row", as in bitsandbytes.
    """
    p = _module_prefix(name)
    w = tensors.get(name)
    if w is None:
        raise ValueError(f"{name}: 8-bit weight tensor is missing")
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"{name}: 8-bit weight must be int8 [out, in], got {str(w.dtype)[6:]} {list(w.shape)}")
    scb = tensors.get(f"{p}SCB")
    if scb is None:
        raise ValueError(f"{name}: its row scales {p}SCB are missing")
    if scb.dtype != torch.float32 or tuple(scb.shape) != (w.shape[0],):
        raise ValueError(f"{p}SCB: expected float32 [{w.shape[0]}], got {str(scb.dtype)[6:]} {list(scb.shape)}")
    fmt_name = "row"
    wf = tensors.get(f"{p}weight_format")
    if wf is not None:
        if wf.device.type == "meta":
            raise ValueError(f"{p}weight_format must hold its value (got a meta tensor)")
        if wf.numel() != 1 or wf.dtype.is_floating_point or wf.dtype.is_complex or wf.dtype == torch.bool:
            raise ValueError(f"{p}weight_format must be one integer, got {str(wf.dtype)[6:]} {list(wf.shape)}")
        code = int(wf.item())
        if code not in WEIGHT_FORMATS:
            raise ValueError(f"{p}weight_format={code} is not a known bitsandbytes layout {WEIGHT_FORMATS}")
        fmt_name = WEIGHT_FORMATS[code]
        if fmt_name != "row":
            raise ValueError(f"{p}weight_format is {fmt_name!r}; only 'row' weights can be read (re-save with bitsandbytes>=0.45)")
    return Int8Format(shape=(int(w.shape[0]), int(w.shape[1])), weight_format=fmt_name)


def dequantize_int8_rows(int8_rows: torch.Tensor, scb_rows: torch.Tensor) -> torch.Tensor:
    """float32 values of some rows: bit-identical to ``bitsandbytes.functional.int8_vectorwise_dequant``."""
    if int8_rows.dtype != torch.int8 or int8_rows.dim() != 2:
        raise ValueError(f"8-bit rows must be int8 [k, in], got {int8_rows.dtype} {list(int8_rows.shape)}")
    if scb_rows.dtype != torch.float32 or scb_rows.numel() != int8_rows.shape[0]:
        raise ValueError(f"SCB rows must be float32 [{int8_rows.shape[0]}], got {scb_rows.dtype} {list(scb_rows.shape)}")
    return int8_rows * scb_rows.to(int8_rows.device).view(-1, 1) * INV_127
