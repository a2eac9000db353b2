"""The containers an output shard can be: what precedes its tensors, and what fills gaps between them.

"safetensors" renders its header from the shard's tensors (names, dtypes, shapes, offsets: the
bytes `safetensors.torch.save_file` writes); "gguf" carries the header its planner rendered
(metadata, vocabulary, tensor infos, padded to the data alignment) and pads each tensor's data to
the alignment with zeros. The executor and the journal ask here; neither knows a file format.
"""

from __future__ import annotations

from ..errors import PlanError
from ..formats.safetensors import TensorSpec, build_header
from ..planning.types import SHARD_METADATA, OutputShard

CONTAINERS = ("safetensors", "gguf")


def header_bytes(shard: OutputShard) -> bytes:
    if shard.container == "safetensors":
        return build_header([TensorSpec(t.name, t.dtype, t.shape) for t in shard.tensors], SHARD_METADATA)[0]
    if shard.container in CONTAINERS and shard.header is not None and len(shard.header) == shard.header_size:
        return shard.header
    raise PlanError(f"internal error: no header for {shard.filename} ({shard.container})")
