"""An adapter's tensors -> the edits they make to base tensors, resolved with PEFT's own rules.

This is the half of adapter loading that needs the base checkpoint's tensor names and shapes,
apart from reading the adapter folder (load.py). Targets and rank/alpha patterns are resolved by
PEFT's rules as targets.py states them (held to the installed PEFT by tests), so our reading of an
adapter cannot drift from PEFT's. Every tensor of the adapter file is classified (LoRA factor,
embedding factor, DoRA magnitude, lora_bias, trainable-token rows, saved full tensor) and mapped to
the base tensor it changes; a tensor we do not understand is an error. Only headers are read here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ..errors import AdapterError, UnsupportedError
from ..formats.safetensors import TensorInfo
from .load import WEIGHTS_NAME, Adapter, Edit, LoraFactors
from .targets import Targeting

PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
# adapter tensor key (prefix stripped) -> what it is; the first match wins
_KEY_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("factor", re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")),
    ("lora_bias", re.compile(r"^(?P<module>.+)\.lora_B\.bias$")),
    ("embedding", re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>A|B)$")),
    ("magnitude", re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$")),
    ("tokens", re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")),
    ("base_layer", re.compile(r"^(?P<module>.+)\.base_layer\.(?P<part>weight|bias)$")),
    ("modules_to_save", re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<part>.+)$")),
)


def module_of_key(key: str) -> tuple[str, str] | None:
    """`base_model.model.m.q_proj.lora_A.weight` -> ("m.q_proj", "lora_A")."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    match = _LORA_KEY.match(name)
    return (match.group("module"), match.group("kind")) if match else None


# ------------------------------------------------------------------------------------ resolution


@dataclass
class _Module:
    """The LoRA tensors found for one module path."""

    parts: dict[str, tuple[str, TensorInfo]] = field(default_factory=dict)  # A, B, bias, magnitude


_Full = tuple[str, str, str, str, TensorInfo]  # (kind, module, param, key, info)


def _classify(adapter: Adapter) -> tuple[dict[str, _Module], dict[str, tuple[str, TensorInfo]], list[_Full]]:
    """Adapter keys -> LoRA modules, trainable-token modules, and full tensors (a key that is none of
    these is treated as a full tensor and must be explained by the config, or it is refused)."""
    modules: dict[str, _Module] = {}
    tokens: dict[str, tuple[str, TensorInfo]] = {}
    full: list[_Full] = []
    for key, info in adapter.header.tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for kind, pattern in _KEY_KINDS:
            m = pattern.match(name)
            if m:
                break
        else:
            module, _, param = name.rpartition(".")
            full.append(("plain", module, param, key, info))
            continue
        module = m.group("module")
        if kind in ("factor", "embedding"):
            part = m.group("part")[-1]  # "A" / "B"
            tag = part if kind == "factor" else f"emb_{part}"
            _put(adapter, modules.setdefault(module, _Module()), tag, key, info)
        elif kind == "lora_bias":
            _put(adapter, modules.setdefault(module, _Module()), "bias", key, info)
        elif kind == "magnitude":
            _put(adapter, modules.setdefault(module, _Module()), "magnitude", key, info)
        elif kind == "tokens":
            tokens[module] = (key, info)
        else:
            full.append((kind, module, m.group("part"), key, info))
    return modules, tokens, full


def _put(adapter: Adapter, module: _Module, tag: str, key: str, info: TensorInfo) -> None:
    if tag in module.parts:
        raise AdapterError(f"{adapter.weights_file}: two tensors ({module.parts[tag][0]!r}, {key!r}) for the same LoRA part")
    module.parts[tag] = (key, info)


def tensor_name(module: str, param: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The base tensor `module.param`; tolerates checkpoints saved without the top prefix."""
    candidates = [f"{module}.{param}" if module else param]
    head, _, rest = module.partition(".")
    if rest:
        candidates.append(f"{rest}.{param}")
    for name in candidates:
        if name in shapes:
            return name
    return None


def _targeted(adapter: Adapter, module: str) -> bool:
    return adapter.targets.decide(module) is Targeting.TARGETED


def _rank_alpha(adapter: Adapter, key: str) -> tuple[int, float]:
    config = adapter.config
    ranks, alphas = adapter.pattern_tables
    return ranks.value_for(config.rank_pattern, key, config.r), float(alphas.value_for(config.alpha_pattern, key, config.lora_alpha))


def _scale(config: Any, rank: int, alpha: float) -> float:
    return float(alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)


def resolve_edits(
    adapter: Adapter,
    shapes: Mapping[str, tuple[int, ...]],
    tied: Mapping[str, str] | None = None,
    model_info: Callable[[], Any] | None = None,
    ignored: Callable[[], Sequence[Any]] | None = None,
) -> list[Edit]:
    """Every change `adapter` makes, each naming the tensor it changes; any tensor of the adapter
    that cannot be placed exactly is an error, raised before any data is read.

    `shapes` maps tensor names to shapes: the base checkpoint's, plus output tensors tied to a base
    tensor (`tied`: absent name -> present name, e.g. lm_head.weight -> model.embed_tokens.weight).
    `model_info()` gives transformers' view of the model (needed for `target_parameters`); `ignored()`
    the patterns (re) of checkpoint tensors the model class does not load, asked only when targets
    match modules without LoRA tensors (DeepSeek-V3's multi-token-prediction layer).
    """
    tied = dict(tied or {})
    modules, tokens, full = _classify(adapter)
    edits: list[Edit] = []
    for kind, module, param, key, info in full:  # first: a resized layer explains mismatched factors
        edits.append(_resolve_full(adapter, kind, module, param, key, info, shapes))
    lora_modules: set[str] = set()
    for module, found in sorted(modules.items()):
        new = _resolve_module(adapter, module, found, shapes, tied, model_info)
        edits += new
        if new and new[0].kind in ("lora", "embedding", "dora"):
            lora_modules.add(module)
    for module, (key, info) in sorted(tokens.items()):
        edits.append(_resolve_tokens(adapter, module, key, info, shapes, len(tokens)))
    if not edits:
        raise AdapterError(f"{adapter.weights_file}: the adapter holds no tensors")
    _check_targets_matched(adapter, shapes, lora_modules, ignored)
    return edits


def _resolve_module(adapter, module, found: _Module, shapes, tied, model_info) -> list[Edit]:
    config = adapter.config
    parts = found.parts
    where = f"{adapter.weights_file}: module {module!r}"
    embedding = "emb_A" in parts or "emb_B" in parts
    if embedding and ("A" in parts or "B" in parts):
        raise AdapterError(f"{where} has both Linear and Embedding LoRA tensors; the adapter is corrupt")
    a_tag, b_tag = ("emb_A", "emb_B") if embedding else ("A", "B")
    for tag, label in ((a_tag, "lora_A"), (b_tag, "lora_B")):
        if tag not in parts:
            what = label.replace("lora_", "lora_embedding_") if embedding else label
            raise AdapterError(f"{where} has no {what} tensor; the adapter is incomplete")
    if config.target_parameters and not embedding:
        slot = _param_slot(adapter, module, model_info)
        if slot is not None:
            return _resolve_param(adapter, module, parts, slot, shapes)
    if ".base_layer" in f".{module}.":
        raise AdapterError(f"{where}: a nested LoRA layer that no target_parameters entry explains")

    target = tensor_name(module, "weight", shapes)
    if target is None:
        raise AdapterError(
            f"{adapter.path}: LoRA module {module!r} has no weight in the base checkpoint "
            f"(expected {module}.weight); is this adapter for another model?"
        )
    tied_names = set(tied) | set(tied.values())
    if not _targeted(adapter, module) and not (getattr(config, "ensure_weight_tying", False) and target in tied_names):
        raise AdapterError(
            f"{adapter.path}: the adapter has tensors for {module!r} but adapter_config.json does not target it "
            "(PEFT would silently ignore them); fix target_modules or the adapter file"
        )
    (a_key, a), (b_key, b) = parts[a_tag], parts[b_tag]
    rank, alpha = _rank_alpha(adapter, module)
    w = tuple(shapes[target])
    if len(a.shape) != 2 or len(b.shape) != 2 or len(w) != 2:
        raise UnsupportedError(
            f"{where}: LoRA on a layer with {len(w)}-D weight {list(w)} (factors {list(a.shape)}/{list(b.shape)}: "
            "convolution or other non-Linear layer) is not supported; nothing was written"
        )
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"{where}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}; the adapter is corrupt")
    if a.shape[0] != rank:
        raise AdapterError(
            f"{where}: tensors have rank {a.shape[0]} but adapter_config.json says r={rank} for it; "
            "the config does not belong to these weights"
        )
    transpose = True if embedding else _orientation(where, a, b, w, bool(config.fan_in_fan_out))
    out_features = b.shape[0]
    scale = _scale(config, rank, alpha)
    kind = "embedding" if embedding else "lora"
    keys = [a_key, b_key]
    magnitude = None
    if "magnitude" in parts:
        if not config.use_dora:
            raise AdapterError(f"{where} has a lora_magnitude_vector but adapter_config.json has use_dora=false")
        m_key, magnitude = parts["magnitude"]
        if tuple(magnitude.shape) != (out_features,):
            raise AdapterError(f"{where}: lora_magnitude_vector has shape {list(magnitude.shape)}, expected [{out_features}]")
        keys.append(m_key)
        kind = "dora"
    elif config.use_dora:
        raise AdapterError(f"{where}: use_dora=true but the adapter has no lora_magnitude_vector for it; the adapter is incomplete")
    factors = LoraFactors(module, a, b, rank, alpha, scale, transpose, kind, magnitude)
    edits = [Edit(target, kind, tuple(keys), factors=factors, scale=scale)]
    if "bias" in parts:
        edits.append(_lora_bias(adapter, module, parts["bias"], out_features, scale, shapes, where))
    elif getattr(config, "lora_bias", False) and not embedding:
        raise AdapterError(f"{where}: lora_bias=true but the adapter has no lora_B.bias for it; the adapter is incomplete")
    return edits


def _orientation(where: str, a: TensorInfo, b: TensorInfo, w: tuple[int, ...], fan_in_fan_out: bool) -> bool:
    """Is the delta transposed into the stored weight? PEFT decides by the layer type (Linear: no,
    GPT-2 Conv1D: yes), which the shapes reveal unless the weight is square."""
    straight, flipped = (b.shape[0], a.shape[1]) == w, (a.shape[1], b.shape[0]) == w
    if straight and flipped:
        return fan_in_fan_out
    if straight or flipped:
        return flipped
    raise AdapterError(
        f"{where}: delta B@A is {b.shape[0]}x{a.shape[1]} but the base weight is {w[0]}x{w[1]}; "
        "is this adapter for another model?"
    )


def _lora_bias(adapter, module, part, out_features, scale, shapes, where) -> Edit:
    key, info = part
    if not getattr(adapter.config, "lora_bias", False):
        raise AdapterError(f"{where} has lora_B.bias but adapter_config.json has lora_bias=false")
    target = tensor_name(module, "bias", shapes)
    if target is None:
        raise AdapterError(
            f"{where}: lora_bias=true but the base layer has no bias ({module}.bias); PEFT cannot merge it either"
        )
    if tuple(info.shape) != (out_features,) or tuple(shapes[target]) != (out_features,):
        raise AdapterError(f"{where}: lora_B.bias {list(info.shape)} does not fit the base bias {list(shapes[target])}")
    return Edit(target, "bias", (key,), tensor=info, scale=scale)


def _param_slot(adapter, module: str, model_info):
    """The model parameter a ParamWrapper at `module` (`m`, `m.base_layer`, ...) wraps, or None when
    no target_parameters entry names a parameter of that module."""
    depth = f".{module}.".count(".base_layer.")
    owner = module.replace(".base_layer", "")
    if model_info is None:
        raise UnsupportedError(f"{adapter.path}: target_parameters needs the model's structure (config.json)")
    info = model_info()
    names = info.module_params.get(owner, [])
    targets = set(adapter.config.target_parameters)
    hits = [p for p in names if f"{owner}.{p}" in targets or any(f"{owner}.{p}".endswith(f".{t}") for t in targets)]
    if not hits:
        return None
    if depth >= len(hits):
        raise AdapterError(f"{adapter.weights_file}: {module!r} is nested deeper than the {len(hits)} targeted parameter(s) of {owner!r}")
    # PEFT wraps the module's parameters in registration order, each wrapper around the previous one:
    # the outermost wrapper (no `.base_layer`) holds the last parameter.
    return info.params[f"{owner}.{hits[len(hits) - 1 - depth]}"]


def _resolve_param(adapter, module, parts, slot, shapes) -> list[Edit]:
    """A `target_parameters` LoRA (PEFT ParamWrapper): per-expert deltas on a 2-D/3-D parameter."""
    config = adapter.config
    where = f"{adapter.weights_file}: {slot.name} (target_parameters)"
    (a_key, a), (b_key, b) = parts["A"], parts["B"]
    if "bias" in parts or "magnitude" in parts:
        raise UnsupportedError(f"{where}: lora_bias / DoRA on target_parameters is not supported by PEFT")
    shape = slot.shape
    if len(shape) == 3:
        experts, d1, d2 = shape
        in_f, out_f = (d1, d2) if slot.transposed else (d2, d1)
    elif len(shape) == 2:
        experts, in_f, out_f = 1, shape[1], shape[0]
    else:
        raise UnsupportedError(f"{where}: parameters with {len(shape)} dimensions are not supported")
    rank, alpha = _rank_alpha(adapter, slot.name)
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape != (rank * experts, in_f) or b.shape != (out_f, rank * experts):
        raise AdapterError(
            f"{where}: LoRA factors {list(a.shape)}/{list(b.shape)} do not fit a parameter of shape {list(shape)} "
            f"with r={rank} (expected [{rank * experts}, {in_f}] / [{out_f}, {rank * experts}])"
        )
    scale = _scale(config, rank, alpha)
    keys = (a_key, b_key)
    if len(shape) == 2:
        if slot.name not in shapes:
            raise UnsupportedError(f"{where}: the checkpoint does not store this parameter under its name")
        return [Edit(slot.name, "lora", keys, factors=LoraFactors(slot.name, a, b, rank, alpha, scale, False), scale=scale)]
    if slot.name in shapes:
        if tuple(shapes[slot.name]) != tuple(shape):
            raise AdapterError(f"{where}: checkpoint tensor has shape {list(shapes[slot.name])}, the model {list(shape)}")
        factors = LoraFactors(slot.name, a, b, rank, alpha, scale, slot.transposed, "moe", experts=experts)
        return [Edit(slot.name, "moe", keys, factors=factors, scale=scale)]
    if not slot.pieces or slot.transposed:
        raise UnsupportedError(
            f"{where}: the checkpoint stores this parameter in a layout streammerge cannot map back "
            "(transformers converts it at load time); nothing was written"
        )
    edits = []
    for key, expert, offset, rows in slot.pieces:
        if tuple(shapes[key]) != (rows, in_f):
            raise AdapterError(f"{where}: checkpoint piece {key} has shape {list(shapes[key])}, expected [{rows}, {in_f}]")
        factors = LoraFactors(slot.name, a, b, rank, alpha, scale, False, "lora", experts=experts, expert=expert,
                              b_rows=(offset, offset + rows))
        edits.append(Edit(key, "lora", keys, factors=factors, scale=scale))
    covered = {(e, o) for _, e, o, _ in slot.pieces}
    if len(covered) != len(slot.pieces) or {e for e, _ in covered} != set(range(experts)):
        raise UnsupportedError(f"{where}: the checkpoint's per-expert pieces do not cover all {experts} experts")
    return edits


def _resolve_tokens(adapter, module, key, info, shapes, n_modules) -> Edit:
    """Trainable tokens: the rows `trainable_token_indices` names are replaced by the saved rows."""
    config = adapter.config
    where = f"{adapter.weights_file}: {key!r}"
    spec = config.trainable_token_indices
    if spec is None:
        raise AdapterError(f"{where}: trainable token rows but adapter_config.json has no trainable_token_indices")
    if isinstance(spec, dict):
        matches = [v for k, v in spec.items() if module.endswith(k)]  # PEFT's rule for wrapped module names
        if len(matches) != 1:
            raise AdapterError(f"{where}: trainable_token_indices does not name module {module!r} exactly once")
        indices = matches[0]
    else:
        if n_modules != 1:
            raise AdapterError(f"{where}: trainable_token_indices is a list but the adapter has {n_modules} token modules")
        indices = spec
    target = tensor_name(module, "weight", shapes)
    if target is None:
        raise AdapterError(f"{where}: the base checkpoint has no {module}.weight")
    w = tuple(shapes[target])
    indices = tuple(int(i) for i in indices)
    if len(w) != 2 or tuple(info.shape) != (len(indices), w[1]) or any(not 0 <= i < w[0] for i in indices):
        raise AdapterError(
            f"{where}: {list(info.shape)} rows for indices {list(indices)[:8]} do not fit {target} {list(w)}"
        )
    return Edit(target, "token_rows", (key,), tensor=info, indices=indices)


def _resolve_full(adapter, kind, module, param, key, info, shapes) -> Edit:
    """A full tensor saved in the adapter that replaces the base tensor (modules_to_save, the
    embedding layers PEFT saves with save_embedding_layers, biases saved with bias='all'/'lora_only')."""
    config = adapter.config
    if kind == "modules_to_save":  # older layout: m.modules_to_save[.adapter_name].param
        target = tensor_name(module, param, shapes) or tensor_name(module, param.partition(".")[2], shapes)
        reason = "modules_to_save"
    else:
        target = tensor_name(module, param, shapes)
        if kind == "base_layer" and param == "bias" and getattr(config, "bias", "none") in ("all", "lora_only"):
            reason = "bias"  # a trained bias of a LoRA layer (bias='all' / 'lora_only')
        elif kind == "base_layer":
            reason = "base_layer"  # the frozen layer PEFT saves with embedding LoRAs (save_embedding_layers)
        elif _in_modules_to_save(config, module):
            reason = "modules_to_save"
        elif param == "bias" and getattr(config, "bias", "none") in ("all", "lora_only"):
            reason = "bias"
        else:
            raise UnsupportedError(
                f"{adapter.weights_file}: tensor {key!r} is not a LoRA tensor and adapter_config.json does not explain "
                "it (modules_to_save, bias); streammerge does not know how PEFT would apply it; nothing was written"
            )
    if target is None:
        raise AdapterError(f"{adapter.weights_file}: tensor {key!r} replaces a tensor the base checkpoint does not have")
    if tuple(info.shape) != tuple(shapes[target]):
        raise UnsupportedError(
            f"{adapter.weights_file}: {key!r} has shape {list(info.shape)} but the base {target} is "
            f"{list(shapes[target])} (a resized vocabulary?); merging resized layers is not supported"
        )
    return Edit(target, "replace", (key,), tensor=info, reason=reason)


def _in_modules_to_save(config: Any, module: str) -> bool:
    """PEFT wraps every module whose name ends with a modules_to_save entry; the saved keys are the
    wrapped module's own state dict, so an ancestor of the key's module must match."""
    names = config.modules_to_save or []
    parts = module.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p.endswith(n) for p in prefixes for n in names)


def _check_targets_matched(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]], used: set[str],
                           ignored: Callable[[], Sequence[Any]] | None = None) -> None:
    """A config whose targets match base modules that have no tensors means a truncated adapter file
    (modules the model never loads excepted)."""
    targeted = set()
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        for candidate in (module, f"model.{module}"):
            if _targeted(adapter, candidate):
                targeted.add(module)
    untouched = sorted(m for m in targeted if m not in used and f"model.{m}" not in used and not any(u.endswith("." + m) for u in used))
    if untouched and ignored is not None:
        patterns = ignored()
        untouched = [m for m in untouched if not any(p.search(f"{m}.weight") for p in patterns)]
    if untouched:
        raise AdapterError(
            f"{adapter.path}: adapter_config.json targets {len(untouched)} module(s) with no LoRA tensors in "
            f"{WEIGHTS_NAME} (e.g. {untouched[0]!r}); the adapter file is incomplete or from another config"
        )


def resolve_factors(adapter: Adapter, base_weights: dict[str, tuple[int, ...]]) -> dict[str, LoraFactors]:
    """Base weight name -> LoRA factors of `adapter` (the LoRA-shaped edits of `resolve_edits`)."""
    return {e.target: e.factors for e in resolve_edits(adapter, base_weights) if e.factors is not None}
