"""The plan's types: every output tensor, where its bytes go, and the operation that makes them.

Pure data, built by `plan.build` from headers alone and serializable to JSON (`streammerge plan
--json`); the executor and the verifier do nothing these do not say. Nothing here imports the
rest of the project but options, so every layer can name a plan.
"""

from __future__ import annotations

import base64
import json
import functools
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..options import MergeOptions
from ..version import __version__

if TYPE_CHECKING:
    from ..formats.safetensors import TensorInfo

SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class Source:
    """A byte range of an input file holding one tensor."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @classmethod
    def of(cls, file: Path, info: TensorInfo) -> "Source":
        return cls(str(file), info.name, info.dtype, tuple(info.shape), info.start, info.end)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Source":
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class LoraTerm:
    """One adapter's change to one tensor, applied in float32.

    kind "lora"/"embedding": `weight * scale * (B @ A)`, transposed when the base stores the weight
    as [in, out] (GPT-2 Conv1D, embeddings); "dora": the same delta, then PEFT's DoRA rescaling by
    `magnitude` / norm (per row, or per column when transposed); "moe": per-expert deltas of a 3-D
    expert tensor (`experts` experts, A [r*E, in], B [out, r*E] as PEFT's ParamWrapper); `expert`
    and `b_rows` select one expert's factors and a row range of B (a fused expert parameter stored
    in per-expert pieces); "bias": `weight * scale * b` added to a bias vector (`a` is None);
    "token_rows": rows `indices` replaced by the rows of `b` (`a` is None).
    """

    adapter: int
    module: str
    a: Source | None
    b: Source
    scale: float
    weight: float
    transpose: bool
    kind: str = "lora"
    magnitude: Source | None = None
    experts: int = 0
    expert: int | None = None
    b_rows: tuple[int, int] | None = None
    indices: tuple[int, ...] = ()

    @property
    def factor(self) -> float:
        return self.weight * self.scale

    def sources(self) -> list[Source]:
        return [s for s in (self.a, self.b, self.magnitude) if s is not None]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraTerm":
        src = {k: (Source.from_dict(d[k]) if d.get(k) is not None else None) for k in ("a", "b", "magnitude")}
        b_rows = tuple(d["b_rows"]) if d.get("b_rows") is not None else None
        return cls(**{**d, **src, "b_rows": b_rows, "indices": tuple(d.get("indices", ()))})


@dataclass(frozen=True)
class QuantIn:
    """A bitsandbytes base weight: `OutputTensor.source` is its packed data, `companions` its statistics
    (read once per tensor), `format` the codec's JSON (streammerge.quant.bnb4.Bnb4Format / int8.Int8Format)."""

    codec: str  # "bnb4" | "int8"
    format: dict[str, Any]
    companions: tuple[Source, ...] = ()


QUANT_PARTS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state")


@dataclass(frozen=True)
class QuantOut:
    """One tensor of a quantized output weight: bitsandbytes 4-bit (as `quantize_4bit` + `QuantState.as_dict`
    make it; parts in QUANT_PARTS) or block FP8 (`weight` + `weight_scale_inv`; quant_type "e4m3",
    blocksize the tile side).

    The `weight` part (packed bytes) carries the source and the LoRA terms; the statistic parts name
    that tensor in `weight` and are derived from the merged weight's per-block absmax.
    """

    part: str  # one of QUANT_PARTS
    weight: str  # output name of the packed weight
    shape: tuple[int, ...]  # logical shape of the weight
    quant_type: str
    blocksize: int
    double_quant: bool
    dtype: str  # quant-state dtype: what dequantize_4bit returns (block FP8: the model's dtype)
    quant_storage: str = "uint8"
    codec: str = "bnb4"  # the quantized-weight codec that writes it ("bnb4" | "fp8")

    @property
    def exact_size(self) -> bool:
        """False only for the double-quant quant-state JSON, whose length depends on the data."""
        return not (self.part == "quant_state" and self.double_quant)


@dataclass(frozen=True)
class Roundtrip:
    """`--base-roundtrip`: the base weight is replaced by dequantize_4bit(quantize_4bit(W)) first."""

    quant_type: str
    blocksize: int
    double_quant: bool


@dataclass(frozen=True)
class RowTransform:
    """What llama.cpp's converter does to a tensor's float32 rows before storing them."""

    permute_heads: int = 0  # q/k: HF's rotate-half row order -> interleaved, per head
    shift: float = 0.0  # added to every value (Gemma's norms store w + 1)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # "copy" (bytes as they are) | "cast" (dtype change) | "merge" (base + LoRA/DoRA/MoE terms) |
    # "replace" (a full tensor from an adapter) | "bias_add" (bias + lora_bias terms) | "token_rows"
    # "dequant" (bitsandbytes base -> float) | "quant" (one tensor of a bitsandbytes 4-bit output)
    op: str
    source: Source | None  # None only for op "constant"
    loras: tuple[LoraTerm, ...] = ()
    start: int = 0  # absolute offsets in the output shard
    end: int = 0
    quant_in: QuantIn | None = None  # the source is a bitsandbytes weight, decoded before the math
    quant_out: QuantOut | None = None  # the output is (part of) a bitsandbytes 4-bit weight
    roundtrip: Roundtrip | None = None
    # the stored bytes are this codec's encoding of the float32 merged rows (formats.codecs), of a
    # weight whose shape is `logical_shape` (None: `shape`); None is a plain cast to `dtype`
    encoding: str | None = None
    logical_shape: tuple[int, ...] | None = None
    transform: RowTransform | None = None  # applied to the float32 rows before encoding (GGUF)
    values: tuple[float, ...] | None = None  # op "constant": a tensor generated from these values

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape the math sees: the logical weight for a 4-bit output or an encoding, else the tensor's shape."""
        if self.quant_out is not None:
            return tuple(self.quant_out.shape)
        return tuple(self.logical_shape) if self.logical_shape is not None else self.shape


@dataclass(frozen=True)
class OutputShard:
    filename: str
    size: int
    header_size: int
    tensors: tuple[OutputTensor, ...]  # in file order
    # the container that places the tensors: "safetensors" renders its header from `tensors`;
    # "gguf" carries the header rendered at planning time (metadata, vocabulary, tensor infos)
    container: str = "safetensors"
    header: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class MergePlan:
    base: str
    adapters: tuple[dict[str, Any], ...]
    options: MergeOptions
    shards: tuple[OutputShard, ...]
    streammerge_version: str = __version__
    notes: tuple[str, ...] = field(default_factory=tuple)
    untied: tuple[tuple[str, str], ...] = ()  # (output embedding, input embedding) written separately

    @property
    def tied_copies(self) -> set[str]:
        return {h for h, _ in self.untied}
    quantization_config: dict[str, Any] | None = None  # config.json's, for a merged_4bit output

    @property
    def tensors(self) -> list[OutputTensor]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def total_size(self) -> int:
        """Tensor bytes, as the index's `metadata.total_size` counts them."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.op] = out.get(t.op, 0) + 1
        return out

    def term_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            for term in t.loras:
                out[term.kind] = out.get(term.kind, 0) + 1
        return out

    def coverage(self) -> dict[str, int]:
        """Adapter tensors the plan uses, of those the adapters hold (validation makes them equal)."""
        return {
            "adapter_tensors": sum(a.get("tensors", 0) for a in self.adapters),
            "used": sum(a.get("used", 0) for a in self.adapters),
        }

    def to_dict(self) -> dict[str, Any]:
        data = _plain(self)
        for shard in data["shards"]:  # fields at their defaults are left out: the JSON of a plain plan
            _drop_defaults(shard, _SHARD_DEFAULTS)
            if shard.get("header") is not None:
                shard["header"] = base64.b64encode(shard["header"]).decode("ascii")
            for t in shard["tensors"]:
                _drop_defaults(t, _TENSOR_DEFAULTS)
        data["total_size"] = self.total_size
        data["coverage"] = {**self.coverage(), "ops": self.counts(), "terms": self.term_counts()}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MergePlan":
        def quant_in(d: dict | None) -> QuantIn | None:
            return None if d is None else QuantIn(d["codec"], d["format"], tuple(Source.from_dict(c) for c in d["companions"]))

        def quant_out(d: dict | None) -> QuantOut | None:
            return None if d is None else QuantOut(**{**d, "shape": tuple(d["shape"])})

        shards = tuple(
            OutputShard(
                s["filename"], s["size"], s["header_size"],
                tuple(
                    OutputTensor(
                        t["name"], t["dtype"], tuple(t["shape"]), t["op"], Source.from_dict(t["source"]) if t["source"] is not None else None,
                        tuple(LoraTerm.from_dict(l) for l in t["loras"]),
                        t["start"], t["end"], quant_in(t.get("quant_in")), quant_out(t.get("quant_out")),
                        Roundtrip(**t["roundtrip"]) if t.get("roundtrip") else None,
                        t.get("encoding"),
                        tuple(t["logical_shape"]) if t.get("logical_shape") is not None else None,
                        RowTransform(**t["transform"]) if t.get("transform") else None,
                        tuple(t["values"]) if t.get("values") is not None else None,
                    )
                    for t in s["tensors"]
                ),
                s.get("container", "safetensors"),
                base64.b64decode(s["header"]) if s.get("header") is not None else None,
            )
            for s in data["shards"]
        )
        return cls(
            base=data["base"], adapters=tuple(data["adapters"]), options=MergeOptions(**data["options"]),
            shards=shards, streammerge_version=data["streammerge_version"], notes=tuple(data.get("notes", ())),
            untied=tuple(tuple(p) for p in data.get("untied", ())),
            quantization_config=data.get("quantization_config"),
        )


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


_LEAVES = frozenset({str, int, float, bool, bytes, type(None)})


def _plain(value: Any) -> Any:
    """`dataclasses.asdict` without its deep copy of every leaf (a 90k-tensor plan several times faster)."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind is tuple or kind is list:
        return kind(v if type(v) in _LEAVES else _plain(v) for v in value)
    if kind is dict:
        return {k: v if type(v) in _LEAVES else _plain(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        out = {}
        for name in _field_names(kind):
            v = getattr(value, name)
            out[name] = v if type(v) in _LEAVES else _plain(v)
        return out
    return value


_TENSOR_DEFAULTS = {"encoding": None, "logical_shape": None, "transform": None, "values": None}
_SHARD_DEFAULTS = {"container": "safetensors", "header": None}


def _drop_defaults(d: dict[str, Any], defaults: dict[str, Any]) -> None:
    for key, default in defaults.items():
        if d.get(key, default) == default:
            d.pop(key, None)
