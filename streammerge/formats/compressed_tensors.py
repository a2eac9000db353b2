"""compressed-tensors checkpoints (llm-compressor): which schemes are read, and their FP8 weights.

config.json's ``quantization_config`` (quant_method "compressed-tensors") lists ``config_groups``,
each a scheme for the modules its ``targets`` name; the tensors say which modules were quantized
(an e4m3 ``.weight`` with its ``.weight_scale``). Only FP8 weights are read: ``float-quantized``,
8-bit float, symmetric, a static scale per tensor, channel or square tile; anything else (int4
pack-quantized, NVFP4, MXFP4, sparsity, a model not yet compressed) is refused by name.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import InputError, UnsupportedError
from .checkpoint import Checkpoint, TensorRef
from .codecs.ct_fp8 import SCALE_DTYPES, SCALE_SUFFIX, CtFp8Format, scale_name

QUANT_METHOD = "compressed-tensors"
# static activation and KV-cache scales of the scheme (a module's input/output, attention's q/k/v)
SCHEME_SCALES = (".input_scale", ".output_scale", ".q_scale", ".k_scale", ".v_scale")


def ct_quantization_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    q = (config or {}).get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def _schemes(root, qc: Mapping[str, Any]) -> dict[str, int]:
    """strategy -> tile side (0 but for "block") of the FP8 weight schemes the config declares."""
    where = f"{root}: config.json's compressed-tensors quantization_config"
    if qc.get("sparsity_config"):
        raise UnsupportedError(f"{where} has a sparsity_config; sparse compressed-tensors checkpoints are not supported")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise UnsupportedError(f"{where} has quantization_status {status!r}; only compressed checkpoints are read")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"{where} has no config_groups; the config is incomplete, re-download config.json")
    top_format = qc.get("format")
    found: dict[str, int] = {}
    for gname, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if weights is None:
            continue  # an activation- or KV-cache-only group: no weight of ours changes
        fmt = group.get("format") or top_format
        kind = f"{weights.get('type')} {weights.get('num_bits')}-bit"
        if fmt != "float-quantized" or weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise UnsupportedError(
                f"{where}: group {gname!r} is a {kind} scheme stored as {fmt!r}, which streammerge does not read "
                "(it reads FP8 'float-quantized' weights); use a 16-bit or block-FP8 base"
            )
        if not weights.get("symmetric", True) or weights.get("dynamic") not in (False, None):
            raise UnsupportedError(f"{where}: group {gname!r} has asymmetric or dynamic weight scales; not supported")
        strategy = weights.get("strategy")
        if strategy == "block":
            bs = weights.get("block_structure")
            if not (isinstance(bs, list) and len(bs) == 2 and bs[0] == bs[1] and isinstance(bs[0], int) and bs[0] > 0):
                raise UnsupportedError(f"{where}: group {gname!r} has block_structure {bs!r}; square tiles are supported")
            found[strategy] = bs[0]
        elif strategy in ("tensor", "channel"):
            found[strategy] = 0
        else:
            raise UnsupportedError(f"{where}: group {gname!r} has weight strategy {strategy!r}; "
                                   "tensor, channel and block are supported")
    if not found:
        raise InputError(f"{where} quantizes no weights; remove it from config.json if the model is 16-bit")
    return found


def _strategy_of(shape: tuple[int, ...], scale: tuple[int, ...], schemes: Mapping[str, int]) -> str | None:
    for strategy, block in schemes.items():
        f = CtFp8Format(tuple(shape), strategy, "F32", block)
        if tuple(scale) == f.scale_shape:
            return strategy
    return None


def scheme_scales(checkpoint: Checkpoint) -> list[str]:
    """The static activation / KV-cache scales of a compressed-tensors `checkpoint`: part of its scheme,
    copied where the scheme is kept, meaningless in a 16-bit model (empty for other bases)."""
    if ct_quantization_config(checkpoint.config) is None:
        return []
    return [n for n in checkpoint.tensors if n.endswith(SCHEME_SCALES)]


def find_ct_fp8(checkpoint: Checkpoint) -> dict[str, tuple[CtFp8Format, dict[str, TensorRef]]]:
    """Every FP8 weight of a compressed-tensors `checkpoint` (empty for other bases), keyed by weight
    name: (its format, its scale tensor by name)."""
    qc = ct_quantization_config(checkpoint.config)
    if qc is None:
        return {}
    root, tensors = checkpoint.root, checkpoint.tensors
    schemes = _schemes(root, qc)
    found = {}
    for name, ref in tensors.items():
        info = ref.info
        if info.dtype not in ("F8_E4M3", "F8_E5M2"):
            continue
        if info.dtype != "F8_E4M3" or not name.endswith(".weight") or len(info.shape) != 2:
            raise UnsupportedError(f"{root}: {name} is {info.dtype} {list(info.shape)}; only 2-D e4m3 '.weight' "
                                   "tensors of compressed-tensors checkpoints are read")
        sname = scale_name(name)
        sref = tensors.get(sname)
        if sref is None:
            raise InputError(f"{root}: the FP8 weight {name} has no scale tensor {sname}; re-download the checkpoint")
        strategy = _strategy_of(tuple(info.shape), tuple(sref.info.shape), schemes)
        if strategy is None or sref.info.dtype not in SCALE_DTYPES:
            raise InputError(
                f"{root}: {sname} is {sref.info.dtype} {list(sref.info.shape)}, which fits none of the FP8 schemes "
                f"config.json declares ({', '.join(sorted(schemes))}) for a {list(info.shape)} weight; the checkpoint "
                "and its config disagree, re-download them"
            )
        fmt = CtFp8Format(tuple(info.shape), strategy, sref.info.dtype, schemes[strategy])
        found[name] = (fmt, {sname: sref})
    if not found:
        raise InputError(f"{root}: config.json's quantization_config says compressed-tensors FP8, but no tensor is "
                         "stored as FP8; remove quantization_config from config.json if the weights were dequantized")
    stray = [n for n in tensors if n.endswith(".weight" + SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] not in found]
    if stray:
        raise InputError(f"{root}: {stray[0]} is a weight scale, but {stray[0][: -len(SCALE_SUFFIX)]} is not an FP8 "
                         "weight; the checkpoint is inconsistent, re-download it")
    return found
