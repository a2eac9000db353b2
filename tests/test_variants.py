"""Every PEFT LoRA variant, merged as PEFT merges it: DoRA, embedding LoRA, lm_head LoRA, lora_bias,
saved biases, modules_to_save, trainable tokens, tied embeddings.

Oracle: PEFT's own `merge_and_unload` on float32 models (tests/models.py), compared bit for bit,
and the logits of `from_pretrained(our output)`. The fixtures perturb every trained tensor that is
not a LoRA factor (`perturb=True`), and each test checks that the feature under test changes the
result (so a merge that ignored it would fail).

Tied embeddings are the one place where the oracle is PEFT's adapter forward (the unmerged
PeftModel) instead of `merge_and_unload`: PEFT merges an embed_tokens/lm_head delta into the one
shared tensor, so the merged model stops computing what the adapter computed (shown below).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import bitwise_fraction, load_safetensors_dir

import streammerge


def do_merge(base, adapters, out, **kw) -> Path:
    kw.setdefault("device", "cpu")
    streammerge.merge(str(base), [str(a) for a in adapters], str(out), **kw)
    return Path(out)


def assert_all_bitwise(ours: dict, ref: dict, names=None, what="PEFT merge_and_unload"):
    names = sorted(ref) if names is None else sorted(names)
    bad = [n for n in names if ours[n].dtype != ref[n].dtype or not torch.equal(ours[n], ref[n])]
    assert not bad, (
        f"{len(bad)} tensor(s) differ from {what}: "
        + ", ".join(f"{n} ({bitwise_fraction(ours[n], ref[n].to(ours[n].dtype)) * 100:.2f}% bitwise)" for n in bad[:4])
    )


def logits_of(folder, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Logits of two float32 models whose weights agree but whose forward differs in order of
    operations (merged weight vs. LoRA branch): float32 noise relative to the logits' scale."""
    torch.testing.assert_close(ours, ref, atol=2e-5 * max(1.0, float(ref.abs().max())), rtol=1e-5)


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


def plain_merge(case, name) -> torch.Tensor:
    """What the tensor would be without the variant: W + PEFT's delta (f32)."""
    return case.base_state_dict[name] + case.deltas[name]


# ------------------------------------------------------------------------------------------ DoRA

DORA_CASES = {
    # per-output-row norms, weight [out, in]
    "llama-rows": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), 5),
    # GPT-2 Conv1D, weight [in, out]: norms down the columns -> two passes over the rows
    "gpt2-columns": ("gpt2", dict(target_modules=["c_attn", "c_fc", "c_proj"], use_dora=True), 3),
    # embedding [vocab, dim]: norms over the vocabulary, per embedding dimension
    "llama-embedding": ("llama", dict(target_modules=["embed_tokens", "o_proj"], use_dora=True), 7),
    # phi3's fused qkv_proj / gate_up_proj: row norms over the fused output rows
    "phi3-fused": ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj"], use_dora=True), 6),
}


@pytest.mark.parametrize("variant", list(DORA_CASES))
def test_dora_matches_peft_bitwise(variant, make_base, make_adapter, tmp_path):
    arch, kw, chunk = DORA_CASES[variant]
    case = make_adapter(make_base(arch), perturb=True, **kw)
    peft = case.merged_state_dict
    dora_names = sorted(case.deltas)
    assert dora_names
    for name in dora_names:  # fixture: the DoRA rescaling changes the weight
        assert changed(peft[name], plain_merge(case, name)), f"fixture error: DoRA is a no-op on {name}"
    whole = do_merge(case.base_path, [case.adapter_path], tmp_path / "whole")
    chunked = do_merge(case.base_path, [case.adapter_path], tmp_path / "chunked", max_chunk_rows=chunk)
    for out in (whole, chunked):
        ours = load_safetensors_dir(out)
        assert_all_bitwise(ours, {k: v for k, v in peft.items() if k in ours})
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()
    plan = streammerge.plan(str(case.base_path), [str(case.adapter_path)])
    assert plan.term_counts().get("dora") == len(dora_names)
    torch.testing.assert_close(logits_of(whole, case.input_ids), case.ref_logits, atol=0, rtol=0)
    assert_logits_close(logits_of(whole, case.input_ids), case.peft_logits)


def test_dora_bf16_base_rounded_once(make_base, make_adapter, tmp_path):
    """bf16 base: DoRA computed in float32 from the exact upcast weights and rounded once, i.e.
    PEFT's float32 merge (on the upcast model) cast to bf16, bit for bit."""
    base = make_base("gpt2", dtype=torch.bfloat16)
    case = make_adapter(base, target_modules=["c_attn", "c_proj"], use_dora=True, perturb=True, seed=4)
    out = do_merge(base, [case.adapter_path], tmp_path / "out", max_chunk_rows=4)
    ours = load_safetensors_dir(out)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert_all_bitwise(ours, {k: v.to(torch.bfloat16) for k, v in case.merged_state_dict.items() if k in ours})


# ------------------------------------------------------------------------- embedding / lm_head LoRA


def test_embedding_and_lm_head_lora(make_base, make_adapter, tmp_path):
    """llama (untied): LoRA on embed_tokens ([r, vocab] x [dim, r], transposed delta), on lm_head,
    and on q_proj; PEFT also saves both embedding layers in full (`*.base_layer.weight`)."""
    case = make_adapter(make_base("llama"), target_modules=["embed_tokens", "lm_head", "q_proj"])
    keys = _adapter_keys(case.adapter_path)
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.lm_head.base_layer.weight"} <= keys
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert changed(case.merged_state_dict[name], case.base_state_dict[name])
    out = do_merge(case.base_path, [case.adapter_path], tmp_path / "out", max_chunk_rows=9)
    ours = load_safetensors_dir(out)
    assert set(ours) == set(load_safetensors_dir(case.base_path))
    assert_all_bitwise(ours, {k: v for k, v in case.merged_state_dict.items() if k in ours})
    plan = streammerge.plan(str(case.base_path), [str(case.adapter_path)])
    assert plan.term_counts() == {"embedding": 1, "lora": 3}  # lm_head + q_proj of 2 layers
    assert plan.coverage()["used"] == plan.coverage()["adapter_tensors"] == len(keys)
    torch.testing.assert_close(logits_of(out, case.input_ids), case.ref_logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------- biases


def test_lora_bias(make_base, make_adapter, tmp_path):
    """lora_bias=True: bias' = bias + scale * lora_B.bias (qwen2 q/k/v have biases)."""
    case = make_adapter(make_base("qwen2"), target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True, perturb=True)
    biases = [k for k in case.merged_state_dict if k.endswith("_proj.bias")]
    assert len(biases) == 6
    for name in biases:
        assert changed(case.merged_state_dict[name], case.base_state_dict[name]), f"fixture error: {name} unchanged"
    out = do_merge(case.base_path, [case.adapter_path], tmp_path / "out")
    ours = load_safetensors_dir(out)
    assert_all_bitwise(ours, {k: v for k, v in case.merged_state_dict.items() if k in ours})
    assert streammerge.plan(str(case.base_path), [str(case.adapter_path)]).counts()["bias_add"] == 6
    assert_logits_close(logits_of(out, case.input_ids), case.peft_logits)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_saved_biases_replace_base(bias, make_base, make_adapter, tmp_path):
    """bias='all' / 'lora_only': the adapter saves trained biases; they replace the base ones."""
    case = make_adapter(make_base("qwen2"), target_modules=["q_proj"], bias=bias, perturb=True)
    replaced = [k for k in case.merged_state_dict if k.endswith(".bias") and changed(case.merged_state_dict[k], case.base_state_dict[k])]
    assert len(replaced) == (6 if bias == "all" else 2), replaced
    out = do_merge(case.base_path, [case.adapter_path], tmp_path / "out")
    ours = load_safetensors_dir(out)
    assert_all_bitwise(ours, {k: v for k, v in case.merged_state_dict.items() if k in ours})
    assert streammerge.plan(str(case.base_path), [str(case.adapter_path)]).counts()["replace"] == len(replaced)


# ---------------------------------------------------------------------- modules_to_save, tokens


def test_modules_to_save(make_base, make_adapter, tmp_path):
    case = make_adapter(make_base("llama"), target_modules=["q_proj"], modules_to_save=["lm_head", "norm"], perturb=True)
    replaced = [k for k in case.merged_state_dict if "proj" not in k and changed(case.merged_state_dict[k], case.base_state_dict[k])]
    assert "lm_head.weight" in replaced and "model.norm.weight" in replaced
    out = do_merge(case.base_path, [case.adapter_path], tmp_path / "out", max_chunk_rows=11)
    ours = load_safetensors_dir(out)
    assert_all_bitwise(ours, {k: v for k, v in case.merged_state_dict.items() if k in ours})
    assert_logits_close(logits_of(out, case.input_ids), case.peft_logits)


def test_trainable_tokens(make_base, make_adapter, tmp_path):
    """Rows of embed_tokens are replaced (not added) by the saved token rows."""
    case = make_adapter(make_base("llama"), target_modules=["q_proj"], trainable_token_indices=[5, 77, 150], perturb=True)
    emb = "model.embed_tokens.weight"
    rows = (case.merged_state_dict[emb] != case.base_state_dict[emb]).any(dim=1).nonzero().flatten().tolist()
    assert rows == [5, 77, 150]
    out = do_merge(case.base_path, [case.adapter_path], tmp_path / "out", max_chunk_rows=13)
    ours = load_safetensors_dir(out)
    assert_all_bitwise(ours, {k: v for k, v in case.merged_state_dict.items() if k in ours})
    assert streammerge.plan(str(case.base_path), [str(case.adapter_path)]).counts()["token_rows"] == 1


# ----------------------------------------------------------------------------- tied embeddings

TIED_CASES = {
    "embed": dict(target_modules=["embed_tokens", "q_proj"]),
    "lm_head": dict(target_modules=["lm_head"]),
    "both": dict(target_modules=["embed_tokens", "lm_head"]),
    "ensure_weight_tying": dict(target_modules=["embed_tokens"], ensure_weight_tying=True),
}


@pytest.mark.parametrize("variant", list(TIED_CASES))
def test_tied_embeddings_written_untied(variant, make_base, make_adapter, tmp_path):
    """qwen2 ties lm_head to embed_tokens (no lm_head.weight on disk). The merged folder holds both,
    each with exactly its own changes (W + PEFT's delta for that module), and config.json unties
    them, so from_pretrained computes what PEFT's adapter computes."""
    base = make_base("qwen2")
    case = make_adapter(base, **TIED_CASES[variant])
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    W = case.base_state_dict[emb]
    want = {emb: W + case.deltas[emb] if emb in case.deltas else W, head: W + case.deltas[head] if head in case.deltas else W}
    # why the oracle is the adapter's forward: PEFT's merge_and_unload changes the logits here
    assert (case.ref_logits - case.peft_logits).abs().max() > 1e-2
    out = do_merge(base, [case.adapter_path], tmp_path / "out", max_chunk_rows=17)
    ours = load_safetensors_dir(out)
    assert head in ours and head not in load_safetensors_dir(base)
    assert_all_bitwise(ours, want, what="W + PEFT delta of each module")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    logits = logits_of(out, case.input_ids)
    assert_logits_close(logits, case.peft_logits)


def test_tied_trainable_tokens_on_both(make_base, make_adapter, tmp_path):
    """PEFT ties a token adapter to lm_head too: the rows are replaced in both tensors."""
    base = make_base("qwen2")
    case = make_adapter(base, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [6, 99]}, perturb=True)
    out = do_merge(base, [case.adapter_path], tmp_path / "out")
    ours = load_safetensors_dir(out)
    assert_all_bitwise(ours, {k: v for k, v in case.merged_state_dict.items() if k in ours})  # PEFT agrees here
    assert torch.equal(ours["lm_head.weight"][[6, 99]], case.merged_state_dict["lm_head.weight"][[6, 99]])
    assert changed(ours["lm_head.weight"], case.base_state_dict["lm_head.weight"])
    assert_logits_close(logits_of(out, case.input_ids), case.peft_logits)


def test_tie_kept_when_untouched(qwen2_case, tmp_path):
    out = do_merge(qwen2_case.base_path, [qwen2_case.adapter_path], tmp_path / "out")
    assert "lm_head.weight" not in load_safetensors_dir(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert (out / "model.safetensors").stat().st_size == (qwen2_case.base_path / "model.safetensors").stat().st_size


def _adapter_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())
