"""Verify checks beyond the probe test: element-wise recomputation and 4-bit outputs.

The probe test (`verifier.LinearLoraCheck`) covers `W' = W + Σ f·B·A`. Everything else a plan can
ask for is checked here by recomputing the expected rows in float32 with the merge's pure math
(`terms.TensorMath` / `ops`, which are chunk-invariant), streaming row tiles, and comparing element by
element with a bound that any correct tool's output meets:

* `RecomputeCheck` (DoRA, MoE experts, lora_bias, trainable-token rows, dequantized bitsandbytes bases,
  and LoRA merges onto them when they are not probed): with E the exact float32 expectation,
  `|O − E| ≤ T·½ulp(O) + ε·Σ|f|·(|col|ᵀ|row|) + T(u+u32)·|O − W| [+ u·|W| cast] [+ ρ·|E| DoRA] + floor`,
  ε = 2u + (r+2)·u32 (factors rounded to the output dtype, float32 rank-r accumulation in any
  order), ρ = 4u + n·u32 (a DoRA norm over n elements summed in any order, then divided), the
  |col|ᵀ|row| products carried through DoRA's rescaling by |m/‖·‖|. Our own outputs equal round(E).
* `QuantWeightCheck` (merged_4bit packed weight): OUT's codes are dequantized with OUT's own absmax
  and quant state, O = c_k·â (rounded to the quant-state dtype), and compared with E = W + Δ:
  quantizing x with block absmax a picks the code nearest x/a, so `|x − c_k·a| ≤ h_k·a` where h_k is
  the larger distance from c_k to the edges of its decision interval (midpoints to its neighbours,
  ±1 at the ends). With the stored absmax â within e_a of a (e_a: the 8-bit double-quant step
  nested_absmax·(largest gap of the dynamic map), or float32 slack without double quant):
  `|O − E| ≤ h_k·(â + e_a) + |c_k|·e_a + ½ulp(O) + ε·Σ|f|(|col|ᵀ|row|) + 2u32·|E| + floor`.
  Each block's â is also checked against max|E| of the block (±e_a + slack). A fault is seen where it
  exceeds that quantization step: a wrong delta much smaller than ~h·absmax (≈ 5–10 % of the block's
  largest value for nf4) cannot be told from quantization noise.
* `QuantPartCheck`: quant_map / nested_quant_map equal bitsandbytes' code books, the quant-state JSON
  parses and matches the planned format; absmax / nested_absmax are checked with their weight.

Diagnosis uses streamed sums over q = O − W (observed change) and d = E − W (expected change) against
Σb² (b: the bound): Σq² ≤ Σb² "delta missing"; a least-squares factor c with Σ(q − c·d)² ≤ Σb²
"scale off by c×"; failures confined to a few rows "values differ in N rows"; else "wrong delta".
"""

from __future__ import annotations

import json
import math

import torch

from . import ops
from .io.safetensors import FROM_TORCH_NAME, ITEMSIZE
from .planner import OutputTensor
from .quant import bnb4
from .quant import stream as qs
from .terms import TensorMath, factor_bytes, needs_prepass
from .verifier import (
    LOCALIZED_FRACTION, U32, _UNIT_ROUNDOFF, Chunk, Context, Fault, TensorCheck, TensorResult, _fmt_factor,
    _rows_and_width, _torch_dtype,
)

RTILES = 6  # float32 work tiles of a recompute check: acc, scratch, W, |Δ| bound, O, bound
# bytes per tile element: the tiles, and the per-tile temporaries (float64 sums, masks, 4-bit codes and
# their per-element bounds, the dequantized codes) that live while one tile is compared
RTILE_BYTES = RTILES * 4 + 96
_F32_EXPONENT_BITS = 0x7F800000
DYNAMIC_MAP_GAP = 0.0141  # largest gap between adjacent values of bitsandbytes' 8-bit dynamic map (0.01406)


def base_dtype_name(t: OutputTensor) -> str:
    """Safetensors dtype of the base rows the math starts from (a decoded source: what bitsandbytes returns)."""
    if t.quant_in is not None:
        if t.quant_in.codec == "bnb4":
            return FROM_TORCH_NAME[bnb4.Bnb4Format.from_json(t.quant_in.format).dtype]
        return "F32"  # int8_vectorwise_dequant returns float32
    return t.source.dtype


def base_row_bytes(t: OutputTensor) -> int:
    width = _rows_and_width(t.weight_shape)[1]
    if t.quant_in is not None:
        return -(-width // 2) + 1 if t.quant_in.codec == "bnb4" else width
    return width * ITEMSIZE[t.source.dtype]


def out_row_bytes(t: OutputTensor) -> int:
    width = _rows_and_width(t.weight_shape)[1]
    if t.quant_out is not None:
        return -(-width // 2) + 1 if t.quant_out.part == "weight" else 0
    return width * ITEMSIZE[t.dtype]


def alignment(t: OutputTensor) -> int:
    return qs.row_alignment(t) if qs.involves_quant(t) else 1


def decoded_row_bytes(t: OutputTensor) -> int:
    """float32 rows a chunk decodes to at once (bitsandbytes / round-trip sources), beyond the raw bytes."""
    width = _rows_and_width(t.weight_shape)[1]
    return 2 * 4 * width if (t.quant_in is not None or t.roundtrip is not None) else 0


def state_bytes(t: OutputTensor) -> int:
    """Per-tensor memory of a recompute check: factors (and their absolute values), decoded statistics."""
    total = 2 * factor_bytes(t) + qs.state_bytes(t)
    if t.quant_out is not None:
        n_blocks = -(-math.prod(t.quant_out.shape) // t.quant_out.blocksize)
        total += n_blocks * (4 + 4 + 4 + 4)  # stored absmax, decoded, e_a, block temporaries
    if needs_prepass(t):
        total += 8 * _rows_and_width(t.weight_shape)[1]
    return total


# ------------------------------------------------------------------------------------ base rows


class BaseRows:
    """The base side of one tensor, a row range at a time: the bytes to read and the rows they decode to
    (stored dtype for plain sources; float32 for bitsandbytes and round-tripped ones, as merge sees them)."""

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.t = tensor
        self.width = _rows_and_width(tensor.weight_shape)[1]
        self.decoder = qs.Decoder(tensor, ctx.load, ctx.device) if tensor.quant_in is not None else None
        self.roundtrip = qs.RoundTrip(tensor, ctx.device) if tensor.roundtrip is not None else None
        self.dtype = base_dtype_name(tensor)

    @property
    def needs_stats(self) -> bool:
        return self.roundtrip is not None and self.roundtrip.needs_stats

    def span(self, r0: int, r1: int) -> tuple[int, int]:
        return qs.source_span(self.t, r0, r1)

    def rows(self, view: memoryview, r0: int, r1: int, raw: bool = False) -> torch.Tensor:
        n = r1 - r0
        length = self.span(r0, r1)[1]
        data = torch.frombuffer(view, dtype=torch.uint8, count=length) if length else torch.empty(0, dtype=torch.uint8)
        if self.decoder is not None:
            return self.decoder.rows(data, r0, r1)
        base = data.view(_torch_dtype(self.t.source.dtype)).reshape(n, self.width)
        if self.roundtrip is not None and not raw:
            return self.roundtrip.rows(base, r0)
        return base


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
        self.abs_terms = {id(t): _abs_term(t) for t in terms}
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
        self.floor = torch.finfo(torch.float32).tiny
        # streamed sums
        self.sum_qq = self.sum_qd = self.sum_dd = self.sum_bb = 0.0
        self.bad = 0
        self.bad_rows = 0
        self.first_bad: int | None = None
        self.worst = 0.0
        self.nonfinite = 0

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
        n_bad = int(bad.sum())
        if n_bad:
            rows_bad = bad.any(dim=1).nonzero()
            self.bad += n_bad
            self.bad_rows += len(rows_bad)
            if self.first_bad is None:
                self.first_bad = r0 + int(rows_bad[0, 0])
        self.worst = max(self.worst, float((err / bound).max()) if err.numel() else 0.0)
        self.sum_bb += float(torch.linalg.vector_norm(bound, dtype=torch.float64) ** 2)
        q = torch.sub(o, w, out=scratch)
        d = torch.sub(acc, w, out=ab)
        self.sum_qq += float(torch.linalg.vector_norm(q, dtype=torch.float64) ** 2)
        self.sum_dd += float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
        q64, d64 = q.reshape(-1).double(), d.reshape(-1).double()  # float64: the fit below subtracts these sums
        self.sum_qd += float(torch.dot(q64, d64))
        del q64, d64

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

    def _diagnose(self) -> Fault:
        name = self.tensor.name
        data = {"elements_failing": self.bad, "rows_failing": self.bad_rows, "rows": self.rows, "first_row": self.first_bad}
        if self.nonfinite:
            return Fault("non-finite", name, f"{self.nonfinite} non-finite value(s) where base + adapters are finite", data)
        if self.sum_qq <= self.sum_bb and self.sum_dd > self.sum_bb:
            return Fault("delta missing", name, "delta missing: the tensor equals the base (within rounding)", data)
        c = self.sum_qd / self.sum_dd if self.sum_dd > 0 else 0.0
        resid = max(self.sum_qq - 2 * c * self.sum_qd + c * c * self.sum_dd, 0.0)
        if self.sum_dd > self.sum_bb and resid <= self.sum_bb and abs(c - 1) > 0.01:
            return Fault("scale off", name, f"scale off by {_fmt_factor(c)}× (the delta is applied {_fmt_factor(c)} times)",
                         {**data, "factor": c})
        if 0 < self.bad_rows <= max(1, int(LOCALIZED_FRACTION * self.rows)):
            return Fault("values differ", name, f"values differ in {self.bad_rows} of {self.rows} rows (first: row "
                         f"{self.first_bad}); the rest matches base + adapters", data)
        if self.sum_dd == 0:
            return Fault("wrong delta", name, f"wrong values in {self.bad_rows} of {self.rows} rows (first: row "
                         f"{self.first_bad}); the adapters do not change this tensor", data)
        observed, expected = math.sqrt(self.sum_qq), math.sqrt(self.sum_dd)
        corr = self.sum_qd / (observed * expected) if observed > 0 else 0.0
        data.update(correlation=corr, size_ratio=observed / expected)
        return Fault("wrong delta", name, f"wrong delta: the change from the base does not match base + adapters in "
                     f"{self.bad_rows} of {self.rows} rows (correlation {corr:.2f}, size {observed / expected:.3g}× the expected)",
                     data)


# ------------------------------------------------------------------------------------ 4-bit output


def _code_bounds(code: torch.Tensor) -> torch.Tensor:
    """h_k: the largest |x − c_k| for x in [-1, 1] that the nearest-code rule maps to code k."""
    vals = code.float().reshape(-1)
    order = torch.argsort(vals)
    s = vals[order]
    lo = torch.cat([torch.tensor([-1.0]), (s[:-1] + s[1:]) / 2])
    hi = torch.cat([(s[:-1] + s[1:]) / 2, torch.tensor([1.0])])
    h_sorted = torch.maximum(s - lo, hi - s).clamp_min(0)
    h = torch.empty_like(vals)
    h[order] = h_sorted
    return h


class QuantWeightCheck(RecomputeCheck):
    """The packed weight of a merged_4bit output, dequantized with OUT's own statistics, against W + Δ
    within the quantization step of its block (see the module docstring)."""

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.qo = tensor.quant_out
        self.broken: str | None = None
        super().__init__(tensor, ctx)
        self.category = "quant"
        self.absmax_bad = 0
        self.first_absmax_bad: int | None = None
        self.bad_outside_absmax = 0  # failing elements in blocks whose absmax is right
        self._load_stats()

    def _unit_roundoff(self) -> float:
        return _UNIT_ROUNDOFF.get(FROM_TORCH_NAME.get(self.qo.dtype, "BF16"), 2.0**-8)

    def _value_dtype(self) -> str:
        return FROM_TORCH_NAME.get(self.qo.dtype, "BF16")

    def _load_stats(self) -> None:
        w = self.qo.weight
        names = bnb4.companion_names(w, self.qo.double_quant, self.qo.quant_type)
        tensors = {}
        for n in names:
            t = self.ctx.out_tensor(n)
            if t is None:
                self.broken = f"its statistic tensor {n} is missing or misshapen"
                return
            tensors[n] = t
        tensors[w] = torch.empty(self.tensor.shape, dtype=_torch_dtype(self.tensor.dtype), device="meta")
        qm = f"{w}.quant_map"  # dequantize_4bit uses its own code book; the stored one is QuantPartCheck's
        tensors[qm] = torch.empty(tuple(tensors[qm].shape), dtype=tensors[qm].dtype, device="meta")
        try:
            fmt = bnb4.parse_bnb4(w, tensors)
            if (fmt.quant_type, fmt.blocksize, tuple(fmt.shape), fmt.nested) != (
                    self.qo.quant_type, self.qo.blocksize, tuple(self.qo.shape), self.qo.double_quant):
                raise ValueError(f"its quant state describes {fmt.quant_type} blocksize {fmt.blocksize} shape "
                                 f"{list(fmt.shape)} double quant {fmt.nested}, expected {self.qo.quant_type} blocksize "
                                 f"{self.qo.blocksize} shape {list(self.qo.shape)} double quant {self.qo.double_quant}")
            nested = [tensors.get(f"{w}.nested_absmax"), tensors.get(f"{w}.nested_quant_map")]
            self.absmax = bnb4.decode_absmax(fmt, tensors[f"{w}.absmax"], *nested).float().to(self.ctx.device)
        except (ValueError, RuntimeError) as exc:
            self.broken = str(exc)
            return
        self.fmt = fmt
        self.u = _UNIT_ROUNDOFF.get(FROM_TORCH_NAME.get(fmt.dtype, "BF16"), 2.0**-8)
        code = bnb4.codebook(fmt.quant_type)
        self.code = code.to(self.ctx.device)
        self.h = _code_bounds(code).to(self.ctx.device)
        self.code_abs = code.abs().to(self.ctx.device)
        if fmt.nested:
            groups = torch.arange(fmt.n_blocks) // fmt.nested_blocksize
            na = tensors[f"{w}.nested_absmax"].float().abs()
            self.e_a = (na[groups] * DYNAMIC_MAP_GAP + 4 * U32 * (self.absmax.cpu().abs() + abs(float(fmt.nested_offset)))).to(self.ctx.device)
        else:
            self.e_a = (4 * U32 * self.absmax.abs())

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        e0, e1 = r0 * self.width, r1 * self.width
        return e0 // 2, (e1 + 1) // 2 - e0 // 2

    def feed(self, chunk: Chunk) -> None:
        if self.broken is None:
            super().feed(chunk)

    def _blocks(self, chunk: Chunk, a: int, b: int) -> tuple[int, int, int]:
        e0 = (chunk.row_start + a) * self.width
        k = (b - a) * self.width
        return e0 // self.fmt.blocksize, -(-(e0 + k) // self.fmt.blocksize), k

    def _codes(self, chunk: Chunk, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        off = (a * self.width) // 2
        k = (b - a) * self.width
        packed = torch.frombuffer(chunk.out, dtype=torch.uint8, count=len(chunk.out))[off : off + (k + 1) // 2]
        nib = torch.stack(((packed >> 4), (packed & 15)), dim=1).reshape(-1)[:k].long()
        return packed, nib

    def _observed(self, chunk: Chunk, a: int, b: int, o: torch.Tensor) -> None:
        blk0, blk1, k = self._blocks(chunk, a, b)
        packed, _ = self._codes(chunk, a, b)
        o.view(-1).copy_(bnb4.dequantize_range(self.fmt, packed.to(self.ctx.device), self.absmax[blk0:blk1], self.code, k))

    def _per_element(self, v: torch.Tensor, k: int) -> torch.Tensor:
        return v.repeat_interleave(self.fmt.blocksize)[:k]

    def _tolerance(self, o, w, e, ab, bound, scratch, r0, a, chunk) -> None:
        b = a + o.shape[0]
        blk0, blk1, k = self._blocks(chunk, a, b)
        _, nib = self._codes(chunk, a, b)
        nib = nib.to(self.ctx.device)
        amax = self._per_element(self.absmax[blk0:blk1], k).view_as(o)
        e_a = self._per_element(self.e_a[blk0:blk1], k).view_as(o)
        bound.copy_(self.h[nib].view_as(o) * (amax.abs() + e_a))
        bound.add_(self.code_abs[nib].view_as(o) * e_a)
        bound.add_(_half_ulp(o, self.u, scratch))
        bound.add_(ab, alpha=self.eps)
        bound.add_(scratch.copy_(e).abs_(), alpha=2 * U32 + self.rho)
        bound.add_(self.floor)

    def _block_check(self, chunk, a, b, e, ab, bad) -> None:
        """Each block's stored absmax against max|E| of the block."""
        blk0, blk1, k = self._blocks(chunk, a, b)
        bs = self.fmt.blocksize
        nb = blk1 - blk0
        pad = nb * bs - k

        def per_block(x: torch.Tensor, reduce) -> torch.Tensor:
            flat = x.reshape(-1)
            if pad:
                flat = torch.nn.functional.pad(flat, (0, pad))
            return reduce(flat.view(nb, bs))

        a_e = per_block(e.abs(), lambda v: v.amax(dim=1))
        slack = per_block(ab * self.eps + e.abs() * (2 * U32), lambda v: v.amax(dim=1))
        stored = self.absmax[blk0:blk1]
        wrong = (stored - a_e).abs() > self.e_a[blk0:blk1] + slack + self.floor
        wrong_blocks = wrong.nonzero()
        if len(wrong_blocks):
            self.absmax_bad += len(wrong_blocks)
            if self.first_absmax_bad is None:
                self.first_absmax_bad = blk0 + int(wrong_blocks[0, 0])
        bad_blocks = per_block(bad, lambda v: v.any(dim=1))
        self.bad_outside_absmax += int((bad_blocks & ~wrong).sum())

    def finish(self):
        name = self.tensor.name
        if self.broken is not None:
            return TensorResult(name, "quant", False), Fault("unreadable", name, f"cannot check the 4-bit weight: {self.broken}")
        result, fault = super().finish()
        if self.absmax_bad == 0:
            return result, fault
        result.ok = False
        absmax_name = f"{self.qo.weight}.absmax"
        absmax_fault = Fault(
            "absmax differs", absmax_name,
            f"block absmax differs from max|W + Δ| in {self.absmax_bad} of {self.fmt.n_blocks} blocks (first: block "
            f"{self.first_absmax_bad}){' (decoded with nested_absmax and the quant state)' if self.fmt.nested else ''}",
            {"blocks": self.absmax_bad, "first_block": self.first_absmax_bad},
        )
        if fault is not None and fault.kind in ("delta missing", "scale off", "wrong delta", "non-finite"):
            return result, fault  # the statistics follow from the wrong values
        if fault is not None and self.bad_outside_absmax:
            return result, [fault, absmax_fault]
        return result, absmax_fault


class QuantPartCheck(TensorCheck):
    """A statistic tensor of a merged_4bit weight: code books and the quant-state JSON by value; absmax
    and nested_absmax are checked with their weight (QuantWeightCheck)."""

    SMALL = ("quant_map", "nested_quant_map", "quant_state")

    def __init__(self, tensor: OutputTensor, ctx: Context):
        super().__init__(tensor, ctx)
        self.qo = tensor.quant_out
        self.category = "quant_stats"
        self.data = bytearray()

    def _base_rows(self):
        return None

    def feed(self, chunk: Chunk) -> None:
        if self.qo.part in self.SMALL:
            self.data += chunk.out

    def finish(self):
        name, part = self.tensor.name, self.qo.part
        result = TensorResult(name, "quant", True)
        problem = None
        if part in ("quant_map", "nested_quant_map"):
            want = qs.constant_part(self.qo)
            got = torch.frombuffer(self.data, dtype=torch.float32) if self.data else torch.empty(0)
            if not torch.equal(got, want.reshape(-1)):
                problem = Fault("bytes differ", name, f"{part} is not bitsandbytes' "
                                f"{self.qo.quant_type if part == 'quant_map' else '8-bit dynamic'} code book")
        elif part == "quant_state":
            problem = self._quant_state()
        if problem is not None:
            result.ok = False
        return result, problem

    def _quant_state(self) -> Fault | None:
        qo, name = self.qo, self.tensor.name
        try:
            d = json.loads(bytes(self.data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Fault("quant state differs", name, f"quant-state JSON does not parse ({exc})")
        if not isinstance(d, dict):
            return Fault("quant state differs", name, "quant-state JSON is not an object")
        want = {"quant_type": qo.quant_type, "blocksize": qo.blocksize, "dtype": qo.dtype, "shape": list(qo.shape)}
        if qo.double_quant:
            want.update(nested_blocksize=bnb4.NESTED_BLOCKSIZE, nested_dtype="float32")
        wrong = [f"{k} {d.get(k)!r} (expected {v!r})" for k, v in want.items() if d.get(k) != v]
        keys = set(want) | ({"nested_offset"} if qo.double_quant else set())
        if set(d) != keys:
            wrong.append(f"keys {sorted(d)} (expected {sorted(keys)})")
        if qo.double_quant and not isinstance(d.get("nested_offset"), (int, float)):
            wrong.append(f"nested_offset {d.get('nested_offset')!r}")
        if wrong:
            return Fault("quant state differs", name, "quant state differs: " + "; ".join(wrong))
        return None


def check_class(t: OutputTensor) -> type[TensorCheck] | None:
    """The check for one planned tensor (None: this verifier cannot check it)."""
    from .verifier import PROBED_KINDS, BytesCheck, CastCheck, LinearLoraCheck, ReplaceCheck

    if t.quant_in is not None and t.quant_in.codec not in ("bnb4", "int8"):
        return None
    if any(term.kind not in KNOWN_KINDS for term in t.loras):
        return None
    if t.op == "quant":
        if t.quant_out is None:
            return None
        return QuantWeightCheck if t.quant_out.part == "weight" else QuantPartCheck
    if t.op == "merge":
        probed = all(term.kind in PROBED_KINDS for term in t.loras) and t.loras
        return LinearLoraCheck if probed else RecomputeCheck
    if t.op in ("bias_add", "token_rows", "dequant"):
        return RecomputeCheck
    return {"copy": BytesCheck, "cast": CastCheck, "replace": ReplaceCheck}.get(t.op)


KNOWN_KINDS = ("lora", "embedding", "dora", "moe", "bias", "token_rows")
