"""`--method gguf` end to end: plan (headers, config, tokenizer) -> output folder -> stream -> record.

A Hub base (`org/name[@revision]`) is planned from ranged header reads like any other merge (its
config and tokenizer files are downloaded first); its shards are then fetched one ahead of the
writer by the same Prefetcher as the safetensors path, and with --low-disk each one this run
downloaded is deleted after its last read. --push-to-hub uploads OUT (GGUF files, config,
tokenizer, streammerge.json and a model card) in one commit once everything is written.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import AdapterError, OutputError
from ..options import MergeOptions, format_size
from .plan import GGUFPlan, build_gguf_plan, summary_lines


def plan_gguf(base, adapters, options: MergeOptions):
    """(checkpoint, adapters, merge plan, GGUF plan) from headers, config and tokenizer files only.

    The architecture is checked first, so an unsupported model is refused before anything else."""
    from ..adapters import load_adapter
    from ..api import _adapter_specs
    from ..io.hub import adapter_folder, open_base
    from ..planner import build_plan
    from . import require
    from .arch import arch_of

    require()  # before any work: the gguf package is needed to write anything
    checkpoint = open_base(base)  # a local folder, or a Hub repo planned from ranged header reads
    arch_of(checkpoint.config)
    loaded = [load_adapter(adapter_folder(spec.path), spec.weight) for spec in _adapter_specs(adapters)]
    if not loaded:
        raise AdapterError("give at least one adapter")
    merge_plan = build_plan(checkpoint, loaded, options)
    return checkpoint, loaded, merge_plan, build_gguf_plan(checkpoint, merge_plan, options)


def print_gguf_plan(base, adapters, options: MergeOptions, *, as_json: bool, low_disk: bool = False) -> int:
    from ..io.hub import HubCheckpoint

    checkpoint, _, merge_plan, gplan = plan_gguf(base, adapters, options)
    if as_json:
        print(json.dumps({"merge": merge_plan.to_dict(), "gguf": gplan.to_dict()}, indent=2))
        return 0
    print("\n".join(summary_lines(gplan, free_disk=shutil.disk_usage(Path.cwd()).free)))
    if isinstance(checkpoint, HubCheckpoint):  # what a merge would download, and its peak disk
        print("\n".join(disk_estimate(checkpoint, gplan, low_disk=low_disk).lines()))
    return 0


def merge_gguf(base, adapters, out, options: MergeOptions, *, overwrite: bool = False, quiet: bool = True,
               low_disk: bool = False, push_to_hub: str | None = None, private: bool | None = None,
               push_revision: str | None = None):
    """Write OUT/<name>-<TYPE>.gguf (or its split files), the base's config and tokenizer files,
    and streammerge.json (last). No 16-bit copy of the model is ever written. A Hub base is fetched
    shard by shard (`low_disk`: each downloaded shard deleted after its last read); `push_to_hub`
    uploads OUT with a model card at the end (the repo is created first, so a token problem fails
    before the merge)."""
    from ..api import MergeResult, peak_rss_bytes
    from ..execute import resolve_device
    from ..hub_run import input_files
    from ..io.hub import HubCheckpoint, prepare_push
    from ..io.output import RECORD_FILE, atomic_write_json, copy_other_files, merged_config, prepare_output
    from .execute import run_plan

    started = time.perf_counter()
    checkpoint, loaded, merge_plan, gplan = plan_gguf(base, adapters, options)
    device = resolve_device(options.device)
    out = Path(out)
    prepare_output(out, overwrite=overwrite, protected=[checkpoint.root, *(a.path for a in loaded)])
    remote = isinstance(checkpoint, HubCheckpoint) and checkpoint.download_bytes > 0
    estimate = disk_estimate(checkpoint, gplan, low_disk=low_disk)
    check_disk_space(estimate, out, low_disk=low_disk)
    if push_to_hub:
        prepare_push(push_to_hub, private=private, revision=push_revision)
    inputs = input_files(checkpoint, low_disk=low_disk) if remote else None
    copied = copy_other_files(checkpoint.other_files(), out)
    config = merged_config(checkpoint.config, None)  # a bitsandbytes base's quantization_config is dropped
    if config is not None:
        atomic_write_json(out / "config.json", config)
    results, seconds = run_plan(gplan, out, device=device, progress=not quiet, inputs=inputs)
    files = [{"filename": r.filename, "size": r.size, "sha256": r.sha256} for r in results]
    record = _record(gplan, loaded, files, copied, device, seconds, checkpoint)
    if inputs is not None:
        record["downloads"] = {"fetched": [Path(f).name for f in inputs.fetched],
                               "evicted": [Path(f).name for f in inputs.evicted], "low_disk": low_disk}
    if push_to_hub:
        record["push"] = {"repo_id": push_to_hub, "revision": push_revision or "main", "shards_removed_locally": False}
    atomic_write_json(out / RECORD_FILE, record)
    pushed = _push(out, record, gplan, push_to_hub, push_revision) if push_to_hub else None
    result = MergeResult(out, merge_plan, time.perf_counter() - started, peak_rss_bytes(), files, pushed)
    result.gguf = gplan
    return result


def disk_estimate(checkpoint, gplan: GGUFPlan, *, low_disk: bool):
    """Peak disk of a GGUF merge under the Prefetcher's policy (io/fetch.estimate_disk), tensors in
    GGUF write order; a local base downloads nothing."""
    from ..io.fetch import estimate_disk
    from ..io.hub import HubCheckpoint

    reads = [(i, t) for i, f in enumerate(gplan.files) for t in f.tensors if t.source is not None]
    files = [t.source.source.file for _, t in reads]
    sizes = {str(f.path): f.size for f in checkpoint.files}
    sizes.update({f: 0 for f in files if f not in sizes})  # adapter files (replaced tensors) are local
    downloaded = set(sizes) - set(checkpoint.cached) if isinstance(checkpoint, HubCheckpoint) else set()
    return estimate_disk(files, [i for i, _ in reads], [f.size for f in gplan.files], sizes, downloaded,
                         low_disk=low_disk)


def check_disk_space(estimate, out: Path, *, low_disk: bool) -> None:
    """The GGUF files and the base shards downloaded at once, against free space per filesystem."""
    import os

    from ..io.hub import cache_dir

    need = estimate.peak_output
    if estimate.downloads:
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        if os.stat(cache).st_dev == os.stat(out).st_dev:
            need = estimate.peak
        elif (free := shutil.disk_usage(cache).free) < estimate.peak_input:
            raise OutputError(
                f"not enough disk space in the Hugging Face cache {cache}: downloading the base needs "
                f"{estimate.peak_input / 1e9:.2f} GB at once, {free / 1e9:.2f} GB free; free space"
                + ("" if low_disk else ", or pass --low-disk to keep only two input shards")
            )
    free = shutil.disk_usage(out).free
    if free < need:
        hint = "" if low_disk or not estimate.downloads else "; --low-disk keeps only two input shards on disk"
        raise OutputError(
            f"not enough disk space in {out}: the GGUF needs {need / 1e9:.2f} GB"
            + (" with the base shards downloaded at once" if need != estimate.peak_output else "")
            + f", {free / 1e9:.2f} GB free; free space or choose another --out{hint}"
        )


def _push(out: Path, record: dict[str, Any], gplan: GGUFPlan, repo_id: str, revision: str | None) -> str:
    """README.md (model card: base, adapters, `base_model` metadata) then OUT in one commit."""
    from ..io.hub import model_card, push_folder
    from ..io.output import atomic_write_text

    card = model_card(record, repo_id).replace("library_name: transformers", "library_name: gguf", 1)
    atomic_write_text(out / "README.md", card)
    message = f"streammerge: gguf {gplan.gguf_type} of {gplan.merge_plan.base} ({record.get('merged_tensors', 0)} tensors merged)"
    return push_folder(out, repo_id, revision=revision, message=message)


def result_line(result) -> str:
    gplan: GGUFPlan = result.gguf
    merged = sum(1 for t in gplan.tensors if t.source is not None and t.source.loras)
    names = ", ".join(f["filename"] for f in result.shards[:2]) + (", ..." if len(result.shards) > 2 else "")
    return (
        f"wrote {result.out}/{names}: {len(gplan.tensors)} tensors ({merged} merged), {gplan.gguf_type}, "
        f"{format_size(gplan.file_bytes)} in {len(gplan.files)} file(s) in {result.seconds:.1f} s, "
        f"peak RSS {format_size(result.peak_rss_bytes)}"
        + (f"; pushed: {result.pushed}" if getattr(result, "pushed", None) else "")
    )


def _record(gplan: GGUFPlan, adapters, files: list[dict], copied: list[str], device, seconds: float,
            checkpoint=None) -> dict[str, Any]:
    import gguf
    import torch

    from ..io.hub import hub_origin

    mp = gplan.merge_plan
    sizes = {str(f.path): f.size for f in checkpoint.files} if checkpoint is not None else {}
    base = {"path": mp.base, "files": [{"name": Path(f).name, "size": sizes.get(f) or Path(f).stat().st_size}
                                       for f in sorted({t.source.file for t in mp.tensors})]}
    if getattr(checkpoint, "source", None) is not None:  # a Hub base: repo and commit
        base["hub"] = checkpoint.source.to_record()
    return {
        "streammerge_version": __version__,
        "method": "gguf",
        "gguf": {"type": gplan.gguf_type, "architecture": gplan.arch, "tokenizer": gplan.vocab,
                 "dropped": list(gplan.dropped), "notes": list(gplan.notes)},
        "base": base,
        "adapters": [{"path": str(a.path), "weight": a.weight, "files": a.file_digests(),
                      **({"hub": h} if (h := hub_origin(a.path)) else {})} for a in adapters],
        "options": mp.options.to_dict(),
        "device": str(device),
        "tensors": len(gplan.tensors),
        "merged_tensors": sum(1 for t in gplan.tensors if t.source is not None and t.source.loras),
        "seconds": round(seconds, 3),
        "files": files,
        "copied_files": copied,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "gguf": getattr(gguf, "__version__", _dist_version("gguf"))},
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
