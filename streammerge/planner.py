"""MergePlan: every output tensor, where its bytes go, and the operation that makes them.

Built from headers alone, validated before any tensor data is read, and serializable to JSON
(`streammerge plan --json`). The executor does nothing the plan does not say.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
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
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    op: str  # "copy" (bytes as they are) | "cast" (dtype change) | "merge" (base + LoRA terms)
    source: Source
    loras: tuple[LoraTerm, ...] = ()
    start: int = 0  # absolute offsets in the output shard
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.start


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

        shards = tuple(
            OutputShard(
                s["filename"], s["size"], s["header_size"],
                tuple(
                    OutputTensor(
                        t["name"], t["dtype"], tuple(t["shape"]), t["op"], source(t["source"]),
                        tuple(LoraTerm(**{**l, "a": source(l["a"]), "b": source(l["b"])}) for l in t["loras"]),
                        t["start"], t["end"],
                    )
                    for t in s["tensors"]
                ),
            )
            for s in data["shards"]
        )
        return cls(
            base=data["base"], adapters=tuple(data["adapters"]), options=MergeOptions(**data["options"]),
            shards=shards, streammerge_version=data["streammerge_version"], notes=tuple(data.get("notes", ())),
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
    """A pure function of headers + adapters + options."""
    base_shapes = {name: ref.info.shape for name, ref in checkpoint.tensors.items()}
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
        dtype = output_dtype(ref.info, options)
        loras = tuple(terms.pop(name, ()))
        if loras and ref.info.dtype not in FLOAT_DTYPES:
            raise PlanError(f"base tensor {name} has dtype {ref.info.dtype}; only floating-point weights can be merged")
        op = "merge" if loras else ("cast" if dtype != ref.info.dtype else "copy")
        spec = TensorSpec(name, dtype, tuple(ref.info.shape))
        pending.append((spec, OutputTensor(name, dtype, spec.shape, op, Source.of(ref.file, ref.info), loras)))
    if terms:  # every LoRA term must have found its base tensor
        raise PlanError(f"LoRA terms left unapplied for {sorted(terms)[:3]}")

    by_name = {spec.name: tensor for spec, tensor in pending}
    groups = split_into_shards([spec for spec, _ in pending], options.max_shard_size)
    shards = []
    for filename, group in zip(shard_filenames(len(groups)), groups):
        ordered = save_order(group)
        header, offsets = build_header(ordered, SHARD_METADATA)
        tensors = tuple(
            _with_offsets(by_name[spec.name], *offsets[spec.name]) for spec in ordered
        )
        size = len(header) + sum(spec.nbytes for spec in ordered)
        shards.append(OutputShard(filename, size, len(header), tensors))

    plan = MergePlan(
        base=str(checkpoint.root),
        adapters=tuple({"path": str(a.path), "weight": a.weight} for a in adapters),
        options=options,
        shards=tuple(shards),
    )
    validate(plan, checkpoint, adapters)
    return plan


def _with_offsets(tensor: OutputTensor, start: int, end: int) -> OutputTensor:
    return OutputTensor(tensor.name, tensor.dtype, tensor.shape, tensor.op, tensor.source, tensor.loras, start, end)


def validate(plan: MergePlan, checkpoint: Checkpoint, adapters: Sequence[Adapter]) -> None:
    """Every base tensor written exactly once, every adapter tensor used exactly once, shapes agree."""
    names = [t.name for t in plan.tensors]
    if sorted(names) != sorted(checkpoint.tensors) or len(set(names)) != len(names):
        raise PlanError("internal error: the plan does not write every base tensor exactly once")
    used: dict[tuple[str, str], int] = {}
    for t in plan.tensors:
        for term in t.loras:
            for src in (term.a, term.b):
                used[(src.file, src.name)] = used.get((src.file, src.name), 0) + 1
            rows, cols = (t.shape[1], t.shape[0]) if term.transpose else t.shape
            if term.b.shape[0] != rows or term.a.shape[1] != cols or term.a.shape[0] != term.b.shape[1]:
                raise PlanError(f"{t.name}: LoRA shapes {term.b.shape} @ {term.a.shape} do not fit {t.shape}")
    for adapter in adapters:
        for key in adapter.header.tensors:
            count = used.get((str(adapter.weights_file), key), 0)
            if count != 1:
                raise PlanError(f"{adapter.weights_file}: tensor {key!r} would be applied {count} times; expected once")


# ------------------------------------------------------------------------------------ summaries


def summary_lines(plan: MergePlan, *, free_disk: int | None = None, max_rows_note: str | None = None,
                  disk: str | None = None) -> list[str]:
    """The plan's human summary; `disk` (a prepared line) replaces the plain free-space figure."""
    counts = plan.counts()
    n_terms = sum(len(t.loras) for t in plan.tensors)
    lines = [
        f"base:       {plan.base}",
        *[f"adapter:    {a['path']}" + (f" (weight {a['weight']:g})" if a["weight"] != 1.0 else "") for a in plan.adapters],
        f"method:     {plan.options.method}" + (f", dtype {plan.options.dtype}" if plan.options.dtype else ", dtype as base"),
        f"tensors:    {len(plan.tensors)} total: {counts.get('merge', 0)} merged ({n_terms} LoRA terms), "
        f"{counts.get('copy', 0)} copied, {counts.get('cast', 0)} cast",
        f"output:     {format_size(plan.total_size)} in {len(plan.shards)} shard(s) "
        f"(max shard size {format_size(plan.options.max_shard_size)})",
        f"memory:     budget {format_size(plan.options.max_memory)} for tensor data",
    ]
    if disk is not None:
        lines.append(f"disk:       {disk}")
    elif free_disk is not None:
        verdict = "ok" if free_disk >= plan.file_bytes else "NOT ENOUGH"
        lines.append(f"disk:       needs {format_size(plan.file_bytes)}, free {format_size(free_disk)} ({verdict})")
    for shard in plan.shards:
        lines.append(f"  {shard.filename}: {len(shard.tensors)} tensors, {format_size(shard.size)}")
    return lines


def widest_row_bytes(plan: MergePlan) -> int:
    return max((math.prod(t.shape[1:]) * ITEMSIZE[t.dtype] for t in plan.tensors if t.shape), default=0)
