"""MergePlan: every output tensor, where its bytes go, and the operation that makes them.

Built from headers alone, validated before any tensor data is read, and serializable to JSON
(`streammerge plan --json`). The executor does nothing the plan does not say.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .adapters import Adapter
from .errors import PlanError, UnsupportedError
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
    # "copy" (bytes as they are) | "cast" (dtype change) | "merge" (base + LoRA/DoRA/MoE terms) |
    # "replace" (a full tensor from an adapter) | "bias_add" (bias + lora_bias terms) | "token_rows"
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
        data = asdict(self)
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
                        t["name"], t["dtype"], tuple(t["shape"]), t["op"], Source.from_dict(t["source"]),
                        tuple(LoraTerm.from_dict(l) for l in t["loras"]),
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
            untied=tuple(tuple(p) for p in data.get("untied", ())),
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


def _term(t) -> LoraTerm:
    """A composed edit as the plan's JSON-serializable term."""
    edit, file = t.edit, t.file
    src = lambda info: Source.of(file, info) if info is not None else None  # noqa: E731
    if edit.factors is not None:
        f = edit.factors
        return LoraTerm(
            adapter=t.adapter, module=f.module, a=src(f.a), b=src(f.b), scale=f.scale, weight=t.weight,
            transpose=f.fan_in_fan_out, kind=f.kind, magnitude=src(f.magnitude), experts=f.experts,
            expert=f.expert, b_rows=f.b_rows,
        )
    module = edit.target.rpartition(".")[0]
    return LoraTerm(adapter=t.adapter, module=module, a=None, b=src(edit.tensor), scale=edit.scale, weight=t.weight,
                    transpose=False, kind=edit.kind, indices=edit.indices)


def _ties(checkpoint: Checkpoint) -> dict[str, str]:
    """Output tensors tied to a checkpoint tensor and absent from it (only when the config ties)."""
    from .model_info import guess_ties, model_info, ties_requested

    if not ties_requested(checkpoint.config):
        return {}
    try:
        return dict(model_info(checkpoint).tied)
    except UnsupportedError:  # transformers cannot build this model: the common names
        return guess_ties(set(checkpoint.tensors))


def build_plan(checkpoint: Checkpoint, adapters: Sequence[Adapter], options: MergeOptions) -> MergePlan:
    """A pure function of headers + adapters + options (bitsandbytes weights: + their quant-state JSON)."""
    from .compose import compose, op_of
    from .model_info import model_info
    from .quant.planning import QuantPlanner

    quant = QuantPlanner(checkpoint, options)

    composition = compose(checkpoint, adapters, _ties(checkpoint), lambda: model_info(checkpoint),
                          shapes=quant.logical_shapes(), quantized=set(quant.weights))
    pending: list[tuple[TensorSpec, OutputTensor]] = []
    for name, recipe in composition.recipes.items():
        if quant.is_companion(name):
            continue  # consumed with its quantized weight
        loras = tuple(_term(t) for t in recipe.terms if t.edit.kind != "replace")
        ref = checkpoint.tensors.get(name) if recipe.replaced_by is None else None
        entries = quant.entries(name, ref, loras) if ref is not None else None
        if entries is not None:
            pending.extend(entries)
            continue
        dtype = output_dtype(recipe.base, options)
        op = op_of(recipe, dtype)
        spec = TensorSpec(name, dtype, tuple(recipe.base.shape))
        roundtrip = quant.roundtrip_for(name, loras) if op == "merge" and recipe.replaced_by is None else None
        pending.append((spec, OutputTensor(name, dtype, spec.shape, op, Source.of(recipe.source_file, recipe.source),
                                           loras, roundtrip=roundtrip)))

    by_name = {spec.name: tensor for spec, tensor in pending}
    groups = split_into_shards([spec for spec, _ in pending], options.max_shard_size)
    shards = [layout_shard(filename, [by_name[spec.name] for spec in group])
              for filename, group in zip(shard_filenames(len(groups)), groups)]

    qconfig = None
    if options.method == "merged_4bit":
        model_dtype = options.dtype or config_model_dtype(checkpoint.config) or "bfloat16"
        qconfig = quant.quantization_config([t for _, t in pending], model_dtype)
    plan = MergePlan(
        base=checkpoint.label,
        adapters=tuple(
            {"path": str(a.path), "weight": a.weight, "tensors": len(a.header.tensors)} for a in adapters
        ),
        options=options,
        shards=tuple(shards),
        untied=tuple(composition.untied),
        quantization_config=qconfig,
    )
    validate(plan, checkpoint, adapters)
    used = adapter_uses(plan, adapters)
    return dataclasses.replace(plan, adapters=tuple(
        {**info, "used": sum(1 for n in a.header.tensors if u.get(n) == 1)} for info, a, u in zip(plan.adapters, adapters, used)
    ))


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


def _check_term_shape(t: OutputTensor, term: LoraTerm) -> None:
    """Each kind of term must fit the tensor it changes (a second line of defence after resolution)."""
    ok = True
    shape = t.weight_shape
    if term.kind in ("lora", "embedding", "dora"):
        rows, cols = (shape[1], shape[0]) if term.transpose else shape
        r = term.a.shape[0] // max(term.experts, 1)
        b_rows = (term.b_rows[1] - term.b_rows[0]) if term.b_rows else term.b.shape[0]
        ok = (len(shape) == 2 and b_rows == rows and term.a.shape[1] == cols
              and term.a.shape[0] == term.b.shape[1] and r >= 1)
        if term.kind == "dora":
            ok = ok and term.magnitude is not None and term.magnitude.shape == (rows,)
    elif term.kind == "moe":
        e = term.experts
        d_in, d_out = (t.shape[1], t.shape[2]) if term.transpose else (t.shape[2], t.shape[1])
        ok = len(t.shape) == 3 and t.shape[0] == e and term.a.shape == (term.a.shape[0], d_in) \
            and term.b.shape == (d_out, term.a.shape[0]) and term.a.shape[0] % e == 0
    elif term.kind == "bias":
        ok = term.b.shape == t.shape and len(t.shape) == 1
    elif term.kind == "token_rows":
        ok = len(t.shape) == 2 and term.b.shape == (len(term.indices), t.shape[1]) and \
            all(0 <= i < t.shape[0] for i in term.indices)
    else:
        ok = False
    if not ok:
        raise PlanError(f"{t.name}: {term.kind} term with tensors {[s.shape for s in term.sources()]} does not fit {t.shape}")


def validate(plan: MergePlan, checkpoint: Checkpoint, adapters: Sequence[Adapter]) -> None:
    """Every base tensor consumed exactly once (a quantized weight with its statistics), every output
    name unique, every adapter tensor used exactly once, shapes agree."""
    names = [t.name for t in plan.tensors]
    if len(set(names)) != len(names):
        raise PlanError("internal error: the plan writes a tensor name twice")
    copies = plan.tied_copies
    consumed: list[str] = []
    for t in plan.tensors:
        if t.quant_out is not None and t.quant_out.part != "weight":
            continue  # derived from its weight's statistics
        if t.name in copies:
            continue  # an untied copy of a base tensor
        consumed.append(t.name if t.quant_in is None else t.source.name)
        if t.quant_in is not None:
            consumed.extend(c.name for c in t.quant_in.companions)
    if sorted(consumed) != sorted(checkpoint.tensors):
        raise PlanError("internal error: the plan does not write every base tensor exactly once")
    for t in plan.tensors:
        for term in t.loras:
            _check_term_shape(t, term)
    for adapter, used in zip(adapters, adapter_uses(plan, adapters)):
        for key in adapter.header.tensors:
            count = used.get(key, 0)
            if count != 1:
                raise PlanError(f"{adapter.weights_file}: tensor {key!r} would be applied {count} times; expected once")


def adapter_uses(plan: MergePlan, adapters: Sequence[Adapter]) -> list[dict[str, int]]:
    """For each adapter, how many times the plan applies each of its tensors (validation wants 1).

    A fused expert parameter stored in per-expert pieces reads its factors once per piece: those
    count as one use when the pieces give every expert exactly one full cover of B's rows. A tied
    copy re-reads its partner's token rows and saved embedding: not a second use.
    """
    by_file = {str(a.weights_file): i for i, a in enumerate(adapters)}
    uses: list[dict[str, int]] = [{} for _ in adapters]
    pieces: dict[tuple[str, str, str], list[tuple[int, tuple[int, int], int]]] = {}

    def count(src: Source) -> None:
        i = by_file.get(src.file)
        if i is not None:
            uses[i][src.name] = uses[i].get(src.name, 0) + 1

    by_name = {t.name: t for t in plan.tensors}
    partner_of = dict(plan.untied)
    for t in plan.tensors:
        shared: set[tuple[str, str]] = set()
        if t.name in partner_of:  # what the partner already reads is not read a second time
            p = by_name[partner_of[t.name]]
            shared = {(s.file, s.name) for s in [p.source, *(s for term in p.loras for s in term.sources())]}
        if (t.source.file, t.source.name) not in shared:
            count(t.source)
        for term in t.loras:
            _check_term_shape(t, term)
            if shared and all((s.file, s.name) in shared for s in term.sources()):
                continue
            if term.expert is not None:
                rows = term.b_rows or (0, term.b.shape[0])
                pieces.setdefault((term.b.file, term.a.name, term.b.name), []).append((term.expert, rows, term.experts))
                continue
            for src in term.sources():
                count(src)
    for (file, a_name, b_name), parts in pieces.items():
        experts = parts[0][2]
        out_rows = next(t.b.shape[0] for tt in plan.tensors for t in tt.loras if t.b.name == b_name and t.b.file == file)
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for e, rows, _ in parts:
            by_expert.setdefault(e, []).append(rows)
        exact = set(by_expert) == set(range(experts)) and all(_tiles(sorted(v), out_rows) for v in by_expert.values())
        times = 1 if exact else 0  # a partial or overlapping cover is reported as "applied 0 times"
        for name in (a_name, b_name):
            i = by_file[file]
            uses[i][name] = uses[i].get(name, 0) + times
    return uses


def _tiles(ranges: list[tuple[int, int]], total: int) -> bool:
    """Do sorted [start, stop) ranges cover [0, total) exactly, without gap or overlap?"""
    pos = 0
    for start, stop in ranges:
        if start != pos:
            return False
        pos = stop
    return pos == total


ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def build_adapter_plan(adapter: Adapter, options: MergeOptions) -> MergePlan:
    """`--method lora`: the adapter's own tensors, written as one safetensors file laid out as
    `save_file` (and PEFT's save_pretrained) would write them; --dtype casts its float tensors."""
    specs, by_name = [], {}
    for key, info in adapter.header.tensors.items():
        dtype = output_dtype(info, options)
        spec = TensorSpec(key, dtype, tuple(info.shape))
        op = "cast" if dtype != info.dtype else "copy"
        specs.append(spec)
        by_name[key] = OutputTensor(key, dtype, spec.shape, op, Source.of(adapter.weights_file, info))
    ordered = save_order(specs)
    header, offsets = build_header(ordered, SHARD_METADATA)
    tensors = tuple(_with_offsets(by_name[s.name], *offsets[s.name]) for s in ordered)
    shard = OutputShard(ADAPTER_WEIGHTS_FILE, len(header) + sum(s.nbytes for s in ordered), len(header), tensors)
    n = len(adapter.header.tensors)
    return MergePlan(
        base=str(adapter.path), adapters=({"path": str(adapter.path), "weight": adapter.weight, "tensors": n, "used": n},),
        options=options, shards=(shard,),
    )


# ------------------------------------------------------------------------------------ summaries


def summary_lines(plan: MergePlan, *, free_disk: int | None = None, max_rows_note: str | None = None,
                  disk: str | None = None) -> list[str]:
    """The plan's human summary; `disk` (a prepared line) replaces the plain free-space figure."""
    counts = plan.counts()
    cov = plan.coverage()
    n_terms = sum(len(t.loras) for t in plan.tensors)
    lines = [
        f"base:       {plan.base}",
        *[f"adapter:    {a['path']}" + (f" (weight {a['weight']:g})" if a["weight"] != 1.0 else "") for a in plan.adapters],
        f"method:     {plan.options.method}" + (f", dtype {plan.options.dtype}" if plan.options.dtype else ", dtype as base"),
        f"tensors:    {len(plan.tensors)} total: {counts.get('merge', 0)} merged ({n_terms} LoRA terms), "
        f"{counts.get('copy', 0)} copied, {counts.get('cast', 0)} cast"
        + (f", {counts['dequant']} dequantized" if counts.get("dequant") else "")
        + (f", {counts['quant']} 4-bit tensors" if counts.get("quant") else ""),
        "ops:        " + ", ".join(f"{op} {n}" for op, n in sorted(counts.items())),
        "terms:      " + (", ".join(f"{kind} {n}" for kind, n in sorted(plan.term_counts().items())) or "none"),
        f"coverage:   {cov['used']}/{cov['adapter_tensors']} adapter tensors used",
        f"output:     {format_size(plan.total_size)} in {len(plan.shards)} shard(s) "
        f"(max shard size {format_size(plan.options.max_shard_size)})",
        f"memory:     budget {format_size(plan.options.max_memory)} for tensor data",
    ]
    if disk is not None:
        lines.append(f"disk:       {disk}")
    elif free_disk is not None:
        verdict = "ok" if free_disk >= plan.file_bytes else "NOT ENOUGH"
        lines.append(f"disk:       needs {format_size(plan.file_bytes)}, free {format_size(free_disk)} ({verdict})")
    for h, e in plan.untied:
        lines.append(f"untied:     {h} written separately from {e} (tie_word_embeddings set to false)")
    for shard in plan.shards:
        lines.append(f"  {shard.filename}: {len(shard.tensors)} tensors, {format_size(shard.size)}")
    return lines


def widest_row_bytes(plan: MergePlan) -> int:
    return max((math.prod(t.shape[1:]) * ITEMSIZE[t.dtype] for t in plan.tensors if t.shape), default=0)
