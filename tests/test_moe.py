"""MoE expert LoRA (`target_parameters`, PEFT's ParamWrapper) on fused 3-D expert tensors.

gpt_oss stores its experts fused on disk exactly as the model holds them ([E, in, out],
`is_transposed`); qwen3_moe stores one tensor per expert and projection on disk, which transformers
fuses into [E, out, in] at load time (and splits again at save time). Oracle: PEFT's merged model
as transformers saves it (same on-disk layout as the base), compared bit for bit, and its logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_safetensors_dir
from models import EXPERT_PARAMS

import streammerge
from streammerge.planning.types import MergePlan


@pytest.mark.parametrize("arch,pieces", [("gpt_oss", False), ("qwen3_moe", True)])
def test_expert_lora_matches_peft(arch, pieces, make_base, make_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base = make_base(arch)
    case = make_adapter(base, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS, save_merged=True)
    ref = load_safetensors_dir(case.adapter_path / "peft-merged")
    base_sd = load_safetensors_dir(base)
    assert set(ref) == set(base_sd)
    expert_keys = [k for k in base_sd if ".experts." in k and changed(ref[k], base_sd[k])]
    # fixture: every expert tensor of every layer is changed by the LoRA
    assert len(expert_keys) == (2 * 2 if not pieces else 2 * 4 * 3), expert_keys

    outs = {}
    for rows in (None, 1):
        out = tmp_path / f"out-{rows}"
        streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", max_chunk_rows=rows)
        ours = load_safetensors_dir(out)
        assert set(ours) == set(ref)
        bad = [k for k in ref if not torch.equal(ours[k], ref[k])]
        assert not bad, f"differ from PEFT's merged model: {bad[:4]}"
        outs[rows] = out
    assert (outs[None] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()

    plan = streammerge.plan(str(base), [str(case.adapter_path)])
    terms = plan.term_counts()
    assert terms.get("moe", 0) == (0 if pieces else 4) and terms["lora"] == 2 + (24 if pieces else 0)
    assert plan.coverage()["used"] == plan.coverage()["adapter_tensors"] == 12
    assert MergePlan.from_dict(json.loads(plan.to_json())) == plan

    model = AutoModelForCausalLM.from_pretrained(str(outs[None]), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=case.input_ids).logits
    torch.testing.assert_close(logits, case.ref_logits, atol=0, rtol=0)
    torch.testing.assert_close(logits, case.peft_logits, atol=2e-5, rtol=1e-5)


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)
