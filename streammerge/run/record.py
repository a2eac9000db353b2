"""streammerge.json: what was merged, from what, how, and the checksums of every file written.

One builder per kind of output; `api.merge` writes the result last but one (before the final
rename that makes the folder a model), so its presence says the merge is complete.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..version import __version__

if TYPE_CHECKING:
    from ..adapters.load import Adapter
    from ..planning.gguf import GGUFPlan
    from ..planning.types import MergePlan


def merge_record(plan: MergePlan, adapters: list[Adapter], shards: list[dict], copied: list[str], device, checkpoint=None,
            adapter_digests: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """streammerge.json: what was merged, from what, how, and the checksums of what was written."""
    import safetensors
    import torch

    from ..hub.client import hub_origin

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
            {"path": str(a.path), "weight": a.weight, "files": adapter_digests[i] if adapter_digests else a.file_digests(),
             **({"hub": h} if (h := hub_origin(a.path)) else {})}
            for i, a in enumerate(adapters)
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
            "peft": _version_of("peft"),
            "safetensors": safetensors.__version__,
        },
    }


def _version_of(package: str) -> str | None:
    """An installed package's version, without importing it (importing peft costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def gguf_record(gplan: GGUFPlan, adapters, files: list[dict], copied: list[str], device, seconds: float,
                checkpoint=None) -> dict[str, Any]:
    """streammerge.json of a GGUF merge: type, architecture, tokenizer, inputs and the files' checksums."""
    import gguf
    import torch

    from ..hub.client import hub_origin

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
                     "gguf": getattr(gguf, "__version__", _version_of("gguf"))},
    }
