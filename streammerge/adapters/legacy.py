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
from ..formats.safetensors import FROM_TORCH_NAME, ShardWriter, TensorSpec, build_header, save_order

ADAPTER_METADATA = {"format": "pt"}  # what PEFT's save_pretrained writes
_TEMP_DIRS: list[str] = []


def _cleanup() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)


def read_legacy_bin(path: str | Path) -> dict:
    """Tensors of a legacy `adapter_model.bin`, read only with torch's restricted unpickler.

    `weights_only=True` builds tensors and plain containers and nothing else, so a pickle that would
    run code is refused, never executed; any failure becomes an AdapterError naming the file.
    """
    import warnings

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: our answer is the error
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # old (non-zip) format
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, OSError, ... from a hostile or broken file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = ([line for line in lines if not line.startswith(boilerplate)] or lines or [type(exc).__name__])[0]
        raise AdapterError(
            f"{path}: refused by torch.load(weights_only=True) ({detail[:200]}); it is corrupt or holds more "
            "than tensors: re-save the adapter with safetensors from a source you trust"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterError(
            f"{path}: expected a mapping of tensor names to tensors, found {type(state).__name__}; "
            "re-save the adapter with safetensors"
        )
    return state


def convert_bin_to_safetensors(path: Path) -> Path:
    """Write the .bin's tensors to `<tmp>/adapter_model.safetensors` (save_file layout) and return that path."""
    import torch

    state = read_legacy_bin(path)
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
