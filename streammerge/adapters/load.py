"""A PEFT LoRA adapter folder, read and checked: its config as PEFT reads it, its tensor headers.

Reading needs nothing of the base model, so it is apart from resolving the adapter's tensors
against the base (resolve.py): what the folder alone shows to be unmergeable (an unsupported LoRA
variant, unusable r/alpha) is refused before the base is consulted. The config is read as PEFT's
`LoraConfig` reads it (lora_config.py: directly for the fields whose semantics it reproduces, by
PEFT itself for anything else), so our reading of an adapter cannot drift from PEFT's. Only
headers are read here (check_finite reads the data).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterError, UnsupportedError
from ..formats.checkpoint import read_json, safe_member
from ..formats.safetensors import FLOAT_DTYPES, TORCH_NAME, SafetensorsFile, TensorInfo, pread_exact, read_header
from .config import fast_settings
from .targets import PatternTable, TargetRules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
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
        from .legacy import convert_bin_to_safetensors

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
