"""The Python API: plan and merge, wiring sources -> plan -> execute -> output folder."""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .adapters import Adapter, load_adapter
from .errors import OptionError, OutputError, StreamMergeWarning
from .io.checkpoint import open_checkpoint
from .io.output import RECORD_FILE, atomic_write_json, copy_other_files, merged_config, prepare_output, write_index
from .options import AdapterSpec, MergeOptions
from .planner import MergePlan, build_adapter_plan, build_plan

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
    """Open, resolve and plan; the returned plan is what `options.method` writes (the merged model,
    or with --method lora the adapter itself, after checking that it applies to the base)."""
    checkpoint = open_checkpoint(base)
    loaded = [load_adapter(spec.path, spec.weight) for spec in _adapter_specs(adapters)]
    if not loaded:
        from .errors import AdapterError

        raise AdapterError("give at least one adapter")
    if options.method == "lora":
        _check_lora_method(loaded)
    plan = build_plan(checkpoint, loaded, options)
    warning = no_op_warning(plan)
    if warning:
        plan = dataclasses.replace(plan, notes=(*plan.notes, warning))
    if options.method == "lora":
        plan = dataclasses.replace(build_adapter_plan(loaded[0], options), notes=plan.notes)
    from .execute import plan_layout

    plan_layout(plan)  # refuses a budget too small for one row of the widest tensor
    return checkpoint, loaded, plan


def _check_lora_method(adapters: list[Adapter]) -> None:
    if len(adapters) != 1:
        raise OptionError(
            f"--method lora writes one adapter, but {len(adapters)} were given; write each adapter on its own, "
            "or merge them into the base with --method merged_16bit"
        )
    if adapters[0].weight != 1.0:
        raise OptionError(
            f"--method lora writes the adapter as it is; a weight (@{adapters[0].weight:g}) cannot be applied to it"
        )


def no_op_warning(plan: MergePlan) -> str | None:
    """A loud note when the adapters change nothing: every LoRA delta is exactly zero (lora_B all
    zeros, e.g. an adapter saved before training) and no full tensor, token row or DoRA scale is
    applied. Reads the lora_B tensors, which are small."""
    import torch

    from .execute import torch_dtype
    from .io.safetensors import pread_exact

    b_sources, reasons = set(), []
    for t in plan.tensors:
        if t.op == "replace" or any(term.kind in ("dora", "token_rows") for term in t.loras):
            return None
        for term in t.loras:
            b_sources.add(term.b)
    if not b_sources:
        return None
    fds: dict[str, int] = {}
    try:
        for src in b_sources:
            if src.file not in fds:
                fds[src.file] = os.open(src.file, os.O_RDONLY)
            buf = bytearray(src.end - src.start)
            pread_exact(fds[src.file], memoryview(buf), src.start, src.file)
            if buf and bool(torch.frombuffer(buf, dtype=torch_dtype(src.dtype)).ne(0).any()):
                return None
    finally:
        for fd in fds.values():
            os.close(fd)
    names = ", ".join(a["path"] for a in plan.adapters)
    return (
        f"WARNING: every LoRA delta is exactly zero (all {len(b_sources)} lora_B tensors of {names} are 0): the "
        "merged model will behave exactly like the base model. Was the adapter saved before training "
        "(PEFT initializes lora_B to zero)?"
    )


def plan(base: str | Path, adapters: AdapterArg | Sequence[AdapterArg], **options: Any) -> MergePlan:
    """Plan a merge from headers (and the small lora_B tensors, for the no-op check); nothing is written."""
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

    for note in the_plan.notes:
        if note.startswith("WARNING"):
            warnings.warn(note, StreamMergeWarning, stacklevel=2)
    if opts.method == "lora":
        copied = _write_adapter_files(loaded[0], out)
    else:
        copied = copy_other_files(checkpoint.other_files(), out)
        config = merged_config(checkpoint.config, opts.dtype)
        if config is not None:
            if the_plan.untied:
                from .model_info import untied_config

                config = untied_config(config)
            atomic_write_json(out / "config.json", config)
    stats = Executor(the_plan, out, device=device, progress=not quiet).run()

    if len(the_plan.shards) > 1:
        write_index(out, the_plan.total_size, {t.name: s.filename for s in the_plan.shards for t in s.tensors})
    shards = [{"filename": s.filename, "size": s.size, "sha256": s.sha256} for s in stats.shards]
    atomic_write_json(out / RECORD_FILE, _record(the_plan, loaded, shards, copied, device))
    return MergeResult(out, the_plan, time.perf_counter() - started, peak_rss_bytes(), shards)


def _write_adapter_files(adapter: Adapter, out: Path) -> list[str]:
    """--method lora: the adapter's config (as it is) and a README beside adapter_model.safetensors."""
    from .adapters import CONFIG_NAME
    from .io.output import atomic_write_text

    copied = copy_other_files([adapter.path / CONFIG_NAME], out)
    readme = adapter.path / "README.md"
    if readme.is_file():
        copied += copy_other_files([readme], out)
    else:
        base = adapter.config_dict.get("base_model_name_or_path") or "the base model it was trained on"
        atomic_write_text(out / "README.md", (
            "---\nlibrary_name: peft\n---\n\n# LoRA adapter\n\n"
            f"A PEFT LoRA adapter for {base}, written by streammerge {__version__} from {adapter.path} "
            f"({adapter.original_weights_file.name}). Load it with "
            "`peft.PeftModel.from_pretrained(base_model, this_folder)`.\n"
        ))
        copied.append("README.md")
    return copied


def _record(plan: MergePlan, adapters: list[Adapter], shards: list[dict], copied: list[str], device) -> dict[str, Any]:
    """streammerge.json: what was merged, from what, how, and the checksums of what was written."""
    import peft
    import safetensors
    import torch

    return {
        "streammerge_version": __version__,
        "method": plan.options.method,
        "base": {"path": plan.base, "files": [
            {"name": Path(f).name, "size": Path(f).stat().st_size}
            for f in sorted({t.source.file for t in plan.tensors}) if Path(f).parent == Path(plan.base)
        ]},
        "adapters": [{"path": str(a.path), "weight": a.weight, "files": a.file_digests()} for a in adapters],
        "options": plan.options.to_dict(),
        "device": str(device),
        "tensors": plan.counts(),
        "coverage": {**plan.coverage(), "terms": plan.term_counts()},
        "untied": [list(p) for p in plan.untied],
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
