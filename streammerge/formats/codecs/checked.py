"""Quantized-weight codecs: bitsandbytes 4-bit (`bnb4`) and LLM.int8() (`int8`).

`parse_checked` is the door from an untrusted checkpoint to the codecs' parsers: the ValueError a
parser raises for a quant state that lies (shape, blocksize, absmax of the wrong length...) becomes
an InputError naming the file and the weight. No torch import here: the parser is passed in.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, TypeVar

from ...errors import InputError

T = TypeVar("T")


def parse_checked(
    parse: Callable[[str, Mapping[str, Any]], T], file: str | os.PathLike, name: str, tensors: Mapping[str, Any]
) -> T:
    """`parse(name, tensors)` (e.g. `bnb4.parse_bnb4`, `int8.parse_int8`), its failures as InputError."""
    try:
        return parse(name, tensors)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:  # hostile JSON can reach any of them
        detail = " ".join(str(exc).split())[:300]
        raise InputError(
            f"{file}: quantized weight {name!r} is inconsistent ({detail}); the checkpoint is corrupt or was not "
            "saved by transformers/bitsandbytes: re-download or re-quantize it"
        ) from None
