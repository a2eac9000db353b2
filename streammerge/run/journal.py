"""Resume state of an output folder: fingerprint, per-tensor journal, verification, lock, disk check.

An unfinished merge keeps its state in `OUT/.streammerge/`:

- `plan.json`         the plan the run executes (layout checked again on resume)
- `fingerprint.json`  what the output depends on: base shard sizes + header sha256s, adapter file
                      sha256s and weights, the options that change output bytes, the compute
                      device type, the streammerge version. Written last: its presence means the
                      state is valid.
- `journal.jsonl`     one line per finished tensor (shard, name, byte range, sha256 of the shard's
                      bytes up to its end: the writer's running digest, so it costs nothing), one
                      per committed shard (size, sha256), one per shard whose layout was resolved at
                      run time (4-bit double-quant statistics' lengths) and one per shard pushed to
                      the Hub and deleted (--low-disk --push-to-hub); fsynced every few seconds /
                      records and at every shard commit. A torn last line (kill, full disk) is ignored.
- `lock`              the pid of the merge holding the folder (the lock itself is a `flock` on OUT).

Nothing in the journal is trusted blindly: on resume every journaled tensor is read back and the
digest of the shard up to its end compared, so a record that reached the disk before its data did
is simply redone (and the reread restores the shard's running sha256 for the rest of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..version import __version__
from ..errors import Interrupted, OutputError
from ..formats.folder import RECORD_FILE, atomic_write_json
from ..formats.safetensors import fsync_dir, release_cache
from ..options import MergeOptions
from ..planning.types import MergePlan, OutputShard
from ..planning.build import resize_shard
from .containers import header_bytes

STATE_DIR = ".streammerge"
PLAN_FILE = "plan.json"
FINGERPRINT_FILE = "fingerprint.json"
JOURNAL_FILE = "journal.jsonl"
PID_FILE = "lock"

SYNC_EVERY_RECORDS = 4096  # a kill loses at most this many records (or 2 s) of work; 256 cost 0.6 s of fsyncs per 100k tensors
SYNC_EVERY_SECONDS = 2.0
_READ_BLOCK = 16 << 20

# Options that change a single output byte. --max-memory and --max-chunk-rows do not (chunking is
# bit-exact), so a merge killed for lack of memory may be resumed with a smaller budget.
_OUTPUT_OPTIONS = ("method", "dtype", "max_shard_size", "extra")


def state_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# ------------------------------------------------------------------------------------ fingerprint


def _header_digest(f) -> str:
    """sha256 of a base shard's parsed header (tensor entries, metadata): the same for a local file
    and for a Hub shard planned from a ranged read, so a Hub merge resumes before any download."""
    entries = [[t.name, t.dtype, list(t.shape), t.start, t.end] for t in f.tensors.values()]
    canon = json.dumps([f.data_start, dict(f.metadata or {}), entries], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def fingerprint(checkpoint, adapters: Sequence, options: MergeOptions, device_type: str) -> dict[str, Any]:
    """What the output bytes depend on, cheap to compute: base headers (not data), adapter files."""
    base_files = [
        {"name": Path(f.path).name, "size": f.size, "header_sha256": _header_digest(f)} for f in checkpoint.files
    ]
    opts = options.to_dict()
    return {
        "streammerge_version": __version__,
        "base": {"path": str(checkpoint.root), "files": base_files},
        "adapters": [{"path": str(a.path), "weight": a.weight, "files": a.file_digests()} for a in adapters],
        "options": {k: opts[k] for k in _OUTPUT_OPTIONS},
        "device": device_type,
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human descriptions of what differs between two fingerprints (paths alone never differ)."""
    out: list[str] = []
    if old.get("partitions") != new.get("partitions"):
        out.append(f"partitions {old.get('partitions') or 'none'} -> {new.get('partitions') or 'none'}")
    if old.get("streammerge_version") != new.get("streammerge_version"):
        out.append(f"streammerge version {old.get('streammerge_version')} -> {new.get('streammerge_version')}")
    old_files = {f["name"]: f for f in old.get("base", {}).get("files", [])}
    new_files = {f["name"]: f for f in new.get("base", {}).get("files", [])}
    for name in sorted(set(old_files) | set(new_files)):
        a, b = old_files.get(name), new_files.get(name)
        if a is None:
            out.append(f"base file {name} is new")
        elif b is None:
            out.append(f"base file {name} is gone")
        elif a != b:
            out.append(f"base file {name} changed (size or header)")
    old_ad, new_ad = old.get("adapters", []), new.get("adapters", [])
    if len(old_ad) != len(new_ad):
        out.append(f"{len(old_ad)} adapter(s) before, {len(new_ad)} now")
    for i, (a, b) in enumerate(zip(old_ad, new_ad), 1):
        label = f"adapter {i} ({b.get('path')})"
        if a.get("weight") != b.get("weight"):
            out.append(f"{label} weight {a.get('weight'):g} -> {b.get('weight'):g}")
        for fname in sorted(set(a.get("files", {})) | set(b.get("files", {}))):
            if a.get("files", {}).get(fname) != b.get("files", {}).get(fname):
                out.append(f"{label} file {fname} differs")
    for key in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
        a, b = old.get("options", {}).get(key), new.get("options", {}).get(key)
        if a != b:
            out.append(f"--{key.replace('_', '-')} {_show(a)} -> {_show(b)}")
    if old.get("device") != new.get("device"):
        out.append(f"device {old.get('device')} -> {new.get('device')}")
    return out


def _show(value: Any) -> str:
    return "(default)" if value is None else str(value)


def layout(plan: MergePlan) -> list[Any]:
    """The part of a plan that fixes output bytes' positions; compared on resume as a safety net."""
    return [
        [s.filename, s.size, s.header_size, [[t.name, t.dtype, list(t.shape), t.op, t.start, t.end] for t in s.tensors]]
        for s in plan.shards
    ]


# ------------------------------------------------------------------------------------- journal


class Journal:
    """Append-only JSON lines, fsynced at a bounded interval (records or seconds) and on demand."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any], *, sync: bool = False) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            self._unsynced += 1
            if sync or self._unsynced >= SYNC_EVERY_RECORDS or time.monotonic() - self._last_sync >= SYNC_EVERY_SECONDS:
                self._sync()

    def _sync(self) -> None:
        os.fsync(self._fd)
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Flush what is journaled; a full disk here must not hide the error that got us here."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                self._sync()
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1


def read_records(path: Path) -> list[dict[str, Any]]:
    """The journal's complete records; a torn or garbled line ends the journal (nothing after it is
    trusted), which is what a kill or a full disk in the middle of an append leaves behind."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n")[:-1]:  # the last element is "" or an unterminated line
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not isinstance(rec, dict) or rec.get("t") not in ("tensor", "shard", "layout", "pushed"):
            break
        records.append(rec)
    return records


def rewrite_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace the journal by the verified records only (atomic), so redone work never duplicates."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        for rec in records:
            fh.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# -------------------------------------------------------------------------------- verification


@dataclass
class ShardResume:
    """Where the executor continues a shard: `offset` bytes (header + `done` tensors) verified."""

    offset: int
    done: int
    sha256: Any  # hashlib object holding the sha256 of bytes [0, offset)


@dataclass
class FinishedShard:
    filename: str
    size: int
    sha256: str
    path: Path | None  # the final name, NAME.partial for a complete shard not yet renamed, None if pushed away


@dataclass
class ResumeState:
    finished: dict[str, FinishedShard] = field(default_factory=dict)
    partial: dict[str, ShardResume] = field(default_factory=dict)
    layouts: dict[str, OutputShard] = field(default_factory=dict)  # shards whose layout was resolved at run time
    records: list[dict[str, Any]] = field(default_factory=list)  # verified, in plan order
    stale: list[Path] = field(default_factory=list)  # NAME.partial left beside a verified final shard
    tensors_done: int = 0
    seconds: float = 0.0


def _verify_file(path: Path, shard: OutputShard, header: bytes, recs: dict[str, dict], cancel) -> tuple[int, int, Any, int]:
    """Read a shard file back: header, then each journaled tensor in file order, the digest of the
    file up to its end against the journal. Returns (verified offset, tensors verified, sha256 of
    the verified prefix, file size)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < len(header) or os.pread(fd, len(header), 0) != header:
            return 0, 0, None, size
        sha = hashlib.sha256(header)
        offset, done = len(header), 0
        buf = bytearray(_READ_BLOCK)
        for tensor in shard.tensors:
            rec = recs.get(tensor.name)
            if rec is None or rec.get("start") != tensor.start or rec.get("end") != tensor.end or tensor.end > size:
                break
            trial, pos = sha.copy(), offset  # from the previous tensor's end: a container's padding included
            while pos < tensor.end:
                if cancel is not None and cancel.is_set():
                    raise Interrupted("interrupted while checking the output of the interrupted run; re-run the same command to resume")
                view = memoryview(buf)[: min(len(buf), tensor.end - pos)]
                n = os.preadv(fd, [view], pos)
                if n <= 0:
                    break
                trial.update(view[:n])
                pos += n
            release_cache(fd, tensor.start, tensor.nbytes)
            if pos != tensor.end or trial.copy().hexdigest() != rec.get("prefix_sha256"):
                break
            sha, offset, done = trial, tensor.end, done + 1
        if done == len(shard.tensors) and offset < shard.size == size:  # the padding after the last tensor
            tail = os.pread(fd, shard.size - offset, offset)
            if tail == bytes(len(tail)) and len(tail) == shard.size - offset:
                sha.update(tail)
                offset = shard.size
        return offset, done, sha, size
    finally:
        os.close(fd)


def verify(out: Path, plan: MergePlan, records: list[dict[str, Any]], cancel=None) -> ResumeState:
    """Check the interrupted run's output against its journal; what verifies is kept, the rest redone."""
    started = time.perf_counter()
    by_shard: dict[str, dict[str, dict]] = {}
    commits: dict[str, dict] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    pushed: set[str] = set()
    for rec in records:
        if rec["t"] == "tensor":
            by_shard.setdefault(rec.get("shard"), {})[rec.get("name")] = rec  # a later record wins
        elif rec["t"] == "shard":
            commits[rec.get("shard")] = rec
        elif rec["t"] == "layout" and isinstance(rec.get("shapes"), dict):
            shapes[rec.get("shard")] = {k: tuple(v) for k, v in rec["shapes"].items()}
        elif rec["t"] == "pushed":
            pushed.add(rec.get("shard"))
    state = ResumeState()
    for planned in plan.shards:
        shard = planned
        if planned.filename in shapes:
            try:
                shard = resize_shard(planned, shapes[planned.filename])
            except (TypeError, ValueError, KeyError):
                continue
        recs = by_shard.get(shard.filename, {})
        if not recs:
            continue
        if shard is not planned:
            state.layouts[shard.filename] = shard  # dropped again below unless something of it is kept
            state.records.append({"t": "layout", "shard": shard.filename,
                                  "shapes": {k: list(v) for k, v in shapes[shard.filename].items()}})
        kept = len(state.records)
        final = Path(out) / shard.filename
        commit = commits.get(shard.filename)
        if (shard.filename in pushed and commit is not None and all(t.name in recs for t in shard.tensors)
                and not final.exists() and not partial_path(final).exists()):
            # uploaded to the Hub and deleted (--low-disk --push-to-hub): the Hub holds it
            state.finished[shard.filename] = FinishedShard(shard.filename, shard.size, commit.get("sha256"), None)
            _keep(state, shard, recs, len(shard.tensors), commit, pushed=True)
            continue
        header = header_bytes(shard)
        for path in (final, partial_path(final)):
            if not path.is_file():
                continue
            offset, done, sha, size = _verify_file(path, shard, header, recs, cancel)
            if done == len(shard.tensors) and offset == shard.size == size:
                digest = sha.hexdigest()
                if commit is not None and commit.get("sha256") != digest:
                    continue  # the tensors' digests agree but the whole file's does not: trust neither
                state.finished[shard.filename] = FinishedShard(shard.filename, shard.size, digest, path)
                if path == final and partial_path(final).exists():
                    state.stale.append(partial_path(final))  # it must never be renamed over the good one
                _keep(state, shard, recs, done, {"t": "shard", "shard": shard.filename, "size": shard.size, "sha256": digest})
            elif done and path != final:
                state.partial[shard.filename] = ShardResume(offset, done, sha)
                _keep(state, shard, recs, done, None)
            else:
                continue
            break
        if shard is not planned and len(state.records) == kept:  # nothing of this shard verified
            state.layouts.pop(shard.filename)
            state.records.pop()
    state.seconds = time.perf_counter() - started
    return state


def _keep(state: ResumeState, shard: OutputShard, recs: dict[str, dict], done: int, commit: dict | None,
          pushed: bool = False) -> None:
    """Count a shard's verified tensors and keep their records (and its commit) for the new journal."""
    state.tensors_done += done
    state.records.extend(recs[t.name] for t in shard.tensors[:done])
    if commit is not None:
        state.records.append(commit)
    if pushed:
        state.records.append({"t": "pushed", "shard": shard.filename})


# ------------------------------------------------------------------------------------- the run


class Run:
    """The state folder of one merge: a fresh one, or an interrupted one reopened after verification.

    Nothing is written until `begin()` (called once the disk check passed), so a refused run leaves
    the folder as it found it.
    """

    def __init__(self, out: Path, plan: MergePlan, fp: dict[str, Any], resume: ResumeState, *, fresh: bool,
                 journal_name: str = JOURNAL_FILE):
        self.out = Path(out)
        self.plan = plan
        self.fp = fp
        self.resume = resume
        self.fresh = fresh
        self.journal_path = state_dir(out) / journal_name
        self.journal: Journal | None = None
        self.on_tensor = None  # called with each tensor's name once it is journaled (progress)
        self.tensors_done = resume.tensors_done
        self.committed: set[str] = set(resume.finished)
        self._planned = {sh.filename: sh for sh in plan.shards}

    @classmethod
    def start(cls, out: Path, plan: MergePlan, fp: dict[str, Any]) -> "Run":
        return cls(out, plan, fp, ResumeState(), fresh=True)

    @classmethod
    def reopen(cls, out: Path, plan: MergePlan, fp: dict[str, Any], cancel=None) -> "Run":
        """Resume an interrupted run with the same fingerprint; refuse (saying what differs) otherwise."""
        folder = state_dir(out)
        old = read_state_json(folder / FINGERPRINT_FILE)
        diff = differences(old, fp)
        if diff:
            raise OutputError(
                f"--out {out} holds an interrupted merge of different inputs or options ({'; '.join(diff)}); "
                "re-run with the original ones to resume it, or pass --overwrite to discard it and start over"
            )
        try:
            old_plan = MergePlan.from_dict(read_state_json(folder / PLAN_FILE))
        except (KeyError, TypeError, ValueError):
            old_plan = None
        if old_plan is None or layout(old_plan) != layout(plan):
            raise OutputError(
                f"--out {out} holds an interrupted merge whose plan differs from this one's; "
                "pass --overwrite to discard it and start over"
            )
        state = verify(out, plan, read_records(folder / JOURNAL_FILE), cancel)
        return cls(out, plan, fp, state, fresh=False)

    def begin(self) -> None:
        """Write the state: a fresh folder (fingerprint.json last, so that its presence means the
        state is valid), or the reopened one's journal cut down to what verified."""
        folder = state_dir(self.out)
        if self.fresh:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir()
            atomic_write_json(folder / PLAN_FILE, self.plan.to_dict(), compact=True)
            (folder / JOURNAL_FILE).touch()
            atomic_write_json(folder / FINGERPRINT_FILE, self.fp)
        else:
            rewrite_records(folder / JOURNAL_FILE, self.resume.records)
            for path in self.resume.stale:
                path.unlink(missing_ok=True)
            atomic_write_json(folder / PLAN_FILE, self.plan.to_dict(), compact=True)  # input paths may have moved
        self.journal = Journal(self.journal_path)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    # executor callbacks (writer thread)

    def shard_open(self, shard: OutputShard) -> None:
        """Journal a layout resolved at run time (double-quant statistics' lengths), once per shard."""
        planned = {t.name: t.shape for t in self._planned[shard.filename].tensors}
        shapes = {t.name: list(t.shape) for t in shard.tensors if t.shape != planned.get(t.name)}
        if shapes and shard.filename not in self.resume.layouts:
            self.journal.append({"t": "layout", "shard": shard.filename, "shapes": shapes}, sync=True)

    def shard_pushed(self, filename: str) -> None:
        """A shard is on the Hub and about to be deleted here (--low-disk --push-to-hub)."""
        self.journal.append({"t": "pushed", "shard": filename}, sync=True)

    def tensor_done(self, shard: OutputShard, tensor, prefix_sha256: str) -> None:
        self.journal.append({"t": "tensor", "shard": shard.filename, "name": tensor.name,
                             "start": tensor.start, "end": tensor.end, "prefix_sha256": prefix_sha256})
        self.tensors_done += 1
        if self.on_tensor is not None:
            self.on_tensor(tensor.name)

    def shard_done(self, filename: str, size: int, sha256: str) -> None:
        self.journal.append({"t": "shard", "shard": filename, "size": size, "sha256": sha256}, sync=True)
        self.committed.add(filename)

    def finish(self) -> None:
        """The merge is complete: the state goes, fingerprint first (then nothing is resumable)."""
        self.close()
        folder = state_dir(self.out)
        remove_state(folder)
        fsync_dir(self.out)


def remove_state(folder: Path) -> None:
    try:
        (folder / FINGERPRINT_FILE).unlink(missing_ok=True)
    except OSError:
        pass
    shutil.rmtree(folder, ignore_errors=True)


def read_state_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: unreadable resume state ({exc}); pass --overwrite to start over") from None


def has_valid_state(out: Path) -> bool:
    try:
        json.loads((state_dir(out) / FINGERPRINT_FILE).read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def read_record(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(out) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
