"""Hugging Face Hub repos as inputs and outputs: ids, revisions pinned to commits, downloads, uploads.

A BASE or ADAPTER that is not an existing local path but reads `org/name` or `org/name@revision`
is a Hub repo, resolved with huggingface_hub (token from its usual places: HF_TOKEN, the file
`hf auth login` writes; never printed, never recorded). The revision is pinned to a commit first,
so every later request sees the same files; small files (config, tokenizer, index; whole adapters)
go into the Hugging Face cache. A base is not downloaded whole to be planned: reading one from the
Hub is its own job, in hub/checkpoint.py, on top of this module's resolution and errors.

With HF_HUB_OFFLINE=1 everything comes from the cache and whatever is missing is named.
huggingface_hub's settings (HF_ENDPOINT, HF_HUB_CACHE, offline) are read through its `constants`
module at call time, as every Hugging Face library does.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import AdapterError, InputError, OutputError, StreamMergeError
from ..network import ours, watch_client

_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<rev>[^\s@]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
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
