"""Building a MergePlan from headers alone: output dtypes, shards, offsets, validation, summaries.

The plan is validated before any tensor data is read; see `plan.types` for what it holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..adapters.load import Adapter
from ..errors import PlanError, UnsupportedError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors import (
    FLOAT_DTYPES,
    FROM_TORCH_NAME,
    ITEMSIZE,
    TensorInfo,
    TensorSpec,
    build_header,
    save_order,
)
from ..formats import codecs
from ..options import MergeOptions, format_size
from .types import LoraTerm, MergePlan, OutputShard, OutputTensor, SHARD_METADATA, Source

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
    from ..adapters.compose import compose, op_of
    from .model_info import ignored_on_load, model_info
    from .quant import QuantPlanner

    quant = QuantPlanner(checkpoint, options)

    composition = compose(checkpoint, adapters, _ties(checkpoint), lambda: model_info(checkpoint),
                          shapes=quant.logical_shapes(), quantized=set(quant.weights),
                          ignored=lambda: ignored_on_load(checkpoint.config), aliases=quant.aliases)
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

    codec = codecs.for_method(options.method)
    if codec is not None:  # a registered codec's method: the tensors it stores, encoded; the rest cast
        pending = [_encoded(codec, spec, t) for spec, t in pending]
    by_name = {spec.name: tensor for spec, tensor in pending}
    if (options.method == "merged_fp8" and quant.base_fp8) or options.method == "merged_mxfp4":
        named = _base_shards(checkpoint, pending)
    else:
        groups = split_into_shards([spec for spec, _ in pending], options.max_shard_size)
        named = list(zip(shard_filenames(len(groups)), groups))
    shards = [layout_shard(filename, [by_name[spec.name] for spec in group]) for filename, group in named]

    qconfig = None
    if codec is not None:
        encoded = [t.name for _, t in pending if t.encoding is not None]
        qconfig = codec.quantization_config(encoded, [t.name for _, t in pending if t.encoding is None])
    if options.method == "merged_4bit":
        model_dtype = options.dtype or config_model_dtype(checkpoint.config) or "bfloat16"
        qconfig = quant.quantization_config([t for _, t in pending], model_dtype)
    if options.method == "merged_fp8":
        qconfig = quant.fp8_quantization_config([t for _, t in pending])
    if options.method == "merged_mxfp4":
        qconfig = quant.mxfp4_quantization_config()
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
    dropped = quant.dropped()
    if dropped:
        plan = dataclasses.replace(plan, notes=(*plan.notes, f"left out {len(dropped)} static activation / KV-cache scale(s) "
                                                f"of the base's FP8 scheme (e.g. {dropped[0]}): a 16-bit output has no use for them"))
    validate(plan, checkpoint, adapters, dropped)
    used = adapter_uses(plan, adapters)
    return dataclasses.replace(plan, adapters=tuple(
        {**info, "used": sum(1 for n in a.header.tensors if u.get(n) == 1)} for info, a, u in zip(plan.adapters, adapters, used)
    ))


def _base_shards(checkpoint: Checkpoint, pending: Sequence[tuple[TensorSpec, OutputTensor]]) -> list[tuple[str, list[TensorSpec]]]:
    """The base's own shards (file names and which tensors each holds): a merged_fp8 output of an FP8
    base (merged_mxfp4 of an MXFP4 one) keeps every tensor's size, so it is laid out as its publisher laid out the base (an untied
    copy goes with its source)."""
    files: dict[str, list[TensorSpec]] = {}
    names: dict[Any, str] = {}  # input file -> its name (one Path parse per file, not per tensor)
    for spec, tensor in pending:
        ref = checkpoint.tensors.get(spec.name)
        file = ref.file if ref is not None else tensor.source.file
        name = names.get(file)
        if name is None:
            name = names[file] = Path(file).name
        files.setdefault(name, []).append(spec)
    return sorted(files.items())


def _encoded(codec, spec: TensorSpec, t: OutputTensor) -> tuple[TensorSpec, OutputTensor]:
    """`t` stored with `codec` when the codec takes it: its float32 merged rows encoded, the stored
    dtype and shape the codec's, the logical shape kept for the math."""
    floating = t.quant_in is None and t.source is not None and t.source.dtype in FLOAT_DTYPES
    if not (floating and len(t.shape) == 2 and codec.encodes(t.name, t.shape)):
        return spec, t
    why = codec.check_width(t.name, t.shape[1])
    if why is not None:
        raise UnsupportedError(f"{t.name} cannot be stored as {codec.name}: {why}; use another --method")
    dtype, shape = codec.stored(t.shape)
    encoded = replace(t, dtype=dtype, shape=tuple(shape), encoding=codec.name, logical_shape=t.shape)
    return TensorSpec(t.name, dtype, tuple(shape)), encoded


def config_model_dtype(config: dict[str, Any] | None) -> str | None:
    from ..formats.quantized import config_dtype

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
    """`replace(tensor, start=, end=)` without re-running the constructor (plans of 100k tensors)."""
    placed = object.__new__(OutputTensor)
    placed.__dict__.update(tensor.__dict__, start=start, end=end)
    return placed


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
        d_in, d_out = (shape[1], shape[2]) if term.transpose else (shape[2], shape[1])
        ok = len(shape) == 3 and shape[0] == e and term.a.shape == (term.a.shape[0], d_in) \
            and term.b.shape == (d_out, term.a.shape[0]) and term.a.shape[0] % e == 0
    elif term.kind == "bias":
        ok = term.b.shape == t.shape and len(t.shape) == 1
    elif term.kind == "token_rows":
        ok = len(t.shape) == 2 and term.b.shape == (len(term.indices), t.shape[1]) and \
            all(0 <= i < t.shape[0] for i in term.indices)
    else:
        ok = False
    if not ok:
        raise PlanError(f"{t.name}: {term.kind} term with tensors {[s.shape for s in term.sources()]} does not fit {shape}")


def validate(plan: MergePlan, checkpoint: Checkpoint, adapters: Sequence[Adapter], dropped: Sequence[str] = ()) -> None:
    """Every base tensor consumed exactly once (a quantized weight with its statistics) but the `dropped`
    ones, every output name unique, every adapter tensor used exactly once, shapes agree."""
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
    if sorted(consumed + list(dropped)) != sorted(checkpoint.tensors):
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
        + (f", {counts['quant']} quantized tensors" if counts.get("quant") else ""),
        "formats:    " + ", ".join(f"{label} {n} ({format_size(size)})" for label, (n, size) in format_counts(plan).items()),
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


def format_counts(plan: MergePlan) -> dict[str, tuple[int, int]]:
    """Output tensors per stored format: label -> (tensors, bytes), a quantized weight's statistics
    counted in its weight's bytes; the largest first."""
    out: dict[str, list[int]] = {}
    weight_label = {t.name: f"{t.quant_out.codec} {t.quant_out.quant_type}" for t in plan.tensors
                    if t.quant_out is not None and t.quant_out.part == "weight"}
    # a copied FP8 weight and its scales count with the FP8 weights written
    weight_label.update({t.name: "fp8 e4m3" for t in plan.tensors if t.quant_out is None and t.dtype == "F8_E4M3"})
    for t in plan.tensors:
        weight = t.quant_out.weight if t.quant_out is not None else t.name.removesuffix("_scale_inv")
        label = weight_label.get(weight)
        entry = out.setdefault(label or t.encoding or t.dtype, [0, 0])
        entry[0] += label is None or weight == t.name
        entry[1] += t.nbytes
    return {k: (v[0], v[1]) for k, v in sorted(out.items(), key=lambda kv: -kv[1][1])}


def widest_row_bytes(plan: MergePlan) -> int:
    return max((math.prod(t.shape[1:]) * ITEMSIZE[t.dtype] for t in plan.tensors if t.shape), default=0)
