"""A PEFT LoRA adapter folder -> the edits it makes to base tensors, resolved with PEFT's own rules.

The config is read as PEFT's `LoraConfig` reads it (lora_config.py: directly for the fields whose
semantics it reproduces, by PEFT itself for anything else), and targets and rank/alpha patterns
are resolved by PEFT's rules as targets.py states them (held to the installed PEFT by tests), so our
reading of an adapter cannot drift from PEFT's. Every tensor of the adapter file is classified
(LoRA factor, embedding factor, DoRA magnitude, lora_bias, trainable-token rows, saved full
tensor) and mapped to the base tensor it changes; a tensor we do not understand is an error.
Only headers are read here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import AdapterError, UnsupportedError
from .io.checkpoint import read_json, safe_member
from .io.legacy import read_legacy_bin  # noqa: F401  (the one reader of adapter_model.bin)
from .io.safetensors import FLOAT_DTYPES, TORCH_NAME, SafetensorsFile, TensorInfo, pread_exact, read_header
from .lora_config import fast_settings
from .targets import PatternTable, TargetRules, Targeting

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
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
# LoRA config fields that select a LoRA variant whose merge is not PEFT's plain/DoRA formula
_SUPPORTED_VARIANTS = {"use_dora"}


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA on one tensor: `delta = scale * B @ A` (transposed when `fan_in_fan_out`).

    kind: lora | embedding (A [r, vocab], B [dim, r], transposed) | dora (with `magnitude`) |
    moe (a 3-D expert tensor; A [r*E, in], B [out, r*E] as PEFT's ParamWrapper stores them).
    `expert`/`b_rows` select one expert's factors and a row range of B, for a fused expert
    parameter that the checkpoint stores as per-expert pieces.
    """

    module: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    kind: str = "lora"
    magnitude: TensorInfo | None = None
    experts: int = 0
    expert: int | None = None
    b_rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Edit:
    """One change an adapter makes to one output tensor.

    kind: lora | embedding | dora | moe (with `factors`), bias (`tensor` * `scale` added),
    token_rows (rows `indices` replaced by `tensor`), replace (`tensor` replaces the base values;
    `reason`: modules_to_save | base_layer | bias).
    """

    target: str
    kind: str
    keys: tuple[str, ...]
    factors: LoraFactors | None = None
    tensor: TensorInfo | None = None
    scale: float = 1.0
    indices: tuple[int, ...] = ()
    reason: str = ""


@dataclass
class Adapter:
    path: Path
    weight: float
    config: Any  # lora_config.LoraSettings, or peft.LoraConfig for configs only PEFT reads
    config_dict: dict[str, Any]
    weights_file: Path  # safetensors (converted from adapter_model.bin for legacy adapters)
    header: SafetensorsFile
    factors: dict[str, LoraFactors] = field(default_factory=dict)
    legacy_file: Path | None = None  # the adapter_model.bin it was converted from
    edits: list[Edit] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.path) if self.weight == 1.0 else f"{self.path}@{self.weight:g}"

    @functools.cached_property
    def targets(self) -> TargetRules:
        """The config's target_modules / exclude_modules / layer rules, prepared once."""
        return TargetRules.from_config(self.config)

    @functools.cached_property
    def pattern_tables(self) -> tuple[PatternTable, PatternTable]:
        """rank_pattern and alpha_pattern, prepared once."""
        return PatternTable.of(self.config.rank_pattern), PatternTable.of(self.config.alpha_pattern)

    @property
    def original_weights_file(self) -> Path:
        return self.legacy_file or self.weights_file

    def file_digests(self) -> dict[str, str]:
        """sha256 of the adapter's files: they are small, and they fingerprint what was merged."""
        out = {}
        for f in (self.path / CONFIG_NAME, self.original_weights_file):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[f.name] = h.hexdigest()
        return out


def _load_lora_config(path: Path, raw: dict[str, Any]):
    """LoraSettings when lora_config.py reproduces every field's meaning, else PEFT's LoraConfig."""
    settings = fast_settings(raw)
    if settings is not None:
        return settings
    from peft import LoraConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoraConfig.from_peft_type(**raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{path / CONFIG_NAME}: PEFT cannot read this LoRA config ({exc})") from None


def _active_variants(config: Any) -> list[str]:
    """LoRA variants the config asks for, found the way PEFT's `resolve_lora_variant` finds them."""
    active = []
    for f in dataclasses.fields(config):
        if f.name == "init_lora_weights":
            active += [v for v in f.metadata.get("lora_variants", ()) if config.init_lora_weights == v]
        elif f.metadata.get("is_lora_variant") and getattr(config, f.name, None):
            active.append(f.name)
    return active


def _refuse_unsupported(path: Path, config: Any) -> None:
    """Features whose merge is not implemented: refuse before any work instead of merging wrongly."""
    for variant in _active_variants(config):
        if variant not in _SUPPORTED_VARIANTS:
            hint = " (activated LoRA cannot be merged)" if variant == "alora_invocation_tokens" else ""
            raise UnsupportedError(f"{path}: the LoRA variant {variant}{hint} is not supported; nothing was written")
    checks = [
        (getattr(config, "layer_replication", None), "layer_replication"),
        (getattr(config, "use_qalora", False), "use_qalora"),
        (getattr(config, "kasa_config", None), "kasa_config (KaSA changes the base weight)"),
        (getattr(config, "use_bdlora", None), "use_bdlora (block-diagonal LoRA)"),
        (getattr(config, "arrow_config", None), "arrow_config (routed LoRA cannot be merged)"),
        (getattr(config, "monteclora_config", None), "monteclora_config"),
        (getattr(config, "bias", "none") not in ("none", "all", "lora_only", None), f"bias={getattr(config, 'bias', None)!r}"),
    ]
    for active, feature in checks:
        if active:
            raise UnsupportedError(f"{path}: adapter option {feature} is not supported; nothing was written")


def _check_values(path: Path, config: Any) -> None:
    """PEFT accepts any JSON for r, lora_alpha, the patterns and the targets; we need usable values."""
    where = f"{path / CONFIG_NAME}"

    def rank_ok(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def alpha_ok(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for field_name, value, ok, what in [
        ("r", config.r, rank_ok, "a positive integer"),
        ("lora_alpha", config.lora_alpha, alpha_ok, "a finite number"),
    ]:
        if not ok(value):
            raise AdapterError(f"{where}: {field_name}={value!r} must be {what}; fix the config or re-export the adapter")
    for field_name, ok, what in [("rank_pattern", rank_ok, "positive integers"), ("alpha_pattern", alpha_ok, "finite numbers")]:
        pattern = getattr(config, field_name) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and ok(v) for k, v in pattern.items()):
            raise AdapterError(f"{where}: {field_name} must map module patterns to {what}; fix the config or re-export the adapter")
    if not config.target_modules:
        raise AdapterError(f"{where}: target_modules is empty, so the adapter targets nothing; fix the config or re-export the adapter")


def load_adapter(path: str | Path, weight: float = 1.0) -> Adapter:
    """Read and check an adapter folder's config and tensor headers (no tensor data; a legacy
    adapter_model.bin is converted to a temporary safetensors file)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter not found: {path} (give the folder holding adapter_config.json)")
    if not math.isfinite(weight):
        raise AdapterError(f"adapter {path}: weight {weight} is not a finite number")
    config_path = safe_member(path, CONFIG_NAME, str(path))
    raw = read_json(config_path, CONFIG_NAME)
    if not isinstance(raw, dict):
        raise AdapterError(f"{config_path}: must be a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{path}: peft_type {peft_type} is not supported (only LORA adapters can be merged); nothing was written"
        )
    raw = {k: v for k, v in raw.items() if k != "runtime_config"}
    raw["peft_type"] = "LORA"
    config = _load_lora_config(path, raw)
    _refuse_unsupported(path, config)
    _check_values(path, config)

    weights_file, legacy = safe_member(path, WEIGHTS_NAME, str(path)), None
    if not weights_file.is_file():
        if not (path / LEGACY_WEIGHTS_NAME).is_file():
            raise AdapterError(f"{path}: {WEIGHTS_NAME} not found; the adapter folder is incomplete")
        from .io.legacy import convert_bin_to_safetensors

        legacy = safe_member(path, LEGACY_WEIGHTS_NAME, str(path))
        weights_file = convert_bin_to_safetensors(legacy)
    header = read_header(weights_file)
    return Adapter(path=path, weight=weight, config=config, config_dict=raw, weights_file=weights_file,
                   header=header, legacy_file=legacy)


def check_finite(adapter: Adapter, block_bytes: int = 16 << 20) -> None:
    """Refuse NaN/Inf in any adapter tensor (a diverged training run): merged, they would poison
    every weight they touch. Reads the adapter's data in bounded blocks."""
    import torch

    with open(adapter.weights_file, "rb") as fh:
        for name, info in adapter.header.tensors.items():
            if info.dtype not in FLOAT_DTYPES or info.nbytes == 0:
                continue
            itemsize = info.nbytes // info.numel
            step = max(itemsize, block_bytes - block_bytes % itemsize)
            bad = 0
            for offset in range(info.start, info.end, step):
                buf = bytearray(min(step, info.end - offset))
                pread_exact(fh.fileno(), memoryview(buf), offset, str(adapter.weights_file))
                values = torch.frombuffer(buf, dtype=getattr(torch, TORCH_NAME[info.dtype]))
                lo, hi = torch.aminmax(values)  # fast test first: min/max propagate NaN and hold any inf
                if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                    bad += int((~torch.isfinite(values)).sum())
            if bad:
                raise AdapterError(
                    f"{adapter.weights_file}: tensor {name!r} holds {bad} NaN/Inf value(s); the adapter is corrupt "
                    "(diverged training?): re-train or re-export it, or pass --allow-nonfinite to merge it anyway"
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
) -> list[Edit]:
    """Every change `adapter` makes, each naming the tensor it changes; any tensor of the adapter
    that cannot be placed exactly is an error, raised before any data is read.

    `shapes` maps tensor names to shapes: the base checkpoint's, plus output tensors tied to a base
    tensor (`tied`: absent name -> present name, e.g. lm_head.weight -> model.embed_tokens.weight).
    `model_info()` gives transformers' view of the model (needed for `target_parameters`).
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
    _check_targets_matched(adapter, shapes, lora_modules)
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


def _check_targets_matched(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]], used: set[str]) -> None:
    """A config whose targets match base modules that have no tensors means a truncated adapter file."""
    targeted = set()
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        for candidate in (module, f"model.{module}"):
            if _targeted(adapter, candidate):
                targeted.add(module)
    untouched = sorted(m for m in targeted if m not in used and f"model.{m}" not in used and not any(u.endswith("." + m) for u in used))
    if untouched:
        raise AdapterError(
            f"{adapter.path}: adapter_config.json targets {len(untouched)} module(s) with no LoRA tensors in "
            f"{WEIGHTS_NAME} (e.g. {untouched[0]!r}); the adapter file is incomplete or from another config"
        )


def resolve_factors(adapter: Adapter, base_weights: dict[str, tuple[int, ...]]) -> dict[str, LoraFactors]:
    """Base weight name -> LoRA factors of `adapter` (the LoRA-shaped edits of `resolve_edits`)."""
    return {e.target: e.factors for e in resolve_edits(adapter, base_weights) if e.factors is not None}


def describe(adapter: Adapter) -> dict[str, Any]:
    return {
        "path": str(adapter.path),
        "weight": adapter.weight,
        "r": adapter.config.r,
        "lora_alpha": adapter.config.lora_alpha,
        "use_rslora": bool(adapter.config.use_rslora),
        "target_modules": sorted(adapter.config.target_modules) if isinstance(adapter.config.target_modules, (set, list)) else adapter.config.target_modules,
        "base_model_name_or_path": adapter.config_dict.get("base_model_name_or_path"),
    }


def dumps_config(adapter: Adapter) -> str:
    return json.dumps(adapter.config_dict, indent=2, sort_keys=True)
