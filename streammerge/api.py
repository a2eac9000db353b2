"""The Python API: plan, merge and verify, wiring sources -> plan -> execute -> output folder."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .adapters.load import Adapter, check_finite, load_adapter
from .errors import DiskFullError, InputError, Interrupted, OptionError, OutputError, StreamMergeWarning
from .hub.checkpoint import open_base
from .hub.client import adapter_folder
from .formats.folder import check_output_path
from .formats.safetensors import DISK_FULL_ERRNOS, fsync_dir
from .network import guarded
from .options import AdapterArg, MergeOptions, adapter_specs
from .output_folder import commit, open_run, small_files_bytes, write_small_files
from .run.record import gguf_record, merge_record
from .run.result import MergeResult, peak_rss_bytes
from .planning.types import MergePlan
from .planning.build import build_adapter_plan, build_plan



def _load(base: str | Path, adapters, options: MergeOptions) -> tuple[Any, list[Adapter], MergePlan]:
    """Open the inputs and plan the merged model (what `merge` writes and `verify` checks against)."""
    checkpoint = open_base(base)  # a local folder, or a Hub repo planned from ranged header reads
    loaded = [load_adapter(adapter_folder(spec.path), spec.weight) for spec in adapter_specs(adapters)]
    if not loaded:
        from .errors import AdapterError

        raise AdapterError("give at least one adapter")
    if options.method == "lora":
        _check_lora_method(loaded)
    return checkpoint, loaded, build_plan(checkpoint, loaded, options)


@contextlib.contextmanager
def _bulk_objects():
    """Planning builds an object per tensor, hundreds of thousands for a large MoE, and none of them
    in reference cycles: the cyclic collector, rescanning them every few thousand allocations, was
    half of the planning time of a 98k-tensor checkpoint. It is paused meanwhile (and collects as
    usual afterwards)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _prepare(base: str | Path, adapters, options: MergeOptions) -> tuple[Any, list[Adapter], MergePlan]:
    """Open, resolve and plan; the returned plan is what `options.method` writes (the merged model,
    or with --method lora the adapter itself, after checking that it applies to the base)."""
    with _bulk_objects():
        return _prepare_plan(base, adapters, options)


def _prepare_plan(base: str | Path, adapters, options: MergeOptions) -> tuple[Any, list[Adapter], MergePlan]:
    checkpoint, loaded, plan = _load(base, adapters, options)
    warning = no_op_warning(plan)
    if warning:
        plan = dataclasses.replace(plan, notes=(*plan.notes, warning))
    if options.method == "lora":
        plan = dataclasses.replace(build_adapter_plan(loaded[0], options), notes=plan.notes)
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

    from .run.compute import torch_dtype
    from .formats.safetensors import pread_exact

    b_sources: set = set()
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


@guarded()
def plan(base: str | Path, adapters: AdapterArg | Sequence[AdapterArg], **options: Any) -> Any:
    """Plan a merge from headers alone: nothing is read beyond headers, nothing is written.
    With method="gguf" the result is the GGUFPlan (its `.merge_plan` is the tensor-level plan)."""
    opts = MergeOptions.create(**options)
    if opts.method == "gguf":
        from .run.gguf_merge import plan_gguf

        return plan_gguf(base, adapters, opts)[3]
    from .run.schedule import plan_layout

    planned = _prepare(base, adapters, opts)[2]
    plan_layout(planned)  # refuses a budget too small for one row of the widest tensor
    return planned


def disk_need(plan: MergePlan, checkpoint, adapters: list[Adapter], out: str | Path):
    """Free space against what a merge into `out` still has to write (for `streammerge plan`):
    shards an interrupted or finished merge of the same inputs there has committed count as done."""
    from .run import disk as space
    from .run import journal as jr

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
    return space.disk_need(plan, out, finished=finished, ours=ours,
                        extra_bytes=small_files_bytes(checkpoint, checkpoint.other_files()))


@guarded()
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
    report: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    partition: str | None = None,
    on_tensor: Callable[[str], None] | None = None,
    **options: Any,
) -> MergeResult:
    """Merge `adapters` into `base` and write the result to `out` (see DESIGN.md, Output folder).

    Crash-safe: an interrupted merge of the same inputs and options in `out` is resumed (its
    journaled tensors verified and kept, only the inputs of the rest read or downloaded); a
    finished one is left alone (`already_complete`). `partition="I/N"` writes only partition I's
    shards (run/partitions.py); once all N are done, `finalize(out)` completes the folder.
    `on_tensor(name)` runs (in the writer thread) once each tensor is written and journaled.
    `report` receives one-line progress notes
    ("resumed: 41/72 tensors already done"); setting `cancel` stops the run promptly, leaving it
    resumable (raises `Interrupted`).

    A Hub base is downloaded shard by shard while merging; `low_disk` evicts the shards this run
    downloaded once merged and, with `push_to_hub`, uploads and deletes each output shard as it is
    finished. `push_to_hub="org/name"` uploads the result with a model card (`private`, `push_revision`).
    """
    from .hub.run import HubRun
    from .run import disk as space
    from .run import journal as jr
    from .run.lock import OutputLock

    opts = MergeOptions.create(**options)
    part = _partition_arg(partition, overwrite=overwrite, push_to_hub=push_to_hub)
    if push_to_hub:
        from .hub.client import check_push_id

        check_push_id(push_to_hub)
    say = report or (lambda message: None)
    started = time.perf_counter()
    gplan = None
    if opts.method == "gguf":  # the GGUF files are shards of the "gguf" container, run like any others
        from .run.gguf_merge import plan_gguf

        checkpoint, loaded, _, gplan = plan_gguf(base, adapters, opts)
        the_plan = gplan.output
    else:
        checkpoint, loaded, the_plan = _prepare(base, adapters, opts)
    from .run.execute import Executor  # after the checks
    from .run.pipeline import fix_malloc_threshold, done_tensors, resolve_device, tensors_in
    from .run.schedule import plan_layout

    layout = plan_layout(the_plan)  # (a gguf plan's budget is checked here; the executor works with it)

    fix_malloc_threshold()  # before reading inputs: their read blocks must not raise glibc's dynamic threshold
    if not opts.allow_nonfinite:
        for adapter in loaded:
            check_finite(adapter)  # adapters are small: read them once before anything is written
    device = resolve_device(opts.device)
    out = Path(out)
    check_output_path(out, protected=[checkpoint.root, *(a.path for a in loaded)])
    fp = jr.fingerprint(checkpoint, loaded, opts, device.type)
    skip: frozenset[str] = frozenset()
    if part is not None:
        from .run.partitions import shards_of

        fp["partitions"] = part.count
        skip = frozenset(s.filename for s in the_plan.shards) - shards_of(the_plan, part)
    _check_cancel(cancel)
    with OutputLock(out, shared=part is not None) as lock, _partition_lock(out, part):
        run = open_run(out, the_plan, fp, overwrite=overwrite, cancel=cancel, partition=part)
        if isinstance(run, MergeResult):  # OUT already holds this merge
            if gplan is not None:
                run.plan, run.gguf = gplan.merge_plan, gplan
            if push_to_hub:  # e.g. the push of the earlier run failed: push what is here
                pusher = HubRun(checkpoint, the_plan, out, push_to_hub=push_to_hub, private=private, revision=push_revision)
                pusher.prepare_push()
                run.pushed = pusher.push(jr.read_record(out))
            run.seconds = time.perf_counter() - started
            return run
        resume = run.resume
        run.on_tensor = on_tensor
        skipped = tensors_in(the_plan, skip)
        hub = HubRun(checkpoint, the_plan, out, low_disk=low_disk, push_to_hub=push_to_hub, private=private,
                     revision=push_revision, quiet=quiet, done=done_tensors(the_plan, resume) | skipped,
                     on_uploaded=run.shard_pushed)
        others = checkpoint.other_files()
        if hub.inputs is not None:
            hub.check_disk_space()  # output and downloads, per filesystem
        else:
            need = space.disk_need(the_plan, out, finished=set(resume.finished) | skip,
                                   extra_bytes=small_files_bytes(checkpoint, others))
            if not need.ok:
                raise OutputError(f"not enough disk space for --out {out}: {need.line()}; free space or choose another --out")
        hub.prepare_push()  # create the target repo now: a token problem fails before the merge
        for note in the_plan.notes:
            if note.startswith("WARNING"):
                warnings.warn(note, StreamMergeWarning, stacklevel=2)
        try:
            run.begin()
            if part is None:
                lock.note_pid()
            if resume.tensors_done:
                say(f"resumed: {resume.tensors_done}/{len(the_plan.tensors) - len(skipped)} tensors already done "
                    f"(verified against the journal in {resume.seconds:.1f} s)")
            writes_small_files = part is None or part.index == 0  # (one partition writes them)
            copied = write_small_files(the_plan, checkpoint, loaded, others, out) if writes_small_files else []
            _check_cancel(cancel)
            last = the_plan.shards[-1].filename

            def shard_done(filename: str, size: int, sha256: str) -> None:
                run.shard_done(filename, size, sha256)
                if hub.upload_shard is not None:
                    hub.upload_shard(filename, out / (filename + ".partial" if filename == last else filename))

            if hub.upload_shard is not None:  # shards an interrupted streaming push finished but had not uploaded
                for kept in resume.finished.values():
                    if kept.path is not None:
                        hub.upload_shard(kept.filename, kept.path)
            executor = Executor(
                the_plan, out, device=device, progress=not quiet, inputs=hub.inputs, resume=resume, hold={last},
                on_shard_open=run.shard_open, on_tensor_done=run.tensor_done, on_shard_done=shard_done,
                cancel_event=cancel, layout=layout, skip=skip,
            )
            stats = executor.run()
            the_plan = executor.final_plan  # the shard layouts as written (exact double-quant JSON lengths)
            hub.shards_done()
            by_name = {f.filename: {"filename": f.filename, "size": f.size, "sha256": f.sha256} for f in resume.finished.values()}
            by_name.update({s.filename: {"filename": s.filename, "size": s.size, "sha256": s.sha256} for s in stats.shards})
            shards = [by_name[s.filename] for s in the_plan.shards if s.filename not in skip]
            if gplan is not None:
                record = gguf_record(gplan, loaded, shards, copied, device, stats.seconds, checkpoint)
            else:
                record = merge_record(the_plan, loaded, shards, copied, device, checkpoint=checkpoint,
                                 adapter_digests=[a["files"] for a in fp["adapters"]])
            record.update(hub.record())
            record["fingerprint"] = fp
            if part is None:
                commit(out, the_plan, record)
            elif writes_small_files:  # streammerge.json, less the checksums `finalize` adds
                from .run.partitioned import write_record_template

                write_record_template(out, {**record, "shards" if gplan is None else "files": []})
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
            need = space.disk_need(the_plan, out, finished=run.committed)
            raise DiskFullError(
                f"no space left on the device of --out {out} ({cause}); {run.tensors_done}/{len(the_plan.tensors)} "
                f"tensors are done and journaled; the rest {need.line()}; free space and re-run the same command to resume"
            ) from None
        finally:
            run.close()
    pushed = hub.push(record)
    extra: dict[str, Any] = {}
    if part is not None:
        from .run import partitioned

        commits, _ = partitioned.committed(out, the_plan, part.count)
        extra = {"partition": part.label, "partitions_left": tuple(partitioned.unfinished(the_plan, part.count, commits))}
    if gplan is not None:
        return MergeResult(out, gplan.merge_plan, time.perf_counter() - started, peak_rss_bytes(), shards, pushed,
                           gguf=gplan, resumed_tensors=resume.tensors_done, **extra)
    return MergeResult(out, the_plan, time.perf_counter() - started, peak_rss_bytes(), shards, pushed,
                       resumed_tensors=resume.tensors_done, **extra)


@guarded()
def finalize(out: str | Path, base: str | Path | None = None, adapters: AdapterArg | Sequence[AdapterArg] | None = None,
             **options: Any) -> MergeResult:
    """Complete a merge whose partitions (`merge(..., partition="I/N")`) have all run: check that
    every shard is committed at its journaled size and header, then write streammerge.json and the
    index as a whole merge does. With `base` and `adapters` (the merge line), refuse a folder that
    holds another merge. A folder finalized already is left alone (`already_complete`)."""
    from .run import journal as jr
    from .run import partitioned
    from .run.lock import OutputLock

    started = time.perf_counter()
    out = Path(out)
    if not out.is_dir():
        raise OutputError(f"finalize: {out} is not a folder; give the --out of the partitions")
    with OutputLock(out):
        if not jr.has_valid_state(out) and (record := jr.read_record(out)) is not None and record.get("partitions"):
            return MergeResult(out, None, 0.0, peak_rss_bytes(), record.get("shards", record.get("files", [])),
                               already_complete=True)
        fp, plan, count = partitioned.read_state(out)
        if base is not None:
            opts = MergeOptions.create(**options)
            checkpoint, loaded, _ = _load(base, adapters or [], opts)
            ours = {**jr.fingerprint(checkpoint, loaded, opts, fp.get("device")), "partitions": count}
            diff = jr.differences(fp, ours)
            if diff:
                raise OutputError(f"finalize: --out {out} holds a merge of other inputs or options ({'; '.join(diff)})")
        final_plan, record = partitioned.finalize_state(out)
        commit(out, final_plan, record)
        partitioned.finish(out)
        fsync_dir(out)
    return MergeResult(out, final_plan, time.perf_counter() - started, peak_rss_bytes(),
                       record.get("shards", record.get("files", [])))


def _partition_arg(partition, *, overwrite: bool, push_to_hub: str | None):
    if partition is None:
        return None
    from .run.partitions import Partition

    part = partition if isinstance(partition, Partition) else Partition.parse(partition)
    if overwrite:
        raise OptionError("--overwrite does not apply to --partition: partitions share OUT; empty it once, "
                          "before starting them")
    if push_to_hub:
        raise OptionError("--push-to-hub does not apply to --partition; push the folder after `streammerge finalize`")
    return part


def _partition_lock(out: Path, part):
    if part is None:
        return contextlib.nullcontext()
    from .run.lock import PartitionLock

    return PartitionLock(out, part)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Interrupted("interrupted before writing started")


@guarded()
def verify(
    out: str | Path,
    base: str | Path,
    adapters: AdapterArg | Sequence[AdapterArg],
    *,
    probes: int = 4,
    seed: int = 0,
    check_record: bool = True,
    quiet: bool = True,
    fast: bool = False,
    **options: Any,
):
    """Check that `out` holds what merging `adapters` into `base` with `options` makes (see
    `streammerge.verify`); returns a `VerifyReport` (`.ok`, `.faults`, `.table_lines()`, `.to_dict()`).
    Every merged element is compared with its recomputed value within the rounding any correct tool
    makes; `fast=True` checks plain LoRA merges with `probes` random projections per tensor instead
    (`report.mode` says which ran; GGUF outputs are always checked element by element).
    Faults in `out` are reported, not raised; bad inputs (base, adapters, options) raise as in `merge`."""
    from .run.pipeline import resolve_device
    from .verification.dispatch import unverifiable
    from .verification.verifier import Verifier

    opts = MergeOptions.create(**options)
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"verify: {out} is not a folder; give the output folder of a merge")
    from .run.journal import has_valid_state, state_dir

    if has_valid_state(out):
        raise InputError(
            f"verify: {out} holds an interrupted merge (its resume state is in {state_dir(out)}), not a finished "
            "model; run the same merge command again to finish it, then verify"
        )
    from .verification.gguf import refuse_gguf_folder

    gguf_fast = fast and opts.method == "gguf"
    if opts.method == "gguf":  # GGUF files: the GGUF plan's output (its files as shards of the "gguf" container)
        from .run.gguf_merge import plan_gguf

        checkpoint, loaded, _, gguf_plan = plan_gguf(base, adapters, opts)
        the_plan, fast = gguf_plan.output, False
    else:
        refuse_gguf_folder(out, opts)
        checkpoint, loaded, the_plan = _load(base, adapters, opts)
    missing = unverifiable(the_plan)
    if missing:  # anything without a check is refused, never passed unchecked
        from .errors import UnsupportedError

        what = "; ".join(f"{kind} ({len(names)} tensors, e.g. {names[0]})" for kind, names in sorted(missing.items()))
        raise UnsupportedError(f"verify cannot check these yet: {what}; nothing was checked")
    device = resolve_device(opts.device)
    verifier = Verifier(the_plan, out, checkpoint, loaded, device=device, probes=probes, seed=seed,
                        check_record=check_record, progress=not quiet, fast=fast)
    report = verifier.run()
    if gguf_fast:
        report.notes.append("--fast has no probe test for GGUF outputs: every element was checked")
    report.peak_rss_bytes = peak_rss_bytes()
    return report
