"""The output folder: refusing to clobber, copying the base's other files, config, index, record.

Small files are written atomically (temp file + fsync + rename). What makes the folder loadable
(the index, or for a single shard the shard's final name) appears last, after `streammerge.json`;
see `api.merge` for the commit order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from ..errors import DiskFullError, OutputError
from .checkpoint import INDEX_FILE
from .safetensors import DISK_FULL_ERRNOS, fsync_dir

RECORD_FILE = "streammerge.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
_MODEL_MARKERS = ("config.json", RECORD_FILE, INDEX_FILE, "model.safetensors", "adapter_config.json", ".streammerge")


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, *, sort_keys: bool = False, compact: bool = False) -> None:
    """`compact`: one line, for files read by programs only (json's C encoder; a 90k-tensor plan in
    a fraction of the indented time)."""
    text = json.dumps(data, separators=(",", ":"), sort_keys=sort_keys) if compact else json.dumps(data, indent=2, sort_keys=sort_keys)
    atomic_write_text(path, text + "\n")


def looks_like_model_folder(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    return any(m in names for m in _MODEL_MARKERS) or any(n.endswith((".safetensors", ".gguf", ".partial")) for n in names)


def check_output_path(out: Path, *, protected: Iterable[Path] = ()) -> None:
    """Refuse an output path that is a file, one of the inputs, or not writable; create the folder."""
    out = Path(out)
    for p in protected:
        try:
            if out.resolve() == Path(p).resolve():
                raise OutputError(f"--out {out} is one of the inputs; choose another folder")
        except OSError:
            pass
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out} is not writable; choose another folder or fix its permissions")


def clear_folder(out: Path) -> None:
    """Empty OUT for --overwrite, keeping the folder itself (it carries the lock); refuse to delete
    files that are not a model's."""
    if not looks_like_model_folder(out):
        raise OutputError(f"--out {out} holds files that are not a model; refusing to delete them even with --overwrite")
    try:
        for entry in list(out.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as exc:
        raise OutputError(f"cannot clear {out} for --overwrite: {exc.strerror or exc}") from None


def prepare_output(out: Path, *, overwrite: bool, protected: Iterable[Path] = ()) -> None:
    """Create OUT, or refuse: a file, an unwritable folder, or someone else's files without --overwrite."""
    out = Path(out)
    check_output_path(out, protected=protected)
    if any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"--out {out} already holds files; choose an empty folder or pass --overwrite to replace it")
        clear_folder(out)


def output_error(exc: OSError, what: str) -> OutputError:
    """An OSError while writing the output as one of our errors; a full disk gets its own class."""
    cls = DiskFullError if exc.errno in DISK_FULL_ERRNOS else OutputError
    return cls(f"{what}: {exc.strerror or exc}")


def copy_other_files(files: Iterable[Path], out: Path) -> list[str]:
    copied = []
    for src in files:
        try:
            shutil.copyfile(src, out / src.name)
        except OSError as exc:
            raise output_error(exc, f"cannot copy {src.name} to {out}") from None
        copied.append(src.name)
    return copied


def merged_config(
    config: dict[str, Any] | None, dtype: str | None, quantization_config: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The base config for the output: dtype set when it changed; quantization removed (16-bit output)
    or replaced by the output's own (merged_4bit)."""
    if config is None:
        return None
    new = dict(config)
    new.pop("quantization_config", None)
    if quantization_config is not None:
        new["quantization_config"] = quantization_config
    if dtype is not None:
        new["dtype"] = dtype
        if "torch_dtype" in new:
            new["torch_dtype"] = dtype
    return new


def write_index(out: Path, total_size: int, weight_map: dict[str, str]) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(out / INDEX_FILE, index, sort_keys=True)
