"""`streammerge verify`: prove that a folder is what base + adapters make, in bounded memory.

The expected output is planned exactly as `merge` plans it (`build_plan`), then OUT is checked
against it in one streaming pass over its shards (row chunks read with `pread`, never a memory map):

* Structure: every planned tensor present once with the planned shape and dtype; nothing extra.
* Copied tensors: byte equality with the base. Cast tensors: byte equality with the base chunk
  cast by torch (round to nearest even), i.e. what any torch-based tool writes.
* Merged linear weights (`W' = W + Σ fᵢ·Bᵢ·Aᵢ`, fᵢ = weight·scale, transposed for fan_in_fan_out):
  a probe test that never forms B·A. For p seeded Gaussian probe vectors X (per tensor),
  every row i of the stored weight gives `rᵢ = (W'−W)ᵢ·X − Σ fᵢ·colᵢ·(row·X)`, in float64.
  A correct merge by any tool differs from the exact value element-wise by at most
  `bᵢⱼ = T·½ulp(W'ᵢⱼ) + T(u + u32)·|W'ᵢⱼ−Wᵢⱼ| [+ u·|Wᵢⱼ| when the base is cast]
        + Σₜ (2u + (r+2)·u32)·|fₜ|·(|col|ᵀ|row|)ᵢⱼ`   (u: the output dtype's unit roundoff, T terms),
  which covers rounding once (streammerge, PEFT f32 + cast), rounding after each term or rounding
  the delta or the factors to the output dtype first (PEFT on a bf16/f16 model), casting the base
  first, and float32 delta arithmetic. Since X is
  independent of those errors, rᵢ ~ N(0, ‖eᵢ‖²) with ‖eᵢ‖ ≤ σᵢ = ‖bᵢ‖₂ (computed from row norms
  and a rank×rank Gram matrix). A tensor fails when one row's rᵢ² exceeds 85·σᵢ², or when Σr²
  exceeds the Laurent–Massart bound Σσ² + 2√(36·Σσ⁴) + 72·max σ²: a correct merge trips either
  with probability below e⁻³⁶ per test. The smallest detectable fault is a delta error of about
  u·‖W'‖ (a missing delta is found down to ‖ΔW‖/‖W‖ ≈ 0.5 % in bf16, 3e-7 in f32 on 64×128
  weights; larger tensors do better). Tensors whose whole delta is below that are named in a
  note: applied and missing cannot be told apart there.
* Fault diagnosis for a failing merged tensor, from the same streamed sums: the observed change
  q = (W'−W)·X is fitted against each adapter's expected response dₜ (least squares) and against
  the transposed delta; "delta missing", "adapter k delta missing", "scale off by 2.0×",
  "delta transposed", "values differ in N rows" (localized corruption) or "wrong delta".
* With `streammerge.json` (written by `merge`): every recorded shard's sha256 (hashed during the same
  pass) and the recorded inputs (adapter file digests and weights, base file names and sizes,
  method and dtype) against the ones given. A different --max-shard-size is reported as a note.

Memory: one host buffer holds the out rows, the base rows and a cast scratch for a chunk; add the
float64 work tiles, the largest tensor's LoRA factors in float64 and 1/16 of the budget kept for
small temporaries. The sum is `--max-memory` (`verify_layout`; it refuses a budget below one row).

Extending: each plan op has a `TensorCheck` in `CHECKS` (copy, cast, merge). A 4-bit output or a
new LoRA variant adds its op (or term kind) and a check that states its own tolerance (for 4-bit:
the quantization step instead of the output rounding) — the pass, record and report stay as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .adapters import Adapter
from .errors import InputError, PlanError
from .io.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, read_json, safe_member
from .io.output import RECORD_FILE
from .io.safetensors import ITEMSIZE, TORCH_NAME, SafetensorsFile, TensorInfo, pread_exact, read_header, release_cache
from .options import format_size
from .planner import MergePlan, OutputTensor

PROBES = 4
CONFIDENCE = 36.0  # -ln(false-alarm probability) of each statistical test
ROW_FACTOR = 1 + 2 * math.sqrt(CONFIDENCE) + 2 * CONFIDENCE  # per-row bound on r²/σ² (= 85)
TILE_ELEMENTS = 1 << 18  # float64 working tiles: at most 2 MB each, smaller for small budgets
TILES = 3
TEMPORARIES_SHARE = 16  # 1/16 of the budget is kept for the per-tile temporaries
U32 = 2.0**-24
LOCALIZED_FRACTION = 0.05  # a fault confined to at most this share of rows is "values differ in N rows"

_F64_EXPONENT_BITS = 0x7FF0000000000000
_UNIT_ROUNDOFF = {"F64": 2.0**-53, "F32": 2.0**-24, "BF16": 2.0**-8, "F16": 2.0**-11}


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, TORCH_NAME[name])


def _rows_and_width(shape: Sequence[int]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


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
    margin: float | None = None  # for probe checks: sqrt(residual / bound); <= 1 passes
    resolvable: bool = True  # False: the delta is below the output's rounding


CHECK_LABELS = {
    "structure": "tensors present (names, shapes, dtypes)",
    "copy": "copied tensors (bytes)",
    "cast": "cast tensors (bytes of the cast)",
    "merge": "merged tensors (probe test)",
    "recompute": "merged tensors (recomputed: DoRA, MoE)",
    "bias_add": "biases with lora_bias (recomputed)",
    "token_rows": "trainable-token rows (recomputed)",
    "replace": "replaced tensors (adapter's bytes)",
    "dequant": "dequantized 4/8-bit weights",
    "quant": "4-bit weights (quantization step)",
    "quant_stats": "4-bit statistics (code books, quant state)",
    "checksum": "shard checksums (streammerge.json)",
    "record": "recorded inputs (streammerge.json)",
}


BASIC_CHECKS = ("structure", "copy", "cast", "merge", "checksum", "record")  # always listed in the table


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
    bytes_read: int = 0
    peak_rss_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.faults

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
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
        width = max(len(v) for v in CHECK_LABELS.values())
        lines.append(f"  {'check':<{width}}  {'checked':>7}  {'failed':>6}")
        for kind, label in CHECK_LABELS.items():
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
    from .verify_checks import base_row_bytes, decoded_row_bytes, out_row_bytes

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
    from .quant.stream import state_bytes

    return total + state_bytes(tensor)


def verify_layout(plan: MergePlan, probes: int) -> VerifyLayout:
    from .verify_checks import RTILE_BYTES, RecomputeCheck, alignment, check_class, state_bytes

    classes = {t.name: check_class(t) for t in plan.tensors}
    merges = [t for t in plan.tensors if classes[t.name] is LinearLoraCheck]
    recomputes = [t for t in plan.tensors if classes[t.name] is not None and issubclass(classes[t.name], RecomputeCheck)]
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
    from .verify_checks import alignment as _align

    widest = max((_align(t) * _row_cost(t) for t in plan.tensors), default=1)
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


# ---------------------------------------------------------------------------------- tensor checks


@dataclass
class Chunk:
    """Row chunk [row_start, row_start + rows) of one tensor: OUT's bytes and the base's bytes."""

    row_start: int
    rows: int
    out: memoryview
    base: memoryview
    scratch: memoryview


class Context:
    """What checks share: the device, probe settings, float64 tiles and a reader for factors."""

    def __init__(self, device: torch.device, probes: int, seed: int, tile_elements: int, read: Callable[[str, int, memoryview], None],
                 rtile_elements: int = 0, out_tensors: dict[str, tuple[str, TensorInfo]] | None = None):
        from .verify_checks import RTILES

        self.device = device
        self.probes = probes
        self.seed = seed
        self.read = read
        # W', W (then W' − W), and the power of two of each element of W'
        self.tiles = [torch.empty(tile_elements, dtype=torch.float64, device=device) for _ in range(TILES)]
        self.rtiles = [torch.empty(rtile_elements, dtype=torch.float32, device=device) for _ in range(RTILES if rtile_elements else 0)]
        self.out_tensors = out_tensors or {}

    def load(self, src) -> torch.Tensor:
        """A whole input tensor (LoRA factors, statistics), on the host in its stored dtype."""
        buf = bytearray(src.end - src.start)
        self.read(src.file, src.start, memoryview(buf))
        if not buf:
            return torch.empty(src.shape, dtype=_torch_dtype(src.dtype))
        return torch.frombuffer(buf, dtype=_torch_dtype(src.dtype)).reshape(src.shape)

    def out_tensor(self, name: str) -> torch.Tensor | None:
        """A small tensor of OUT (a 4-bit weight's statistics), None when missing or misshapen."""
        where = self.out_tensors.get(name)
        if where is None:
            return None
        path, info = where
        buf = bytearray(info.end - info.start)
        self.read(path, info.start, memoryview(buf))
        if not buf:
            return torch.empty(tuple(info.shape), dtype=_torch_dtype(info.dtype))
        return torch.frombuffer(buf, dtype=_torch_dtype(info.dtype)).reshape(tuple(info.shape))


def _as_tensor(view: memoryview, dtype: str, rows: int, width: int) -> torch.Tensor:
    if rows * width == 0:
        return torch.empty((rows, width), dtype=_torch_dtype(dtype))
    raw = torch.frombuffer(view, dtype=torch.uint8, count=rows * width * ITEMSIZE[dtype])
    return raw.view(_torch_dtype(dtype)).reshape(rows, width)


class TensorCheck(ABC):
    """Streams one output tensor's row chunks against what the plan says it must hold."""

    category = ""  # the report's row (CHECK_LABELS); the op by default
    needs_prepass = False  # True: `prepass(row_start, base_rows)` sees every base row before `feed`

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.tensor = tensor
        self.ctx = ctx
        self.category = self.category or tensor.op
        self.rows, self.width = _rows_and_width(tensor.weight_shape)
        self.align = 1  # chunks start at multiples of this many rows
        self.base = self._base_rows()

    def _base_rows(self):
        """How the base's rows are read (None: the check reads only OUT's bytes, as one row of bytes)."""
        from .verify_checks import BaseRows

        return BaseRows(self.tensor, self.ctx)

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        """(offset in OUT's tensor, length) of rows [r0, r1)."""
        row = self.width * ITEMSIZE[self.tensor.dtype]
        return r0 * row, (r1 - r0) * row

    def prepass(self, row_start: int, base_rows: torch.Tensor) -> None:
        raise NotImplementedError

    @abstractmethod
    def feed(self, chunk: Chunk) -> None: ...

    @abstractmethod
    def finish(self) -> tuple[TensorResult, Fault | list[Fault] | None]: ...


class BytesCheck(TensorCheck):
    """Copied tensors: OUT's bytes must be the base's bytes."""

    def __init__(self, tensor: OutputTensor, ctx: Context):
        super().__init__(tensor, ctx)
        self.itemsize = ITEMSIZE[tensor.dtype]
        self.differing = 0
        self.first: int | None = None  # flat element index of the first difference

    def expected(self, chunk: Chunk, nbytes: int) -> memoryview:
        return chunk.base[:nbytes]

    def feed(self, chunk: Chunk) -> None:
        nbytes = chunk.rows * self.width * self.itemsize
        if nbytes == 0:
            return
        got = torch.frombuffer(chunk.out, dtype=torch.uint8, count=nbytes)
        want = torch.frombuffer(self.expected(chunk, nbytes), dtype=torch.uint8, count=nbytes)
        if torch.equal(got, want):
            return
        # count differing elements in bounded pieces (only on failure)
        step = (1 << 20) * self.itemsize
        for lo in range(0, nbytes, step):
            hi = min(nbytes, lo + step)
            diff = (got[lo:hi] != want[lo:hi]).view(-1, self.itemsize).any(dim=1)
            n = int(diff.sum())
            if n and self.first is None:
                self.first = chunk.row_start * self.width + lo // self.itemsize + int(diff.nonzero()[0, 0])
            self.differing += n

    def finish(self) -> tuple[TensorResult, Fault | None]:
        ok = self.differing == 0
        result = TensorResult(self.tensor.name, self.tensor.op, ok)
        if ok:
            return result, None
        total = self.rows * self.width
        row = self.first // max(self.width, 1)
        src = "the adapter's saved tensor" if self.tensor.op == "replace" else "the base"
        what = src if self.tensor.source.dtype == self.tensor.dtype else f"{src} cast to {self.tensor.dtype}"
        fault = Fault(
            "bytes differ", self.tensor.name,
            f"bytes differ from {what}: {self.differing} of {total} elements (first at row {row})",
            {"elements": self.differing, "total": total, "first_row": row},
        )
        return result, fault


class CastCheck(BytesCheck):
    """Cast tensors: OUT's bytes must be the base chunk cast by torch (round to nearest even)."""

    def expected(self, chunk: Chunk, nbytes: int) -> memoryview:
        src = _as_tensor(chunk.base, self.tensor.source.dtype, chunk.rows, self.width)
        dst = _as_tensor(chunk.scratch, self.tensor.dtype, chunk.rows, self.width)
        dst.copy_(src)
        return chunk.scratch[:nbytes]


class ReplaceCheck(CastCheck):
    """modules_to_save / saved embeddings / saved biases: OUT holds the adapter's tensor (or its cast)."""

    def expected(self, chunk: Chunk, nbytes: int) -> memoryview:
        if self.tensor.source.dtype == self.tensor.dtype:
            return chunk.base[:nbytes]
        return super().expected(chunk, nbytes)


@dataclass
class _Term:
    """One LoRA term in the stored layout: delta[i, j] = factor · Σₖ col[k, i] · row[k, j]."""

    col: torch.Tensor  # [r, rows] float64
    row: torch.Tensor  # [r, width] float64
    col_abs: torch.Tensor
    gram_abs: torch.Tensor  # |row| |row|ᵀ, [r, r]
    row_x: torch.Tensor  # factor · row @ X, [r, p]
    col_x: torch.Tensor | None  # factor · col @ X (square weights: the transposed hypothesis)
    factor: float
    eps: float  # bound on the relative error of factor·|col|ᵀ|row| as any tool computes it


class LinearLoraCheck(TensorCheck):
    """Merged linear weights: the probe test and its fault diagnosis (see the module docstring)."""

    def __init__(self, tensor: OutputTensor, ctx: Context):
        super().__init__(tensor, ctx)
        from .verify_checks import alignment

        dev, p = ctx.device, ctx.probes
        self.align = alignment(tensor)
        self.u = _UNIT_ROUNDOFF.get(tensor.dtype, 2.0**-8)
        self.cast = self.base.dtype != tensor.dtype
        n_terms = len(tensor.loras)
        # Another tool may add the terms one by one, rounding to the output dtype after each (PEFT with
        # several adapters on a 16-bit model): up to T half-ulps. float32 additions before the final
        # rounding add u32·|v| each, and u32·|v| <= (2·u32/u)·(half an ulp of v).
        roundings = n_terms - 1 if tensor.dtype == "F32" else n_terms
        self.w_scale = n_terms * (1 + 2 * roundings * U32 / self.u)
        self.u_acc = n_terms * (self.u + U32)
        finfo = torch.finfo(_torch_dtype(tensor.dtype))
        self.floor = finfo.smallest_normal * finfo.eps * math.sqrt(self.width)
        gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + zlib.crc32(tensor.name.encode()))
        self.x = torch.randn(self.width, p, generator=gen, dtype=torch.float64).to(dev)
        square = self.rows == self.width
        self.terms: list[_Term] = []
        for term in tensor.loras:
            a, b = self._factor(term.a), self._factor(term.b)
            if term.expert is not None:  # one expert's factors of a fused expert LoRA, and a row range of B
                from .ops import expert_factors

                a_e, b_e = expert_factors(a, b, term.experts)
                a, b = a_e[term.expert].contiguous(), b_e[term.expert]
                if term.b_rows is not None:
                    b = b[term.b_rows[0]:term.b_rows[1]]
                b = b.contiguous()
                del a_e, b_e
            rank = a.shape[0]
            col, row = (a, b.T.contiguous()) if term.transpose else (b.T.contiguous(), a)
            del a, b
            row_abs = row.abs()
            self.terms.append(_Term(
                col=col, row=row, col_abs=col.abs(), gram_abs=row_abs @ row_abs.T,
                row_x=term.factor * (row @ self.x), col_x=term.factor * (col @ self.x) if square else None,
                factor=term.factor, eps=2 * self.u + (rank + 2) * U32,
            ))
            del row_abs
        t = len(self.terms)
        # streamed sums (float64 scalars on the host)
        self.sum_r2 = 0.0  # Σ residual² against the expected merge
        self.sum_s2 = 0.0  # Σ σ² over rows and probes
        self.sum_s4 = 0.0
        self.max_s2 = 0.0
        self.sum_q2 = 0.0  # Σ q² (q = (W'−W)·X: the observed change)
        self.gram = torch.zeros(t, t, dtype=torch.float64)  # Σ dₜ·dₛ
        self.qd = torch.zeros(t, dtype=torch.float64)  # Σ q·dₜ
        self.sum_t2 = 0.0 if square else None  # Σ (q − dᵀ)²: the transposed hypothesis
        self.bad_rows = 0
        self.first_bad: int | None = None
        self.worst_row_ratio = 0.0
        self.nonfinite = 0

    def _factor(self, src) -> torch.Tensor:
        return self.ctx.load(src).to(device=self.ctx.device, dtype=torch.float64)

    @property
    def needs_prepass(self) -> bool:
        return False

    def feed(self, chunk: Chunk) -> None:
        out = _as_tensor(chunk.out, self.tensor.dtype, chunk.rows, self.width)
        base = self.base.rows(chunk.base, chunk.row_start, chunk.row_start + chunk.rows)
        tile_rows = max(1, self.ctx.tiles[0].numel() // max(self.width, 1))
        for a in range(0, chunk.rows, tile_rows):
            b = min(chunk.rows, a + tile_rows)
            self._tile(chunk.row_start + a, out[a:b], base[a:b])

    def _tile(self, r0: int, out_rows: torch.Tensor, base_rows: torch.Tensor, masked: bool = False) -> None:
        n = out_rows.shape[0]
        w1 = self.ctx.tiles[0][: n * self.width].view(n, self.width)
        w0 = self.ctx.tiles[1][: n * self.width].view(n, self.width)
        w1.copy_(out_rows)  # W' (host -> device and to float64 in one copy)
        w0.copy_(base_rows)  # W
        if masked:
            self._mask_nonfinite(w1, w0)
        sigma = self.w_scale * self._half_ulp_norms(w1)
        if self.cast:
            sigma += self.u * torch.linalg.vector_norm(w0, dim=1)
        torch.sub(w1, w0, out=w0)  # W' − W
        sigma += self.u_acc * torch.linalg.vector_norm(w0, dim=1)
        sigma += self.floor
        q = w0 @ self.x  # observed change, [n, p]
        if not masked and not bool(torch.isfinite(q).all() and torch.isfinite(sigma).all()):
            return self._tile(r0, out_rows, base_rows, masked=True)  # rare: redo without non-finite elements
        ds = []
        d_t = torch.zeros_like(q) if self.sum_t2 is not None else None
        for term in self.terms:
            cols = term.col[:, r0 : r0 + n]
            ds.append(cols.T @ term.row_x)
            ca = term.col_abs[:, r0 : r0 + n].T
            sigma += term.eps * abs(term.factor) * ((ca @ term.gram_abs) * ca).sum(dim=1).clamp_min(0).sqrt()
            if d_t is not None:
                d_t += term.row[:, r0 : r0 + n].T @ term.col_x
        d = torch.stack(ds).sum(dim=0)
        resid2 = (q - d).square()
        s2 = sigma.square()
        self.sum_r2 += float(resid2.sum())
        p = q.shape[1]
        self.sum_s2 += p * float(s2.sum())
        self.sum_s4 += p * float(s2.square().sum())
        self.max_s2 = max(self.max_s2, float(s2.max()))
        ratio = (resid2.max(dim=1).values / (ROW_FACTOR * s2).clamp_min(torch.finfo(torch.float64).tiny)).cpu()
        bad = (ratio > 1).nonzero()
        if len(bad):
            self.bad_rows += len(bad)
            if self.first_bad is None:
                self.first_bad = r0 + int(bad[0, 0])
        self.worst_row_ratio = max(self.worst_row_ratio, float(ratio.max()))
        # diagnosis sums
        stacked = torch.stack(ds).reshape(len(ds), -1)
        self.sum_q2 += float(q.square().sum())
        self.gram += (stacked @ stacked.T).cpu()
        self.qd += (stacked @ q.reshape(-1)).cpu()
        if d_t is not None:
            self.sum_t2 += float((q - d_t).square().sum())

    def _half_ulp_norms(self, w1: torch.Tensor) -> torch.Tensor:
        """‖half an ulp of W' in the output dtype‖ per row: W' rounded to nearest is within it of the
        value it rounds. Keeping only the exponent bits of v gives 2^⌊log₂|v|⌋ (in place, no
        temporaries); an ulp with p significand bits is 2^(⌊log₂|v|⌋−p+1), so half of it is u·that."""
        n = w1.shape[0] * w1.shape[1]
        power = self.ctx.tiles[2][:n].view_as(w1)
        power.copy_(w1)
        power.view(torch.int64).bitwise_and_(_F64_EXPONENT_BITS)
        return self.u * torch.linalg.vector_norm(power, dim=1)

    def _mask_nonfinite(self, w1: torch.Tensor, w0: torch.Tensor) -> None:
        """Non-finite values in OUT where the base is finite are faults; where the base itself is
        not finite the element cannot be checked and is left out (zeroed in both)."""
        fin1, fin0 = torch.isfinite(w1), torch.isfinite(w0)
        self.nonfinite += int((~fin1 & fin0).sum())
        skip = ~(fin1 & fin0)
        w1.masked_fill_(skip, 0.0)
        w0.masked_fill_(skip, 0.0)

    # -- verdict

    def threshold(self) -> float:
        """Laurent–Massart: P(Σ aᵢZᵢ² ≥ Σa + 2‖a‖₂√x + 2 max(a)·x) ≤ e⁻ˣ, with aᵢ ≤ σᵢ²."""
        return self.sum_s2 + 2 * math.sqrt(self.sum_s4 * CONFIDENCE) + 2 * self.max_s2 * CONFIDENCE

    def finish(self) -> tuple[TensorResult, Fault | None]:
        thr = self.threshold()
        expected2 = float(self.gram.sum())  # Σ d², the size of the delta's response
        ok = self.nonfinite == 0 and self.bad_rows == 0 and self.sum_r2 <= thr
        margin = math.sqrt(max(self.sum_r2 / thr if thr > 0 else (0.0 if self.sum_r2 == 0 else math.inf),
                               self.worst_row_ratio))
        result = TensorResult(self.tensor.name, "merge", ok, margin=round(margin, 4) if math.isfinite(margin) else None,
                              resolvable=expected2 > thr)
        if ok:
            return result, None
        return result, self._diagnose(thr, expected2)

    def _diagnose(self, thr: float, expected2: float) -> Fault:
        name = self.tensor.name
        data = {
            "residual_over_bound": math.sqrt(self.sum_r2 / thr) if thr > 0 else None,  # JSON has no inf
            "rows_failing": self.bad_rows, "rows": self.rows,
        }
        if self.nonfinite:
            return Fault("non-finite", name, f"{self.nonfinite} non-finite value(s) where the base is finite", data)
        if self.sum_q2 <= thr:
            return Fault("delta missing", name, "delta missing: the weight equals the base weight (within rounding)", data)
        coef, resid = self._fit()
        if coef is not None and resid <= thr:
            return self._scale_fault(coef, data)
        if self.sum_t2 is not None and self.sum_t2 <= thr:
            return Fault("delta transposed", name, "delta transposed: the weight is W + (s·B·A)ᵀ", data)
        if 0 < self.bad_rows <= max(1, int(LOCALIZED_FRACTION * self.rows)):
            return Fault(
                "values differ", name,
                f"values differ in {self.bad_rows} of {self.rows} rows (first: row {self.first_bad}); "
                "the rest matches base + adapters", {**data, "first_row": self.first_bad},
            )
        observed = math.sqrt(self.sum_q2)
        expected = math.sqrt(expected2)
        corr = float(self.qd.sum()) / (observed * expected) if observed > 0 and expected > 0 else 0.0
        if expected == 0:
            return Fault("wrong delta", name, "wrong delta: the weight differs from the base but the adapters' delta is zero", data)
        data.update(correlation=corr, size_ratio=observed / expected)
        return Fault(
            "wrong delta", name,
            f"wrong delta: the change from the base does not match base + adapters "
            f"(correlation {corr:.2f}, size {data['size_ratio']:.3g}× the expected)", data,
        )

    def _fit(self) -> tuple[list[float] | None, float]:
        """Least-squares coefficients c with q ≈ Σ cₜ·dₜ, and the residual Σ(q − Σcₜdₜ)²."""
        if float(self.gram.diagonal().min()) <= 0:
            return None, math.inf
        coef = torch.linalg.pinv(self.gram) @ self.qd  # pinv: two adapters may carry the same delta
        resid = self.sum_q2 - float(coef @ self.qd)
        return [float(c) for c in coef], max(resid, 0.0)

    def _scale_fault(self, coef: list[float], data: dict) -> Fault:
        name = self.tensor.name
        data = {**data, "coefficients": coef}
        if len(coef) == 1 or max(coef) - min(coef) <= 0.01 * max(1.0, max(abs(c) for c in coef)):
            k = coef[0]
            return Fault("scale off", name, f"scale off by {_fmt_factor(k)}× (the delta is applied {_fmt_factor(k)} times)",
                         {**data, "factor": k})
        missing = [i for i, c in enumerate(coef) if abs(c) < 0.01]
        if missing and all(abs(c - 1) < 0.01 for i, c in enumerate(coef) if i not in missing):
            which = ", ".join(str(self.tensor.loras[i].adapter + 1) for i in missing)
            return Fault("adapter delta missing", name, f"delta of adapter {which} missing (the other adapters' deltas are applied)",
                         {**data, "adapters": [self.tensor.loras[i].adapter for i in missing]})
        parts = ", ".join(f"adapter {self.tensor.loras[i].adapter + 1} ×{_fmt_factor(c)}" for i, c in enumerate(coef))
        return Fault("scale off", name, f"adapter weights off: {parts}", data)


def _fmt_factor(k: float) -> str:
    return f"{k:.1f}" if abs(k - round(k, 1)) < 0.005 else f"{k:.3g}"


PROBED_KINDS = ("lora", "embedding")  # term kinds whose delta is s·B·A (transposed or not)


def unverifiable(plan: MergePlan) -> dict[str, list[str]]:
    """Operations, LoRA term kinds and codecs this verifier has no check for, with the tensors using
    them: refusing them beats a check that cannot fail. (`verify_checks.check_class` picks the checks.)"""
    from .verify_checks import KNOWN_KINDS, check_class

    out: dict[str, list[str]] = {}
    for t in plan.tensors:
        if check_class(t) is not None:
            continue
        kinds = [term.kind for term in t.loras if term.kind not in KNOWN_KINDS]
        if t.quant_in is not None and t.quant_in.codec not in ("bnb4", "int8"):
            kinds.append(f"{t.quant_in.codec} base")
        for kind in kinds or [t.op]:
            out.setdefault(kind, []).append(t.name)
    return out


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
    dtypes = {ref.info.dtype for ref in checkpoint.tensors.values() if ref.info.dtype in _UNIT_ROUNDOFF}
    return TORCH_NAME[dtypes.pop()] if len(dtypes) == 1 else None


# ------------------------------------------------------------------------------------------ the pass


class TimedRun:
    """What the safetensors and GGUF verifiers share: positioned reads through cached descriptors
    (page cache released behind them, bytes counted), and `run()` around a subclass's `_run()`
    (fixed malloc threshold, descriptors closed whatever happens, time recorded)."""

    _fds: dict[str, int]
    _bar: Any
    bytes_read: int

    def _read(self, path: str, offset: int, view: memoryview, progress: bool = False) -> None:
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


    def run(self) -> VerifyReport:
        from .execute import _fix_malloc_threshold

        _fix_malloc_threshold()
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

    def _run(self) -> VerifyReport:
        raise NotImplementedError


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
        self.layout = verify_layout(plan, probes)
        self._fds: dict[str, int] = {}
        self._bar = None
        self.bytes_read = 0

    def _run(self) -> VerifyReport:
        self.faults: list[Fault] = []
        self.notes: list[str] = []
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

        weak = [r.name for r in results if r.op == "merge" and not r.resolvable]
        if weak:
            self.notes.append(
                f"{len(weak)} merged tensor(s) have a delta below the output dtype's rounding, so applied and "
                f"missing cannot be told apart there (e.g. {weak[0]})"
            )
        return VerifyReport(
            out=str(self.out), base=self.plan.base, adapters=[a.label for a in self.adapters], checks=self.checks,
            faults=self.faults, tensors=results, notes=self.notes, probes=self.probes, seed=self.seed,
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
        from .verify_checks import check_class

        check = check_class(tensor)(tensor, ctx)
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
        for r0 in range(0, rows if has_rows else 0, step):
            r1 = min(rows, r0 + step)
            o_off, o_len = check.out_span(r0, r1)
            b_off, b_len = base.span(r0, r1)
            out_v = view[:o_len]
            base_v = view[o_len : o_len + b_len]
            scratch = view[o_len + b_len : o_len + b_len + o_len]
            self._read(path, info.start + o_off, out_v, progress=True)
            if hasher is not None:
                hasher.update(out_v)
            self._read(src.file, b_off, base_v)
            check.feed(Chunk(r0, r1 - r0, out_v, base_v, scratch))
        return self._finish(check)

    @staticmethod
    def _finish(check: TensorCheck) -> tuple[str, TensorResult, list[Fault]]:
        result, fault = check.finish()
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
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="verifying", file=sys.stderr, dynamic_ncols=True)
