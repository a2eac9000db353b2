"""compressed-tensors FP8 bases (llm-compressor's FP8_DYNAMIC, FP8 and FP8_BLOCK) in, merged_16bit /
merged_fp8 (the base's own scheme and config) out.

Oracles: compressed-tensors' own `calculate_qparams` + `quantize` (through ct_models) for every
FP8 byte and scale, transformers' compressed-tensors loader (dequantizing on the CPU) for the base's
values and for loading our outputs, PEFT's merge_and_unload of the dequantized float32 model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("compressed_tensors")
pytest.importorskip("accelerate")

import ct_models as C  # noqa: E402
import streammerge  # noqa: E402
from conftest import run_cli  # noqa: E402
from quant_cases import broken_copy, kill_and_resume, merge_fails_with_one_line, nan_adapter  # noqa: E402
from streammerge.formats.codecs import ct_fp8 as codec  # noqa: E402

BLOCK = 32  # the tiny models' tiles
STRATEGIES = ("channel", "tensor", "block")
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="session")
def dense_qwen3(make_base):
    # gate/up [544, 32]: 17 tiles of rows; k/v [16, 32]: one edge tile
    return make_base("qwen3", dtype=torch.bfloat16, intermediate_size=17 * BLOCK)


_CASES: dict = {}


def _case(strategy, dense, tmp_path_factory, make_adapter):
    if strategy not in _CASES:
        root = tmp_path_factory.mktemp(f"ct-{strategy}")
        base = C.quantize_folder(dense, root / "base", strategy, BLOCK)
        # PEFT over the base as transformers loads it: dequantized, float32
        case = make_adapter(C.dequantized_folder(base, root / "dequantized"), target_modules=TARGETS)
        _CASES[strategy] = (strategy, base, case)
    return _CASES[strategy]


@pytest.fixture(scope="session", params=STRATEGIES)
def ct_case(request, dense_qwen3, tmp_path_factory, make_adapter):
    return _case(request.param, dense_qwen3, tmp_path_factory, make_adapter)


@pytest.fixture(scope="session")
def channel_case(dense_qwen3, tmp_path_factory, make_adapter):
    """FP8_DYNAMIC (per channel), the scheme the other outputs and the hostile set run on."""
    return _case("channel", dense_qwen3, tmp_path_factory, make_adapter)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _logits(folder: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _dequantize_kwargs() -> dict:
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


# ----------------------------------------------------------------------------- the codec alone


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantizer_equals_compressed_tensors(strategy, dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(100, 96, generator=g) * torch.exp(torch.randn(100, 96, generator=g) * 2)
    w[:40, :32] = 0  # an all-zero channel and tile
    w[50, 7] = 1e-30
    scale_dtype = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    fmt = codec.CtFp8Format(tuple(w.shape), strategy, scale_dtype, BLOCK if strategy == "block" else 0)
    codes_ref, scale_ref = C.reference_quantize(w, strategy, dtype, BLOCK)
    scales = codec.scales_of(codec.group_amax(w, strategy, BLOCK), scale_dtype)
    assert torch.equal(scales.reshape(scale_ref.shape), scale_ref)
    codes = codec.quantize_rows(w, scales, fmt, 0)
    assert torch.equal(codes, codes_ref.view(torch.uint8))


def test_ct_base_loads_as_transformers_dequantizes_it(ct_case):
    strategy, base, case = ct_case
    expected = C.dequantized_state(base)
    tensors = _load(base)
    checked = 0
    for name, value in tensors.items():
        if value.dtype != torch.float8_e4m3fn:
            continue
        scale = tensors[name + "_scale"]
        fmt = codec.CtFp8Format(tuple(value.shape), strategy, "BF16", BLOCK if strategy == "block" else 0)
        dec = codec.CtFp8Decoder(fmt, scale)
        raw = value.view(torch.uint8).reshape(-1)
        width = value.shape[1]
        n = value.shape[0]  # decoded in two chunks, the second one starting inside a tile row
        cuts = [(0, min(n, 5)), (min(n, 5), n)]
        rows = [dec.rows(raw[r0 * width: r1 * width], r0, r1) for r0, r1 in cuts]
        assert torch.equal(torch.cat(rows), expected[name]), name
        checked += 1
    assert checked == 14


# ----------------------------------------------------------------------------- merges


def test_ct_base_merged_16bit_equals_peft(ct_case, tmp_path):
    strategy, base, case = ct_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", max_chunk_rows=BLOCK)
    ours = _load(out)
    assert set(ours) == set(case.merged_state_dict)  # scales and input scales are gone
    for name, ref in case.merged_state_dict.items():
        assert torch.equal(ours[name], ref.to(torch.bfloat16)), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(_logits(out, case.input_ids), case.ref_logits, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("chunk_rows", [None, 6 * BLOCK, BLOCK])  # 1, 3 and 17 pieces of gate/up
def test_merged_fp8_of_ct_base_bytes_equal_compressed_tensors(ct_case, tmp_path, chunk_rows):
    strategy, base, case = ct_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", method="merged_fp8",
                      max_chunk_rows=chunk_rows)
    ours, base_t = _load(out), _load(base)
    assert list(ours) == list(base_t)
    merged = 0
    for name, value in ours.items():
        if name.endswith("_scale"):
            continue
        if value.dtype == torch.float8_e4m3fn:
            module = name.rsplit(".", 2)[-2]
            if module in TARGETS:
                codes, scale = C.reference_quantize(case.merged_state_dict[name], strategy, torch.bfloat16, BLOCK)
                assert torch.equal(value.view(torch.uint8), codes.view(torch.uint8)), name
                assert torch.equal(ours[name + "_scale"], scale), name
                merged += 1
            else:  # untouched: copied
                assert torch.equal(value.view(torch.uint8), base_t[name].view(torch.uint8)), name
                assert torch.equal(ours[name + "_scale"], base_t[name + "_scale"]), name
        elif name.endswith("input_scale"):
            assert torch.equal(value, base_t[name]), name
        else:
            assert torch.equal(value, case.merged_state_dict[name].to(value.dtype)), name
    assert merged == 8
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((base / "config.json").read_text())["quantization_config"]


def test_merged_fp8_of_ct_base_loads_in_transformers(ct_case, tmp_path):
    from transformers import AutoModelForCausalLM

    strategy, base, case = ct_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", method="merged_fp8")
    # the reference: PEFT's merge, each FP8 weight through compressed-tensors' quantizer and dequantizer
    from compressed_tensors.quantization import dequantize

    expected = {}
    for name, merged in case.merged_state_dict.items():
        if C.is_linear_weight(name):
            codes, scale = C.reference_quantize(merged, strategy, torch.bfloat16, BLOCK)
            expected[name] = dequantize(codes, scale, args=C.scheme(strategy, BLOCK).weights).float()
        else:
            expected[name] = merged.to(torch.bfloat16).float()
    model = AutoModelForCausalLM.from_pretrained(str(case.base_path), dtype=torch.float32).eval()
    model.load_state_dict(expected, strict=True)
    with torch.no_grad():
        reference = model(input_ids=case.input_ids).logits.float()
    torch.testing.assert_close(_logits(out, case.input_ids, **_dequantize_kwargs()), reference, atol=0, rtol=0)


def test_verify_ct_outputs_and_a_changed_code(ct_case, tmp_path):
    strategy, base, case = ct_case
    for method in ("merged_16bit", "merged_fp8"):
        out = tmp_path / method
        streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", method=method)
        report = streammerge.verify(out, base, [case.adapter_path], method=method, check_record=False)
        assert report.ok, (method, report.faults)
    out = tmp_path / "merged_fp8"
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = _load(out)
    codes = tensors[name].view(torch.uint8).clone()
    codes[3, 5] ^= 0x40
    tensors[name] = codes.view(torch.float8_e4m3fn)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    report = streammerge.verify(out, base, [case.adapter_path], method="merged_fp8", check_record=False)
    assert not report.ok and any(f.subject == name for f in report.faults), report.faults


def test_ct_base_to_merged_4bit_verifies(channel_case, tmp_path):
    strategy, base, case = channel_case
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", method="merged_4bit")
    report = streammerge.verify(out, base, [case.adapter_path], method="merged_4bit", check_record=False)
    assert report.ok, report.faults
    assert not any(k.endswith("input_scale") or k.endswith(".weight_scale") for k in _load(out))


def test_merged_fp8_of_ct_base_refuses_nan(ct_case, tmp_path):
    strategy, base, case = ct_case
    adapter, _, _ = nan_adapter(case.adapter_path, tmp_path, "down_proj.lora_B")
    r = run_cli("merge", base, adapter, "--out", tmp_path / "o", "--method", "merged_fp8")
    assert r.returncode != 0 and "NaN/Inf" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- hostile inputs


S = "model.layers.0.self_attn.q_proj.weight_scale"


def _group(c):
    return c["quantization_config"]["config_groups"]["group_0"]


@pytest.mark.parametrize("edit,words", [
    (lambda t, c: t.__setitem__(S, t[S][:3].contiguous()), "fits none of the FP8 schemes"),
    (lambda t, c: t.__setitem__(S, t[S].to(torch.int32)), "fits none of the FP8 schemes"),
    (lambda t, c: t.pop(S), "has no scale tensor"),
    (lambda t, c: t.__setitem__("model.norm.weight_scale", torch.ones(1)), "is not an FP8 weight"),
    (lambda t, c: _group(c)["weights"].update(num_bits=4, type="int"), "int 4-bit scheme"),
    (lambda t, c: c["quantization_config"].update(format="pack-quantized"), "'pack-quantized'"),
    (lambda t, c: c["quantization_config"].update(format="nvfp4-pack-quantized"), "'nvfp4-pack-quantized'"),
    (lambda t, c: c["quantization_config"].update(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
    (lambda t, c: c["quantization_config"].update(quantization_status="frozen"), "quantization_status 'frozen'"),
    (lambda t, c: c["quantization_config"].pop("config_groups"), "no config_groups"),
    (lambda t, c: _group(c)["weights"].update(symmetric=False), "asymmetric"),
    (lambda t, c: _group(c)["weights"].update(strategy="group", group_size=16), "strategy 'group'"),
])
def test_hostile_ct_base_one_error_line(channel_case, tmp_path, edit, words):
    strategy, base, case = channel_case
    broken = broken_copy(base, tmp_path, edit)
    for method in ("merged_16bit", "merged_fp8"):
        merge_fails_with_one_line(broken, case.adapter_path, tmp_path / f"out-{method}", method, words)


def test_config_says_ct_without_fp8_tensors(dense_qwen3, make_adapter, tmp_path):
    case = make_adapter(dense_qwen3)
    broken = tmp_path / "b"
    shutil.copytree(dense_qwen3, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"] = C.ct_config("channel")
    (broken / "config.json").write_text(json.dumps(config))
    r = run_cli("merge", broken, case.adapter_path, "--out", tmp_path / "o")
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "no tensor is stored as FP8" in r.stderr


def test_per_tensor_scales_resume_byte_identical(dense_qwen3, make_adapter, tmp_path_factory, tmp_path):
    """A per-tensor scale is measured by a statistics pass before the codes: a merge killed midway
    and resumed redoes both passes of the weight it was in, and writes the same bytes."""
    from test_resume import files, merge

    strategy, base, case = _case("tensor", dense_qwen3, tmp_path_factory, make_adapter)
    opts = ("--method", "merged_fp8", "--max-chunk-rows", "8")
    reference = tmp_path / "ref"
    res = merge(base, case.adapter_path, reference, *opts, "--quiet")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    frozen, res = kill_and_resume(base, case.adapter_path, out, opts)
    assert "resumed: " in res.stdout
    assert files(out)["model.safetensors"] == files(reference)["model.safetensors"]


def test_kv_cache_scales_kept_with_the_scheme_left_out_of_16bit(channel_case, tmp_path):
    strategy, base, case = channel_case

    def add_kv_scales(t, c):
        for i in range(2):
            for kv in ("k_scale", "v_scale"):
                t[f"model.layers.{i}.self_attn.{kv}"] = torch.tensor(0.5 + i, dtype=torch.bfloat16)
        c["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                       "dynamic": False, "symmetric": True}

    kv_base = broken_copy(base, tmp_path, add_kv_scales)
    fp8, bf16 = tmp_path / "fp8", tmp_path / "bf16"
    streammerge.merge(str(kv_base), [str(case.adapter_path)], str(fp8), device="cpu", method="merged_fp8")
    streammerge.merge(str(kv_base), [str(case.adapter_path)], str(bf16), device="cpu")
    base_t, fp8_t, bf16_t = _load(kv_base), _load(fp8), _load(bf16)
    kv = [k for k in base_t if k.endswith(("k_scale", "v_scale"))]
    assert len(kv) == 4 and all(torch.equal(fp8_t[k], base_t[k]) for k in kv)
    assert not any(k.endswith(("k_scale", "v_scale", "_scale")) for k in bf16_t)
    plan = streammerge.plan(str(kv_base), [str(case.adapter_path)])
    assert any("left out 4 static activation / KV-cache scale(s)" in n for n in plan.notes)
