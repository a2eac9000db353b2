"""Direct GGUF output (`--method gguf`): the merge's float32 rows go straight into llama.cpp's format.

This package is imported by the option parser, so this module stays light: no torch, no `gguf`.
The `gguf` package (llama.cpp's own Python writer and quantizers) is imported lazily by `require()`.

    types.py    --gguf-type names and what each means for every tensor
    arch.py     llama.cpp's conversion rules per architecture (names, q/k permutation, norm shift, metadata)
    vocab.py    the tokenizer as GGUF metadata (BPE from tokenizer.json, SentencePiece from tokenizer.model)
    plan.py     the GGUF layout: files, tensor infos, offsets and header bytes, fixed before any data is read
    execute.py  streams every tensor in row chunks: read -> merge (float32) -> transform -> encode -> write
    api.py      merge_gguf / plan_gguf, wired from streammerge.api and the CLI
"""

from __future__ import annotations

from ...errors import UnsupportedError


def require():
    """The `gguf` package, or an error that says how to install it."""
    try:
        import gguf  # noqa: PLC0415  (lazy on purpose: only --method gguf needs it)
    except ImportError:
        raise UnsupportedError(
            "--method gguf needs the 'gguf' package (llama.cpp's GGUF writer); "
            "install it with: pip install 'streammerge[gguf]'  (or: pip install gguf)"
        ) from None
    return gguf
