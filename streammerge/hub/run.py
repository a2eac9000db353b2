"""The Hub side of one merge: base shards fetched while merging, disk accounting, and the push.

`api.merge` asks this object for the executor's `inputs` (None for a local base) and
`on_shard_done` hook (set only when finished shards are pushed and deleted as they complete),
checks disk space with it, and hands it the finished record to push.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import ExecutionError, OutputError
from ..formats.checkpoint import Checkpoint
from .fetch import DiskEstimate, Prefetcher, estimate_disk
from .checkpoint import HubCheckpoint, download_shard, evict
from .client import ShardUploader, cache_dir, model_card, prepare_push, push_folder
from ..formats.safetensors import read_header
from ..planning.types import MergePlan


def disk_estimate(checkpoint: Checkpoint, plan: MergePlan, *, low_disk: bool, streaming_push: bool = False,
                  done: frozenset[str] = frozenset()) -> DiskEstimate:
    """Peak disk of a merge under the prefetch policy (of the tensors not `done` by an interrupted
    run); a local base downloads nothing."""
    todo = [(i, t) for i, s in enumerate(plan.shards) for t in s.tensors if t.name not in done and t.source is not None]
    files = [t.source.file for _, t in todo]
    shard_of = [i for i, _ in todo]
    sizes = {str(f.path): f.size for f in checkpoint.files}
    sizes.update({f: 0 for f in files if f not in sizes})  # adapter files (replaced tensors) are local
    downloaded = set(sizes) - set(checkpoint.cached) if isinstance(checkpoint, HubCheckpoint) else set()
    shard_sizes = [0 if all(t.name in done for t in s.tensors) else s.size for s in plan.shards]  # on disk already
    return estimate_disk(files, shard_of, shard_sizes, sizes, downloaded,
                         low_disk=low_disk, streaming_push=streaming_push)


def input_files(checkpoint: HubCheckpoint, *, low_disk: bool) -> Prefetcher:
    """A Prefetcher that downloads `checkpoint`'s shards and checks each against its planned header."""
    planned = {str(f.path): f for f in checkpoint.files}

    def fetch(path: Path) -> None:
        download_shard(checkpoint.source, path)
        got, want = read_header(path), planned[str(path)]
        if got.data_start != want.data_start or dict(got.tensors) != dict(want.tensors):
            raise ExecutionError(f"{path.name} of {checkpoint.source} is not the file that was planned; run the command again")

    return Prefetcher(fetch, evict, low_disk=low_disk)


class HubRun:
    def __init__(self, checkpoint: Checkpoint, plan: MergePlan, out: Path, *, low_disk: bool = False,
                 push_to_hub: str | None = None, private: bool | None = None, revision: str | None = None,
                 quiet: bool = True, done: frozenset[str] = frozenset(), on_uploaded=None):
        """`done`: tensors an interrupted run already wrote (a resumed run neither reads nor
        downloads their inputs); `on_uploaded(filename)` runs once a streamed shard is on the Hub."""
        self.checkpoint = checkpoint
        self.plan = plan
        self.out = out
        self.low_disk = low_disk
        self.repo_id = push_to_hub
        self.private = private
        self.revision = revision
        self.quiet = quiet
        remote = isinstance(checkpoint, HubCheckpoint) and checkpoint.download_bytes > 0
        self.streaming = bool(push_to_hub and low_disk)
        self.estimate = disk_estimate(checkpoint, plan, low_disk=low_disk, streaming_push=self.streaming, done=done)
        self.inputs: Prefetcher | None = input_files(checkpoint, low_disk=low_disk) if remote else None
        self._uploader = ShardUploader(out, push_to_hub, revision=revision, on_uploaded=on_uploaded) if self.streaming else None
        self.upload_shard = self._uploader  # (filename, path) -> None, set when shards are pushed as they finish

    def check_disk_space(self) -> None:
        """Output and downloads against free space, per filesystem (they may be the same one)."""
        est = self.estimate
        out_peak = est.peak_output
        if est.downloads:
            cache = cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            if os.stat(cache).st_dev == os.stat(self.out).st_dev:
                out_peak = est.peak
            else:
                free = shutil.disk_usage(cache).free
                if free < est.peak_input:
                    raise OutputError(
                        f"not enough disk space in the Hugging Face cache {cache}: downloading the base needs "
                        f"{est.peak_input / 1e9:.2f} GB at once, {free / 1e9:.2f} GB free; free space"
                        + ("" if self.low_disk else ", or pass --low-disk to keep only two input shards")
                    )
        free = shutil.disk_usage(self.out).free
        if free < out_peak:
            hint = "" if self.low_disk or not est.downloads else "; --low-disk keeps only two input shards on disk"
            raise OutputError(
                f"not enough disk space in {self.out}: the merge writes {out_peak / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB free; free space or choose another --out{hint}"
            )

    def prepare_push(self) -> None:
        if self.repo_id:
            prepare_push(self.repo_id, private=self.private, revision=self.revision)

    def shards_done(self) -> None:
        if self._uploader is not None:
            self._uploader.wait()

    def record(self) -> dict[str, Any]:
        """Extra streammerge.json fields: how inputs were fetched and where the output went (never a token)."""
        extra: dict[str, Any] = {}
        if self.inputs is not None:
            extra["downloads"] = {
                "fetched": [Path(f).name for f in self.inputs.fetched],
                "evicted": [Path(f).name for f in self.inputs.evicted],
                "low_disk": self.low_disk,
            }
        if self.repo_id:
            extra["push"] = {
                "repo_id": self.repo_id, "revision": self.revision or "main",
                "shards_removed_locally": self.streaming,
            }
        return extra

    def push(self, record: dict[str, Any]) -> str | None:
        """Write the model card and upload what is in OUT (in streaming mode: everything but the shards)."""
        if not self.repo_id:
            return None
        from ..formats.folder import atomic_write_text

        card = model_card(record, self.repo_id)
        counts = record.get("tensors", {})
        if record.get("method") == "gguf":  # a GGUF repo: llama.cpp's library, the type in the message
            card = card.replace("library_name: transformers", "library_name: gguf", 1)
            what, merged = f"gguf {record['gguf']['type']}", record.get("merged_tensors", 0)
        else:
            what, merged = record.get("method"), counts.get("merge", 0)
        atomic_write_text(self.out / "README.md", card)
        message = f"streammerge: {what} of {self.plan.base} ({merged} tensors merged)"
        return push_folder(self.out, self.repo_id, revision=self.revision, message=message)
