"""The GGUF layout, fixed before any tensor data is read: files, tensor infos, offsets, header bytes.

Every output tensor's stored type and byte size follow from its shape alone, so the whole header
(metadata, vocabulary, tensor infos) is rendered up front with the `gguf` package's own GGUFWriter
and only the data section is streamed. Splitting follows GGUFWriter's `split_max_size` rule (what
`convert_hf_to_gguf.py --split-max-size` does), with llama.cpp's split names and keys:
`NAME-00001-of-00003.gguf`, `split.no`, `split.count`, `split.tensors.count`.

Memory: each tensor is processed in row chunks whose size follows from `--max-memory` (see
`chunk_rows`): two read buffers in flight plus one of headroom, the float32 merged rows, a permuted
copy for q/k, and the encoded bytes (twice for the quantizers, which build their output in pieces),
plus fixed float32 tiles, the largest LoRA factors and the quantizer's per-16-row temporaries.

A bitsandbytes base (4-bit or 8-bit) is planned from the merge plan's logical weights: each GGUF
tensor is one logical weight (its statistics tensors are read with it, never written), with the
weight's original shape. Its chunks start on whole 4-bit block rows (`quant.stream.row_alignment`),
a row costs its packed bytes in each read buffer plus the dequantization's float32 temporaries, and
the decoded statistics of one weight (`quant.stream.state_bytes`) are part of the fixed memory.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import ops
from ..errors import PlanError, UnsupportedError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors import FLOAT_DTYPES, ITEMSIZE
from ..options import MergeOptions, format_size
from . import streaming as qs
from .streaming import factor_bytes, needs_prepass
from .types import MergePlan, OutputShard, OutputTensor, RowTransform
from ..formats.gguf import require
from ..formats import codecs
from ..formats.gguf.arch import Arch, arch_of, metadata, rope_freqs, tensor_rule
from ..formats.gguf.mix import K_MIXES, k_type, layer_order, model_shape, plain_type
from ..formats.gguf.types import GGUF_TYPES, file_tag
from ..formats.gguf.vocab import Vocab, load_vocab

ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
READS_IN_FLIGHT = 2  # the chunk being computed and the one being read ahead
READ_BUFFERS = READS_IN_FLIGHT + 1  # plus one chunk of headroom: allocator fragmentation, first-use costs
QUANT_ROW_COST = 12  # bytes per element of a decoded bitsandbytes chunk: float32 rows + dequantization temporaries


def pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: where its values come from and how they are stored."""

    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    ggml_type: str  # F32 | F16 | BF16 | Q8_0 | Q4_0
    shape: tuple[int, ...]  # rows first (torch order); GGUF stores the reverse (ne0 = last dim)
    nbytes: int
    offset: int  # from the start of its file's data section
    source: OutputTensor | None  # the merge plan's tensor; None for generated tensors
    permute_heads: int = 0
    shift: float = 0.0
    chunk_rows: int = 1
    values: tuple[float, ...] | None = None  # generated tensors (rope_freqs)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def width(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    def describe(self) -> str:
        dims = "{" + ", ".join(str(d) for d in reversed(self.shape)) + "}"
        what = []
        if self.source is None:
            what.append("generated")
        else:
            what.append(self.source.name + (f" + {len(self.source.loras)} LoRA" if self.source.loras else ""))
        if self.permute_heads:
            what.append(f"q/k rows permuted ({self.permute_heads} heads)")
        if self.shift:
            what.append(f"+{self.shift:g}")
        if self.source is not None and self.rows < self.source.shape[0]:
            what.append(f"first {self.rows} rows")
        if self.source is not None and self.source.quant_in is not None:
            what.append(f"dequantized ({self.source.quant_in.codec})")
        return f"{self.name:<36} {self.ggml_type:<5} {dims:<16} <- {', '.join(what)}"


@dataclass(frozen=True)
class GGUFFile:
    filename: str
    header: bytes = field(repr=False)  # GGUF header + metadata + tensor infos + padding to ALIGNMENT
    size: int
    tensors: tuple[GGUFTensor, ...]


@dataclass(frozen=True)
class GGUFPlan:
    arch: str  # general.architecture
    gguf_type: str
    name: str
    files: tuple[GGUFFile, ...]
    vocab: dict[str, Any]
    dropped: tuple[str, ...]  # checkpoint tensors llama.cpp does not write (gemma2 lm_head)
    budget: int
    merge_plan: MergePlan = field(repr=False)
    notes: tuple[str, ...] = ()
    output: MergePlan | None = field(default=None, repr=False)  # what the executor runs: these files as shards

    def with_output(self) -> "GGUFPlan":
        """This plan with `output`: each file an OutputShard of the "gguf" container (its header rendered
        here), each tensor the merge plan's tensor renamed, typed and placed as llama.cpp stores it."""
        shards = tuple(
            OutputShard(f.filename, f.size, len(f.header), tuple(_output_tensor(t, len(f.header)) for t in f.tensors),
                        container="gguf", header=f.header)
            for f in self.files
        )
        output = replace(self.merge_plan, shards=shards, untied=(), quantization_config=None)
        return replace(self, output=output)

    @property
    def tensors(self) -> list[GGUFTensor]:
        return [t for f in self.files for t in f.tensors]

    @property
    def file_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch, "gguf_type": self.gguf_type, "name": self.name, "vocab": self.vocab,
            "dropped": list(self.dropped), "budget": self.budget, "notes": list(self.notes),
            "files": [
                {
                    "filename": f.filename, "size": f.size, "header_size": len(f.header),
                    "tensors": [
                        {
                            "name": t.name, "type": t.ggml_type, "shape": list(t.shape), "nbytes": t.nbytes,
                            "offset": t.offset, "source": t.source.name if t.source else None,
                            "loras": len(t.source.loras) if t.source else 0, "permute_heads": t.permute_heads,
                            "shift": t.shift, "chunk_rows": t.chunk_rows,
                        }
                        for t in f.tensors
                    ],
                }
                for f in self.files
            ],
        }


# ---------------------------------------------------------------------------------------- build


def model_name(checkpoint: Checkpoint) -> str:
    """The file name stem: the base folder's name (for a Hub snapshot, the repository's name)."""
    root = Path(checkpoint.root).resolve()
    name = root.name
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        name = root.parent.parent.name.split("--")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return name


def _nbytes(gguf, ggml_type: str, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size if shape else size


def _factor_bytes(tensor: OutputTensor | None) -> int:
    return 0 if tensor is None else factor_bytes(tensor)


def _quantizer_work(t: GGUFTensor) -> int:
    """A block quantizer's temporaries for one piece of rows (none for a plain cast)."""
    group = getattr(codecs.get(t.ggml_type), "group_work_bytes", None)
    return group(t.width) if group is not None else 0


def _encoded_per_element(gguf, ggml_type: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    quantized = hasattr(codecs.get(ggml_type), "group_work_bytes")  # builds its output in pieces
    return (2 if quantized else 1) * size / block if ggml_type != "F32" else 0.0


def _source_per_element(t: GGUFTensor) -> tuple[float, int]:
    """(stored source bytes per element, float32 bytes per element of its decoded rows): a
    bitsandbytes weight is read packed (half a byte per 4-bit value, one per int8) and decoded with
    temporaries (`QUANT_ROW_COST`); a float source is read as stored and widened once."""
    if t.source is None:
        return 4, 4
    src = t.source.source
    if t.source.quant_in is None:
        return ITEMSIZE[src.dtype], 4
    return (src.end - src.start) / max(math.prod(t.source.shape), 1), QUANT_ROW_COST


def row_unit(t: GGUFTensor) -> int:
    """Chunks of `t` are multiples of this many rows: whole heads for permuted tensors, whole 4-bit
    block rows for a bitsandbytes source (both, when both apply)."""
    unit = t.rows // t.permute_heads if t.permute_heads else 1
    if t.source is not None and t.source.quant_in is not None:
        unit = math.lcm(unit, qs.row_alignment(t.source))
    return unit


def chunk_rows(gguf, t: GGUFTensor, budget: int, fixed: int, max_rows: int | None) -> int:
    """Rows per chunk for `t` under `budget`; whole heads for permuted tensors, whole 4-bit block
    rows for a bitsandbytes source; PlanError if even one unit does not fit."""
    src, decoded = _source_per_element(t)
    per_row = t.width * (READ_BUFFERS * src + decoded + (4 if t.permute_heads else 0) + _encoded_per_element(gguf, t.ggml_type))
    return fit_rows(t, budget, fixed, per_row, max_rows, "for")


def fit_rows(t: GGUFTensor, budget: int, fixed: int, per_row: int | float, max_rows: int | None, purpose: str) -> int:
    """As many whole units of rows (`row_unit`) as `budget` holds beside `fixed`, at most `max_rows`
    (when set) and the tensor's rows; PlanError naming `purpose` ("for", "to verify") if not one."""
    unit = row_unit(t)
    rows = int((budget - fixed) // max(per_row, 1))
    if max_rows is not None:
        rows = min(rows, max(max_rows, unit))
    rows = min(rows // unit * unit, t.rows)
    if rows < min(unit, t.rows):
        need = fixed + per_row * unit
        raise PlanError(
            f"--max-memory {format_size(budget)} is too small {purpose} {t.name}: one chunk of {unit} row(s) needs "
            f"{format_size(need)}; use at least --max-memory {math.ceil(need / 1e6)}MB"
        )
    return max(rows, 1)


def _fixed_bytes(gguf, tensors: list[GGUFTensor]) -> int:
    merged_width = max((t.width for t in tensors if t.source is not None and t.source.loras), default=0)
    tiles = 8 * max(ops.TILE_ELEMENTS, merged_width) if merged_width else 0
    factors = max((_factor_bytes(t.source) for t in tensors), default=0)
    quant = max((_quantizer_work(t) for t in tensors), default=0)
    # bitsandbytes statistics: one weight's decoded, and the next weight's read ahead with its first chunk
    states = max((qs.state_bytes(t.source) for t in tensors if t.source is not None), default=0)
    return tiles + factors + quant + 2 * states


def build_gguf_plan(checkpoint: Checkpoint, merge_plan: MergePlan, options: MergeOptions) -> GGUFPlan:
    """A pure function of headers, config, tokenizer files and options; nothing is written."""
    gguf = require()
    arch: Arch = arch_of(checkpoint.config)
    h = dict(checkpoint.config or {})
    gguf_type = options.gguf_type or "bf16"
    bulk, file_type_name, _ = GGUF_TYPES[gguf_type]
    vocab: Vocab = load_vocab(arch, Path(checkpoint.root), h, gguf)
    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch.gguf_arch]
    name_map = gguf.get_tensor_name_map(model_arch, h["num_hidden_layers"])
    by_name = {t.name: t for t in merge_plan.tensors}

    pending: list[tuple[str, tuple[int, ...], OutputTensor | None, Any, tuple[float, ...] | None]] = []
    if (factors := rope_freqs(arch, h)) is not None:
        pending.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", (len(factors),), None, None, tuple(factors)))
    dropped = []
    # a bitsandbytes weight's statistics (absmax, quant_map, quant_state, SCB, ...) are read with it,
    # never written: the GGUF holds the merge plan's logical tensors, in checkpoint order
    companions = {c.name for t in merge_plan.tensors if t.quant_in is not None for c in t.quant_in.companions}
    for hf_name in checkpoint.tensors:
        if hf_name in companions:
            continue
        tensor = by_name.get(hf_name)
        if tensor is None:
            raise PlanError(f"internal error: the merge plan has no tensor for {hf_name}")
        rule = tensor_rule(arch, h, hf_name, tuple(tensor.shape), name_map, vocab.n_real)
        if rule is None:
            if tensor.loras:
                raise UnsupportedError(
                    f"the adapter changes {hf_name}, which llama.cpp's {arch.gguf_arch} GGUF does not store; "
                    "the change would be lost. Use --method merged_16bit"
                )
            dropped.append(hf_name)
            continue
        if needs_prepass(tensor):
            raise UnsupportedError(
                f"{hf_name}: DoRA on a weight stored [in, out] (fan_in_fan_out, or an embedding) normalizes columns, "
                "which needs a pass over the whole tensor before its first row; --method gguf does not do that yet. "
                "Use --method merged_16bit and convert the result with llama.cpp's convert_hf_to_gguf.py"
            )
        if tensor.quant_in is None and tensor.source.dtype not in FLOAT_DTYPES:
            raise UnsupportedError(
                f"{hf_name} is stored as {tensor.source.dtype}; --method gguf reads floating-point and "
                "bitsandbytes 4-bit/8-bit bases only"
            )
        shape = tuple(tensor.shape)
        if rule.rows is not None:
            shape = (rule.rows, *shape[1:])
        pending.append((rule.gguf_name, shape, tensor, rule, None))
    names = {p[0] for p in pending}
    if len(names) != len(pending):
        raise PlanError("internal error: two checkpoint tensors map to the same GGUF name")
    k_mix = gguf_type in K_MIXES  # llama-quantize's file: its tensor order and type mix
    if k_mix:
        pending.sort(key=lambda p: layer_order(p[0]))
        shape_of_model = model_shape(arch.gguf_arch, h, names)

    tensors: list[GGUFTensor] = []
    for gname, shape, tensor, rule, values in pending:
        if k_mix:
            ggml_type = k_type(gname, shape, gguf_type, shape_of_model)
        else:
            is_output = gname == "output.weight" or (gname == "token_embd.weight" and "output.weight" not in names)
            ggml_type = plain_type(gname, shape, bulk, is_output)
        tensors.append(
            GGUFTensor(
                gname, ggml_type, shape, _nbytes(gguf, ggml_type, shape), 0, tensor,
                rule.permute_heads if rule else 0, rule.shift if rule else 0.0, 1, values,
            )
        )
    fixed = _fixed_bytes(gguf, tensors)
    tensors = [_replace(t, chunk_rows=chunk_rows(gguf, t, options.max_memory, fixed, options.max_chunk_rows)) for t in tensors]

    # header: metadata in llama.cpp's order, then the tensor infos; GGUFWriter decides the split
    total = sum(t.nbytes for t in tensors)
    split = options.max_shard_size if total > options.max_shard_size else 0
    writer = gguf.GGUFWriter(None, arch.gguf_arch, split_max_size=split)
    name = model_name(checkpoint)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    file_type = int(getattr(gguf.LlamaFileType, file_type_name))
    for method, value in metadata(arch, h, file_type, gguf).items():
        getattr(writer, method)(value)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer)
    import numpy as np

    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType[t.ggml_type])
    total_params, shared, expert, experts = writer.get_total_parameter_count()
    writer.add_size_label(gguf.size_label(total_params, shared, expert, experts))  # e.g. "8.0B", as llama.cpp
    if k_mix:  # llama-quantize sets these two last, after the keys it copies
        for key in ("general.quantization_version", "general.file_type"):
            writer.kv_data[0][key] = writer.kv_data[0].pop(key)
    headers = _render_headers(gguf, writer)
    groups = [list(group) for group in writer.tensors]
    stem = f"{name}-{file_tag(gguf_type)}"
    filenames = [f"{stem}.gguf"] if len(groups) == 1 else [
        f"{stem}-{i:05d}-of-{len(groups):05d}.gguf" for i in range(1, len(groups) + 1)
    ]
    by_gname = {t.name: t for t in tensors}
    files = []
    for filename, header, group in zip(filenames, headers, groups):
        offset = 0
        placed = []
        for gname in group:
            placed.append(_replace(by_gname[gname], offset=offset))
            offset += pad(by_gname[gname].nbytes)
        files.append(GGUFFile(filename, header, len(header) + offset, tuple(placed)))

    notes = []
    fallen = sorted({t.ggml_type for t in tensors} - {"F32", bulk} - ({"Q6_K", "Q8_0", "Q5_K"} if k_mix else set()))
    if k_mix and fallen:
        notes.append(f"{gguf_type}: rows that are not whole 256-value super-blocks use {', '.join(fallen)}, as llama-quantize does")
    if gguf_type == "q4_0":
        notes.append("q4_0: the output projection is kept at Q8_0 (llama-quantize uses Q6_K, which the gguf package cannot write)")
    return GGUFPlan(
        arch.gguf_arch, gguf_type, name, tuple(files), {**vocab.summary()}, tuple(dropped),
        options.max_memory, merge_plan, tuple(notes),
    ).with_output()


def _output_tensor(t: GGUFTensor, header_size: int) -> OutputTensor:
    """The executor's view of `t`: its float32 rows (the merge's, transformed) encoded as `t.ggml_type`."""
    start = header_size + t.offset
    if t.source is None:
        return OutputTensor(t.name, t.ggml_type, t.shape, "constant", None, start=start, end=start + t.nbytes,
                            encoding=t.ggml_type, values=t.values)
    transform = RowTransform(t.permute_heads, t.shift) if (t.permute_heads or t.shift) else None
    return replace(t.source, name=t.name, dtype=t.ggml_type, shape=t.shape, start=start, end=start + t.nbytes,
                   quant_out=None, encoding=t.ggml_type, logical_shape=None, transform=transform)


def _replace(t: GGUFTensor, **changes) -> GGUFTensor:
    from dataclasses import replace

    return replace(t, **changes)


def _render_headers(gguf, writer) -> list[bytes]:
    """Each file's header (magic, counts, metadata, tensor infos) padded to ALIGNMENT, rendered by
    GGUFWriter itself into memory instead of into files."""
    from gguf.gguf_writer import WriterState

    writer.fout = [io.BytesIO() for _ in writer.tensors]
    writer.state = WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    out = []
    for buf in writer.fout:
        data = buf.getvalue()
        out.append(data + b"\0" * (pad(len(data), writer.data_alignment) - len(data)))
    writer.fout = None
    if writer.data_alignment != ALIGNMENT:
        raise PlanError("internal error: unexpected GGUF alignment")
    return out


# ------------------------------------------------------------------------------------ summaries


def summary_lines(plan: GGUFPlan, *, free_disk: int | None = None) -> list[str]:
    mp = plan.merge_plan
    counts: dict[str, int] = {}
    for t in plan.tensors:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
    merged = sum(1 for t in plan.tensors if t.source is not None and t.source.loras)
    v = plan.vocab
    lines = [
        f"base:       {mp.base}",
        *[f"adapter:    {a['path']}" + (f" (weight {a['weight']:g})" if a["weight"] != 1.0 else "") for a in mp.adapters],
        f"method:     gguf, type {plan.gguf_type}, architecture {plan.arch}",
        f"tokenizer:  {v['model']}, {v['tokens']} tokens, {v['merges']} merges, pre-tokenizer {v['pre']!r} "
        f"(from {v['pre_source']}), chat template {'yes' if v['chat_template'] else 'no'}",
        f"tensors:    {len(plan.tensors)} ({merged} merged with LoRA): "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
        f"output:     {format_size(plan.file_bytes)} in {len(plan.files)} file(s) "
        f"(max shard size {format_size(mp.options.max_shard_size)})",
        f"memory:     budget {format_size(plan.budget)} for tensor data",
    ]
    if plan.dropped:
        lines.append(f"dropped:    {', '.join(plan.dropped)} (llama.cpp does not store them)")
    if free_disk is not None:
        verdict = "ok" if free_disk >= plan.file_bytes else "NOT ENOUGH"
        lines.append(f"disk:       needs {format_size(plan.file_bytes)}, free {format_size(free_disk)} ({verdict})")
    for f in plan.files:
        lines.append(f"  {f.filename}: {len(f.tensors)} tensors, {format_size(f.size)}")
        lines.extend(f"    {t.describe()}" for t in f.tensors)
    lines.extend(f"note:       {n}" for n in plan.notes)
    return lines
