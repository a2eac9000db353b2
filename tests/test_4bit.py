"""bitsandbytes bases in, merged_16bit / merged_4bit out, against bitsandbytes, transformers and PEFT.

Bases are real: a tiny Llama saved in bf16, loaded by transformers with a BitsAndBytesConfig on the
CPU and saved again (no forward pass before saving: on AVX512-BF16 CPUs it repacks the weights).
Oracles: bitsandbytes' own dequantize_4bit / int8 dequantization of the loaded quantized model,
bitsandbytes' quantize_4bit on the whole float32 merged tensor, safetensors' save_file bytes,
transformers' from_pretrained of the output, and PEFT applied to the dequantized model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")
import bitsandbytes.functional as F  # noqa: E402

import streammerge  # noqa: E402
from conftest import load_safetensors_dir, run_cli, shard_files  # noqa: E402
from streammerge.run.schedule import chunks_of, plan_layout  # noqa: E402
from streammerge.planning.types import MergePlan  # noqa: E402
from streammerge.formats.codecs import bnb4_quantize as BQ  # noqa: E402

# hidden 64, intermediate 320 = 5 blocks of 64: every row of every linear weight holds whole blocks,
# where bnb's CPU dequantize_4bit is sound (the transformers/PEFT oracles use it); gate/up_proj have
# 320 rows, which max_chunk_rows 19 cuts into 17 pieces and 110 into 3.
LLAMA = dict(hidden_size=64, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # k_proj, o_proj, gate_proj stay untouched
PIECES = {None: 1, 110: 3, 19: 17}
PROBE = "model.layers.1.mlp.up_proj.weight"  # [320, 64], targeted

BASES = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bf16_case(make_base, make_adapter):
    base = make_base("llama", dtype=torch.bfloat16, **LLAMA)
    return make_adapter(base, r=8, lora_alpha=64, target_modules=TARGETS)


@pytest.fixture(scope="module")
def qbase(bf16_case, tmp_path_factory):
    """qbase(kind) -> folder of the bf16 base as transformers saves it quantized (cached)."""
    cache: dict[str, Path] = {}

    def build(kind: str) -> Path:
        if kind not in cache:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            kw = dict(BASES[kind])
            if kw.get("load_in_4bit"):
                kw["bnb_4bit_compute_dtype"] = torch.bfloat16
            model = AutoModelForCausalLM.from_pretrained(
                str(bf16_case.base_path), quantization_config=BitsAndBytesConfig(**kw), device_map="cpu")
            out = tmp_path_factory.mktemp(f"base-{kind}")
            model.save_pretrained(str(out))  # no forward pass before this (see module doc)
            for f in bf16_case.base_path.iterdir():  # tokenizer etc.
                if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                    shutil.copy(f, out / f.name)
            cache[kind] = out
        return cache[kind]

    return build


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    cache: dict[str, Path] = {}

    def run(base, adapter, **kw) -> Path:
        kw.setdefault("device", "cpu")
        key = repr((str(base), str(adapter), sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("out") / "m"
            streammerge.merge(str(base), [str(adapter)], str(out), **kw)
            cache[key] = out
        return cache[key]

    return run


def _load_quantized(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu").eval()


def bnb_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every bitsandbytes weight of a quantized folder, dequantized by bitsandbytes (via transformers'
    loaded modules): 4-bit -> dequantize_4bit (its quant-state dtype), 8-bit -> int8 dequant (float32)."""
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    model = _load_quantized(folder)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            out[f"{name}.weight"] = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            out[f"{name}.weight"] = dequantize_bnb_weight(mod.weight, mod.state)
    assert len(out) == 14
    return out


def delta(case, name: str) -> torch.Tensor:
    """PEFT's float32 delta: (B @ A) * scale."""
    t = case.targets[name]
    return (t.B.float() @ t.A.float()) * t.scale


def merged_f32(case, name: str, w: torch.Tensor) -> torch.Tensor:
    return w.float() + delta(case, name) if name in case.targets else w.float()


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (
        f"{what}: {got.dtype} {list(got.shape)} vs {want.dtype} {list(want.shape)}")
    a, b = got.contiguous().reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)
    if not torch.equal(a, b):
        pytest.fail(f"{what}: {int((a != b).sum())} of {a.numel()} bytes differ")


def bnb4_state_dict(name: str, m32: torch.Tensor, quant_type: str, blocksize: int, dq: bool, dtype) -> dict:
    """What transformers/bitsandbytes save for weight `name` = quantize_4bit(whole float32 merged tensor),
    with the quant state recording the output dtype."""
    packed, qs = F.quantize_4bit(m32, blocksize=blocksize, compress_statistics=dq, quant_type=quant_type)
    qs.dtype = dtype
    return {name: packed, **{f"{name}.{k}": v for k, v in qs.as_dict(packed=True).items()}}


def _probe_pieces(out_plan: MergePlan, max_rows) -> int:
    layout = plan_layout(out_plan)
    t = next(t for t in out_plan.tensors if t.name == PROBE)
    return len(list(chunks_of(t, layout, max_rows)))


# --------------------------------------------------------------------------- merged_16bit


@pytest.mark.parametrize("kind", list(BASES))
def test_merged_16bit_from_quantized_base(kind, bf16_case, qbase, merged):
    """= bitsandbytes' dequantized weight + delta in float32, rounded once; quant-state keys gone;
    untouched tensors bit-identical; loads in transformers; logits = PEFT on the dequantized model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = qbase(kind)
    out = merged(base, bf16_case.adapter_path)
    ours = load_safetensors_dir(out)
    bf16 = load_safetensors_dir(bf16_case.base_path)
    assert sorted(ours) == sorted(bf16), "output names must be the 16-bit model's (no quant-state tensors)"
    deq = bnb_dequantized(base)
    stored = load_safetensors_dir(base)
    for name in bf16:
        if name in deq:  # bf16: the 4-bit quant-state dtype; 8-bit: config.json's dtype
            want = merged_f32(bf16_case, name, deq[name]).to(torch.bfloat16)
            assert_bits_equal(ours[name], want, name)
        else:
            assert_bits_equal(ours[name], stored[name], name)
    assert all(n in deq for n in bf16_case.targets)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    ref = _load_quantized(base)
    # transformers' own dequantization, in float32: bitsandbytes' values as they are (4-bit: its quant-state
    # dtype, widened; 8-bit: int8_vectorwise_dequant's float32, which dequantize() would round to bf16)
    ref.dequantize(dtype=torch.float32)
    ref = ref.float().eval()
    with torch.no_grad():
        base_logits = ref(input_ids=bf16_case.input_ids).logits
        peft_sd = PeftModel.from_pretrained(ref, str(bf16_case.adapter_path)).merge_and_unload().state_dict()
        # PEFT's float32 merge, stored in the output dtype (as save_pretrained in bf16 would)
        model_ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        model_ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in peft_sd.items()})
        peft_logits = model_ref(input_ids=bf16_case.input_ids).logits
        logits = model(input_ids=bf16_case.input_ids).logits
    tol = 1e-4 * float(peft_logits.abs().max())
    assert float((base_logits - peft_logits).abs().max()) > 50 * tol, "fixture error: the adapter barely matters"
    torch.testing.assert_close(logits, peft_logits, atol=tol, rtol=0)


def test_quantized_base_plan_groups_weights(bf16_case, qbase):
    """A 4-bit weight and its statistics are one logical weight; the plan JSON round-trips."""
    plan = streammerge.plan(qbase("nf4-dq"), [bf16_case.adapter_path])
    ops = {t.name: t.op for t in plan.tensors}
    assert ops[PROBE] == "merge" and ops["model.layers.0.self_attn.k_proj.weight"] == "dequant"
    t = next(t for t in plan.tensors if t.name == PROBE)
    assert t.shape == (320, 64) and t.source.shape == (320 * 64 // 2, 1) and t.quant_in.codec == "bnb4"
    assert sorted(c.name.rsplit(".", 1)[-1] for c in t.quant_in.companions) == [
        "absmax", "bitsandbytes__nf4", "nested_absmax", "nested_quant_map", "quant_map"]
    assert not any(".absmax" in n or "quant_state" in n for n in ops)
    assert MergePlan.from_dict(json.loads(plan.to_json())) == plan
    plan4 = streammerge.plan(bf16_case.base_path, [bf16_case.adapter_path], method="merged_4bit", base_roundtrip="fp4")
    probe = next(t for t in plan4.tensors if t.name == PROBE)
    assert probe.op == "quant" and probe.quant_out.part == "weight" and probe.roundtrip.quant_type == "fp4"
    assert MergePlan.from_dict(json.loads(plan4.to_json())) == plan4


# --------------------------------------------------------------------------- merged_4bit

M4_CASES = {
    # name: (base kind, merge options, (quant_type, blocksize, double_quant) of the output)
    "nf4dq-from-nf4dq": ("nf4-dq", {}, ("nf4", 64, True)),
    "nf4dq-from-bf16": ("bf16", {}, ("nf4", 64, True)),
    "fp4-from-bf16": ("bf16", dict(quant_type="fp4", double_quant=False), ("fp4", 64, False)),
    "fp4dq-from-fp4dq": ("fp4", {}, ("fp4", 64, True)),
    "nf4-bs128-from-nf4": ("nf4", dict(blocksize=128), ("nf4", 128, False)),
    "nf4dq-from-int8": ("int8", {}, ("nf4", 64, True)),
}


def _m4_base(case_name, bf16_case, qbase):
    kind = M4_CASES[case_name][0]
    return bf16_case.base_path if kind == "bf16" else qbase(kind)


def expected_4bit(case_name, bf16_case, qbase) -> dict[str, torch.Tensor]:
    """The state dict transformers + bitsandbytes would save for the merged weights."""
    kind, _, (qt, bs, dq) = M4_CASES[case_name]
    base = _m4_base(case_name, bf16_case, qbase)
    stored = load_safetensors_dir(base)
    weights = load_safetensors_dir(bf16_case.base_path) if kind == "bf16" else bnb_dequantized(base)
    quantized = {n for n in weights if n.endswith("_proj.weight")}
    companions = tuple(q + "." for q in quantized) + tuple(q.removesuffix("weight") + s for q in quantized for s in ("SCB", "weight_format"))
    want = {n: t for n, t in stored.items() if n not in quantized and not n.startswith(companions)}
    same_format = kind != "bf16" and BASES[kind].get("bnb_4bit_quant_type") == qt and (
        BASES[kind].get("bnb_4bit_use_double_quant") == dq) and bs == 64
    for name in quantized:
        if same_format and name not in bf16_case.targets:  # an untouched 4-bit weight is copied as it is
            want.update({k: v for k, v in stored.items() if k == name or k.startswith(name + ".")})
        else:
            want.update(bnb4_state_dict(name, merged_f32(bf16_case, name, weights[name]), qt, bs, dq, torch.bfloat16))
    return want


@pytest.mark.parametrize("case_name", list(M4_CASES))
def test_merged_4bit_bit_identical_to_bitsandbytes(case_name, bf16_case, qbase, merged, tmp_path):
    """Packed bytes and statistics = quantize_4bit on the whole float32 merged tensor, for 1, 3 and
    17 chunks; the shard is byte for byte what save_file writes for that state dict (so the double-
    quant JSON lengths were known before its header); config.json carries transformers' config."""
    from safetensors.torch import save_file

    _, opts, (qt, bs, dq) = M4_CASES[case_name]
    base = _m4_base(case_name, bf16_case, qbase)
    want = expected_4bit(case_name, bf16_case, qbase)
    save_file(want, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    expected_bytes = (tmp_path / "model.safetensors").read_bytes()
    plan = streammerge.plan(base, [bf16_case.adapter_path], method="merged_4bit", **opts)
    for max_rows, pieces in PIECES.items():
        if bs == 64:
            assert _probe_pieces(plan, max_rows) == pieces
        out = merged(base, bf16_case.adapter_path, method="merged_4bit", max_chunk_rows=max_rows, **opts)
        ours = load_safetensors_dir(out)
        assert sorted(ours) == sorted(want)
        for name in want:
            assert_bits_equal(ours[name], want[name], f"{name} (max_chunk_rows={max_rows})")
        assert (out / "model.safetensors").read_bytes() == expected_bytes
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["load_in_4bit"], q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"],
            q["bnb_4bit_compute_dtype"], q["bnb_4bit_quant_storage"]) == ("bitsandbytes", True, qt, dq, "bfloat16", "uint8")
    assert q["llm_int8_skip_modules"] == ["lm_head", "model.embed_tokens"]
    from transformers import BitsAndBytesConfig

    assert q == BitsAndBytesConfig.from_dict(q).to_dict()


def test_merged_4bit_blocksize_alignment(bf16_case, merged):
    """Blocks straddling rows (blocksize 256 over 64-wide rows: chunks start at multiples of 4 rows);
    odd max_chunk_rows are rounded to the alignment, and the bytes do not change."""
    plan = streammerge.plan(bf16_case.base_path, [bf16_case.adapter_path], method="merged_4bit", blocksize=256)
    t = next(t for t in plan.tensors if t.name == PROBE)
    chunks = list(chunks_of(t, plan_layout(plan), 7))
    assert [c.row_start for c in chunks[:3]] == [0, 4, 8]
    outs = [merged(bf16_case.base_path, bf16_case.adapter_path, method="merged_4bit", blocksize=256, max_chunk_rows=n)
            for n in (None, 7, 1)]
    data = [(o / "model.safetensors").read_bytes() for o in outs]
    assert data[0] == data[1] == data[2]
    ours = load_safetensors_dir(outs[0])
    w = load_safetensors_dir(bf16_case.base_path)[PROBE]
    want = bnb4_state_dict(PROBE, merged_f32(bf16_case, PROBE, w), "nf4", 256, True, torch.bfloat16)
    for k, v in want.items():
        assert_bits_equal(ours[k], v, k)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_merged_4bit_quantizes_merged_tiles(blocksize, bf16_case, tmp_path, monkeypatch):
    """A 16-bit source's merged rows are quantized tile by tile (never materialized whole): with tiles
    of a few rows, many tiles per chunk, tiles rounded to the block alignment (blocksize 256 over
    64-wide rows: 4 rows) and, where the alignment does not fit a tile (down_proj's 320-wide rows),
    the whole chunk at once; the bytes are bitsandbytes' for the whole merged tensor."""
    from streammerge import ops
    from streammerge.run.terms import TensorMath

    monkeypatch.setattr(ops, "TILE_ELEMENTS", 3 * 64)  # a tile: 5 rows of 64 (the widest row is 320)
    fused = []  # (row width, rows per tile, alignment) of every tile quantized without the whole chunk
    original = TensorMath.tiles

    def tiles(self, base_rows, row_start, work, align=1):
        for t0, t1, acc in original(self, base_rows, row_start, work, align):
            fused.append((base_rows.shape[1], t1 - t0, align))
            yield t0, t1, acc

    monkeypatch.setattr(TensorMath, "tiles", tiles)
    out = tmp_path / "out"
    streammerge.merge(bf16_case.base_path, [bf16_case.adapter_path], out, method="merged_4bit",
                      blocksize=blocksize, max_chunk_rows=40)
    align = blocksize // 64
    assert any(width == 64 and 1 < rows < 40 and rows % align == 0 for width, rows, _ in fused)  # tiles in chunks
    assert (320 in {w for w, _, _ in fused}) == (blocksize == 64)  # 320-wide rows: 4 aligned rows do not fit
    ours = load_safetensors_dir(out)
    base = load_safetensors_dir(bf16_case.base_path)
    for name in sorted(bf16_case.targets):
        want = bnb4_state_dict(name, merged_f32(bf16_case, name, base[name]), "nf4", blocksize, True, torch.bfloat16)
        for k, v in want.items():
            assert_bits_equal(ours[k], v, f"{k} (blocksize {blocksize})")


@pytest.mark.parametrize("case_name", ["nf4dq-from-bf16", "nf4dq-from-nf4dq", "fp4-from-bf16"])
def test_merged_4bit_loads_back(case_name, bf16_case, qbase, merged):
    """Params4bit.from_prequantized and transformers (config.json's quantization_config, CPU) load the
    output and dequantize to bitsandbytes' dequantization of the expected weights."""
    from transformers import AutoModelForCausalLM

    _, opts, _ = M4_CASES[case_name]
    base = _m4_base(case_name, bf16_case, qbase)
    out = merged(base, bf16_case.adapter_path, method="merged_4bit", **opts)
    want = expected_4bit(case_name, bf16_case, qbase)
    ours = load_safetensors_dir(out)
    weights = [n for n in want if n.endswith("_proj.weight")]
    assert len(weights) == 14
    expected = {}
    for name in weights:
        stats = {k[len(name) + 1:]: v for k, v in want.items() if k.startswith(name + ".")}
        qs = F.QuantState.from_dict(stats, device=torch.device("cpu"))
        expected[name] = F.dequantize_4bit(want[name], qs)
        p = bnb.nn.Params4bit.from_prequantized(
            ours[name], {k[len(name) + 1:]: v for k, v in ours.items() if k.startswith(name + ".")}, device="cpu")
        assert_bits_equal(F.dequantize_4bit(p.data, p.quant_state), expected[name], f"{name} via from_prequantized")

    model = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    mods = dict(model.named_modules())
    assert type(mods["lm_head"]) is torch.nn.Linear
    for name in weights:
        mod = mods[name.removesuffix(".weight")]
        assert isinstance(mod, bnb.nn.Linear4bit), name
        assert_bits_equal(F.dequantize_4bit(mod.weight.data, mod.weight.quant_state), expected[name], f"{name} via transformers")
    assert_bits_equal(model.model.embed_tokens.weight.data, want["model.embed_tokens.weight"], "embed_tokens")


def test_merged_4bit_default_format_follows_base(bf16_case, qbase):
    """Without --quant-type/--double-quant the output keeps the base's 4-bit format; with them, not."""
    plan = streammerge.plan(qbase("nf4"), [bf16_case.adapter_path], method="merged_4bit")
    q = plan.quantization_config
    assert (q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"]) == ("nf4", False)
    assert not any(t.name.endswith("nested_absmax") for t in plan.tensors)
    plan = streammerge.plan(qbase("nf4"), [bf16_case.adapter_path], method="merged_4bit", quant_type="fp4", double_quant=True)
    assert plan.quantization_config["bnb_4bit_quant_type"] == "fp4"
    assert any(t.name.endswith("quant_state.bitsandbytes__fp4") for t in plan.tensors)
    assert not any(t.op == "copy" and t.name.endswith("_proj.weight") for t in plan.tensors)  # all requantized
    plan = streammerge.plan(bf16_case.base_path, [bf16_case.adapter_path], method="merged_4bit")
    q = plan.quantization_config
    assert (q["bnb_4bit_quant_type"], q["bnb_4bit_use_double_quant"]) == ("nf4", True)


# --------------------------------------------------------------------------- --base-roundtrip


@pytest.mark.parametrize("dq", [True, False])
def test_base_roundtrip_equals_merge_onto_bnb_roundtrip(dq, bf16_case, merged):
    """--base-roundtrip nf4 == merging onto dequantize_4bit(quantize_4bit(W)) of each targeted linear
    weight (in W's dtype), whatever the chunking; untargeted tensors are untouched."""
    base = load_safetensors_dir(bf16_case.base_path)
    kw = dict(base_roundtrip="nf4", double_quant=dq)
    outs = [merged(bf16_case.base_path, bf16_case.adapter_path, max_chunk_rows=n, **kw) for n in (None, 19)]
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    ours = load_safetensors_dir(outs[0])
    plain = load_safetensors_dir(merged(bf16_case.base_path, bf16_case.adapter_path))
    for name, w in base.items():
        if name in bf16_case.targets:
            packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            w_rt = F.dequantize_4bit(packed, qs)
            assert w_rt.dtype == torch.bfloat16 and not torch.equal(w_rt, w)
            assert_bits_equal(ours[name], merged_f32(bf16_case, name, w_rt).to(torch.bfloat16), name)
            assert not torch.equal(ours[name], plain[name])
        else:
            assert_bits_equal(ours[name], w, name)


def test_base_roundtrip_with_merged_4bit(bf16_case, merged):
    """The round trip composes with a 4-bit output: quantize_4bit(W_rt + delta)."""
    out = merged(bf16_case.base_path, bf16_case.adapter_path, method="merged_4bit", base_roundtrip="nf4", max_chunk_rows=19)
    ours = load_safetensors_dir(out)
    w = load_safetensors_dir(bf16_case.base_path)[PROBE]
    w_rt = F.dequantize_4bit(*F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
    want = bnb4_state_dict(PROBE, merged_f32(bf16_case, PROBE, w_rt), "nf4", 64, True, torch.bfloat16)
    for k, v in want.items():
        assert_bits_equal(ours[k], v, k)


# --------------------------------------------------------------------------- codec pieces the GPU path uses


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [64 * 40, 64 * 40 + 37, 1001, (1 << 18) * 2 + 4096 * 3 + 7])
def test_torch_quantizer_and_absmax_equal_bitsandbytes(quant_type, n):
    """Our quantizer (every device runs it) and the absmax-only pass equal bitsandbytes' op: values on
    and next to every decision bound, zero blocks, -0.0, subnormals, NaN and inf, odd lengths, sizes
    over several tiles."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-4, 2, n)
    x[:64] = 0.0  # an all-zero block
    x[100] = -0.0
    x[200:264] = 1e-40  # subnormals
    bounds, _ = BQ._quantize_bounds(quant_type, torch.device("cpu"))
    block = torch.cat([bounds, torch.nextafter(bounds, bounds + 1), torch.nextafter(bounds, bounds - 1)])
    x[320:320 + block.numel()] = block  # scaled by their block's absmax 1.0 below: exactly on the bounds
    x[320 + block.numel()] = 1.0
    x[512:512 + block.numel()] = -block
    x[512 + block.numel()] = -1.0
    x[700] = float("nan")
    x[900] = float("inf")
    x[n - 1] = -float("inf")
    for bs in (64, 128, 4096):
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(x, bs, quant_type, torch.uint8)
        for tile in (None, n, 1000):  # CPU tiles, the whole chunk (as on a GPU), tiles of ~1000 values
            tp, ta = BQ._quantize_4bit_torch(x, bs, quant_type, tile=tile)
            assert torch.equal(tp, packed.reshape(-1)), tile
            assert torch.equal(ta.nan_to_num(), absmax.nan_to_num()) and torch.equal(ta.isnan(), absmax.isnan())
        finite = x.clone()
        finite[~finite.isfinite()] = 0.0
        assert torch.equal(BQ.block_absmax(finite, bs), torch.ops.bitsandbytes.quantize_4bit.default(finite, bs, quant_type, torch.uint8)[1])


def test_bitsandbytes_is_imported_without_its_compile_wrappers(qbase, bf16_case, tmp_path):
    """bnb4.bitsandbytes_functional imports bitsandbytes with torch.compile as the identity: a merge
    onto a 4-bit base does not build bitsandbytes' compile wrappers (which load torch._inductor's
    compiler, ~0.8 s), its output is unchanged, and torch.compile is restored."""
    code = (
        "import sys, torch, streammerge; compile_ = torch.compile; "
        f"streammerge.merge({str(qbase('nf4-dq'))!r}, [{str(bf16_case.adapter_path)!r}], {str(tmp_path / 'out')!r}); "
        "assert 'bitsandbytes' in sys.modules; "
        "assert 'torch._inductor.compile_fx' not in sys.modules; assert torch.compile is compile_"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = streammerge.merge(qbase("nf4-dq"), [bf16_case.adapter_path], tmp_path / "in-process")
    assert reference is not None
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "in-process" / "model.safetensors").read_bytes()


def test_bitsandbytes_import_is_never_seen_half_done():
    """A thread asking for bitsandbytes while another imports it waits for the whole module (Python
    lists a module in sys.modules before running it): B polls until the import has begun, then asks."""
    code = """
import sys, threading, time, torch
from streammerge.formats.codecs import bnb4
seen = []
def b():
    while "bitsandbytes.functional" not in sys.modules:
        time.sleep(0)
    seen.append(hasattr(bnb4.bitsandbytes_functional(), "get_4bit_type"))
t = threading.Thread(target=b); t.start()
bnb4.bitsandbytes_functional(); t.join()
assert seen == [True], seen
assert torch.compile.__module__.startswith("torch"), torch.compile
"""
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.cuda
def test_cuda_bytes_equal_cpu(bf16_case, qbase, merged):
    """CPU and CUDA paths write the same bytes (dequantize -> merge -> quantize on the device)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    runs = [
        (qbase("nf4-dq"), dict(method="merged_4bit", max_chunk_rows=19)),
        (qbase("nf4-dq"), dict(method="merged_16bit")),
        (qbase("fp4"), dict(method="merged_4bit", quant_type="nf4", double_quant=False)),
        (bf16_case.base_path, dict(method="merged_4bit", quant_type="fp4", max_chunk_rows=19)),  # fp4's two zero codes
        (qbase("int8"), dict(method="merged_4bit")),
        (bf16_case.base_path, dict(method="merged_4bit", base_roundtrip="nf4", max_chunk_rows=110)),
        (bf16_case.base_path, dict(method="merged_16bit", base_roundtrip="fp4")),
    ]
    for base, kw in runs:
        cpu = merged(base, bf16_case.adapter_path, device="cpu", **kw)
        gpu = merged(base, bf16_case.adapter_path, device="cuda", **kw)
        for a, b in zip(shard_files(cpu), shard_files(gpu)):
            assert a.read_bytes() == b.read_bytes(), f"{base.name} {kw}: {a.name} differs between CPU and CUDA"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw,message", [
    (dict(quant_type="fp4"), "--quant-type only applies to --method merged_4bit"),
    (dict(method="merged_4bit", quant_type="int4"), "--quant-type 'int4' is not supported"),
    (dict(method="merged_4bit", blocksize=100), "--blocksize 100 is not supported"),
    (dict(method="merged_4bit", blocksize="x"), "--blocksize 'x' is not a number"),
    (dict(double_quant=False), "describe a 4-bit format"),
    (dict(base_roundtrip="int8"), "--base-roundtrip 'int8' is not supported"),
])
def test_bad_4bit_options(kw, message):
    from streammerge.errors import OptionError
    from streammerge.options import MergeOptions

    with pytest.raises(OptionError, match=message):
        MergeOptions.create(**kw)


def test_4bit_refusals_write_nothing(bf16_case, qbase, make_base, make_adapter, tmp_path):
    """Round trip of an already-quantized base; GPT-2 Conv1D weights for merged_4bit (they would be
    quantized transposed): refused before anything is written; the CLI says so in one line."""
    from streammerge.errors import OptionError, UnsupportedError

    with pytest.raises(OptionError, match="is already quantized"):
        streammerge.merge(qbase("nf4-dq"), [bf16_case.adapter_path], tmp_path / "a", base_roundtrip="nf4")
    gpt2 = make_base("gpt2", dtype=torch.bfloat16)
    with pytest.raises(UnsupportedError, match="Conv1D"):
        streammerge.merge(gpt2, [make_adapter(gpt2).adapter_path], tmp_path / "b", method="merged_4bit")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    res = run_cli("merge", bf16_case.base_path, bf16_case.adapter_path, "--out", tmp_path / "c", "--quant-type", "fp4")
    assert res.returncode == 2 and res.stderr.startswith("error: --quant-type only applies") and len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_corrupt_quant_state_is_an_input_error(bf16_case, qbase, tmp_path):
    """A quant state whose shape disagrees with the packed bytes is refused at planning."""
    from safetensors.torch import load_file, save_file

    src = qbase("nf4")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    key = f"{PROBE}.quant_state.bitsandbytes__nf4"
    d = json.loads(bytes(sd[key].numpy()))
    d["shape"] = [321, 64]
    sd[key] = torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    from streammerge.errors import InputError

    with pytest.raises(InputError, match=f"{PROBE}: packed weight holds"):
        streammerge.plan(bad, [bf16_case.adapter_path])


# --------------------------------------------------------------------------- bounded memory


def test_merged_4bit_peak_rss_is_runtime_plus_budget(tmp_path):
    """4-bit base -> merged_4bit (two passes, statistics, quantizer temporaries) stays within
    runtime + --max-memory on a model several times the budget (runtime: the same merge of a tiny model)."""
    from peft import LoraConfig, get_peft_model
    from test_memory import peak_rss_of
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    budget = 16 * 10**6

    def case(root: Path, hidden, inter, layers, vocab) -> int:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(root / "bf16")
        lora = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "down_proj"])
        get_peft_model(model.float(), lora).save_pretrained(root / "lora")
        q = LlamaForCausalLM.from_pretrained(root / "bf16", device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
        q.save_pretrained(root / "q4")
        return (root / "q4" / "model.safetensors").stat().st_size

    big_bytes = case(tmp_path / "big", 512, 1024, 2, 16000)
    case(tmp_path / "tiny", 64, 128, 1, 128)
    assert big_bytes >= 2 * budget
    args = ("--method", "merged_4bit", "--max-memory", str(budget), "--device", "cpu", "--quiet")
    runtime = peak_rss_of("merge", str(tmp_path / "tiny/q4"), str(tmp_path / "tiny/lora"), "--out", str(tmp_path / "o1"), *args)
    peak = peak_rss_of("merge", str(tmp_path / "big/q4"), str(tmp_path / "big/lora"), "--out", str(tmp_path / "o2"), *args)
    print(f"4-bit model {big_bytes / 1e6:.0f} MB, budget {budget / 1e6:.0f} MB, runtime {runtime / 1e6:.0f} MB, "
          f"peak {peak / 1e6:.0f} MB, over runtime {(peak - runtime) / 1e6:.1f} MB")
    assert peak <= runtime + budget


@pytest.mark.parametrize("kind", ["nf4-dq", "bf16"])
def test_merged_4bit_sharded(kind, bf16_case, qbase, merged, tmp_path):
    """Small shards split a weight's tensors across files: every shard is still exactly save_file's
    bytes for its tensors, the index lists them all with the real total size (exact JSON lengths)."""
    from safetensors.torch import load_file, save_file

    case_name = "nf4dq-from-nf4dq" if kind == "nf4-dq" else "nf4dq-from-bf16"
    base = _m4_base(case_name, bf16_case, qbase)
    out = merged(base, bf16_case.adapter_path, method="merged_4bit", max_shard_size="7KB", max_chunk_rows=19)
    files = shard_files(out)
    assert len(files) > 5
    want = expected_4bit(case_name, bf16_case, qbase)
    ours = load_safetensors_dir(out)
    assert sorted(ours) == sorted(want)
    for name in want:
        assert_bits_equal(ours[name], want[name], name)
    where = {n: f.name for f in files for n in load_file(str(f))}
    weights = [n for n in want if n.endswith("_proj.weight")]
    split = [w for w in weights if len({where[n] for n in want if n == w or n.startswith(w + ".")}) > 1]
    assert split, "fixture error: no weight has its tensors in two shards"
    for f in files:
        save_file(load_file(str(f)), str(tmp_path / f.name), metadata={"format": "pt"})
        assert f.read_bytes() == (tmp_path / f.name).read_bytes(), f.name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    assert sorted(index["weight_map"]) == sorted(want)
    record = json.loads((out / "streammerge.json").read_text())
    assert [s["size"] for s in record["shards"]] == [f.stat().st_size for f in files]


@pytest.mark.parametrize("kind", ["nf4-dq", "bf16"])
def test_merged_4bit_resumes_byte_identical(kind, bf16_case, qbase, merged, tmp_path, monkeypatch):
    """An interrupted 4-bit merge resumes: shards whose layout (double-quant JSON lengths) was resolved
    at run time are verified against the journaled layout, a weight's statistics are recomputed for
    its parts still to write (some in the next shard), and the result equals an uninterrupted run."""
    import threading

    from streammerge.run import journal as jr
    from streammerge.errors import Interrupted

    case_name = "nf4dq-from-nf4dq" if kind == "nf4-dq" else "nf4dq-from-bf16"
    base = _m4_base(case_name, bf16_case, qbase)
    opts = dict(method="merged_4bit", max_shard_size="7KB", max_chunk_rows=19, device="cpu")
    reference = merged(base, bf16_case.adapter_path, **opts)
    ref_files = {p.name: p.read_bytes() for p in reference.iterdir() if p.name != "streammerge.json"}
    total = len(streammerge.plan(base, [bf16_case.adapter_path], **opts).tensors)
    original = jr.Run.tensor_done
    layouts_seen = 0
    for stop_after in (1, total // 3, total // 2 + 1, total - 1):
        out = tmp_path / f"stop{stop_after}"
        cancel = threading.Event()
        calls = [0]

        def tensor_done(self, shard, tensor, digest, calls=calls, cancel=cancel, stop_after=stop_after):
            original(self, shard, tensor, digest)
            calls[0] += 1
            if calls[0] == stop_after:
                cancel.set()

        monkeypatch.setattr(jr.Run, "tensor_done", tensor_done)
        with pytest.raises(Interrupted):
            streammerge.merge(base, [bf16_case.adapter_path], out, cancel=cancel, **opts)
        monkeypatch.setattr(jr.Run, "tensor_done", original)
        assert not (out / "model.safetensors.index.json").exists()
        records = jr.read_records(out / ".streammerge" / "journal.jsonl")
        layouts_seen += sum(r["t"] == "layout" for r in records)
        result = streammerge.merge(base, [bf16_case.adapter_path], out, **opts)
        assert result.resumed_tensors == stop_after
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "streammerge.json"} == ref_files
        ours, ref = (json.loads((d / "streammerge.json").read_text()) for d in (out, reference))
        assert ours["shards"] == ref["shards"] and ours["total_size"] == ref["total_size"]
    assert layouts_seen > 0, "fixture error: no shard layout was resolved at run time"


def test_merged_4bit_from_a_config_without_architectures(bf16_case, merged, tmp_path):
    """A config.json without `architectures` (written by LlamaConfig.save_pretrained, or by hand):
    the linear layers come from the model type's causal LM, and the output is the same."""
    base = tmp_path / "base"
    shutil.copytree(bf16_case.base_path, base)
    config = json.loads((base / "config.json").read_text())
    del config["architectures"]
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(bf16_case.adapter_path)], str(out), method="merged_4bit", device="cpu")
    reference = merged(bf16_case.base_path, bf16_case.adapter_path, method="merged_4bit")
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
