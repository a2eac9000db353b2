"""Encoded tensors (GGUF's types, a registered codec's): the stored rows against the codec's encoding
of the float32 rows a correct writer stores, whichever container holds them.

Per row chunk: the expected float32 rows (the merge's own math, then the container's row transform)
are encoded with the tensor's codec. Equal bytes pass exactly (every file streammerge writes);
otherwise the stored rows are decoded and each element compared with the expected value within the
codec's `tolerance` (its rounding or quantization step, plus one 16-bit rounding of the merge for
tools that round first). An unmerged tensor of a deterministic codec (a plain cast) must be
byte-exact. A merged tensor must also pass a correlation test: the error R = stored − expected may
not line up with the delta D (|Σ R·D| ≤ z·√Σ tol²·D², z² = 72), which finds a missing or rescaled
delta far below the per-element tolerance. Such tolerated tensors pass with a note.

A failing tensor is diagnosed by testing the alternatives on the same chunks: "not permuted" /
"permutation wrong" (q/k), "norm +1 missing" (Gemma), "delta missing", "scale off by k×" (a
least-squares fit of stored − base against the delta), "values differ" (N rows) and "wrong delta".
The q/k permutation here is the verifier's own (by explicit row index), not the executor's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import ops
from ..formats import codecs
from ..planning import streaming as qs
from ..planning.types import OutputTensor
from .report import Fault, TensorResult
from .base import CONFIDENCE, LOCALIZED_FRACTION, BaseRows, Chunk, Context, TensorCheck, _fmt_factor, _rows_and_width

Z2 = 2 * CONFIDENCE  # correlation test: |Σ R·D| ≤ √(Z2 · Σ tol²·D²)


@dataclass(frozen=True)
class EncodedSpec:
    """What the evidence needs to know of a tensor: its name, codec, logical rows and row transform."""

    name: str
    encoding: str
    rows: int
    width: int
    permute_heads: int = 0
    shift: float = 0.0

    @classmethod
    def of(cls, t: OutputTensor) -> "EncodedSpec":
        rows, width = _rows_and_width(t.weight_shape)
        transform = t.transform
        return cls(t.name, t.encoding, rows, width, transform.permute_heads if transform else 0,
                   transform.shift if transform else 0.0)


def other_head_counts(permute_heads: int, config_heads: tuple[int, ...]) -> tuple[int, ...]:
    """Head counts a wrong q/k permutation may have used: the config's, and twice or half the right one."""
    if not permute_heads:
        return ()
    return tuple(sorted(set(config_heads) | {2 * permute_heads, permute_heads // 2} - {0}))


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k permutation (HF rotate-half -> Meta interleaved) by explicit row index:
    result row h·d + 2j + i is input row h·d + i·d/2 + j."""
    return rows[_permutation(rows.shape[0], heads, rows.device)]


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `permute_rows`."""
    out = torch.empty_like(rows)
    out[_permutation(rows.shape[0], heads, rows.device)] = rows
    return out


def _permutation(n: int, heads: int, device) -> torch.Tensor:
    d = n // heads
    h = torch.arange(heads, device=device).view(heads, 1, 1)
    j = torch.arange(d // 2, device=device).view(1, d // 2, 1)
    i = torch.arange(2, device=device).view(1, 1, 2)
    return (h * d + i * (d // 2) + j).reshape(-1)


def bad_elements(stored: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Mask of elements beyond tolerance (non-finite values must match exactly)."""
    ok = (stored - expected).abs() <= tol
    ok |= stored == expected
    ok |= torch.isnan(stored) & torch.isnan(expected)
    return ~ok


# ----------------------------------------------------------------------------- per-tensor check


@dataclass
class EncodedEvidence:
    """Streamed evidence about one encoded tensor (sums in float64 on the host)."""

    tensor: EncodedSpec
    codec: Any  # formats.codecs.base.Codec
    merged: bool
    other_heads: tuple[int, ...] = ()  # head counts a wrong q/k permutation may have used
    exact: bool = True
    bad_elements: int = 0
    bad_rows: int = 0
    first_bad_row: int | None = None
    worst: float = 0.0  # max |stored − expected| / tol
    alternatives: dict[str, int] = field(default_factory=dict)  # hypothesis -> elements beyond tolerance
    sum_rd: float = 0.0  # Σ R·D, R = stored − expected
    sum_t2d2: float = 0.0  # Σ tol²·D²
    sum_d2: float = 0.0  # Σ D²
    sum_gd: float = 0.0  # Σ (stored − base)·D
    sum_g2: float = 0.0  # Σ (stored − base)²
    sum_t2: float = 0.0  # Σ tol²

    def alternative_hypotheses(self, heads_in_chunk: int, chunk_rows: int) -> dict[str, Any]:
        """What a broken writer would have stored, each as the map from those stored rows back to
        the rows a correct writer stores (so the result compares with the expected rows)."""
        t = self.tensor
        out: dict[str, Any] = {}
        if t.permute_heads:
            h = heads_in_chunk
            out["not permuted"] = lambda g: permute_rows(g, h)
            out["inverse permutation"] = lambda g: permute_rows(permute_rows(g, h), h)
            for other in self.other_heads:
                if other != t.permute_heads and (other * chunk_rows) % t.rows == 0:
                    h2 = other * chunk_rows // t.rows
                    if h2 and chunk_rows % (2 * h2) == 0:
                        out[f"permuted with {other} heads"] = lambda g, h2=h2: permute_rows(unpermute_rows(g, h2), h)
        if t.shift:
            out["shift missing"] = lambda g: g + t.shift
        return out

    def feed(self, r0: int, stored_raw: torch.Tensor, expected: torch.Tensor, base: torch.Tensor | None,
             heads_in_chunk: int) -> None:
        """Rows [r0, r0 + n): stored bytes (uint8 [n, row_bytes]), the float32 rows a correct writer
        encodes, and the base rows transformed alike (None: the tensor is not merged)."""
        t = self.tensor
        delta = expected - base if base is not None else None
        encoded = torch.frombuffer(self.codec.encode(expected.contiguous()), dtype=torch.uint8)
        same = torch.equal(stored_raw.reshape(-1), encoded)
        del encoded
        if delta is not None or not same:
            tol = self.codec.tolerance(expected, delta)
        if delta is not None:
            d2 = delta.double().square()
            self.sum_d2 += float(d2.sum())
            self.sum_t2d2 += float((tol.double().square() * d2).sum())
            self.sum_t2 += float(tol.double().square().sum())
        if same:
            if delta is not None:  # stored = expected within rounding: count it as such in the fit
                self.sum_gd += float(d2.sum())
                self.sum_g2 += float(d2.sum())
            return
        self.exact = False
        g = self.codec.decode(stored_raw, t.width)
        bad = bad_elements(g, expected, tol)
        n_bad = int(bad.sum())
        if n_bad:
            self.bad_elements += n_bad
            rows_bad = bad.any(dim=1).nonzero()
            self.bad_rows += len(rows_bad)
            if self.first_bad_row is None:
                self.first_bad_row = r0 + int(rows_bad[0, 0])
        ratio = ((g - expected).abs() / tol).nan_to_num(nan=math.inf)
        self.worst = max(self.worst, float(ratio.max()) if ratio.numel() else 0.0)
        if delta is not None:
            r = (g - expected).double()
            dd = delta.double()
            self.sum_rd += float((r * dd).sum())
            g0 = (g - base).double()
            self.sum_gd += float((g0 * dd).sum())
            self.sum_g2 += float(g0.nan_to_num(posinf=1e300, neginf=-1e300).square().sum())
        for name, undo in self.alternative_hypotheses(heads_in_chunk, expected.shape[0]).items():
            self.alternatives[name] = self.alternatives.get(name, 0) + int(bad_elements(undo(g), expected, tol).sum())

    # -- verdict

    @property
    def correlation_bound(self) -> float:
        return math.sqrt(Z2 * self.sum_t2d2)

    @property
    def resolvable(self) -> bool:
        """A missing delta would fail the correlation test (or the element test)."""
        return not self.merged or self.sum_d2 > self.correlation_bound

    def finish(self) -> tuple[TensorResult, Fault | None, bool]:
        """(result, fault, tolerated): tolerated = passed without being byte-exact."""
        t = self.tensor
        op = "merge" if self.merged else "copy"
        exact_required = not self.merged and self.codec.deterministic
        correlated = self.merged and abs(self.sum_rd) > self.correlation_bound
        ok = self.exact or (not exact_required and self.bad_elements == 0 and not correlated)
        margin = None if self.exact else round(self.worst, 4) if math.isfinite(self.worst) else None
        result = TensorResult(t.name, op, ok, margin=margin, resolvable=self.resolvable)
        if ok:
            return result, None, not self.exact
        return result, self._diagnose(exact_required), False

    def _rounded(self, k: float) -> float:
        """k to one decimal when that is within the fit's own uncertainty (quantization noise)."""
        spread = math.sqrt(self.sum_t2d2) / self.sum_d2 if self.sum_d2 > 0 else 0.0
        return round(k, 1) if abs(k - round(k, 1)) <= max(0.02, 3 * spread) else k

    def _diagnose(self, exact_required: bool) -> Fault:
        t = self.tensor
        data: dict[str, Any] = {"rows": t.rows, "rows_failing": self.bad_rows, "elements_failing": self.bad_elements,
                                "type": t.encoding}
        if "shift missing" in self.alternatives and self.alternatives["shift missing"] == 0:
            return Fault("norm +1 missing", t.name,
                         f"norm +1 missing: stored as w, llama.cpp's Gemma expects w + {t.shift:g} (Gemma's RMSNorm multiplies by 1 + w)", data)
        if self.alternatives.get("not permuted") == 0:
            return Fault("not permuted", t.name,
                         f"not permuted: rows are in Hugging Face's rotate-half order; llama.cpp expects them permuted per head "
                         f"({t.permute_heads} heads) to Meta's interleaved RoPE order", data)
        wrong = [k for k, v in self.alternatives.items() if v == 0 and k.startswith(("permuted", "inverse"))]
        if wrong:
            return Fault("permutation wrong", t.name,
                         f"permutation wrong: rows stored with the {wrong[0]}; llama.cpp expects them permuted per head "
                         f"with {t.permute_heads} heads (HF rotate-half -> Meta interleaved)", {**data, "hypothesis": wrong[0]})
        if self.merged and self.sum_d2 > 0 and self.resolvable:
            k = self.sum_gd / self.sum_d2
            resid = self.sum_g2 - k * self.sum_gd
            data.update(fitted_scale=k)
            if resid <= self.sum_t2:
                if abs(k) < 0.05:
                    return Fault("delta missing", t.name,
                                 "delta missing: the stored weight is the base weight (within the type's rounding)", data)
                if abs(k - 1) > 0.02:
                    shown = _fmt_factor(self._rounded(k))
                    return Fault("scale off", t.name,
                                 f"scale off by {shown}× (the delta is applied {shown} times)", {**data, "factor": k})
        where = f"first: row {self.first_bad_row}" if self.first_bad_row is not None else "within tolerance element-wise"
        total = data["elements"] = t.rows * t.width
        counted = f"{self.bad_elements} of {total} elements out of bound"
        if exact_required:
            return Fault("bytes differ", t.name, f"bytes differ from the {t.encoding} encoding of the base: {self.bad_elements or 'some'} "
                         f"of {total} element(s) in {self.bad_rows or 'some'} of {t.rows} rows ({where})", data)
        if 0 < self.bad_rows <= max(1, int(LOCALIZED_FRACTION * t.rows)):
            what = "the rest matches base + adapters" if self.merged else "the rest matches the base"
            return Fault("values differ", t.name, f"values differ: {counted} in {self.bad_rows} of {t.rows} rows ({where}); {what}",
                         {**data, "first_row": self.first_bad_row})
        if self.merged:
            k = self.sum_gd / self.sum_d2 if self.sum_d2 > 0 else float("nan")
            return Fault("wrong delta", t.name,
                         f"wrong delta: the stored {t.encoding} values do not match base + adapters "
                         f"({counted} in {self.bad_rows} of {t.rows} rows; fitted delta scale {k:.3g})", data)
        return Fault("values differ", t.name, f"values differ from the {t.encoding} encoding of the base: {counted} in "
                     f"{self.bad_rows} of {t.rows} rows ({where})", data)


class EncodedCheck(TensorCheck):
    """A tensor a codec encodes, in a safetensors shard: its stored rows against the codec's
    encoding of the expected float32 rows (see the module docstring)."""

    category = "encoded"

    def __init__(self, tensor: OutputTensor, ctx: Context):
        self.codec = codecs.get(tensor.encoding)
        super().__init__(tensor, ctx)
        self.align = qs.row_alignment(tensor)
        self.row_bytes = self.codec.row_bytes(self.width)
        self.math = None
        if tensor.loras:
            from ..run.terms import TensorMath

            self.math = TensorMath.load(tensor, ctx.load, ctx.device)
        spec = EncodedSpec.of(tensor)
        self.evidence = EncodedEvidence(spec, self.codec, bool(tensor.loras),
                                        other_head_counts(spec.permute_heads, ctx.head_counts))
        self.tolerated = False

    def _base_rows(self):
        if self.tensor.op == "constant":
            return ConstantRows(self.tensor)
        return BaseRows(self.tensor, self.ctx)

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 * self.row_bytes, (r1 - r0) * self.row_bytes

    @property
    def needs_prepass(self) -> bool:
        return self.math is not None and qs.needs_prepass(self.tensor)

    def _tiles(self) -> ops.Tiles:
        return ops.Tiles(self.ctx.rtiles[0], self.ctx.rtiles[1])

    def prepass(self, row_start: int, base_rows: torch.Tensor) -> None:
        self.math.prepass(base_rows.to(self.ctx.device), row_start, self._tiles())

    def feed(self, chunk: Chunk) -> None:
        r0, n = chunk.row_start, chunk.rows
        base_rows = self.base.rows(chunk.base, r0, r0 + n)
        base = base_rows.to(torch.float32).cpu()
        expected = base
        if self.math is not None:
            expected = self.math.compute(base_rows.to(self.ctx.device), r0, torch.float32, self._tiles()).cpu()
        expected, base = expected_rows(self.tensor, expected, base, n)
        stored = torch.frombuffer(chunk.out, dtype=torch.uint8, count=n * self.row_bytes).reshape(n, self.row_bytes)
        heads = self.evidence.tensor.permute_heads * n // self.rows if self.evidence.tensor.permute_heads else 0
        self.evidence.feed(r0, stored, expected, base if self.math is not None else None, heads)

    def finish(self) -> tuple[TensorResult, Fault | None]:
        result, fault, self.tolerated = self.evidence.finish()
        return result, fault


class ConstantRows:
    """The 'base' of a generated tensor (GGUF's rope_freqs): its planned values, nothing read."""

    def __init__(self, tensor: OutputTensor):
        self.values = tensor.values
        self.needs_stats = False

    def span(self, r0: int, r1: int) -> tuple[int, int]:
        return 0, 0

    def rows(self, view: memoryview, r0: int, r1: int, raw: bool = False) -> torch.Tensor:
        return torch.tensor(self.values[r0:r1], dtype=torch.float32).reshape(r1 - r0, 1)


def expected_rows(t: OutputTensor, expected: torch.Tensor, base: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The container's row transform on a chunk of n rows, in float32 (Gemma's norm shift, the q/k
    permutation per head), applied alike to the expected rows and to the base rows."""
    transform = t.transform
    if transform is None:
        return expected, base
    if transform.shift:
        expected, base = expected + transform.shift, base + transform.shift
    if transform.permute_heads:
        heads = transform.permute_heads * n // _rows_and_width(t.weight_shape)[0]
        expected, base = permute_rows(expected, heads), permute_rows(base, heads)
    return expected, base
