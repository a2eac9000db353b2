"""`streammerge verify`: prove that a folder is what base + adapters make, in bounded memory.

The expected output is planned exactly as `merge` plans it (`build_plan`; for `--method gguf` the
GGUF plan's output, its files as shards of the "gguf" container), then OUT is checked against it in
one streaming pass over its files (row chunks read with `pread`, never a memory map). What is
container-specific (opening OUT's files, GGUF metadata, what the report calls a file) is a face in
`folders` / `gguf`; everything else is this pass, for every container:

* Structure: every planned tensor present once with the planned shape and dtype (or GGUF type);
  nothing extra.
* Copied tensors: byte equality with the base. Cast tensors: byte equality with the base chunk
  cast by torch (round to nearest even), i.e. what any torch-based tool writes.
* Merged tensors, element by element (the default): the expected rows are recomputed in float32,
  tile by tile, and every stored element must lie within the rounding bound that any correct tool
  meets (output rounding, the delta or the factors rounded to the output dtype, float32
  accumulation in any order): plain linear LoRA in `linear`, DoRA / MoE / lora_bias / trainable
  tokens / 4-bit bases in `checks`, merged_4bit outputs in `quant`, every encoded tensor (GGUF
  types, registered codecs) through its codec in `encoded`. A fault names the tensor, counts the
  elements out of bound and locates the worst one; a failing tensor is read once more for its
  diagnosis ("delta missing", "scale off by 2.0×", "delta transposed", "not permuted", ...).
* `fast=True` (`verify --fast`): plain linear LoRA merges in safetensors shards are checked by the
  probe test of `probe` instead (random projections, a bound on each whole row: quicker, but a few
  wrong elements of a row can hide under it).
* With `streammerge.json` (written by `merge`): every recorded file's sha256 (hashed during the same
  pass, headers and padding included) and the recorded inputs (adapter file digests and weights,
  base file names and sizes, method and dtype or GGUF type) against the ones given. A different
  --max-shard-size is reported as a note.

Memory: one host buffer holds the out rows, the base rows and a cast scratch for a chunk; add the
float32 recompute tiles and their temporaries (the float64 probe tiles with `fast`), the largest
tensor's LoRA factors and 1/16 of the budget kept for small temporaries. The sum is `--max-memory`
(`verify_layout`; it refuses a budget below one row).

Extending: each planned tensor has a `TensorCheck` (`check_class`). A new codec is checked by
`EncodedCheck` through its own decode and tolerance; a new LoRA variant adds its term kind and a
check that states its tolerance; a new container adds a folder face. The pass, record and report
stay as they are.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..console import terminal
from ..adapters.load import Adapter
from ..errors import InputError, PlanError
from ..formats.checkpoint import Checkpoint, safe_member
from ..formats.folder import RECORD_FILE
from ..formats.safetensors import TensorInfo, pread_exact, release_cache
from ..planning.types import MergePlan, OutputTensor
from .base import PROBES, Chunk, Context, TensorCheck
from .dispatch import _row_cost, check_class, verify_layout
from .folders import OutputFolder
from .gguf import GGUFFolder
from .report import Fault, TensorResult, VerifyReport, pass_notes, record_faults

FOLDERS: dict[str, type[OutputFolder]] = {"safetensors": OutputFolder, "gguf": GGUFFolder}  # by OutputShard.container


class Verifier:
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
        container = plan.shards[0].container if plan.shards else "safetensors"
        self.folder = FOLDERS[container](self.out, plan)
        self._fds: dict[str, int] = {}
        self._bar = None
        self.bytes_read = 0

    def run(self) -> VerifyReport:
        """The pass with a fixed malloc threshold, its descriptors closed whatever happens, timed."""
        from ..run.pipeline import fix_malloc_threshold

        fix_malloc_threshold()
        started = time.perf_counter()
        try:
            report = self._run()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        report.seconds = time.perf_counter() - started
        report.bytes_read = self.bytes_read
        return report

    def _read(self, path: str, offset: int, view: memoryview, progress: bool = False) -> None:
        """Positioned reads through cached descriptors; page cache released behind them, bytes counted."""
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise InputError(f"cannot open {path}: {exc.strerror or exc}") from None
        pread_exact(fd, view, offset, path)
        release_cache(fd, offset, len(view))
        self.bytes_read += len(view)
        if progress and self._bar is not None:
            self._bar.update(len(view))

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
        rows = ("structure", "copy", "cast", "merge") if self.folder.container == "safetensors" else ("structure", "copy", "merge")
        self.checks = {k: {"checked": 0, "failed": 0} for k in rows}
        output = self.folder.open()
        self.faults += output.faults
        self.notes += output.notes
        record = self._load_record()
        for kind, row in output.checks.items():
            mine = self.checks.setdefault(kind, {"checked": 0, "failed": 0})
            mine["checked"] += row["checked"]
            mine["failed"] += row["failed"]
        wanted_sha = {s["filename"]: str(s.get("sha256")) for s in (record or {}).get(self.folder.record_key, [])
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
            rec_faults += self.folder.record_faults(record)
            self.checks["record"] = {"checked": 1, "failed": int(bool(rec_faults))}
            self.faults += rec_faults
            self.notes += rec_notes

        self.notes += pass_notes(self.tolerated, results, self.folder.rounding())
        return VerifyReport(
            out=str(self.out), base=self.plan.base, adapters=[a.label for a in self.adapters], checks=self.checks,
            faults=self.faults, tensors=results, notes=self.notes, probes=self.probes if self.fast else 0,
            seed=self.seed, mode="fast" if self.fast else "element-wise",
            container=self.folder.container,
        )

    def _load_record(self) -> dict[str, Any] | None:
        if not self.check_record:
            return None
        record, fault = self.folder.load_record()
        if fault is not None:
            self.faults.append(fault)
        elif record is None:
            self.notes.append(f"no {RECORD_FILE} in the folder: {self.folder.noun} checksums and recorded inputs were not checked")
        return record

    def _check_structure(self, found: dict[str, tuple[Any, TensorInfo]], lost: dict[str, str]) -> set[str]:
        """Missing, unexpected and misshapen tensors; returns the names whose values can be checked."""
        row = self.checks["structure"]
        checkable: set[str] = set()
        for name, tensor in ((t.name, t) for t in self.plan.tensors):
            row["checked"] += 1
            info = found[name][1] if name in found else None
            if info is None:
                why = lost.get(name, "planned but not in the folder")
                self.faults.append(Fault("missing tensor", name, f"missing tensor: {why}"))
            elif not self.folder.shape_ok(tensor, info):
                what = f"shape/{self.folder.shape_word} differs"
                self.faults.append(Fault(
                    what, name, f"{what}: {list(info.shape)} {info.dtype}, expected {list(tensor.shape)} {tensor.dtype}",
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

    def _stream(self, files: list, found, checkable: set[str], wanted_sha: dict[str, str],
                buffer: bytearray) -> tuple[list[TensorResult], dict[str, str]]:
        """The one pass over OUT, file by file, tensors in data order: check every tensor whose
        structure is right and hash every byte (headers and padding included) of the files the
        record lists. Overlapping entries (a corrupt file) are hashed in a pass of their own."""
        expected = {t.name: t for t in self.plan.tensors}
        out_tensors = {name: (str(found[name][0].path), found[name][1]) for name in checkable}
        config = self.checkpoint.config or {}
        heads = tuple(h for h in (config.get("num_attention_heads"), config.get("num_key_value_heads"))
                      if isinstance(h, int) and not isinstance(h, bool) and h > 0)
        ctx = Context(self.device, self.probes, self.seed, self.layout.tile_elements, self._read,
                      self.layout.rtile_elements, out_tensors, heads)
        self._bar = self._progress_bar(files)
        results: list[TensorResult] = []
        hashes: dict[str, str] = {}
        for f in files:
            path = str(f.path)
            hasher = hashlib.sha256() if f.path.name in wanted_sha else None
            entries = list(f.tensors.values())
            in_order = all(a.end <= b.start for a, b in zip(entries, entries[1:]))
            walk = hasher if in_order else None
            pos = 0
            for info in entries:
                if walk is not None:
                    self._hash_range(path, pos, info.start, buffer, walk)
                name = info.name
                if name in checkable and found[name][0] is f:
                    category, result, faults = self._check_tensor(expected[name], info, f, ctx, buffer, walk)
                    results.append(result)
                    row = self.checks.setdefault(category, {"checked": 0, "failed": 0})
                    row["checked"] += 1
                    if faults:
                        row["failed"] += 1
                        self.faults += faults
                elif walk is not None:
                    self._hash_range(path, info.start, info.end, buffer, walk)
                pos = max(pos, info.end)
            if hasher is not None:
                if in_order:
                    self._hash_range(path, pos, f.size, buffer, hasher)
                else:
                    self._hash_range(path, 0, f.size, buffer, hasher)
                hashes[f.path.name] = hasher.hexdigest()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return results, hashes

    def _check_checksums(self, files: list, wanted_sha: dict[str, str], hashes: dict[str, str],
                         buffer: bytearray) -> None:
        row = self.checks["checksum"] = {"checked": 0, "failed": 0}
        for fname, sha in wanted_sha.items():
            row["checked"] += 1
            got = hashes[fname] if fname in hashes else self._hash_file(fname, buffer)
            if got is None:
                noun = self.folder.noun
                self.faults.append(Fault(f"{noun} missing", fname, f"{fname} is recorded in {RECORD_FILE} but missing"))
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
                self.faults.append(Fault("checksum mismatch", f.path.name,
                                         f"{f.path.name} is not one of the {self.folder.noun}s recorded in {RECORD_FILE}"))

    def _check_tensor(self, tensor: OutputTensor, info: TensorInfo, f, ctx: Context, buffer: bytearray,
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
        return self.folder.category(check.tensor, check.category), result, faults

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

    def _progress_bar(self, files: list):
        if not self.progress:
            return None
        from tqdm import tqdm

        total = sum(f.size for f in files)
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="verifying", file=terminal(), dynamic_ncols=True)
