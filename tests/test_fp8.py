"""Block-FP8 (DeepSeek-style) bases in, merged_16bit / merged_fp8 / gguf / merged_4bit out.

Oracles: transformers' fine-grained FP8 quantizer (`Fp8Quantize`, through fp8_models) for every
FP8 byte, transformers' FP8 loader (dequantizing on the CPU) for the base's values and for loading
our outputs, PEFT's merge_and_unload of the dequantized float32 model for the merged values.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fp8_models as F
import streammerge
from conftest import run_cli
from quant_cases import broken_copy, kill_and_resume, merge_fails_with_one_line, nan_adapter
from streammerge.formats.codecs import fp8 as codec

BLOCK = 32  # the tiny models' tiles (DeepSeek's are 128): several tiles per tensor, edge tiles included
pytest.importorskip("accelerate")


@pytest.fixture(scope="session")
def dense_qwen3(make_base):
    # gate/up [544, 32] = 17 tiles of rows; k/v [16, 32]: one edge tile
    return make_base("qwen3", intermediate_size=17 * BLOCK)


@pytest.fixture(scope="session")
def fp8_case(dense_qwen3, tmp_path_factory, make_adapter):
    base = F.quantize_folder(dense_qwen3, tmp_path_factory.mktemp("fp8-base"), BLOCK)
    # PEFT over the base as transformers loads it: dequantized to float32
    case = make_adapter(base, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    return base, case


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ----------------------------------------------------------------------------- the codec alone


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    heavy = torch.randn(300, 200, generator=g) * torch.exp(torch.randn(300, 200, generator=g) * 2)
    zero_tiles = torch.randn(256, 384, generator=g)
    zero_tiles[:128, 128:256] = 0  # an all-zero tile: scale 1, codes 0
    at_max = torch.randn(130, 129, generator=g)
    at_max[0, 0], at_max[129, 128] = 448.0, -448.0  # edge tiles whose maximum is exactly e4m3's
    tiny = torch.randn(128, 256, generator=g) * 1e-30  # the scale follows the values down
    mixed = torch.randn(200, 300, generator=g)
    mixed[:, :3] *= 1e4  # outliers set each tile's scale; the rest lands in e4m3's subnormals
    return {"heavy": heavy, "zero_tiles": zero_tiles, "at_max": at_max, "tiny": tiny, "mixed": mixed,
            "one_row": torch.randn(1, 5, generator=g)}


@pytest.mark.parametrize("pieces", [1, 3, 17])
def test_quantizer_bytes_equal_transformers_fp8_quantizer(pieces):
    for name, w in _weights().items():
        block = 128 if name != "one_row" else 4
        want_codes, want_inv = F.reference_quantize(w, block)
        tile_rows = -(-w.shape[0] // block)
        step = max(1, -(-tile_rows // pieces)) * block
        q = codec.Fp8Quantizer(type("QO", (), {"weight": name, "blocksize": block})())
        codes = torch.empty(w.shape, dtype=torch.uint8)
        for r0 in range(0, w.shape[0], step):
            q.pack(w[r0:r0 + step].contiguous(), codes[r0:r0 + step].view(-1))
        inv = q.finish()["weight_scale_inv"]
        assert torch.equal(codes, want_codes), name
        assert torch.equal(inv, want_inv), name


def test_decode_equals_transformers_fp8_dequantize():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    for name, w in _weights(1).items():
        block = 128 if name != "one_row" else 4
        codes, inv = F.reference_quantize(w, block)
        for r0, r1 in [(0, w.shape[0]), (1, min(w.shape[0], 129)), (w.shape[0] - 1, w.shape[0])]:
            got = codec.dequantize_rows(codes[r0:r1], inv[r0 // block: -(-r1 // block)], r0, block)
            assert torch.equal(got, F.reference_dequantize(codes, inv, block)[r0:r1]), (name, r0, r1)
        if w.shape[0] % block == 0 and w.shape[1] % block == 0:  # transformers derives the tile from the grid
            theirs = Fp8Dequantize(None)._dequantize_one(codes.view(torch.float8_e4m3fn), inv, torch.float32)
            assert torch.equal(codec.dequantize_rows(codes, inv, 0, block), theirs), name


def test_quantizer_refuses_nan():
    q = codec.Fp8Quantizer(type("QO", (), {"weight": "m.weight", "blocksize": 128})())
    w = torch.zeros(128, 4)
    w[5, 2] = float("nan")
    with pytest.raises(streammerge.errors.ExecutionError, match="row 5"):
        q.pack(w, torch.empty(512, dtype=torch.uint8))


# ----------------------------------------------------------------------------- FP8 base, 16-bit out


def test_fp8_base_loads_as_transformers_dequantizes_it(fp8_case):
    base, case = fp8_case
    ours = F.dequantized_state(base, BLOCK)
    for name, value in case.base_state_dict.items():
        if name in ours:
            assert torch.equal(ours[name], value.float()), name


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_fp8_base_merged_16bit_equals_peft(fp8_case, tmp_path, dtype):
    base, case = fp8_case
    out = tmp_path / "out"
    extra = {"dtype": dtype} if dtype else {}
    streammerge.merge(base, [case.adapter_path], out, max_chunk_rows=7, **extra)
    got = _load(out)
    assert not any(n.endswith("_scale_inv") for n in got)
    for name, want in case.merged_state_dict.items():
        target = torch.float32 if dtype is None else torch.bfloat16
        assert got[name].dtype == target
        assert torch.equal(got[name], want.to(target)), name  # PEFT's float32 merge, rounded once
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    if dtype is None:
        assert torch.allclose(_logits(out, case.input_ids), case.ref_logits, atol=1e-5, rtol=1e-5)
    assert streammerge.verify(out, base, [case.adapter_path], **extra).ok


# ----------------------------------------------------------------------------- merged_fp8


def _expected_fp8(case, name: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    return F.reference_quantize(case.merged_state_dict[name], block)


@pytest.mark.parametrize("chunk_rows", [None, 6 * BLOCK, BLOCK])  # 1, 3 and 17 pieces of gate/up/down
def test_merged_fp8_bytes_equal_reference_quantizer(fp8_case, tmp_path, chunk_rows):
    base, case = fp8_case
    out = tmp_path / "out"
    streammerge.merge(base, [case.adapter_path], out, method="merged_fp8", max_chunk_rows=chunk_rows)
    got, before = _load(out), _load(base)
    assert sorted(got) == sorted(before)
    for name, value in got.items():
        assert value.dtype == before[name].dtype and value.shape == before[name].shape, name
        if value.dtype != torch.float8_e4m3fn:
            continue
        if name in case.targets:
            codes, inv = _expected_fp8(case, name, BLOCK)
            assert torch.equal(value.view(torch.uint8), codes), name
            assert torch.equal(got[name + "_scale_inv"], inv), name
        else:  # untouched: the base's own bytes, not a requantization
            assert torch.equal(value.view(torch.uint8), before[name].view(torch.uint8)), name
            assert torch.equal(got[name + "_scale_inv"], before[name + "_scale_inv"]), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((base / "config.json").read_text())["quantization_config"]
    assert streammerge.verify(out, base, [case.adapter_path], method="merged_fp8").ok


def test_merged_fp8_loads_in_transformers_with_the_reference_logits(fp8_case, tmp_path):
    from transformers import AutoModelForCausalLM

    base, case = fp8_case
    out = tmp_path / "out"
    streammerge.merge(base, [case.adapter_path], out, method="merged_fp8")
    # the oracle model: PEFT's merge with each merged FP8 weight replaced by the reference quantizer's values
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    state = dict(case.merged_state_dict)
    for name in case.targets:
        state[name] = F.reference_dequantize(*_expected_fp8(case, name, BLOCK), BLOCK)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        want = model(input_ids=case.input_ids).logits.float()
    assert torch.equal(_logits(out, case.input_ids), want)


def test_16bit_base_to_merged_fp8_all_linear(make_base, make_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    # q/o [128, 128], gate/up [256, 128], down [128, 256]: whole 128-tiles; k/v [64, 128]: not
    base = make_base("qwen3", hidden_size=128, intermediate_size=256, head_dim=32)
    case = make_adapter(base)
    out = tmp_path / "out"
    r = run_cli("merge", base, case.adapter_path, "--out", out, "--method", "merged_fp8", "--max-chunk-rows", "100")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    got = _load(out)
    fp8 = sorted(n for n, v in got.items() if v.dtype == torch.float8_e4m3fn)
    linear = sorted(n for n in case.merged_state_dict if n.endswith("_proj.weight") and "k_proj" not in n and "v_proj" not in n)
    assert fp8 == linear  # every linear weight but lm_head, as DeepSeek ships; edge-tiled ones as transformers does
    for name in fp8:
        codes, inv = F.reference_quantize(case.merged_state_dict[name], 128)
        assert torch.equal(got[name].view(torch.uint8), codes), name
        assert torch.equal(got[name + "_scale_inv"], inv), name
    for name in ("lm_head.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(got[name], case.merged_state_dict[name]), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = ["lm_head"] + [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")]
    assert qc == {**F.fp8_config(128), "modules_to_not_convert": sorted(kept)}
    # transformers' FP8 loader takes it, with the reference quantizer's values
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    state = dict(case.merged_state_dict)
    for name in fp8:
        state[name] = F.reference_dequantize(*F.reference_quantize(state[name], 128), 128)
    model.load_state_dict(state)
    with torch.no_grad():
        want = model(input_ids=case.input_ids).logits.float()
    assert torch.equal(_logits(out, case.input_ids), want)
    assert streammerge.verify(out, base, [case.adapter_path], method="merged_fp8").ok


def test_16bit_moe_base_to_merged_fp8_experts_only(make_base, make_adapter, tmp_path):
    # experts (per expert on disk) gate/up [128, 128], down [128, 128]
    base = make_base("qwen3_moe", hidden_size=128, moe_intermediate_size=128, head_dim=32)
    case = make_adapter(base)
    out = tmp_path / "out"
    streammerge.merge(base, [case.adapter_path], out, method="merged_fp8", fp8_modules="experts")
    got = _load(out)
    fp8 = {n for n, v in got.items() if v.dtype == torch.float8_e4m3fn}
    assert fp8 and all(".mlp.experts." in n for n in fp8)
    assert len(fp8) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = qc["modules_to_not_convert"]
    assert "lm_head" in kept and "model.layers.0.self_attn.q_proj" in kept
    assert not any(".experts." in m for m in kept)
    assert streammerge.verify(out, base, [case.adapter_path], method="merged_fp8", fp8_modules="experts").ok


def test_verify_sees_a_changed_fp8_code(fp8_case, tmp_path):
    base, case = fp8_case
    out = tmp_path / "out"
    streammerge.merge(base, [case.adapter_path], out, method="merged_fp8")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = _load(out)
    codes = tensors[name].view(torch.uint8).clone()
    codes[3, 5] ^= 0x40  # a large change of one value
    tensors[name] = codes.view(torch.float8_e4m3fn)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = streammerge.verify(out, base, [case.adapter_path], method="merged_fp8", check_record=False)
    assert not report.ok
    assert any(f.subject == name and f.kind != "bytes differ" for f in report.faults), report.faults


# ----------------------------------------------------------------------------- other outputs


def test_fp8_base_to_gguf_and_merged_4bit_verify(make_base, make_adapter, tmp_path):
    pytest.importorskip("bitsandbytes")
    dense = make_base("qwen3", tokenizer="bpe-qwen2", intermediate_size=4 * BLOCK)  # GGUF needs a real tokenizer
    base = F.quantize_folder(dense, tmp_path / "fp8", BLOCK)
    case = make_adapter(base)
    for method, extra in (("gguf", {"gguf_type": "q8_0"}), ("merged_4bit", {})):
        out = tmp_path / method
        streammerge.merge(base, [case.adapter_path], out, method=method, **extra)
        assert streammerge.verify(out, base, [case.adapter_path], method=method, **extra).ok, method


def test_plan_counts_fp8(fp8_case):
    base, case = fp8_case
    r = run_cli("plan", base, case.adapter_path, "--method", "merged_fp8")
    assert r.returncode == 0, r.stderr
    formats = next(line for line in r.stdout.splitlines() if line.startswith("formats:"))
    assert "fp8 e4m3 14 " in formats and "F32 11 " in formats  # 14 FP8 weights (with their scales), 11 others


# ----------------------------------------------------------------------------- hostile inputs


S = "model.layers.0.self_attn.q_proj.weight_scale_inv"


@pytest.mark.parametrize("edit,words", [
    (lambda t, c: t.__setitem__(S, t[S][:, :0].contiguous()), "need F32"),
    (lambda t, c: t.__setitem__(S, t[S].to(torch.bfloat16)), "need F32"),
    (lambda t, c: t.pop(S), "has no scale tensor"),
    (lambda t, c: c.pop("quantization_config"), "no quantization_config"),
    (lambda t, c: c["quantization_config"].__setitem__("weight_block_size", [16, 16]), "need F32"),
    (lambda t, c: c["quantization_config"].__setitem__("weight_block_size", [32, 64]), "square tiles"),
    (lambda t, c: c.__setitem__("quantization_config", {"quant_method": "compressed-tensors"}), "compressed-tensors"),
    (lambda t, c: t.__setitem__("model.norm.weight_scale_inv", torch.ones(1, 1)), "is not an FP8 weight"),
    (lambda t, c: c["quantization_config"].__setitem__("activation_scheme", "static"), "activation_scheme"),
])
def test_hostile_fp8_base_one_error_line(fp8_case, tmp_path, edit, words):
    base, case = fp8_case
    broken = broken_copy(base, tmp_path, edit)
    for method in ("merged_16bit", "merged_fp8"):
        merge_fails_with_one_line(broken, case.adapter_path, tmp_path / f"out-{method}", method, words)


@pytest.mark.parametrize("method", ["hqq", "gptq", "awq"])
def test_bases_of_other_quant_methods_are_refused_by_name(dense_qwen3, make_adapter, tmp_path, method):
    case = make_adapter(dense_qwen3)
    broken = tmp_path / "b"
    shutil.copytree(dense_qwen3, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method}
    (broken / "config.json").write_text(json.dumps(config))
    r = run_cli("merge", broken, case.adapter_path, "--out", tmp_path / "o")
    assert r.returncode != 0 and r.stderr.startswith("error: ") and f"quant_method {method!r}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_config_says_fp8_without_fp8_tensors(dense_qwen3, make_adapter, tmp_path):
    case = make_adapter(dense_qwen3)
    broken = tmp_path / "b"
    shutil.copytree(dense_qwen3, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = F.fp8_config(128)
    (broken / "config.json").write_text(json.dumps(config))
    r = run_cli("merge", broken, case.adapter_path, "--out", tmp_path / "o")
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "no tensor is stored as FP8" in r.stderr


def test_fp8_modules_option_rules(fp8_case, dense_qwen3, make_adapter, tmp_path):
    base, case = fp8_case
    r = run_cli("merge", base, case.adapter_path, "--out", tmp_path / "o", "--method", "merged_fp8", "--fp8-modules", "experts")
    assert r.returncode != 0 and "keeps the base's own scheme" in r.stderr
    r = run_cli("merge", base, case.adapter_path, "--out", tmp_path / "o", "--fp8-modules", "experts")
    assert r.returncode != 0 and "only to --method merged_fp8" in r.stderr
    r = run_cli("merge", dense_qwen3, make_adapter(dense_qwen3).adapter_path, "--out", tmp_path / "o",
                "--method", "merged_fp8", "--fp8-modules", "experts")
    assert r.returncode != 0 and "no routed expert weights" in r.stderr


def test_merged_fp8_refuses_nan_from_the_adapter(fp8_case, tmp_path):
    base, case = fp8_case
    adapter, tensors, key = nan_adapter(case.adapter_path, tmp_path, "q_proj.lora_B")
    r = run_cli("merge", base, adapter, "--out", tmp_path / "o", "--method", "merged_fp8")
    assert r.returncode != 0 and "NaN/Inf" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert math.isnan(float(tensors[key][0, 0]))


# ----------------------------------------------------------------------------- DeepSeek-V3 (MLA + MoE)

MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


@pytest.fixture(scope="session")
def deepseek_case(make_base, make_adapter, tmp_path_factory):
    from models import EXPERT_PARAMS

    dense = make_base("deepseek_v3")
    base = F.quantize_folder(dense, tmp_path_factory.mktemp("deepseek-fp8"), BLOCK)  # every *_proj, experts too
    case = make_adapter(base, target_modules=MLA, target_parameters=EXPERT_PARAMS, save_merged=True)
    return base, case, _load(case.adapter_path / "peft-merged")


def test_deepseek_fp8_base_merged_16bit_equals_peft(deepseek_case, tmp_path):
    base, case, ref = deepseek_case
    out = tmp_path / "out"
    streammerge.merge(base, [case.adapter_path], out, max_chunk_rows=5)
    got = _load(out)
    assert set(got) == set(ref)
    routed = [k for k in ref if ".mlp.experts." in k]
    shared = [k for k in ref if ".shared_experts." in k]
    assert routed and shared
    bad = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not bad, bad[:4]
    plan = streammerge.plan(base, [case.adapter_path])
    assert plan.coverage()["used"] == plan.coverage()["adapter_tensors"]
    with torch.no_grad():
        torch.testing.assert_close(_logits(out, case.input_ids), case.ref_logits, atol=0, rtol=0)


def test_deepseek_merged_fp8_bytes_equal_reference(deepseek_case, tmp_path):
    base, case, ref = deepseek_case
    out = tmp_path / "out"
    streammerge.merge(base, [case.adapter_path], out, method="merged_fp8", max_chunk_rows=BLOCK)
    got, before = _load(out), _load(base)
    assert sorted(got) == sorted(before)
    dequantized = F.dequantized_state(base, BLOCK)
    changed = set()
    for name, value in got.items():
        if name.endswith("_scale_inv"):
            continue  # checked with its weight
        if value.dtype != torch.float8_e4m3fn:
            assert torch.equal(value, ref[name]), name
            continue
        if torch.equal(ref[name], dequantized[name]):  # untouched by the adapter: copied
            assert torch.equal(value.view(torch.uint8), before[name].view(torch.uint8)), name
            continue
        changed.add(name)
        codes, inv = F.reference_quantize(ref[name], BLOCK)
        assert torch.equal(value.view(torch.uint8), codes), name
        assert torch.equal(got[name + "_scale_inv"], inv), name
    assert set(case.targets) <= changed  # the MLA projections of both layers (PEFT maps the MLP names to experts)
    for proj in ("gate_proj", "up_proj", "down_proj"):  # the routed experts, through target_parameters
        assert any(f".mlp.experts.0.{proj}" in n for n in changed), proj
    assert streammerge.verify(out, base, [case.adapter_path], method="merged_fp8").ok
    # transformers' FP8 loader fuses and dequantizes the experts; the same logits as a checkpoint
    # made by the reference quantizer from PEFT's merge (FP8 noise is far from small on a random model)
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    tensors = dict(before)
    for name in changed:
        codes, inv = F.reference_quantize(ref[name], BLOCK)
        tensors[name], tensors[name + "_scale_inv"] = codes.view(torch.float8_e4m3fn), inv
    tensors.update({n: v for n, v in ref.items() if n not in dequantized or before[n].dtype != torch.float8_e4m3fn})
    save_file(tensors, str(reference / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(_logits(out, case.input_ids), _logits(reference, case.input_ids))


def test_merged_fp8_keeps_the_base_shards_and_resumes_byte_identical(dense_qwen3, tmp_path):
    from test_resume import files, merge

    base = F.quantize_folder(dense_qwen3, tmp_path / "base", BLOCK, shards=3)
    case = streammerge_adapter(base, tmp_path / "lora")
    opts = ("--method", "merged_fp8", "--max-chunk-rows", str(BLOCK))
    reference = tmp_path / "ref"
    res = merge(base, case.adapter_path, reference, *opts, "--quiet")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    frozen, res = kill_and_resume(base, case.adapter_path, out, opts)
    assert int(res.stdout.split("resumed: ")[1].split("/")[0]) >= frozen["tensors"]
    ours, ref = files(out), files(reference)
    shards = sorted(n for n in ref if n.endswith(".safetensors"))
    assert shards == sorted(p.name for p in base.glob("*.safetensors"))  # the base's files, as its publisher cut them
    assert all(ours[n] == ref[n] for n in shards)
    index = json.loads(ours["model.safetensors.index.json"])
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for n in shards:  # every tensor where the base holds it, in the same order
        assert list(F.header(out / n)) == list(F.header(base / n))


def streammerge_adapter(base: Path, out: Path):
    import models

    return models.build_adapter(base, out, target_modules=["q_proj", "down_proj"])
