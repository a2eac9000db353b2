"""Merge options as one typed, JSON-serializable dataclass, plus the parsers for its string forms.

Kept free of torch so the CLI can validate arguments before importing anything heavy.
"""

from __future__ import annotations

import re
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import OptionError

METHODS = ("merged_16bit", "merged_4bit", "merged_fp8", "merged_mxfp4", "lora", "gguf")
SUPPORTED_METHODS = ("merged_16bit", "merged_4bit", "merged_fp8", "merged_mxfp4", "lora", "gguf")
# merged_fp8 from a 16-bit base: which linear weights become block FP8
FP8_MODULES = ("all-linear", "experts")
# bitsandbytes 4-bit settings (the same values as streammerge.quant.bnb4, kept here torch-free)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int, what: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as transformers; KiB/MiB/GiB binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise OptionError(f"{what} must be positive, got {value}")
        return value
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise OptionError(f"{what}: cannot read size {value!r}; write a number with a unit, e.g. 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise OptionError(f"{what} must be positive, got {value!r}")
    return size


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def parse_dtype(value: str | None) -> str | None:
    if value is None:
        return None
    name = DTYPE_ALIASES.get(str(value).lower(), str(value).lower()).removeprefix("torch.")
    if name not in DTYPES:
        raise OptionError(f"--dtype {value!r} is not supported; choose one of {', '.join(DTYPES)}")
    return name


def parse_device(value: str) -> str:
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value or ""):
        return value
    raise OptionError(f"--device {value!r} is not valid; use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as given on the command line: `path/to/adapter@0.5` -> (path, 0.5)."""

    path: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        path, sep, tail = str(text).rpartition("@")
        if sep and path:
            try:
                return cls(path, float(tail))
            except ValueError:
                pass
        return cls(str(text), 1.0)


def _codec_method(method: str) -> bool:
    """A --method that a registered codec writes (formats.codecs; imported only for such a name)."""
    from .formats import codecs

    return codecs.for_method(method) is not None


def _codec_methods() -> tuple[str, ...]:
    from .formats import codecs

    return tuple(codecs.methods())


def _check_quant_options(method, quant_type, blocksize, double_quant, base_roundtrip):
    """4-bit settings: --quant-type is merged_4bit's; --blocksize / --double-quant describe the 4-bit
    format of merged_4bit's output and of --base-roundtrip's round trip, so they need one of them."""
    if quant_type is not None:
        quant_type = str(quant_type).lower()
        if quant_type not in QUANT_TYPES:
            raise OptionError(f"--quant-type {quant_type!r} is not supported; choose {' or '.join(QUANT_TYPES)}")
        if method != "merged_4bit":
            raise OptionError("--quant-type only applies to --method merged_4bit; add it or drop the option")
    if base_roundtrip is not None:
        base_roundtrip = str(base_roundtrip).lower()
        if base_roundtrip not in QUANT_TYPES:
            raise OptionError(f"--base-roundtrip {base_roundtrip!r} is not supported; choose {' or '.join(QUANT_TYPES)}")
    if blocksize is not None:
        try:
            blocksize = int(blocksize)
        except (TypeError, ValueError):
            raise OptionError(f"--blocksize {blocksize!r} is not a number; choose one of {BLOCKSIZES}") from None
        if blocksize not in BLOCKSIZES:
            raise OptionError(f"--blocksize {blocksize} is not supported by bitsandbytes; choose one of {BLOCKSIZES}")
    if (blocksize is not None or double_quant is not None) and method != "merged_4bit" and base_roundtrip is None:
        raise OptionError(
            "--blocksize and --double-quant/--no-double-quant describe a 4-bit format: use them with "
            "--method merged_4bit or --base-roundtrip"
        )
    return quant_type, blocksize, base_roundtrip


@dataclass(frozen=True)
class MergeOptions:
    method: str = "merged_16bit"
    dtype: str | None = None
    max_shard_size: int = 5 * 10**9
    max_memory: int = 2 * 10**9
    device: str = "auto"
    max_chunk_rows: int | None = None
    allow_nonfinite: bool = False  # write NaN/Inf from adapters or the merge instead of refusing
    extra: dict[str, Any] = field(default_factory=dict)
    # merged_4bit output format; None = the base's quantization_config, else nf4 / 64 / double quant
    quant_type: str | None = None
    blocksize: int | None = None
    double_quant: bool | None = None
    # QLoRA-faithful merge onto a 16-bit base: W -> dequantize(quantize(W)) before adding the delta
    base_roundtrip: str | None = None

    @classmethod
    def create(
        cls,
        *,
        method: str = "merged_16bit",
        dtype: str | None = None,
        max_shard_size: str | int = "5GB",
        max_memory: str | int = "2GB",
        device: str = "auto",
        max_chunk_rows: int | None = None,
        allow_nonfinite: bool = False,
        gguf_type: str | None = None,
        quant_type: str | None = None,
        blocksize: int | str | None = None,
        double_quant: bool | None = None,
        base_roundtrip: str | None = None,
        fp8_modules: str | None = None,
    ) -> "MergeOptions":
        if method not in METHODS and not _codec_method(method):
            raise OptionError(f"--method {method!r} is not known; choose one of {', '.join(METHODS + _codec_methods())}")
        if method not in SUPPORTED_METHODS and not _codec_method(method):
            raise OptionError(
                f"--method {method} is not yet supported in this version; use one of {', '.join(SUPPORTED_METHODS)}"
            )
        if max_chunk_rows is not None and max_chunk_rows < 1:
            raise OptionError("max_chunk_rows must be at least 1")
        extra: dict[str, Any] = {}
        if method == "gguf":
            from .formats.gguf.types import parse_gguf_type

            if dtype is not None:
                raise OptionError("--dtype does not apply to --method gguf; choose the tensor type with --gguf-type")
            extra["gguf_type"] = parse_gguf_type(gguf_type)
        elif gguf_type is not None:
            raise OptionError("--gguf-type applies only to --method gguf")
        if fp8_modules is not None:
            if method != "merged_fp8":
                raise OptionError("--fp8-modules applies only to --method merged_fp8")
            if fp8_modules not in FP8_MODULES:
                raise OptionError(f"--fp8-modules {fp8_modules!r} is not known; choose {' or '.join(FP8_MODULES)}")
            extra["fp8_modules"] = fp8_modules
        quant_type, blocksize, base_roundtrip = _check_quant_options(method, quant_type, blocksize, double_quant, base_roundtrip)
        return cls(
            method=method,
            dtype=parse_dtype(dtype),
            max_shard_size=parse_size(max_shard_size, "--max-shard-size"),
            max_memory=parse_size(max_memory, "--max-memory"),
            device=parse_device(device),
            max_chunk_rows=max_chunk_rows,
            allow_nonfinite=bool(allow_nonfinite),
            extra=extra,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=None if double_quant is None else bool(double_quant),
            base_roundtrip=base_roundtrip,
        )

    @property
    def gguf_type(self) -> str | None:
        return self.extra.get("gguf_type")

    @property
    def fp8_modules(self) -> str | None:
        """merged_fp8: "all-linear" | "experts" as asked (None: the base's own scheme, else all-linear)."""
        return self.extra.get("fp8_modules")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AdapterArg = str | Path | AdapterSpec | tuple[str, float]  # what merge/plan/verify accept per adapter


def adapter_specs(adapters) -> list[AdapterSpec]:
    """Adapter arguments (a path, `path@weight`, an AdapterSpec or a (path, weight) pair, or a list of them)."""
    if isinstance(adapters, (str, Path, AdapterSpec)):
        adapters = [adapters]
    specs = []
    for a in adapters:
        if isinstance(a, AdapterSpec):
            specs.append(a)
        elif isinstance(a, tuple):
            specs.append(AdapterSpec(str(a[0]), float(a[1])))
        else:
            specs.append(AdapterSpec.parse(str(a)))
    return specs
