"""`streammerge verify` checks every merged element: one wrong element is a fault.

The case of the issue: a merged weight with a single element moved ~100 ulps (in a 256×256 q_proj)
in a folder without streammerge.json (as PEFT, Unsloth or axolotl write them). Each test edits ONE
element (or one 4-bit code / quantization block) of a merge's stored bytes, removes streammerge.json,
and asserts that verify names the tensor and counts 1 element out of bound. For the 16/32-bit
safetensors outputs the same folder passes `fast=True` (the probe test, verify's default before: a
bound on each whole row, under which one element hides) — those tests fail on the probe-only verify.
merged_4bit and GGUF outputs were already checked element by element; their tests guard that.
Folders written by PEFT's merge_and_unload + save_pretrained (bf16 with float32 or bf16 factors,
f16, f32, two adapters merged one after the other, embedding LoRA) pass.

Edits are made on raw bits (safetensors offsets, GGUF block layouts), never with streammerge's code.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

import streammerge
from conftest import load_safetensors_dir, run_cli, safetensors_header, shard_files

LLAMA256 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=False)
Q = "model.layers.0.self_attn.q_proj.weight"  # 256×256, merged
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_INT = {2: torch.int16, 4: torch.int32}


def verify(out, base, adapters, **kw):
    kw.setdefault("device", "cpu")
    return streammerge.verify(str(out), str(base), [str(a) for a in adapters], **kw)


def faults_of(report) -> list[tuple[str, str]]:
    return [(f.kind, f.subject) for f in report.faults]


def without_record(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "streammerge.json").unlink(missing_ok=True)
    return dst


def small_element(folder: Path, name: str) -> int:
    """Flat index of an element about a quarter of the tensor's RMS in size (like −0.00522 in a q_proj
    whose largest value is 0.2): its ulps are small next to its row's, as in the issue."""
    w = load_safetensors_dir(folder)[name].float()
    rms = float(w.square().mean().sqrt())
    hits = ((w.abs() > 0.2 * rms) & (w.abs() < 0.3 * rms)).reshape(-1).nonzero()
    return int(hits[len(hits) // 2, 0])


def move_ulps(folder: Path, name: str, element: int, ulps: int) -> tuple[float, float]:
    """Move one stored element `ulps` representable values towards zero, in the file; (old, new)."""
    (shard,) = [f for f in shard_files(folder) if name in safetensors_header(f)]
    entry = safetensors_header(shard)[name]
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[entry["dtype"]]
    size = torch.finfo(dtype).bits // 8
    (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
    offset = 8 + n + entry["data_offsets"][0] + element * size
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        raw = bytearray(fh.read(size))
        old = torch.frombuffer(bytearray(raw), dtype=dtype)
        bits = torch.frombuffer(raw, dtype=_INT[size])
        assert int(bits[0]) & (2 ** (8 * size - 1) - 1) > ulps  # the magnitude bits: stays on its side of zero
        bits -= ulps  # sign-magnitude: the magnitude bits shrink whatever the sign
        fh.seek(offset)
        fh.write(bytes(raw))
    return float(old[0]), float(torch.frombuffer(bytearray(raw), dtype=dtype)[0])


def assert_one_element(report, name: str, element: int, width: int, total: int) -> None:
    assert faults_of(report) == [("values differ", name)], report.table_lines()
    fault = report.faults[0]
    assert fault.data["elements_failing"] == 1 and fault.data["rows_failing"] == 1
    assert (fault.data["worst"]["row"], fault.data["worst"]["col"]) == divmod(element, width)
    assert f"1 of {total} elements out of bound" in fault.message
    assert report.checks["merge"]["failed"] == 1


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cases(make_base, make_adapter, tmp_path_factory):
    """cases(dtype) -> (base, adapter case, our merge): a 256-wide Llama in that dtype, rank 8."""
    made = {}

    def get(dtype: str):
        if dtype not in made:
            base = make_base("llama", dtype=DTYPES[dtype], **LLAMA256)
            case = make_adapter(base, r=8, lora_alpha=16)
            out = tmp_path_factory.mktemp(f"ew-{dtype}") / "out"
            streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu")
            made[dtype] = (base, case, out)
        return made[dtype]

    return get


def peft_folder(base: Path, adapters: list[Path], out: Path, dtype: torch.dtype, bf16_factors: bool = False) -> Path:
    """What PEFT writes: load in `dtype`, merge_and_unload each adapter in turn, save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter), autocast_adapter_dtype=not bf16_factors).merge_and_unload()
    model.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------- 16/32-bit outputs


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_one_element_off_by_100_ulps_is_a_fault(dtype, cases, tmp_path):
    base, case, out = cases(dtype)
    report = verify(out, base, [case.adapter_path])
    assert report.ok and report.mode == "element-wise", report.table_lines()
    merged = [r for r in report.tensors if r.op == "merge"]
    assert len(merged) == len(case.targets) and all(r.resolvable and r.margin <= 1 for r in merged)

    bad = without_record(out, tmp_path / "bad")
    element = small_element(bad, Q)
    old, new = move_ulps(bad, Q, element, 100)
    assert 0 < abs(old - new) < abs(old)  # towards zero, same sign
    report = verify(bad, base, [case.adapter_path], max_chunk_rows=37)  # several chunks and tiles
    assert_one_element(report, Q, element, 256, 256 * 256)
    assert f"stored {new:.6g}" in report.faults[0].message
    # the probe test (verify --fast, the default before) bounds whole rows: one element hides under it
    assert verify(bad, base, [case.adapter_path], fast=True).ok


def test_cli_names_the_tensor_and_the_count(cases, tmp_path):
    base, case, out = cases("bf16")
    bad = without_record(out, tmp_path / "bad")
    element = small_element(bad, Q)
    move_ulps(bad, Q, element, 100)
    res = run_cli("verify", bad, "--base", base, "--adapter", case.adapter_path, "--device", "cpu")
    assert res.returncode == 1, res.stderr
    assert f"FAIL {Q}: values differ: 1 of 65536 elements out of bound in 1 of 256 rows" in res.stdout
    assert f"at row {element // 256} col {element % 256}" in res.stdout
    res = run_cli("verify", bad, "--base", base, "--adapter", case.adapter_path, "--device", "cpu", "--json")
    data = json.loads(res.stdout)
    assert data["mode"] == "element-wise" and data["faults"][0]["data"]["elements_failing"] == 1
    res = run_cli("verify", bad, "--base", base, "--adapter", case.adapter_path, "--device", "cpu", "--json", "--fast")
    assert res.returncode == 0 and json.loads(res.stdout)["mode"] == "fast"


def test_whole_tensor_faults_keep_their_names_and_hashing_is_one_pass(cases, tmp_path):
    """A failing tensor is read twice (its diagnosis); the shard's sha256 is still of one pass, and
    the diagnosis of a wrong adapter weight is "scale off by 2.0×" for every merged tensor."""
    base, case, out = cases("bf16")
    report = verify(out, base, [f"{case.adapter_path}@0.5"])
    assert report.checks["checksum"] == {"checked": 1, "failed": 0}
    scale = [f for f in report.faults if f.kind == "scale off"]
    assert len(scale) == len(case.targets) and all("scale off by 2.0×" in f.message for f in scale)
    assert all("elements out of bound" in f.message for f in scale)
    assert {f.kind for f in report.faults} == {"scale off", "record mismatch"}


# --------------------------------------------------------------------------------- PEFT's folders


@pytest.mark.parametrize("how", ["bf16", "bf16-bf16-factors", "f16", "f32"])
def test_peft_folders_pass_and_one_element_off_is_found(how, cases, tmp_path):
    dtype = how.split("-")[0]
    base, case, _ = cases(dtype)
    peft = peft_folder(base, [case.adapter_path], tmp_path / "peft", DTYPES[dtype], bf16_factors=how.endswith("factors"))
    report = verify(peft, base, [case.adapter_path])
    assert report.ok, report.table_lines()
    assert report.checks["merge"]["checked"] == len(case.targets)
    element = small_element(peft, Q)
    move_ulps(peft, Q, element, 100)
    assert_one_element(verify(peft, base, [case.adapter_path]), Q, element, 256, 256 * 256)


def test_peft_two_adapters_merged_one_after_the_other_pass(cases, make_adapter, tmp_path):
    """PEFT on a bf16 model, adapter 1 merged and rounded, then adapter 2: two roundings per element."""
    base, case, _ = cases("bf16")
    other = make_adapter(base, r=4, lora_alpha=16, seed=5, target_modules=["q_proj", "v_proj", "down_proj"])
    adapters = [case.adapter_path, other.adapter_path]
    peft = peft_folder(base, adapters, tmp_path / "peft", torch.bfloat16)
    report = verify(peft, base, adapters)
    assert report.ok, report.table_lines()
    element = small_element(peft, Q)
    move_ulps(peft, Q, element, 100)
    assert_one_element(verify(peft, base, adapters), Q, element, 256, 256 * 256)


def test_peft_embedding_lora_passes_and_one_element_off_is_found(cases, make_adapter, tmp_path):
    """Embedding LoRA (delta (B·A)ᵀ, rows = vocabulary) on a bf16 model, ours and PEFT's."""
    base, _, _ = cases("bf16")
    case = make_adapter(base, r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"])
    ours = tmp_path / "ours"
    streammerge.merge(str(base), [str(case.adapter_path)], str(ours), device="cpu")
    peft = peft_folder(base, [case.adapter_path], tmp_path / "peft", torch.bfloat16)
    emb = "model.embed_tokens.weight"
    for folder in (ours, peft):
        report = verify(folder, base, [case.adapter_path])
        assert report.ok, report.table_lines()
        assert {r.name for r in report.tensors if r.op == "merge"} >= {emb, Q}
    (ours / "streammerge.json").unlink()
    element = small_element(ours, emb)
    move_ulps(ours, emb, element, 100)
    vocab = load_safetensors_dir(base)[emb].shape[0]
    assert_one_element(verify(ours, base, [case.adapter_path]), emb, element, 256, vocab * 256)


# --------------------------------------------------------------------------------- merged_4bit

bnb = pytest.importorskip("bitsandbytes")
from test_4bit import PROBE, bf16_case, merged  # noqa: E402,F401  (fixtures)


def _edit_tensor_byte(folder: Path, name: str, index: int, mask: int) -> None:
    (shard,) = [f for f in shard_files(folder) if name in safetensors_header(f)]
    (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
    offset = 8 + n + safetensors_header(shard)[name]["data_offsets"][0] + index
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        value = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([value ^ mask]))


def test_merged_4bit_one_code_and_one_block(bf16_case, merged, tmp_path):
    """Regression guard (already element-wise before): one 4-bit code (the low nibble of byte 37 is
    element 75) moved 8 code-book places is 1 element out of its block's quantization step; one block's
    absmax changed is 1 block."""
    base = bf16_case.base_path
    out = merged(base, bf16_case.adapter_path, method="merged_4bit")
    width = load_safetensors_dir(base)[PROBE].shape[1]
    code = without_record(out, tmp_path / "code")
    _edit_tensor_byte(code, PROBE, 37, 0x08)
    report = verify(code, base, [bf16_case.adapter_path], method="merged_4bit", max_chunk_rows=23)
    assert faults_of(report) == [("values differ", PROBE)], report.table_lines()
    fault = report.faults[0]
    assert fault.data["elements_failing"] == 1
    assert (fault.data["worst"]["row"], fault.data["worst"]["col"]) == divmod(75, width)
    assert "1 of " in fault.message and " elements out of bound" in fault.message

    block = without_record(out, tmp_path / "block")
    _edit_tensor_byte(block, f"{PROBE}.absmax", 5, 0x40)  # double quant: one uint8 per block
    report = verify(block, base, [bf16_case.adapter_path], method="merged_4bit")
    assert ("absmax differs", f"{PROBE}.absmax") in faults_of(report), report.table_lines()
    absmax = next(f for f in report.faults if f.kind == "absmax differs")
    assert absmax.data["blocks"] == 1 and absmax.data["first_block"] == 5


# --------------------------------------------------------------------------------- GGUF

from test_gguf_verify import case, gguf_file, merge, tensor_info  # noqa: E402,F401  (fixtures and helpers)
from test_gguf_verify import verify as verify_gguf  # noqa: E402

DOWN = "blk.1.ffn_down.weight"  # merged, not permuted
# gguf type -> [(byte in the tensor's data, xor mask, elements out of bound)]: one element, or one block
GGUF_EDITS = {
    "bf16": [(2 * 9, 0x40, 1)],  # element 9: its top mantissa bit (64 ulps)
    "f16": [(2 * 9, 0x80, 1)],  # element 9: mantissa bit 7 (128 ulps)
    "q8_0": [(2 + 9, 0x20, 1), (1, 0x04, None)],  # block 0: quant 9 moved 32 steps; its f16 scale's exponent
    "q4_0": [(2 + 9, 0x08, 1)],  # block 0: element 9 (low nibble of byte 9) moved 8 steps
}


@pytest.mark.parametrize("gguf_type", list(GGUF_EDITS))
def test_gguf_one_element_or_block_is_a_fault(gguf_type, case, tmp_path):
    """Regression guard (the GGUF verifier was already element-wise): with no streammerge.json the
    tolerance path (a file another tool wrote) still finds one element or one block."""
    c = case("llama")
    src = merge(c, tmp_path / "src", gguf_type)
    for k, (byte, mask, count) in enumerate(GGUF_EDITS[gguf_type]):
        out = without_record(src, tmp_path / f"bad{k}")
        path = gguf_file(out)
        offset = int(tensor_info(path, DOWN).data_offset) + byte
        with open(path, "r+b") as fh:
            fh.seek(offset)
            value = fh.read(1)[0]
            fh.seek(offset)
            fh.write(bytes([value ^ mask]))
        report = verify_gguf(c, out, gguf_type)
        assert faults_of(report) == [("values differ", DOWN)], report.table_lines()
        data = report.faults[0].data
        assert data["first_row"] == 0 and data["rows_failing"] == 1
        if count is None:  # a block's scale: its nonzero quants, at most the block's 32 elements
            assert 1 <= data["elements_failing"] <= 32
        else:
            assert data["elements_failing"] == count
        assert f"{data['elements_failing']} of {data['elements']} elements out of bound" in report.faults[0].message
