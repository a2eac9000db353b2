"""adapter_config.json -> the LoRA settings a merge needs, read as PEFT reads them, without importing PEFT.

`import peft` pulls in transformers, accelerate and bitsandbytes: 3–9 s and ~220 MB in every run,
most of a small merge's time and a third of its runtime memory. PEFT stays the authority:

* A config that sets only the fields below, with values whose meaning is reproduced here, is read
  directly into `LoraSettings` (PEFT's field names, its list->set conversions, its defaults).
* Any other config (another field set to a non-default value, an unknown key, a value of a type
  PEFT would handle differently, a combination PEFT's `LoraConfig.__post_init__` rejects) goes to
  PEFT's own `LoraConfig` (`read_lora_config` falls back), so exotic options and refusals behave
  exactly as PEFT decides.
* Which modules the config targets, and which rank_pattern / alpha_pattern entry each takes, is
  decided by targets.py, our statement of PEFT's rules; it reads only config attributes, so it
  serves `LoraSettings` and PEFT's `LoraConfig` alike.

tests/test_lora_config.py holds all of this to the installed PEFT: the field table against
`LoraConfig`'s fields and defaults, and parsed values and module matches on generated configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# LoraConfig fields (peft 0.21-0.22) that do not change a merge: accepted with any value
IGNORED_FIELDS = frozenset({
    "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode", "lora_dropout",
    "megatron_core", "runtime_config", "qalora_group_size",
})
# fields understood here at their default value only (anything else: PEFT reads the config)
DEFAULT_ONLY_FIELDS: dict[str, Any] = {
    "megatron_config": None, "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
    "layer_replication": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False, "astra_config": None,
}
# fields newer than the lowest supported PEFT (0.21): version that added each (its older configs lack it)
ADDED_IN = {"astra_config": (0, 22)}
TASK_TYPES = frozenset({"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"})
_PLAIN_INIT = (True, False, "gaussian")  # initializations without a merge-time meaning or post-init rules


@dataclass
class LoraSettings:
    """The subset of `peft.LoraConfig` a merge reads, with PEFT's names, defaults and conversions."""

    peft_type: str = "LORA"
    task_type: str | None = None
    r: Any = 8
    lora_alpha: Any = 8
    target_modules: Any = None  # set[str] | str (a regex) | None
    exclude_modules: Any = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: Any = None  # int | list[int] | None
    layers_pattern: Any = None  # str | list[str] | None
    rank_pattern: Any = field(default_factory=dict)
    alpha_pattern: Any = field(default_factory=dict)
    trainable_token_indices: Any = None
    use_dora: bool = field(default=False, metadata={"is_lora_variant": True})
    lora_bias: bool = False
    target_parameters: list[str] | None = None


_MODELLED = frozenset(LoraSettings.__dataclass_fields__)
KNOWN_FIELDS = _MODELLED | IGNORED_FIELDS | frozenset(DEFAULT_ONLY_FIELDS)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def _plain_types(raw: dict[str, Any]) -> bool:
    """Values of the types this reading reproduces (PEFT keeps other JSON types as they are, where
    its matching behaves in ways not worth copying: those configs take the PEFT path)."""
    get = raw.get
    return (
        all(isinstance(get(k, False), bool) for k in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"))
        and all(get(k) is None or isinstance(get(k), str) or _str_list(get(k)) for k in ("target_modules", "exclude_modules"))
        and (get("modules_to_save") is None or _str_list(get("modules_to_save")))
        and (get("target_parameters") is None or _str_list(get("target_parameters")))
        and (get("layers_to_transform") is None or _int_list(get("layers_to_transform"))
             or (isinstance(get("layers_to_transform"), int) and not isinstance(get("layers_to_transform"), bool)))
        and (get("layers_pattern") is None or isinstance(get("layers_pattern"), str) or _str_list(get("layers_pattern")))
        and isinstance(get("bias", "none"), str)
        and all(isinstance(get(k, {}), dict) for k in ("rank_pattern", "alpha_pattern"))
    )


def fast_settings(raw: dict[str, Any]) -> LoraSettings | None:
    """`raw` read without PEFT, or None when only PEFT may read it (see the module docstring)."""
    if not set(raw) <= KNOWN_FIELDS or str(raw.get("peft_type", "LORA")) != "LORA":
        return None
    if any(k in raw and raw[k] != default for k, default in DEFAULT_ONLY_FIELDS.items()):
        return None
    if raw.get("task_type") is not None and raw.get("task_type") not in TASK_TYPES:
        return None
    init = raw.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in _PLAIN_INIT) or not _plain_types(raw):
        return None
    target = raw.get("target_modules")
    # LoraConfig.__post_init__'s refusals: let PEFT raise them with its own words
    if isinstance(target, str) and (raw.get("layers_to_transform") is not None or raw.get("layers_pattern") is not None):
        return None
    if raw.get("layers_pattern") and raw.get("layers_to_transform") is None:
        return None
    if raw.get("lora_bias") and (raw.get("use_dora") or init not in (True, False)):
        return None
    values = {k: v for k, v in raw.items() if k in _MODELLED}
    settings = LoraSettings(**values)
    if isinstance(settings.target_modules, list):
        settings.target_modules = set(settings.target_modules)
    if isinstance(settings.exclude_modules, list):
        settings.exclude_modules = set(settings.exclude_modules)
    return settings
