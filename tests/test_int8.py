"""streammerge.formats.codecs.int8 against bitsandbytes / transformers' LLM.int8() checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from streammerge.formats.codecs import int8 as I


def _rows(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    scb = torch.rand(shape[0], generator=g) * torch.logspace(-6, 3, shape[0])
    scb[0] = 0.0  # all-zero row
    scb[1] = 65504.0  # fp16 max
    return a, scb


@pytest.mark.parametrize("shape", [(7, 5), (64, 96), (300, 33)])
def test_dequantize_matches_bitsandbytes_in_any_row_chunking(shape):
    F = pytest.importorskip("bitsandbytes.functional")
    a, scb = _rows(shape, seed=shape[0])
    want = F.int8_vectorwise_dequant(a, scb)
    assert want.dtype == torch.float32
    got = I.dequantize_int8_rows(a, scb)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    for cuts in ([0, shape[0]], [0, 1, 3, shape[0]], [0, *range(2, shape[0], 2), shape[0]]):
        parts = [I.dequantize_int8_rows(a[r0:r1], scb[r0:r1]) for r0, r1 in zip(cuts[:-1], cuts[1:])]
        assert torch.equal(torch.cat(parts), want)
    if shape == (300, 33):  # evaluation order matters in float32, so the check above has teeth
        assert not torch.equal(a * (scb.view(-1, 1) * I.INV_127), want)


def _sd(prefix="m.", shape=(8, 4), fmt_value=0, fmt_dtype=torch.uint8):
    return {
        f"{prefix}weight": torch.zeros(shape, dtype=torch.int8),
        f"{prefix}SCB": torch.ones(shape[0]),
        f"{prefix}weight_format": torch.tensor(fmt_value, dtype=fmt_dtype),
    }


def test_parse_int8_validates():
    fmt = I.parse_int8("m.weight", _sd())
    assert fmt == I.Int8Format((8, 4)) and I.Int8Format.from_json(json.loads(json.dumps(fmt.to_json()))) == fmt
    no_fmt = {k: v for k, v in _sd().items() if not k.endswith("weight_format")}
    assert I.parse_int8("m.weight", no_fmt).weight_format == "row"  # bitsandbytes' default
    meta = {k: (v.to("meta") if not k.endswith("weight_format") else v) for k, v in _sd().items()}
    assert I.parse_int8("m.weight", meta) == fmt
    assert I.int8_weight_names(list(_sd()) + ["x.weight", "y.SCB"]) == ["m.weight"]
    assert I.companion_names("m.weight") == ["m.SCB", "m.weight_format"]

    bad = _sd()
    bad["m.SCB"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"m.SCB: expected float32 \[8\]"):
        I.parse_int8("m.weight", bad)
    bad = _sd()
    bad["m.weight"] = torch.zeros(8, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be int8"):
        I.parse_int8("m.weight", bad)
    with pytest.raises(ValueError, match="'col32'"):
        I.parse_int8("m.weight", _sd(fmt_value=1))
    with pytest.raises(ValueError, match="not a known"):
        I.parse_int8("m.weight", _sd(fmt_value=9))
    with pytest.raises(ValueError, match="SCB are missing"):
        I.parse_int8("m.weight", {"m.weight": torch.zeros(8, 4, dtype=torch.int8)})
    with pytest.raises(ValueError, match="must end with '.weight'"):
        I.parse_int8("m.bias", _sd())
    with pytest.raises(ValueError, match="SCB rows"):
        I.dequantize_int8_rows(torch.zeros(3, 4, dtype=torch.int8), torch.ones(2))


def test_real_transformers_8bit_checkpoint(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = LlamaForCausalLM.from_pretrained(
        tmp_path / "bf16", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    model.save_pretrained(tmp_path / "q8")
    saved = load_file(tmp_path / "q8" / "model.safetensors")
    orig = load_file(tmp_path / "bf16" / "model.safetensors")
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(modules) == 14
    assert I.int8_weight_names(saved) == sorted(f"{n}.weight" for n, _ in modules)
    for mod_name, mod in modules:
        name = f"{mod_name}.weight"
        fmt = I.parse_int8(name, saved)
        assert fmt.shape == tuple(orig[name].shape)
        assert saved[f"{mod_name}.weight_format"].dtype == torch.uint8 and saved[f"{mod_name}.weight_format"].dim() == 0
        assert saved[f"{mod_name}.SCB"].dtype == torch.float32
        assert sorted(k for k in saved if k.startswith(mod_name + ".")) == sorted([name, *I.companion_names(name)])
        # the saved bytes are bitsandbytes' row-wise quantization of the fp16-cast weight
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(orig[name].half())
        assert torch.equal(saved[name], cb) and torch.equal(saved[f"{mod_name}.SCB"], scb)
        # row-chunked dequantization == transformers' / PEFT's dequantize_bnb_weight of the loaded module
        want = dequantize_bnb_weight(mod.weight, mod.state)
        w, s = saved[name], saved[f"{mod_name}.SCB"]
        got = torch.cat([I.dequantize_int8_rows(w[r0:r1], s[r0:r1]) for r0, r1 in ((0, 5), (5, 6), (6, w.shape[0]))])
        assert want.dtype == torch.float32 and torch.equal(got, want)
