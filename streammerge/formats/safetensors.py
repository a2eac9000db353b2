"""The safetensors format core: validated header parsing, positioned reads, and a header-first writer.

We parse headers ourselves because the executor needs byte ranges (to read row chunks with `pread`)
and because every input file is untrusted. The writer reproduces `safetensors.torch.save_file`
byte for byte: same tensor order (dtype rank descending, then name), compact JSON, space padding
to a multiple of 8.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..errors import DiskFullError, InputError, OutputError

MAX_HEADER_BYTES = 100_000_000
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# Byte-sized dtypes as safetensors names them, in the order of its Rust `Dtype` enum (which
# `serialize` sorts by, descending). Sub-byte types (F4, F6_*) are listed for ordering only.
DTYPE_ORDER: tuple[str, ...] = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_RANK = {name: i for i, name in enumerate(DTYPE_ORDER)}

# safetensors dtype name <-> torch dtype attribute name (kept as strings: no torch import here).
TORCH_NAME: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64", "F64": "float64",
    "I64": "int64", "U64": "uint64",
}
FROM_TORCH_NAME: dict[str, str] = {v: k for k, v in TORCH_NAME.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors file; `start`/`end` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    data_start: int
    metadata: Mapping[str, str] | None
    tensors: Mapping[str, TensorInfo]  # in data-offset order

    @property
    def size(self) -> int:
        return self.data_start + sum(t.nbytes for t in self.tensors.values())


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen = dict(pairs)
    if len(seen) != len(pairs):
        counts: dict = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        raise ValueError(f"duplicate key {next(k for k, n in counts.items() if n > 1)!r}")
    return seen


_INT64_MAX = 2**63 - 1


def _as_dim(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"bad dimension {value!r}")
    if value > _INT64_MAX:
        raise ValueError(f"absurd dimension {value} (beyond 64-bit)")
    return value


def _check_extent(dims: tuple[int, ...], itemsize: int) -> None:
    """Shapes whose element count overflows 64 bits are refused even when a zero dimension makes
    them empty: torch and every reader index them with int64."""
    extent = itemsize
    for d in dims:
        extent *= d or 1
        if extent > _INT64_MAX:
            raise ValueError(f"absurd shape {list(dims)}: its size overflows 64 bits")


def parse_header(path: Path, header: bytes, file_size: int) -> SafetensorsFile:
    """Validate a header as the safetensors format requires; raise InputError naming the file."""

    def bad(why: str) -> InputError:
        return InputError(f"{path}: not a valid safetensors file ({why}); re-download or re-save it")

    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("header is not UTF-8") from None
    if not text.startswith("{"):
        raise bad("header is not a JSON object")
    try:
        raw = json.loads(text, object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as exc:
        raise bad(f"header JSON is invalid: {exc}") from None
    if not isinstance(raw, dict):
        raise bad("header is not a JSON object")

    metadata = raw.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise bad("__metadata__ must map strings to strings")

    data_start = 8 + len(header)
    buffer_len = file_size - data_start
    entries: list[TensorInfo] = []
    for name, entry in raw.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} entry must have exactly dtype, shape, data_offsets")
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r} has unsupported dtype {dtype!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        try:
            if not isinstance(shape, list):
                raise ValueError("shape is not a list")
            dims = tuple(_as_dim(d) for d in shape)
            _check_extent(dims, ITEMSIZE[dtype])
            if not isinstance(offsets, list) or len(offsets) != 2:
                raise ValueError("data_offsets must be [begin, end]")
            begin, end = (_as_dim(o) for o in offsets)
        except ValueError as exc:
            raise bad(f"tensor {name!r}: {exc}") from None
        if end < begin:
            raise bad(f"tensor {name!r}: data_offsets [{begin}, {end}] are out of order (end before begin)")
        nbytes = math.prod(dims) * ITEMSIZE[dtype]
        if nbytes > file_size:
            raise bad(f"tensor {name!r}: shape {list(dims)} x {dtype} is {nbytes} bytes, more than the whole {file_size}-byte file")
        if end - begin != nbytes:
            raise bad(f"tensor {name!r}: shape {list(dims)} x {dtype} is {nbytes} bytes but its span is {end - begin}")
        if end > buffer_len:
            raise bad(f"tensor {name!r} ends at byte {end} past the end of the data ({buffer_len}); the file is truncated")
        entries.append(TensorInfo(name, dtype, dims, data_start + begin, data_start + end))

    entries.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    for info in entries:
        if info.start != cursor:
            kind = "overlaps the previous one" if info.start < cursor else "leaves a gap before it"
            raise bad(f"tensor {info.name!r} {kind}")
        cursor = info.end
    if cursor != file_size:
        raise bad(f"data ends at byte {cursor} but the file has {file_size} bytes")
    return SafetensorsFile(path, data_start, metadata, {t.name: t for t in entries})


def read_header(path: str | os.PathLike) -> SafetensorsFile:
    """Read and validate the header of one safetensors file without touching its data."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise InputError(f"{path}: not a regular file; give the safetensors file itself")
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a valid safetensors file (only {file_size} bytes); re-download it")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: not a valid safetensors file (header length {length} exceeds 100 MB); re-download or re-save it"
                )
            if 8 + length > file_size:
                raise InputError(
                    f"{path}: not a valid safetensors file (header length {length} runs past the end of the "
                    f"{file_size}-byte file); the file is truncated, re-download it"
                )
            header = fh.read(length)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}; check that the file exists and is readable") from None
    return parse_header(path, header, file_size)


def pread_exact(fd: int, buffer: memoryview, offset: int, what: str = "file") -> None:
    """Fill `buffer` from `offset` with positioned reads; a short file is an error, never zeros."""
    view = buffer.cast("B") if buffer.format != "B" else buffer
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InputError(f"{what}: unexpected end of file at byte {offset + done}; the file is truncated")
        done += n


def release_cache(fd: int, offset: int, length: int) -> None:
    """Drop page cache for a consumed range so a low-RAM machine is not swamped by it."""
    if hasattr(os, "posix_fadvise") and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


# --------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def save_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order `safetensors.serialize` lays tensors out in: dtype rank descending, then name."""
    return sorted(specs, key=lambda s: (-_RANK[s.dtype], s.name))


def build_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (length prefix included) and each tensor's absolute [start, end) in the file.

    `specs` must already be in `save_order`.
    """
    # the JSON `json.dumps(..., separators=(",", ":"), ensure_ascii=False)` writes, assembled directly:
    # ten times faster for the 20k-tensor shards of a large MoE
    quote = json.encoder.encode_basestring
    parts = []
    if metadata is not None:
        parts.append('"__metadata__":' + json.dumps(dict(sorted(metadata.items())), separators=(",", ":"), ensure_ascii=False))
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for spec in specs:
        end = cursor + spec.nbytes
        parts.append(f'{quote(spec.name)}:{{"dtype":{quote(spec.dtype)},"shape":[{",".join(map(str, spec.shape))}],'
                     f'"data_offsets":[{cursor},{end}]}}')
        offsets[spec.name] = (cursor, end)
        cursor = end
    if len(offsets) != len(specs):
        raise ValueError("two tensors of one shard share a name")
    text = ("{" + ",".join(parts) + "}").encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    start = len(prefix)
    return prefix, {name: (start + a, start + b) for name, (a, b) in offsets.items()}


_SYNC_EVERY = 128 << 20
_SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT = 2, 1 | 4  # WRITE; WAIT_BEFORE | WAIT_AFTER


def _load_sync_file_range():
    """Linux's sync_file_range(2), or None (other systems flush with fdatasync instead)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


class ShardWriter:
    """Writes one output shard sequentially: header first, then tensor bytes in file order.

    The file lives at `NAME.partial` until `commit()` fsyncs and renames it, so a folder never holds
    a complete-looking shard that is not complete. The sha256 is computed on the fly.
    """

    def __init__(self, final_path: Path, header: bytes, total_size: int, *, resume_at: int | None = None,
                 prefix_hash=None):
        """`resume_at`: continue an existing NAME.partial after its first `resume_at` bytes (already
        verified by the caller); `prefix_hash` is their sha256 state, else they are read and hashed."""
        self.final_path = final_path
        self.partial_path = final_path.with_name(final_path.name + ".partial")
        self.total_size = total_size
        self._hash = hashlib.sha256()
        self._synced = 0
        self._behind: tuple[int, int] | None = None  # the window whose writeback runs while we write
        self._no_range_sync = False
        self._fd = -1
        flags = os.O_RDWR | os.O_CREAT
        try:
            self._fd = os.open(self.partial_path, flags, 0o644)
            self._lock_shard()
            if resume_at is None:
                os.ftruncate(self._fd, 0)
                self._reserve(total_size)
                self._pos = 0
                self.write(header)
            else:
                self._reserve(total_size)
                if prefix_hash is not None:
                    self._hash = prefix_hash
                    self._pos = self._synced = resume_at
                else:
                    self._rehash_prefix(resume_at)
        except OSError as exc:
            self.close()
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFullError(f"cannot write {self.partial_path}: {exc.strerror or exc}") from None
            raise OutputError(f"cannot write {self.partial_path}: {exc.strerror or exc}") from None

    def _lock_shard(self) -> None:
        """One writer per shard, whoever it is (partitions of one OUT write disjoint shards; this
        holds even if two were started with different partitionings): a `flock` on NAME.partial."""
        try:
            import fcntl
        except ImportError:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(self._fd)
                self._fd = -1
                raise OutputError(f"another process is writing {self.partial_path}; one writer per shard") from None
            # a filesystem without locks: unprotected, as OUT's own lock

    def _reserve(self, size: int) -> None:
        if hasattr(os, "posix_fallocate") and size > 0:
            try:
                os.posix_fallocate(self._fd, 0, size)
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:
                    raise
                # Filesystems without fallocate support: space is claimed as we write.

    def _rehash_prefix(self, upto: int) -> None:
        buf = bytearray(min(upto, 16 << 20) or 1)
        pos = 0
        while pos < upto:
            n = min(len(buf), upto - pos)
            view = memoryview(buf)[:n]
            pread_exact(self._fd, view, pos, str(self.partial_path))
            self._hash.update(view)
            pos += n
        self._pos = upto
        self._synced = upto

    @property
    def position(self) -> int:
        return self._pos

    def write(self, data: memoryview | bytes, *, hash: bool = True) -> None:
        """Append `data`; with `hash=False` the caller feeds the same bytes, in order, to `absorb`
        (from another thread: hashing then overlaps the writes)."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], self._pos + done)
        if hash:
            self._hash.update(view)
        self._pos += len(view)
        if self._pos - self._synced >= _SYNC_EVERY:
            self._flush_behind()

    def _flush_behind(self) -> None:
        """Keep written page cache bounded without stalling on the disk: start the writeback of the
        window just written, then wait for the window before it (long done, as a rule) and drop its
        pages. At most two windows of the shard are in the page cache at any time."""
        start, end = self._synced, self._pos
        self._synced = end
        if self._range_sync(start, end, _SYNC_FILE_RANGE_WRITE):
            if self._behind is not None:
                b0, b1 = self._behind
                self._range_sync(b0, b1, _SYNC_FILE_RANGE_WAIT | _SYNC_FILE_RANGE_WRITE)
                release_cache(self._fd, b0, b1 - b0)
            self._behind = (start, end)
            return
        os.fdatasync(self._fd)  # no sync_file_range here: flush and drop in one go
        if self._behind is not None:
            start, self._behind = self._behind[0], None
        release_cache(self._fd, start, end - start)

    def _range_sync(self, start: int, end: int, flags: int) -> bool:
        """sync_file_range; False where the system or filesystem lacks it. A writeback error (EIO,
        ENOSPC) is raised, as fdatasync would raise it."""
        if _sync_file_range is None or self._no_range_sync:
            return False
        if _sync_file_range(self._fd, start, end - start, flags) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
            self._no_range_sync = True
            return False
        raise OSError(err, os.strerror(err))

    def absorb(self, data: memoryview | bytes) -> None:
        self._hash.update(memoryview(data).cast("B"))

    def running_sha256(self) -> str:
        """sha256 hex digest of the bytes hashed so far (the file's prefix up to them)."""
        return self._hash.copy().hexdigest()

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def commit(self, *, rename: bool = True) -> str:
        """Fsync, rename into place (unless `rename=False`: the caller renames it later), return the
        sha256 hex digest of the whole file."""
        if self._pos != self.total_size:
            raise OutputError(f"internal error: {self.final_path.name} has {self._pos} of {self.total_size} bytes")
        os.ftruncate(self._fd, self.total_size)
        os.fsync(self._fd)
        release_cache(self._fd, 0, self.total_size)
        os.close(self._fd)
        self._fd = -1
        if rename:
            os.replace(self.partial_path, self.final_path)
            fsync_dir(self.final_path.parent)
        return self._hash.hexdigest()

    def close(self, *, sync: bool = False) -> None:
        """Close without committing; `sync` flushes what was written (an interrupted run keeps it)."""
        if self._fd >= 0:
            if sync:
                try:
                    os.fdatasync(self._fd)
                except OSError:
                    pass
            os.close(self._fd)
            self._fd = -1


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
