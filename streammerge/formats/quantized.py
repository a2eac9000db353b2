"""bitsandbytes weights of a checkpoint, each grouped into one logical weight.

transformers saves a 4-bit ``Linear4bit`` weight as the packed bytes plus four or six statistic
tensors, and an 8-bit ``Linear8bitLt`` weight as int8 plus ``SCB`` and ``weight_format`` (see
:mod:`.bnb4` and :mod:`.int8`). The planner treats each group as one weight of the logical shape
the quant state records. Only headers and a few hundred bytes per weight (the quant-state JSON,
the 16-entry codebook, the weight-format byte) are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import InputError
from .checkpoint import Checkpoint, TensorRef
from .safetensors import TORCH_NAME, pread_exact
from .codecs import bnb4, int8

# tensors small enough to read while planning (the JSON is ~170 bytes; quant_map 64; weight_format 1)
_SMALL_SUFFIXES = ("quant_map", "weight_format")


@dataclass(frozen=True)
class QuantizedWeight:
    """One bitsandbytes weight: its packed tensor, its statistic tensors, and its codec format."""

    name: str  # "<m>.weight"
    codec: str  # "bnb4" | "int8"
    format: Any  # bnb4.Bnb4Format | int8.Int8Format
    packed: TensorRef
    companions: dict[str, TensorRef] = field(default_factory=dict)  # full name -> ref, state-dict order

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.format.shape)

    @property
    def dtype(self) -> str | None:
        """The dtype bitsandbytes dequantizes to (4-bit quant state); None for 8-bit (float32 values)."""
        return self.format.dtype if self.codec == "bnb4" else None


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """The whole tensor `ref` from disk (used for small statistic tensors only)."""
    info = ref.info
    buf = bytearray(info.nbytes)
    fd = os.open(ref.file, os.O_RDONLY)
    try:
        pread_exact(fd, memoryview(buf), info.start, str(ref.file))
    finally:
        os.close(fd)
    dtype = getattr(torch, TORCH_NAME[info.dtype])
    if not buf:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def _meta(ref: TensorRef) -> torch.Tensor:
    return torch.empty(ref.info.shape, dtype=getattr(torch, TORCH_NAME[ref.info.dtype]), device="meta")


def _is_small(name: str) -> bool:
    return name.endswith(_SMALL_SUFFIXES) or bnb4.QUANT_STATE_PREFIX in name


def _as_tensor(ref: TensorRef, data: bytes) -> torch.Tensor:
    dtype = getattr(torch, TORCH_NAME[ref.info.dtype])
    if not data:
        return torch.empty(ref.info.shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(ref.info.shape)


def _small_tensors(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The few small tensors parsing needs (quant states, code books, weight formats): read from the
    shards, or for a Hub base not yet downloaded by range requests (`HubCheckpoint.read_small`)."""
    refs = {n: ref for n, ref in checkpoint.tensors.items() if _is_small(n)}
    read_small = getattr(checkpoint, "read_small", None)
    if read_small is None:
        return {n: read_tensor(ref) for n, ref in refs.items()}
    return {n: _as_tensor(refs[n], data) for n, data in read_small(refs).items()}


def _view(tensors: Mapping[str, TensorRef], names: list[str], small: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta tensors for the named entries, real data for the few small ones parsing needs."""
    return {n: small[n] if _is_small(n) else _meta(tensors[n]) for n in names if n in tensors}


def find_quantized(checkpoint: Checkpoint) -> dict[str, QuantizedWeight]:
    """Every bitsandbytes 4-bit and 8-bit weight of `checkpoint`, keyed by weight name."""
    tensors = checkpoint.tensors
    small = _small_tensors(checkpoint)
    found: dict[str, QuantizedWeight] = {}
    beside: dict[str, list[str]] = {}  # "<m>.weight" -> the "<m>.weight.*" tensors
    for k in tensors:
        i = k.rfind(".weight.")
        if i >= 0:
            beside.setdefault(k[: i + len(".weight")], []).append(k)
    for name in bnb4.bnb4_weight_names(tensors):
        related = [name] + beside.get(name, [])
        try:
            fmt = bnb4.parse_bnb4(name, _view(tensors, related, small))
        except ValueError as exc:
            raise InputError(f"{checkpoint.root}: bitsandbytes 4-bit weight {name}: {exc}") from None
        comps = bnb4.companion_names(name, fmt.nested, fmt.quant_type)
        extra = sorted(set(related) - {name} - set(comps))
        if extra:
            raise InputError(f"{checkpoint.root}: unexpected tensor(s) {extra[:3]} next to the 4-bit weight {name}")
        found[name] = QuantizedWeight(name, "bnb4", fmt, tensors[name], {c: tensors[c] for c in comps})
    for name in int8.int8_weight_names(tensors):
        if name in found:
            raise InputError(f"{checkpoint.root}: {name} has both 4-bit and 8-bit statistics")
        comps = [c for c in int8.companion_names(name) if c in tensors]
        try:
            fmt = int8.parse_int8(name, _view(tensors, [name, *comps], small))
        except ValueError as exc:
            raise InputError(f"{checkpoint.root}: bitsandbytes 8-bit weight {name}: {exc}") from None
        found[name] = QuantizedWeight(name, "int8", fmt, tensors[name], {c: tensors[c] for c in comps})
    return found


def base_quantization_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The base's bitsandbytes ``quantization_config`` (None when absent or another method)."""
    q = (config or {}).get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method", "bitsandbytes") != "bitsandbytes":
        return None
    return q


def config_dtype(config: Mapping[str, Any] | None) -> str | None:
    """The model dtype config.json records (``dtype``, formerly ``torch_dtype``), if a float type."""
    for key in ("dtype", "torch_dtype"):
        value = (config or {}).get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in ("bfloat16", "float16", "float32"):
            return value.removeprefix("torch.")
    return None
