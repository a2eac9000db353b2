"""A checkpoint folder: its safetensors shards (validated headers only), index, config and other files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import InputError
from .safetensors import SafetensorsFile, TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that hold weights (ours or another format's) and are therefore never copied to the output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".partial")
NOT_COPIED = {INDEX_FILE, "pytorch_model.bin.index.json", "tf_model.h5.index.json", "streammerge.json", "README.md"}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: a shard file and the tensor's validated header entry."""

    file: Path
    info: TensorInfo


def _reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_reject_duplicates)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: invalid {what} ({exc}); fix or re-download it") from None


def safe_member(root: Path, relname: object, what: str) -> Path:
    """Resolve a file name from an index so that it cannot point outside the checkpoint folder.

    Symlinks are allowed only into the folder itself or into the Hugging Face cache's blob store
    of the same repository (`snapshots/<rev>/file -> ../../blobs/<sha>`).
    """
    if not isinstance(relname, str) or not relname or "\x00" in relname:
        raise InputError(f"{what}: bad file name {relname!r}; fix the index or re-download the checkpoint")
    rel = Path(relname)
    if rel.is_absolute() or ".." in rel.parts or relname.startswith(("/", "\\")):
        raise InputError(
            f"{what}: file name {relname!r} points outside {root}; refusing to read it "
            "(re-download the checkpoint from a source you trust)"
        )
    path = root / rel
    try:
        real_root = root.resolve()
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops, names too long
        raise InputError(f"{what}: cannot resolve {relname!r} ({exc}); fix the folder or re-download it") from None
    allowed = [real_root]
    if real_root.parent.name == "snapshots":
        allowed.append(real_root.parent.parent / "blobs")
    if not any(real == base or base in real.parents for base in allowed):
        raise InputError(
            f"{what}: {relname!r} is a link to {real}, outside {root}; refusing to read it "
            "(copy the file into the folder if you trust it)"
        )
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system
        return False


class Checkpoint:
    """Headers and metadata of a base checkpoint; never reads tensor data."""

    def __init__(self, root: Path, files: list[SafetensorsFile], config: Mapping[str, Any] | None):
        self.root = root
        self.files = files
        self.config = config
        self.label = str(root)  # how plans and records name it (a Hub checkpoint: "org/name@commit")
        self.tensors: dict[str, TensorRef] = {}
        for f in files:
            for name, info in f.tensors.items():
                self.tensors[name] = TensorRef(f.path, info)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def other_files(self) -> list[Path]:
        """Top-level non-weight files (tokenizer, generation config, chat template, license...)."""
        out = []
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if name.startswith(".") or name in NOT_COPIED or name == "config.json" or name.endswith(WEIGHT_SUFFIXES):
                continue
            if _is_file(entry):
                out.append(safe_member(self.root, name, str(self.root)))  # never copy a link to outside
        return out


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    root = Path(path)
    if not root.exists():
        raise InputError(f"base checkpoint not found: {root} (give a folder holding model.safetensors or its shards)")
    if not root.is_dir():
        raise InputError(f"base checkpoint {root} is not a folder; give the folder that holds model.safetensors")
    config_path = safe_member(root, "config.json", str(root))
    config = read_json(config_path, "config.json") if config_path.exists() else None
    if config is not None and not isinstance(config, dict):
        raise InputError(f"{config_path}: config.json must be a JSON object")

    index_path = safe_member(root, INDEX_FILE, str(root))
    if index_path.exists():
        files = _open_sharded(root, index_path)
    elif (root / SINGLE_FILE).exists():
        files = [read_header(safe_member(root, SINGLE_FILE, str(root)))]
    else:
        others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.safetensors"))
        hint = (
            f" (found {', '.join(others[:3])}; only safetensors bases are supported: re-save the model with "
            f"save_pretrained(safe_serialization=True))" if others else ""
        )
        raise InputError(f"{root} holds no model.safetensors or {INDEX_FILE}{hint}")
    if not any(f.tensors for f in files):
        raise InputError(f"{root}: the checkpoint holds no tensors")
    checkpoint = Checkpoint(root, files, config)
    checkpoint.other_files()  # refuses links to outside the folder before any work starts
    return checkpoint


# Reads one shard's header: (path inside the checkpoint, file name as the index lists it) -> header.
ShardHeaderReader = Callable[[Path, str], SafetensorsFile]


def _read_local_shard(index_path: Path) -> ShardHeaderReader:
    def read(shard_path: Path, fname: str) -> SafetensorsFile:
        if not _is_file(shard_path):
            raise InputError(f"{index_path} lists {fname} but it is missing; download the complete checkpoint")
        return read_header(shard_path)

    return read


def _open_sharded(root: Path, index_path: Path, read_shard: ShardHeaderReader | None = None) -> list[SafetensorsFile]:
    """Validate an index against its shards' headers; `read_shard` lets a Hub checkpoint fetch them by range."""
    read_shard = read_shard or _read_local_shard(index_path)
    index = read_json(index_path, "index file")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: missing or empty 'weight_map'; re-download the index file")
    shard_names: list[str] = []
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str):
            raise InputError(f"{index_path}: weight_map entry for {tensor!r} is not a file name; re-download the index file")
        if fname not in shard_names:
            shard_names.append(fname)
    files: list[SafetensorsFile] = []
    seen: dict[str, str] = {}
    for fname in sorted(shard_names):
        shard_path = safe_member(root, fname, str(index_path))
        header = read_shard(shard_path, fname)
        for name in header.tensors:
            if name in seen:
                raise InputError(f"tensor {name!r} is stored in both {seen[name]} and {fname}; the checkpoint is inconsistent, re-download it")
            seen[name] = fname
            listed = weight_map.get(name)
            if listed is None:
                raise InputError(f"{fname} holds tensor {name!r} which {INDEX_FILE} does not list; the index is stale, re-download it")
            if listed != fname:
                raise InputError(f"{INDEX_FILE} says {name!r} is in {listed} but it is in {fname}; the index is stale, re-download it")
        files.append(header)
    missing = [name for name in weight_map if name not in seen]
    if missing:
        raise InputError(
            f"{INDEX_FILE} lists {len(missing)} tensor(s) not found in their shards (e.g. {missing[0]!r}); "
            "the download is incomplete, re-download it"
        )
    return files
