"""streammerge: merge LoRA adapters into a checkpoint by streaming tensors, never loading the model.

The public API is imported lazily so `streammerge --help` does not pay for importing torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["merge", "plan", "verify", "__version__"]


def __getattr__(name: str):
    if name in ("merge", "plan", "verify"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'streammerge' has no attribute {name!r}")
