"""bitsandbytes 4-bit (NF4 / FP4) weights read row chunk by row chunk: format, validation, dequantization.

Reading is kept apart from writing (:mod:`.bnb4_quantize`): planning, verification and a merge's
input side only ever read a 4-bit weight, and the format pinned down here is what both sides share.

The on-disk format is the one transformers 5 + bitsandbytes 0.50 write for a ``Linear4bit``
weight ``<m>.weight`` (keys are relative to that name)::

    <m>.weight                                   uint8 [ceil(n/2), 1]   two 4-bit codes per byte, high nibble first
    <m>.weight.absmax                            float32 [n_blocks]     (uint8 [n_blocks] with double quant)
    <m>.weight.quant_map                         float32 [16]           the 4-bit codebook (ignored by bnb's dequant)
    <m>.weight.nested_absmax                     float32 [ceil(n_blocks/256)]   double quant only
    <m>.weight.nested_quant_map                  float32 [256]          double quant only (8-bit dynamic map)
    <m>.weight.quant_state.bitsandbytes__nf4     uint8 [len]            UTF-8 JSON (``__fp4`` for FP4)

``n`` is the element count of the original weight and ``n_blocks = ceil(n / blocksize)``. Blocks run
over the *flattened* weight, so a block may straddle rows; :func:`row_alignment` gives the row
granularity at which a chunk starts on a block (and byte) boundary.

Numerics: 4-bit values are looked up in bitsandbytes' own codebook and multiplied by the block's
float32 absmax, exactly as bitsandbytes' reference kernel does.

bitsandbytes is imported lazily (:func:`bitsandbytes_functional`): importing this module does not
require it.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import threading
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Mapping, Sequence

import torch

QUANT_TYPES = ("nf4", "fp4")
# what bitsandbytes.functional.quantize_4bit / dequantize_4bit accept
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPE_NAMES = ("bfloat16", "float16", "float32")
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"

_STORAGE_DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "int32": torch.int32,
    "int64": torch.int64,
    "float64": torch.float64,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Bnb4Format:
    """Everything needed to interpret one 4-bit weight, JSON-serializable (goes into the MergePlan)."""

    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: str  # quant_state dtype: what dequantize_4bit returns (the original weight's dtype)
    nested: bool = False
    nested_blocksize: int | None = None
    nested_offset: float | None = None
    nested_dtype: str | None = None
    quant_storage: str = "uint8"  # dtype of the stored packed tensor (bnb_4bit_quant_storage)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        _validate_format(self)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def n_cols(self) -> int:
        """Elements per row (a 'row' is an index of dim 0)."""
        return math.prod(self.shape[1:])

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def packed_nbytes(self) -> int:
        return (self.numel + 1) // 2

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Bnb4Format":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Bnb4Format field(s) {sorted(unknown)}")
        return cls(**{**d, "shape": tuple(d["shape"])})


def _validate_format(f: Bnb4Format) -> None:
    if f.quant_type not in QUANT_TYPES:
        raise ValueError(f"4-bit quant_type must be one of {QUANT_TYPES}, got {f.quant_type!r}")
    if f.blocksize not in BLOCKSIZES:
        raise ValueError(f"4-bit blocksize must be one of {BLOCKSIZES}, got {f.blocksize!r}")
    if f.dtype not in DTYPE_NAMES:
        raise ValueError(f"4-bit quant_state dtype must be one of {DTYPE_NAMES}, got {f.dtype!r}")
    if not f.shape or any(s <= 0 for s in f.shape):
        raise ValueError(f"4-bit weight shape must be non-empty with positive sizes, got {list(f.shape)}")
    if f.quant_storage not in _STORAGE_DTYPES:
        raise ValueError(f"unsupported quant_storage {f.quant_storage!r}")
    if f.nested:
        if not isinstance(f.nested_blocksize, int) or f.nested_blocksize <= 0:
            raise ValueError(f"double-quant nested_blocksize must be a positive int, got {f.nested_blocksize!r}")
        if not isinstance(f.nested_offset, (int, float)) or isinstance(f.nested_offset, bool):
            raise ValueError(f"double-quant nested_offset must be a number, got {f.nested_offset!r}")
        if f.nested_dtype not in DTYPE_NAMES:
            raise ValueError(f"double-quant nested_dtype must be one of {DTYPE_NAMES}, got {f.nested_dtype!r}")
    elif (f.nested_blocksize, f.nested_offset, f.nested_dtype) != (None, None, None):
        raise ValueError("nested_* fields are set but nested is False")


def _json_key(quant_type: str) -> str:
    return QUANT_STATE_PREFIX + quant_type


_IMPORT_LOCK = threading.Lock()
_functional: list[ModuleType] = []  # bitsandbytes.functional once fully imported


def bitsandbytes_functional() -> ModuleType:
    """``bitsandbytes.functional``, imported without building its ``torch.compile`` wrappers.

    At import, bitsandbytes wraps a few fallback kernels in ``torch.compile``, which loads most of
    torch._inductor: ~0.8 s of every run that touches a 4-bit tensor (measured on 2 cores; ~590
    modules). streammerge calls ops that bitsandbytes' CPU and CUDA backends implement natively, and
    bitsandbytes itself runs the plain functions wherever compiling fails; so, when streammerge is
    the first to import it, the import runs with ``torch.compile`` as the identity, restored right
    after (the fallback kernels then stay uncompiled in this process). Callers wait for a complete
    module: another thread never sees a half-imported one.
    """
    if not _functional:
        with _IMPORT_LOCK:
            if not _functional:
                if "bitsandbytes" in sys.modules:  # imported by someone else (the import system waits for it)
                    _functional.append(importlib.import_module("bitsandbytes.functional"))
                else:
                    compile_ = torch.compile
                    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)  # type: ignore[assignment]
                    try:
                        _functional.append(importlib.import_module("bitsandbytes.functional"))
                    finally:
                        torch.compile = compile_
    return _functional[0]


def codebook(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' own 16-entry float32 codebook (what ``dequantize_4bit`` uses, whatever quant_map says)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"4-bit quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return bitsandbytes_functional().get_4bit_type(quant_type, device=device)


# --------------------------------------------------------------------------- parsing


def bnb4_weight_names(names: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Weight names (``<m>.weight``) that have a bnb 4-bit quant-state tensor among ``names``."""
    out = []
    for n in names:
        for qt in QUANT_TYPES:
            suffix = "." + _json_key(qt)
            if n.endswith(suffix):
                out.append(n[: -len(suffix)])
    return out


def companion_names(name: str, nested: bool, quant_type: str) -> list[str]:
    """Names of the statistic tensors stored next to ``name`` (in state-dict order)."""
    sfx = ["absmax", "quant_map"]
    if nested:
        sfx += ["nested_absmax", "nested_quant_map"]
    sfx.append(_json_key(quant_type))
    return [f"{name}.{s}" for s in sfx]


def _shape_of(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _decode_quant_state(name: str, t: torch.Tensor) -> dict[str, Any]:
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{name}: quant-state tensor must be 1-D uint8 JSON, got {t.dtype} {list(t.shape)}")
    if t.device.type == "meta":
        raise ValueError(f"{name}: quant-state JSON tensor must hold data (got a meta tensor)")
    try:
        d = json.loads(bytes(t.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: quant-state tensor is not valid UTF-8 JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{name}: quant-state JSON must be an object, got {type(d).__name__}")
    return d


def parse_bnb4(name: str, tensors: Mapping[str, torch.Tensor]) -> Bnb4Format:
    """Read and cross-check the quant state of 4-bit weight ``name`` (``<m>.weight``).

    ``tensors`` maps full tensor names to tensors; only the quant-state JSON needs data, the others
    may be ``meta`` tensors (only their dtype/shape is checked), so a planner can call this with
    header information plus the few-hundred-byte JSON. ``quant_map`` is compared with bitsandbytes'
    codebook when it holds data. Raises ValueError when the pieces disagree.
    """
    json_keys = [k for k in (f"{name}.{_json_key(qt)}" for qt in QUANT_TYPES) if k in tensors]
    if len(json_keys) != 1:
        others = sorted(k for k in tensors if k.startswith(f"{name}.{QUANT_STATE_PREFIX}"))
        raise ValueError(
            f"{name}: expected exactly one quant-state tensor '{name}.{QUANT_STATE_PREFIX}nf4|fp4', found "
            f"{json_keys or others or 'none'}"
        )
    jkey = json_keys[0]
    d = _decode_quant_state(jkey, tensors[jkey])
    key_qt = jkey.rsplit("__", 1)[1]
    if d.get("quant_type") != key_qt:
        raise ValueError(f"{jkey}: JSON quant_type {d.get('quant_type')!r} does not match the key suffix {key_qt!r}")
    for k in ("blocksize", "dtype", "shape"):
        if k not in d:
            raise ValueError(f"{jkey}: quant-state JSON lacks {k!r}")
    nested = f"{name}.nested_absmax" in tensors
    shape = d["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"{jkey}: JSON shape must be a list of ints, got {shape!r}")
    blocksize = d["blocksize"]
    if not isinstance(blocksize, int) or isinstance(blocksize, bool):
        raise ValueError(f"{jkey}: JSON blocksize must be an int, got {blocksize!r}")
    if nested and not all(k in d for k in ("nested_blocksize", "nested_offset", "nested_dtype")):
        raise ValueError(f"{jkey}: {name}.nested_absmax exists but the JSON lacks nested_blocksize/offset/dtype")
    if not nested and any(k in d for k in ("nested_blocksize", "nested_offset", "nested_dtype")):
        raise ValueError(f"{jkey}: JSON describes double quantization but {name}.nested_absmax is missing")
    unknown = set(d) - {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_offset", "nested_dtype"}
    if unknown:
        raise ValueError(f"{jkey}: unknown quant-state JSON key(s) {sorted(unknown)}")

    if name not in tensors:
        raise ValueError(f"{name}: packed 4-bit weight tensor is missing")
    storage = tensors[name].dtype
    storage_name = _dtype_name(storage)
    fmt = Bnb4Format(
        quant_type=key_qt,
        blocksize=blocksize,
        shape=tuple(shape),
        dtype=d["dtype"],
        nested=nested,
        nested_blocksize=d.get("nested_blocksize"),
        nested_offset=d.get("nested_offset"),
        nested_dtype=d.get("nested_dtype"),
        quant_storage=storage_name,
    )
    _check_tensors(name, fmt, tensors)
    return fmt


def _expect(name: str, t: torch.Tensor | None, dtype: torch.dtype, shape: tuple[int, ...], why: str) -> None:
    if t is None:
        raise ValueError(f"{name} is missing ({why})")
    if t.dtype != dtype or _shape_of(t) != shape:
        raise ValueError(
            f"{name}: expected {_dtype_name(dtype)} {list(shape)} ({why}), got {_dtype_name(t.dtype)} {list(_shape_of(t))}"
        )


def _check_tensors(name: str, fmt: Bnb4Format, tensors: Mapping[str, torch.Tensor]) -> None:
    w = tensors[name]
    nbytes = math.prod(_shape_of(w)) * w.element_size()
    if nbytes != fmt.packed_nbytes:
        raise ValueError(
            f"{name}: packed weight holds {nbytes} bytes but the quant state says shape {list(fmt.shape)} "
            f"({fmt.numel} values -> {fmt.packed_nbytes} bytes); the JSON shape is wrong or the file is truncated"
        )
    nb = fmt.n_blocks
    why = f"{fmt.numel} values / blocksize {fmt.blocksize}"
    if fmt.nested:
        _expect(f"{name}.absmax", tensors.get(f"{name}.absmax"), torch.uint8, (nb,), why + ", double-quantized")
        nn = -(-nb // fmt.nested_blocksize)
        _expect(
            f"{name}.nested_absmax",
            tensors.get(f"{name}.nested_absmax"),
            torch.float32,
            (nn,),
            f"{nb} blocks / nested_blocksize {fmt.nested_blocksize}",
        )
        _expect(f"{name}.nested_quant_map", tensors.get(f"{name}.nested_quant_map"), torch.float32, (256,), "8-bit map")
    else:
        _expect(f"{name}.absmax", tensors.get(f"{name}.absmax"), torch.float32, (nb,), why)
    qm = tensors.get(f"{name}.quant_map")
    _expect(f"{name}.quant_map", qm, torch.float32, (16,), "4-bit codebook")
    if qm.device.type != "meta":
        ref = codebook(fmt.quant_type)
        if not torch.equal(qm.detach().cpu(), ref):
            raise ValueError(
                f"{name}.quant_map is not bitsandbytes' {fmt.quant_type} codebook; the JSON quant_type is wrong "
                "or the checkpoint was not written by bitsandbytes"
            )


# --------------------------------------------------------------------------- chunk geometry


def row_alignment(n_cols: int, blocksize: int) -> int:
    """Smallest row count r such that every multiple of r rows starts on a block (and byte) boundary.

    Chunk boundaries at multiples of r rows fall on multiples of ``blocksize`` elements; blocksize
    is even, so they are also whole bytes of the packed weight and whole entries of absmax.
    """
    if n_cols <= 0 or blocksize <= 0:
        raise ValueError(f"n_cols and blocksize must be positive, got {n_cols}, {blocksize}")
    return blocksize // math.gcd(n_cols, blocksize)


@dataclass(frozen=True)
class ChunkRanges:
    """Where rows [row_start, row_end) of a 4-bit weight live in the stored tensors (half-open)."""

    elem_start: int
    elem_end: int
    byte_start: int  # into the packed weight (uint8 view)
    byte_end: int
    block_start: int  # into absmax (and the decoded absmax)
    block_end: int

    @property
    def n_elements(self) -> int:
        return self.elem_end - self.elem_start


def chunk_ranges(fmt: Bnb4Format, row_start: int, row_end: int) -> ChunkRanges:
    """Byte and block ranges for a row chunk; row_start must be a multiple of :func:`row_alignment`."""
    if not 0 <= row_start < row_end <= fmt.n_rows:
        raise ValueError(f"row range [{row_start}, {row_end}) is outside 0..{fmt.n_rows}")
    e0, e1 = row_start * fmt.n_cols, row_end * fmt.n_cols
    if e0 % fmt.blocksize:
        raise ValueError(
            f"row {row_start} does not start a {fmt.blocksize}-block; chunk starts must be multiples of "
            f"{row_alignment(fmt.n_cols, fmt.blocksize)} rows"
        )
    return ChunkRanges(e0, e1, e0 // 2, (e1 + 1) // 2, e0 // fmt.blocksize, -(-e1 // fmt.blocksize))


# --------------------------------------------------------------------------- dequantization


def decode_absmax(
    fmt: Bnb4Format,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-block float32 absmax exactly as ``dequantize_4bit`` computes it (double quant undone once per tensor)."""
    nb = fmt.n_blocks
    if not fmt.nested:
        if absmax.dtype != torch.float32 or absmax.numel() != nb:
            raise ValueError(f"absmax must be float32 [{nb}], got {_dtype_name(absmax.dtype)} {list(absmax.shape)}")
        return absmax.reshape(-1)
    if nested_absmax is None or nested_quant_map is None:
        raise ValueError("double-quantized absmax needs nested_absmax and nested_quant_map")
    if absmax.dtype != torch.uint8 or absmax.numel() != nb:
        raise ValueError(f"double-quantized absmax must be uint8 [{nb}], got {_dtype_name(absmax.dtype)} {list(absmax.shape)}")
    F = bitsandbytes_functional()
    QuantState, dequantize_blockwise = F.QuantState, F.dequantize_blockwise

    dev = absmax.device
    # the same objects QuantState.from_dict builds, then the same steps as dequantize_4bit
    state2 = QuantState(
        absmax=nested_absmax.to(dev),
        blocksize=fmt.nested_blocksize,
        code=nested_quant_map.to(dev),
        dtype=getattr(torch, fmt.nested_dtype),
    )
    offset = torch.tensor(float(fmt.nested_offset), dtype=torch.float32).to(dev)
    out = dequantize_blockwise(absmax.reshape(-1), state2)
    out += offset
    if out.dtype != torch.float32:
        out = out.float()
    return out


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """[256, 2] float32: the two values a packed byte stands for (high nibble first)."""
    code = code.to(torch.float32).reshape(16)
    return torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)


def _native_ok(fmt: Bnb4Format, b: torch.Tensor, n_elements: int) -> bool:
    """Whether bitsandbytes' CPU kernel can be used for this chunk: it is only flat-block-correct
    when rows hold whole blocks (bnb 0.50.2's AVX-512 path indexes blocks per row); there it is
    bit-identical to the reference (tested) and ~10x faster than the torch path."""
    return (
        b.device.type == "cpu"
        and len(fmt.shape) >= 2
        and fmt.n_cols % fmt.blocksize == 0
        and n_elements % fmt.n_cols == 0
    )


def dequantize_range(
    fmt: Bnb4Format,
    packed_bytes: torch.Tensor,
    absmax_f32: torch.Tensor,
    code: torch.Tensor,
    n_elements: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize ``n_elements`` values starting on a block boundary; returns flat float32.

    The values are those of ``dequantize_4bit`` (which returns ``fmt.dtype``) widened to float32,
    i.e. ``float32(dequantize_4bit(W))`` sliced: the merge contract's ``W``. Pass
    ``dtype=torch.float32`` for the unrounded ``code * absmax`` products instead.
    ``packed_bytes``: the matching bytes of the packed weight (any shape, viewed as uint8);
    ``absmax_f32``: the matching entries of :func:`decode_absmax`; ``code``: the quant map
    (:func:`codebook`, which :func:`parse_bnb4` checked the stored one against).
    """
    out_dtype = fmt.torch_dtype if dtype is None else dtype
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dequantize dtype must be float32, bfloat16 or float16, got {out_dtype}")
    b = packed_bytes.reshape(-1)
    if b.dtype != torch.uint8:
        b = b.view(torch.uint8)
    if n_elements <= 0:
        raise ValueError(f"n_elements must be positive, got {n_elements}")
    if b.numel() != (n_elements + 1) // 2:
        raise ValueError(f"{n_elements} values need {(n_elements + 1) // 2} packed bytes, got {b.numel()}")
    bs = fmt.blocksize
    nb = -(-n_elements // bs)
    a = absmax_f32.reshape(-1)
    if a.numel() != nb:
        raise ValueError(f"{n_elements} values at blocksize {bs} need {nb} absmax entries, got {a.numel()}")
    if a.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 (use decode_absmax), got {_dtype_name(a.dtype)}")
    if code.numel() != 16:
        raise ValueError(f"4-bit code must have 16 entries, got {code.numel()}")
    if _native_ok(fmt, b, n_elements):
        bitsandbytes_functional()  # registers torch.ops.bitsandbytes
        if not torch.equal(code.detach().reshape(16).float(), codebook(fmt.quant_type)):
            raise ValueError(f"code is not bitsandbytes' {fmt.quant_type} codebook")
        shape = [n_elements // fmt.n_cols, fmt.n_cols]
        out = torch.ops.bitsandbytes.dequantize_4bit.default(b, a, bs, fmt.quant_type, shape, out_dtype)
        return out.reshape(-1).to(torch.float32)
    # same arithmetic as bitsandbytes' reference kernel: fp32 code value * fp32 absmax, then cast
    vals = _pair_table(code.to(b.device)).index_select(0, b.to(torch.int32)).reshape(-1)
    if vals.numel() != nb * bs:
        vals = torch.nn.functional.pad(vals[:n_elements], (0, nb * bs - n_elements))
    out = (vals.view(nb, bs) * a.to(b.device).view(nb, 1)).reshape(-1)[:n_elements]
    return out.to(out_dtype).to(torch.float32)
