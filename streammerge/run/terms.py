"""One output tensor's terms, loaded from the adapter files into the float32 objects of `ops`.

The executor calls `TensorMath.load` when a tensor's first chunk arrives; the factors are small
(rank × width) and live only while that tensor is processed. A column-norm DoRA tensor (weight
stored [in, out]) needs a first pass over all its rows (`prepass`) before any row can be written.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import ops
from ..planning.types import LoraTerm, OutputTensor, Source

Reader = Callable[[Source], torch.Tensor]


def _width(tensor: OutputTensor) -> int:
    width = 1
    for d in tensor.weight_shape[1:]:
        width *= d
    return width


class TensorMath:
    """The float32 terms of one tensor, in application order."""

    def __init__(self, terms: list, delta_terms: list, column_norms: ops.ColumnNorms | None, magnitude: torch.Tensor | None):
        self.terms = terms
        self._delta_terms = delta_terms
        self._column_norms = column_norms
        self._magnitude = magnitude

    @classmethod
    def load(cls, tensor: OutputTensor, read: Reader, device: torch.device) -> "TensorMath":
        terms: list = []
        column_norms = magnitude = None
        for term in tensor.loras:
            if term.kind in ("lora", "embedding", "dora"):
                terms.append(_lora(term, read, device))
                if term.kind == "dora":
                    m = read(term.magnitude).to(device=device, dtype=torch.float32)
                    if term.transpose:
                        column_norms, magnitude = ops.ColumnNorms(_width(tensor), device), m
                    else:
                        terms.append(ops.DoraRowsF32(m))
            elif term.kind == "moe":
                shape = (tensor.weight_shape[1], tensor.weight_shape[2])
                terms.append(ops.experts_term(read(term.a), read(term.b), term.factor, term.experts, term.transpose, shape, device))
            elif term.kind == "bias":
                terms.append(ops.BiasTermF32(read(term.b).to(device=device, dtype=torch.float32).reshape(-1), term.factor))
            elif term.kind == "token_rows":
                terms.append(ops.RowsTermF32(term.indices, read(term.b).to(device=device, dtype=torch.float32)))
            else:
                raise ValueError(f"{tensor.name}: unknown term kind {term.kind!r}")
        return cls(terms, list(terms), column_norms, magnitude)

    def prepass(self, base_rows: torch.Tensor, row_start: int, tiles: ops.Tiles) -> None:
        ops.accumulate_columns(base_rows, self._delta_terms, row_start, self._column_norms, tiles)

    def compute(self, base_rows: torch.Tensor, row_start: int, out_dtype: torch.dtype, tiles: ops.Tiles, out=None) -> torch.Tensor:
        return ops.merge_rows(base_rows, self._ready(), row_start, out_dtype, tiles=tiles, out=out)

    def tiles(self, base_rows: torch.Tensor, row_start: int, tiles: ops.Tiles, align: int = 1):
        """The merged rows as float32 tiles (see ops.merged_tiles)."""
        return ops.merged_tiles(base_rows, self._ready(), row_start, tiles, align)

    def _ready(self) -> list:
        if self._column_norms is not None:  # the first pass is complete: the column scale is known
            self.terms.append(ops.DoraColumnsF32(self._magnitude / self._column_norms.norms()))
            self._column_norms = None
        return self.terms


def _lora(term: LoraTerm, read: Reader, device: torch.device) -> ops.LoraTermF32:
    a, b = read(term.a), read(term.b)
    if term.expert is not None:  # one expert's factors of a ParamWrapper LoRA, and a row range of B
        a_e, b_e = ops.expert_factors(a, b, term.experts)
        a, b = a_e[term.expert], b_e[term.expert]
        if term.b_rows is not None:
            b = b[term.b_rows[0]:term.b_rows[1]]
    return ops.lora_term(a, b, term.factor, term.transpose, device)
