"""`verify --method gguf`: the GGUF face of the one verifier (`verifier.Verifier`).

The expected files are the GGUF plan's output (`plan_gguf(...).output`: each file a shard of the
"gguf" container, its header rendered by the writer, each tensor the merge plan's tensor renamed,
typed, transformed and placed as llama.cpp stores it). This face reads OUT's GGUF files for that
pass; the values, checksums and record are checked there as for safetensors shards, every tensor
through its type's codec (`encoded.EncodedCheck`):

* Files: every planned file present (split sets complete); unreadable or stray files named.
* Metadata: every key the writer writes, byte for byte (type and value), in each file; cosmetic
  `general.*` keys (name, size label, ...) that differ are notes, not faults.
* Structure: tensor infos as stored entries (GGUF name, type, shape in torch order, absolute data
  offsets); a name stored twice is a fault.

`GGUFReader` is used for the metadata and tensor infos only (its memory map is never touched for
tensor data: the pass reads with `pread`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from ..errors import OptionError
from ..formats.safetensors import TensorInfo
from ..options import MergeOptions
from ..planning.types import MergePlan, OutputShard, OutputTensor
from .encoded import permute_rows, unpermute_rows
from .folders import OutputFiles, OutputFolder, StoredFile
from .report import Fault

COSMETIC_KEYS = ("general.name", "general.basename", "general.size_label", "general.finetune", "general.version",
                 "general.quantized_by", "general.url", "general.description", "general.organization")
_TAG = re.compile(r"-(BF16|F16|Q8_0|Q4_0)(-\d{5}-of-\d{5})?\.gguf$")


def gguf_outputs(out: Path) -> list[str]:
    return sorted(p.name for p in Path(out).glob("*.gguf") if p.is_file())


def refuse_gguf_folder(out: Path, options: MergeOptions) -> None:
    """A verify line without --method gguf on a folder of GGUF files: say which options the merge
    line had (we do not guess: the --gguf-type and --max-shard-size decide what is expected)."""
    from ..formats.checkpoint import INDEX_FILE, SINGLE_FILE

    names = gguf_outputs(out)
    if options.method == "gguf" or not names or (out / SINGLE_FILE).exists() or (out / INDEX_FILE).exists():
        return
    tags = {m.group(1).lower() for n in names if (m := _TAG.search(n))}
    hint = f"--method gguf --gguf-type {tags.pop()}" if len(tags) == 1 else "--method gguf --gguf-type TYPE"
    raise OptionError(
        f"verify: {out} holds GGUF files ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''}), not "
        f"safetensors; verify with the merge line's options: {hint}"
    )


class GGUFFolder(OutputFolder):
    """OUT's GGUF files against the planned ones."""

    container = "gguf"
    noun = "file"
    record_key = "files"
    shape_word = "type"

    def __init__(self, out: Path, plan: MergePlan):
        from ..formats.gguf import require

        super().__init__(out, plan)
        self.gguf = require()
        self.checks: dict[str, dict[str, int]] = {}

    def rounding(self) -> str:
        return f"the {self.plan.options.gguf_type} rounding"

    def category(self, tensor: OutputTensor, category: str) -> str:
        return "merge" if tensor.loras else "copy"

    def bad_record(self, path: Path) -> str:
        return f"{path}: not the record of a --method gguf merge (no 'files' list)"

    def record_faults(self, record: dict[str, Any]) -> list[Fault]:
        rec_type = (record.get("gguf") or {}).get("type") if isinstance(record.get("gguf"), dict) else None
        want = self.plan.options.gguf_type
        if record.get("method") == "gguf" and rec_type != want:
            return [Fault("record mismatch", "record", f"merged with --gguf-type {rec_type}, verifying --gguf-type {want}")]
        return []

    def shape_ok(self, tensor: OutputTensor, info: TensorInfo) -> bool:
        return (info.dtype, tuple(info.shape), info.nbytes) == (tensor.dtype, tuple(tensor.shape), tensor.end - tensor.start)

    def _count(self, kind: str, failed: bool) -> None:
        row = self.checks.setdefault(kind, {"checked": 0, "failed": 0})
        row["checked"] += 1
        row["failed"] += int(failed)

    def open(self) -> OutputFiles:
        self.faults: list[Fault] = []
        self.notes: list[str] = []
        planned = {s.filename for s in self.plan.shards}
        present = set(gguf_outputs(self.out))
        stray = sorted(present - planned)
        files: list[StoredFile] = []
        lost: dict[str, str] = {}
        seen: dict[str, str] = {}
        for shard in self.plan.shards:
            reader = self._reader(shard, present, stray)
            if reader is None:
                lost.update({t.name: f"its file {shard.filename} is missing or unreadable" for t in shard.tensors})
                continue
            self._check_metadata(shard, reader)
            files.append(self._stored(shard, reader, seen))
            del reader
        if stray:
            self.notes.append(f"GGUF files not part of the planned output (not checked): {', '.join(stray[:5])}")
        return OutputFiles(files, self.faults, self.notes, lost, self.checks)

    def _reader(self, shard: OutputShard, present: set[str], stray: list[str]):
        if shard.filename not in present:
            hint = f"; OUT holds {', '.join(stray[:3])} instead (merged with other --gguf-type/--max-shard-size?)" if stray else ""
            self.faults.append(Fault("file missing", shard.filename, f"{shard.filename} is missing{hint}"))
            self._count("files", True)
            return None
        try:
            reader = self.gguf.GGUFReader(str(self.out / shard.filename))
        except Exception as exc:  # any parse error: the file is evidence, not input we refuse
            self.faults.append(Fault("unreadable", shard.filename, f"{shard.filename} is not a readable GGUF file: {exc}"))
            self._count("files", True)
            return None
        self._count("files", False)
        return reader

    def _stored(self, shard: OutputShard, reader, seen: dict[str, str]) -> StoredFile:
        """The file's tensor infos as stored entries; a name met before (here or in an earlier file) is a fault."""
        path = self.out / shard.filename
        tensors: dict[str, TensorInfo] = {}
        for rt in reader.tensors:
            if rt.name in seen:
                self.faults.append(Fault("duplicate tensor", rt.name, f"duplicate tensor: in {seen[rt.name]} and {shard.filename}"))
                self._count("structure", True)
                continue
            seen[rt.name] = shard.filename
            shape = tuple(int(d) for d in reversed(list(rt.shape)))
            start = int(rt.data_offset)
            tensors[rt.name] = TensorInfo(rt.name, rt.tensor_type.name, shape, start, start + int(rt.n_bytes))
        planned_dims = {t.name: len(t.shape) for t in shard.tensors}
        for name, info in tensors.items():  # GGUF may pad dims with 1
            shape = info.shape
            while len(shape) > planned_dims.get(name, len(shape)) and shape[0] == 1:
                shape = shape[1:]
            tensors[name] = TensorInfo(name, info.dtype, shape, info.start, info.end)
        ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)))
        return StoredFile(path, path.stat().st_size, ordered)

    def _check_metadata(self, shard: OutputShard, got) -> None:
        """The file's keys against the header the writer renders for it."""
        with tempfile.TemporaryDirectory(prefix="streammerge-verify-") as tmp:
            skeleton = Path(tmp) / shard.filename  # the planned header, data left sparse
            with open(skeleton, "wb") as fh:
                fh.write(shard.header)
                fh.truncate(shard.size)
            want = self.gguf.GGUFReader(str(skeleton))
            self._compare_fields(shard.filename, got, want)
            del want

    def _compare_fields(self, name: str, got, want) -> None:
        for key, wf in want.fields.items():
            if key.startswith("GGUF."):
                continue
            gf = got.fields.get(key)
            if gf is not None and _field_bytes(got, gf) == _field_bytes(want, wf):
                self._count("metadata", False)
                continue
            found = "missing" if gf is None else _show(gf)
            message = f"{name}: {key} is {found}, the writer writes {_show(wf)}"
            if key in COSMETIC_KEYS:
                self.notes.append(message)
                self._count("metadata", False)
            else:
                self.faults.append(Fault("metadata differs", key, f"metadata differs: {message}", {"file": name}))
                self._count("metadata", True)
        for key in got.fields:
            if key.startswith("GGUF.") or key in want.fields:
                continue
            if key.startswith("general."):
                self.notes.append(f"{name}: extra key {key} = {_show(got.fields[key])} (not checked)")
            else:
                self.faults.append(Fault("metadata differs", key, f"metadata differs: {name} has {key} = "
                                         f"{_show(got.fields[key])}, which the writer does not write", {"file": name}))
                self._count("metadata", True)


def _field_bytes(reader, f) -> bytes:
    """A metadata field exactly as stored: key, type and value bytes."""
    n = sum(int(p.nbytes) for p in f.parts)
    return reader.data[f.offset : f.offset + n].tobytes()


def _show(f) -> str:
    try:
        value = f.contents()
    except Exception:  # noqa: BLE001  (a malformed field is shown as such)
        return "<unreadable>"
    if isinstance(value, list):
        head = ", ".join(repr(v) for v in value[:3])
        return f"[{head}{', ...' if len(value) > 3 else ''}] ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["GGUFFolder", "refuse_gguf_folder", "gguf_outputs", "permute_rows", "unpermute_rows"]
