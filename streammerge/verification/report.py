"""What `streammerge verify` reports, and what it reads of OUT besides tensor data.

* The report: `Fault` (a stable `kind`, the tensor or file it names, a message for people and its
  figures in `data`), `TensorResult` per checked tensor, `VerifyReport` (table and JSON; `mode` says
  whether merged tensors were checked element by element or, with `--fast`, by the probe test).
* The inputs `streammerge.json` records against the ones given (`record_faults`), and the notes
  after a pass (`pass_notes`). OUT's files themselves are read by `folders` (one face per container).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..adapters.load import Adapter
from ..formats.checkpoint import Checkpoint
from ..formats.folder import RECORD_FILE
from ..formats.safetensors import TORCH_NAME
from ..options import format_size
from ..planning.types import MergePlan

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
    "quant": "quantized weights (quantization step)",
    "quant_stats": "quantization statistics (checked with their weights)",
    "encoded": "encoded tensors (codec's step)",
    "checksum": "shard checksums (streammerge.json)",
    "record": "recorded inputs (streammerge.json)",
}
GGUF_CHECK_LABELS = {  # every GGUF tensor is encoded: its row says merged or not
    "files": "GGUF files present (split set)",
    "metadata": "metadata keys (per file)",
    "structure": "tensors present (names, types, shapes)",
    "copy": "unmerged tensors (encoded base)",
    "merge": "merged tensors (encoded merge)",
    "checksum": "file checksums (streammerge.json)",
    "record": "recorded inputs (streammerge.json)",
}


BASIC_CHECKS = ("structure", "copy", "cast", "merge", "checksum", "record")  # always listed in the table
TABLES = {"safetensors": (CHECK_LABELS, BASIC_CHECKS), "gguf": (GGUF_CHECK_LABELS, tuple(GGUF_CHECK_LABELS))}
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
    container: str = "safetensors"  # which files OUT holds ("gguf": --method gguf)

    @property
    def ok(self) -> bool:
        return not self.faults

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "container": self.container,
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
        labels, basic = TABLES[self.container]
        if self.container == "safetensors":
            labels = {**labels, "merge": MODES.get(self.mode, labels["merge"])}
        width = max(len(v) for v in labels.values())
        lines.append(f"  {'check':<{width}}  {'checked':>7}  {'failed':>6}")
        for kind, label in labels.items():
            row = self.checks.get(kind)
            if row is None and kind not in basic:
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
                         for t in plan.tensors if t.source is not None and t.source.file not in adapter_files}.items())
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


def _files_text(files: list[tuple[Any, Any]]) -> str:
    shown = ", ".join(f"{n} ({s} bytes)" for n, s in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _base_float_dtype(checkpoint: Checkpoint) -> str | None:
    dtypes = {ref.info.dtype for ref in checkpoint.tensors.values() if ref.info.dtype in FLOAT_DTYPES}
    return TORCH_NAME[dtypes.pop()] if len(dtypes) == 1 else None



def pass_notes(tolerated: list[str], results: list[TensorResult], rounding: str) -> list[str]:
    """The notes added after the pass: tensors that passed within tolerance without
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
