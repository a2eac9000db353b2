"""`--method gguf`: its plan (headers, config, tokenizer), its summary, its record and its result line.

The merge itself is `api.merge`'s, as for every method: the GGUF plan's `output` (its files as
shards of the "gguf" container) runs through the one executor, journal, resume, Hub prefetch and
push. A Hub base is planned from ranged header reads (its config and tokenizer files downloaded
first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import AdapterError
from ..options import MergeOptions, format_size
from ..planning.gguf import GGUFPlan, build_gguf_plan, summary_lines


def plan_gguf(base, adapters, options: MergeOptions):
    """(checkpoint, adapters, merge plan, GGUF plan) from headers, config and tokenizer files only.

    The architecture is checked first, so an unsupported model is refused before anything else."""
    from ..adapters.load import load_adapter
    from ..options import adapter_specs
    from ..hub.checkpoint import open_base
    from ..hub.client import adapter_folder
    from ..planning.build import build_plan
    from ..formats.gguf import require
    from ..formats.gguf.arch import arch_of

    require()  # before any work: the gguf package is needed to write anything
    checkpoint = open_base(base)  # a local folder, or a Hub repo planned from ranged header reads
    arch_of(checkpoint.config)
    loaded = [load_adapter(adapter_folder(spec.path), spec.weight) for spec in adapter_specs(adapters)]
    if not loaded:
        raise AdapterError("give at least one adapter")
    merge_plan = build_plan(checkpoint, loaded, options)
    return checkpoint, loaded, merge_plan, build_gguf_plan(checkpoint, merge_plan, options)


def print_gguf_plan(base, adapters, options: MergeOptions, *, as_json: bool, low_disk: bool = False,
                    partitions: int | None = None) -> int:
    from ..hub.checkpoint import HubCheckpoint
    from .partitions import shares, table_lines

    checkpoint, _, merge_plan, gplan = plan_gguf(base, adapters, options)
    if as_json:
        data = {"merge": merge_plan.to_dict(), "gguf": gplan.to_dict()}
        if partitions is not None:
            data["partitions"] = [s.to_dict() for s in shares(gplan.output, partitions)]
        print(json.dumps(data, indent=2))
        return 0
    print("\n".join(summary_lines(gplan, free_disk=shutil.disk_usage(Path.cwd()).free)))
    if partitions is not None:
        print("\n".join(table_lines(gplan.output, partitions)))
    if isinstance(checkpoint, HubCheckpoint):  # what a merge would download, and its peak disk
        from ..hub.run import disk_estimate

        print("\n".join(disk_estimate(checkpoint, gplan.output, low_disk=low_disk).lines()))
    return 0


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
