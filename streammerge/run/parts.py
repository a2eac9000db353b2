"""Output tensors derived rather than streamed: a quantized output weight's statistics (absmax, code
books, quant state; FP8 tile scales) and generated tensors (GGUF's rope_freqs), and the shard layouts as resolved
once the double-quant quant-state lengths are known (see `schedule.schedule`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Collection, Mapping

import torch

from ..errors import ExecutionError
from ..planning import streaming as qs
from ..planning.build import resize_shard
from ..planning.types import MergePlan, OutputShard, OutputTensor
from . import encoded
from .compute import torch_dtype
from .schedule import _rows_and_width


class DerivedParts:
    def __init__(self, plan: MergePlan, done: Collection[str], finished: Collection[str],
                 partial: Mapping[str, Any], recorded: Mapping[str, OutputShard]):
        self.partial = partial
        # small statistics per weight until written, and the last pass's absmax
        self._small: dict[str, dict[str, torch.Tensor]] = {}
        self._stash: tuple[str, torch.Tensor] | None = None
        # finished shards keep the layout they were written with; a reopened one is checked against it
        self.resolved: dict[str, OutputShard] = {k: v for k, v in recorded.items() if k in finished}
        self._recorded = dict(recorded)
        self.current: dict[str, OutputTensor] = {}  # the open shard's tensors, as resolved
        self._parts_left: dict[str, int] = {}
        for t in plan.tensors:
            if t.quant_out is not None and t.quant_out.part != "weight" and t.name not in done:
                self._parts_left[t.quant_out.weight] = self._parts_left.get(t.quant_out.weight, 0) + 1

    def remember(self, weight: str, qo, stats: dict[str, torch.Tensor]) -> None:
        small = {}
        for part in qs.small_parts(qo):
            if part == "nested_absmax" and part not in stats:
                continue
            small[part] = qs.part_tensor(stats, replace(qo, part=part))
        before = self._small.get(weight)
        if before is not None and any(not torch.equal(before[k], v) for k, v in small.items() if k in before):
            raise ExecutionError(f"internal error: the statistics of {weight} differ between two passes")
        self._small[weight] = small
        self._stash = (weight, stats[qs.stash_part(qo)])

    def resolve(self, shard: OutputShard) -> OutputShard:
        """The shard with the double-quant JSON lengths its statistics pass found (see resize_shard)."""
        shapes = {
            t.name: (int(self._small[t.quant_out.weight]["quant_state"].numel()),)
            for t in shard.tensors
            if t.quant_out is not None and not t.quant_out.exact_size
        }
        resolved = resize_shard(shard, shapes)
        recorded = self._recorded.get(shard.filename)
        if shard.filename in self.partial and recorded is not None and recorded != resolved:
            raise ExecutionError(
                f"internal error: {shard.filename} resolves to another layout than the interrupted run's; "
                "re-run with --overwrite to start over"
            )
        self.resolved[shard.filename] = resolved
        self.current = {t.name: t for t in resolved.tensors}
        return resolved

    def part_bytes(self, tensor: OutputTensor) -> memoryview:
        """Bytes of a quantized output's statistic tensor, from the code books or its weight's statistics."""
        if tensor.op == "constant":  # a generated tensor (GGUF's rope_freqs): its values, encoded
            rows = torch.tensor(tensor.values, dtype=torch.float32).reshape(_rows_and_width(tensor.shape)[0], -1)
            return encoded.encode(rows, tensor.encoding, None)
        qo = tensor.quant_out
        data = qs.constant_part(qo)
        if data is None and qo.part == qs.stash_part(qo):
            if self._stash is None or self._stash[0] != qo.weight:
                raise ExecutionError(f"internal error: the {qo.part} of {qo.weight} is not at hand")
            data, self._stash = self._stash[1], None
        elif data is None:
            data = self._small[qo.weight][qo.part]
        want = self.current[tensor.name]
        got = data.numel() * data.element_size()
        if got != want.nbytes or data.dtype != torch_dtype(want.dtype):
            raise ExecutionError(f"internal error: {tensor.name} is {got} bytes of {data.dtype}, planned {want.nbytes} of {want.dtype}")
        self._parts_left[qo.weight] -= 1
        if self._parts_left[qo.weight] == 0:
            self._small.pop(qo.weight, None)
        return memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())

    def final_plan(self, plan: MergePlan) -> MergePlan:
        """`plan` with the shard layouts as written (exact double-quant JSON lengths)."""
        return replace(plan, shards=tuple(self.resolved.get(s.filename, s) for s in plan.shards))
