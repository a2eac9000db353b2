"""The Python API: plan, merge and verify, wiring sources -> plan -> execute -> output folder."""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .adapters import Adapter, check_finite, load_adapter
from .errors import InputError, OptionError, OutputError, StreamMergeWarning
from .io.hub import adapter_folder, open_base
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
    pushed: str | None = None  # commit URL when --push-to-hub was given
    gguf: Any = None  # the GGUFPlan, for --method gguf


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


def _load(base: str | Path, adapters, options: MergeOptions) -> tuple[Any, list[Adapter], MergePlan]:
    """Open the inputs and plan the merged model (what `merge` writes and `verify` checks against)."""
    checkpoint = open_base(base)  # a local folder, or a Hub repo planned from ranged header reads
    loaded = [load_adapter(adapter_folder(spec.path), spec.weight) for spec in _adapter_specs(adapters)]
    if not loaded:
        from .errors import AdapterError

        raise AdapterError("give at least one adapter")
    if options.method == "lora":
        _check_lora_method(loaded)
    return checkpoint, loaded, build_plan(checkpoint, loaded, options)


def _prepare(base: str | Path, adapters, options: MergeOptions) -> tuple[Any, list[Adapter], MergePlan]:
    """Open, resolve and plan; the returned plan is what `options.method` writes (the merged model,
    or with --method lora the adapter itself, after checking that it applies to the base)."""
    checkpoint, loaded, plan = _load(base, adapters, options)
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


def plan(base: str | Path, adapters: AdapterArg | Sequence[AdapterArg], **options: Any) -> Any:
    """Plan a merge from headers alone: nothing is read beyond headers, nothing is written.
    With method="gguf" the result is the GGUFPlan (its `.merge_plan` is the tensor-level plan)."""
    opts = MergeOptions.create(**options)
    if opts.method == "gguf":
        from .gguf.api import plan_gguf

        return plan_gguf(base, adapters, opts)[3]
    return _prepare(base, adapters, opts)[2]


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
    if opts.method == "gguf":
        if low_disk or push_to_hub:
            raise OptionError("--low-disk and --push-to-hub are not supported with --method gguf yet")
        from .gguf.api import merge_gguf

        return merge_gguf(base, adapters, out, opts, overwrite=overwrite, quiet=quiet)
    started = time.perf_counter()
    checkpoint, loaded, the_plan = _prepare(base, adapters, opts)
    from .execute import Executor, resolve_device  # after the checks: a bad input is refused without torch
    if not opts.allow_nonfinite:
        for adapter in loaded:
            check_finite(adapter)  # adapters are small: read them once before anything is written
    device = resolve_device(opts.device)
    out = Path(out)
    prepare_output(out, overwrite=overwrite, protected=[checkpoint.root, *(a.path for a in loaded)])
    hub = HubRun(checkpoint, the_plan, out, low_disk=low_disk, push_to_hub=push_to_hub, private=private,
                 revision=push_revision, quiet=quiet)
    hub.check_disk_space()  # output (and downloads, for a Hub base) against free space
    hub.prepare_push()  # create the target repo now: a token problem fails before the merge

    for note in the_plan.notes:
        if note.startswith("WARNING"):
            warnings.warn(note, StreamMergeWarning, stacklevel=2)
    if opts.method == "lora":
        copied = _write_adapter_files(loaded[0], out)
    else:
        copied = copy_other_files(checkpoint.other_files(), out)
        config = merged_config(checkpoint.config, opts.dtype, the_plan.quantization_config)
        if config is not None:
            if the_plan.untied:
                from .model_info import untied_config

                config = untied_config(config)
            atomic_write_json(out / "config.json", config)
    executor = Executor(the_plan, out, device=device, progress=not quiet, inputs=hub.inputs,
                        on_shard_done=hub.on_shard_done)
    stats = executor.run()
    the_plan = executor.final_plan  # the shard layouts as written (exact double-quant JSON lengths)
    hub.shards_done()

    if len(the_plan.shards) > 1:
        write_index(out, the_plan.total_size, {t.name: s.filename for s in the_plan.shards for t in s.tensors})
    shards = [{"filename": s.filename, "size": s.size, "sha256": s.sha256} for s in stats.shards]
    record = _record(the_plan, loaded, shards, copied, device, checkpoint=checkpoint)
    record.update(hub.record())
    atomic_write_json(out / RECORD_FILE, record)
    pushed = hub.push(record)
    return MergeResult(out, the_plan, time.perf_counter() - started, peak_rss_bytes(), shards, pushed)


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


def verify(
    out: str | Path,
    base: str | Path,
    adapters: AdapterArg | Sequence[AdapterArg],
    *,
    probes: int = 4,
    seed: int = 0,
    check_record: bool = True,
    quiet: bool = True,
    **options: Any,
):
    """Check that `out` holds what merging `adapters` into `base` with `options` makes (see
    `streammerge.verify`); returns a `VerifyReport` (`.ok`, `.faults`, `.table_lines()`, `.to_dict()`).
    Faults in `out` are reported, not raised; bad inputs (base, adapters, options) raise as in `merge`."""
    from .execute import resolve_device
    from .verifier import Verifier, unverifiable

    opts = MergeOptions.create(**options)
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"verify: {out} is not a folder; give the output folder of a merge")
    checkpoint, loaded, the_plan = _load(base, adapters, opts)
    missing = unverifiable(the_plan)
    if missing:
        from .errors import UnsupportedError

        what = "; ".join(f"{kind} ({len(names)} tensors, e.g. {names[0]})" for kind, names in sorted(missing.items()))
        raise UnsupportedError(f"verify cannot check these adapter features yet: {what}; nothing was checked")
    device = resolve_device(opts.device)
    verifier = Verifier(the_plan, out, checkpoint, loaded, device=device, probes=probes, seed=seed,
                        check_record=check_record, progress=not quiet)
    report = verifier.run()
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _record(plan: MergePlan, adapters: list[Adapter], shards: list[dict], copied: list[str], device, checkpoint=None) -> dict[str, Any]:
    """streammerge.json: what was merged, from what, how, and the checksums of what was written."""
    import peft
    import safetensors
    import torch

    from .io.hub import hub_origin

    sizes = {str(f.path): f.size for f in checkpoint.files} if checkpoint is not None else {}
    base_files = sorted(f for f in {t.source.file for t in plan.tensors} if f in sizes or Path(f).parent == Path(plan.base))
    base = {"path": plan.base, "files": [{"name": Path(f).name, "size": sizes.get(f) or Path(f).stat().st_size} for f in base_files]}
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
