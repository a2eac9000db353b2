"""MXFP4 (gpt-oss) bases in, merged_16bit / merged_mxfp4 out.

Oracles: triton_kernels' torch MX quantizer (golden digests of its output, and the bit-level
reference in mxfp4_models checked against them) for every MXFP4 byte; transformers' MXFP4 loader
(dequantizing on the CPU) for the base's values and for loading our outputs; PEFT's
merge_and_unload (ParamWrapper on the fused experts) of the dequantized float32 model for the
merged values.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mxfp4_models as M
import streammerge
from conftest import run_cli
from quant_cases import broken_copy, merge_fails_with_one_line, nan_adapter
from models import EXPERT_PARAMS
from mxfp4_rows import golden_rows
from streammerge.formats.codecs import mxfp4 as codec

GOLDEN = json.loads((Path(__file__).parent / "golden" / "mxfp4.json").read_text())
GPT_OSS = dict(dtype=torch.bfloat16, hidden_size=64, intermediate_size=32, head_dim=16)  # experts [4, 64, 64], [4, 32, 64]
pytest.importorskip("accelerate")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- the codec alone


def test_quantizer_equals_the_reference_mx_quantizer_golden():
    rows = torch.from_numpy(golden_rows())  # [16, 512]: each row one output feature, quantized along it
    as_param = rows.unsqueeze(0).transpose(1, 2)  # the model's [E, in, out]
    for blocks, scales in (codec.quantize_experts(as_param), M.reference_quantize(as_param)):
        blocks = blocks.reshape(rows.shape[0], -1)
        assert _sha(blocks) == GOLDEN["sha256"]["blocks"], blocks[0].numpy().tobytes().hex()
        assert _sha(scales[0]) == GOLDEN["sha256"]["scales"]
        assert blocks[0].numpy().tobytes().hex() == GOLDEN["first_rows"]["blocks"]


def test_quantizer_equals_reference_on_random_weights():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        w = torch.randn(3, 32 * (1 + trial % 3), 5, generator=g) * torch.exp(torch.randn(3, 1, 5, generator=g) * 4)
        if trial % 5 == 0:
            w[0, :, 1] = 0
            w[1, :32, 2] = -0.0
        ours, ref = codec.quantize_experts(w), M.reference_quantize(w)
        assert torch.equal(ours[0].reshape(ref[0].shape), ref[0]) and torch.equal(ours[1], ref[1]), trial


def test_decode_equals_transformers_dequantize():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, (3, 40, 4), dtype=torch.uint8, generator=g)
    scales[0, 0, :3] = torch.tensor([0, 1, 254], dtype=torch.uint8)  # 2**-127 (subnormal) and the largest
    ref = M.reference_dequantize(blocks, scales)
    assert torch.equal(codec.dequantize_experts(blocks.view(3, 40, 64), scales), ref)
    # the decoder streams experts on their own and gives the model's [in, out] per expert
    dec = codec.Mxfp4Decoder(codec.Mxfp4Format((3, 128, 40)), scales)
    raw = blocks.reshape(3, -1)
    parts = [dec.rows(raw[e:e + 1].reshape(-1), e, e + 1) for e in range(3)]
    assert torch.equal(torch.cat(parts).view(3, 128, 40), ref)


def test_quantizer_refuses_nan():
    from streammerge.errors import ExecutionError
    from streammerge.planning.types import QuantOut

    qo = QuantOut("weight", "w_blocks", (2, 32, 4), "e2m1", 32, False, "bfloat16", codec="mxfp4")
    q = codec.Mxfp4Quantizer(qo)
    w = torch.zeros(2, 32 * 4)
    w[1, 5] = float("nan")
    with pytest.raises(ExecutionError, match="NaN/Inf in expert 1"):
        q.pack(w)


# ----------------------------------------------------------------------------- gpt-oss models


@pytest.fixture(scope="session")
def mx_case(make_base, make_adapter, tmp_path_factory):
    dense = make_base("gpt_oss", **GPT_OSS)
    root = tmp_path_factory.mktemp("mxfp4")
    base = M.quantize_folder(dense, root / "base")
    dequantized = M.dequantized_folder(base, root / "dequantized")
    # PEFT over the base as transformers loads it (dequantized, float32): attention LoRA + fused experts
    case = make_adapter(dequantized, target_modules=["q_proj", "o_proj"], target_parameters=EXPERT_PARAMS)
    return base, case


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _model_state(folder: Path) -> dict[str, torch.Tensor]:
    """The parameters transformers loads from `folder` (an MXFP4 one dequantized on the CPU), float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_mxfp4_base_loads_as_transformers_dequantizes_it(mx_case):
    base, case = mx_case
    loaded = _model_state(base)
    expected = M.dequantized_state(base)
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("chunk_rows", [None, 1])
def test_mxfp4_base_merged_16bit_equals_peft(mx_case, tmp_path, chunk_rows):
    base, case = mx_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", max_chunk_rows=chunk_rows)
    ours = _load(out)
    assert set(ours) == set(case.merged_state_dict)
    for name, ref in case.merged_state_dict.items():
        assert ours[name].dtype == torch.bfloat16, name
        assert torch.equal(ours[name], ref.to(torch.bfloat16)), name  # PEFT's float32 merge, rounded once
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    # transformers loads it as a 16-bit gpt-oss, with PEFT's logits up to bf16 rounding
    torch.testing.assert_close(_logits(out, case.input_ids), case.ref_logits, atol=0.1, rtol=0.05)


def _expected_experts(case, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return M.reference_quantize(case.merged_state_dict[name])


@pytest.mark.parametrize("chunk_rows", [None, 3, 1])  # experts in 1, 2 and 4 pieces
def test_merged_mxfp4_bytes_equal_reference_quantizer(mx_case, tmp_path, chunk_rows):
    base, case = mx_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", method="merged_mxfp4",
                      max_chunk_rows=chunk_rows)
    ours, base_t = _load(out), _load(base)
    assert set(ours) == set(base_t)
    assert [k for k in ours] == [k for k in base_t]  # same order, same file
    experts = [n for n in case.merged_state_dict if M.is_expert_param(n)]
    assert len(experts) == 4
    for name in experts:
        blocks, scales = _expected_experts(case, name)
        assert torch.equal(ours[name + "_blocks"], blocks), name
        assert torch.equal(ours[name + "_scales"], scales), name
    for name, value in ours.items():
        if name.endswith(("_blocks", "_scales")):
            continue
        assert torch.equal(value, case.merged_state_dict[name].to(value.dtype)), name
    assert json.loads((out / "config.json").read_text())["quantization_config"] == M.mxfp4_config()


def test_merged_mxfp4_loads_in_transformers_as_the_reference_quantized_merge(mx_case, tmp_path):
    base, case = mx_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", method="merged_mxfp4")
    from transformers import AutoModelForCausalLM

    loaded = _model_state(out)
    expected = {}
    for name, merged in case.merged_state_dict.items():
        if M.is_expert_param(name):
            expected[name] = M.reference_dequantize(*_expected_experts(case, name))
        else:
            expected[name] = merged.to(torch.bfloat16).float()
        assert torch.equal(loaded[name], expected[name]), name
    # its logits: those of PEFT's merge with the experts through the reference quantizer
    model = AutoModelForCausalLM.from_pretrained(str(case.base_path), dtype=torch.float32).eval()
    model.load_state_dict(expected, strict=True)
    with torch.no_grad():
        reference = model(input_ids=case.input_ids).logits.float()
    torch.testing.assert_close(_logits(out, case.input_ids), reference, atol=0, rtol=0)


def test_untouched_experts_are_copied(make_base, make_adapter, mx_case, tmp_path):
    base, _ = mx_case
    case = make_adapter(M.dequantized_folder(base, tmp_path / "deq"), target_modules=["q_proj"],
                        target_parameters=["mlp.experts.down_proj"])
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", method="merged_mxfp4")
    ours, base_t = _load(out), _load(base)
    gate_up = [k for k in base_t if "gate_up_proj_" in k]
    assert gate_up and all(torch.equal(ours[k], base_t[k]) for k in gate_up)
    down = [k for k in base_t if "down_proj_blocks" in k]
    assert all(not torch.equal(ours[k], base_t[k]) for k in down)
    plan = streammerge.plan(str(base), [str(case.adapter_path)], method="merged_mxfp4")
    assert plan.counts()["quant"] == 4  # blocks + scales of two down_proj


def test_verify_merged_mxfp4_and_a_changed_code(mx_case, tmp_path):
    base, case = mx_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", method="merged_mxfp4")
    report = streammerge.verify(out, base, [case.adapter_path], method="merged_mxfp4", check_record=False)
    assert report.ok, report.faults
    tensors = _load(out)
    name = "model.layers.1.mlp.experts.gate_up_proj_blocks"
    for edit in ("code", "scale"):
        broken = dict(tensors)
        if edit == "code":
            broken[name] = tensors[name].clone()
            broken[name][2, 7, 0, 3] ^= 0x07  # one value's magnitude
        else:  # every scale of one expert 2**6 larger: its codes all round to zero
            scales = name.replace("_blocks", "_scales")
            broken[scales] = tensors[scales].clone()
            broken[scales][2] += 6
            broken[name] = tensors[name].clone()
            broken[name][2] = 0
        save_file(broken, str(out / "model.safetensors"), metadata={"format": "pt"})
        report = streammerge.verify(out, base, [case.adapter_path], method="merged_mxfp4", check_record=False)
        assert not report.ok, edit
        assert any(f.subject == name and f.kind != "bytes differ" for f in report.faults), (edit, report.faults)


def test_verify_merged_16bit_of_mxfp4_base(mx_case, tmp_path):
    base, case = mx_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu")
    report = streammerge.verify(out, base, [case.adapter_path], check_record=False)
    assert report.ok, report.faults
    tensors = _load(out)
    name = "model.layers.0.mlp.experts.down_proj"
    tensors[name] = tensors[name].clone()
    tensors[name][1, 3, 5] += 0.25
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = streammerge.verify(out, base, [case.adapter_path], check_record=False)
    assert not report.ok and any(f.subject == name for f in report.faults), report.faults


def test_plan_counts_mxfp4(mx_case):
    base, case = mx_case
    r = run_cli("plan", base, case.adapter_path, "--method", "merged_mxfp4")
    assert r.returncode == 0, r.stderr
    formats = next(line for line in r.stdout.splitlines() if line.startswith("formats:"))
    assert "mxfp4 e2m1 4 " in formats
    plan = streammerge.plan(str(base), [str(case.adapter_path)], method="merged_mxfp4")
    assert plan.term_counts()["moe"] == 4
    from streammerge.planning.types import MergePlan

    assert MergePlan.from_dict(json.loads(plan.to_json())) == plan


def test_merged_mxfp4_refuses_nan_from_the_adapter(mx_case, tmp_path):
    base, case = mx_case
    adapter, _, _ = nan_adapter(case.adapter_path, tmp_path, "experts.lora_B")
    r = run_cli("merge", base, adapter, "--out", tmp_path / "o", "--method", "merged_mxfp4")
    assert r.returncode != 0 and "NaN/Inf" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_merged_mxfp4_needs_an_mxfp4_base(make_base, make_adapter, tmp_path):
    base = make_base("qwen3")
    r = run_cli("merge", base, make_adapter(base).adapter_path, "--out", tmp_path / "o", "--method", "merged_mxfp4")
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "has no MXFP4 weights" in r.stderr


# ----------------------------------------------------------------------------- hostile inputs


P = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("edit,words", [
    (lambda t, c: t.__setitem__(P + "_scales", t[P + "_scales"][:, :3].contiguous()), "need U8"),
    (lambda t, c: t.__setitem__(P + "_scales", t[P + "_scales"].to(torch.int16)), "need U8"),
    (lambda t, c: t.pop(P + "_scales"), "have no scale tensor"),
    (lambda t, c: t.__setitem__(P + "_blocks", t[P + "_blocks"].reshape(4, 64, 4, 8).contiguous()), "MXFP4 blocks are"),
    (lambda t, c: c.pop("quantization_config"), "no quantization_config with quant_method 'mxfp4'"),
    (lambda t, c: t.__setitem__("model.norm_scales", torch.ones(2, dtype=torch.uint8)), "is not an MXFP4 blocks tensor"),
])
def test_hostile_mxfp4_base_one_error_line(mx_case, tmp_path, edit, words):
    base, case = mx_case
    broken = broken_copy(base, tmp_path, edit)
    for method in ("merged_16bit", "merged_mxfp4"):
        merge_fails_with_one_line(broken, case.adapter_path, tmp_path / f"out-{method}", method, words)


def test_config_says_mxfp4_without_blocks(make_base, make_adapter, tmp_path):
    dense = make_base("gpt_oss", **GPT_OSS)
    case = make_adapter(dense, target_modules=["q_proj"])
    broken = tmp_path / "b"
    shutil.copytree(dense, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = M.mxfp4_config()
    (broken / "config.json").write_text(json.dumps(config))
    r = run_cli("merge", broken, case.adapter_path, "--out", tmp_path / "o")
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "'*_blocks' tensors" in r.stderr


def test_mxfp4_base_to_merged_4bit_keeps_experts_16bit(mx_case, tmp_path):
    base, case = mx_case
    out16, out4 = tmp_path / "16", tmp_path / "4"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out16), device="cpu")
    streammerge.merge(str(base), [str(case.adapter_path)], str(out4), device="cpu", method="merged_4bit")
    t16, t4 = _load(out16), _load(out4)
    experts = [n for n in t16 if M.is_expert_param(n)]
    assert len(experts) == 4 and all(torch.equal(t4[n], t16[n]) for n in experts)  # not 4-bit: as transformers leaves them
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in t4  # the linear layers are
    report = streammerge.verify(out4, base, [case.adapter_path], method="merged_4bit", check_record=False)
    assert report.ok, report.faults
