"""`--method gguf` end to end: plan (headers, config, tokenizer) -> output folder -> stream -> record."""

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
    from ..io.checkpoint import open_checkpoint
    from ..planner import build_plan
    from . import require
    from .arch import arch_of

    require()  # before any work: the gguf package is needed to write anything
    checkpoint = open_checkpoint(base)
    arch_of(checkpoint.config)
    loaded = [load_adapter(spec.path, spec.weight) for spec in _adapter_specs(adapters)]
    if not loaded:
        raise AdapterError("give at least one adapter")
    merge_plan = build_plan(checkpoint, loaded, options)
    return checkpoint, loaded, merge_plan, build_gguf_plan(checkpoint, merge_plan, options)


def print_gguf_plan(base, adapters, options: MergeOptions, *, as_json: bool) -> int:
    _, _, merge_plan, gplan = plan_gguf(base, adapters, options)
    if as_json:
        print(json.dumps({"merge": merge_plan.to_dict(), "gguf": gplan.to_dict()}, indent=2))
    else:
        print("\n".join(summary_lines(gplan, free_disk=shutil.disk_usage(Path.cwd()).free)))
    return 0


def merge_gguf(base, adapters, out, options: MergeOptions, *, overwrite: bool = False, quiet: bool = True):
    """Write OUT/<name>-<TYPE>.gguf (or its split files), the base's config and tokenizer files,
    and streammerge.json (last). No 16-bit copy of the model is ever written."""
    from ..api import MergeResult, peak_rss_bytes
    from ..execute import resolve_device
    from ..io.output import RECORD_FILE, atomic_write_json, copy_other_files, merged_config, prepare_output
    from .execute import run_plan

    started = time.perf_counter()
    checkpoint, loaded, merge_plan, gplan = plan_gguf(base, adapters, options)
    device = resolve_device(options.device)
    out = Path(out)
    prepare_output(out, overwrite=overwrite, protected=[checkpoint.root, *(a.path for a in loaded)])
    free = shutil.disk_usage(out).free
    if free < gplan.file_bytes:
        raise OutputError(
            f"not enough disk space in {out}: the GGUF needs {gplan.file_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free space or choose another --out"
        )
    copied = copy_other_files(checkpoint.other_files(), out)
    config = merged_config(checkpoint.config, None)
    if config is not None:
        atomic_write_json(out / "config.json", config)
    results, seconds = run_plan(gplan, out, device=device, progress=not quiet)
    files = [{"filename": r.filename, "size": r.size, "sha256": r.sha256} for r in results]
    atomic_write_json(out / RECORD_FILE, _record(gplan, loaded, files, copied, device, seconds))
    result = MergeResult(out, merge_plan, time.perf_counter() - started, peak_rss_bytes(), files)
    result.gguf = gplan
    return result


def result_line(result) -> str:
    gplan: GGUFPlan = result.gguf
    merged = sum(1 for t in gplan.tensors if t.source is not None and t.source.loras)
    names = ", ".join(f["filename"] for f in result.shards[:2]) + (", ..." if len(result.shards) > 2 else "")
    return (
        f"wrote {result.out}/{names}: {len(gplan.tensors)} tensors ({merged} merged), {gplan.gguf_type}, "
        f"{format_size(gplan.file_bytes)} in {len(gplan.files)} file(s) in {result.seconds:.1f} s, "
        f"peak RSS {format_size(result.peak_rss_bytes)}"
    )


def _record(gplan: GGUFPlan, adapters, files: list[dict], copied: list[str], device, seconds: float) -> dict[str, Any]:
    import gguf
    import torch

    mp = gplan.merge_plan
    return {
        "streammerge_version": __version__,
        "method": "gguf",
        "gguf": {"type": gplan.gguf_type, "architecture": gplan.arch, "tokenizer": gplan.vocab,
                 "dropped": list(gplan.dropped), "notes": list(gplan.notes)},
        "base": {"path": mp.base, "files": [{"name": Path(f).name, "size": Path(f).stat().st_size}
                                            for f in sorted({t.source.file for t in mp.tensors})]},
        "adapters": [{"path": str(a.path), "weight": a.weight, "files": a.file_digests()} for a in adapters],
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
