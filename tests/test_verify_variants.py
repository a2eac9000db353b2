"""`streammerge verify` on every LoRA variant and on 4-bit inputs/outputs: passes on our merges and on
PEFT's merge_and_unload + save_pretrained, fails naming the tensor on corrupted folders.

Corruptions are computed from the folders themselves (base, PEFT's merged model) and bitsandbytes'
quantize_4bit, never with streammerge's code. streammerge.json is removed from corrupted folders so
the value checks (not the shard checksum) must catch them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import streammerge
from conftest import load_safetensors_dir, shard_files
from models import EXPERT_PARAMS
from test_verify import copy_folder, edit_tensors, faults_of, flip_byte

# variant -> (arch, adapter kwargs, tensor to corrupt, report category of that tensor)
VARIANTS = {
    "dora-rows": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
                  "model.layers.0.self_attn.q_proj.weight", "recompute"),
    "dora-columns": ("gpt2", dict(target_modules=["c_attn", "c_proj"], use_dora=True),
                     "transformer.h.0.attn.c_attn.weight", "recompute"),
    "lora-bias": ("qwen2", dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
                  "model.layers.0.self_attn.q_proj.bias", "bias_add"),
    "modules-to-save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head", "norm"]),
                        "lm_head.weight", "replace"),
    "trainable-tokens": ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[5, 77, 150]),
                         "model.embed_tokens.weight", "token_rows"),
    "moe-fused": ("gpt_oss", dict(target_modules=["q_proj"], target_parameters=EXPERT_PARAMS),
                  "model.layers.0.mlp.experts.gate_up_proj", "recompute"),
    "moe-per-expert": ("qwen3_moe", dict(target_modules=["q_proj"], target_parameters=EXPERT_PARAMS),
                       "model.layers.0.mlp.experts.1.up_proj.weight", "merge"),
}


def verify(out, base, adapters, **kw):
    kw.setdefault("device", "cpu")
    return streammerge.verify(str(out), str(base), [str(a) for a in adapters], **kw)


@pytest.fixture(scope="module")
def variant(make_base, make_adapter, tmp_path_factory):
    """variant(name) -> (base, adapter case, our merged folder, PEFT's merged folder), cached."""
    cache = {}

    def build(name):
        if name not in cache:
            arch, kw, _, _ = VARIANTS[name]
            base = make_base(arch)
            perturb = not name.startswith("moe")
            case = make_adapter(base, perturb=perturb, save_merged=True, **kw)
            out = tmp_path_factory.mktemp(f"vv-{name}") / "out"
            streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", max_chunk_rows=5)
            cache[name] = (base, case, out, case.adapter_path / "peft-merged")
        return cache[name]

    return build


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_passes_on_ours_and_peft(name, variant):
    base, case, out, peft = variant(name)
    _, _, tensor, category = VARIANTS[name]
    report = verify(out, base, [case.adapter_path], max_chunk_rows=7, max_memory="8MB")
    assert report.ok, report.table_lines()
    assert report.checks[category]["checked"] > 0 and report.checks["checksum"]["failed"] == 0
    assert tensor in {r.name for r in report.tensors}
    report = verify(peft, base, [case.adapter_path])
    assert report.ok, report.table_lines()
    assert report.checks[category]["checked"] > 0


def test_dora_bf16_base_passes(make_base, make_adapter, tmp_path):
    """bf16 output rounding (DoRA on a bf16 GPT-2: column norms)."""
    base = make_base("gpt2", dtype=torch.bfloat16)
    case = make_adapter(base, target_modules=["c_attn", "c_proj"], use_dora=True, perturb=True, seed=4)
    streammerge.merge(str(base), [str(case.adapter_path)], str(tmp_path / "out"), device="cpu")
    report = verify(tmp_path / "out", base, [case.adapter_path], max_chunk_rows=3)
    assert report.ok, report.table_lines()
    assert report.checks["recompute"]["checked"] == 6  # c_attn, attn.c_proj, mlp.c_proj in 2 layers


@pytest.mark.parametrize("fault", ["delta missing", "delta doubled", "byte flipped"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_faults_are_named(name, fault, variant, tmp_path):
    base, case, out, peft = variant(name)
    _, _, tensor, category = VARIANTS[name]
    bad = copy_folder(out, tmp_path / "bad", keep_record=False)
    w = load_safetensors_dir(base)[tensor]
    row, width = 0, 1
    if fault == "byte flipped":
        shard = next(f for f in shard_files(bad) if tensor in load_file(f))
        row = 77 if name == "trainable-tokens" else 2 if w.ndim > 1 and w.shape[0] > 2 else 0
        width = w[0].numel() if w.ndim > 1 else 1
        flip_byte(shard, tensor, element=row * width + 3, byte_in_element=3)  # f32 sign/exponent byte
    else:
        merged = load_safetensors_dir(peft)[tensor].double()
        factor = 0.0 if fault == "delta missing" else 2.0
        replacement = (w.double() + factor * (merged - w.double())).to(w.dtype)

        def put(t):
            t[tensor] = replacement

        edit_tensors(bad, put)
    report = verify(bad, base, [case.adapter_path], max_chunk_rows=7)
    assert not report.ok
    assert [s for _, s in faults_of(report)] == [tensor], report.table_lines()
    kind = report.faults[0].kind
    if category == "replace":
        assert kind == "bytes differ"
    elif fault == "delta missing":
        assert kind == "delta missing", report.table_lines()
    elif fault == "delta doubled" and not name.startswith("dora") and name != "trainable-tokens":
        assert kind == "scale off" and "2.0×" in report.faults[0].message, report.table_lines()
    elif fault == "byte flipped":
        assert kind == "values differ" and report.faults[0].data["first_row"] == (row * width + 3) // width
    else:  # DoRA's rescaling of a doubled delta / token rows doubled: named, some value fault
        assert kind in ("wrong delta", "scale off", "values differ"), report.table_lines()
    assert report.checks[category]["failed"] == 1


def test_replaced_by_other_adapters_tensor(variant, make_adapter, tmp_path):
    """modules_to_save: the saved lm_head of another adapter (other seed) is found."""
    base, case, out, _ = variant("modules-to-save")
    _, kw, tensor, _ = VARIANTS["modules-to-save"]
    other = make_adapter(base, perturb=True, seed=9, **kw)
    bad = copy_folder(out, tmp_path / "bad", keep_record=False)
    streammerge.merge(str(base), [str(other.adapter_path)], str(tmp_path / "other"), device="cpu")
    theirs = load_safetensors_dir(tmp_path / "other")[tensor]
    edit_tensors(bad, lambda t: t.__setitem__(tensor, theirs))
    report = verify(bad, base, [case.adapter_path])
    assert faults_of(report) == [("bytes differ", tensor)] and "adapter's saved tensor" in report.faults[0].message


def test_unknown_ops_are_refused(variant):
    """Anything without a check is refused by name, never passed unchecked."""
    from streammerge.verification.dispatch import unverifiable

    base, case, _, _ = variant("lora-bias")
    plan = streammerge.plan(str(base), [str(case.adapter_path)])
    assert unverifiable(plan) == {}
    t = plan.tensors[0]
    odd = dataclasses.replace(plan, shards=(dataclasses.replace(plan.shards[0], tensors=(dataclasses.replace(t, op="conv"),)),))
    assert unverifiable(odd) == {"conv": [t.name]}


# ------------------------------------------------------------------------------------ 4-bit

bnb = pytest.importorskip("bitsandbytes")
from test_4bit import PROBE, bf16_case, bnb4_state_dict, bnb_dequantized, merged, merged_f32, qbase  # noqa: E402,F401

M4 = {
    # name: (base kind, merge options)
    "nf4dq-from-bf16": ("bf16", dict(method="merged_4bit")),
    "fp4-from-bf16": ("bf16", dict(method="merged_4bit", quant_type="fp4", double_quant=False)),
    "nf4dq-from-nf4dq": ("nf4-dq", dict(method="merged_4bit")),
    "nf4-bs128-from-nf4": ("nf4", dict(method="merged_4bit", blocksize=128)),
    "16bit-from-nf4dq": ("nf4-dq", {}),
    "16bit-from-int8": ("int8", {}),
}


def _base4(kind, bf16_case, qbase):
    return bf16_case.base_path if kind == "bf16" else qbase(kind)


@pytest.mark.parametrize("name", list(M4))
def test_4bit_passes(name, bf16_case, qbase, merged):
    kind, opts = M4[name]
    base = _base4(kind, bf16_case, qbase)
    out = merged(base, bf16_case.adapter_path, max_chunk_rows=19, **opts)
    report = verify(out, base, [bf16_case.adapter_path], max_chunk_rows=23, **opts)
    assert report.ok, report.table_lines()
    if opts.get("method") == "merged_4bit":
        # 8 targeted weights requantized; the untouched ones too unless already in the output's format (copied)
        assert report.checks["quant"]["checked"] == (8 if kind == "nf4-dq" else 14)
        assert report.checks["quant_stats"]["checked"] >= 3 * report.checks["quant"]["checked"]
    else:
        assert report.checks["merge"]["checked"] == 8 and report.checks["dequant"]["checked"] == 6


@pytest.mark.parametrize("fault", ["delta missing", "delta doubled", "byte flipped", "absmax flipped", "quant_map"])
def test_4bit_output_faults_are_named(fault, bf16_case, merged, tmp_path):
    """nf4 + double quant from the bf16 base; the corrupted weight is what bitsandbytes' quantize_4bit
    makes of the wrong merged tensor (statistics included)."""
    base = bf16_case.base_path
    out = merged(base, bf16_case.adapter_path, method="merged_4bit", max_chunk_rows=19)
    bad = copy_folder(out, tmp_path / "bad", keep_record=False)
    w = load_safetensors_dir(base)[PROBE]
    if fault in ("delta missing", "delta doubled"):
        m = w.float() if fault == "delta missing" else 2 * merged_f32(bf16_case, PROBE, w) - w.float()
        wrong = bnb4_state_dict(PROBE, m, "nf4", 64, True, torch.bfloat16)
        edit_tensors(bad, lambda t: t.update(wrong))
    elif fault == "quant_map":
        edit_tensors(bad, lambda t: t.__setitem__(f"{PROBE}.quant_map", t[f"{PROBE}.quant_map"].flip(0).contiguous()))
    else:
        name = PROBE if fault == "byte flipped" else f"{PROBE}.absmax"
        sd = load_file(shard_files(bad)[0])
        t = sd[name]
        t.view(torch.uint8).view(-1)[37] ^= 0x88 if fault == "byte flipped" else 0x40
        edit_tensors(bad, lambda d: d.__setitem__(name, t))
    report = verify(bad, base, [bf16_case.adapter_path], method="merged_4bit", max_chunk_rows=23)
    want = {"delta missing": ("delta missing", PROBE), "delta doubled": ("scale off", PROBE),
            "byte flipped": ("values differ", PROBE), "absmax flipped": ("absmax differs", f"{PROBE}.absmax"),
            "quant_map": ("bytes differ", f"{PROBE}.quant_map")}[fault]
    assert faults_of(report) == [want], report.table_lines()
    if fault == "delta doubled":
        assert abs(report.faults[0].data["factor"] - 2) < 0.1


def test_16bit_from_4bit_base_delta_missing(bf16_case, qbase, merged, tmp_path):
    """merged_16bit from an nf4 base: the probe test runs on the dequantized base rows."""
    base = qbase("nf4-dq")
    out = merged(base, bf16_case.adapter_path, max_chunk_rows=19)
    bad = copy_folder(out, tmp_path / "bad", keep_record=False)
    w_deq = bnb_dequantized(base)[PROBE]  # bitsandbytes' own dequantize_4bit (bf16)
    edit_tensors(bad, lambda t: t.__setitem__(PROBE, w_deq.to(torch.bfloat16)))
    report = verify(bad, base, [bf16_case.adapter_path])
    assert faults_of(report) == [("delta missing", PROBE)], report.table_lines()


def test_verify_4bit_dora_peak_rss_is_runtime_plus_budget(tmp_path):
    """verify of a merged_4bit output of a 4-bit base with DoRA and LoRA terms (decoded base rows,
    recomputed DoRA rows, dequantized output codes, statistics) stays within runtime + --max-memory."""
    from peft import LoraConfig, get_peft_model
    from test_memory import peak_rss_of
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    budget = 16 * 10**6

    def case(root, hidden, inter, vocab) -> int:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=8,
                          num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(root / "bf16")
        lora = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, use_dora=True, target_modules=["q_proj", "down_proj"])
        get_peft_model(model.float(), lora).save_pretrained(root / "lora")
        q = LlamaForCausalLM.from_pretrained(root / "bf16", device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
        q.save_pretrained(root / "q4")
        streammerge.merge(str(root / "q4"), [str(root / "lora")], str(root / "out"), method="merged_4bit", device="cpu")
        return (root / "out" / "model.safetensors").stat().st_size

    big_bytes = case(tmp_path / "big", 512, 1024, 16000)
    # the runtime: a ~1 MB model, as in test_memory big enough for the parallel kernel paths (a few MB, once)
    case(tmp_path / "tiny", 256, 512, 1000)
    assert big_bytes >= 1.5 * budget

    def peak(root) -> int:
        return peak_rss_of("verify", str(root / "out"), "--base", str(root / "q4"), "--adapter", str(root / "lora"),
                           "--method", "merged_4bit", "--max-memory", str(budget), "--device", "cpu", "--quiet")

    runtime, used = peak(tmp_path / "tiny"), peak(tmp_path / "big")
    print(f"4-bit output {big_bytes / 1e6:.0f} MB, budget {budget / 1e6:.0f} MB, runtime {runtime / 1e6:.0f} MB, "
          f"verify peak {used / 1e6:.0f} MB, over runtime {(used - runtime) / 1e6:.1f} MB")
    assert used <= runtime + budget
