"""Which modules transformers quantizes, and the ``quantization_config`` that makes it load ours.

The rule is transformers' own: the model is built on the ``meta`` device from config.json (no
memory), ``HfQuantizer.get_modules_to_not_convert`` names the modules kept in 16 bits (lm_head,
tied and fp32-kept modules, ``llm_int8_skip_modules``) and every other ``nn.Linear`` / ``Conv1D``
is replaced by a bitsandbytes layer (``replace_with_bnb_linear``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class LinearModules:
    """transformers' view of a model's linear layers."""

    quantized: frozenset[str]  # module names transformers converts to bitsandbytes layers
    conv1d: frozenset[str]  # of those, GPT-2 style Conv1D (weight stored [in, out])
    linear: frozenset[str]  # every nn.Linear / Conv1D module, converted or not


@contextlib.contextmanager
def _quiet():
    tlog = logging.getLogger("transformers")
    level = tlog.level
    tlog.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.setLevel(level)


def _meta_model(config: Mapping[str, Any]):
    import torch
    import transformers
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in CONFIG_MAPPING:
        return None
    d = {k: v for k, v in config.items() if k != "quantization_config"}
    with _quiet():
        cfg = CONFIG_MAPPING[model_type].from_dict(d)
        with torch.device("meta"):
            if archs and hasattr(transformers, archs[0]):
                return getattr(transformers, archs[0])(cfg)
            if archs:
                return None
            from transformers import AutoModelForCausalLM  # a config without `architectures`: its model type's LM

            return AutoModelForCausalLM.from_config(cfg)


def linear_modules(config: Mapping[str, Any] | None, skip_modules: Sequence[str] | None = None) -> LinearModules | None:
    """transformers' rule for this config, or None when transformers cannot build the model class."""
    if not config:
        return None
    try:
        model = _meta_model(config)
    except Exception:  # an architecture transformers cannot instantiate (remote code, old config...)
        return None
    if model is None:
        return None
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = getattr(model, "_keep_in_fp32_modules", None)
    not_convert = HfQuantizer.get_modules_to_not_convert(
        model, list(skip_modules) if skip_modules is not None else None, list(keep) if keep else None
    )
    linear, conv, quantized = set(), set(), set()
    for name, module in model.named_modules():
        if not (isinstance(module, Conv1D) or type(module) is torch.nn.Linear):
            continue
        linear.add(name)
        if should_convert_module(name, not_convert):
            quantized.add(name)
            if isinstance(module, Conv1D):
                conv.add(name)
    return LinearModules(frozenset(quantized), frozenset(conv), frozenset(linear))


def bnb4_quantization_config(
    *, quant_type: str, double_quant: bool, compute_dtype: str, quant_storage: str, skip_modules: Sequence[str]
) -> dict[str, Any]:
    """config.json's ``quantization_config`` exactly as transformers writes it for this 4-bit format."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=sorted(skip_modules),
    ).to_dict()
