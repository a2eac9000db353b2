"""--ray: the partitions of one merge as Ray tasks, then `finalize`.

The driver plans once (headers only) to know the shards, picks the number of partitions from the
cluster (one per GPU; without GPUs, one per node, using its cores), and runs each partition as a
Ray task that calls `merge(..., partition="I/N")` where Ray placed it. Every task reads its inputs
where it runs (shared storage, or the Hub) and writes into OUT, which every node must see. A task
that dies (node lost, OOM, preemption) is retried by Ray and resumes from its partition's journal;
the driver follows all journals for one progress bar and finalizes once every task has returned.
Ray is an optional dependency (`pip install 'streammerge[ray]'`), imported only here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ExecutionError, Interrupted, OptionError, StreamMergeError
from .network import allowing, guarded
from .options import AdapterArg, AdapterSpec, MergeOptions, adapter_specs

RETRIES = 3  # Ray re-runs a task whose worker died this many times; each retry resumes


@dataclass(frozen=True)
class TaskSlot:
    """Where a partition runs: a node and what the task asks of it."""

    node_id: str
    num_cpus: float
    num_gpus: float
    max_memory: int  # this task's share of --max-memory on its node


def slots(nodes: list[dict[str, Any]], max_memory: int, device: str) -> list[TaskSlot]:
    """One task per GPU of each live node (unless --device cpu), else one per node with all its
    cores; --max-memory is a per-node budget, shared by the node's tasks."""
    out: list[TaskSlot] = []
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    use_gpus = device != "cpu" and any(n.get("Resources", {}).get("GPU", 0) >= 1 for n in alive)
    for node in alive:
        res = node.get("Resources", {})
        cpus = float(res.get("CPU", 0))
        if use_gpus:
            gpus = int(res.get("GPU", 0))
            for _ in range(gpus):
                out.append(TaskSlot(node["NodeID"], min(1.0, cpus / gpus), 1.0, max_memory // gpus))
        elif cpus >= 1:
            out.append(TaskSlot(node["NodeID"], cpus, 0.0, max_memory))
    return out


def _absolute(path: str) -> str:
    """A local input as an absolute path (tasks run in other folders, on other nodes); a Hub id as it is."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def _partition_task(base: str, adapters: list[AdapterSpec], out: str, partition: str, options: dict[str, Any],
                    low_disk: bool, fault: dict[str, Any] | None) -> dict[str, Any]:
    """One partition, in a Ray worker. `fault` (tests): SIGKILL this worker after that many tensors
    of that partition, once (a marker file remembers), as a lost node would."""
    import socket

    from .api import merge

    on_tensor = _killer(fault) if fault is not None and fault["partition"] == partition and not Path(fault["marker"]).exists() else None
    started = time.perf_counter()
    with allowing("ray"), allowing("grpc"):
        result = merge(base, adapters, out, partition=partition, quiet=True, low_disk=low_disk, on_tensor=on_tensor, **options)
    return {"partition": partition, "shards": result.shards, "seconds": time.perf_counter() - started,
            "peak_rss_bytes": result.peak_rss_bytes, "host": socket.gethostname(), "pid": os.getpid(),
            "resumed_tensors": result.resumed_tensors}


def _killer(fault: dict[str, Any]) -> Callable[[str], None]:
    count = [0]

    def on_tensor(name: str) -> None:
        count[0] += 1
        if count[0] == fault["after"]:
            Path(fault["marker"]).write_text(f"killed pid {os.getpid()} after {name}\n")
            os.kill(os.getpid(), 9)

    return on_tensor


def _connect(ray, address: str | None) -> bool:
    """Join `address` (or the Ray this process already uses, or start a local one); True when we
    started it and so shut it down after."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from a merge
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, include_dashboard=False)
    except ConnectionError as exc:
        raise OptionError(f"--ray {address}: cannot reach a Ray cluster there ({exc}); give its address "
                          "(ray://host:10001 or host:6379), 'auto' on one of its nodes, or no address for a local Ray") from None
    return True


@guarded()
def merge_on_ray(
    base: str | Path,
    adapters: AdapterArg | Sequence[AdapterArg],
    out: str | Path,
    *,
    address: str | None = None,
    partitions: int | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    report: Callable[[str], None] | None = None,
    cancel=None,
    low_disk: bool = False,
    push_to_hub: str | None = None,
    private: bool | None = None,
    push_revision: str | None = None,
    retries: int = RETRIES,
    _fault: dict[str, Any] | None = None,
    **options: Any,
):
    """Run `merge` as partitions on a Ray cluster (`address`: "auto", a cluster address, or None:
    the Ray this process uses, else a local one) and finalize; returns the finalized MergeResult.
    `partitions` overrides how many (default: one per GPU, or per node)."""
    try:
        import ray
    except ImportError:
        raise OptionError("--ray needs Ray, which is not installed: pip install 'streammerge[ray]'") from None
    if push_to_hub:
        raise OptionError("--push-to-hub does not apply with --ray yet; push the finished folder afterwards")
    from . import api
    from .formats.folder import check_output_path, clear_folder
    from .run.lock import OutputLock
    from .run.result import MergeResult

    started = time.perf_counter()
    opts = MergeOptions.create(**options)
    base = _absolute(str(base))
    specs = [AdapterSpec(_absolute(s.path), s.weight) for s in adapter_specs(adapters)]
    out = Path(out).resolve()
    planned = api.plan(base, specs, **options)
    plan = getattr(planned, "output", planned)  # a GGUF plan's files are its shards
    check_output_path(out, protected=[Path(base), *(Path(s.path) for s in specs)])
    if overwrite and any(out.iterdir()):
        with OutputLock(out):
            clear_folder(out)
    with allowing("ray"), allowing("grpc"):
        ours = _connect(ray, address)
        try:
            places = slots(ray.nodes(), opts.max_memory, opts.device)
            if not places:
                raise OptionError("--ray: the cluster has no node with a CPU or GPU to run a partition on")
            count = max(1, min(partitions or len(places), len(plan.shards)))
            if report is not None:
                report(f"ray: {count} partition(s) of {len(plan.shards)} file(s) on {len({p.node_id for p in places})} node(s)")
            results = _run_tasks(ray, places, count, base, specs, out, options, low_disk, retries, _fault, plan,
                                 quiet, cancel)
        finally:
            if ours:
                ray.shutdown()
    final = api.finalize(out)
    peak = max((r["peak_rss_bytes"] for r in results), default=final.peak_rss_bytes)
    gguf = planned if planned is not plan else None
    return MergeResult(out, gguf.merge_plan if gguf else final.plan, time.perf_counter() - started, peak,
                       final.shards, gguf=gguf, already_complete=final.already_complete and all(not r["shards"] for r in results),
                       tasks=tuple(sorted(results, key=lambda r: r["partition"])))


def _run_tasks(ray, places: list[TaskSlot], count: int, base: str, specs, out: Path, options: dict[str, Any],
               low_disk: bool, retries: int, fault, plan, quiet: bool, cancel) -> list[dict[str, Any]]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .run import partitioned
    from .run.partitions import Partition

    task = ray.remote(_partition_task)
    refs = {}
    per_slot = -(-count // len(places))  # more partitions than slots (`partitions=`): they share the slot
    for i in range(count):
        place = places[i % len(places)]
        task_options = {**options, "max_memory": max(1, place.max_memory // per_slot)}
        if place.num_gpus and options.get("device", "auto") == "auto":
            task_options["device"] = "cuda"
        label = Partition(i, count).label
        ref = task.options(
            num_cpus=place.num_cpus / per_slot, num_gpus=place.num_gpus / per_slot, max_retries=retries, retry_exceptions=False,
            scheduling_strategy=NodeAffinitySchedulingStrategy(place.node_id, soft=True),  # soft: a lost node's task moves
        ).remote(base, specs, str(out), label, task_options, low_disk, fault)
        refs[ref] = label
    bar = None
    if not quiet:
        from tqdm import tqdm

        from .console import terminal

        bar = tqdm(total=sum(t.end - t.start for t in plan.tensors), unit="B", unit_scale=True, unit_divisor=1000,
                   desc=f"merging ({count} partitions)", file=terminal(), dynamic_ncols=True)
    offsets: dict = {}
    totals: dict = {}
    results = []
    pending = list(refs)
    try:
        while pending:
            if cancel is not None and cancel.is_set():
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise Interrupted(f"interrupted with {len(pending)} partition(s) running; their journals in {out} keep "
                                  "their work; re-run the same command to resume")
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            for ref in done:
                results.append(_result(ray, ref, refs[ref], retries))
            if bar is not None:
                bar.n = min(bar.total, partitioned.progress_bytes(out, count, offsets, totals))
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
    return results


def _result(ray, ref, label: str, retries: int) -> dict[str, Any]:
    """A task's result, or its failure as one line naming the partition."""
    from ray import exceptions as rx

    try:
        return ray.get(ref)
    except rx.RayTaskError as exc:
        cause = exc.cause if hasattr(exc, "cause") else None
        if isinstance(cause, StreamMergeError):
            raise type(cause)(f"partition {label}: {cause}") from None
        raise ExecutionError(f"partition {label} failed: {' '.join(str(cause or exc).split())[:300]}; "
                             "re-run the same command to resume") from None
    except rx.RayError as exc:  # the worker or its node died (crash, OOM, preemption) and the retries ran out
        kind = type(exc).__name__
        raise ExecutionError(f"partition {label} failed after {retries} retries ({kind}); its finished tensors are "
                             "journaled: re-run the same command to resume") from None
