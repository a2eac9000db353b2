"""MergePlan: every output tensor, where its bytes go, and the operation that makes them.

Built from headers alone, validated before any tensor data is read, and serializable to JSON
(`streammerge plan --json`). The executor does nothing the plan does not say.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .adapters import Adapter, LoraFactors, resolve_factors
from .errors import PlanError
from .io.checkpoint import Checkpoint
from .io.safetensors import FLOAT_DTYPES, FROM_TORCH_NAME, ITEMSIZE, TensorInfo, TensorSpec, build_header, save_order
from .options import MergeOptions, format_size

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


@dataclass(frozen=True)
class LoraTerm:
    """`weight * scale * (B @ A)`, transposed when the base stores the weight as [in, out]."""

    adapter: int
    module: str
    a: Source
    b: Source
    scale: float
    weight: float
    transpose: bool

    @property
    def factor(self) -> float:
        return self.weight * self.scale


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
    """One tensor of a bitsandbytes 4-bit output weight, as `quantize_4bit` + `QuantState.as_dict` make it.

    The `weight` part (packed bytes) carries the source and the LoRA terms; the statistic parts name
    that tensor in `weight` and are derived from the merged weight's per-block absmax.
    """

    part: str  # one of QUANT_PARTS
    weight: str  # output name of the packed weight
    shape: tuple[int, ...]  # logical shape of the weight
    quant_type: str
    blocksize: int
    double_quant: bool
    dtype: str  # quant-state dtype: what dequantize_4bit returns
    quant_storage: str = "uint8"

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
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # "copy" (bytes as they are) | "cast" (dtype change) | "merge" (base + LoRA terms) |
    # "dequant" (bitsandbytes base -> float) | "quant" (one tensor of a bitsandbytes 4-bit output)
    op: str
    source: Source
    loras: tuple[LoraTerm, ...] = ()
    start: int = 0  # absolute offsets in the output shard
    end: int = 0
    quant_in: QuantIn | None = None  # the source is a bitsandbytes weight, decoded before the math
    quant_out: QuantOut | None = None  # the output is (part of) a bitsandbytes 4-bit weight
    roundtrip: Roundtrip | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape the math sees: the logical weight for a 4-bit output, else the tensor's shape."""
        return tuple(self.quant_out.shape) if self.quant_out is not None else self.shape


@dataclass(frozen=True)
class OutputShard:
    filename: str
    size: int
    header_size: int
    tensors: tuple[OutputTensor, ...]  # in file order


@dataclass(frozen=True)
class MergePlan:
    base: str
    adapters: tuple[dict[str, Any], ...]
    options: MergeOptions
    shards: tuple[OutputShard, ...]
    streammerge_version: str = __version__
    notes: tuple[str, ...] = field(default_factory=tuple)
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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_size"] = self.total_size
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MergePlan":
        def source(d: dict) -> Source:
            return Source(**{**d, "shape": tuple(d["shape"])})

        def quant_in(d: dict | None) -> QuantIn | None:
            return None if d is None else QuantIn(d["codec"], d["format"], tuple(source(c) for c in d["companions"]))

        def quant_out(d: dict | None) -> QuantOut | None:
            return None if d is None else QuantOut(**{**d, "shape": tuple(d["shape"])})

        shards = tuple(
            OutputShard(
                s["filename"], s["size"], s["header_size"],
                tuple(
                    OutputTensor(
                        t["name"], t["dtype"], tuple(t["shape"]), t["op"], source(t["source"]),
                        tuple(LoraTerm(**{**l, "a": source(l["a"]), "b": source(l["b"])}) for l in t["loras"]),
                        t["start"], t["end"], quant_in(t.get("quant_in")), quant_out(t.get("quant_out")),
                        Roundtrip(**t["roundtrip"]) if t.get("roundtrip") else None,
                    )
                    for t in s["tensors"]
                ),
            )
            for s in data["shards"]
        )
        return cls(
            base=data["base"], adapters=tuple(data["adapters"]), options=MergeOptions(**data["options"]),
            shards=shards, streammerge_version=data["streammerge_version"], notes=tuple(data.get("notes", ())),
            quantization_config=data.get("quantization_config"),
        )


# ----------------------------------------------------------------------------------------- build


def shard_filenames(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def split_into_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """transformers' rule (huggingface_hub `split_torch_state_dict_into_shards`), in the given order:
    a tensor larger than the limit gets a shard of its own; otherwise a new shard starts when the
    next tensor would tip the current one over the limit."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_size = 0
    for spec in specs:
        size = spec.nbytes
        if size > max_shard_size:
            shards.append([spec])
            continue
        if current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(spec)
        current_size += size
    if current:
        shards.append(current)
    return shards or [[]]


def output_dtype(info: TensorInfo, options: MergeOptions) -> str:
    if options.dtype is None or info.dtype not in FLOAT_DTYPES:
        return info.dtype
    return FROM_TORCH_NAME[options.dtype]


def build_plan(checkpoint: Checkpoint, adapters: Sequence[Adapter], options: MergeOptions) -> MergePlan:
    """A pure function of headers + adapters + options (bitsandbytes weights: + their quant-state JSON)."""
    from .quant.planning import QuantPlanner

    quant = QuantPlanner(checkpoint, options)
    base_shapes = quant.logical_shapes()
    terms: dict[str, list[LoraTerm]] = {}
    for index, adapter in enumerate(adapters):
        factors: dict[str, LoraFactors] = resolve_factors(adapter, base_shapes)
        adapter.factors = factors
        for target, f in factors.items():
            terms.setdefault(target, []).append(
                LoraTerm(
                    adapter=index, module=f.module,
                    a=Source.of(adapter.weights_file, f.a), b=Source.of(adapter.weights_file, f.b),
                    scale=f.scale, weight=adapter.weight, transpose=f.fan_in_fan_out,
                )
            )

    pending: list[tuple[TensorSpec, OutputTensor]] = []
    for name, ref in checkpoint.tensors.items():
        if quant.is_companion(name):
            continue  # consumed with its quantized weight
        loras = tuple(terms.pop(name, ()))
        entries = quant.entries(name, ref, loras)
        if entries is not None:
            pending.extend(entries)
            continue
        dtype = output_dtype(ref.info, options)
        if loras and ref.info.dtype not in FLOAT_DTYPES:
            raise PlanError(f"base tensor {name} has dtype {ref.info.dtype}; only floating-point weights can be merged")
        op = "merge" if loras else ("cast" if dtype != ref.info.dtype else "copy")
        spec = TensorSpec(name, dtype, tuple(ref.info.shape))
        pending.append((spec, OutputTensor(name, dtype, spec.shape, op, Source.of(ref.file, ref.info), loras,
                                           roundtrip=quant.roundtrip_for(name, loras))))
    if terms:  # every LoRA term must have found its base tensor
        raise PlanError(f"LoRA terms left unapplied for {sorted(terms)[:3]}")

    by_name = {spec.name: tensor for spec, tensor in pending}
    groups = split_into_shards([spec for spec, _ in pending], options.max_shard_size)
    shards = [layout_shard(filename, [by_name[spec.name] for spec in group])
              for filename, group in zip(shard_filenames(len(groups)), groups)]

    qconfig = None
    if options.method == "merged_4bit":
        model_dtype = options.dtype or config_model_dtype(checkpoint.config) or "bfloat16"
        qconfig = quant.quantization_config([t for _, t in pending], model_dtype)
    plan = MergePlan(
        base=str(checkpoint.root),
        adapters=tuple({"path": str(a.path), "weight": a.weight} for a in adapters),
        options=options,
        shards=tuple(shards),
        quantization_config=qconfig,
    )
    validate(plan, checkpoint, adapters)
    return plan


def config_model_dtype(config: dict[str, Any] | None) -> str | None:
    from .quant.checkpoint import config_dtype

    return config_dtype(config)


def layout_shard(filename: str, tensors: Sequence[OutputTensor]) -> OutputShard:
    """Order `tensors` as safetensors saves them and give each its byte range in the shard."""
    ordered = save_order([TensorSpec(t.name, t.dtype, t.shape) for t in tensors])
    by_name = {t.name: t for t in tensors}
    header, offsets = build_header(ordered, SHARD_METADATA)
    placed = tuple(_with_offsets(by_name[spec.name], *offsets[spec.name]) for spec in ordered)
    return OutputShard(filename, len(header) + sum(spec.nbytes for spec in ordered), len(header), placed)


def resize_shard(shard: OutputShard, shapes: dict[str, tuple[int, ...]]) -> OutputShard:
    """The shard with some tensors' final shapes (the double-quant quant-state JSON, whose length is
    known only once its weight's statistics are): header, offsets and size recomputed."""
    if not shapes:
        return shard
    return layout_shard(shard.filename, [replace(t, shape=tuple(shapes.get(t.name, t.shape))) for t in shard.tensors])


def _with_offsets(tensor: OutputTensor, start: int, end: int) -> OutputTensor:
    return replace(tensor, start=start, end=end)


def validate(plan: MergePlan, checkpoint: Checkpoint, adapters: Sequence[Adapter]) -> None:
    """Every base tensor consumed exactly once (a quantized weight with its statistics), every output
    name unique, every adapter tensor used exactly once, shapes agree."""
    names = [t.name for t in plan.tensors]
    if len(set(names)) != len(names):
        raise PlanError("internal error: the plan writes a tensor name twice")
    consumed: list[str] = []
    for t in plan.tensors:
        if t.quant_out is not None and t.quant_out.part != "weight":
            continue  # derived from its weight's statistics
        consumed.append(t.source.name)
        if t.quant_in is not None:
            consumed.extend(c.name for c in t.quant_in.companions)
    if sorted(consumed) != sorted(checkpoint.tensors):
        raise PlanError("internal error: the plan does not consume every base tensor exactly once")
    used: dict[tuple[str, str], int] = {}
    for t in plan.tensors:
        for term in t.loras:
            for src in (term.a, term.b):
                used[(src.file, src.name)] = used.get((src.file, src.name), 0) + 1
            shape = t.weight_shape
            rows, cols = (shape[1], shape[0]) if term.transpose else shape
            if term.b.shape[0] != rows or term.a.shape[1] != cols or term.a.shape[0] != term.b.shape[1]:
                raise PlanError(f"{t.name}: LoRA shapes {term.b.shape} @ {term.a.shape} do not fit {shape}")
    for adapter in adapters:
        for key in adapter.header.tensors:
            count = used.get((str(adapter.weights_file), key), 0)
            if count != 1:
                raise PlanError(f"{adapter.weights_file}: tensor {key!r} would be applied {count} times; expected once")


# ------------------------------------------------------------------------------------ summaries


def summary_lines(plan: MergePlan, *, free_disk: int | None = None, max_rows_note: str | None = None) -> list[str]:
    counts = plan.counts()
    n_terms = sum(len(t.loras) for t in plan.tensors)
    lines = [
        f"base:       {plan.base}",
        *[f"adapter:    {a['path']}" + (f" (weight {a['weight']:g})" if a["weight"] != 1.0 else "") for a in plan.adapters],
        f"method:     {plan.options.method}" + (f", dtype {plan.options.dtype}" if plan.options.dtype else ", dtype as base"),
        f"tensors:    {len(plan.tensors)} total: {sum(1 for t in plan.tensors if t.loras)} merged ({n_terms} LoRA terms), "
        f"{counts.get('copy', 0)} copied, {counts.get('cast', 0)} cast"
        + (f", {counts['dequant']} dequantized" if counts.get("dequant") else "")
        + (f", {counts['quant']} 4-bit tensors" if counts.get("quant") else ""),
        f"output:     {format_size(plan.total_size)} in {len(plan.shards)} shard(s) "
        f"(max shard size {format_size(plan.options.max_shard_size)})",
        f"memory:     budget {format_size(plan.options.max_memory)} for tensor data",
    ]
    if free_disk is not None:
        verdict = "ok" if free_disk >= plan.file_bytes else "NOT ENOUGH"
        lines.append(f"disk:       needs {format_size(plan.file_bytes)}, free {format_size(free_disk)} ({verdict})")
    for shard in plan.shards:
        lines.append(f"  {shard.filename}: {len(shard.tensors)} tensors, {format_size(shard.size)}")
    return lines


def widest_row_bytes(plan: MergePlan) -> int:
    return max((math.prod(t.shape[1:]) * ITEMSIZE[t.dtype] for t in plan.tensors if t.shape), default=0)
