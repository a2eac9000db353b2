"""lora_config.py against the installed PEFT: same fields, same parsed values, same module matches.

The merge reads plain LoRA configs without importing PEFT (seconds and ~220 MB per run); these
tests are what keeps that reading PEFT's: a new LoraConfig field, a changed default, a changed
matching rule or a value our reading gets wrong fails here.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists as peft_check
from peft.utils.other import get_pattern_key as peft_pattern_key
from peft.utils.peft_types import TaskType

from conftest import REPO_ROOT
from streammerge.adapters import config as lc
from streammerge.adapters.targets import PatternTable, TargetRules, Targeting

MODULES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.12.mlp.down_proj",
    "model.layers.3.self_attn.k_proj", "model.layers.1.mlp.experts.0.up_proj", "transformer.h.2.attn.c_attn",
    "lm_head", "model.embed_tokens", "q_proj", "model.layers.0.self_attn.v_proj", "model.decoder.layers.1.fc1",
    "vision.blocks.4.attn.qkv", "model.layers.2.mlp.gate_proj", "model.norm",
]
NAMES = ["q_proj", "k_proj", "v_proj", "down_proj", "up_proj", "c_attn", "lm_head", "embed_tokens", "fc1", "qkv",
         "self_attn.q_proj", "mlp", "layers.1.mlp.down_proj"]
REGEXES = [r".*\.(q|v)_proj", r"model\.layers\.[01]\..*", r".*proj", r"lm_head", r"(.*\.)?up_proj"]


def _peft(raw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraConfig.from_peft_type(**raw)


def test_field_table_matches_peft():
    import peft

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    installed = tuple(int(x) for x in peft.__version__.split(".")[:2])
    newer = {n for n, since in lc.ADDED_IN.items() if installed < since}  # not in the installed PEFT yet
    assert set(fields) == lc.KNOWN_FIELDS - newer, "LoraConfig's fields changed: update adapters/config.py"
    defaults = LoraConfig()
    for name, value in lc.DEFAULT_ONLY_FIELDS.items():
        if name not in newer:
            assert getattr(defaults, name) == value, name
    ours = lc.LoraSettings()
    for f in dataclasses.fields(lc.LoraSettings):
        if f.name not in ("peft_type",):
            assert getattr(ours, f.name) == getattr(defaults, f.name), f.name
    variants = {n for n, f in fields.items() if f.metadata.get("is_lora_variant")}
    assert variants - {"use_dora"} <= set(lc.DEFAULT_ONLY_FIELDS), "a new LoRA variant: keep it on the PEFT path"
    assert "mica" in fields["init_lora_weights"].metadata.get("lora_variants", []) and "mica" not in lc._PLAIN_INIT
    assert lc.TASK_TYPES == {t.value for t in TaskType}


configs = st.fixed_dictionaries(
    {},
    optional={
        "r": st.sampled_from([1, 4, 8, 16, 0, -1, 2.0, "8", None]),
        "lora_alpha": st.sampled_from([1, 8, 16.5, 32, None, "x"]),
        "target_modules": st.one_of(st.none(), st.lists(st.sampled_from(NAMES), max_size=4), st.sampled_from(REGEXES),
                                    st.just({"a": 1}), st.just([1, 2])),
        "exclude_modules": st.one_of(st.none(), st.lists(st.sampled_from(NAMES), max_size=2), st.sampled_from(REGEXES)),
        "modules_to_save": st.one_of(st.none(), st.lists(st.sampled_from(["lm_head", "embed_tokens", "mlp"]), max_size=2)),
        "layers_to_transform": st.one_of(st.none(), st.integers(0, 3), st.lists(st.integers(0, 13), max_size=3), st.just(True)),
        "layers_pattern": st.one_of(st.none(), st.sampled_from(["layers", "h", "blocks", ""]),
                                    st.lists(st.sampled_from(["layers", "h"]), max_size=2)),
        "rank_pattern": st.one_of(st.just({}), st.dictionaries(st.sampled_from(NAMES), st.integers(1, 32), max_size=2), st.none()),
        "alpha_pattern": st.one_of(st.just({}), st.dictionaries(st.sampled_from(NAMES), st.integers(1, 64), max_size=2)),
        "use_rslora": st.sampled_from([True, False, 1]),
        "use_dora": st.booleans(),
        "lora_bias": st.booleans(),
        "fan_in_fan_out": st.booleans(),
        "bias": st.sampled_from(["none", "all", "lora_only", "weird"]),
        "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "mica", "olora", 1]),
        "task_type": st.sampled_from([None, "CAUSAL_LM", "SEQ_CLS", "nonsense"]),
        "target_parameters": st.one_of(st.none(), st.just(["mlp.experts.gate_up_proj"]), st.just("mlp.experts.down_proj")),
        "trainable_token_indices": st.one_of(st.none(), st.just([1, 2]), st.just({"embed_tokens": [0, 3]})),
        "lora_dropout": st.sampled_from([0.0, 0.1]),
        "inference_mode": st.booleans(),
        "use_qalora": st.booleans(),
        "layer_replication": st.one_of(st.none(), st.just([[0, 2]])),
        "loftq_config": st.one_of(st.just({}), st.just({"loftq_bits": 4})),
        "megatron_config": st.one_of(st.none(), st.just({"tensor_model_parallel_size": 1})),
        "ensure_weight_tying": st.booleans(),
        "some_future_field": st.just(1),
    },
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=configs)
def test_fast_reading_agrees_with_peft(raw):
    """Whatever we read ourselves, PEFT reads the same way (or we leave it to PEFT)."""
    raw = {**raw, "peft_type": "LORA"}
    ours = lc.fast_settings(dict(raw))
    try:
        theirs = _peft(dict(raw))
    except Exception:  # PEFT refuses it: so must we (by leaving it to PEFT, which raises)
        assert ours is None, raw
        return
    if ours is None:
        return
    for f in dataclasses.fields(lc.LoraSettings):
        want = getattr(theirs, f.name)
        want = want.value if hasattr(want, "value") else want  # PeftType / TaskType enums
        assert getattr(ours, f.name) == want, (f.name, raw)
    rules = TargetRules.from_config(ours)
    tables = {pattern: PatternTable.of(getattr(ours, pattern)) for pattern in ("rank_pattern", "alpha_pattern")}
    for module in MODULES:
        try:
            expected = peft_check(theirs, module)
        except Exception as exc:  # e.g. a regex PEFT cannot compile: ours must fail the same way
            with pytest.raises(type(exc)):
                rules.decide(module)
            continue
        got = rules.decide(module)
        assert bool(got) == bool(expected), (module, raw)
        assert (got is Targeting.TARGETED) == bool(expected), (module, raw)
        assert (got is Targeting.EXCLUDED) == (type(expected).__name__ == "_ExcludedModule"), (module, raw)
        for pattern in ("rank_pattern", "alpha_pattern"):
            keys = list(getattr(ours, pattern) or {})
            assert tables[pattern].key_for(module) == peft_pattern_key(keys, module)


def test_matching_port_is_peft_on_peft_configs():
    """Our target rules built from PEFT's own LoraConfig objects (the slow path) answer like PEFT."""
    cases = [
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
        dict(target_modules=["up_proj"], layers_to_transform=0),
        dict(target_modules=r".*\.(q|v)_proj", exclude_modules=["model.layers.1.self_attn.q_proj"]),
        dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"], exclude_modules=r".*layers\.0.*"),
        dict(target_modules=None, target_parameters=["mlp.experts.gate_up_proj"]),
    ]
    for kw in cases:
        config = _peft({"peft_type": "LORA", **kw})
        rules = TargetRules.from_config(config)
        for module in MODULES:
            got, expected = rules.decide(module), peft_check(config, module)
            assert bool(got) == bool(expected), (kw, module)
            assert (got is Targeting.EXCLUDED) == (type(expected).__name__ == "_ExcludedModule"), (kw, module)


def test_plain_merge_does_not_import_peft(llama_case, tmp_path):
    code = (
        "import sys, streammerge; "
        f"streammerge.merge({str(llama_case.base_path)!r}, [{str(llama_case.adapter_path)!r}], {str(tmp_path / 'out')!r}); "
        "heavy = [m for m in ('peft', 'transformers', 'accelerate', 'bitsandbytes') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO_ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_exotic_config_still_goes_through_peft(llama_case, tmp_path):
    """A field we do not model (here layer_replication) is PEFT's to read, and our refusal still applies."""
    import json
    import shutil

    from streammerge.adapters.load import load_adapter
    from streammerge.errors import UnsupportedError

    lora = tmp_path / "lora"
    shutil.copytree(llama_case.adapter_path, lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    assert lc.fast_settings(config | {"peft_type": "LORA"}) is not None
    config["layer_replication"] = [[0, 1]]
    (lora / "adapter_config.json").write_text(json.dumps(config))
    assert lc.fast_settings(config) is None
    with pytest.raises(UnsupportedError, match="layer_replication"):
        load_adapter(lora)
