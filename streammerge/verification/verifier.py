"""`streammerge verify`: prove that a folder is what base + adapters make, in bounded memory.

The expected output is planned exactly as `merge` plans it (`build_plan`), then OUT is checked
against it in one streaming pass over its shards (row chunks read with `pread`, never a memory map):

* Structure: every planned tensor present once with the planned shape and dtype; nothing extra.
* Copied tensors: byte equality with the base. Cast tensors: byte equality with the base chunk
  cast by torch (round to nearest even), i.e. what any torch-based tool writes.
* Merged tensors, element by element (the default): the expected rows are recomputed in float32,
  tile by tile, and every stored element must lie within the rounding bound that any correct tool
  meets (output rounding, the delta or the factors rounded to the output dtype, float32
  accumulation in any order): plain linear LoRA in `verify_linear`, DoRA / MoE / lora_bias /
  trainable tokens / 4-bit bases and merged_4bit outputs in `verify_checks`. A fault names the
  tensor, counts the elements out of bound and locates the worst one; a failing tensor is read
  once more for its diagnosis ("delta missing", "scale off by 2.0×", "delta transposed", ...).
* `fast=True` (`verify --fast`): plain linear LoRA merges are checked by the probe test of
  `verify_probe` instead (random projections, a bound on each whole row: quicker, but a few wrong
  elements of a row can hide under it).
* With `streammerge.json` (written by `merge`): every recorded shard's sha256 (hashed during the same
  pass) and the recorded inputs (adapter file digests and weights, base file names and sizes,
  method and dtype) against the ones given. A different --max-shard-size is reported as a note.

Memory: one host buffer holds the out rows, the base rows and a cast scratch for a chunk; add the
float32 recompute tiles and their temporaries (the float64 probe tiles with `fast`), the largest
tensor's LoRA factors and 1/16 of the budget kept for small temporaries. The sum is `--max-memory`
(`verify_layout`; it refuses a budget below one row).

Extending: each plan op has a `TensorCheck` (`verify_checks.check_class`). A new codec or LoRA variant
adds its op (or term kind) and a check that states its own tolerance (for 4-bit: the quantization step
instead of the output rounding) — the pass, record and report (`verify_report`) stay as they are.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..console import terminal
from ..adapters.load import Adapter
from ..errors import InputError, PlanError
from ..formats import codecs
from ..formats.checkpoint import Checkpoint, safe_member
from ..formats.folder import RECORD_FILE
from ..formats.safetensors import ITEMSIZE, SafetensorsFile, TensorInfo
from ..options import format_size
from ..planning.types import MergePlan, OutputTensor
from .base import PROBES, TEMPORARIES_SHARE, TILE_ELEMENTS, TILES, Chunk, Context, TensorCheck, TimedRun, _rows_and_width
from .checks import (
    RTILE_BYTES,
    BytesCheck,
    CastCheck,
    RecomputeCheck,
    ReplaceCheck,
    alignment,
    base_row_bytes,
    decoded_row_bytes,
    out_row_bytes,
    state_bytes,
)
from .encoded import EncodedCheck
from .linear import LinearElementCheck
from .probe import PROBED_KINDS, LinearLoraCheck
from .quant import QuantPartCheck, QuantWeightCheck
from .report import Fault, TensorResult, VerifyReport, _shape_ok, load_record, open_output, pass_notes, record_faults

# ----------------------------------------------------------------------------------- memory layout


@dataclass(frozen=True)
class VerifyLayout:
    """How `--max-memory` is spent: one chunk buffer (out rows + base rows + cast scratch), the
    float64 work tiles, and the largest merged tensor's factors and probes."""

    chunk_bytes: int
    tile_elements: int
    fixed_bytes: int
    rtile_elements: int = 0  # float32 tiles of the recompute checks

    @property
    def total(self) -> int:
        return self.chunk_bytes + self.fixed_bytes


def _row_cost(tensor: OutputTensor) -> int:
    """Chunk-buffer bytes per row: OUT's row, the base's row, a cast scratch, decoded float32 rows."""
    if tensor.quant_out is not None and tensor.quant_out.part != "weight":
        return 1  # statistic tensors are streamed as bytes
    out_b = out_row_bytes(tensor)
    return 2 * out_b + base_row_bytes(tensor) + decoded_row_bytes(tensor)


def _merge_fixed_bytes(tensor: OutputTensor, probes: int) -> int:
    width = _rows_and_width(tensor.shape)[1]
    total = width * probes * 8  # the probes
    for term in tensor.loras:
        for src in (term.a, term.b):
            total += math.prod(src.shape) * (ITEMSIZE[src.dtype] + 3 * 8)  # raw, float64, |float64|
    from ..planning.streaming import state_bytes

    return total + state_bytes(tensor)


def verify_layout(plan: MergePlan, probes: int, fast: bool = False) -> VerifyLayout:

    classes = {t.name: check_class(t, fast) for t in plan.tensors}
    merges = [t for t in plan.tensors if classes[t.name] is LinearLoraCheck]
    recomputes = [t for t in plan.tensors if classes[t.name] is not None and issubclass(classes[t.name], (RecomputeCheck, EncodedCheck))]
    budget = plan.options.max_memory
    tile = rtile = 0
    if merges:  # at least one row; at most ~1/16 of the budget in all tiles
        tile = max([min(TILE_ELEMENTS, budget // (16 * TILES * 8))] + [_rows_and_width(t.shape)[1] for t in merges])
    if recomputes:  # float32 tiles and their temporaries: ~1/16 of the budget, at least one aligned group of rows
        rtile = max([min(TILE_ELEMENTS, budget // (16 * RTILE_BYTES))]
                    + [alignment(t) * _rows_and_width(t.weight_shape)[1] for t in recomputes])
    fixed = TILES * tile * 8 + RTILE_BYTES * rtile
    fixed += max([_merge_fixed_bytes(t, probes) for t in merges] + [state_bytes(t) for t in recomputes] + [0])
    fixed += budget // TEMPORARIES_SHARE  # small per-tile results (probe products, row norms, sums)
    widest = max((alignment(t) * _row_cost(t) for t in plan.tensors), default=1)
    largest = max((_rows_and_width(t.weight_shape)[0] * _row_cost(t) for t in plan.tensors), default=1)
    chunk = budget - fixed
    if chunk < widest:
        need = fixed + widest
        raise PlanError(
            f"--max-memory {format_size(plan.options.max_memory)} is too small to verify: one row of the widest "
            f"tensor with its base row needs {format_size(widest)} besides {format_size(fixed)} of work space; "
            f"use at least --max-memory {math.ceil(need / 1e6)}MB"
        )
    return VerifyLayout(min(chunk, max(largest, 1)), tile, fixed, rtile)


def unverifiable(plan: MergePlan) -> dict[str, list[str]]:
    """Operations, LoRA term kinds and codecs this verifier has no check for, with the tensors using
    them: refusing them beats a check that cannot fail. (`verify_checks.check_class` picks the checks.)"""
    out: dict[str, list[str]] = {}
    for t in plan.tensors:
        if check_class(t) is not None:
            continue
        kinds = [term.kind for term in t.loras if term.kind not in KNOWN_KINDS]
        if t.quant_in is not None and t.quant_in.codec not in ("bnb4", "int8"):
            kinds.append(f"{t.quant_in.codec} base")
        if t.encoding is not None and not kinds:
            kinds.append(f"{t.encoding} encoding")
        for kind in kinds or [t.op]:
            out.setdefault(kind, []).append(t.name)
    return out



def check_class(t: OutputTensor, fast: bool = False) -> type[TensorCheck] | None:
    """The check for one planned tensor (None: this verifier cannot check it). Plain linear LoRA merges
    are checked element by element (`LinearElementCheck`), or by the probe test with `fast`."""
    if t.quant_in is not None and t.quant_in.codec not in ("bnb4", "int8"):
        return None
    if any(term.kind not in KNOWN_KINDS for term in t.loras):
        return None
    if t.encoding is not None:
        return EncodedCheck if codecs.find(t.encoding) is not None else None
    if t.op == "quant":
        if t.quant_out is None:
            return None
        return QuantWeightCheck if t.quant_out.part == "weight" else QuantPartCheck
    if t.op == "merge":
        probed = all(term.kind in PROBED_KINDS for term in t.loras) and t.loras
        if probed:
            return LinearLoraCheck if fast else LinearElementCheck
        return RecomputeCheck
    if t.op in ("bias_add", "token_rows", "dequant"):
        return RecomputeCheck
    return {"copy": BytesCheck, "cast": CastCheck, "replace": ReplaceCheck}.get(t.op)


KNOWN_KINDS = ("lora", "embedding", "dora", "moe", "bias", "token_rows")


class Verifier(TimedRun):
    """One streaming pass over OUT's shards: hash (when a record exists) and check every tensor."""

    def __init__(
        self,
        plan: MergePlan,
        out: Path,
        checkpoint: Checkpoint,
        adapters: Sequence[Adapter],
        *,
        device: torch.device,
        probes: int = PROBES,
        seed: int = 0,
        check_record: bool = True,
        progress: bool = False,
        fast: bool = False,
    ):
        if probes < 1:
            raise PlanError("probes must be at least 1")
        self.plan = plan
        self.out = Path(out)
        self.checkpoint = checkpoint
        self.adapters = adapters
        self.device = device
        self.probes = probes
        self.seed = seed
        self.check_record = check_record
        self.progress = progress
        self.fast = fast
        self.layout = verify_layout(plan, probes, fast)
        self._fds: dict[str, int] = {}
        self._bar = None
        self.bytes_read = 0

    def _run(self) -> VerifyReport:
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # the bounds assume IEEE float32 GEMMs (no TF32 / bf16 passes)
        try:
            return self._verify()
        finally:
            torch.set_float32_matmul_precision(prev)

    def _verify(self) -> VerifyReport:
        self.faults: list[Fault] = []
        self.notes: list[str] = []
        self.tolerated: list[str] = []
        self.checks = {k: {"checked": 0, "failed": 0} for k in ("structure", "copy", "cast", "merge")}
        output = open_output(self.out)
        self.faults += output.faults
        self.notes += output.notes
        record = self._load_record()
        wanted_sha = {s["filename"]: str(s.get("sha256")) for s in (record or {}).get("shards", [])
                      if isinstance(s, dict) and isinstance(s.get("filename"), str)}
        found = {}
        for f in output.files:
            for name, info in f.tensors.items():
                found.setdefault(name, (f, info))
        checkable = self._check_structure(found, output.lost)

        buffer = bytearray(self.layout.chunk_bytes)
        results, hashes = self._stream(output.files, found, checkable, wanted_sha, buffer)
        if record is not None:
            self._check_checksums(output.files, wanted_sha, hashes, buffer)
        del buffer  # the record check reads adapter files; keep the peak at the budget
        if record is not None:
            rec_faults, rec_notes = record_faults(record, self.plan, self.checkpoint, self.adapters)
            self.checks["record"] = {"checked": 1, "failed": int(bool(rec_faults))}
            self.faults += rec_faults
            self.notes += rec_notes

        self.notes += pass_notes(self.tolerated, results, "the output dtype's rounding")
        return VerifyReport(
            out=str(self.out), base=self.plan.base, adapters=[a.label for a in self.adapters], checks=self.checks,
            faults=self.faults, tensors=results, notes=self.notes, probes=self.probes if self.fast else 0,
            seed=self.seed, mode="fast" if self.fast else "element-wise",
        )

    def _load_record(self) -> dict[str, Any] | None:
        if not self.check_record:
            return None
        record, fault = load_record(self.out)
        if fault is not None:
            self.faults.append(fault)
        elif record is None:
            self.notes.append(f"no {RECORD_FILE} in the folder: shard checksums and recorded inputs were not checked")
        return record

    def _check_structure(self, found: dict[str, tuple[SafetensorsFile, TensorInfo]], lost: dict[str, str]) -> set[str]:
        """Missing, unexpected and misshapen tensors; returns the names whose values can be checked."""
        row = self.checks["structure"]
        checkable: set[str] = set()
        for name, tensor in ((t.name, t) for t in self.plan.tensors):
            row["checked"] += 1
            info = found[name][1] if name in found else None
            if info is None:
                why = f"its shard {lost[name]}" if name in lost else "planned but not in the folder"
                self.faults.append(Fault("missing tensor", name, f"missing tensor: {why}"))
            elif not _shape_ok(tensor, info):
                self.faults.append(Fault(
                    "shape/dtype differs", name,
                    f"shape/dtype differs: {list(info.shape)} {info.dtype}, expected {list(tensor.shape)} {tensor.dtype}",
                ))
            else:
                checkable.add(name)
                continue
            row["failed"] += 1
        expected = {t.name for t in self.plan.tensors}
        for name in found:
            if name not in expected:
                row["checked"] += 1
                row["failed"] += 1
                self.faults.append(Fault("unexpected tensor", name, "unexpected tensor: in the folder but not made by base + adapters"))
        return checkable

    def _stream(self, files: list[SafetensorsFile], found, checkable: set[str], wanted_sha: dict[str, str],
                buffer: bytearray) -> tuple[list[TensorResult], dict[str, str]]:
        """The one pass over OUT, shard by shard in file order: hash what the record lists, check
        every tensor whose structure is right."""
        expected = {t.name: t for t in self.plan.tensors}
        out_tensors = {name: (str(found[name][0].path), found[name][1]) for name in checkable}
        ctx = Context(self.device, self.probes, self.seed, self.layout.tile_elements, self._read,
                      self.layout.rtile_elements, out_tensors)
        self._bar = self._progress_bar(files)
        results: list[TensorResult] = []
        hashes: dict[str, str] = {}
        for f in files:
            hasher = hashlib.sha256() if f.path.name in wanted_sha else None
            if hasher is not None:
                self._hash_range(str(f.path), 0, f.data_start, buffer, hasher)
            for name, info in f.tensors.items():  # in file order
                if name not in checkable or found[name][0] is not f:
                    if hasher is not None:
                        self._hash_range(str(f.path), info.start, info.end, buffer, hasher)
                    continue
                tensor = expected[name]
                category, result, faults = self._check_tensor(tensor, info, f, ctx, buffer, hasher)
                results.append(result)
                row = self.checks.setdefault(category, {"checked": 0, "failed": 0})
                row["checked"] += 1
                if faults:
                    row["failed"] += 1
                    self.faults += faults
            if hasher is not None:
                hashes[f.path.name] = hasher.hexdigest()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return results, hashes

    def _check_checksums(self, files: list[SafetensorsFile], wanted_sha: dict[str, str], hashes: dict[str, str],
                         buffer: bytearray) -> None:
        row = self.checks["checksum"] = {"checked": 0, "failed": 0}
        for fname, sha in wanted_sha.items():
            row["checked"] += 1
            got = hashes[fname] if fname in hashes else self._hash_file(fname, buffer)
            if got is None:
                self.faults.append(Fault("shard missing", fname, f"{fname} is recorded in {RECORD_FILE} but missing"))
            elif got != sha:
                self.faults.append(Fault(
                    "checksum mismatch", fname,
                    f"sha256 {got[:16]}… differs from the {sha[:16]}… recorded when it was written; the file changed since",
                ))
            else:
                continue
            row["failed"] += 1
        for f in files:
            if f.path.name not in wanted_sha:
                row["checked"] += 1
                row["failed"] += 1
                self.faults.append(Fault("checksum mismatch", f.path.name, f"{f.path.name} is not one of the shards recorded in {RECORD_FILE}"))

    def _check_tensor(self, tensor: OutputTensor, info: TensorInfo, f: SafetensorsFile, ctx: Context, buffer: bytearray,
                      hasher) -> tuple[str, TensorResult, list[Fault]]:
        """Stream one tensor of OUT (and the base rows its check needs) through its check."""
        check = check_class(tensor, self.fast)(tensor, ctx)
        path = str(f.path)
        view = memoryview(buffer)
        if check.base is None:  # OUT's bytes only
            for pos in range(info.start, info.end, len(view)):
                n = min(len(view), info.end - pos)
                self._read(path, pos, view[:n], progress=True)
                if hasher is not None:
                    hasher.update(view[:n])
                check.feed(Chunk(pos - info.start, n, view[:n], view[:0], view[:0]))
            return self._finish(check)
        rows, align = check.rows, check.align
        step = max(align, self.layout.chunk_bytes // max(_row_cost(tensor), 1) // align * align)
        if self.plan.options.max_chunk_rows:
            step = min(step, max(align, self.plan.options.max_chunk_rows // align * align))
        src = tensor.source
        base = check.base
        stages = []
        if base.needs_stats:  # a double-quant round trip: the base's statistics first
            stages.append((lambda r0, r1, v: base.roundtrip.observe(base.rows(v, r0, r1, raw=True)), base.roundtrip.finish_stats))
        if check.needs_prepass:  # column-norm DoRA: every row of W + ΔW first
            stages.append((lambda r0, r1, v: check.prepass(r0, base.rows(v, r0, r1)), None))
        has_rows = rows > 0 and check.width > 0
        for stage, done in stages:
            for r0 in range(0, rows if has_rows else 0, step):
                r1 = min(rows, r0 + step)
                offset, length = base.span(r0, r1)
                self._read(src.file, offset, view[:length])
                stage(r0, r1, view[:length])
            if done is not None:
                done()
        first = True
        while True:  # one pass; a failing check may ask for one more (its diagnosis)
            for r0 in range(0, rows if has_rows else 0, step):
                r1 = min(rows, r0 + step)
                o_off, o_len = check.out_span(r0, r1)
                b_off, b_len = base.span(r0, r1)
                out_v = view[:o_len]
                base_v = view[o_len : o_len + b_len]
                scratch = view[o_len + b_len : o_len + b_len + o_len]
                self._read(path, info.start + o_off, out_v, progress=first)
                if hasher is not None and first:
                    hasher.update(out_v)
                if b_len:
                    self._read(src.file, b_off, base_v)
                check.feed(Chunk(r0, r1 - r0, out_v, base_v, scratch))
            if not check.again():
                return self._finish(check)
            first = False

    def _finish(self, check: TensorCheck) -> tuple[str, TensorResult, list[Fault]]:
        result, fault = check.finish()
        if check.tolerated:
            self.tolerated.append(check.tensor.name)
        faults = [] if fault is None else fault if isinstance(fault, list) else [fault]
        return check.category, result, faults

    def _hash_range(self, path: str, start: int, end: int, buffer: bytearray, hasher) -> None:
        view = memoryview(buffer)
        pos = start
        while pos < end:
            n = min(len(view), end - pos)
            self._read(path, pos, view[:n], progress=True)
            hasher.update(view[:n])
            pos += n

    def _hash_file(self, fname: str, buffer: bytearray) -> str | None:
        try:
            path = safe_member(self.out, fname, RECORD_FILE)
        except InputError:
            return None
        if not path.is_file():
            return None
        hasher = hashlib.sha256()
        self._hash_range(str(path), 0, path.stat().st_size, buffer, hasher)
        return hasher.hexdigest()

    def _progress_bar(self, files: list[SafetensorsFile]):
        if not self.progress:
            return None
        from tqdm import tqdm

        total = sum(f.size for f in files)
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="verifying", file=terminal(), dynamic_ncols=True)
