"""What the checkpoint's headers cannot say: which weights are tied, and how experts are stored.

Built only when a merge needs it (tied embeddings, `target_parameters`), from `config.json` with
transformers itself: the model is instantiated on the meta device (no memory, no weights), so the
tie mapping, the parameter order of each module (which fixes PEFT's ParamWrapper nesting), the
experts' `is_transposed` flag and the checkpoint-to-model key conversion are transformers' own.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedError

TIE_KEY = "tie_word_embeddings"


def ties_requested(config: dict[str, Any] | None) -> bool:
    """Does config.json (or a nested text config) ask for tied word embeddings?"""
    if not config:
        return False

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get(TIE_KEY) is True:
                return True
            return any(walk(v) for v in node.values() if isinstance(v, dict))
        return False

    if walk(config):
        return True
    if TIE_KEY in config:
        return False
    try:  # the key is absent: the config class's default decides
        return bool(getattr(_auto_config(config).get_text_config(), TIE_KEY, False))
    except Exception:
        return False


def untied_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with every `tie_word_embeddings` (top level and nested text configs) set to false."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (False if k == TIE_KEY else walk(v)) for k, v in node.items()}
        return node

    new = walk(config)
    new[TIE_KEY] = False
    return new


_EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")


def guess_ties(names: set[str]) -> dict[str, str]:
    """lm_head.weight -> the one input embedding, for models transformers cannot instantiate."""
    if "lm_head.weight" in names:
        return {}
    embeddings = [n for n in names if n.endswith(_EMBEDDING_NAMES)]
    return {"lm_head.weight": embeddings[0]} if len(embeddings) == 1 else {}


def ignored_on_load(config: dict[str, Any] | None) -> list[re.Pattern]:
    """Checkpoint tensors the model class drops when loading (DeepSeek-V3's multi-token-prediction
    layer 61, `_keys_to_ignore_on_load_unexpected`): no adapter trained on the model can target them.
    Read from the class, without building a model."""
    import transformers

    patterns = []
    for arch in (config or {}).get("architectures") or []:
        try:
            cls = getattr(transformers, arch, None)
        except Exception:  # a lazily imported class that fails to import
            cls = None
        for p in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []:
            try:
                patterns.append(re.compile(p))
            except (re.error, TypeError):
                continue
    return patterns


def _auto_config(config: dict[str, Any]):
    from transformers import AutoConfig

    data = {k: v for k, v in config.items() if k not in ("transformers_version",)}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type")
    return AutoConfig.for_model(model_type, **data)


@dataclass
class ParamSlot:
    """A model parameter that `target_parameters` can wrap, and where its values are on disk."""

    name: str  # model parameter name, e.g. model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, ...]
    transposed: bool  # experts stored (E, in, out) instead of (E, out, in)
    # on-disk pieces when transformers converts the checkpoint at load time:
    # (checkpoint tensor, expert index, row offset in the fused out dim, rows); empty = stored as is
    pieces: list[tuple[str, int, int, int]] = field(default_factory=list)


@dataclass
class ModelInfo:
    tied: dict[str, str]  # parameter absent from the checkpoint -> checkpoint tensor it is tied to
    module_params: dict[str, list[str]]  # module -> its own parameter names, registration order
    params: dict[str, ParamSlot]


_CACHE: dict[str, ModelInfo] = {}


def model_info(checkpoint) -> ModelInfo:
    """ModelInfo of a checkpoint (cached per folder); UnsupportedError if transformers cannot build it."""
    key = str(checkpoint.root)
    if key not in _CACHE:
        _CACHE[key] = _build(checkpoint)
    return _CACHE[key]


def _meta_model(config: dict[str, Any]):
    import torch
    import transformers

    cfg = _auto_config(config)
    classes = [getattr(transformers, a, None) for a in (config.get("architectures") or [])]
    classes = [c for c in classes if c is not None] or [transformers.AutoModelForCausalLM]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            cls = classes[0]
            return cls.from_config(cfg) if cls is transformers.AutoModelForCausalLM else cls._from_config(cfg)


def _build(checkpoint) -> ModelInfo:
    if not checkpoint.config:
        raise UnsupportedError(f"{checkpoint.root}: config.json is needed to resolve tied weights / expert parameters")
    try:
        model = _meta_model(checkpoint.config)
    except Exception as exc:  # any failure of an external library to build the model
        raise UnsupportedError(
            f"{checkpoint.root}: transformers cannot instantiate this model from config.json ({type(exc).__name__}: "
            f"{exc}); it is needed to resolve tied embeddings or expert parameters"
        ) from None
    on_disk = set(checkpoint.tensors)
    tied = {}
    try:
        mapping = model.get_expanded_tied_weights_keys(all_submodels=True)
    except Exception:
        mapping = {}
    for target, source in mapping.items():
        if target not in on_disk and source in on_disk:
            tied[target] = source
        elif source not in on_disk and target in on_disk:
            tied[source] = target
    module_params: dict[str, list[str]] = {}
    params: dict[str, ParamSlot] = {}
    for mod_name, module in model.named_modules():
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if not names:
            continue
        module_params[mod_name] = names
        transposed = bool(getattr(module, "is_transposed", False))
        for n, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{n}" if mod_name else n
            params[full] = ParamSlot(full, tuple(p.shape), transposed)
    _attach_conversions(model, checkpoint, params)
    return ModelInfo(tied, module_params, params)


def _attach_conversions(model, checkpoint, params: dict[str, ParamSlot]) -> None:
    """For parameters transformers fuses at load time (e.g. Qwen3-MoE experts), find their on-disk pieces.

    Only the `MergeModulelist(dim=0)` [+ `Concatenate(dim=1)`] pattern is understood: expert e's fused
    matrix is the row-wise concatenation of the per-expert checkpoint tensors, in source-pattern order.
    Anything else leaves `pieces` empty, and a LoRA on such a parameter is refused later.
    """
    missing = [p for p in params.values() if p.name not in checkpoint.tensors]
    if not missing:
        return
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model)
    except Exception:
        return
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pat: conv for conv in converters for pat in conv.source_patterns}
    meta_sd = {name: True for name in params}
    prefix = getattr(model, "base_model_prefix", None)
    for key, ref in checkpoint.tensors.items():
        try:
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        except Exception:
            continue
        slot = params.get(target)
        if pattern is None or slot is None or slot.name in checkpoint.tensors:
            continue
        conv = by_pattern[pattern]
        ops = [type(op) for op in conv.operations]
        if ops not in ([MergeModulelist], [MergeModulelist, Concatenate]) or any(
            getattr(op, "dim", None) != want for op, want in zip(conv.operations, (0, 1))
        ):
            continue
        expert = _expert_index(key, pattern)
        if expert is None or len(ref.info.shape) != 2:
            continue
        slot.pieces.append((key, expert, conv.source_patterns.index(pattern), ref.info.shape[0]))
    for slot in missing:
        if not slot.pieces:
            continue
        # order by (expert, source pattern) and turn pattern indices into row offsets
        slot.pieces.sort(key=lambda p: (p[1], p[2]))
        fixed, offset, last_expert = [], 0, None
        for key, expert, _, rows in slot.pieces:
            if expert != last_expert:
                offset, last_expert = 0, expert
            fixed.append((key, expert, offset, rows))
            offset += rows
        slot.pieces = fixed


def _expert_index(key: str, pattern: str) -> int | None:
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    return int(match.group(1)) if match else None
