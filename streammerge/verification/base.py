"""What every verify check stands on: constants of the bounds, a chunk of rows, the context checks
share, the `TensorCheck` protocol and the base side of a tensor (`BaseRows`). Imports nothing of its
siblings but `report`, so that the checks and the pass import it one way."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..formats import codecs
from ..formats.safetensors import ITEMSIZE, TORCH_NAME, TensorInfo
from ..planning import streaming as qs
from ..planning.types import OutputTensor
from .report import Fault, TensorResult

PROBES = 4
CONFIDENCE = 36.0  # -ln(false-alarm probability) of each statistical test
ROW_FACTOR = 1 + 2 * math.sqrt(CONFIDENCE) + 2 * CONFIDENCE  # per-row bound on r²/σ² (= 85)
TILE_ELEMENTS = 1 << 18  # float64 working tiles: at most 2 MB each, smaller for small budgets
TILES = 3
TEMPORARIES_SHARE = 16  # 1/16 of the budget is kept for the per-tile temporaries
U32 = 2.0**-24
LOCALIZED_FRACTION = 0.05  # a fault confined to at most this share of rows is "values differ in N rows"

_F64_EXPONENT_BITS = 0x7FF0000000000000
_UNIT_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "BF16": 2.0**-8, "F16": 2.0**-11}


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, TORCH_NAME[name])


def _rows_and_width(shape: Sequence[int]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


RTILES = 6  # float32 work tiles of a recompute check: acc, scratch, W, |Δ| bound, O, bound

# ---------------------------------------------------------------------------------- tensor checks


@dataclass
class Chunk:
    """Row chunk [row_start, row_start + rows) of one tensor: OUT's bytes and the base's bytes."""

    row_start: int
    rows: int
    out: memoryview
    base: memoryview
    scratch: memoryview


class Context:
    """What checks share: the device, probe settings, float64 tiles and a reader for factors."""

    def __init__(self, device: torch.device, probes: int, seed: int, tile_elements: int, read: Callable[[str, int, memoryview], None],
                 rtile_elements: int = 0, out_tensors: dict[str, tuple[str, TensorInfo]] | None = None,
                 head_counts: tuple[int, ...] = ()):
        self.device = device
        self.probes = probes
        self.seed = seed
        self.read = read
        # W', W (then W' − W), and the power of two of each element of W'
        self.tiles = [torch.empty(tile_elements, dtype=torch.float64, device=device) for _ in range(TILES)]
        self.rtiles = [torch.empty(rtile_elements, dtype=torch.float32, device=device) for _ in range(RTILES if rtile_elements else 0)]
        self.out_tensors = out_tensors or {}
        self.head_counts = head_counts  # the config's attention head counts (hypotheses of a wrong q/k permutation)

    def load(self, src) -> torch.Tensor:
        """A whole input tensor (LoRA factors, statistics), on the host in its stored dtype."""
        buf = bytearray(src.end - src.start)
        self.read(src.file, src.start, memoryview(buf))
        if not buf:
            return torch.empty(src.shape, dtype=_torch_dtype(src.dtype))
        return torch.frombuffer(buf, dtype=_torch_dtype(src.dtype)).reshape(src.shape)

    def out_tensor(self, name: str) -> torch.Tensor | None:
        """A small tensor of OUT (a 4-bit weight's statistics), None when missing or misshapen."""
        where = self.out_tensors.get(name)
        if where is None:
            return None
        path, info = where
        buf = bytearray(info.end - info.start)
        self.read(path, info.start, memoryview(buf))
        if not buf:
            return torch.empty(tuple(info.shape), dtype=_torch_dtype(info.dtype))
        return torch.frombuffer(buf, dtype=_torch_dtype(info.dtype)).reshape(tuple(info.shape))


def _as_tensor(view: memoryview, dtype: str, rows: int, width: int) -> torch.Tensor:
    if rows * width == 0:
        return torch.empty((rows, width), dtype=_torch_dtype(dtype))
    raw = torch.frombuffer(view, dtype=torch.uint8, count=rows * width * ITEMSIZE[dtype])
    return raw.view(_torch_dtype(dtype)).reshape(rows, width)


class TensorCheck(ABC):
    """Streams one output tensor's row chunks against what the plan says it must hold."""

    category = ""  # the report's row (CHECK_LABELS); the op by default
    needs_prepass = False  # True: `prepass(row_start, base_rows)` sees every base row before `feed`
    tolerated = False  # set by `finish`: passed within tolerance without being byte-exact (another tool's encoding)

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.tensor = tensor
        self.ctx = ctx
        self.category = self.category or tensor.op
        self.rows, self.width = _rows_and_width(tensor.weight_shape)
        self.align = 1  # chunks start at multiples of this many rows
        self.base = self._base_rows()

    def _base_rows(self):
        """How the base's rows are read (None: the check reads only OUT's bytes, as one row of bytes)."""
        return BaseRows(self.tensor, self.ctx)

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        """(offset in OUT's tensor, length) of rows [r0, r1)."""
        row = self.width * ITEMSIZE[self.tensor.dtype]
        return r0 * row, (r1 - r0) * row

    def prepass(self, row_start: int, base_rows: torch.Tensor) -> None:
        raise NotImplementedError

    def again(self) -> bool:
        """Called after each full pass over the rows: True asks for one more (a failing tensor's diagnosis)."""
        return False

    @abstractmethod
    def feed(self, chunk: Chunk) -> None: ...

    @abstractmethod
    def finish(self) -> tuple[TensorResult, Fault | list[Fault] | None]: ...


def _fmt_factor(k: float) -> str:
    return f"{k:.1f}" if abs(k - round(k, 1)) < 0.005 else f"{k:.3g}"


def base_dtype_name(t: OutputTensor) -> str:
    """Safetensors dtype of the base rows the math starts from (a decoded source: what bitsandbytes returns)."""
    if t.quant_in is not None:
        return codecs.get(t.quant_in.codec).decoded_dtype(t.quant_in.format)
    return t.source.dtype if t.source is not None else "F32"


# ------------------------------------------------------------------------------------ base rows


class BaseRows:
    """The base side of one tensor, a row range at a time: the bytes to read and the rows they decode to
    (stored dtype for plain sources; float32 for bitsandbytes and round-tripped ones, as merge sees them)."""

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.t = tensor
        self.width = _rows_and_width(tensor.weight_shape)[1]
        self.decoder = qs.decoder(tensor, ctx.load, ctx.device) if tensor.quant_in is not None else None
        self.roundtrip = qs.roundtrip(tensor, ctx.device) if tensor.roundtrip is not None else None
        self.dtype = base_dtype_name(tensor)

    @property
    def needs_stats(self) -> bool:
        return self.roundtrip is not None and self.roundtrip.needs_stats

    def span(self, r0: int, r1: int) -> tuple[int, int]:
        return qs.source_span(self.t, r0, r1)

    def rows(self, view: memoryview, r0: int, r1: int, raw: bool = False) -> torch.Tensor:
        n = r1 - r0
        length = self.span(r0, r1)[1]
        data = torch.frombuffer(view, dtype=torch.uint8, count=length) if length else torch.empty(0, dtype=torch.uint8)
        if self.decoder is not None:
            return self.decoder.rows(data, r0, r1)
        base = data.view(_torch_dtype(self.t.source.dtype)).reshape(n, self.width)
        if self.roundtrip is not None and not raw:
            return self.roundtrip.rows(base, r0)
        return base
