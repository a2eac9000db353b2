"""Legacy `adapter_model.bin`: unpickled only with `torch.load(weights_only=True)`, rewritten as safetensors.

The executor reads adapter factors by byte range, so a `.bin` adapter is converted once into a
safetensors file in a private temporary folder (removed at exit), laid out exactly as
`safetensors.torch.save_file` would write it. Anything `weights_only` refuses (arbitrary pickled
objects) is refused here too: nothing in the file is ever executed.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import AdapterError, UnsupportedError
from .safetensors import FROM_TORCH_NAME, ShardWriter, TensorSpec, build_header, save_order

ADAPTER_METADATA = {"format": "pt"}  # what PEFT's save_pretrained writes
_TEMP_DIRS: list[str] = []


def _cleanup() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)


def load_weights_only(path: Path) -> dict:
    """The state dict of a legacy .bin file, unpickled with weights_only=True (tensors memory-mapped)."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # old (non-zip) format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedError(
            f"{path}: torch.load(weights_only=True) refuses this file ({first}); it holds pickled objects other "
            "than tensors, which streammerge never unpickles. Re-save the adapter with safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise AdapterError(f"{path}: cannot read this adapter_model.bin ({exc}); it is damaged or not a PyTorch file") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UnsupportedError(f"{path}: expected a flat dict of tensor names to tensors; refusing this file")
    return state


def convert_bin_to_safetensors(path: Path) -> Path:
    """Write the .bin's tensors to `<tmp>/adapter_model.safetensors` (save_file layout) and return that path."""
    import torch

    state = load_weights_only(path)
    specs = []
    for name, t in state.items():
        dtype = FROM_TORCH_NAME.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise UnsupportedError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        specs.append(TensorSpec(name, dtype, tuple(t.shape)))
    ordered = save_order(specs)
    header, _ = build_header(ordered, ADAPTER_METADATA)
    folder = tempfile.mkdtemp(prefix="streammerge-bin-")
    _TEMP_DIRS.append(folder)
    out = Path(folder) / "adapter_model.safetensors"
    writer = ShardWriter(out, header, len(header) + sum(s.nbytes for s in ordered))
    try:
        for spec in ordered:
            t = state[spec.name].contiguous()
            if math.prod(spec.shape):
                writer.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        writer.commit()
    finally:
        writer.close()
    os.chmod(out, 0o444)
    return out
