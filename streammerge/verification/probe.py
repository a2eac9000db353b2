"""`verify --fast`: the probe test for merged linear weights, which never forms B·A.

Merged linear weights (`W' = W + Σ fᵢ·Bᵢ·Aᵢ`, fᵢ = weight·scale, transposed for fan_in_fan_out):
for p seeded Gaussian probe vectors X (per tensor), every row i of the stored weight gives
`rᵢ = (W'−W)ᵢ·X − Σ fᵢ·colᵢ·(row·X)`, in float64. A correct merge by any tool differs from the
exact value element-wise by at most
  `bᵢⱼ = T·½ulp(W'ᵢⱼ) + T(u + u32)·|W'ᵢⱼ−Wᵢⱼ| [+ u·|Wᵢⱼ| when the base is cast]
        + Σₜ (2u + (r+2)·u32)·|fₜ|·(|col|ᵀ|row|)ᵢⱼ`   (u: the output dtype's unit roundoff, T terms),
which covers rounding once (streammerge, PEFT f32 + cast), rounding after each term or rounding
the delta or the factors to the output dtype first (PEFT on a bf16/f16 model), casting the base
first, and float32 delta arithmetic. Since X is independent of those errors, rᵢ ~ N(0, ‖eᵢ‖²) with
‖eᵢ‖ ≤ σᵢ = ‖bᵢ‖₂ (computed from row norms and a rank×rank Gram matrix). A tensor fails when one
row's rᵢ² exceeds 85·σᵢ², or when Σr² exceeds the Laurent–Massart bound Σσ² + 2√(36·Σσ⁴) + 72·max σ²:
a correct merge trips either with probability below e⁻³⁶ per test. The smallest detectable fault
is a delta error of about u·‖W'ᵢ‖ per row: a bound on a whole row, so a few wrong elements of a
row hide under it (the default element-wise check, `linear`, finds them). A missing delta
is found down to ‖ΔW‖/‖W‖ ≈ 0.5 % in bf16, 3e-7 in f32 on 64×128 weights.

Fault diagnosis for a failing merged tensor, from the same streamed sums: the observed change
q = (W'−W)·X is fitted against each adapter's expected response dₜ (least squares) and against the
transposed delta; "delta missing", "adapter k delta missing", "scale off by 2.0×", "delta
transposed", "values differ in N rows" (localized corruption) or "wrong delta" (`scale_fault` is
shared with the element-wise check).

Memory: three float64 tiles, the largest tensor's factors in float64 and the probes (`verify_layout`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from ..planning.types import OutputTensor
from .base import (
    _F64_EXPONENT_BITS,
    _UNIT_ROUNDOFF,
    CONFIDENCE,
    LOCALIZED_FRACTION,
    ROW_FACTOR,
    U32,
    Chunk,
    Context,
    Fault,
    TensorCheck,
    TensorResult,
    _as_tensor,
    _fmt_factor,
    _torch_dtype,
)

PROBED_KINDS = ("lora", "embedding")  # term kinds whose delta is s·B·A (transposed or not)


def scale_fault(tensor: OutputTensor, coef: list[float], data: dict) -> Fault:
    """The fault when the stored change fits Σ cₜ·(adapter t's delta) but c ≠ 1: one factor for all
    ("scale off by 2.0×"), some adapters at 0 ("delta of adapter 2 missing"), or per adapter."""
    name = tensor.name
    data = {**data, "coefficients": coef}
    if len(coef) == 1 or max(coef) - min(coef) <= 0.01 * max(1.0, max(abs(c) for c in coef)):
        k = coef[0]
        return Fault("scale off", name, f"scale off by {_fmt_factor(k)}× (the delta is applied {_fmt_factor(k)} times)",
                     {**data, "factor": k})
    missing = [i for i, c in enumerate(coef) if abs(c) < 0.01]
    if missing and all(abs(c - 1) < 0.01 for i, c in enumerate(coef) if i not in missing):
        which = ", ".join(str(tensor.loras[i].adapter + 1) for i in missing)
        return Fault("adapter delta missing", name, f"delta of adapter {which} missing (the other adapters' deltas are applied)",
                     {**data, "adapters": [tensor.loras[i].adapter for i in missing]})
    parts = ", ".join(f"adapter {tensor.loras[i].adapter + 1} ×{_fmt_factor(c)}" for i, c in enumerate(coef))
    return Fault("scale off", name, f"adapter weights off: {parts}", data)


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
        from .checks import alignment

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
                from ..ops import expert_factors

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
        return scale_fault(self.tensor, coef, data)
