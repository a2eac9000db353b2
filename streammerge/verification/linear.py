"""The default check of merged linear weights: every element within the rounding any correct tool makes.

`W' = W + Σₜ fₜ·colₜᵀ·rowₜ` (fₜ = adapter weight · scale; col = Bᵀ, row = A, or the transposed pair for
fan_in_fan_out / embedding weights). Per row tile the expected rows E are recomputed in float32 with
one GEMM per term (`addmm`: no FMA chain, so verify costs less than the merge's arithmetic), the stored
rows O are decoded, and every element is compared with its bound

    bᵢⱼ = α·u·2^⌊log₂|Oᵢⱼ|⌋  +  ε·Σₜ |fₜ|·(|colₜ|ᵀ|rowₜ|)ᵢⱼ  [+ u·|Wᵢⱼ| when the base is cast]  + floor

(u: the output dtype's unit roundoff, T terms, r the largest rank):

* α·u·2^⌊log₂|O|⌋ is α half-ulps of O: the rounding of the sum to the output dtype, once or after each
  term (α = 2T − 1 + 4T·u32/u; T = 1: one half-ulp plus the float32 additions, ours and the other
  tool's), for float32 outputs α = 4T − 1 (the additions are the rounding there).
* ε = 4u + (2r + 4)·u32 times Σₜ|fₜ|·Σₖ|colₖᵢ|·|rowₖⱼ| (one more GEMM per term, on the factors'
  absolute values; it bounds |dᵢⱼ| and every rounding made in the products): factors
  rounded to the output dtype (2u), the delta computed in the output dtype and rounded there twice
  (after B·A and after the scale, as PEFT does on a bf16/f16 model: 2u), float32 accumulation of
  r products in any order, the other tool's and ours (2r·u32), and the scale's roundings.
* u·|W| when the base's dtype is not the output's (a tool may cast W first); floor: one subnormal
  spacing of the output dtype per rounding.

A correct merge by streammerge, PEFT (float32, or a bf16 model with float32 or bf16 factors) or any
tool that rounds no worse passes; a single element off by a few ulps more fails, with its tensor,
row, column and the count of elements out of bound.

A failing tensor is read once more (its diagnosis pass; passing tensors never pay for it), with
float64 sums over q = O − W, each term's dₜ and, for square weights, the transposed delta:
"delta missing", "scale off by 2.0×", "delta of adapter 2 missing", "delta transposed",
"values differ: N of M elements out of bound …" (localized: the observed change matches the
expected one in all but a few places, or at most 5 % of the rows fail), or "wrong delta". Hypotheses
are tested only when the fault is large in sum (Σ(O − E)² > Σb²): a few wrong elements are named as
such, never mistaken for a wrong scale.

Memory: the recompute tiles of `checks` (six float32 tiles of `rtile_elements`, their
temporaries), the terms' float32 factors and their absolute values (`checks.state_bytes`).
"""

from __future__ import annotations

import math

import torch

from .base import LOCALIZED_FRACTION, U32, Chunk, Context, Fault, TensorResult
from .checks import RecomputeCheck
from .probe import scale_fault

_F32_EXPONENT_BITS = 0x7F800000
GRAM_BLOCK = 1 << 16  # columns of a factor turned into float64 at a time (the Gram of Σd²)


class LinearElementCheck(RecomputeCheck):
    """A plain linear LoRA merge, element by element (see the module docstring)."""

    category = "merge"

    def __init__(self, tensor, ctx: Context):
        super().__init__(tensor, ctx)
        self.category = "merge"
        self.lora = list(self.math.terms)  # ops.LoraTermF32, in application order
        n_terms = len(self.lora)
        rank = max(t.rank for t in self.lora)
        u = self.u
        if tensor.dtype == "F32":
            alpha = 4 * n_terms - 1
        else:
            alpha = 2 * n_terms - 1 + 4 * n_terms * U32 / u
        self.alpha_u = alpha * u
        eps = 4 * u + (2 * rank + 4) * U32
        self.bound_floor = 2 * n_terms * self.floor
        # the bound's delta part: Σₜ ε|fₜ|·|colₜ|ᵀ|rowₜ| (float32 copies of |col| and |row|)
        self.abs_factors = [(t.col.abs(), t.row.abs(), eps * abs(t.factor)) for t in self.lora]
        self.sum_dd = self._delta_energy()
        self.square = self.rows == self.width
        self.diagnosing = False
        self.passes = 0

    def _abs_terms(self, terms) -> dict:
        return {}  # |col|ᵀ|row| is a GEMM here (abs_factors), not the chain of RecomputeCheck

    def _delta_energy(self) -> float:
        """Σ d² over the whole tensor, d = Σₜ fₜ·colₜᵀ·rowₜ, from rank × rank Gram matrices (float64)."""
        total = 0.0
        for i, t in enumerate(self.lora):
            for j, s in enumerate(self.lora[: i + 1]):
                g_row = t.row.double() @ s.row.double().T
                g_col = torch.zeros_like(g_row)
                for c0 in range(0, self.rows, GRAM_BLOCK):
                    g_col += t.col[:, c0:c0 + GRAM_BLOCK].double() @ s.col[:, c0:c0 + GRAM_BLOCK].double().T
                part = float((g_row * g_col).sum()) * t.factor * s.factor
                total += part if i == j else 2 * part
        return max(total, 0.0)

    # -- the tile math

    def _expected(self, acc: torch.Tensor, r0: int) -> None:
        """acc: W -> E, one GEMM per term."""
        n = acc.shape[0]
        for t in self.lora:
            acc.addmm_(t.col[:, r0:r0 + n].T, t.row, alpha=t.factor)

    def _bound(self, o: torch.Tensor, bound: torch.Tensor, r0: int, base_abs: torch.Tensor | None) -> None:
        bound.copy_(o)
        bound.view(torch.int32).bitwise_and_(_F32_EXPONENT_BITS)  # 2^⌊log₂|o|⌋ (inf for non-finite o)
        n = o.shape[0]
        for k, (col_abs, row_abs, scale) in enumerate(self.abs_factors):
            bound.addmm_(col_abs[:, r0:r0 + n].T, row_abs, beta=self.alpha_u if k == 0 else 1.0, alpha=scale)
        bound.add_(self.bound_floor)
        if base_abs is not None:
            bound.add_(base_abs, alpha=self.cast_u)

    def _rows(self, chunk: Chunk, a: int, b: int, base_rows: torch.Tensor):
        """(acc = E, o = O, bound, scratch) for rows [a, b) of the chunk; scratch holds |W| when the base is cast."""
        n = b - a
        r0 = chunk.row_start + a
        acc, scratch, o, bound = self._tiles(n)[:4]
        acc.copy_(base_rows)
        base_abs = torch.abs(acc, out=scratch) if self.cast_u else None
        self._expected(acc, r0)
        self._observed(chunk, a, b, o)
        self._bound(o, bound, r0, base_abs)
        return acc, o, bound, scratch

    def feed(self, chunk: Chunk) -> None:
        base = self.base.rows(chunk.base, chunk.row_start, chunk.row_start + chunk.rows)
        step = self._tile_rows()
        tile = self._diagnosis_tile if self.diagnosing else self._tile
        for a in range(0, chunk.rows, step):
            b = min(chunk.rows, a + step)
            tile(chunk, a, b, base[a:b])

    def _tile(self, chunk: Chunk, a: int, b: int, base_rows: torch.Tensor) -> None:
        r0 = chunk.row_start + a
        acc, o, bound, scratch = self._rows(chunk, a, b, base_rows)
        self.sum_bb += float(torch.linalg.vector_norm(bound)) ** 2
        ratio = torch.sub(o, acc, out=scratch).abs_().div_(bound)
        worst = float(ratio.max()) if ratio.numel() else 0.0
        if worst <= 1.0:  # the common case: every element within its bound (NaN fails this test)
            self.worst = max(self.worst, worst)
            return
        if not (math.isfinite(worst) and bool(torch.isfinite(o).all() and torch.isfinite(acc).all())):
            fin_o, fin_e = torch.isfinite(o), torch.isfinite(acc)
            self.nonfinite += int((~fin_o & fin_e).sum())
            ratio.masked_fill_(~(fin_o & fin_e), 0.0)  # a non-finite expectation cannot be checked
        bad = ratio > 1.0
        self.worst = max(self.worst, float(ratio.max()))
        self._count(bad, ratio, r0, o, acc, bound)

    # -- diagnosis: one more pass over a failing tensor

    def again(self) -> bool:
        self.passes += 1
        if self.passes > 1 or self.nonfinite or (self.bad == 0):
            return False
        self.diagnosing = True
        n = len(self.lora)
        self.d_qq = self.d_rr = self.d_bb = self.d_tt = 0.0
        self.d_qd = torch.zeros(n, dtype=torch.float64)
        self.d_gram = torch.zeros(n, n, dtype=torch.float64)
        return True

    def _diagnosis_tile(self, chunk: Chunk, a: int, b: int, base_rows: torch.Tensor) -> None:
        r0 = chunk.row_start + a
        n = b - a
        acc, o, bound, _ = self._rows(chunk, a, b, base_rows)
        spare = self._tiles(n)[4]
        w = base_rows.to(device=o.device, dtype=torch.float64)
        finite = torch.isfinite(o) & torch.isfinite(acc) & torch.isfinite(w)
        q = o.double().sub_(w).masked_fill_(~finite, 0.0)  # the observed change
        self.d_qq += float(q.square().sum())
        self.d_rr += float((o.double() - acc.double()).masked_fill_(~finite, 0.0).square().sum())  # Σ(O − E)²
        self.d_bb += float(bound.double().masked_fill_(~finite, 0.0).square().sum())
        deltas = []
        for t in self.lora:  # each term's delta, float32 GEMM, summed in float64
            torch.mm(t.col[:, r0:r0 + n].T, t.row, out=spare).mul_(t.factor)
            deltas.append(spare.double().masked_fill_(~finite, 0.0).reshape(-1))
        q = q.reshape(-1)
        for i, d in enumerate(deltas):
            self.d_qd[i] += float(torch.dot(q, d))
            for j in range(i + 1):
                g = float(torch.dot(d, deltas[j]))
                self.d_gram[i, j] += g
                if i != j:
                    self.d_gram[j, i] += g
        del deltas
        if self.square:  # the transposed delta: rows r0.. of (Σ f·colᵀ·row)ᵀ = Σ f·rowᵀ[r0..]·col
            spare.zero_()
            for t in self.lora:
                spare.addmm_(t.row[:, r0:r0 + n].T, t.col, alpha=t.factor)
            self.d_tt += float((q - spare.double().masked_fill_(~finite, 0.0).reshape(-1)).square().sum())

    # -- verdict

    def finish(self) -> tuple[TensorResult, Fault | list[Fault] | None]:
        ok = self.bad == 0 and self.nonfinite == 0
        margin = round(self.worst, 4) if math.isfinite(self.worst) else None
        result = TensorResult(self.tensor.name, "merge", ok, margin=margin, resolvable=self.sum_dd > self.sum_bb)
        return result, None if ok else self._diagnose()

    def _diagnose(self) -> Fault:
        name = self.tensor.name
        data = self._fault_data()
        counted = self._counted()
        if self.nonfinite:
            return Fault("non-finite", name, f"{self.nonfinite} non-finite value(s) where base + adapters are finite "
                         f"({counted})", data)
        if not self.diagnosing:
            return self._localized()
        thr = self.d_bb
        expected2 = float(self.d_gram.sum())
        localized = 0 < self.bad_rows <= max(1, int(LOCALIZED_FRACTION * self.rows))
        data["residual_over_bound"] = math.sqrt(self.d_rr / thr) if thr > 0 else None
        if self.d_rr <= thr or (localized and self.d_rr <= 4 * thr):
            return self._localized()  # a few wrong elements: no hypothesis about the whole tensor applies
        if self.d_qq <= thr and expected2 > thr:
            return Fault("delta missing", name, f"delta missing: the weight equals the base weight (within rounding; "
                         f"{counted})", data)
        coef, resid = self._fit()
        if coef is not None and resid <= thr and max(abs(c - 1) for c in coef) > 0.01:
            fault = scale_fault(self.tensor, coef, data)
            fault.message += f" ({counted})"
            return fault
        if self.square and self.d_tt <= thr:
            return Fault("delta transposed", name, f"delta transposed: the weight is W + (s·B·A)ᵀ ({counted})", data)
        if localized:
            return self._localized()
        observed, expected = math.sqrt(self.d_qq), math.sqrt(expected2)
        if expected == 0:
            return Fault("wrong delta", name, f"wrong delta: the weight differs from the base but the adapters' delta is "
                         f"zero ({counted})", data)
        corr = float(self.d_qd.sum()) / (observed * expected) if observed > 0 else 0.0
        data.update(correlation=corr, size_ratio=observed / expected)
        return Fault("wrong delta", name, f"wrong delta: the change from the base does not match base + adapters: {counted} "
                     f"in {self.bad_rows} of {self.rows} rows (correlation {corr:.2f}, size {observed / expected:.3g}× the "
                     f"expected)", data)

    def _fit(self) -> tuple[list[float] | None, float]:
        """Least-squares coefficients c with q ≈ Σ cₜ·dₜ, and the residual Σ(q − Σcₜdₜ)²."""
        if float(self.d_gram.diagonal().min()) <= 0:
            return None, math.inf
        coef = torch.linalg.pinv(self.d_gram) @ self.d_qd
        resid = self.d_qq - float(coef @ self.d_qd)
        return [float(c) for c in coef], max(resid, 0.0)

