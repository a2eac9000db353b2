"""Stored tensor encodings, one module each, found by name.

The planner, the executor and the verifier never import a codec's module: they ask this registry
for `get(name)` (a stored dtype such as "BF16" or "Q8_0", or a quantized-weight codec such as
"bnb4") or `for_method(method)` (the codec a `--method` writes). The built-in codecs register
themselves when their module is imported, which happens on the first lookup, so that importing the
option parser does not import torch. A new format is a new module that calls `register`, listed
in BUILTIN (or imported by whoever registers it, as the tests do).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ...errors import UnsupportedError

if TYPE_CHECKING:
    from .base import Codec

BUILTIN = ("cast", "ggml", "kquants", "bitsandbytes", "fp8", "ct_fp8", "mxfp4")  # modules of this package that register codecs

_codecs: dict[str, "Codec"] = {}
_loaded = False


def register(codec: "Codec") -> "Codec":
    """Make `codec` findable by its name (and by its method, if it has one); returns it."""
    if codec.name in _codecs and _codecs[codec.name] is not codec:
        raise ValueError(f"a codec named {codec.name!r} is already registered")
    _codecs[codec.name] = codec
    return codec


def unregister(name: str) -> None:
    _codecs.pop(name, None)


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            importlib.import_module(f"{__name__}.{module}")


def find(name: str) -> "Codec | None":
    _load_builtin()
    return _codecs.get(name)


def get(name: str) -> "Codec":
    codec = find(name)
    if codec is None:
        raise UnsupportedError(f"no codec for the stored encoding {name!r}; known: {', '.join(sorted(_codecs))}")
    return codec


def for_method(method: str) -> "Codec | None":
    """The codec whose output `--method method` writes (None for the built-in methods)."""
    _load_builtin()
    return next((c for c in _codecs.values() if c.method == method), None)


def methods() -> list[str]:
    _load_builtin()
    return sorted(c.method for c in _codecs.values() if c.method)
