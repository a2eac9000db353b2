"""The codec protocol: what every stored tensor encoding tells the rest of streammerge.

A codec turns float32 rows into stored bytes and back. Two kinds exist:

- a *row codec* stores each row on its own, in a fixed number of bytes (plain casts, GGUF's block
  types, a test's format): chunks of rows encode independently, so the executor streams them like
  any other tensor and the verifier decodes what is stored row by row;
- a *quantized-weight codec* (bitsandbytes nf4/fp4 and int8) keeps a weight's statistics in
  companion tensors; its module adds what the executor needs beyond this protocol (decoding with
  the statistics, the 4-bit output's statistics pass), reached through the same registry.

Everything here is a pure function of tensors; files, threads and devices stay with the caller.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ...errors import ExecutionError


class Codec:
    """One stored encoding. Subclasses set `name` (the registry key) and override what applies."""

    name: ClassVar[str] = ""
    method: ClassVar[str | None] = None  # the --method whose output this codec writes, if any
    description: ClassVar[str] = ""
    # every correct writer stores the same bytes for the same float32 rows (a plain cast): an unmerged
    # tensor must then be byte-exact, where another tool's quantizer may round a block differently
    deterministic: ClassVar[bool] = False

    # -- layout

    def row_alignment(self, width: int) -> int:
        """Chunks start at multiples of this many rows (whole blocks of a block format)."""
        return 1

    def check_width(self, name: str, width: int) -> str | None:
        """Why a tensor of rows `width` wide cannot be stored this way (None: it can)."""
        return None

    def row_bytes(self, width: int) -> int:
        """Stored bytes of one row of `width` elements."""
        raise NotImplementedError

    def stored(self, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of the stored tensor whose logical shape is `shape`."""
        rows = shape[0] if shape else 1
        return "U8", (rows, self.row_bytes(math.prod(shape[1:]) if shape else 1))

    def work_bytes(self, width: int) -> int:
        """Temporaries of `encode` per row beyond the float32 rows and the output bytes."""
        return 0

    # -- values

    def encode(self, rows: torch.Tensor, out: memoryview | None = None) -> memoryview:
        """float32 rows [n, width] on the CPU -> n * row_bytes(width) stored bytes (into `out` if given)."""
        raise NotImplementedError

    def decode(self, raw: torch.Tensor, width: int) -> torch.Tensor:
        """Stored bytes (uint8 [n, row_bytes]) -> float32 rows [n, width]."""
        raise NotImplementedError

    def tolerance(self, expected: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """Per element of float32 `expected`: how far a correct encoding of it may decode from it.
        `delta` is the merge's change to the base (another tool may round it to 16 bits first)."""
        raise NotImplementedError

    # -- as a --method's output (codecs with `method` set)

    def encodes(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether this method stores tensor `name` with this codec (the others are cast to --dtype)."""
        return False

    def quantization_config(self, encoded: list[str], others: list[str]) -> dict[str, Any] | None:
        """config.json's `quantization_config` for an output whose tensors `encoded` use this codec."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "description": self.description}


def copy_into(data: memoryview, out: memoryview | None) -> memoryview:
    """`data`, or `data` copied into the front of `out` (the executor's write buffer)."""
    if out is None:
        return data
    out[: len(data)] = data
    return out[: len(data)]


class ScaledWeightCodec(Codec):
    """A quantized-weight codec whose weight is codes plus one scale tensor (block FP8, compressed-
    tensors FP8, MXFP4): what they share as a source and as an output. Subclasses set `format_class`
    (the JSON-friendly format with a `shape`), `stash_part` (the scale part) and what differs."""

    format_class: ClassVar[Any] = None
    stash_part: ClassVar[str] = ""  # the scale part, the statistic a pass over the weight yields
    small_parts: ClassVar[tuple[str, ...]] = ()

    def format(self, fmt_json: dict[str, Any]) -> Any:
        return self.format_class.from_json(fmt_json)

    def source_alignment(self, fmt_json: dict[str, Any]) -> int:
        return 1  # every row finds its scales by index

    def source_span(self, fmt_json: dict[str, Any], row_start: int, row_stop: int) -> tuple[int, int]:
        """One byte per element (e4m3 codes), rows [out, in]."""
        width = self.format(fmt_json).shape[1]
        return row_start * width, (row_stop - row_start) * width

    def decoded_dtype(self, fmt_json: dict[str, Any]) -> str:
        return "F32"

    def out_bytes(self, elements: int) -> int:
        return elements

    @staticmethod
    def constant_part(qo) -> torch.Tensor | None:
        return None

    @staticmethod
    def part_tensor(stats: dict[str, torch.Tensor], qo) -> torch.Tensor:
        return stats[qo.part]


def refuse_nonfinite(merged: torch.Tensor, weight: str, first_row: int, unit: str, fmt: str) -> None:
    """A quantized output cannot store NaN/Inf: an error naming the tensor and the row (or expert)."""
    if bool(torch.isfinite(merged).all()):
        return
    bad = int((~torch.isfinite(merged)).nonzero()[0, 0]) + first_row
    raise ExecutionError(
        f"tensor {weight!r}: the merged weight has NaN/Inf in {unit} {bad}, which {fmt} cannot store; "
        "the output is left incomplete: fix the adapter or the base"
    )
