"""Hugging Face Hub repos as inputs and outputs.

A BASE or ADAPTER that is not an existing local path but reads `org/name` or `org/name@revision`
is a Hub repo, resolved with huggingface_hub (token from its usual places: HF_TOKEN, the file
`hf auth login` writes; never printed, never recorded). The revision is pinned to a commit first,
so every later request sees the same files:

- small files (config, tokenizer, index; whole adapters) go into the Hugging Face cache;
- base shard *headers* are read with HTTP range requests, so `plan` downloads no shard;
- shards are downloaded one at a time while merging (io/fetch.py), into the same cache; shards
  already cached are used in place, and with --low-disk those we downloaded are evicted once read.

With HF_HUB_OFFLINE=1 everything comes from the cache and whatever is missing is named.
huggingface_hub's settings (HF_ENDPOINT, HF_HUB_CACHE, offline) are read through its `constants`
module at call time, as every Hugging Face library does.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..errors import AdapterError, ExecutionError, InputError, OutputError, StreamMergeError
from ..network import ours, watch_client
from .checkpoint import (
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
from .safetensors import MAX_HEADER_BYTES, SafetensorsFile, parse_header, pread_exact, read_header

_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[^\s@]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
FIRST_READ = 100_000  # one request holds the header of nearly every safetensors file
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


# ------------------------------------------------------------------------------------- ids


@dataclass(frozen=True)
class HubRef:
    """A repo id as the user wrote it; `revision` None means the default branch."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str | os.PathLike) -> HubRef | None:
    """`org/name` or `org/name@revision` -> HubRef; anything else (or any existing path) -> None.

    A local path always wins: an existing file or folder, or a path starting with `.`, `/` or `~`
    (write `./org/name` to insist on a local folder).
    """
    s = os.fspath(text)
    if not isinstance(s, str) or os.path.exists(s) or s.startswith((".", "/", "~")) or "\\" in s:
        return None
    match = _ID.match(s)
    if not match:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(match.group("repo"))
    except HFValidationError:
        return None
    return HubRef(match.group("repo"), match.group("rev"))


def is_hub_id(text: str | os.PathLike) -> bool:
    return parse_hub_id(text) is not None


def hub_origin(path: str | os.PathLike) -> dict[str, str] | None:
    """The repo and commit of a Hugging Face cache snapshot folder (`models--org--name/snapshots/<sha>`)."""
    p = Path(os.path.abspath(path))
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--") and _COMMIT.match(p.name):
        return {"repo_id": p.parent.parent.name[len("models--"):].replace("--", "/"), "commit": p.name}
    return None


# ------------------------------------------------------------------------------ resolution


@dataclass(frozen=True)
class HubSource:
    """A Hub input pinned to one commit; `root` is its snapshot folder in the cache."""

    repo_id: str
    revision: str | None
    commit: str
    root: Path
    files: tuple[str, ...]
    offline: bool

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def to_record(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit}


def _constants():
    from huggingface_hub import constants

    return constants


def cache_dir() -> Path:
    return Path(_constants().HF_HUB_CACHE)


def offline() -> bool:
    return bool(_constants().is_offline_mode())


def _storage(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


def _first_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def hub_errors(what: str, error: type[StreamMergeError] = InputError) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one actionable line (no headers, no token)."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from huggingface_hub.utils import get_session

    endpoint = _constants().ENDPOINT
    watch_client(get_session())  # its pooled connections stay ours: others are refused per request
    try:
        with ours():  # streammerge's own request: the network guard lets it (and its helper threads) through
            yield
    except StreamMergeError:
        raise
    except GatedRepoError:
        raise error(f"{what}: the repo is gated; accept its terms on the Hub, then log in (`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise error(
            f"{what}: no local folder of that name, and no such repository on {endpoint} (or it is private and no "
            "token with access was found); check the path or id, or log in with `hf auth login` / HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise error(f"{what}: that revision does not exist on {endpoint}; check the branch, tag or commit after '@'") from None
    except RemoteEntryNotFoundError:
        raise error(f"{what}: the file does not exist at that revision") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise error(f"{what}: not in the Hugging Face cache ({cache_dir()}) and offline mode is on; unset HF_HUB_OFFLINE or download it first") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = "log in with a token that has access (`hf auth login` or HF_TOKEN)" if status in (401, 403) else "retry later"
        raise error(f"{what}: the Hub at {endpoint} answered HTTP {status} ({_first_line(exc.server_message or '')}); {hint}") from None
    except (httpx2.HTTPError, ConnectionError, TimeoutError) as exc:
        raise error(
            f"{what}: cannot reach {endpoint} ({type(exc).__name__}: {_first_line(str(exc))}); check the network, "
            "or set HF_HUB_OFFLINE=1 to use the cache"
        ) from None
    except OSError as exc:
        raise error(f"{what}: {exc.strerror or _first_line(str(exc))}") from None


def resolve(ref: HubRef, what: str) -> HubSource:
    """Pin `ref` to a commit and list its files (online: model_info; offline: the cache's refs)."""
    if offline():
        return _resolve_offline(ref, what)
    from huggingface_hub import HfApi

    with hub_errors(f"{what} {ref}"):
        info = HfApi().model_info(ref.repo_id, revision=ref.revision)
    if not info.sha or not _COMMIT.match(info.sha):
        raise InputError(f"{what} {ref}: the Hub did not name a commit for this revision; retry later")
    files = tuple(s.rfilename for s in (info.siblings or []))
    return HubSource(ref.repo_id, ref.revision, info.sha, _storage(ref.repo_id) / "snapshots" / info.sha, files, False)


def _resolve_offline(ref: HubRef, what: str) -> HubSource:
    storage = _storage(ref.repo_id)
    revision = ref.revision or "main"
    commit = revision if _COMMIT.match(revision) else None
    ref_file = storage / "refs" / revision
    if commit is None and ref_file.is_file():
        commit = ref_file.read_text().strip()
        commit = commit if _COMMIT.match(commit) else None
    root = storage / "snapshots" / (commit or "-")
    if commit is None or not root.is_dir():
        raise InputError(
            f"{what} {ref} is not in the Hugging Face cache ({cache_dir()}) and offline mode is on (HF_HUB_OFFLINE=1); "
            f"download it first (e.g. `hf download {ref.repo_id}`) or unset HF_HUB_OFFLINE"
        )
    files = tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))
    return HubSource(ref.repo_id, ref.revision, commit, root, files, True)


def download(source: HubSource, filename: str, *, pin_ref: bool = False) -> Path:
    """One file of `source` into the cache (a no-op when cached); returns its snapshot path.

    `pin_ref` downloads by the user's revision name so the cache records branch -> commit, which
    is what lets a later offline run find `org/name` without a commit id.
    """
    from huggingface_hub import hf_hub_download

    revision = (source.revision or "main") if pin_ref else source.commit
    path = Path(hf_hub_download(source.repo_id, filename, revision=revision, cache_dir=str(cache_dir())))
    if source.root not in path.parents:
        raise InputError(f"{source} changed on the Hub while it was being resolved; run the command again")
    return path


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


# ------------------------------------------------------------------------------------ base


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


# ---------------------------------------------------------------------------------- adapters


def adapter_folder(path: str | os.PathLike) -> Path:
    """A local adapter folder as given, or a Hub adapter repo downloaded (it is small) into the cache."""
    ref = parse_hub_id(path)
    if ref is None:
        return Path(path)
    source = resolve(ref, "adapter")
    present = [name for name in ADAPTER_FILES if name in source.files]
    if "adapter_config.json" not in present:
        where = "in the cache" if source.offline else "on the Hub"
        raise AdapterError(f"adapter {ref} {where} has no adapter_config.json; is it a PEFT LoRA adapter repo?")
    if not source.offline:
        with hub_errors(f"adapter {ref}", AdapterError):
            for i, name in enumerate(present):
                download(source, name, pin_ref=i == 0)
    return source.root


# -------------------------------------------------------------------------------------- push


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def check_push_id(repo_id: str) -> None:
    """Reject a malformed --push-to-hub target before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise OutputError(f"--push-to-hub {repo_id!r} is not a valid repo id; write it as org/name") from None
    if "/" not in repo_id:
        raise OutputError(f"--push-to-hub {repo_id!r}: write the repo as org/name (or user/name)")


def prepare_push(repo_id: str, *, private: bool | None, revision: str | None) -> None:
    """Create the target repo (and branch) before merging, so a missing token fails in seconds, not hours."""
    check_push_id(repo_id)
    if offline():
        raise OutputError("--push-to-hub needs the network but offline mode is on (HF_HUB_OFFLINE=1)")
    api = _api()
    with hub_errors(f"--push-to-hub {repo_id}", OutputError):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)


def push_folder(out: Path, repo_id: str, *, revision: str | None, message: str) -> str:
    """Upload the finished folder in one `upload_folder` call (huggingface_hub's resumable upload)."""
    api = _api()
    with hub_errors(f"pushing {out} to {repo_id}", OutputError):
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(out), revision=revision, commit_message=message,
            ignore_patterns=[".*", "*.partial", "*.tmp"],
        )
    return str(getattr(info, "commit_url", info))


class ShardUploader:
    """With --low-disk: each finished shard is uploaded in its own commit, then deleted locally.

    One upload runs at a time and the next finished shard waits for it, so the output folder holds
    at most the shard being written and the one being uploaded. The index is pushed last by
    `push_folder`, so the repo is a loadable model only once everything is there.
    """

    def __init__(self, out: Path, repo_id: str, *, revision: str | None, on_uploaded=None):
        self.out = out
        self.repo_id = repo_id
        self.revision = revision
        self.on_uploaded = on_uploaded  # called with the file name once it is on the Hub (the journal)
        self.uploaded: list[str] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __call__(self, filename: str, path: Path | None = None) -> None:
        """Upload `path` (default OUT/filename; a shard not yet renamed is given as its .partial)."""
        self.wait()
        self._thread = threading.Thread(target=self._upload, args=(filename, path or self.out / filename),
                                        name="streammerge-push", daemon=True)
        self._thread.start()

    def _upload(self, filename: str, path: Path) -> None:
        try:
            with hub_errors(f"pushing {filename} to {self.repo_id}", OutputError):
                _api().upload_file(
                    path_or_fileobj=str(path), path_in_repo=filename, repo_id=self.repo_id, revision=self.revision,
                    commit_message=f"streammerge: add {filename}",
                )
            if self.on_uploaded is not None:
                self.on_uploaded(filename)
            path.unlink()
            self.uploaded.append(filename)
        except BaseException as exc:  # re-raised in the merging thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def model_card(record: dict[str, Any], repo_id: str) -> str:
    """README.md for the pushed model: what was merged, and the `base_model` metadata the Hub reads."""
    from huggingface_hub import ModelCardData

    base = record.get("base", {})
    adapters = record.get("adapters", [])
    method = record.get("method", "merged_16bit")
    hub_ids = [h["repo_id"] for h in [base.get("hub")] + [a.get("hub") for a in adapters] if h]
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation=("adapter" if method == "lora" else "merge") if hub_ids else None,
        library_name="peft" if method == "lora" else "transformers",
        tags=["streammerge", "lora", "merge"],
    )

    def name(entry: dict[str, Any]) -> str:
        hub = entry.get("hub")
        return f"[{hub['repo_id']}](https://huggingface.co/{hub['repo_id']}) (commit `{hub['commit'][:12]}`)" if hub else f"`{Path(entry.get('path', '?')).name}` (local)"

    lines = [
        "---", data.to_yaml(), "---", "", f"# {repo_id.split('/')[-1]}", "",
        f"LoRA adapter(s) merged into a base model with [streammerge](https://pypi.org/project/streammerge/) "
        f"{record.get('streammerge_version', '')} (method `{method}`).", "",
        f"- base: {name(base)}",
        *[f"- adapter: {name(a)}" + (f", weight {a['weight']:g}" if a.get("weight", 1.0) != 1.0 else "") for a in adapters],
        f"- dtype: {record.get('options', {}).get('dtype') or 'as the base'}",
        "", "`streammerge.json` records the inputs, options and the sha256 of every shard.", "",
    ]
    return "\n".join(lines)
