"""Element-wise verify checks: bytes of copied and cast tensors, recomputation of merged rows.

Every merged tensor is checked here by recomputing the expected rows in float32 (plain linear LoRA:
`linear.LinearElementCheck`, with a GEMM; everything else with the merge's pure math,
`terms.TensorMath` / `ops`, which are chunk-invariant), streaming row tiles, and comparing element
by element with a bound that any correct tool's output meets (`verify --fast` checks plain linear
LoRA merges with the probe test of `probe` instead):

* `BytesCheck` / `CastCheck` / `ReplaceCheck`: copied tensors, cast tensors (torch's round to nearest
  even) and modules_to_save / saved embeddings byte for byte.
* `RecomputeCheck` (DoRA, MoE experts, lora_bias, trainable-token rows, dequantized bitsandbytes
  bases): with E the exact float32 expectation,
  `|O − E| ≤ T·½ulp(O) + ε·Σ|f|·(|col|ᵀ|row|) + T(u+u32)·|O − W| [+ u·|W| cast] [+ ρ·|E| DoRA] + floor`,
  ε = 2u + (r+2)·u32 (factors rounded to the output dtype, float32 rank-r accumulation in any
  order), ρ = 4u + n·u32 (a DoRA norm over n elements summed in any order, then divided), the
  |col|ᵀ|row| products carried through DoRA's rescaling by |m/‖·‖|. Our own outputs equal round(E).
* merged_4bit outputs: `verify_quant` (each element within its block's quantization step; the
  statistics by value).

A fault names the tensor and counts the elements out of bound ("values differ: 1 of 65536 elements
out of bound in 1 of 256 rows (max excess 61× the bound at row 5 col 7: stored …, expected …)").
Diagnosis uses streamed sums over q = O − W (observed change) and d = E − W (expected change) against
Σb² (b: the bound): Σq² ≤ Σb² "delta missing"; a least-squares factor c with Σ(q − c·d)² ≤ Σb²
"scale off by c×"; failures confined to a few rows "values differ"; else "wrong delta".
"""

from __future__ import annotations

import math

import torch

from .. import ops
from ..formats.safetensors import ITEMSIZE
from ..planning.types import OutputTensor
from ..formats import codecs
from ..planning import streaming as qs
from ..planning.streaming import factor_bytes, needs_prepass
from ..run.terms import TensorMath
from .base import (
    _UNIT_ROUNDOFF,
    RTILES,
    BaseRows,
    LOCALIZED_FRACTION,
    U32,
    Chunk,
    Context,
    Fault,
    TensorCheck,
    TensorResult,
    _as_tensor,
    _fmt_factor,
    _rows_and_width,
    _torch_dtype,
)

ENCODED_F32_ROWS = 8  # float32 rows per chunk row of an encoded tensor's check (see decoded_row_bytes)
# bytes per tile element: the tiles, and the per-tile temporaries (float64 sums, masks, 4-bit codes and
# their per-element bounds, the dequantized codes) that live while one tile is compared
RTILE_BYTES = RTILES * 4 + 96
_F32_EXPONENT_BITS = 0x7F800000
F32_TINY = torch.finfo(torch.float32).tiny


def base_row_bytes(t: OutputTensor) -> int:
    width = _rows_and_width(t.weight_shape)[1]
    if t.quant_in is not None:
        return -(-width // 2) + 1 if t.quant_in.codec == "bnb4" else width
    return width * ITEMSIZE[t.source.dtype] if t.source is not None else 0


def out_row_bytes(t: OutputTensor) -> int:
    width = _rows_and_width(t.weight_shape)[1]
    if t.quant_out is not None:
        return qs.output_codec(t.quant_out).out_bytes(width) + 1 if t.quant_out.part == "weight" else 0
    if t.encoding is not None:
        return codecs.get(t.encoding).row_bytes(width)
    return width * ITEMSIZE[t.dtype]


def alignment(t: OutputTensor) -> int:
    return qs.row_alignment(t) if qs.involves_quant(t) or t.encoding is not None else 1


def decoded_row_bytes(t: OutputTensor) -> int:
    """float32 rows a chunk decodes to at once (bitsandbytes / round-trip sources), beyond the raw bytes."""
    width = _rows_and_width(t.weight_shape)[1]
    total = 2 * 4 * width if (t.quant_in is not None or t.roundtrip is not None) else 0
    if t.encoding is not None:  # expected, base, delta, decoded, tolerance, a hypothesis, temporaries; the encoding
        codec = codecs.get(t.encoding)
        total += ENCODED_F32_ROWS * 4 * width + codec.work_bytes(width) + codec.row_bytes(width)
    return total


def state_bytes(t: OutputTensor) -> int:
    """Per-tensor memory of a recompute check: factors (and their absolute values), decoded statistics."""
    total = 2 * factor_bytes(t) + qs.state_bytes(t)
    if t.quant_out is not None:
        n_blocks = -(-math.prod(t.quant_out.shape) // (t.quant_out.blocksize or 64))  # per-channel FP8: rows of >= 64
        total += n_blocks * (4 + 4 + 4 + 4)  # stored absmax, decoded, e_a, block temporaries
    if needs_prepass(t):
        total += 8 * _rows_and_width(t.weight_shape)[1]
    if t.encoding is not None:  # a quantizer's temporaries that do not scale with the chunk
        group = getattr(codecs.get(t.encoding), "group_work_bytes", None)
        total += group(_rows_and_width(t.weight_shape)[1]) if group else 0
    return total


# ------------------------------------------------------------------------------------ bytes

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




def _abs_term(term):
    """The same term on |factors|: applied to zeros it gives Σ|f|·(|col|ᵀ|row|), the scale of the
    rounding any tool makes in that term."""
    if isinstance(term, ops.LoraTermF32):
        return ops.LoraTermF32(term.col.abs(), term.row.abs(), abs(term.factor))
    if isinstance(term, ops.ExpertsTermF32):
        return ops.ExpertsTermF32(tuple(_abs_term(t) for t in term.terms), term.shape)
    if isinstance(term, ops.BiasTermF32):
        return ops.BiasTermF32(term.values.abs(), abs(term.factor))
    return None


def _rank(term) -> int:
    if isinstance(term, ops.LoraTermF32):
        return term.rank
    if isinstance(term, ops.ExpertsTermF32):
        return max((t.rank for t in term.terms), default=0)
    return 0


def _half_ulp(o: torch.Tensor, u: float, out: torch.Tensor) -> torch.Tensor:
    """u·2^⌊log₂|o|⌋ (half an ulp of o in a dtype of unit roundoff u), in place into `out` (float32 o)."""
    out.copy_(o)
    out.view(torch.int32).bitwise_and_(_F32_EXPONENT_BITS)
    return out.mul_(u)


def output_floor(dtype: str) -> float:
    """Absolute rounding slack near zero: a spacing of the output dtype's subnormals (a float32 one at least)."""
    if dtype not in _UNIT_ROUNDOFF:
        return F32_TINY
    finfo = torch.finfo(_torch_dtype(dtype))
    return max(F32_TINY, finfo.smallest_normal * finfo.eps)


class Excess:
    """The element furthest out of bound in a tensor: where it is, what is stored and expected there."""

    def __init__(self):
        self.ratio = 0.0
        self.where: tuple[int, int] | None = None
        self.values: tuple[float, float, float] = (0.0, 0.0, 0.0)  # stored, expected, bound

    def update(self, ratio: torch.Tensor, r0: int, o: torch.Tensor, e: torch.Tensor, bound: torch.Tensor) -> None:
        flat = int(torch.argmax(ratio.nan_to_num(nan=0.0)))
        value = float(ratio.reshape(-1)[flat])
        if self.where is None or value > self.ratio:
            i, j = divmod(flat, ratio.shape[1])
            self.ratio, self.where = value, (r0 + i, j)
            self.values = (float(o[i, j]), float(e[i, j]), float(bound[i, j]))

    def text(self) -> str:
        if self.where is None:
            return "no element located"
        stored, expected, bound = self.values
        return (f"max excess {self.ratio:.3g}× the bound at row {self.where[0]} col {self.where[1]}: stored {stored:.6g}, "
                f"expected {expected:.6g} ± {bound:.3g}")

    def data(self) -> dict:
        if self.where is None:
            return {}
        return {"worst": {"row": self.where[0], "col": self.where[1], "excess": self.ratio, "stored": self.values[0],
                          "expected": self.values[1], "bound": self.values[2]}}


# ------------------------------------------------------------------------------------ recompute


class RecomputeCheck(TensorCheck):
    """OUT against the expected rows recomputed in float32, element by element (see the module docstring)."""

    category = "recompute"

    def __init__(self, tensor: OutputTensor, ctx: Context):
        super().__init__(tensor, ctx)
        self.rows, self.width = _rows_and_width(tensor.weight_shape)
        self.category = {"merge": "recompute"}.get(tensor.op, tensor.op)
        self.align = alignment(tensor)
        self.base = BaseRows(tensor, ctx)
        self.math = TensorMath.load(tensor, ctx.load, ctx.device) if tensor.loras else None
        terms = self.math.terms if self.math is not None else []
        self.abs_terms = self._abs_terms(terms)
        self.u = self._unit_roundoff()
        additive = [t for t in tensor.loras if t.kind != "token_rows"]
        n_terms = len(additive)
        self.T = max(1, n_terms)
        rank = max((_rank(t) for t in terms), default=0)
        self.eps = 2 * self.u + (rank + 2) * U32
        self.u_acc = n_terms * (self.u + U32)
        self.cast_u = self.u if self.base.dtype != self._value_dtype() else 0.0
        dora_n = self.rows if needs_prepass(tensor) else self.width
        self.rho = 4 * self.u + dora_n * U32 if any(t.kind == "dora" for t in tensor.loras) else 0.0
        self.floor = output_floor(self._value_dtype())
        # streamed sums
        self.sum_qq = self.sum_qd = self.sum_dd = self.sum_bb = 0.0
        self.bad = 0
        self.bad_rows = 0
        self.first_bad: int | None = None
        self.worst = 0.0
        self.excess = Excess()
        self.nonfinite = 0

    def _abs_terms(self, terms) -> dict:
        return {id(t): _abs_term(t) for t in terms}

    # -- what the subclass for 4-bit outputs changes

    def _value_dtype(self) -> str:
        return self.tensor.dtype

    def _unit_roundoff(self) -> float:
        return _UNIT_ROUNDOFF.get(self.tensor.dtype, 2.0**-8)

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        """(offset in OUT's tensor, length) of rows [r0, r1)."""
        row = self.width * ITEMSIZE[self.tensor.dtype]
        return r0 * row, (r1 - r0) * row

    def _observed(self, chunk: Chunk, a: int, b: int, o: torch.Tensor) -> None:
        out = torch.frombuffer(chunk.out, dtype=torch.uint8, count=chunk.rows * self.width * ITEMSIZE[self.tensor.dtype])
        o.copy_(out.view(_torch_dtype(self.tensor.dtype)).view(chunk.rows, self.width)[a:b])

    def _tolerance(self, o, w, e, ab, bound, scratch, r0: int, a: int, chunk: Chunk) -> None:
        _half_ulp(o, self.u * self.T, bound)
        bound.add_(ab, alpha=self.eps)
        if self.u_acc:
            bound.add_(torch.sub(o, w, out=scratch).abs_(), alpha=self.u_acc)
        if self.cast_u:
            bound.add_(scratch.copy_(w).abs_(), alpha=self.cast_u)
        if self.rho:
            bound.add_(scratch.copy_(e).abs_(), alpha=self.rho)
        bound.add_(self.floor)

    # -- streaming

    @property
    def needs_prepass(self) -> bool:
        return self.math is not None and needs_prepass(self.tensor)

    def _tiles(self, n: int) -> list[torch.Tensor]:
        return [t[: n * self.width].view(n, self.width) for t in self.ctx.rtiles]

    def prepass(self, r0: int, base_rows: torch.Tensor) -> None:
        acc, scratch = self.ctx.rtiles[0], self.ctx.rtiles[1]
        self.math.prepass(base_rows, r0, ops.Tiles(acc, scratch))

    def _tile_rows(self) -> int:
        fit = max(1, self.ctx.rtiles[0].numel() // max(self.width, 1))
        return max(self.align, fit // self.align * self.align)

    def feed(self, chunk: Chunk) -> None:
        base = self.base.rows(chunk.base, chunk.row_start, chunk.row_start + chunk.rows)
        step = self._tile_rows()
        for a in range(0, chunk.rows, step):
            b = min(chunk.rows, a + step)
            self._tile(chunk, a, b, base[a:b])

    def _apply(self, acc: torch.Tensor, ab: torch.Tensor, r0: int, scratch: torch.Tensor) -> None:
        """acc: W -> E (the merge's float32 rows); ab: 0 -> the |Δ| scale, through DoRA's rescaling."""
        m = self.math
        if m is None:
            return
        if m._column_norms is not None:  # the prepass is complete (what TensorMath.compute does first)
            m.terms.append(ops.DoraColumnsF32(m._magnitude / m._column_norms.norms()))
            m._column_norms = None
        for term in m.terms:
            if isinstance(term, ops.DoraRowsF32):
                scale = term.magnitude[r0 : r0 + acc.shape[0]] / ops.row_norms(acc)
                acc.mul_(scale.view(-1, 1))
                ab.mul_(scale.abs().view(-1, 1))
            elif isinstance(term, ops.DoraColumnsF32):
                acc.mul_(term.scale.view(1, -1))
                ab.mul_(term.scale.abs().view(1, -1))
            elif isinstance(term, ops.RowsTermF32):
                term.apply(acc, r0, scratch)
                for i in term.indices:  # replaced rows are exact (up to the output rounding)
                    if r0 <= i < r0 + ab.shape[0]:
                        ab[i - r0].zero_()
            else:
                term.apply(acc, r0, scratch)
                absolute = self.abs_terms.get(id(term))
                if absolute is not None:
                    absolute.apply(ab, r0, scratch)

    def _tile(self, chunk: Chunk, a: int, b: int, base_rows: torch.Tensor) -> None:
        n = b - a
        r0 = chunk.row_start + a
        acc, scratch, w, ab, o, bound = self._tiles(n)
        w.copy_(base_rows)
        acc.copy_(w)
        ab.zero_()
        self._apply(acc, ab, r0, scratch)
        self._observed(chunk, a, b, o)
        if not (ops._all_finite(o) and ops._all_finite(acc)):
            self._mask_nonfinite(o, acc, w, ab)
        self._tolerance(o, w, acc, ab, bound, scratch, r0, a, chunk)
        err = torch.sub(o, acc, out=scratch).abs_()
        bad = err > bound
        self._block_check(chunk, a, b, acc, ab, bad)
        ratio = err / bound
        self._count(bad, ratio, r0, o, acc, bound)
        self.worst = max(self.worst, float(ratio.max()) if err.numel() else 0.0)
        del ratio
        self.sum_bb += float(torch.linalg.vector_norm(bound, dtype=torch.float64) ** 2)
        q = torch.sub(o, w, out=scratch)
        d = torch.sub(acc, w, out=ab)
        self.sum_qq += float(torch.linalg.vector_norm(q, dtype=torch.float64) ** 2)
        self.sum_dd += float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
        q64, d64 = q.reshape(-1).double(), d.reshape(-1).double()  # float64: the fit below subtracts these sums
        self.sum_qd += float(torch.dot(q64, d64))
        del q64, d64

    def _count(self, bad: torch.Tensor, ratio: torch.Tensor, r0: int, o: torch.Tensor, e: torch.Tensor, bound: torch.Tensor) -> None:
        """Elements out of bound in a tile starting at row r0: counted, their rows counted, the worst kept."""
        n_bad = int(bad.sum())
        if n_bad:
            rows_bad = bad.any(dim=1).nonzero()
            self.bad += n_bad
            self.bad_rows += len(rows_bad)
            if self.first_bad is None:
                self.first_bad = r0 + int(rows_bad[0, 0])
            self.excess.update(ratio, r0, o, e, bound)

    def _block_check(self, chunk, a, b, e, ab, bad) -> None:
        """4-bit outputs check each block's absmax here."""

    def _mask_nonfinite(self, o, e, w, ab) -> None:
        """Non-finite values in OUT where the expectation is finite are faults; elements whose expected
        value is not finite (a non-finite base) cannot be checked and are left out."""
        fin_o, fin_e = torch.isfinite(o), torch.isfinite(e)
        self.nonfinite += int((~fin_o & fin_e).sum())
        skip = ~(fin_o & fin_e & torch.isfinite(w))
        for t in (o, e, w, ab):
            t.masked_fill_(skip, 0.0)

    # -- verdict

    def finish(self) -> tuple[TensorResult, Fault | list[Fault] | None]:
        ok = self.bad == 0 and self.nonfinite == 0
        result = TensorResult(self.tensor.name, self.tensor.op, ok, margin=round(self.worst, 4) if math.isfinite(self.worst) else None,
                              resolvable=self.sum_dd > self.sum_bb)
        if ok:
            return result, None
        return result, self._diagnose()

    def _fault_data(self) -> dict:
        return {"elements_failing": self.bad, "elements": self.rows * self.width, "rows_failing": self.bad_rows,
                "rows": self.rows, "first_row": self.first_bad, **self.excess.data()}

    def _counted(self) -> str:
        return f"{self.bad} of {self.rows * self.width} elements out of bound"

    def _localized(self) -> Fault:
        return Fault("values differ", self.tensor.name,
                     f"values differ: {self._counted()} in {self.bad_rows} of {self.rows} rows ({self.excess.text()}); "
                     "the rest matches base + adapters", self._fault_data())

    def _diagnose(self) -> Fault:
        name = self.tensor.name
        data = self._fault_data()
        counted = self._counted()
        if self.nonfinite:
            return Fault("non-finite", name, f"{self.nonfinite} non-finite value(s) where base + adapters are finite", data)
        if self.sum_qq <= self.sum_bb and self.sum_dd > self.sum_bb:
            return Fault("delta missing", name, f"delta missing: the tensor equals the base (within rounding; {counted})", data)
        c = self.sum_qd / self.sum_dd if self.sum_dd > 0 else 0.0
        resid = max(self.sum_qq - 2 * c * self.sum_qd + c * c * self.sum_dd, 0.0)
        if self.sum_dd > self.sum_bb and resid <= self.sum_bb and abs(c - 1) > 0.01:
            return Fault("scale off", name, f"scale off by {_fmt_factor(c)}× (the delta is applied {_fmt_factor(c)} times; "
                         f"{counted})", {**data, "factor": c})
        if 0 < self.bad_rows <= max(1, int(LOCALIZED_FRACTION * self.rows)):
            return self._localized()
        if self.sum_dd == 0:
            return Fault("wrong delta", name, f"wrong values: {counted} in {self.bad_rows} of {self.rows} rows (first: row "
                         f"{self.first_bad}); the adapters do not change this tensor", data)
        observed, expected = math.sqrt(self.sum_qq), math.sqrt(self.sum_dd)
        corr = self.sum_qd / (observed * expected) if observed > 0 else 0.0
        data.update(correlation=corr, size_ratio=observed / expected)
        return Fault("wrong delta", name, f"wrong delta: the change from the base does not match base + adapters: {counted} "
                     f"in {self.bad_rows} of {self.rows} rows (correlation {corr:.2f}, size {observed / expected:.3g}× the expected)",
                     data)
