"""The state of a merge split in partitions, in OUT/.streammerge/ on storage every partition sees:

- `plan.json`, `fingerprint.json`  shared: written once, by whichever partition starts first
                                   (an exclusive link, so two starting together cannot both win),
                                   and compared by every other (inputs, options, N, device type);
- `partition-I-of-N.jsonl`         each partition's journal (tensors, shard commits), resumed as
                                   a whole merge's journal is;
- `partition-I-of-N.lock`          its lock (host and pid of the holder);
- `partitions.json`                which partition writes which shards (bytes, tensors), as
                                   `plan --partitions N` shows it;
- `record.json`                    streammerge.json without the checksums, from partition 0.

`finalize` checks that every shard of the plan is committed at its journaled size and header,
then renames, writes streammerge.json and the index in the order a whole merge does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..formats.folder import atomic_write_json
from ..planning.build import resize_shard
from ..planning.types import MergePlan
from .containers import header_bytes
from .journal import (
    FINGERPRINT_FILE,
    PLAN_FILE,
    Journal,
    ResumeState,
    Run,
    differences,
    layout,
    partial_path,
    read_records,
    read_state_json,
    remove_state,
    rewrite_records,
    state_dir,
    verify,
)
from .partitions import Partition, assign, shares

RECORD_TEMPLATE = "record.json"
ASSIGNMENT_FILE = "partitions.json"


def _link_once(path: Path, data: Any, *, compact: bool = False) -> bool:
    """Write `path` unless it exists (atomically, and only one of several racing writers wins)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    atomic_write_json(tmp, data, compact=compact)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _mismatch(out: Path, partition: Partition, diff: list[str]) -> OutputError:
    return OutputError(
        f"partition {partition.label}: --out {out} holds a merge of other inputs or options ({'; '.join(diff)}); "
        "every partition must run the same merge command (only --partition I differs), "
        "or pass --overwrite to a whole merge to discard it"
    )


def _check_shared(out: Path, plan: MergePlan, fp: dict[str, Any], partition: Partition) -> bool:
    """Compare with the shared state if there is one; True when there is."""
    folder = state_dir(out)
    if not (folder / FINGERPRINT_FILE).exists():
        return False
    diff = differences(read_state_json(folder / FINGERPRINT_FILE), fp)
    if diff:
        raise _mismatch(out, partition, diff)
    try:
        old = MergePlan.from_dict(read_state_json(folder / PLAN_FILE))
    except (KeyError, TypeError, ValueError):
        old = None
    if old is None or layout(old) != layout(plan):
        raise _mismatch(out, partition, ["the plan's shard layout differs"])
    return True


def begin_shared_state(out: Path, plan: MergePlan, fp: dict[str, Any]) -> None:
    """The shared plan and fingerprint: written by the first partition, checked by the others
    (two partitions can get here together: the loser of the link compares)."""
    folder = state_dir(out)
    folder.mkdir(exist_ok=True)
    _link_once(folder / PLAN_FILE, plan.to_dict(), compact=True)
    _link_once(folder / ASSIGNMENT_FILE, [s.to_dict() for s in shares(plan, fp["partitions"])])
    if not _link_once(folder / FINGERPRINT_FILE, fp):
        diff = differences(read_state_json(folder / FINGERPRINT_FILE), fp)
        if diff:
            raise OutputError(f"--out {out} was just started by a partition of another merge ({'; '.join(diff)})")


class PartitionRun(Run):
    """A partition's run: its own journal in the shared state folder, which outlives it (for the
    other partitions and `finalize`)."""

    def __init__(self, out: Path, plan: MergePlan, fp: dict[str, Any], resume: ResumeState, *, fresh: bool,
                 partition: Partition):
        super().__init__(out, plan, fp, resume, fresh=fresh, journal_name=partition.stem + ".jsonl")
        self.partition = partition

    def begin(self) -> None:
        begin_shared_state(self.out, self.plan, self.fp)
        if self.fresh:
            self.journal_path.unlink(missing_ok=True)
            self.journal_path.touch()
        else:
            rewrite_records(self.journal_path, self.resume.records)
            for path in self.resume.stale:
                path.unlink(missing_ok=True)
        self.journal = Journal(self.journal_path)

    def finish(self) -> None:
        self.close()


def open_partition(out: Path, plan: MergePlan, fp: dict[str, Any], partition: Partition, cancel=None) -> Run:
    """This partition's run: resumed from its journal when the shared state exists, else fresh
    (the folder then holds nothing but the state folder)."""
    from .journal import STATE_DIR

    folder = state_dir(out)
    if _check_shared(out, plan, fp, partition):
        records = read_records(folder / (partition.stem + ".jsonl"))
        return PartitionRun(out, plan, fp, verify(out, plan, records, cancel), fresh=False, partition=partition)
    others = {p.name for p in out.iterdir()} - {STATE_DIR}
    if others:
        raise OutputError(f"--out {out} already holds files; choose an empty folder (or, for a whole merge, pass --overwrite)")
    return PartitionRun(out, plan, fp, ResumeState(), fresh=True, partition=partition)


def write_record_template(out: Path, record: dict[str, Any]) -> None:
    atomic_write_json(state_dir(out) / RECORD_TEMPLATE, record)


# ------------------------------------------------------------------------------------ finalize


def committed(out: Path, plan: MergePlan, count: int) -> tuple[dict[str, dict], dict[str, dict[str, tuple]]]:
    """Every partition's shard commits and resolved layouts (shard -> record / shapes)."""
    commits: dict[str, dict] = {}
    shapes: dict[str, dict[str, tuple]] = {}
    for p in range(count):
        for rec in read_records(state_dir(out) / (Partition(p, count).stem + ".jsonl")):
            if rec["t"] == "shard":
                commits[rec.get("shard")] = rec
            elif rec["t"] == "layout" and isinstance(rec.get("shapes"), dict):
                shapes[rec.get("shard")] = {k: tuple(v) for k, v in rec["shapes"].items()}
    return commits, shapes


def unfinished(plan: MergePlan, count: int, commits: dict[str, dict]) -> list[str]:
    """Labels of the partitions with a shard not yet committed."""
    owner = assign([s.size for s in plan.shards], count)
    return [f"{p}/{count}" for p in range(count)
            if any(o == p and s.filename not in commits for s, o in zip(plan.shards, owner))]


def read_state(out: Path) -> tuple[dict[str, Any], MergePlan, int]:
    folder = state_dir(out)
    if not (folder / FINGERPRINT_FILE).is_file():
        raise OutputError(f"finalize: --out {out} holds no merge split in partitions (no {folder / FINGERPRINT_FILE}); "
                          "run `streammerge merge ... --partition I/N` for every I first")
    fp = read_state_json(folder / FINGERPRINT_FILE)
    count = fp.get("partitions")
    if not isinstance(count, int):
        raise OutputError(f"finalize: --out {out} holds an interrupted whole merge, not partitions; re-run its merge command to resume it")
    try:
        plan = MergePlan.from_dict(read_state_json(folder / PLAN_FILE))
    except (KeyError, TypeError, ValueError) as exc:
        raise OutputError(f"finalize: {folder / PLAN_FILE} is unreadable ({exc}); re-run the partitions") from None
    return fp, plan, count


def finalize_state(out: Path) -> tuple[MergePlan, dict[str, Any]]:
    """Check every shard and return (the plan as written, streammerge.json); raises if anything is
    missing, naming the partitions to run."""
    fp, plan, count = read_state(out)
    commits, shapes = committed(out, plan, count)
    todo = unfinished(plan, count, commits)
    if todo:
        done = sum(1 for s in plan.shards if s.filename in commits)
        raise OutputError(
            f"finalize: partition(s) {', '.join(todo)} of --out {out} are not finished ({done} of {len(plan.shards)} "
            f"shards committed); run them with --partition I/{count} (a killed one resumes), then finalize again"
        )
    shards = []
    for planned in plan.shards:
        shard = resize_shard(planned, shapes[planned.filename]) if planned.filename in shapes else planned
        rec = commits[shard.filename]
        final = out / shard.filename
        path = final if final.is_file() else partial_path(final)
        header = header_bytes(shard)
        bad = None
        if not path.is_file():
            bad = "is missing"
        elif path.stat().st_size != rec.get("size") or rec.get("size") != shard.size:
            bad = f"has {path.stat().st_size} bytes, its journal {rec.get('size')}"
        else:
            with open(path, "rb") as fh:
                if fh.read(len(header)) != header:
                    bad = "has another header than its plan"
        if bad:
            owner = assign([s.size for s in plan.shards], count)[plan.shards.index(planned)]
            raise OutputError(f"finalize: {shard.filename} {bad}; re-run partition {owner}/{count} to redo it, then finalize again")
        shards.append(shard)
    template = state_dir(out) / RECORD_TEMPLATE
    if not template.is_file():
        raise OutputError(f"finalize: partition 0/{count} left no {template}; re-run it, then finalize again")
    record = read_state_json(template)
    final_plan = dataclasses.replace(plan, shards=tuple(shards))
    entries = [{"filename": s.filename, "size": s.size, "sha256": commits[s.filename].get("sha256")} for s in shards]
    record["files" if "files" in record else "shards"] = entries
    if "total_size" in record:
        record["total_size"] = final_plan.total_size
    record["partitions"] = count
    record["fingerprint"] = fp
    return final_plan, record


def finish(out: Path) -> None:
    remove_state(state_dir(out))


def progress_bytes(out: Path, count: int, offsets: dict[int, tuple[int, int]], totals: dict[int, int]) -> int:
    """Tensor bytes the partitions' journals hold so far, reading only what was appended since the
    last call (`offsets`: inode and offset, `totals` per partition): the progress of partitions
    running elsewhere. A journal rewritten by a resuming partition is read again from its start."""
    for p in range(count):
        path = state_dir(out) / (Partition(p, count).stem + ".jsonl")
        try:
            with open(path, "rb") as fh:
                ino = os.fstat(fh.fileno()).st_ino
                if offsets.get(p, (ino, 0))[0] != ino:
                    offsets[p], totals[p] = (ino, 0), 0
                start = offsets.get(p, (ino, 0))[1]
                fh.seek(start)
                data = fh.read()
        except OSError:
            continue
        end = data.rfind(b"\n") + 1
        offsets[p] = (ino, start + end)
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("t") == "tensor":
                totals[p] = totals.get(p, 0) + int(rec.get("end", 0)) - int(rec.get("start", 0))
    return sum(totals.values())
