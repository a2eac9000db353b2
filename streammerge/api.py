"""The Python API: plan and merge, wiring sources -> plan -> execute -> output folder."""

from __future__ import annotations

import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .adapters import Adapter, load_adapter
from .errors import OutputError
from .io.checkpoint import open_checkpoint
from .io.output import RECORD_FILE, atomic_write_json, copy_other_files, merged_config, prepare_output, write_index
from .options import AdapterSpec, MergeOptions
from .planner import MergePlan, build_plan

AdapterArg = str | Path | AdapterSpec | tuple[str, float]


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    seconds: float
    peak_rss_bytes: int
    shards: list[dict[str, Any]]


def _adapter_specs(adapters: AdapterArg | Sequence[AdapterArg]) -> list[AdapterSpec]:
    if isinstance(adapters, (str, Path, AdapterSpec)):
        adapters = [adapters]
    specs = []
    for a in adapters:
        if isinstance(a, AdapterSpec):
            specs.append(a)
        elif isinstance(a, tuple):
            specs.append(AdapterSpec(str(a[0]), float(a[1])))
        else:
            specs.append(AdapterSpec.parse(str(a)))
    return specs


def _prepare(base: str | Path, adapters, options: MergeOptions) -> tuple[Any, list[Adapter], MergePlan]:
    checkpoint = open_checkpoint(base)
    loaded = [load_adapter(spec.path, spec.weight) for spec in _adapter_specs(adapters)]
    if not loaded:
        from .errors import AdapterError

        raise AdapterError("give at least one adapter")
    plan = build_plan(checkpoint, loaded, options)
    from .execute import plan_layout

    plan_layout(plan)  # refuses a budget too small for one row of the widest tensor
    return checkpoint, loaded, plan


def plan(base: str | Path, adapters: AdapterArg | Sequence[AdapterArg], **options: Any) -> MergePlan:
    """Plan a merge from headers alone: nothing is read beyond headers, nothing is written."""
    return _prepare(base, adapters, MergeOptions.create(**options))[2]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merge(
    base: str | Path,
    adapters: AdapterArg | Sequence[AdapterArg],
    out: str | Path,
    *,
    overwrite: bool = False,
    quiet: bool = True,
    **options: Any,
) -> MergeResult:
    """Merge `adapters` into `base` and write the result to `out` (see DESIGN.md, Output folder)."""
    from .execute import Executor, resolve_device

    opts = MergeOptions.create(**options)
    started = time.perf_counter()
    checkpoint, loaded, the_plan = _prepare(base, adapters, opts)
    device = resolve_device(opts.device)
    out = Path(out)
    prepare_output(out, overwrite=overwrite, protected=[checkpoint.root, *(a.path for a in loaded)])
    free = shutil.disk_usage(out).free
    if free < the_plan.file_bytes:
        raise OutputError(
            f"not enough disk space in {out}: the merge writes {the_plan.file_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free space or choose another --out"
        )

    copied = copy_other_files(checkpoint.other_files(), out)
    config = merged_config(checkpoint.config, opts.dtype, the_plan.quantization_config)
    if config is not None:
        atomic_write_json(out / "config.json", config)
    executor = Executor(the_plan, out, device=device, progress=not quiet)
    stats = executor.run()
    the_plan = executor.final_plan  # the shard layouts as written (exact double-quant JSON lengths)

    if len(the_plan.shards) > 1:
        write_index(out, the_plan.total_size, {t.name: s.filename for s in the_plan.shards for t in s.tensors})
    shards = [{"filename": s.filename, "size": s.size, "sha256": s.sha256} for s in stats.shards]
    atomic_write_json(out / RECORD_FILE, _record(the_plan, loaded, shards, copied, device))
    return MergeResult(out, the_plan, time.perf_counter() - started, peak_rss_bytes(), shards)


def _record(plan: MergePlan, adapters: list[Adapter], shards: list[dict], copied: list[str], device) -> dict[str, Any]:
    """streammerge.json: what was merged, from what, how, and the checksums of what was written."""
    import peft
    import safetensors
    import torch

    return {
        "streammerge_version": __version__,
        "method": plan.options.method,
        "base": {"path": plan.base, "files": [{"name": Path(f).name, "size": Path(f).stat().st_size} for f in sorted({t.source.file for t in plan.tensors})]},
        "adapters": [{"path": str(a.path), "weight": a.weight, "files": a.file_digests()} for a in adapters],
        "options": plan.options.to_dict(),
        "device": str(device),
        "tensors": plan.counts(),
        "total_size": plan.total_size,
        "shards": shards,
        "copied_files": copied,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "peft": peft.__version__,
            "safetensors": safetensors.__version__,
        },
    }
