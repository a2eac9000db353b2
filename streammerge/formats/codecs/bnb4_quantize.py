"""bitsandbytes 4-bit (NF4 / FP4) quantization, row chunk by row chunk, bit-identical to bitsandbytes.

Writing a 4-bit weight is its own numerics, apart from reading one (:mod:`.bnb4`, whose docstring
gives the on-disk format): quantization reproduces bitsandbytes' ``quantize_4bit`` op bit for bit
on each chunk (it is block-local, so chunking at block boundaries changes nothing), and double
quantization calls bitsandbytes on the whole absmax vector at :meth:`Bnb4Quantizer.finish`. The
output's tensors are known before any data is (:func:`bnb4_output_specs`), for the planner.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

from .bnb4 import (
    _STORAGE_DTYPES,
    Bnb4Format,
    _dtype_name,
    _json_key,
    bitsandbytes_functional,
    codebook,
    decode_absmax,
    row_alignment,
)

# bitsandbytes.functional.quantize_4bit hardcodes the blocksize of the double quantization
NESTED_BLOCKSIZE = 256
# longest json.dumps() of a float32 value widened to a Python float: sign, 17 digits, ".", "e-XX"
# (e.g. "-1.3945241249297942e-21"); NaN/Infinity are shorter
_MAX_FLOAT_JSON_LEN = 23


def quant_state_json(fmt: Bnb4Format) -> bytes:
    """The exact JSON bytes bitsandbytes' ``QuantState.as_dict(packed=True)`` writes for this format."""
    d: dict[str, Any] = {
        "quant_type": fmt.quant_type,
        "blocksize": fmt.blocksize,
        "dtype": fmt.dtype,
        "shape": list(fmt.shape),
    }
    if fmt.nested:
        d.update(
            nested_blocksize=fmt.nested_blocksize,
            nested_dtype=fmt.nested_dtype,
            nested_offset=float(fmt.nested_offset),
        )
    return json.dumps(d).encode("utf-8")


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor of a 4-bit weight, known before any data is computed."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    exact: bool = True  # False: shape is an upper bound (nested quant-state JSON, see max_nbytes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


def bnb4_output_specs(
    name: str,
    shape: Sequence[int],
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype_name: str = "bfloat16",
    quant_storage: str = "uint8",
) -> list[TensorSpec]:
    """Names, dtypes and shapes of everything a 4-bit weight ``name`` is saved as, in state-dict order.

    All are exact except, with double quant, the quant-state JSON: it contains ``nested_offset``
    (the mean of the absmax), whose printed length depends on the data; its spec gives the
    upper bound and ``exact=False`` (see :meth:`Bnb4Quantizer.finish` ``json_pad_to``).
    """
    fmt = _fmt_for(shape, quant_type, blocksize, double_quant, compute_dtype_name, quant_storage, offset=0.0)
    itemsize = torch.empty((), dtype=_STORAGE_DTYPES[quant_storage]).element_size()
    if fmt.packed_nbytes % itemsize:
        raise ValueError(f"{fmt.packed_nbytes} packed bytes do not fill whole {quant_storage} elements")
    specs = [TensorSpec(name, quant_storage, (fmt.packed_nbytes // itemsize, 1))]
    nb = fmt.n_blocks
    specs.append(TensorSpec(f"{name}.absmax", "uint8" if double_quant else "float32", (nb,)))
    specs.append(TensorSpec(f"{name}.quant_map", "float32", (16,)))
    if double_quant:
        specs.append(TensorSpec(f"{name}.nested_absmax", "float32", (-(-nb // NESTED_BLOCKSIZE),)))
        specs.append(TensorSpec(f"{name}.nested_quant_map", "float32", (256,)))
    n = len(quant_state_json(fmt))
    if double_quant:  # "nested_offset": 0.0 -> the longest float repr
        n += _MAX_FLOAT_JSON_LEN - len("0.0")
    specs.append(TensorSpec(f"{name}.{_json_key(quant_type)}", "uint8", (n,), exact=not double_quant))
    return specs


def _fmt_for(shape, quant_type, blocksize, double_quant, dtype_name, quant_storage, offset) -> Bnb4Format:
    return Bnb4Format(
        quant_type=quant_type,
        blocksize=blocksize,
        shape=tuple(shape),
        dtype=dtype_name,
        nested=double_quant,
        nested_blocksize=NESTED_BLOCKSIZE if double_quant else None,
        nested_offset=offset if double_quant else None,
        nested_dtype="float32" if double_quant else None,
        quant_storage=quant_storage,
    )


QUANTIZE_TILE = 1 << 18  # values per CPU tile: a tile's temporaries stay in cache and are reused


def _tile_size(n: int, blocksize: int, device: torch.device) -> int:
    """Values per tile, whole blocks: cache-sized on the CPU; on a GPU the whole chunk (one kernel
    per operation instead of one per tile and operation)."""
    tile = QUANTIZE_TILE if device.type == "cpu" else max(n, 1)
    return max(blocksize, -(-tile // blocksize) * blocksize)


def _tiles(full: int, tile: int) -> Iterator[tuple[int, int]]:
    """[start, stop) spans of `tile` values covering the first `full` values."""
    for start in range(0, full, tile):
        yield start, min(full, start + tile)


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block float32 absmax of a flat chunk starting on a block boundary, exactly as bitsandbytes'
    ``quantize_4bit`` computes it (full blocks: max |x|; a partial last block: clamped to >= 1e-38)."""
    a = flat.reshape(-1).float()
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    absmax = torch.empty(full // blocksize + (1 if rem else 0), dtype=torch.float32, device=a.device)
    tile = _tile_size(n, blocksize, a.device)
    mag = torch.empty(min(full, tile), dtype=torch.float32, device=a.device)
    for start, stop in _tiles(full, tile):
        m = mag[: stop - start].view(-1, blocksize)
        torch.abs(a[start:stop].view(-1, blocksize), out=m)
        torch.amax(m, dim=-1, out=absmax[start // blocksize: stop // blocksize])
    if rem:
        absmax[-1] = a[full:].abs().max().clamp(min=1e-38)
    return absmax


def _quantize_bounds(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' decision bounds: midpoints of the sorted codebook, and the sort order (FP4 remap).

    Sorted on the CPU, stably, whatever `device`: FP4's codebook holds +0.0 twice (codes 0 and 8),
    and an unstable sort on a GPU may order them the other way, which changes the bytes (not the
    values) of every value that rounds to zero; bitsandbytes' CPU op orders them 0 then 8."""
    code = codebook(quant_type, device="cpu")
    order = torch.argsort(code, stable=True)
    return ((code[order[:-1]] + code[order[1:]]) / 2).to(device), order.to(device)


@functools.cache
def _code_steps(quant_type: str) -> tuple[tuple[tuple[float, int], ...], int]:
    """bitsandbytes' code of x is order[count of bounds below x]; as a telescoping sum over the bounds
    that is order[15] - sum((x <= bound_i) * (order[i+1] - order[i])), in wrapping uint8 arithmetic.
    Returns ((bound_i, (order[i] - order[i+1]) mod 256), ...) and order[15]: constants per type."""
    bounds, order = _quantize_bounds(quant_type, torch.device("cpu"))
    steps = tuple((level, (int(order[i]) - int(order[i + 1])) % 256) for i, level in enumerate(bounds.tolist()))
    return steps, int(order[-1])


def _quantize_4bit_torch(
    flat: torch.Tensor, blocksize: int, quant_type: str, out: torch.Tensor | None = None, tile: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' default ``quantize_4bit`` kernel (the one its CPU build runs), bit for bit, on any
    device, so a CUDA chunk gives the CPU's bytes (bnb's CUDA kernel need not).

    Two changes make it ~3x faster than bitsandbytes' own CPU op without changing a bit: the code
    index ``bucketize(x, bounds)`` (the count of bounds below x) is computed from fifteen vectorized
    compares ``x <= bound`` instead of a scalar binary search per value (a NaN still lands on the
    last code, as with bucketize), and the work runs in cache-sized tiles of whole blocks whose
    temporaries are reused (fresh large temporaries cost a page fault per 4 KB). The arithmetic per
    value is bitsandbytes' own: the float32 reciprocal of the block absmax clamped to 1e-38, one
    multiply, a clamp to [-1, 1]. ``out``: where to write the packed bytes; ``tile``: values per tile
    (default :func:`_tile_size`'s).
    """
    steps, top = _code_steps(quant_type)
    a = flat.reshape(-1).float()
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    dev = a.device
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev) if out is None else out
    if (packed.numel() != (n + 1) // 2 or packed.dtype != torch.uint8 or not packed.is_contiguous()
            or packed.device != dev):
        raise ValueError(f"out must be a contiguous uint8 [{(n + 1) // 2}] tensor on {dev}, got "
                         f"{_dtype_name(packed.dtype)} {list(packed.shape)} on {packed.device}")
    packed = packed.view(-1)
    absmax = torch.empty(full // blocksize + (1 if rem else 0), dtype=torch.float32, device=dev)
    tile = _tile_size(n, blocksize, dev) if tile is None else max(blocksize, -(-tile // blocksize) * blocksize)
    span = min(n, tile) + 1
    mag = torch.empty(span, dtype=torch.float32, device=dev)
    codes = torch.empty(span, dtype=torch.uint8, device=dev)
    below = torch.empty(span, dtype=torch.bool, device=dev)

    def encode(scaled: torch.Tensor, start: int) -> None:
        """Codes of the scaled values starting at `start` (even), packed two per byte."""
        k = scaled.numel()
        c = codes[:k]
        c.fill_(top)
        le = below[:k]
        for level, step in steps:
            torch.le(scaled, level, out=le)
            c.add_(le.view(torch.uint8), alpha=step)
        if k % 2:  # the last value of an odd count: bitsandbytes pads with 0.0
            codes[k] = (top + sum(step for level, step in steps if 0.0 <= level)) % 256
            c = codes[: k + 1]
        p = packed[start // 2: start // 2 + c.numel() // 2]
        torch.bitwise_left_shift(c[0::2], 4, out=p)
        p.bitwise_or_(c[1::2])

    for start, stop in _tiles(full, tile):
        com = a[start:stop].view(-1, blocksize)
        m = mag[: stop - start].view(-1, blocksize)
        am = absmax[start // blocksize: stop // blocksize]
        torch.abs(com, out=m)
        torch.amax(m, dim=-1, out=am)
        torch.mul(com, 1.0 / am.clamp(min=1e-38).view(-1, 1), out=m)
        encode(m.clamp_(-1, 1).view(-1), start)
    if rem:
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax[-1] = am
        encode(torch.clamp(a[full:] / am, -1, 1), full)
    return packed, absmax


def quantize_4bit_chunk(
    flat: torch.Tensor, blocksize: int, quant_type: str, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 bytes, float32 absmax) of a flat chunk that starts on a block boundary: the
    bytes of bitsandbytes' ``quantize_4bit`` op, on any device (:func:`_quantize_4bit_torch`; the
    tests hold it to bitsandbytes' op on the CPU). The packed bytes go to `out` when given."""
    return _quantize_4bit_torch(flat, blocksize, quant_type, out)


@dataclass
class Bnb4Quantizer:
    """Quantize a weight row chunk by row chunk, bit-identical to ``quantize_4bit`` on the whole tensor.

    ``add`` returns each chunk's packed bytes at once (the caller writes them); only the per-block
    absmax (n/blocksize floats) is kept until ``finish``, which computes the double-quant
    statistics over all of it, as bitsandbytes does. ``compute_dtype_name`` is written as the
    quant-state ``dtype``: the dtype ``dequantize_4bit`` will return, i.e. the dtype the original
    weight had (transformers records the weight's dtype there, not ``bnb_4bit_compute_dtype``).
    Chunks may live on any device: every device runs the same torch arithmetic
    (:func:`quantize_4bit_chunk`), and the statistics are finished on the CPU, so every device
    writes the same bytes.
    """

    shape: tuple[int, ...]
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype_name: str = "bfloat16"
    quant_storage: str = "uint8"
    _absmax: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)
    _done: int = field(default=0, init=False)
    _finished: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self._fmt = _fmt_for(
            self.shape, self.quant_type, self.blocksize, self.double_quant, self.compute_dtype_name,
            self.quant_storage, offset=0.0,
        )

    @property
    def rows_done(self) -> int:
        return self._done // self._fmt.n_cols

    @property
    def row_alignment(self) -> int:
        return row_alignment(self._fmt.n_cols, self.blocksize)

    def _check_chunk(self, rows: torch.Tensor) -> int:
        if self._finished:
            raise ValueError("Bnb4Quantizer.add called after finish()")
        n = rows.numel()
        total = self._fmt.numel
        if n == 0:
            raise ValueError("empty chunk")
        if n % self._fmt.n_cols:
            raise ValueError(f"chunk of {n} values is not a whole number of rows of {self._fmt.n_cols}")
        if self._done % self.blocksize:
            raise ValueError(
                f"previous chunk ended inside a {self.blocksize}-block (row {self.rows_done}); every chunk but the "
                f"last must be a multiple of {self.row_alignment} rows"
            )
        if self._done + n > total:
            raise ValueError(f"chunk overruns the weight: {self._done} + {n} > {total} values")
        if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"rows must be float32/bfloat16/float16, got {rows.dtype}")
        return n

    def add(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize the next rows (float32, shape [k, *shape[1:]] or flat); returns their packed uint8 bytes
        (on the rows' device; in `out` when given)."""
        n = self._check_chunk(rows)
        packed, absmax = quantize_4bit_chunk(rows.reshape(-1).contiguous(), self.blocksize, self.quant_type, out)
        self._absmax.append(absmax.cpu())
        self._done += n
        return packed.reshape(-1)

    def add_absmax(self, rows: torch.Tensor) -> None:
        """Record the next rows' block absmax only (no packing): the cheap pass that makes the
        statistics (and the double-quant ``nested_offset``) known before the packed bytes are produced."""
        n = self._check_chunk(rows)
        self._absmax.append(block_absmax(rows.reshape(-1), self.blocksize).cpu())
        self._done += n

    def finish(self, json_pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Statistic tensors keyed by suffix (``absmax``, ``quant_map``, ..., ``quant_state.bitsandbytes__nf4``).

        Same dtypes, shapes, order and bytes as ``QuantState.as_dict(packed=True)`` of
        ``quantize_4bit`` on the whole weight; CPU tensors. ``json_pad_to`` right-pads the JSON
        with spaces to that length (JSON readers, bitsandbytes included, ignore them) for writers
        that fixed the tensor size up front; the default keeps transformers' exact bytes.
        """
        if self._finished:
            raise ValueError("Bnb4Quantizer.finish called twice")
        if self._done != self._fmt.numel:
            raise ValueError(f"only {self._done} of {self._fmt.numel} values were added before finish()")
        self._finished = True
        F = bitsandbytes_functional()
        QuantState, get_4bit_type, quantize_blockwise = F.QuantState, F.get_4bit_type, F.quantize_blockwise

        # on the CPU whatever the chunks' device: absmax.mean() must reduce in the same order everywhere
        absmax = torch.cat(self._absmax) if len(self._absmax) > 1 else self._absmax[0]
        self._absmax = []
        code = get_4bit_type(self.quant_type, device=absmax.device)
        common = dict(
            shape=torch.Size(self.shape),
            dtype=getattr(torch, self.compute_dtype_name),
            blocksize=self.blocksize,
            code=code,
            quant_type=self.quant_type,
        )
        if self.double_quant:  # the exact steps of bitsandbytes.functional.quantize_4bit
            offset = absmax.mean()
            qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
            state = QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)
        else:
            state = QuantState(absmax=absmax, **common)
        out = {k: v.detach().cpu() for k, v in state.as_dict(packed=True).items()}
        if json_pad_to is not None:
            key = _json_key(self.quant_type)
            raw = out[key]
            if json_pad_to < raw.numel():
                raise ValueError(f"quant-state JSON is {raw.numel()} bytes, longer than json_pad_to={json_pad_to}")
            pad = torch.full((json_pad_to - raw.numel(),), ord(" "), dtype=torch.uint8)
            out[key] = torch.cat((raw, pad))
        return out

    def decoded_absmax(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The float32 per-block absmax ``dequantize_4bit`` will use for ``finish()``'s statistics."""
        return decode_absmax(self.format(stats), stats["absmax"], stats.get("nested_absmax"), stats.get("nested_quant_map"))

    def format(self, stats: Mapping[str, torch.Tensor]) -> Bnb4Format:
        """The :class:`Bnb4Format` of the finished weight (needs ``finish()``'s output for nested_offset)."""
        d = json.loads(bytes(stats[_json_key(self.quant_type)].numpy()).decode("utf-8"))
        return _fmt_for(
            self.shape, self.quant_type, self.blocksize, self.double_quant, self.compute_dtype_name,
            self.quant_storage, offset=d.get("nested_offset"),
        )
