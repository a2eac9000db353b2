"""What a merge returns: the folder, the plan it wrote, time, memory, shards, where it was pushed."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..planning.types import MergePlan


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    seconds: float
    peak_rss_bytes: int
    shards: list[dict[str, Any]]
    pushed: str | None = None  # commit URL when --push-to-hub was given
    gguf: Any = None  # the GGUFPlan, for --method gguf
    resumed_tensors: int = 0  # tensors kept (verified) from an interrupted run in OUT
    already_complete: bool = False  # OUT already held this exact merge; nothing was written
    partition: str | None = None  # "I/N" when only that partition was written
    partitions_left: tuple[str, ...] = ()  # partitions of OUT with shards not yet committed, after this one
    tasks: tuple[dict[str, Any], ...] = ()  # --ray: each partition's task (host, pid, seconds, resumed tensors)

    def partition_line(self) -> str:
        if self.already_complete:
            return f"already complete: {self.out} holds this merge, finalized"
        mine = f"partition {self.partition}: {len(self.shards)} shard(s) written to {self.out} in {self.seconds:.1f} s"
        if self.partitions_left:
            return f"{mine}; still to run: {', '.join(self.partitions_left)}, then `streammerge finalize {self.out}`"
        return f"{mine}; every partition is done: run `streammerge finalize {self.out}`"

    def resumed_line(self) -> str:
        return f"resumed: {self.resumed_tensors}/{len(self.plan.tensors)} tensors already done"



def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
