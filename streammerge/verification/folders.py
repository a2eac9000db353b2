"""OUT as `verify` reads it: one face per output container (safetensors shards here, GGUF files in
`gguf`), so that the one pass in `verifier` knows nothing of file formats.

A face opens OUT's files as evidence (anything unreadable or inconsistent is a fault, not an error
we raise), says which stored entries have the planned shape and type, which record key lists the
files, and what the report calls things. The pass itself (hashing, structure, checks, record) is
`verifier.Verifier`'s for every container.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError
from ..formats.checkpoint import INDEX_FILE, SINGLE_FILE, read_json, safe_member
from ..formats.folder import RECORD_FILE
from ..formats.safetensors import TensorInfo, read_header
from ..planning.types import MergePlan, OutputTensor
from .report import Fault


@dataclass
class StoredFile:
    """One file of OUT: its tensors' stored entries (absolute offsets), in data order."""

    path: Path
    size: int
    tensors: Mapping[str, TensorInfo]


@dataclass
class OutputFiles:
    files: list[Any]  # StoredFile-like: .path, .size, .tensors
    faults: list[Fault]
    notes: list[str]
    lost: dict[str, str] = field(default_factory=dict)  # tensor -> why its file is not there ("its shard X is missing")
    checks: dict[str, dict[str, int]] = field(default_factory=dict)  # rows the face counted itself (files, metadata)


class OutputFolder:
    """The safetensors face: OUT's index and shards (`model.safetensors` alone, or an index)."""

    container = "safetensors"
    noun = "shard"  # what the report calls one file
    record_key = "shards"  # streammerge.json's list of written files
    shape_word = "dtype"

    def __init__(self, out: Path, plan: MergePlan):
        self.out = out
        self.plan = plan

    def rounding(self) -> str:
        return "the output dtype's rounding"

    def category(self, tensor: OutputTensor, category: str) -> str:
        return category

    def open(self) -> OutputFiles:
        return open_output(self.out)

    def shape_ok(self, tensor: OutputTensor, info: TensorInfo) -> bool:
        """The stored entry has the planned shape and dtype (a double-quant quant-state JSON: any length
        up to the planned bound, since its length depends on the data; an encoding: its planned size too)."""
        if info.dtype != tensor.dtype:
            return False
        if tensor.quant_out is not None and not tensor.quant_out.exact_size:
            return len(info.shape) == 1 and 0 < info.shape[0] <= tensor.shape[0]
        if tensor.encoding is not None and info.nbytes != tensor.end - tensor.start:
            return False
        return tuple(info.shape) == tuple(tensor.shape)

    def record_faults(self, record: dict[str, Any]) -> list[Fault]:
        """Faults of the record a container adds to the common ones (`report.record_faults`)."""
        return []

    def load_record(self) -> tuple[dict[str, Any] | None, Fault | None]:
        path = self.out / RECORD_FILE
        if not path.exists():
            return None, None
        try:
            record = read_json(path, RECORD_FILE)
            if not isinstance(record, dict) or not isinstance(record.get(self.record_key), list):
                raise InputError(self.bad_record(path))
            return record, None
        except InputError as exc:
            return None, Fault("unreadable", RECORD_FILE, str(exc))

    def bad_record(self, path: Path) -> str:
        return f"{path}: not a streammerge record"


def open_output(out: Path) -> OutputFiles:
    """OUT's safetensors files with validated headers."""
    faults: list[Fault] = []
    notes: list[str] = []
    index_path = out / INDEX_FILE
    if index_path.exists():
        try:
            index = read_json(index_path, "index file")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise InputError(f"{index_path}: missing or malformed 'weight_map'")
        except InputError as exc:
            return OutputFiles([], [Fault("unreadable", INDEX_FILE, str(exc))], notes)
        names = sorted(set(weight_map.values()))
    elif (out / SINGLE_FILE).exists():
        weight_map, names = None, [SINGLE_FILE]
    else:
        return OutputFiles([], [Fault("unreadable", str(out), f"no {SINGLE_FILE} or {INDEX_FILE} in {out}")], notes)
    files: list[Any] = []
    where: dict[str, str] = {}
    lost: dict[str, str] = {}
    for fname in names:
        try:
            path = safe_member(out, fname, str(index_path))
            if not path.is_file():
                faults.append(Fault("shard missing", fname, f"{fname} is listed in {INDEX_FILE} but missing"))
                lost.update({t: f"its shard {fname} is missing" for t, f in (weight_map or {}).items() if f == fname})
                continue
            header = read_header(path)
        except InputError as exc:
            faults.append(Fault("unreadable", fname, str(exc)))
            lost.update({t: f"its shard {fname} is unreadable" for t, f in (weight_map or {}).items() if f == fname})
            continue
        for name in header.tensors:
            if name in where:
                faults.append(Fault("index", name, f"tensor stored in both {where[name]} and {fname}"))
            elif weight_map is not None and weight_map.get(name) != fname:
                faults.append(Fault("index", name, f"{fname} holds it but {INDEX_FILE} says {weight_map.get(name)!r}"))
            where[name] = fname
        files.append(header)
    stray = sorted(p.name for p in out.glob("*.safetensors") if p.name not in names)
    if stray:
        notes.append(f"files not part of the checkpoint (not checked): {', '.join(stray[:5])}")
    return OutputFiles(files, faults, notes, lost)
