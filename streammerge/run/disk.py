"""Whether the rest of a merge fits on the disk of OUT: what is still to write, what is already held."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..options import format_size
from ..planning.types import MergePlan
from .journal import partial_path


@dataclass(frozen=True)
class DiskNeed:
    to_write: int  # bytes still to be written (shards not finished, less space already reserved)
    headroom: int  # the largest shard, kept free on top
    free: int
    where: Path

    @property
    def needed(self) -> int:
        return self.to_write + self.headroom

    @property
    def ok(self) -> bool:
        return self.free >= self.needed

    def line(self) -> str:
        verdict = "ok" if self.ok else "NOT ENOUGH"
        return (f"needs {format_size(self.needed)} ({format_size(self.to_write)} to write + "
                f"{format_size(self.headroom)} headroom for the largest shard), "
                f"free {format_size(self.free)} in {self.where} ({verdict})")


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _allocated(path: Path, cap: int) -> int:
    try:
        return min(os.stat(path).st_blocks * 512, cap)
    except OSError:
        return 0


def disk_need(plan: MergePlan, out: Path, *, finished: Iterable[str] = (), extra_bytes: int = 0,
              ours: bool = True, usage: Callable[[Path], Any] | None = None) -> DiskNeed:
    """Space the rest of the merge needs: unfinished shards (less what their files already hold
    on disk, when `ours`: they belong to this merge) plus `extra_bytes` (config, tokenizer), with
    the largest shard as headroom."""
    done = set(finished)
    to_write = extra_bytes
    for shard in plan.shards:
        if shard.filename in done:
            continue
        # A final-named file of an unfinished shard is replaced only at rename: its space is not reusable.
        held = _allocated(partial_path(Path(out) / shard.filename), shard.size) if ours else 0
        to_write += shard.size - held
    where = _existing_ancestor(Path(out))
    headroom = max((s.size for s in plan.shards), default=0)
    return DiskNeed(max(to_write, 0), headroom, (usage or shutil.disk_usage)(where).free, where)
