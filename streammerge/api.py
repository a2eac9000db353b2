"""The Python API: plan and merge, wiring sources -> plan -> execute -> output folder."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .adapters import Adapter, load_adapter
from .errors import DiskFullError, Interrupted, OutputError
from .io.checkpoint import INDEX_FILE, open_checkpoint
from .io.output import (
    RECORD_FILE, atomic_write_json, check_output_path, clear_folder, copy_other_files, merged_config, write_index,
)
from .io.safetensors import DISK_FULL_ERRNOS, fsync_dir
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
    resumed_tensors: int = 0  # tensors kept (verified) from an interrupted run in OUT
    already_complete: bool = False  # OUT already held this exact merge; nothing was written

    @property
    def total_tensors(self) -> int:
        return len(self.plan.tensors)

    def resumed_line(self) -> str:
        return f"resumed: {self.resumed_tensors}/{self.total_tensors} tensors already done"


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


def disk_need(plan: MergePlan, checkpoint, adapters: list[Adapter], out: str | Path):
    """Free space against what a merge into `out` still has to write (for `streammerge plan`):
    shards an interrupted or finished merge of the same inputs there has committed count as done."""
    from . import journal as jr

    out = Path(out)
    finished: set[str] = set()
    old = None
    if out.is_dir() and jr.has_valid_state(out):
        old = jr.read_state_json(jr.state_dir(out) / jr.FINGERPRINT_FILE)
        committed = {r.get("shard") for r in jr.read_records(jr.state_dir(out) / jr.JOURNAL_FILE) if r["t"] == "shard"}
    elif out.is_dir() and (record := jr.read_record(out)) is not None:
        old = record.get("fingerprint")
        committed = {s.filename for s in plan.shards}
    ours = isinstance(old, dict) and not jr.differences(old, jr.fingerprint(checkpoint, adapters, plan.options, old.get("device")))
    if ours:
        finished = committed
    return jr.disk_need(plan, out, finished=finished, ours=ours,
                        extra_bytes=_small_files_bytes(checkpoint, checkpoint.other_files()))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merge(
    base: str | Path,
    adapters: AdapterArg | Sequence[AdapterArg],
    out: str | Path,
    *,
    overwrite: bool = False,
    quiet: bool = True,
    report: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    **options: Any,
) -> MergeResult:
    """Merge `adapters` into `base` and write the result to `out` (see DESIGN.md, Output folder).

    Crash-safe: an interrupted merge of the same inputs and options in `out` is resumed (its
    journaled tensors verified and kept); a finished one is left alone (`already_complete`).
    `report` receives one-line progress notes ("resumed: 41/72 tensors already done"); setting
    `cancel` stops the run promptly, leaving it resumable (raises `Interrupted`).
    """
    from . import journal as jr
    from .execute import Executor, _fix_malloc_threshold, resolve_device

    _fix_malloc_threshold()  # before hashing inputs: their read blocks must not raise glibc's dynamic threshold
    say = report or (lambda message: None)
    opts = MergeOptions.create(**options)
    started = time.perf_counter()
    checkpoint, loaded, the_plan = _prepare(base, adapters, opts)
    device = resolve_device(opts.device)
    out = Path(out)
    check_output_path(out, protected=[checkpoint.root, *(a.path for a in loaded)])
    fp = jr.fingerprint(checkpoint, loaded, opts, device.type)
    _check_cancel(cancel)
    with jr.OutputLock(out) as lock:
        run = _open_run(out, the_plan, fp, overwrite=overwrite, cancel=cancel)
        if isinstance(run, MergeResult):
            run.seconds = time.perf_counter() - started
            return run
        resume = run.resume
        others = checkpoint.other_files()
        need = jr.disk_need(the_plan, out, finished=resume.finished, extra_bytes=_small_files_bytes(checkpoint, others))
        if not need.ok:
            raise OutputError(f"not enough disk space for --out {out}: {need.line()}; free space or choose another --out")
        try:
            run.begin()
            lock.note_pid()
            if resume.tensors_done:
                say(f"resumed: {resume.tensors_done}/{len(the_plan.tensors)} tensors already done "
                    f"(verified against the journal in {resume.seconds:.1f} s)")
            copied = copy_other_files(others, out)
            config = merged_config(checkpoint.config, opts.dtype)
            if config is not None:
                atomic_write_json(out / "config.json", config)
            _check_cancel(cancel)
            executor = Executor(
                the_plan, out, device=device, progress=not quiet,
                on_tensor_done=run.tensor_done, on_shard_done=run.shard_done,
                skip=resume.finished, resume=resume.partial, hold={the_plan.shards[-1].filename}, cancel_event=cancel,
            )
            stats = executor.run()
            by_name = {f.filename: {"filename": f.filename, "size": f.size, "sha256": f.sha256} for f in resume.finished.values()}
            by_name.update({s.filename: {"filename": s.filename, "size": s.size, "sha256": s.sha256} for s in stats.shards})
            shards = [by_name[s.filename] for s in the_plan.shards]
            record = _record(the_plan, loaded, shards, copied, device, [a["files"] for a in fp["adapters"]])
            record["fingerprint"] = fp
            _commit(out, the_plan, record)
            run.finish()
        except Interrupted:
            raise Interrupted(
                f"interrupted with {run.tensors_done}/{len(the_plan.tensors)} tensors done and journaled in "
                f"{jr.state_dir(out)}; re-run the same command to resume"
            ) from None
        except (DiskFullError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in DISK_FULL_ERRNOS:
                raise OutputError(f"writing {out}: {exc.strerror or exc}; re-run the same command to resume") from None
            cause = exc.strerror if isinstance(exc, OSError) else str(exc)
            need = jr.disk_need(the_plan, out, finished=run.committed)
            raise DiskFullError(
                f"no space left on the device of --out {out} ({cause}); {run.tensors_done}/{len(the_plan.tensors)} "
                f"tensors are done and journaled; the rest {need.line()}; free space and re-run the same command to resume"
            ) from None
        finally:
            run.close()
    return MergeResult(out, the_plan, time.perf_counter() - started, peak_rss_bytes(), shards, resume.tensors_done)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Interrupted("interrupted before writing started")


def _small_files_bytes(checkpoint, others: list[Path]) -> int:
    config = checkpoint.root / "config.json"
    return sum(p.stat().st_size for p in others) + (config.stat().st_size + 4096 if config.exists() else 0)


def _open_run(out: Path, plan: MergePlan, fp: dict[str, Any], *, overwrite: bool, cancel):
    """What OUT holds decides: resume an interrupted run, report a finished one, or start fresh."""
    from . import journal as jr

    if overwrite and any(out.iterdir()):
        clear_folder(out)
    if jr.has_valid_state(out):
        return jr.Run.reopen(out, plan, fp, cancel)
    record = jr.read_record(out)
    if record is not None:
        old = record.get("fingerprint")
        diff = jr.differences(old, fp) if isinstance(old, dict) else ["it was not made by this streammerge version"]
        if not diff and _complete(out, plan, record):
            jr.remove_state(jr.state_dir(out))  # a run killed while removing its state folder
            return MergeResult(out, plan, 0.0, peak_rss_bytes(), record.get("shards", []),
                               resumed_tensors=len(plan.tensors), already_complete=True)
        why = "; ".join(diff) if diff else "some of its files are missing or have the wrong size"
        raise OutputError(f"--out {out} holds a finished merge that differs ({why}); pass --overwrite to replace it")
    names = {p.name for p in out.iterdir()}
    if names == {jr.STATE_DIR}:  # killed while creating its state: nothing was written yet
        jr.remove_state(jr.state_dir(out))
        names = set()
    if names:
        raise OutputError(f"--out {out} already holds files; choose an empty folder or pass --overwrite to replace it")
    return jr.Run.start(out, plan, fp)


def _complete(out: Path, plan: MergePlan, record: dict[str, Any]) -> bool:
    """A finished folder still holds every shard of the record at its size (and the index)."""
    shards = record.get("shards")
    if not isinstance(shards, list) or [s.get("filename") for s in shards] != [s.filename for s in plan.shards]:
        return False
    for entry, shard in zip(shards, plan.shards):
        path = out / shard.filename
        if entry.get("size") != shard.size or not path.is_file() or path.stat().st_size != shard.size:
            return False
    return len(plan.shards) == 1 or (out / INDEX_FILE).is_file()


def _commit(out: Path, plan: MergePlan, record: dict[str, Any]) -> None:
    """Make the folder a finished model, in an order where a kill at any instant leaves it either
    resumable or complete: shards renamed, then streammerge.json, then what makes it loadable
    (the last shard's final name; the index, last of all, when there are several shards)."""
    from .journal import partial_path

    def rename(shard) -> None:
        final = out / shard.filename
        if partial_path(final).exists():
            os.replace(partial_path(final), final)
            fsync_dir(out)

    for shard in plan.shards[:-1]:
        rename(shard)
    atomic_write_json(out / RECORD_FILE, record)
    rename(plan.shards[-1])
    if len(plan.shards) > 1:
        write_index(out, plan.total_size, {t.name: s.filename for s in plan.shards for t in s.tensors})
    for name in ("config.json", RECORD_FILE, INDEX_FILE):  # temp files of writes a kill interrupted
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _record(plan: MergePlan, adapters: list[Adapter], shards: list[dict], copied: list[str], device,
            adapter_digests: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """streammerge.json: what was merged, from what, how, and the checksums of what was written."""
    import peft
    import safetensors
    import torch

    return {
        "streammerge_version": __version__,
        "method": plan.options.method,
        "base": {"path": plan.base, "files": [{"name": Path(f).name, "size": Path(f).stat().st_size} for f in sorted({t.source.file for t in plan.tensors})]},
        "adapters": [
            {"path": str(a.path), "weight": a.weight, "files": adapter_digests[i] if adapter_digests else a.file_digests()}
            for i, a in enumerate(adapters)
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
