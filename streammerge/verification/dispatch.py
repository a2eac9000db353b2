"""Which check each planned tensor gets (`check_class`, `unverifiable`) and how `--max-memory` is
spent by the pass (`verify_layout`): the verifier's plan, apart from the pass that runs it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PlanError
from ..formats import codecs
from ..formats.safetensors import ITEMSIZE
from ..options import format_size
from ..planning.types import MergePlan, OutputTensor
from .base import TEMPORARIES_SHARE, TILE_ELEMENTS, TILES, TensorCheck, _rows_and_width
from .checks import (
    RTILE_BYTES,
    BytesCheck,
    CastCheck,
    RecomputeCheck,
    ReplaceCheck,
    alignment,
    base_row_bytes,
    decoded_row_bytes,
    out_row_bytes,
    state_bytes,
)
from .encoded import EncodedCheck
from .fp8 import Fp8WeightCheck
from .mxfp4 import Mxfp4WeightCheck
from .linear import LinearElementCheck
from .probe import PROBED_KINDS, LinearLoraCheck
from .quant import QuantPartCheck, QuantWeightCheck

# ----------------------------------------------------------------------------------- memory layout


@dataclass(frozen=True)
class VerifyLayout:
    """How `--max-memory` is spent: one chunk buffer (out rows + base rows + cast scratch), the
    float64 work tiles, and the largest merged tensor's factors and probes."""

    chunk_bytes: int
    tile_elements: int
    fixed_bytes: int
    rtile_elements: int = 0  # float32 tiles of the recompute checks

    @property
    def total(self) -> int:
        return self.chunk_bytes + self.fixed_bytes


def _row_cost(tensor: OutputTensor) -> int:
    """Chunk-buffer bytes per row: OUT's row, the base's row, a cast scratch, decoded float32 rows."""
    if tensor.quant_out is not None and tensor.quant_out.part != "weight":
        return 1  # statistic tensors are streamed as bytes
    out_b = out_row_bytes(tensor)
    return 2 * out_b + base_row_bytes(tensor) + decoded_row_bytes(tensor)


def _merge_fixed_bytes(tensor: OutputTensor, probes: int) -> int:
    width = _rows_and_width(tensor.shape)[1]
    total = width * probes * 8  # the probes
    for term in tensor.loras:
        for src in (term.a, term.b):
            total += math.prod(src.shape) * (ITEMSIZE[src.dtype] + 3 * 8)  # raw, float64, |float64|
    from ..planning.streaming import state_bytes

    return total + state_bytes(tensor)


def verify_layout(plan: MergePlan, probes: int, fast: bool = False) -> VerifyLayout:

    classes = {t.name: check_class(t, fast) for t in plan.tensors}
    merges = [t for t in plan.tensors if classes[t.name] is LinearLoraCheck]
    recomputes = [t for t in plan.tensors if classes[t.name] is not None and issubclass(classes[t.name], (RecomputeCheck, EncodedCheck))]
    budget = plan.options.max_memory
    tile = rtile = 0
    if merges:  # at least one row; at most ~1/16 of the budget in all tiles
        tile = max([min(TILE_ELEMENTS, budget // (16 * TILES * 8))] + [_rows_and_width(t.shape)[1] for t in merges])
    if recomputes:  # float32 tiles and their temporaries: ~1/16 of the budget, at least one aligned group of rows
        rtile = max([min(TILE_ELEMENTS, budget // (16 * RTILE_BYTES))]
                    + [alignment(t) * _rows_and_width(t.weight_shape)[1] for t in recomputes])
    fixed = TILES * tile * 8 + RTILE_BYTES * rtile
    fixed += max([_merge_fixed_bytes(t, probes) for t in merges] + [state_bytes(t) for t in recomputes] + [0])
    fixed += budget // TEMPORARIES_SHARE  # small per-tile results (probe products, row norms, sums)
    widest = max((alignment(t) * _row_cost(t) for t in plan.tensors), default=1)
    largest = max((_rows_and_width(t.weight_shape)[0] * _row_cost(t) for t in plan.tensors), default=1)
    chunk = budget - fixed
    if chunk < widest:
        need = fixed + widest
        raise PlanError(
            f"--max-memory {format_size(plan.options.max_memory)} is too small to verify: one row of the widest "
            f"tensor with its base row needs {format_size(widest)} besides {format_size(fixed)} of work space; "
            f"use at least --max-memory {math.ceil(need / 1e6)}MB"
        )
    return VerifyLayout(min(chunk, max(largest, 1)), tile, fixed, rtile)


def unverifiable(plan: MergePlan) -> dict[str, list[str]]:
    """Operations, LoRA term kinds and codecs this verifier has no check for, with the tensors using
    them: refusing them beats a check that cannot fail. (`check_class` picks the checks.)"""
    out: dict[str, list[str]] = {}
    for t in plan.tensors:
        if check_class(t) is not None:
            continue
        kinds = [term.kind for term in t.loras if term.kind not in KNOWN_KINDS]
        if t.quant_in is not None and not _decodable(t.quant_in.codec):
            kinds.append(f"{t.quant_in.codec} base")
        if t.encoding is not None and not kinds:
            kinds.append(f"{t.encoding} encoding")
        for kind in kinds or [t.op]:
            out.setdefault(kind, []).append(t.name)
    return out



def check_class(t: OutputTensor, fast: bool = False) -> type[TensorCheck] | None:
    """The check for one planned tensor (None: this verifier cannot check it). Plain linear LoRA merges
    are checked element by element (`LinearElementCheck`), or by the probe test with `fast`."""
    if t.quant_in is not None and not _decodable(t.quant_in.codec):
        return None
    if any(term.kind not in KNOWN_KINDS for term in t.loras):
        return None
    if t.encoding is not None:
        return EncodedCheck if codecs.find(t.encoding) is not None else None
    if t.op == "quant":
        if t.quant_out is None:
            return None
        if t.quant_out.part != "weight":
            return QuantPartCheck  # a statistic: checked by value, or with its weight
        return {"fp8": Fp8WeightCheck, "ct_fp8": Fp8WeightCheck, "mxfp4": Mxfp4WeightCheck}.get(t.quant_out.codec, QuantWeightCheck)
    if t.op == "merge":
        probed = all(term.kind in PROBED_KINDS for term in t.loras) and t.loras
        if probed:
            return LinearLoraCheck if fast else LinearElementCheck
        return RecomputeCheck
    if t.op in ("bias_add", "token_rows", "dequant"):
        return RecomputeCheck
    return {"copy": BytesCheck, "cast": CastCheck, "replace": ReplaceCheck}.get(t.op)


def _decodable(codec: str) -> bool:
    """A quantized source the checks can decode (its codec gives a row decoder)."""
    found = codecs.find(codec)
    return found is not None and hasattr(found, "decoder")


KNOWN_KINDS = ("lora", "embedding", "dora", "moe", "bias", "token_rows")
