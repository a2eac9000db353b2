"""Quantized weights of a checkpoint, each grouped into one logical weight.

transformers saves a 4-bit ``Linear4bit`` weight as the packed bytes plus four or six statistic
tensors, and an 8-bit ``Linear8bitLt`` weight as int8 plus ``SCB`` and ``weight_format`` (see
:mod:`.bnb4` and :mod:`.int8`); a block-FP8 weight is e4m3 codes plus ``weight_scale_inv`` (see
:mod:`.codecs.fp8`), described by config.json's ``quantization_config``. The planner treats each group as one weight of the logical shape
the quant state records. Only headers and a few hundred bytes per weight (the quant-state JSON,
the 16-entry codebook, the weight-format byte) are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import InputError, UnsupportedError
from .checkpoint import Checkpoint, TensorRef
from .safetensors import TORCH_NAME, pread_exact
from .codecs import bnb4, int8
from .compressed_tensors import ct_quantization_config, find_ct_fp8
from .codecs.fp8 import SCALE_SUFFIX, Fp8BlockFormat, scale_name
from .codecs.mxfp4 import BLOCK as MX_BLOCK, BLOCKS_SUFFIX, SCALES_SUFFIX, Mxfp4Format

# tensors small enough to read while planning (the JSON is ~170 bytes; quant_map 64; weight_format 1)
_SMALL_SUFFIXES = ("quant_map", "weight_format")


@dataclass(frozen=True)
class QuantizedWeight:
    """One bitsandbytes weight: its packed tensor, its statistic tensors, and its codec format."""

    name: str  # the model's parameter: "<m>.weight"; an MXFP4 expert parameter "<m>.gate_up_proj"
    codec: str  # "bnb4" | "int8" | "fp8" | "mxfp4"
    format: Any  # bnb4.Bnb4Format | int8.Int8Format | fp8.Fp8BlockFormat | mxfp4.Mxfp4Format
    packed: TensorRef
    companions: dict[str, TensorRef] = field(default_factory=dict)  # full name -> ref, state-dict order

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.format.shape)

    @property
    def dtype(self) -> str | None:
        """The dtype bitsandbytes dequantizes to (4-bit quant state); None for the others (the model's dtype)."""
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


READ_QUANT_METHODS = ("bitsandbytes", "fp8", "compressed-tensors", "mxfp4")  # config.json quant_method values whose weights are read


def check_quant_method(checkpoint: Checkpoint) -> None:
    """Refuse, by name, a base quantized with a method whose weights are not read: copying its packed
    tensors into a 16-bit output (and dropping its quantization_config) would make a broken model."""
    q = (checkpoint.config or {}).get("quantization_config")
    if not isinstance(q, dict):
        return
    method = q.get("quant_method", "bitsandbytes")
    if method not in READ_QUANT_METHODS:
        raise UnsupportedError(
            f"{checkpoint.root}: config.json's quantization_config has quant_method {method!r}, which streammerge "
            f"does not read yet (it reads {', '.join(READ_QUANT_METHODS)} and 16-bit bases)"
        )


def find_quantized(checkpoint: Checkpoint) -> dict[str, QuantizedWeight]:
    """Every quantized weight of `checkpoint` (bitsandbytes 4-bit and 8-bit, block FP8, MXFP4), keyed
    by the name of the checkpoint tensor holding its codes (the weight's own name but for MXFP4)."""
    check_quant_method(checkpoint)
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
    if ct_quantization_config(checkpoint.config):
        fp8 = {n: QuantizedWeight(n, "ct_fp8", fmt, tensors[n], scale) for n, (fmt, scale) in find_ct_fp8(checkpoint).items()}
    else:
        fp8 = find_fp8(checkpoint)
    for name, q in fp8.items():
        if name in found:
            raise InputError(f"{checkpoint.root}: {name} has both bitsandbytes statistics and FP8 scales")
        found[name] = q
    found.update(find_mxfp4(checkpoint))
    return found


FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def fp8_quantization_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The base's block-FP8 ``quantization_config`` (quant_method "fp8"), else None."""
    q = (config or {}).get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "fp8" else None


def _fp8_block(root, qc: Mapping[str, Any] | None, example: str) -> int:
    """The tile side config.json gives, after refusing the FP8 schemes not read yet, by name."""
    method = (qc or {}).get("quant_method") if isinstance(qc, dict) else None
    if method != "fp8":
        raise InputError(
            f"{root}: {example} is stored as FP8 but config.json has no quantization_config with "
            f"quant_method 'fp8' (found {method!r}); the checkpoint is incomplete, re-download config.json"
        )
    if qc.get("fmt", "e4m3") != "e4m3":
        raise UnsupportedError(f"{root}: FP8 format {qc.get('fmt')!r} is not supported (only e4m3)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise UnsupportedError(f"{root}: FP8 activation_scheme {qc.get('activation_scheme')!r} is not supported yet "
                               "(only 'dynamic', as DeepSeek and Qwen ship)")
    if qc.get("scale_fmt") not in (None, "float", "float32", "fp32"):
        raise UnsupportedError(f"{root}: FP8 scale_fmt {qc.get('scale_fmt')!r} is not supported yet (float32 scales only)")
    bs = qc.get("weight_block_size")
    if bs is None:
        raise UnsupportedError(f"{root}: per-tensor FP8 scales (no weight_block_size) are not supported yet; "
                               "block FP8 (weight_block_size [128, 128]) is")
    if (not isinstance(bs, (list, tuple)) or len(bs) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bs)
            or bs[0] != bs[1] or bs[0] <= 0):
        raise UnsupportedError(f"{root}: FP8 weight_block_size {bs!r} is not supported (square tiles such as [128, 128] are)")
    return int(bs[0])


def find_fp8(checkpoint: Checkpoint) -> dict[str, QuantizedWeight]:
    """Every block-FP8 weight of `checkpoint` (codes + weight_scale_inv), keyed by weight name."""
    tensors = checkpoint.tensors
    root = checkpoint.root
    coded = [n for n, ref in tensors.items() if ref.info.dtype in FP8_DTYPES]
    scales = [n for n in tensors if n.endswith(SCALE_SUFFIX)]
    qc = fp8_quantization_config(checkpoint.config)
    if not coded:
        if scales:
            raise InputError(f"{root}: {scales[0]} is an FP8 scale, but its weight {scales[0][: -len(SCALE_SUFFIX)]} "
                             "is not stored as FP8; the checkpoint is inconsistent, re-download it")
        if qc is not None:
            raise InputError(f"{root}: config.json's quantization_config says fp8, but no tensor is stored as FP8; "
                             "remove quantization_config from config.json if the weights were dequantized")
        return {}
    block = _fp8_block(root, (checkpoint.config or {}).get("quantization_config"), coded[0])
    found: dict[str, QuantizedWeight] = {}
    for name in coded:
        info = tensors[name].info
        if info.dtype != "F8_E4M3":
            raise UnsupportedError(f"{root}: {name} is {info.dtype}; only F8_E4M3 weights are supported")
        if not name.endswith(".weight"):
            raise InputError(f"{root}: {name} is stored as FP8 but is not a '.weight' tensor; the checkpoint is not block FP8")
        if len(info.shape) != 2:
            raise UnsupportedError(f"{root}: {name} is a {len(info.shape)}-D FP8 tensor {list(info.shape)}; "
                                   "stacked FP8 experts are not supported yet (2-D linear weights are)")
        sname = scale_name(name)
        sref = tensors.get(sname)
        if sref is None:
            raise InputError(f"{root}: the FP8 weight {name} has no scale tensor {sname}; re-download the checkpoint")
        fmt = Fp8BlockFormat(tuple(info.shape), block)
        if sref.info.dtype != "F32" or tuple(sref.info.shape) != fmt.scale_shape:
            raise InputError(
                f"{root}: {sname} is {sref.info.dtype} {list(sref.info.shape)}, but {list(info.shape)} weights in "
                f"{block}x{block} tiles need F32 {list(fmt.scale_shape)} (config.json's weight_block_size); "
                "the checkpoint is inconsistent, re-download it"
            )
        found[name] = QuantizedWeight(name, "fp8", fmt, tensors[name], {sname: sref})
    stray = [n for n in scales if n[: -len(SCALE_SUFFIX)] not in found]
    if stray:
        raise InputError(f"{root}: {stray[0]} is an FP8 scale, but {stray[0][: -len(SCALE_SUFFIX)]} is not an FP8 "
                         "weight; the checkpoint is inconsistent, re-download it")
    return found


def mxfp4_quantization_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The base's MXFP4 ``quantization_config`` (quant_method "mxfp4", gpt-oss), else None."""
    q = (config or {}).get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "mxfp4" else None


def find_mxfp4(checkpoint: Checkpoint) -> dict[str, QuantizedWeight]:
    """Every MXFP4 expert parameter of `checkpoint` (``<p>_blocks`` + ``<p>_scales``), keyed by the blocks' name."""
    tensors = checkpoint.tensors
    root = checkpoint.root
    qc = mxfp4_quantization_config(checkpoint.config)
    blocks = [n for n, ref in tensors.items() if n.endswith(BLOCKS_SUFFIX) and ref.info.dtype == "U8"]
    if qc is None:
        paired = [n for n in blocks if n[: -len(BLOCKS_SUFFIX)] + SCALES_SUFFIX in tensors]
        if paired:
            raise InputError(f"{root}: {paired[0]} looks like an MXFP4 weight (uint8 blocks with their scales) but "
                             "config.json has no quantization_config with quant_method 'mxfp4'; re-download config.json")
        return {}
    if not blocks:
        raise InputError(f"{root}: config.json's quantization_config says mxfp4, but the checkpoint has no "
                         "'*_blocks' tensors; remove quantization_config from config.json if the weights were dequantized")
    found: dict[str, QuantizedWeight] = {}
    for name in blocks:
        param = name[: -len(BLOCKS_SUFFIX)]
        info = tensors[name].info
        sname = param + SCALES_SUFFIX
        sref = tensors.get(sname)
        if sref is None:
            raise InputError(f"{root}: the MXFP4 blocks {name} have no scale tensor {sname}; re-download the checkpoint")
        shape = tuple(info.shape)
        if len(shape) != 4 or shape[3] != MX_BLOCK // 2:
            raise InputError(f"{root}: {name} is {list(shape)}; MXFP4 blocks are [experts, out, in/{MX_BLOCK}, "
                             f"{MX_BLOCK // 2}] bytes; the checkpoint is not gpt-oss style MXFP4")
        if sref.info.dtype != "U8" or tuple(sref.info.shape) != shape[:3]:
            raise InputError(f"{root}: {sname} is {sref.info.dtype} {list(sref.info.shape)}, but the blocks {list(shape)} "
                             f"need U8 {list(shape[:3])} (one E8M0 byte per {MX_BLOCK} values); the checkpoint is "
                             "inconsistent, re-download it")
        e, out, groups, _ = shape
        fmt = Mxfp4Format((e, groups * MX_BLOCK, out))
        found[name] = QuantizedWeight(param, "mxfp4", fmt, tensors[name], {sname: sref})
    stray = [n for n in tensors if n.endswith(SCALES_SUFFIX) and n[: -len(SCALES_SUFFIX)] + BLOCKS_SUFFIX not in found]
    if stray:
        raise InputError(f"{root}: {stray[0]} is an MXFP4 scale, but {stray[0][: -len(SCALES_SUFFIX)] + BLOCKS_SUFFIX} "
                         "is not an MXFP4 blocks tensor; the checkpoint is inconsistent, re-download it")
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
