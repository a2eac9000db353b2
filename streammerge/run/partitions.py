"""Partitions of one plan: disjoint sets of output shards that separate processes write.

The plan fixes every shard's layout before a byte is computed, so shards are independent units of
work: partition I of N writes only its shards (journaled in its own journal, under its own lock)
and `finalize` writes the index and streammerge.json once every shard is committed. The assignment
is a pure function of the shards' sizes and N, so every process that plans the same merge computes
the same one, and it is recorded in the state folder beside the plan.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..errors import OptionError

# what `plan --partitions N` assumes to estimate a partition's time: about what one process merges
# per second on a CPU (bench/results), a figure to compare partitions by, not a promise
ESTIMATE_BYTES_PER_SECOND = 200 * 10**6


@dataclass(frozen=True)
class Partition:
    index: int  # 0 .. count-1: Kubernetes' $JOB_COMPLETION_INDEX, Slurm's $SLURM_ARRAY_TASK_ID
    count: int

    @classmethod
    def parse(cls, text: str) -> "Partition":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m:
            raise OptionError(f"--partition {text!r} is not I/N; give e.g. --partition 0/4 (I from 0 to N-1)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or index >= count:
            raise OptionError(f"--partition {text}: I must be in 0..N-1 and N at least 1, e.g. --partition 0/{max(count, 1)}")
        return cls(index, count)

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def stem(self) -> str:
        """The partition's file names in the state folder."""
        return f"partition-{self.index:05d}-of-{self.count:05d}"


def assign(sizes: Sequence[int], count: int) -> tuple[int, ...]:
    """The partition of each shard: largest shard first to the least loaded partition (the lowest
    index on ties), so partitions differ by at most one shard's size."""
    if count < 1:
        raise OptionError("the number of partitions must be at least 1")
    loads = [0] * count
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        p = min(range(count), key=lambda q: (loads[q], q))
        owner[i] = p
        loads[p] += sizes[i]
    return tuple(owner)


@dataclass(frozen=True)
class PartitionShare:
    """What one partition writes."""

    index: int
    count: int
    shards: tuple[str, ...]
    bytes: int
    tensors: int
    estimated_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shards": list(self.shards)}


def shares(plan, count: int) -> list[PartitionShare]:
    """Each partition's shards, bytes and estimated time (at ESTIMATE_BYTES_PER_SECOND)."""
    owner = assign([s.size for s in plan.shards], count)
    out = []
    for p in range(count):
        mine = [s for s, o in zip(plan.shards, owner) if o == p]
        size = sum(s.size for s in mine)
        out.append(PartitionShare(p, count, tuple(s.filename for s in mine), size, sum(len(s.tensors) for s in mine),
                                  round(size / ESTIMATE_BYTES_PER_SECOND, 1)))
    return out


def shards_of(plan, partition: Partition) -> frozenset[str]:
    owner = assign([s.size for s in plan.shards], partition.count)
    return frozenset(s.filename for s, o in zip(plan.shards, owner) if o == partition.index)


def table_lines(plan, count: int) -> list[str]:
    from ..options import format_size

    lines = [f"partitions: {count} (size-balanced; run each with --partition I/{count}, then `streammerge finalize OUT`)"]
    for share in shares(plan, count):
        names = ", ".join(share.shards) if len(share.shards) <= 3 else f"{share.shards[0]} ... {share.shards[-1]}"
        lines.append(f"  {share.index}/{count}: {len(share.shards)} shard(s), {format_size(share.bytes)}, {share.tensors} tensors, "
                     f"~{share.estimated_seconds:g} s at {ESTIMATE_BYTES_PER_SECOND // 10**6} MB/s" + (f"  [{names}]" if names else "  (nothing)"))
    return lines
