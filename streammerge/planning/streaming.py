"""What the codecs involved in one output tensor ask of those who stream it.

A tensor may read a quantized source (`quant_in`), write (part of) a quantized weight
(`quant_out`: bitsandbytes 4-bit, block FP8), round-trip its base through 4-bit (`roundtrip`) or store an encoding of its float32
rows (`encoding`). The executor, the GGUF layout and the verifier ask here where a chunk's source
bytes are, at which rows a chunk may start and what per-tensor state the codecs hold; the answers
come from the codecs, found by name in the registry.
"""

from __future__ import annotations

import math

from ..formats import codecs
from ..formats.safetensors import ITEMSIZE, TORCH_NAME
from .types import OutputTensor


def rows_and_width(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


def involves_quant(t: OutputTensor) -> bool:
    """A bitsandbytes codec takes part (its decoded rows are float32 tensors of our own)."""
    return t.quant_in is not None or t.quant_out is not None or t.roundtrip is not None


def row_alignment(t: OutputTensor) -> int:
    """Chunks of `t` start at multiples of this many rows: every block format involved (source,
    output, round trip, encoding) then starts on a whole block and a whole packed byte."""
    width = rows_and_width(t.weight_shape)[1]
    align = 1
    if t.quant_in is not None:
        align = math.lcm(align, codecs.get(t.quant_in.codec).source_alignment(t.quant_in.format))
    if t.quant_out is not None and t.quant_out.part == "weight":
        align = math.lcm(align, output_codec(t.quant_out).block_alignment(width, t.quant_out.blocksize))
    if t.roundtrip is not None:
        align = math.lcm(align, codecs.get("bnb4").block_alignment(width, t.roundtrip.blocksize))
    if t.encoding is not None:
        align = math.lcm(align, codecs.get(t.encoding).row_alignment(width))
    if t.transform is not None and t.transform.permute_heads:  # a permutation moves rows within a head
        align = math.lcm(align, rows_and_width(t.shape)[0] // t.transform.permute_heads)
    return align


def source_span(t: OutputTensor, row_start: int, row_stop: int) -> tuple[int, int]:
    """(file offset, length) of the source bytes holding rows [row_start, row_stop) of `t`."""
    src = t.source
    if t.quant_in is not None:
        start, length = codecs.get(t.quant_in.codec).source_span(t.quant_in.format, row_start, row_stop)
        return src.start + start, length
    row_bytes = rows_and_width(src.shape)[1] * ITEMSIZE[src.dtype]
    return src.start + row_start * row_bytes, (row_stop - row_start) * row_bytes


def state_bytes(t: OutputTensor) -> int:
    """Per-tensor memory the codecs hold while `t` streams (decoded statistics, absmax vectors and
    the temporaries that finish them; the previous weight's statistics kept for its absmax part)."""
    if not involves_quant(t):
        return 0
    n = math.prod(t.weight_shape)
    total = 0
    if t.quant_in is not None:
        total += codecs.get(t.quant_in.codec).source_state_bytes(t.quant_in.format, rows_and_width(t.weight_shape)[0])
    if t.quant_out is not None:
        total += output_codec(t.quant_out).output_state_bytes(n, t.quant_out.blocksize)
    if t.roundtrip is not None:
        total += codecs.get("bnb4").output_state_bytes(n, t.roundtrip.blocksize)
    return total


def needs_prepass(tensor: OutputTensor) -> bool:
    """DoRA on a weight stored [in, out] normalizes columns: every row must be seen first."""
    return any(t.kind == "dora" and t.transpose for t in tensor.loras)


def factor_bytes(tensor: OutputTensor) -> int:
    """Host/device memory the loaded terms of `tensor` take (raw bytes + float32 copies, + column state)."""
    total = sum(math.prod(s.shape) * (ITEMSIZE[s.dtype] + 4) for term in tensor.loras for s in term.sources())
    if needs_prepass(tensor):
        total += 8 * rows_and_width(tensor.shape)[1]
    return total


# -- the codec objects a pass over `t` works with (found by name; their modules stay unimported here)


def decoder(t: OutputTensor, read, device):
    """Rows of `t`'s quantized source as float32; `read(Source)` gives a companion's stored values."""
    companions = {c.name: c for c in t.quant_in.companions}
    return codecs.get(t.quant_in.codec).decoder(t.quant_in.format, t.source.name, lambda name: read(companions[name]), device)


def roundtrip(t: OutputTensor, device):
    return codecs.get("bnb4").roundtrip(tuple(t.weight_shape), TORCH_NAME[t.source.dtype], t.roundtrip, device)


def output_codec(qo):
    """The quantized-weight codec that writes output part `qo`."""
    return codecs.get(qo.codec)


def output_quantizer(qo):
    return output_codec(qo).quantizer(qo)


def constant_part(qo):
    return output_codec(qo).constant_part(qo)


def part_tensor(stats, qo):
    return output_codec(qo).part_tensor(stats, qo)


def stash_part(qo) -> str:
    """The statistic a pass over the weight yields whole (absmax; weight_scale_inv): kept from the
    weight's last pass for its tensor, else measured by a statistics pass of its own."""
    return output_codec(qo).stash_part


def measured_first(qo) -> bool:
    """The codes of this output weight need a statistic of the whole weight (a per-tensor scale):
    a statistics pass runs before its writing pass and hands it over."""
    measured = getattr(output_codec(qo), "measured_first", None)
    return bool(measured is not None and measured(qo))


def small_parts(qo) -> tuple[str, ...]:
    """Statistics kept from the weight's pass until their tensors are written."""
    return output_codec(qo).small_parts
