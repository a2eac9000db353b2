"""streammerge: merge LoRA adapters into a checkpoint by streaming tensors, never loading the model.

The public functions import their machinery lazily so `streammerge --help` does not pay for torch.
"""

from __future__ import annotations

from .version import __version__

__all__ = ["merge", "plan", "verify", "finalize", "save_merged", "__version__"]


def merge(*args, **kwargs):
    """Merge adapters into a base and write the output folder; see `streammerge.api.merge`."""
    from .api import merge as _merge

    return _merge(*args, **kwargs)


def plan(*args, **kwargs):
    """Plan a merge from headers alone; see `streammerge.api.plan`."""
    from .api import plan as _plan

    return _plan(*args, **kwargs)


def save_merged(*args, **kwargs):
    """Merge a live PeftModel's active adapters into its base, streaming; see `streammerge.live.save_merged`."""
    from .live import save_merged as _save_merged

    return _save_merged(*args, **kwargs)


def verify(*args, **kwargs):
    """Check a merged folder against base + adapters in bounded memory; see `streammerge.api.verify`."""
    from .api import verify as _verify

    return _verify(*args, **kwargs)


def finalize(*args, **kwargs):
    """Complete a merge whose partitions have all run; see `streammerge.api.finalize`."""
    from .api import finalize as _finalize

    return _finalize(*args, **kwargs)
