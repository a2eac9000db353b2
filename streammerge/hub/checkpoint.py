"""A base checkpoint on the Hub, planned from remote headers and merged shard by shard.

Apart from the client (client.py) because this is what lets a base far larger than the free disk
be merged from the Hub, and it is a protocol of its own on top of the client's resolution:

- base shard *headers* are read with HTTP range requests, so `plan` downloads no shard;
- shards are downloaded one at a time while merging (hub/fetch.py), into the same cache; shards
  already cached are used in place, and with --low-disk those we downloaded are evicted once read.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ExecutionError, InputError
from ..formats.checkpoint import (
    INDEX_FILE,
    NOT_COPIED,
    SINGLE_FILE,
    WEIGHT_SUFFIXES,
    Checkpoint,
    _open_sharded,
    open_checkpoint,
    read_json,
    safe_member,
)
from ..formats.safetensors import MAX_HEADER_BYTES, SafetensorsFile, parse_header, pread_exact, read_header
from .client import HubRef, HubSource, _constants, download, hub_errors, parse_hub_id, resolve

FIRST_READ = 100_000  # one request holds the header of nearly every safetensors file


def _small_files(files: Sequence[str]) -> list[str]:
    """Top-level non-weight files of a base repo: what the output copies, plus the index."""
    out = []
    for name in files:
        if "/" in name or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES):
            continue
        if name in NOT_COPIED and name != INDEX_FILE:
            continue
        out.append(name)
    return sorted(out, key=lambda n: (n != "config.json", n))


class HubCheckpoint(Checkpoint):
    """A base on the Hub: headers from ranged reads, shard files appear in `root` once downloaded."""

    def __init__(self, source: HubSource, files: list[SafetensorsFile], config, cached: set[str]):
        super().__init__(source.root, files, config)
        self.source = source
        self.label = f"{source.repo_id}@{source.commit}"
        self.cached = frozenset(cached)  # shard paths that were in the cache before this run

    @property
    def download_bytes(self) -> int:
        return sum(f.size for f in self.files if str(f.path) not in self.cached)

    def read_small(self, refs: Mapping[str, Any], workers: int = 8) -> dict[str, bytes]:
        """The bytes of a few small tensors (4-bit quant states, code books), for planning: from a
        shard already on disk, else by HTTP range requests, so a 4-bit base on the Hub is planned
        before any shard is downloaded (like its headers)."""
        from concurrent.futures import ThreadPoolExecutor

        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        headers = {**build_hf_headers(), "Accept-Encoding": "identity"}

        def read(item: tuple[str, Any]) -> tuple[str, bytes]:
            name, ref = item
            info, path = ref.info, Path(ref.file)
            if path.is_file():
                buf = bytearray(info.nbytes)
                fd = os.open(path, os.O_RDONLY)
                try:
                    pread_exact(fd, memoryview(buf), info.start, str(path))
                finally:
                    os.close(fd)
                return name, bytes(buf)
            url = hf_hub_url(self.source.repo_id, path.relative_to(self.root).as_posix(), revision=self.source.commit,
                             endpoint=_constants().ENDPOINT)
            with hub_errors(f"reading {name} from {self.source.repo_id}"):
                data, _ = _get_range_retrying(url, info.start, info.end, headers) if info.nbytes else (b"", 0)
            if len(data) != info.nbytes:
                raise InputError(f"{self.source.repo_id}/{path.name}: {name} is cut short ({len(data)} of {info.nbytes} bytes)")
            return name, data

        with ThreadPoolExecutor(max_workers=min(workers, max(1, len(refs)))) as pool:
            return dict(pool.map(read, refs.items()))


def open_base(base: str | os.PathLike) -> Checkpoint:
    """A local checkpoint folder, or a Hub repo id planned from remote headers."""
    ref = parse_hub_id(base)
    return open_checkpoint(base) if ref is None else open_hub_checkpoint(ref)


def open_hub_checkpoint(ref: HubRef) -> HubCheckpoint:
    source = resolve(ref, "base")
    names = set(source.files)
    if not source.offline:
        with hub_errors(f"base {ref}"):
            for i, name in enumerate(_small_files(source.files)):
                download(source, name, pin_ref=i == 0)
    root = source.root
    config = None
    if (root / "config.json").is_file():
        config = read_json(root / "config.json", "config.json")
        if not isinstance(config, dict):
            raise InputError(f"{root / 'config.json'}: config.json must be a JSON object")

    if source.offline:
        _check_offline_complete(source)
        local = open_checkpoint(root)
        return HubCheckpoint(source, local.files, config, {str(f.path) for f in local.files})

    cached: set[str] = set()
    fetched = _prefetch_headers(source, names) if INDEX_FILE in names else {}

    def read_shard(path: Path, fname: str) -> SafetensorsFile:
        if fname not in names:
            raise InputError(f"base {ref}: {INDEX_FILE} lists {fname} but the repo has no such file; the repo is inconsistent")
        if path.is_file():  # already in the cache: read locally, use in place
            cached.add(str(path))
            return read_header(path)
        got = fetched.get(fname)
        if isinstance(got, BaseException):
            raise got
        return got if got is not None else read_remote_header(source, fname, path)

    if INDEX_FILE in names:
        files = _open_sharded(root, root / INDEX_FILE, read_shard)
    elif SINGLE_FILE in names:
        files = [read_shard(safe_member(root, SINGLE_FILE, str(ref)), SINGLE_FILE)]
    else:
        others = sorted(n for n in names if n.endswith((".bin", ".safetensors", ".gguf")))
        hint = f" (it holds {', '.join(others[:3])}; only safetensors bases are supported)" if others else ""
        raise InputError(f"base {ref} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    if not any(f.tensors for f in files):
        raise InputError(f"base {ref}: the checkpoint holds no tensors")
    return HubCheckpoint(source, files, config, cached)


def _prefetch_headers(source: HubSource, names: set[str], workers: int = 8) -> dict[str, SafetensorsFile | BaseException]:
    """Headers of the shards the index lists, fetched concurrently (a 405B base has ~200 shards).

    Best effort: anything odd (bad index, unsafe name, a failed request) is left for the validating
    sequential pass in `_open_sharded`, which reports it properly."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        index = read_json(source.root / INDEX_FILE, "index file")
        shards = sorted({v for v in index["weight_map"].values() if isinstance(v, str)})
        todo = {name: safe_member(source.root, name, INDEX_FILE) for name in shards if name in names}
    except (InputError, KeyError, TypeError, AttributeError):
        return {}
    todo = {name: path for name, path in todo.items() if not path.is_file()}

    def fetch(item: tuple[str, Path]) -> SafetensorsFile | BaseException:
        try:
            return read_remote_header(source, *item)
        except Exception as exc:  # re-raised by read_shard, in index order
            return exc

    with ThreadPoolExecutor(max_workers=min(workers, max(1, len(todo)))) as pool:
        return dict(zip(todo, pool.map(fetch, todo.items())))


def _check_offline_complete(source: HubSource) -> None:
    root = source.root
    if (root / INDEX_FILE).is_file():
        index = read_json(root / INDEX_FILE, "index file")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        missing = [s for s in shards if isinstance(s, str) and not (root / s).is_file()]
    elif (root / SINGLE_FILE).is_file():
        missing = []
    else:
        missing = [f"{SINGLE_FILE} (or {INDEX_FILE})"]
    if missing:
        listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise InputError(
            f"offline mode (HF_HUB_OFFLINE=1): base {source} is only partly in the Hugging Face cache ({root}); "
            f"missing {listed}; download it first (e.g. `hf download {source.repo_id}`) or unset HF_HUB_OFFLINE"
        )


def _total_size(response) -> int:
    content_range = response.headers.get("Content-Range")
    if response.status_code == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    length = response.headers.get("Content-Length")
    if response.status_code == 200 and length and length.isdigit():
        return int(length)
    raise InputError(f"{response.request.url}: the server did not say how large the file is (no Content-Range); cannot plan from it")


def _get_range(url: str, start: int, stop: int, headers: dict[str, str]) -> tuple[bytes, int]:
    """Bytes [start, stop) of a remote file (fewer if it is shorter) and the file's total size."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    want = stop - start
    with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start}-{stop - 1}"}) as response:
        hf_raise_for_status(response)
        total = _total_size(response)
        skip = start if response.status_code == 200 else 0  # a server that ignores Range sends it all
        chunks, have = [], 0
        for chunk in response.iter_bytes():
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            chunks.append(chunk)
            have += len(chunk)
            if have >= want:
                break
    return b"".join(chunks)[:want], total


def _get_range_retrying(url: str, start: int, stop: int, headers: dict[str, str], attempts: int = 3) -> tuple[bytes, int]:
    """`_get_range`, retried after a dropped connection or a timeout (as huggingface_hub does for downloads)."""
    import time

    import httpx2

    for attempt in range(attempts):
        try:
            return _get_range(url, start, stop, headers)
        except (httpx2.TransportError, ConnectionError, TimeoutError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def read_remote_header(source: HubSource, fname: str, path: Path) -> SafetensorsFile:
    """A shard's header by HTTP range requests, validated exactly as a local file's would be."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(source.repo_id, fname, revision=source.commit, endpoint=_constants().ENDPOINT)
    headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
    where = f"{source.repo_id}/{fname}"
    with hub_errors(f"reading the header of {where}"):
        data, total = _get_range_retrying(url, 0, FIRST_READ, headers)
        if len(data) < 8:
            raise InputError(f"{where}: not a valid safetensors file (only {total} bytes)")
        (length,) = struct.unpack("<Q", data[:8])
        if length > MAX_HEADER_BYTES or 8 + length > total:
            raise InputError(f"{where}: not a valid safetensors file (header length {length} for a {total}-byte file)")
        header = data[8 : 8 + length]
        if len(header) < length:
            header, _ = _get_range_retrying(url, 8, 8 + length, headers)
        if len(header) != length:
            raise InputError(f"{where}: the server sent {len(header)} of the {length} header bytes; retry")
    return parse_header(path, header, total)


def download_shard(source: HubSource, path: Path) -> None:
    """Download one base shard into the cache at `path` (huggingface_hub resumes dropped transfers)."""
    fname = str(path.relative_to(source.root))
    with hub_errors(f"downloading {fname} from {source}", ExecutionError):
        got = download(source, fname)
    if got != path:
        raise ExecutionError(f"internal error: {fname} landed at {got}, expected {path}")


def evict(path: Path) -> None:
    """Remove a shard this run downloaded: its snapshot link, and its blob unless another snapshot links it."""
    blob = path.resolve() if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if blob is None or blob.parent.name != "blobs":
        return
    snapshots = blob.parent.parent / "snapshots"
    for other in snapshots.rglob("*") if snapshots.is_dir() else ():
        if other.is_symlink() and other.resolve() == blob:
            return
    blob.unlink(missing_ok=True)
