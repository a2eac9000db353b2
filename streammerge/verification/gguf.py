"""`streammerge verify` for `--method gguf` outputs: OUT's GGUF files against what `merge --method gguf` writes.

The expected GGUF is planned exactly as the merge plans it (`plan_gguf`): file names, split keys,
metadata, tensor names, types and shapes, and per tensor the rule that made it (q/k rows permuted
per head, Gemma norms + 1, embedding rows trimmed). OUT is then checked in one streaming pass:

* Files: every planned file present (split sets complete); unreadable or stray files named.
* Metadata: every key the writer writes, byte for byte (type and value), in each file; cosmetic
  `general.*` keys (name, size label, ...) that differ are notes, not faults.
* Structure: every planned tensor present once with the planned GGUF name, type and shape; nothing extra.
* Values, in row chunks (whole heads for permuted tensors): the expected float32 rows are computed
  from the base with the merge's own math (`terms.TensorMath`), shifted and permuted by the
  verifier's own implementation of llama.cpp's rules, and judged by `encoded.EncodedEvidence`
  with the tensor type's codec (its encoding, decoding and tolerance; the same evidence checks a
  codec's tensors in safetensors shards). Tolerated tensors (not byte-identical, within the step)
  pass with a note; failures are diagnosed there ("not permuted", "norm +1 missing", "delta
  missing", "scale off by k×", ...).
* With `streammerge.json`: each recorded file's sha256 (hashed during the same pass) and the
  recorded inputs, method and --gguf-type.

A bitsandbytes base weight's rows are decoded by `quant.stream.Decoder` (bitsandbytes' own
dequantization, the writer's and merged_16bit's W), in chunks that start on whole 4-bit block rows.

Memory: one chunk of stored bytes, base rows and a few float32 row buffers, sized from `--max-memory`
like the writer's chunks (plus a bitsandbytes weight's decoded statistics); files are read with
`pread` and their page cache released. `GGUFReader` is used for the metadata and tensor infos only
(its memory map is never touched for tensor data).
"""

from __future__ import annotations

import hashlib
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..console import terminal
from .. import ops
from ..errors import InputError, OptionError, UnsupportedError
from ..formats.folder import RECORD_FILE
from ..formats.safetensors import ITEMSIZE, TORCH_NAME
from ..options import MergeOptions
from ..formats import codecs
from .encoded import EncodedEvidence, EncodedSpec, other_head_counts, permute_rows, unpermute_rows
from .report import pass_notes
from .base import Fault, TensorResult, TimedRun, VerifyReport
from ..planning import streaming as qs
from ..planning.gguf import QUANT_GROUP_ROWS, QUANT_ROW_COST, QUANT_TEMPORARIES, GGUFFile, GGUFPlan, GGUFTensor, fit_rows

F32_BUFFERS = 8  # float32 row buffers per chunk: expected, base, delta, stored, tolerance, hypotheses, temps
HASH_PIECE = 1 << 20
COSMETIC_KEYS = ("general.name", "general.basename", "general.size_label", "general.finetune", "general.version",
                 "general.quantized_by", "general.url", "general.description", "general.organization")
_TAG = re.compile(r"-(BF16|F16|Q8_0|Q4_0)(-\d{5}-of-\d{5})?\.gguf$")


# ------------------------------------------------------------------------------------ dispatch


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


def verify_gguf(base, adapters, out: Path, options: MergeOptions, *, check_record: bool = True,
                progress: bool = False) -> VerifyReport:
    """Plan the GGUF `merge --method gguf` would write and check OUT against it."""
    from ..run.pipeline import resolve_device
    from ..run.gguf_merge import plan_gguf

    checkpoint, loaded, merge_plan, gplan = plan_gguf(base, adapters, options)
    from ..planning.streaming import needs_prepass

    prepass = [t.name for t in merge_plan.tensors if needs_prepass(t)]
    if prepass:
        raise UnsupportedError(
            f"verify cannot check GGUF tensors with column-norm DoRA yet ({len(prepass)} tensors, e.g. {prepass[0]}); "
            "nothing was checked"
        )
    verifier = GGUFVerifier(gplan, Path(out), checkpoint, loaded, device=resolve_device(options.device),
                            check_record=check_record, progress=progress)
    return verifier.run()


# ------------------------------------------------------------------------------------ the report


GGUF_CHECK_LABELS = {
    "files": "GGUF files present (split set)",
    "metadata": "metadata keys (per file)",
    "structure": "tensors present (names, types, shapes)",
    "copy": "unmerged tensors (encoded base)",
    "merge": "merged tensors (encoded merge)",
    "checksum": "file checksums (streammerge.json)",
    "record": "recorded inputs (streammerge.json)",
}


class GGUFVerifyReport(VerifyReport):
    """VerifyReport (same fields, JSON and verdict) with the GGUF check rows in its table."""

    def table_lines(self) -> list[str]:
        lines = super().table_lines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("check "))
        end = start + 1
        while end < len(lines) and lines[end].startswith("  "):
            end += 1
        width = max(len(v) for v in GGUF_CHECK_LABELS.values())
        rows = [f"  {'check':<{width}}  {'checked':>7}  {'failed':>6}"]
        for kind, label in GGUF_CHECK_LABELS.items():
            row = self.checks.get(kind)
            if row is None:
                rows.append(f"  {label:<{width}}  {'-':>7}  {'-':>6}  (not applicable)")
            else:
                verdict = "ok" if row["failed"] == 0 else "FAIL"
                rows.append(f"  {label:<{width}}  {row['checked']:>7}  {row['failed']:>6}  {verdict}")
        return lines[:start] + rows + lines[end:]


# ------------------------------------------------------------------------------------ the pass


@dataclass
class FoundFile:
    planned: GGUFFile
    path: Path
    reader: Any  # gguf.GGUFReader


class GGUFVerifier(TimedRun):
    """One streaming pass over OUT's GGUF files against a GGUF plan."""

    def __init__(self, plan: GGUFPlan, out: Path, checkpoint, adapters: Sequence, *, device: torch.device,
                 check_record: bool = True, progress: bool = False):
        from ..formats.gguf import require

        self.gguf = require()
        self.plan = plan
        self.out = Path(out)
        self.checkpoint = checkpoint
        self.adapters = adapters
        self.device = device
        self.check_record = check_record
        self.progress = progress
        self.options = plan.merge_plan.options
        self.faults: list[Fault] = []
        self.notes: list[str] = []
        self.checks: dict[str, dict[str, int]] = {}
        self.bytes_read = 0
        self._fds: dict[str, int] = {}
        self._bar = None

    # -- I/O

    def _read_source(self, src) -> torch.Tensor:
        buf = bytearray(src.end - src.start)
        if buf:
            self._read(src.file, src.start, memoryview(buf))
        return torch.frombuffer(buf, dtype=getattr(torch, TORCH_NAME[src.dtype])).reshape(src.shape) if buf else torch.empty(src.shape)

    def _check(self, kind: str, failed: bool) -> None:
        row = self.checks.setdefault(kind, {"checked": 0, "failed": 0})
        row["checked"] += 1
        row["failed"] += int(failed)

    # -- run

    def _run(self) -> VerifyReport:
        record = self._load_record()
        found_files = self._open_files()
        self._check_metadata(found_files)
        found = self._check_structure(found_files)
        hashes, results, tolerated = self._stream(found_files, found, record)
        if record is not None:
            self._check_record(record, hashes)
        self.notes += pass_notes(tolerated, results, f"the {self.plan.gguf_type} rounding")
        mp = self.plan.merge_plan
        return GGUFVerifyReport(
            out=str(self.out), base=mp.base, adapters=[a.label for a in self.adapters], checks=self.checks,
            faults=self.faults, tensors=results, notes=self.notes, probes=0, seed=0,
        )

    # -- files and metadata

    def _open_files(self) -> list[FoundFile]:
        planned = {f.filename for f in self.plan.files}
        present = set(gguf_outputs(self.out))
        stray = sorted(present - planned)
        found: list[FoundFile] = []
        for f in self.plan.files:
            path = self.out / f.filename
            if f.filename not in present:
                hint = f"; OUT holds {', '.join(stray[:3])} instead (merged with other --gguf-type/--max-shard-size?)" if stray else ""
                self.faults.append(Fault("file missing", f.filename, f"{f.filename} is missing{hint}"))
                self._check("files", True)
                continue
            try:
                reader = self.gguf.GGUFReader(str(path))
            except Exception as exc:  # any parse error: the file is evidence, not input we refuse
                self.faults.append(Fault("unreadable", f.filename, f"{f.filename} is not a readable GGUF file: {exc}"))
                self._check("files", True)
                continue
            self._check("files", False)
            found.append(FoundFile(f, path, reader))
        if stray:
            self.notes.append(f"GGUF files not part of the planned output (not checked): {', '.join(stray[:5])}")
        return found

    def _check_metadata(self, files: list[FoundFile]) -> None:
        """Each file's keys against the header the writer renders for it (`GGUFFile.header`)."""
        with tempfile.TemporaryDirectory(prefix="streammerge-verify-") as tmp:
            for ff in files:
                skeleton = Path(tmp) / ff.planned.filename  # the planned header, data left sparse
                with open(skeleton, "wb") as fh:
                    fh.write(ff.planned.header)
                    fh.truncate(ff.planned.size)
                want = self.gguf.GGUFReader(str(skeleton))
                self._compare_fields(ff, want)
                del want

    def _compare_fields(self, ff: FoundFile, want) -> None:
        got = ff.reader
        name = ff.planned.filename
        for key, wf in want.fields.items():
            if key.startswith("GGUF."):
                continue
            gf = got.fields.get(key)
            cosmetic = key in COSMETIC_KEYS
            if gf is not None and _field_bytes(got, gf) == _field_bytes(want, wf):
                self._check("metadata", False)
                continue
            found = "missing" if gf is None else _show(gf)
            message = f"{name}: {key} is {found}, the writer writes {_show(wf)}"
            if cosmetic:
                self.notes.append(message)
                self._check("metadata", False)
            else:
                self.faults.append(Fault("metadata differs", key, f"metadata differs: {message}", {"file": name}))
                self._check("metadata", True)
        for key in got.fields:
            if key.startswith("GGUF.") or key in want.fields:
                continue
            if key.startswith("general."):
                self.notes.append(f"{name}: extra key {key} = {_show(got.fields[key])} (not checked)")
            else:
                self.faults.append(Fault("metadata differs", key, f"metadata differs: {name} has {key} = "
                                         f"{_show(got.fields[key])}, which the writer does not write", {"file": name}))
                self._check("metadata", True)

    # -- structure

    def _check_structure(self, files: list[FoundFile]) -> dict[str, tuple[FoundFile, Any]]:
        """Missing, duplicate, unexpected, misshapen and mistyped tensors; returns the checkable ones."""
        located: dict[str, tuple[FoundFile, Any]] = {}
        for ff in files:
            for rt in ff.reader.tensors:
                if rt.name in located:
                    self.faults.append(Fault("duplicate tensor", rt.name,
                                             f"duplicate tensor: in {located[rt.name][0].planned.filename} and {ff.planned.filename}"))
                    self._check("structure", True)
                    continue
                located[rt.name] = (ff, rt)
        lost = {t.name: f.filename for f in self.plan.files for t in f.tensors}
        present_files = {ff.planned.filename for ff in files}
        checkable: dict[str, tuple[FoundFile, Any]] = {}
        for t in self.plan.tensors:
            hit = located.get(t.name)
            if hit is None:
                where = lost[t.name]
                why = f"its file {where} is missing or unreadable" if where not in present_files else f"not in {where} (or any file)"
                self.faults.append(Fault("missing tensor", t.name, f"missing tensor: {why}"))
                self._check("structure", True)
                continue
            ff, rt = hit
            shape = tuple(int(d) for d in reversed(list(rt.shape)))
            while len(shape) > len(t.shape) and shape and shape[0] == 1:  # GGUF may pad dims with 1
                shape = shape[1:]
            gtype = rt.tensor_type.name
            if gtype != t.ggml_type or shape != tuple(t.shape) or int(rt.n_bytes) != t.nbytes:
                self.faults.append(Fault(
                    "shape/type differs", t.name,
                    f"shape/type differs: {list(shape)} {gtype}, expected {list(t.shape)} {t.ggml_type}",
                    {"file": ff.planned.filename},
                ))
                self._check("structure", True)
                continue
            self._check("structure", False)
            checkable[t.name] = hit
        expected = {t.name for t in self.plan.tensors}
        for name, (ff, _) in located.items():
            if name not in expected:
                self.faults.append(Fault("unexpected tensor", name,
                                         f"unexpected tensor in {ff.planned.filename}: the writer does not make it"))
                self._check("structure", True)
        return checkable

    # -- values

    def _layout(self, tensors: list[GGUFTensor]) -> tuple[int, dict[str, int]]:
        """(fixed bytes, rows per chunk for each tensor) within --max-memory."""
        from ..planning.streaming import factor_bytes

        budget = self.options.max_memory
        merged_width = max((t.width for t in tensors if t.source is not None and t.source.loras), default=0)
        tiles = 2 * 4 * max(ops.TILE_ELEMENTS, merged_width) if merged_width else 0
        factors = max((factor_bytes(t.source) for t in tensors if t.source is not None), default=0)
        quant = max((QUANT_GROUP_ROWS * t.width * 4 * QUANT_TEMPORARIES for t in tensors if t.ggml_type in ("Q8_0", "Q4_0")), default=0)
        states = max((qs.state_bytes(t.source) for t in tensors if t.source is not None), default=0)
        fixed = tiles + factors + quant + states + HASH_PIECE
        rows: dict[str, int] = {}
        for t in tensors:
            quantized = t.source is not None and t.source.quant_in is not None
            if quantized:  # packed bytes per element, plus the dequantization's temporaries
                src = (t.source.source.end - t.source.source.start) / max(math.prod(t.source.shape), 1) + QUANT_ROW_COST
            else:
                src = ITEMSIZE[t.source.source.dtype] if t.source is not None else 4
            per_row = int(t.width * (src + 4 * F32_BUFFERS)) + 3 * (t.nbytes // max(t.rows, 1))  # + stored, encoded ×2
            rows[t.name] = fit_rows(t, budget, fixed, per_row, self.options.max_chunk_rows, "to verify")
        return fixed, rows

    def _stream(self, files: list[FoundFile], found: dict[str, tuple[FoundFile, Any]], record):
        """File by file, tensors in data order: check each checkable tensor chunk by chunk and
        hash every byte (when the record lists the file) in the same pass."""
        from ..run.terms import TensorMath

        wanted_sha = _recorded_files(record)
        planned = {t.name: t for t in self.plan.tensors}
        _, chunk_rows = self._layout([planned[n] for n in found])
        tiles = None
        widths = [planned[n].width for n in found if planned[n].source is not None and planned[n].source.loras]
        if widths:
            tiles = ops.Tiles.allocate(max(ops.TILE_ELEMENTS, max(widths)), self.device)
        if self.progress:
            from tqdm import tqdm

            total = sum(ff.path.stat().st_size for ff in files)
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="verifying gguf",
                             file=terminal(), dynamic_ncols=True)
        results: list[TensorResult] = []
        tolerated: list[str] = []
        hashes: dict[str, str] = {}
        try:
            for ff in files:
                hasher = hashlib.sha256() if ff.path.name in wanted_sha else None
                pos, in_order = 0, True
                ranges = sorted((int(rt.data_offset), int(rt.data_offset) + int(rt.n_bytes), rt) for rt in ff.reader.tensors)
                for start, end, rt in ranges:
                    if start < pos:
                        in_order = False  # overlapping tensor infos: hash the file separately below
                    if hasher is not None and in_order:
                        self._hash_range(ff.path, pos, start, hasher)
                    hit = found.get(rt.name)
                    if hit is not None and hit[1] is rt:
                        t = planned[rt.name]
                        result, fault, tol = self._check_tensor(t, ff, start, chunk_rows[t.name], tiles, TensorMath,
                                                                hasher if in_order else None)
                        results.append(result)
                        self._check(result.op, fault is not None)
                        if fault is not None:
                            self.faults.append(fault)
                        if tol:
                            tolerated.append(t.name)
                    elif hasher is not None and in_order:
                        self._hash_range(ff.path, start, end, hasher)
                    pos = max(pos, end)
                if hasher is not None:
                    if in_order:
                        self._hash_range(ff.path, pos, ff.path.stat().st_size, hasher)
                    else:
                        hasher = hashlib.sha256()
                        self._hash_range(ff.path, 0, ff.path.stat().st_size, hasher)
                    hashes[ff.path.name] = hasher.hexdigest()
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        return hashes, results, tolerated

    def _check_tensor(self, t: GGUFTensor, ff: FoundFile, offset: int, step: int, tiles, TensorMath, hasher):
        merged = t.source is not None and bool(t.source.loras)
        config = self.checkpoint.config or {}
        heads = tuple(h for h in (config.get("num_attention_heads"), config.get("num_key_value_heads")) if isinstance(h, int) and h > 0)
        spec = EncodedSpec(t.name, t.ggml_type, t.rows, t.width, t.permute_heads, t.shift)
        state = EncodedEvidence(spec, codecs.get(t.ggml_type), merged, other_head_counts(t.permute_heads, heads))
        row_bytes = t.nbytes // max(t.rows, 1)
        math_ = TensorMath.load(t.source, self._read_source, self.device) if merged else None
        decoder = None
        if t.source is not None and t.source.quant_in is not None:
            decoder = qs.decoder(t.source, self._read_source, self.device)
        for r0 in range(0, t.rows, step):
            n = min(t.rows, r0 + step) - r0
            raw = bytearray(n * row_bytes)
            self._read(str(ff.path), offset + r0 * row_bytes, memoryview(raw), progress=True)
            if hasher is not None:
                hasher.update(raw)
            expected, base = self._expected_rows(t, r0, n, math_, tiles, decoder)
            in_chunk = t.permute_heads * n // t.rows if t.permute_heads else 0
            stored = torch.frombuffer(raw, dtype=torch.uint8).reshape(n, row_bytes)
            state.feed(r0, stored, expected, base if merged else None, in_chunk)
            del raw, stored, expected, base
        return state.finish()

    def _expected_rows(self, t: GGUFTensor, r0: int, n: int, math_, tiles,
                       decoder: Any | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows [r0, r0+n) as the writer must store them (float32, shifted, permuted), and the
        base rows transformed the same way (for the delta). A bitsandbytes base is decoded first."""
        if t.source is None:  # generated (rope_freqs)
            rows = torch.tensor(t.values[r0 : r0 + n], dtype=torch.float32).reshape(n, 1)
            return rows, rows
        src = t.source.source
        offset, length = qs.source_span(t.source, r0, r0 + n)
        buf = bytearray(length)
        self._read(src.file, offset, memoryview(buf))
        if decoder is not None:
            raw = torch.frombuffer(buf, dtype=torch.uint8)
            base_rows = decoder.rows(raw.to(self.device) if self.device.type != "cpu" else raw, r0, r0 + n)
        else:
            base_rows = torch.frombuffer(buf, dtype=getattr(torch, TORCH_NAME[src.dtype])).reshape(n, t.width)
        base = base_rows.to(torch.float32).cpu()
        if math_ is not None:
            expected = math_.compute(base_rows.to(self.device), r0, torch.float32, tiles).cpu()
        else:
            expected = base
        del buf
        if t.shift:
            expected = expected + t.shift
            base = base + t.shift
        if t.permute_heads:
            heads = t.permute_heads * n // t.rows
            expected = permute_rows(expected, heads)
            base = permute_rows(base, heads)
        return expected, base

    def _hash_range(self, path: Path, start: int, end: int, hasher) -> None:
        buf = bytearray(min(HASH_PIECE, max(end - start, 0)))
        view = memoryview(buf)
        pos = start
        while pos < end:
            k = min(len(view), end - pos)
            self._read(str(path), pos, view[:k], progress=True)
            hasher.update(view[:k])
            pos += k

    # -- record

    def _load_record(self) -> dict[str, Any] | None:
        if not self.check_record:
            return None
        path = self.out / RECORD_FILE
        if not path.exists():
            self.notes.append(f"no {RECORD_FILE} in the folder: file checksums and recorded inputs were not checked")
            return None
        from ..formats.checkpoint import read_json

        try:
            record = read_json(path, RECORD_FILE)
            if not isinstance(record, dict) or not isinstance(record.get("files"), list):
                raise InputError(f"{path}: not the record of a --method gguf merge (no 'files' list)")
        except InputError as exc:
            self.faults.append(Fault("unreadable", RECORD_FILE, str(exc)))
            return None
        return record

    def _check_record(self, record: dict[str, Any], hashes: dict[str, str]) -> None:
        from .report import record_faults

        wanted = _recorded_files(record)
        for fname, sha in wanted.items():
            got = hashes.get(fname)
            if got is None and (self.out / fname).is_file() and "/" not in fname:
                hasher = hashlib.sha256()
                self._hash_range(self.out / fname, 0, (self.out / fname).stat().st_size, hasher)
                got = hasher.hexdigest()
            if got is None:
                self.faults.append(Fault("file missing", fname, f"{fname} is recorded in {RECORD_FILE} but missing"))
            elif got != sha:
                self.faults.append(Fault("checksum mismatch", fname,
                                         f"sha256 {got[:16]}… differs from the {sha[:16]}… recorded when it was written; the file changed since"))
            else:
                self._check("checksum", False)
                continue
            self._check("checksum", True)
        for fname in gguf_outputs(self.out):
            if fname not in wanted and fname in {f.filename for f in self.plan.files}:
                self.faults.append(Fault("checksum mismatch", fname, f"{fname} is not one of the files recorded in {RECORD_FILE}"))
                self._check("checksum", True)
        faults, notes = record_faults(record, self.plan.merge_plan, self.checkpoint, self.adapters)
        rec_type = (record.get("gguf") or {}).get("type") if isinstance(record.get("gguf"), dict) else None
        if record.get("method") == "gguf" and rec_type != self.plan.gguf_type:
            faults.append(Fault("record mismatch", "record",
                                f"merged with --gguf-type {rec_type}, verifying --gguf-type {self.plan.gguf_type}"))
        self._check("record", bool(faults))
        self.faults += faults
        self.notes += notes


def _recorded_files(record: dict[str, Any] | None) -> dict[str, str]:
    return {f["filename"]: str(f.get("sha256")) for f in (record or {}).get("files", [])
            if isinstance(f, dict) and isinstance(f.get("filename"), str)}


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


__all__ = ["GGUFVerifier", "GGUFVerifyReport", "verify_gguf", "refuse_gguf_folder", "gguf_outputs",
           "permute_rows", "unpermute_rows"]
