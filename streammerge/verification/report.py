"""What `streammerge verify` reports, and what it reads of OUT besides tensor data.

* The report: `Fault` (a stable `kind`, the tensor or file it names, a message for people and its
  figures in `data`), `TensorResult` per checked tensor, `VerifyReport` (table and JSON; `mode` says
  whether merged tensors were checked element by element or, with `--fast`, by the probe test).
* OUT's folder: its shards and index, validated (`open_output`: anything unreadable or inconsistent
  is a fault, not an error), `streammerge.json` (`load_record`) and the inputs it records against
  the ones given (`record_faults`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..adapters.load import Adapter
from ..errors import InputError
from ..formats.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, read_json, safe_member
from ..formats.folder import RECORD_FILE
from ..formats.safetensors import TORCH_NAME, SafetensorsFile, TensorInfo, read_header
from ..options import format_size
from ..planning.types import MergePlan, OutputTensor

FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


# ------------------------------------------------------------------------------------ the report


@dataclass
class Fault:
    """One thing wrong with OUT: `kind` is stable (for machines), `message` says it for people."""

    kind: str
    subject: str  # a tensor name, a shard file name, or "record"
    message: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TensorResult:
    name: str
    op: str
    ok: bool
    margin: float | None = None  # element-wise: max |stored − expected| / bound; probes: sqrt(residual / bound); <= 1 passes
    resolvable: bool = True  # False: the delta is below the output's rounding


CHECK_LABELS = {
    "structure": "tensors present (names, shapes, dtypes)",
    "copy": "copied tensors (bytes)",
    "cast": "cast tensors (bytes of the cast)",
    "merge": "merged tensors (element-wise)",
    "recompute": "merged tensors (recomputed: DoRA, MoE)",
    "bias_add": "biases with lora_bias (recomputed)",
    "token_rows": "trainable-token rows (recomputed)",
    "replace": "replaced tensors (adapter's bytes)",
    "dequant": "dequantized 4/8-bit weights",
    "quant": "4-bit weights (quantization step)",
    "quant_stats": "4-bit statistics (code books, quant state)",
    "encoded": "encoded tensors (codec's step)",
    "checksum": "shard checksums (streammerge.json)",
    "record": "recorded inputs (streammerge.json)",
}


BASIC_CHECKS = ("structure", "copy", "cast", "merge", "checksum", "record")  # always listed in the table
MODES = {"element-wise": "merged tensors (element-wise)", "fast": "merged tensors (probe test)"}


@dataclass
class VerifyReport:
    out: str
    base: str
    adapters: list[str]
    checks: dict[str, dict[str, int]]  # kind -> {"checked": n, "failed": m}
    faults: list[Fault]
    tensors: list[TensorResult]
    notes: list[str]
    probes: int
    seed: int
    seconds: float = 0.0
    mode: str = "element-wise"  # "fast": plain LoRA merges checked by the probe test only (--fast)
    bytes_read: int = 0
    peak_rss_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.faults

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "out": self.out,
            "base": self.base,
            "adapters": self.adapters,
            "checks": self.checks,
            "faults": [asdict(f) for f in self.faults],
            "tensors": [asdict(t) for t in self.tensors],
            "notes": self.notes,
            "probes": self.probes,
            "seed": self.seed,
            "seconds": round(self.seconds, 3),
            "bytes_read": self.bytes_read,
            "peak_rss_bytes": self.peak_rss_bytes,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table_lines(self) -> list[str]:
        lines = [f"verify {self.out}", f"  base:    {self.base}", *[f"  adapter: {a}" for a in self.adapters], ""]
        labels = {**CHECK_LABELS, "merge": MODES.get(self.mode, CHECK_LABELS["merge"])}
        width = max(len(v) for v in labels.values())
        lines.append(f"  {'check':<{width}}  {'checked':>7}  {'failed':>6}")
        for kind, label in labels.items():
            row = self.checks.get(kind)
            if row is None and kind not in BASIC_CHECKS:
                continue
            if row is None:
                lines.append(f"  {label:<{width}}  {'-':>7}  {'-':>6}  (not applicable)")
            else:
                verdict = "ok" if row["failed"] == 0 else "FAIL"
                lines.append(f"  {label:<{width}}  {row['checked']:>7}  {row['failed']:>6}  {verdict}")
        for note in self.notes:
            lines.append(f"note: {note}")
        for fault in self.faults:
            lines.append(f"FAIL {fault.subject}: {fault.message}")
        summary = (
            f"{len(self.tensors)} tensors, {format_size(self.bytes_read)} read in {self.seconds:.1f} s, "
            f"peak RSS {format_size(self.peak_rss_bytes)}"
        )
        if self.ok:
            lines.append(f"verify passed: {summary}")
        else:
            failed_tensors = len({f.subject for f in self.faults})
            lines.append(f"verify FAILED: {len(self.faults)} fault(s) in {failed_tensors} item(s); {summary}")
        return lines


# -------------------------------------------------------------------------------------- OUT folder


@dataclass
class OutputFiles:
    files: list[SafetensorsFile]
    faults: list[Fault]
    notes: list[str]
    lost: dict[str, str] = field(default_factory=dict)  # tensor -> the missing or unreadable shard the index puts it in


def open_output(out: Path) -> OutputFiles:
    """OUT's safetensors files with validated headers; anything unreadable or inconsistent is a fault
    (the folder under test is evidence, not input we refuse)."""
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
    files: list[SafetensorsFile] = []
    where: dict[str, str] = {}
    lost: dict[str, str] = {}
    for fname in names:
        try:
            path = safe_member(out, fname, str(index_path))
            if not path.is_file():
                faults.append(Fault("shard missing", fname, f"{fname} is listed in {INDEX_FILE} but missing"))
                lost.update({t: f"{fname} is missing" for t, f in (weight_map or {}).items() if f == fname})
                continue
            header = read_header(path)
        except InputError as exc:
            faults.append(Fault("unreadable", fname, str(exc)))
            lost.update({t: f"{fname} is unreadable" for t, f in (weight_map or {}).items() if f == fname})
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


def load_record(out: Path) -> tuple[dict[str, Any] | None, Fault | None]:
    path = out / RECORD_FILE
    if not path.exists():
        return None, None
    try:
        record = read_json(path, RECORD_FILE)
        if not isinstance(record, dict) or not isinstance(record.get("shards"), list):
            raise InputError(f"{path}: not a streammerge record")
        return record, None
    except InputError as exc:
        return None, Fault("unreadable", RECORD_FILE, str(exc))


def record_faults(record: dict[str, Any], plan: MergePlan, checkpoint: Checkpoint, adapters: Sequence[Adapter]) -> tuple[list[Fault], list[str]]:
    """The inputs streammerge.json says were merged, against the ones given now."""
    faults: list[Fault] = []
    notes: list[str] = []
    recorded = record.get("adapters") or []
    if len(recorded) != len(adapters):
        faults.append(Fault("record mismatch", "record", f"{RECORD_FILE} records {len(recorded)} adapter(s), {len(adapters)} given"))
    for i, (rec, adapter) in enumerate(zip(recorded, adapters), 1):
        rec = rec if isinstance(rec, dict) else {}
        if rec.get("weight") != adapter.weight:
            faults.append(Fault("record mismatch", "record", f"adapter {i} ({adapter.path}) was merged with weight {rec.get('weight')!r}, {adapter.weight:g} given"))
        digests, recorded_digests = adapter.file_digests(), rec.get("files") or {}
        for fname, digest in digests.items():
            if recorded_digests.get(fname) != digest:
                faults.append(Fault(
                    "record mismatch", "record",
                    f"adapter {i} ({adapter.path}): {fname} differs from the one merged (sha256 "
                    f"{str(recorded_digests.get(fname))[:12]}… recorded, {digest[:12]}… given)",
                ))
    adapter_files = {str(a.weights_file) for a in adapters}
    base_files = sorted({Path(t.source.file).name: Path(t.source.file).stat().st_size
                         for t in plan.tensors if t.source.file not in adapter_files}.items())
    rec_base = record.get("base") if isinstance(record.get("base"), dict) else {}
    rec_files = sorted((f.get("name"), f.get("size")) for f in rec_base.get("files", []) if isinstance(f, dict))
    if rec_files != base_files:
        faults.append(Fault(
            "record mismatch", "record",
            f"base files differ from the ones merged: recorded {_files_text(rec_files)}, given {_files_text(base_files)}",
        ))
    options = record.get("options") if isinstance(record.get("options"), dict) else {}
    if options.get("method", "merged_16bit") != plan.options.method:
        faults.append(Fault("record mismatch", "record", f"merged with method {options.get('method')!r}, verifying {plan.options.method!r}"))
    base_dtype = _base_float_dtype(checkpoint)
    if (options.get("dtype") or base_dtype) != (plan.options.dtype or base_dtype):
        faults.append(Fault(
            "record mismatch", "record",
            f"merged with --dtype {options.get('dtype') or 'as base'}, verifying --dtype {plan.options.dtype or 'as base'}",
        ))
    if options.get("max_shard_size") not in (None, plan.options.max_shard_size):
        notes.append(
            f"merged with --max-shard-size {format_size(options['max_shard_size'])}, verifying with "
            f"{format_size(plan.options.max_shard_size)} (only the shard layout differs; tensors are checked by name)"
        )
    return faults, notes


def _shape_ok(tensor: OutputTensor, info: TensorInfo) -> bool:
    """OUT's header entry has the planned shape and dtype (a double-quant quant-state JSON: any length
    up to the planned bound, since its length depends on the data)."""
    if info.dtype != tensor.dtype:
        return False
    if tensor.quant_out is not None and not tensor.quant_out.exact_size:
        return len(info.shape) == 1 and 0 < info.shape[0] <= tensor.shape[0]
    return tuple(info.shape) == tuple(tensor.shape)


def _files_text(files: list[tuple[Any, Any]]) -> str:
    shown = ", ".join(f"{n} ({s} bytes)" for n, s in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _base_float_dtype(checkpoint: Checkpoint) -> str | None:
    dtypes = {ref.info.dtype for ref in checkpoint.tensors.values() if ref.info.dtype in FLOAT_DTYPES}
    return TORCH_NAME[dtypes.pop()] if len(dtypes) == 1 else None



def pass_notes(tolerated: list[str], results: list[TensorResult], rounding: str) -> list[str]:
    """The notes both verifiers add after their pass: tensors that passed within tolerance without
    being byte-identical, and merged tensors whose delta hides under `rounding`."""
    notes = []
    if tolerated:
        notes.append(
            f"{len(tolerated)} encoded tensor(s) are not byte-identical to their codec's encoding of the expected "
            f"values but within its rounding/quantization step (written by another tool?), e.g. {tolerated[0]}"
        )
    weak = [r.name for r in results if r.op == "merge" and not r.resolvable]
    if weak:
        notes.append(
            f"{len(weak)} merged tensor(s) have a delta below {rounding}, so applied and missing cannot be told "
            f"apart there unless the tensor is byte-exact (e.g. {weak[0]})"
        )
    return notes
