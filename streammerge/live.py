"""`save_merged(peft_model, out)`: the notebook call, without loading or touching the model.

The live model's active adapters are saved with PEFT's own `save_pretrained` into a temporary
folder (adapter tensors only, a few MB to a few hundred MB), and the streaming merge runs from the
base checkpoint named by `base_model_name_or_path` (a local folder or a Hub repo). The model's
weights are only read, never merged or moved, so training can continue afterwards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

from .errors import AdapterError, OptionError


def _active_adapters(model: Any, adapters: Sequence[str] | None) -> list[str]:
    names = list(adapters) if adapters is not None else list(getattr(model, "active_adapters", None) or [])
    if not names:
        raise AdapterError("the model has no active adapter to merge; activate one with set_adapter() or pass adapters=[...]")
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise AdapterError(f"adapter(s) {unknown} are not in this model (it has {sorted(model.peft_config)})")
    return names


def _base_of(model: Any, names: list[str]) -> str:
    """The base checkpoint: the adapters' `base_model_name_or_path` (PEFT leaves it unset on adapters
    added with add_adapter), else the wrapped transformers model's `name_or_path`."""
    bases = {model.peft_config[n].base_model_name_or_path for n in names} - {None, ""}
    if not bases:
        inner = getattr(getattr(model, "base_model", None), "model", None)
        bases = {getattr(inner, "name_or_path", None)} - {None, ""}
    if len(bases) != 1:
        raise AdapterError(
            f"cannot tell which base checkpoint the adapters belong to (found {sorted(bases) or 'none'}); "
            "pass base='org/name' or a local folder"
        )
    return bases.pop()


def save_merged(
    model: Any,
    out: str | Path,
    method: str = "merged_16bit",
    *,
    base: str | Path | None = None,
    adapters: Sequence[str] | None = None,
    **options: Any,
):
    """Merge the active adapter(s) of a live `peft.PeftModel` into its base and write `out`.

    `base` overrides `peft_config.base_model_name_or_path`; `adapters` picks adapters other than
    the active ones (each merged with weight 1, as PEFT's `merge_and_unload` does). Every other
    keyword is passed to `streammerge.merge` (dtype, max_shard_size, max_memory, overwrite,
    low_disk, push_to_hub, ...). Returns its MergeResult.
    """
    from peft import PeftModel

    from .api import merge
    from .options import AdapterSpec

    if not isinstance(model, PeftModel):
        raise OptionError(f"save_merged expects a peft.PeftModel, got {type(model).__name__}; for folders use streammerge.merge")
    names = _active_adapters(model, adapters)
    if base is None:
        base = _base_of(model, names)
    with tempfile.TemporaryDirectory(prefix="streammerge-adapters-") as tmp:
        # PEFT writes the adapter named "default" at the top and any other one in a subfolder of its name.
        model.save_pretrained(tmp, selected_adapters=names, safe_serialization=True)
        folders = [Path(tmp) if n == "default" else Path(tmp) / n for n in names]
        return merge(base, [AdapterSpec(str(f), 1.0) for f in folders], out, method=method, **options)
