"""Adapter formats and the rules around them: legacy adapter_model.bin, --method lora, several
adapters in one pass, refused features (nothing written), plan coverage, the no-op warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_safetensors_dir

import streammerge
from streammerge.cli import main
from streammerge.errors import UnsupportedError


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the command line in-process (exactly what `streammerge ARGS` runs)."""
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_refused(rc: int, err: str, *words: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("error:"), f"stderr was: {err!r}"
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not named in {lines[0]!r}"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"{out} holds {sorted(p.name for p in out.iterdir())}"


def copy_adapter(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("peft-merged"))
    if config_changes:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config_changes)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


# ------------------------------------------------------------------------------- legacy .bin


def test_legacy_bin_merges_like_safetensors(make_base, make_adapter, tmp_path):
    base = make_base("qwen2")
    kw = dict(target_modules=["q_proj", "v_proj"], lora_bias=True, perturb=True, seed=3)
    st = make_adapter(base, **kw)
    binary = make_adapter(base, save_kwargs={"safe_serialization": False}, **kw)
    assert (binary.adapter_path / "adapter_model.bin").is_file()
    assert not (binary.adapter_path / "adapter_model.safetensors").exists()
    a = tmp_path / "from-st"
    b = tmp_path / "from-bin"
    streammerge.merge(str(base), [str(st.adapter_path)], str(a), device="cpu")
    streammerge.merge(str(base), [str(binary.adapter_path)], str(b), device="cpu")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ours = load_safetensors_dir(b)
    bad = [k for k in ours if not torch.equal(ours[k], binary.merged_state_dict[k])]
    assert not bad, bad[:3]
    record = json.loads((b / "streammerge.json").read_text())
    assert "adapter_model.bin" in record["adapters"][0]["files"]


class _Payload:
    """A pickle that would create a file if it were ever unpickled with weights_only=False."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_legacy_bin_with_pickled_objects_refused(llama_case, tmp_path, capsys):
    adapter = copy_adapter(llama_case.adapter_path, tmp_path / "evil")
    state = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    payload = _Payload()
    payload.marker = str(tmp_path / "executed")
    torch.save({**state, "extra": payload}, adapter / "adapter_model.bin")
    out = tmp_path / "out"
    for cmd in (["plan", llama_case.base_path, adapter], ["merge", llama_case.base_path, adapter, "--out", out]):
        rc, _, err = cli(capsys, *cmd)
        assert_refused(rc, err, "weights_only")
    assert not (tmp_path / "executed").exists(), "the pickle was executed"
    assert_nothing_written(out)


# ------------------------------------------------------------------------------ --method lora


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_method_lora_writes_the_adapter(fmt, make_base, make_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_base("llama")
    save = {"safe_serialization": False} if fmt == "bin" else {}
    case = make_adapter(base, target_modules=["q_proj", "down_proj"], save_kwargs=save, seed=5)
    out = tmp_path / "lora-out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), method="lora", device="cpu")
    if fmt == "bin":
        tensors = torch.load(case.adapter_path / "adapter_model.bin", weights_only=True)
    else:
        tensors = load_file(str(case.adapter_path / "adapter_model.safetensors"))
    expected = tmp_path / "expected.safetensors"
    save_file(tensors, str(expected), metadata={"format": "pt"})
    assert (out / "adapter_model.safetensors").read_bytes() == expected.read_bytes()
    assert (out / "adapter_config.json").read_bytes() == (case.adapter_path / "adapter_config.json").read_bytes()
    assert (out / "README.md").is_file() and (out / "streammerge.json").is_file()
    assert not list(out.glob("model*.safetensors")) and not (out / "config.json").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=case.input_ids).logits
    torch.testing.assert_close(logits, case.peft_logits, atol=0, rtol=0)


def test_method_lora_refuses_several_adapters(llama_case, make_adapter, tmp_path, capsys):
    other = make_adapter(llama_case.base_path, seed=7, target_modules=["q_proj"])
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "merge", llama_case.base_path, llama_case.adapter_path, other.adapter_path,
                     "--method", "lora", "--out", out)
    assert_refused(rc, err, "--method lora", "2")
    rc, _, err = cli(capsys, "merge", llama_case.base_path, f"{llama_case.adapter_path}@0.5", "--method", "lora", "--out", out)
    assert_refused(rc, err, "--method lora", "weight")
    assert_nothing_written(out)


# ------------------------------------------------------------------------- several adapters


def test_several_adapters_compose(make_base, make_adapter, tmp_path):
    """W' = W + Σ wᵢ·Δᵢ with Δᵢ PEFT's own get_delta_weight(); biases: b + s·lora_B.bias; adapters
    target different modules and ranks. (Weights are powers of two, so the float32 reference
    `W + Δ1 + 0.5·Δ2` is exact, and the comparison bitwise.)"""
    base = make_base("qwen2")
    one = make_adapter(base, target_modules=["q_proj", "k_proj"], lora_bias=True, perturb=True, seed=11)
    two = make_adapter(base, target_modules=["q_proj", "o_proj", "down_proj"], r=2, lora_alpha=6, seed=12)
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(one.adapter_path), f"{two.adapter_path}@0.5"], str(out), device="cpu")
    ours = load_safetensors_dir(out)
    names = set(one.deltas) | set(two.deltas)
    assert set(one.deltas) & set(two.deltas) and set(two.deltas) - set(one.deltas)
    for name in names:
        want = one.base_state_dict[name].clone()
        if name in one.deltas:
            want += one.deltas[name]
        if name in two.deltas:
            want += 0.5 * two.deltas[name]
        assert torch.equal(ours[name], want), name
    biases = [k for k in ours if k.endswith("_proj.bias")]
    for name in biases:  # only adapter one has lora biases: PEFT's merged bias
        assert torch.equal(ours[name], one.merged_state_dict[name]), name
    assert any(not torch.equal(ours[k], one.base_state_dict[k]) for k in biases)


def test_dora_does_not_compose(make_base, make_adapter, tmp_path):
    base = make_base("llama")
    dora = make_adapter(base, target_modules=["q_proj"], use_dora=True, perturb=True)
    plain = make_adapter(base, target_modules=["q_proj", "v_proj"], seed=9)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match="DoRA"):
        streammerge.merge(str(base), [str(dora.adapter_path), str(plain.adapter_path)], str(out), device="cpu")
    with pytest.raises(UnsupportedError, match="weight"):
        streammerge.merge(str(base), [f"{dora.adapter_path}@0.5"], str(out), device="cpu")
    assert_nothing_written(out)


def test_full_tensor_from_two_adapters_refused(make_base, make_adapter, tmp_path):
    base = make_base("llama")
    a = make_adapter(base, target_modules=["q_proj"], modules_to_save=["lm_head"], perturb=True, seed=21)
    b = make_adapter(base, target_modules=["v_proj"], modules_to_save=["lm_head"], perturb=True, seed=22)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError, match="lm_head.weight"):
        streammerge.merge(str(base), [str(a.adapter_path), str(b.adapter_path)], str(out), device="cpu")
    assert_nothing_written(out)


def test_trainable_tokens_from_two_adapters(make_base, make_adapter, tmp_path):
    base = make_base("llama")
    a = make_adapter(base, target_modules=["q_proj"], trainable_token_indices=[5, 9], perturb=True, seed=31)
    b = make_adapter(base, target_modules=["v_proj"], trainable_token_indices=[7], perturb=True, seed=32)
    c = make_adapter(base, target_modules=["v_proj"], trainable_token_indices=[9], perturb=True, seed=33)
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(a.adapter_path), str(b.adapter_path)], str(out), device="cpu")
    emb = load_safetensors_dir(out)["model.embed_tokens.weight"]
    for case, rows in ((a, [5, 9]), (b, [7])):
        assert torch.equal(emb[rows], case.merged_state_dict["model.embed_tokens.weight"][rows])
    with pytest.raises(UnsupportedError, match="same token rows"):
        streammerge.plan(str(base), [str(a.adapter_path), str(c.adapter_path)])


# --------------------------------------------------------------------------- refused features


def _peft_adapter(base: Path, out: Path, config) -> Path:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def _conv_case(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint with a grouped Conv2d (8 -> 8 channels, groups=4) and a LoRA for it."""
    base, adapter = tmp_path / "conv-base", tmp_path / "conv-lora"
    base.mkdir()
    adapter.mkdir()
    save_file({"conv.weight": torch.randn(8, 2, 3, 3)}, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text("{}")
    save_file({"base_model.model.conv.lora_A.weight": torch.randn(4, 2, 3, 3),
               "base_model.model.conv.lora_B.weight": torch.randn(8, 4, 1, 1)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["conv"]}))
    return base, adapter


REFUSED = ["loha", "lokr", "vera", "layer_replication", "alora", "unknown_tensor", "conv_groups"]
NAMED = {"loha": "LOHA", "lokr": "LOKR", "vera": "VERA", "layer_replication": "layer_replication",
         "alora": "alora_invocation_tokens", "unknown_tensor": "mystery_scale", "conv_groups": "convolution"}


@pytest.mark.parametrize("feature", REFUSED)
def test_unsupported_refused_and_nothing_written(feature, llama_case, tmp_path, capsys):
    from peft import LoHaConfig, LoKrConfig, VeraConfig

    base = llama_case.base_path
    adapter = tmp_path / "adapter"
    if feature in ("loha", "lokr", "vera"):
        cls = {"loha": LoHaConfig, "lokr": LoKrConfig, "vera": VeraConfig}[feature]
        _peft_adapter(base, adapter, cls(target_modules=["q_proj"], r=4))
    elif feature == "layer_replication":
        copy_adapter(llama_case.adapter_path, adapter, layer_replication=[[0, 2], [1, 2]])
    elif feature == "alora":
        copy_adapter(llama_case.adapter_path, adapter, alora_invocation_tokens=[5, 6])
    elif feature == "unknown_tensor":
        copy_adapter(llama_case.adapter_path, adapter)
        state = load_file(str(adapter / "adapter_model.safetensors"))
        state["base_model.model.model.layers.0.mlp.gate_proj.mystery_scale"] = torch.ones(4)
        save_file(state, str(adapter / "adapter_model.safetensors"))
    else:
        base, adapter = _conv_case(tmp_path)
    out = tmp_path / "out"
    for cmd in (["plan", base, adapter], ["merge", base, adapter, "--out", out, "--device", "cpu"]):
        rc, stdout, err = cli(capsys, *cmd)
        assert_refused(rc, err, NAMED[feature])
        assert not stdout.strip()
    assert_nothing_written(out)


def test_resized_vocabulary_refused(llama_case, tmp_path, capsys):
    """An adapter trained after resize_token_embeddings carries a differently shaped embedding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_case.base_path), dtype=torch.float32)
    model.resize_token_embeddings(176)
    adapter = tmp_path / "resized"
    get_peft_model(model, LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4)).save_pretrained(str(adapter))
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "merge", llama_case.base_path, adapter, "--out", out)
    assert_refused(rc, err, "resized", "embed_tokens")
    assert_nothing_written(out)


# ------------------------------------------------------------------------ coverage and no-op


def test_plan_reports_coverage(make_base, make_adapter, capsys):
    base = make_base("qwen2")
    case = make_adapter(base, target_modules=["q_proj", "k_proj"], lora_bias=True, modules_to_save=["norm"], perturb=True)
    keys = list(load_file(str(case.adapter_path / "adapter_model.safetensors")))
    n_keys = len(keys)
    # the norms PEFT saved whole: "norm" is every layer's norm in peft 0.21, only model.norm from 0.22 on
    saved = sum(1 for k in keys if "lora_" not in k)
    rc, out, err = cli(capsys, "plan", base, case.adapter_path)
    assert rc == 0, err
    lines = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in out.splitlines() if ":" in l}
    assert lines["coverage"] == f"{n_keys}/{n_keys} adapter tensors used"
    ops = dict(item.rsplit(" ", 1) for item in lines["ops"].split(", "))
    # 2 layers x (q, k): 4 merged weights + 4 lora biases; each saved norm replaced
    assert saved in (1, 5) and ops["merge"] == "4" and ops["bias_add"] == "4" and ops["replace"] == str(saved), ops
    rc, out, _ = cli(capsys, "plan", base, case.adapter_path, "--json")
    coverage = json.loads(out)["coverage"]
    assert coverage["used"] == coverage["adapter_tensors"] == n_keys
    assert coverage["ops"]["bias_add"] == 4 and coverage["terms"] == {"lora": 4, "bias": 4}


def test_plan_json_round_trip_every_kind(make_base, make_adapter):
    """The plan (terms of every kind, untied copy) survives JSON: what `plan --json` prints is complete."""
    from streammerge.planning.types import MergePlan

    base = make_base("qwen2")
    a = make_adapter(base, target_modules=["q_proj"], lora_bias=True, modules_to_save=["norm"],
                     trainable_token_indices=[4, 8], perturb=True, seed=41)
    b = make_adapter(base, target_modules=["v_proj"], use_dora=True, perturb=True, seed=42)
    plan = streammerge.plan(str(base), [str(a.adapter_path), str(b.adapter_path)])
    assert set(plan.term_counts()) == {"lora", "bias", "token_rows", "dora"}
    assert {"replace", "bias_add", "token_rows", "merge"} <= set(plan.counts())
    assert plan.untied == (("lm_head.weight", "model.embed_tokens.weight"),)
    assert MergePlan.from_dict(json.loads(plan.to_json())) == plan


def test_no_op_adapter_warns(llama_case, tmp_path, capsys):
    from peft import LoraConfig

    untrained = _peft_adapter(llama_case.base_path, tmp_path / "untrained", LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    assert not load_file(str(untrained / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].any()
    rc, _, err = cli(capsys, "plan", llama_case.base_path, untrained)
    assert rc == 0 and err.startswith("warning:") and "exactly zero" in err, err
    rc, _, err = cli(capsys, "merge", llama_case.base_path, untrained, "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    assert rc == 0 and "warning:" in err and "exactly zero" in err, err
    rc, _, err = cli(capsys, "plan", llama_case.base_path, llama_case.adapter_path)
    assert rc == 0 and "warning" not in err.lower(), err
