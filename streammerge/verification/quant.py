"""Verify checks of merged_4bit outputs: the packed weight element by element, and its statistics.

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
"""

from __future__ import annotations

import json

import torch

from ..formats.safetensors import FROM_TORCH_NAME
from ..planning.types import OutputTensor
from ..formats.codecs import bnb4, bnb4_quantize
from ..planning import streaming as qs
from .base import _UNIT_ROUNDOFF, U32, Chunk, Context, Fault, TensorCheck, TensorResult, _torch_dtype
from .checks import RecomputeCheck, _half_ulp

DYNAMIC_MAP_GAP = 0.0141  # largest gap between adjacent values of bitsandbytes' 8-bit dynamic map (0.01406)


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
            want.update(nested_blocksize=bnb4_quantize.NESTED_BLOCKSIZE, nested_dtype="float32")
        wrong = [f"{k} {d.get(k)!r} (expected {v!r})" for k, v in want.items() if d.get(k) != v]
        keys = set(want) | ({"nested_offset"} if qo.double_quant else set())
        if set(d) != keys:
            wrong.append(f"keys {sorted(d)} (expected {sorted(keys)})")
        if qo.double_quant and not isinstance(d.get("nested_offset"), (int, float)):
            wrong.append(f"nested_offset {d.get('nested_offset')!r}")
        if wrong:
            return Fault("quant state differs", name, "quant state differs: " + "; ".join(wrong))
        return None
