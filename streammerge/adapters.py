"""A PEFT LoRA adapter folder -> per-module LoRA factors (A, B, scale), resolved with PEFT's own rules.

The config is parsed by PEFT's `LoraConfig`, targets are matched with PEFT's
`check_target_module_exists`, and rank/alpha patterns with PEFT's `get_pattern_key`, so our
reading of an adapter cannot drift from PEFT's. Only headers are read here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterError, UnsupportedError
from .io.checkpoint import read_json, safe_member
from .io.safetensors import FLOAT_DTYPES, TORCH_NAME, SafetensorsFile, TensorInfo, pread_exact, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One targeted module: `delta = scale * B @ A` (transposed when `fan_in_fan_out`)."""

    module: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool


@dataclass
class Adapter:
    path: Path
    weight: float
    config: Any  # peft.LoraConfig
    config_dict: dict[str, Any]
    weights_file: Path
    header: SafetensorsFile
    factors: dict[str, LoraFactors] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path) if self.weight == 1.0 else f"{self.path}@{self.weight:g}"

    def file_digests(self) -> dict[str, str]:
        """sha256 of the adapter's files: they are small, and they fingerprint what was merged."""
        out = {}
        for f in (self.path / CONFIG_NAME, self.weights_file):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[f.name] = h.hexdigest()
        return out


def _load_lora_config(path: Path, raw: dict[str, Any]):
    from peft import LoraConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoraConfig.from_peft_type(**raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{path / CONFIG_NAME}: PEFT cannot read this LoRA config ({exc})") from None


def _refuse_unsupported(path: Path, config: Any) -> None:
    """Features whose merge is not implemented yet: refuse before any work instead of merging wrongly."""
    checks = [
        (getattr(config, "use_dora", False), "use_dora (DoRA)"),
        (getattr(config, "lora_bias", False), "lora_bias"),
        (getattr(config, "layer_replication", None), "layer_replication"),
        (getattr(config, "target_parameters", None), "target_parameters (MoE expert LoRA)"),
        (getattr(config, "trainable_token_indices", None), "trainable_token_indices"),
        (getattr(config, "alora_invocation_tokens", None), "alora_invocation_tokens (activated LoRA cannot be merged)"),
        (getattr(config, "use_qalora", False), "use_qalora"),
        (getattr(config, "kasa_config", None), "kasa_config (KaSA changes the base weight)"),
        (getattr(config, "use_bdlora", None), "use_bdlora (block-diagonal LoRA)"),
        (getattr(config, "arrow_config", None), "arrow_config (routed LoRA cannot be merged)"),
        (getattr(config, "monteclora_config", None), "monteclora_config"),
        (getattr(config, "bias", "none") not in ("none", None), f"bias={getattr(config, 'bias', None)!r}"),
    ]
    for active, feature in checks:
        if active:
            raise UnsupportedError(f"{path}: adapter option {feature} is not supported yet; nothing was written")


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
    """Read and check an adapter folder's config and tensor headers (no tensor data)."""
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
        raise UnsupportedError(f"{path}: peft_type {peft_type} is not supported (only LORA adapters can be merged)")
    raw = {k: v for k, v in raw.items() if k != "runtime_config"}
    raw["peft_type"] = "LORA"
    config = _load_lora_config(path, raw)
    _refuse_unsupported(path, config)
    _check_values(path, config)

    weights_file = safe_member(path, WEIGHTS_NAME, str(path))
    if not weights_file.is_file():
        if (path / LEGACY_WEIGHTS_NAME).is_file():
            read_legacy_bin(safe_member(path, LEGACY_WEIGHTS_NAME, str(path)))  # a hostile pickle is refused first
            raise UnsupportedError(
                f"{path}: only {LEGACY_WEIGHTS_NAME} was found; legacy .bin adapters are not supported yet, "
                "re-save the adapter with safetensors"
            )
        raise AdapterError(f"{path}: {WEIGHTS_NAME} not found; the adapter folder is incomplete")
    header = read_header(weights_file)
    return Adapter(path=path, weight=weight, config=config, config_dict=raw, weights_file=weights_file, header=header)


def read_legacy_bin(path: str | Path) -> dict[str, Any]:
    """Tensors of a legacy `adapter_model.bin`, read only with torch's restricted unpickler.

    `weights_only=True` builds tensors and plain containers and nothing else, so a pickle that would
    run code is refused, never executed; any failure becomes an AdapterError naming the file.
    """
    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: our answer is the error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, OSError, ... from a hostile or broken file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        detail = ([line for line in lines if not line.startswith(boilerplate)] or lines or [type(exc).__name__])[0]
        raise AdapterError(
            f"{path}: refused by torch.load(weights_only=True) ({detail[:200]}); it is corrupt or holds more "
            "than tensors: re-save the adapter with safetensors from a source you trust"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapterError(
            f"{path}: expected a mapping of tensor names to tensors, found {type(state).__name__}; "
            "re-save the adapter with safetensors"
        )
    return state


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


def resolve_factors(adapter: Adapter, base_weights: dict[str, tuple[int, ...]]) -> dict[str, LoraFactors]:
    """Pair every adapter tensor with the base weight it modifies; anything unusable is an error.

    `base_weights` maps base tensor names to shapes. Returns a map base weight name -> factors.
    """
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    config = adapter.config
    pairs: dict[str, dict[str, TensorInfo]] = {}
    unknown: list[str] = []
    for key, info in adapter.header.tensors.items():
        parsed = module_of_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        pairs.setdefault(parsed[0], {})[parsed[1]] = info
    if unknown:
        raise UnsupportedError(
            f"{adapter.weights_file}: {len(unknown)} tensor(s) are not plain LoRA A/B weights and cannot be merged "
            f"yet (e.g. {unknown[0]!r}); nothing was written"
        )
    if not pairs:
        raise AdapterError(f"{adapter.weights_file}: the adapter holds no LoRA tensors")

    factors: dict[str, LoraFactors] = {}
    for module, kinds in sorted(pairs.items()):
        if set(kinds) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(kinds)).pop()
            raise AdapterError(f"{adapter.weights_file}: module {module!r} has no {missing} tensor; the adapter is incomplete")
        target = _base_weight_name(module, base_weights)
        if target is None:
            raise AdapterError(
                f"{adapter.path}: LoRA module {module!r} has no weight in the base checkpoint "
                f"(expected {module}.weight); is this adapter for another model?"
            )
        matched = check_target_module_exists(config, module)
        if not matched or type(matched).__name__ == "_ExcludedModule":
            raise AdapterError(
                f"{adapter.path}: the adapter has tensors for {module!r} but adapter_config.json does not target it "
                "(PEFT would silently ignore them); fix target_modules or the adapter file"
            )
        a, b = kinds["lora_A"], kinds["lora_B"]
        r_key = get_pattern_key(list(config.rank_pattern or {}), module)
        alpha_key = get_pattern_key(list(config.alpha_pattern or {}), module)
        rank = (config.rank_pattern or {}).get(r_key, config.r)
        alpha = (config.alpha_pattern or {}).get(alpha_key, config.lora_alpha)
        _check_shapes(adapter, module, a, b, rank, base_weights[target], bool(config.fan_in_fan_out))
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        factors[target] = LoraFactors(module, a, b, rank, float(alpha), float(scale), bool(config.fan_in_fan_out))

    _check_targets_matched(adapter, base_weights, {f.module for f in factors.values()})
    return factors


def _base_weight_name(module: str, base_weights: dict[str, tuple[int, ...]]) -> str | None:
    """The base tensor a module's LoRA applies to; tolerates checkpoints saved without the top prefix."""
    candidates = [f"{module}.weight"]
    head, _, rest = module.partition(".")
    if rest:
        candidates.append(f"{rest}.weight")
    for name in candidates:
        if name in base_weights:
            return name
    return None


def _check_shapes(adapter: Adapter, module: str, a: TensorInfo, b: TensorInfo, rank: int, w: tuple[int, ...], fan_in_fan_out: bool) -> None:
    where = f"{adapter.weights_file}: module {module!r}"
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise UnsupportedError(f"{where}: LoRA factors of shape {list(a.shape)}/{list(b.shape)} (conv or other layers) are not supported yet")
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"{where}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}; the adapter is corrupt")
    if a.shape[0] != rank:
        raise AdapterError(
            f"{where}: tensors have rank {a.shape[0]} but adapter_config.json says r={rank} for it; "
            "the config does not belong to these weights"
        )
    if len(w) != 2:
        raise UnsupportedError(f"{where}: base weight has shape {list(w)}; only 2-D (Linear) weights are supported yet")
    out_features, in_features = (w[1], w[0]) if fan_in_fan_out else (w[0], w[1])
    if b.shape[0] != out_features or a.shape[1] != in_features:
        hint = " (a GPT-2 Conv1D weight needs fan_in_fan_out=true)" if (b.shape[0], a.shape[1]) == (w[1], w[0]) else ""
        raise AdapterError(
            f"{where}: delta B@A is {b.shape[0]}x{a.shape[1]} but the base weight is {w[0]}x{w[1]}{hint}; "
            "is this adapter for another model?"
        )


def _check_targets_matched(adapter: Adapter, base_weights: dict[str, tuple[int, ...]], used: set[str]) -> None:
    """A config whose targets match base modules that have no tensors means a truncated adapter file."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = adapter.config
    targeted = set()
    for name, shape in base_weights.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        for candidate in (module, f"model.{module}"):
            hit = check_target_module_exists(config, candidate)
            if hit and type(hit).__name__ != "_ExcludedModule":
                targeted.add(module)
    untouched = sorted(m for m in targeted if m not in used and f"model.{m}" not in used and not any(u.endswith("." + m) for u in used))
    if untouched:
        raise AdapterError(
            f"{adapter.path}: adapter_config.json targets {len(untouched)} module(s) with no LoRA tensors in "
            f"{WEIGHTS_NAME} (e.g. {untouched[0]!r}); the adapter file is incomplete or from another config"
        )


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
