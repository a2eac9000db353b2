"""The Python API: plan and merge, wiring sources -> plan -> execute -> output folder."""

from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .adapters import Adapter, load_adapter
from .io.hub import adapter_folder, open_base
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
    pushed: str | None = None  # commit URL when --push-to-hub was given


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
    checkpoint = open_base(base)  # a local folder, or a Hub repo planned from ranged header reads
    loaded = [load_adapter(adapter_folder(spec.path), spec.weight) for spec in _adapter_specs(adapters)]
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
    low_disk: bool = False,
    push_to_hub: str | None = None,
    private: bool | None = None,
    push_revision: str | None = None,
    **options: Any,
) -> MergeResult:
    """Merge `adapters` into `base` and write the result to `out` (see DESIGN.md, Output folder).

    A Hub base is downloaded shard by shard while merging; `low_disk` evicts the shards this run
    downloaded once merged and, with `push_to_hub`, uploads and deletes each output shard as it is
    finished. `push_to_hub="org/name"` uploads the result with a model card (`private`, `push_revision`).
    """
    from .execute import Executor, resolve_device
    from .hub_run import HubRun

    opts = MergeOptions.create(**options)
    if push_to_hub:
        from .io.hub import check_push_id

        check_push_id(push_to_hub)
    started = time.perf_counter()
    checkpoint, loaded, the_plan = _prepare(base, adapters, opts)
    device = resolve_device(opts.device)
    out = Path(out)
    prepare_output(out, overwrite=overwrite, protected=[checkpoint.root, *(a.path for a in loaded)])
    hub = HubRun(checkpoint, the_plan, out, low_disk=low_disk, push_to_hub=push_to_hub, private=private,
                 revision=push_revision, quiet=quiet)
    hub.check_disk_space()  # output (and downloads, for a Hub base) against free space
    hub.prepare_push()  # create the target repo now: a token problem fails before the merge

    copied = copy_other_files(checkpoint.other_files(), out)
    config = merged_config(checkpoint.config, opts.dtype)
    if config is not None:
        atomic_write_json(out / "config.json", config)
    stats = Executor(the_plan, out, device=device, progress=not quiet, inputs=hub.inputs,
                     on_shard_done=hub.on_shard_done).run()
    hub.shards_done()

    if len(the_plan.shards) > 1:
        write_index(out, the_plan.total_size, {t.name: s.filename for s in the_plan.shards for t in s.tensors})
    shards = [{"filename": s.filename, "size": s.size, "sha256": s.sha256} for s in stats.shards]
    record = _record(the_plan, loaded, shards, copied, device, checkpoint=checkpoint)
    record.update(hub.record())
    atomic_write_json(out / RECORD_FILE, record)
    pushed = hub.push(record)
    return MergeResult(out, the_plan, time.perf_counter() - started, peak_rss_bytes(), shards, pushed)


def _record(plan: MergePlan, adapters: list[Adapter], shards: list[dict], copied: list[str], device, checkpoint=None) -> dict[str, Any]:
    """streammerge.json: what was merged, from what, how, and the checksums of what was written."""
    import peft
    import safetensors
    import torch

    from .io.hub import hub_origin

    sizes = {str(f.path): f.size for f in checkpoint.files} if checkpoint is not None else {}
    base = {"path": plan.base, "files": [{"name": Path(f).name, "size": sizes.get(f) or Path(f).stat().st_size} for f in sorted({t.source.file for t in plan.tensors})]}
    if getattr(checkpoint, "source", None) is not None:
        base["hub"] = checkpoint.source.to_record()
    return {
        "streammerge_version": __version__,
        "method": plan.options.method,
        "base": base,
        "adapters": [
            {"path": str(a.path), "weight": a.weight, "files": a.file_digests(), **({"hub": h} if (h := hub_origin(a.path)) else {})}
            for a in adapters
        ],
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
