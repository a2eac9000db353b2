"""`streammerge verify`: passes on correct merges (ours and PEFT's), fails naming the tensor and the
fault on corrupted folders, and stays within its memory budget.

Corrupted folders are built here by editing tensors with safetensors (load_file/save_file) or by
flipping raw bytes; the corruptions are computed from the adapter files directly (float64), never
with streammerge's code. Value faults are tested with streammerge.json removed, so that the probe
test (not the shard checksum) is what catches them.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.errors import PlanError
from conftest import load_safetensors_dir, run_cli, safetensors_header, shard_files
from test_memory import _make_case, peak_rss_of

LLAMA64 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
PEFT_PREFIX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj.weight"  # square (64x64) in the LLAMA64 models
COPIED = "model.embed_tokens.weight"


# --------------------------------------------------------------------------------- helpers


def verify(out, base, adapters, **kw):
    kw.setdefault("device", "cpu")
    return streammerge.verify(str(out), str(base), [str(a) for a in adapters], **kw)


def faults_of(report) -> list[tuple[str, str]]:
    return [(f.kind, f.subject) for f in report.faults]


def factors(adapter_path: Path, weight_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of one module straight from the adapter files, float64."""
    sd = load_file(adapter_path / "adapter_model.safetensors")
    module = weight_name.removesuffix(".weight")
    cfg = json.loads((adapter_path / "adapter_config.json").read_text())
    a = sd[f"{PEFT_PREFIX}{module}.lora_A.weight"].double()
    b = sd[f"{PEFT_PREFIX}{module}.lora_B.weight"].double()
    return a, b, cfg["lora_alpha"] / cfg["r"]


def copy_folder(src: Path, dst: Path, *, keep_record: bool) -> Path:
    shutil.copytree(src, dst)
    if not keep_record:
        (dst / "streammerge.json").unlink()
    return dst


def edit_tensors(folder: Path, edit) -> None:
    """Load every shard holding tensors, let `edit(name -> tensor dict)` change one, save back."""
    files = shard_files(folder)
    tensors = {}
    owner = {}
    for f in files:
        for k, v in load_file(f).items():
            tensors[k], owner[k] = v, f
    edit(tensors)
    for f in files:  # new tensors go to the first shard
        part = {k: v.contiguous() for k, v in tensors.items() if owner.get(k, files[0]) == f}
        save_file(part, f, metadata={"format": "pt"})


def _base_tensor(base: Path, name: str) -> torch.Tensor:
    return load_safetensors_dir(base)[name]


def flip_byte(file: Path, tensor: str, element: int, byte_in_element: int) -> None:
    """XOR one byte of one element of `tensor` in place (raw file edit)."""
    header = safetensors_header(file)
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    entry = header[tensor]
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}[entry["dtype"]]
    offset = 8 + n + entry["data_offsets"][0] + element * itemsize + byte_in_element
    with open(file, "r+b") as fh:
        fh.seek(offset)
        value = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([value ^ 0x40]))


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bf16(make_base, make_adapter, tmp_path_factory):
    """A bf16 Llama base, one adapter, a second adapter (other seed) and our merges of each."""
    base = make_base("llama", dtype=torch.bfloat16, **LLAMA64)
    case = make_adapter(base, r=8, lora_alpha=16)
    other = make_adapter(base, r=8, lora_alpha=16, seed=7)
    root = tmp_path_factory.mktemp("verify-bf16")
    streammerge.merge(str(base), [str(case.adapter_path)], str(root / "out"), device="cpu")
    streammerge.merge(str(base), [str(other.adapter_path)], str(root / "other"), device="cpu")
    return base, case, other, root / "out", root / "other"


@pytest.fixture(scope="module")
def two_adapters(make_base, make_adapter, tmp_path_factory):
    base = make_base("llama", **LLAMA64)
    a = make_adapter(base, r=8, lora_alpha=16)
    b = make_adapter(base, r=4, lora_alpha=4, seed=3, target_modules=["q_proj", "v_proj", "down_proj"])
    adapters = [f"{a.adapter_path}@0.7", f"{b.adapter_path}@-0.3"]
    out = tmp_path_factory.mktemp("verify-two") / "out"
    streammerge.merge(str(base), adapters, str(out), device="cpu", max_shard_size="40KB")
    return base, a, b, adapters, out


# --------------------------------------------------------------------------------- passes on correct merges


@pytest.mark.parametrize("kind", ["llama-f32", "llama-bf16", "llama-f32-to-bf16", "llama-sharded", "gpt2-conv1d"])
def test_passes_on_our_outputs(kind, make_base, make_adapter, tmp_path):
    arch = "gpt2" if kind.startswith("gpt2") else "llama"
    base = make_base(arch, dtype=torch.bfloat16 if kind == "llama-bf16" else torch.float32,
                     **(LLAMA64 if arch == "llama" else {}))
    case = make_adapter(base, r=8, lora_alpha=16)
    opts = {"dtype": "bfloat16"} if kind == "llama-f32-to-bf16" else {}
    if kind == "llama-sharded":
        opts["max_shard_size"] = "30KB"
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(case.adapter_path)], str(out), device="cpu", **opts)
    report = verify(out, base, [case.adapter_path], max_memory="8MB", **opts)
    assert report.ok, report.table_lines()
    merged = report.checks["merge"]["checked"]
    assert merged == len(case.targets) and merged > 0
    assert report.checks["structure"]["checked"] == len(report.tensors) == len(load_safetensors_dir(base))
    if kind == "llama-f32-to-bf16":  # every untouched float tensor is a cast
        assert report.checks["cast"]["checked"] > 0 and report.checks["copy"]["checked"] == 0
    else:
        assert report.checks["copy"]["checked"] > 0 and report.checks["cast"]["checked"] == 0
    assert report.checks["checksum"]["checked"] == len(shard_files(out))
    if kind == "llama-sharded":
        assert len(shard_files(out)) > 2
    assert report.checks["record"] == {"checked": 1, "failed": 0}
    assert all(r.resolvable for r in report.tensors if r.op == "merge")


def test_passes_with_two_weighted_adapters_and_finds_one_missing(two_adapters, tmp_path):
    base, a, b, adapters, out = two_adapters
    report = verify(out, base, adapters, max_shard_size="40KB")
    assert report.ok, report.table_lines()
    assert report.checks["merge"]["checked"] == len(set(a.targets) | set(b.targets))
    assert report.checks["checksum"]["checked"] == len(shard_files(out)) > 1

    # q_proj with only adapter 1's delta (weight 0.7): adapter 2's is missing
    bad = copy_folder(out, tmp_path / "bad", keep_record=False)
    w = _base_tensor(base, Q).double()
    A, B, s = factors(a.adapter_path, Q)

    def drop_second(t):
        t[Q] = (w + 0.7 * s * (B @ A)).to(torch.float32)

    edit_tensors(bad, drop_second)
    report = verify(bad, base, adapters, max_shard_size="40KB")
    assert faults_of(report) == [("adapter delta missing", Q)]
    assert "adapter 2" in report.faults[0].message


@pytest.mark.parametrize("how", ["f32", "bf16-model", "bf16-model-bf16-factors", "f32-merge-saved-bf16", "gpt2-bf16-model"])
def test_passes_on_peft_merge_and_unload(how, make_base, make_adapter, tmp_path):
    """A folder written by PEFT merge_and_unload() + save_pretrained() passes, whichever way PEFT
    rounded (float32; on a bf16 model with float32 or bf16 LoRA factors; f32 merge cast to bf16)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    arch = "gpt2" if how.startswith("gpt2") else "llama"
    base_dtype = torch.float32 if how in ("f32", "f32-merge-saved-bf16") else torch.bfloat16
    base = make_base(arch, dtype=base_dtype, **(LLAMA64 if arch == "llama" else dict(n_embd=64, n_inner=128)))
    case = make_adapter(base, r=8, lora_alpha=16)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=base_dtype)
    peft_model = PeftModel.from_pretrained(model, str(case.adapter_path), autocast_adapter_dtype=how != "bf16-model-bf16-factors")
    merged = peft_model.merge_and_unload()
    opts = {}
    if how == "f32-merge-saved-bf16":
        merged = merged.to(torch.bfloat16)
        opts["dtype"] = "bfloat16"
    merged.save_pretrained(str(tmp_path / "peft"))
    report = verify(tmp_path / "peft", base, [case.adapter_path], **opts)
    assert report.ok, report.table_lines()
    assert report.checks["merge"]["checked"] == len(case.targets)
    assert "checksum" not in report.checks and any("streammerge.json" in n for n in report.notes)
    # the check has teeth on this folder: the same folder with one delta removed fails
    name = Q if arch == "llama" else "transformer.h.0.attn.c_attn.weight"

    def unmerge(t):
        t[name] = _base_tensor(base, name).to(t[name].dtype)

    edit_tensors(tmp_path / "peft", unmerge)
    assert faults_of(verify(tmp_path / "peft", base, [case.adapter_path], **opts)) == [("delta missing", name)]


# --------------------------------------------------------------------------------- fails on corrupted folders


@pytest.mark.parametrize("fault", ["delta missing", "scale doubled", "delta transposed", "other adapter"])
def test_value_faults_are_named(fault, bf16, tmp_path):
    base, case, other, out, other_out = bf16
    bad = copy_folder(out, tmp_path / "bad", keep_record=False)
    w = _base_tensor(base, Q)
    A, B, s = factors(case.adapter_path, Q)
    assert A.shape[1] == B.shape[0], "fixture error: the tensor must be square"
    replacement = {
        "delta missing": lambda: w.clone(),
        "scale doubled": lambda: (w.double() + 2 * s * (B @ A)).to(torch.bfloat16),
        "delta transposed": lambda: (w.double() + s * (B @ A).T).to(torch.bfloat16),
        "other adapter": lambda: load_file(shard_files(other_out)[0])[Q],
    }[fault]()

    def put(t):
        t[Q] = replacement

    edit_tensors(bad, put)
    report = verify(bad, base, [case.adapter_path], max_chunk_rows=7)  # the sums span several chunks
    expected_kind = {"delta missing": "delta missing", "scale doubled": "scale off",
                     "delta transposed": "delta transposed", "other adapter": "wrong delta"}[fault]
    assert faults_of(report) == [(expected_kind, Q)], report.table_lines()
    if fault == "scale doubled":
        assert "scale off by 2.0×" in report.faults[0].message
        assert abs(report.faults[0].data["factor"] - 2.0) < 0.01
    assert report.checks["merge"]["failed"] == 1
    if fault != "delta missing":
        return
    # the CLI prints the table and the same line, and exits 1
    res = run_cli("verify", bad, "--base", base, "--adapter", case.adapter_path, "--device", "cpu")
    assert res.returncode == 1, res.stderr
    assert f"FAIL {Q}: {report.faults[0].message}" in res.stdout
    assert "merged tensors (element-wise)" in res.stdout and "verify FAILED" in res.stdout
    # --fast: the probe test names the same fault, and the JSON report says which mode ran
    res = run_cli("verify", bad, "--base", base, "--adapter", case.adapter_path, "--device", "cpu", "--fast", "--json")
    assert res.returncode == 1, res.stderr
    data = json.loads(res.stdout)
    assert data["mode"] == "fast" and [(f["kind"], f["subject"]) for f in data["faults"]] == [("delta missing", Q)]
    res = run_cli("verify", bad, "--base", base, "--adapter", case.adapter_path, "--device", "cpu", "--fast")
    assert "merged tensors (probe test)" in res.stdout


def test_scale_off_in_conv1d_weight(gpt2_case, tmp_path):
    """fan_in_fan_out (GPT-2 Conv1D, [in, out]): the delta is (s·B·A)ᵀ and a doubled one is found."""
    base, adapter = gpt2_case.base_path, gpt2_case.adapter_path
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(adapter)], str(out), device="cpu")
    (out / "streammerge.json").unlink()
    name = "transformer.h.1.attn.c_attn.weight"
    w = _base_tensor(base, name)
    A, B, s = factors(adapter, name)

    def double(t):
        t[name] = (w.double() + 2 * s * (B @ A).T).to(torch.float32)

    edit_tensors(out, double)
    report = verify(out, base, [adapter])
    assert faults_of(report) == [("scale off", name)] and "2.0×" in report.faults[0].message


def test_flipped_byte_found_by_values_without_record(bf16, tmp_path):
    base, case, _, out, _ = bf16
    bad = copy_folder(out, tmp_path / "bad", keep_record=False)
    shard = shard_files(bad)[0]
    width = _base_tensor(base, Q).shape[1]
    flip_byte(shard, Q, element=5 * width + 7, byte_in_element=1)  # bf16 high byte: sign/exponent
    flip_byte(shard, COPIED, element=123, byte_in_element=0)
    report = verify(bad, base, [case.adapter_path], max_chunk_rows=3)  # row 5 is in the second chunk
    assert sorted(faults_of(report)) == sorted([("values differ", Q), ("bytes differ", COPIED)])
    by_kind = {f.kind: f for f in report.faults}
    assert by_kind["values differ"].data["first_row"] == 5 and by_kind["values differ"].data["rows_failing"] == 1
    assert by_kind["bytes differ"].data["elements"] == 1
    assert by_kind["bytes differ"].data["first_row"] == 123 // width


def test_flipped_byte_found_by_checksum_and_values(bf16, tmp_path):
    """A flip of the top mantissa bit of one merged bf16 element (64 ulps) is seen by the recorded
    sha256 and by the element-wise check, which counts and locates it; the probe test of --fast bounds
    whole rows, so one element hides under it there and only the checksum sees it."""
    base, case, _, out, _ = bf16
    bad = copy_folder(out, tmp_path / "bad", keep_record=True)
    shard = shard_files(bad)[0]
    width = _base_tensor(base, Q).shape[1]
    flip_byte(shard, Q, element=77, byte_in_element=0)
    report = verify(bad, base, [case.adapter_path])
    assert sorted(faults_of(report)) == sorted([("checksum mismatch", shard.name), ("values differ", Q)])
    assert report.checks["checksum"] == {"checked": 1, "failed": 1}
    assert report.checks["merge"]["failed"] == 1
    values = next(f for f in report.faults if f.kind == "values differ")
    assert values.data["elements_failing"] == 1 and values.data["rows_failing"] == 1
    assert (values.data["worst"]["row"], values.data["worst"]["col"]) == divmod(77, width)
    assert f"1 of {width * width} elements out of bound" in values.message
    fast = verify(bad, base, [case.adapter_path], fast=True)
    assert faults_of(fast) == [("checksum mismatch", shard.name)] and fast.checks["merge"]["failed"] == 0


def test_structure_faults(bf16, tmp_path):
    base, case, _, out, _ = bf16
    bad = copy_folder(out, tmp_path / "bad", keep_record=False)
    down = "model.layers.1.mlp.down_proj.weight"
    norm = "model.layers.0.input_layernorm.weight"

    def edit(t):
        del t[down]
        t["model.extra.weight"] = torch.zeros(3)
        t[norm] = t[norm].to(torch.float16)

    edit_tensors(bad, edit)
    report = verify(bad, base, [case.adapter_path])
    assert sorted(faults_of(report)) == sorted([
        ("missing tensor", down), ("unexpected tensor", "model.extra.weight"), ("shape/dtype differs", norm),
    ])
    assert report.checks["structure"]["failed"] == 3


def test_record_mismatch_names_the_changed_input(bf16, tmp_path):
    """Same tensors, but the adapter file is not the one merged (re-saved config) and the weight
    differs from the recorded one: the record check reports both."""
    base, case, _, out, _ = bf16
    adapter = tmp_path / "adapter"
    shutil.copytree(case.adapter_path, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=4, sort_keys=True))
    report = verify(out, base, [adapter])
    assert faults_of(report) == [("record mismatch", "record")]
    assert "adapter_config.json differs" in report.faults[0].message
    assert report.checks["merge"]["failed"] == 0

    report = verify(out, base, [f"{case.adapter_path}@0.5"])
    kinds = sorted(k for k, _ in faults_of(report))
    assert "record mismatch" in kinds and "scale off" in kinds
    assert any("weight 1.0" in f.message for f in report.faults if f.kind == "record mismatch")


# --------------------------------------------------------------------------------- command line


def test_cli_json_and_errors(bf16, tmp_path):
    base, case, _, out, _ = bf16
    res = run_cli("verify", out, "--base", base, "--adapter", case.adapter_path, "--json", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] is True and data["faults"] == []
    assert data["checks"]["merge"]["checked"] == len(case.targets)
    assert {t["op"] for t in data["tensors"]} == {"copy", "merge"}

    res = run_cli("verify", tmp_path / "nope", "--base", base, "--adapter", case.adapter_path)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    with pytest.raises(PlanError, match="too small to verify"):
        verify(out, base, [case.adapter_path], max_memory="10KB")
    res = run_cli("verify", out, "--base", base)
    assert res.returncode == 2 and "--adapter" in res.stderr


def test_demo_ends_with_verify(capsys):
    from streammerge.demo import run_demo

    assert run_demo() == 0
    printed = capsys.readouterr().out
    assert "check 3: streammerge verify" in printed and "verify passed" in printed and "demo passed" in printed
    assert printed.index("verify passed") < printed.index("demo passed")


# --------------------------------------------------------------------------------- memory

BUDGET = 16 * 10**6


def test_verify_peak_rss_is_runtime_plus_budget(tmp_path_factory):
    big, big_bytes = _make_case(tmp_path_factory.mktemp("vbig"), 384, 1024, 4, 14000, "40MB")
    tiny, _ = _make_case(tmp_path_factory.mktemp("vtiny"), 64, 128, 1, 128, "5GB")
    assert big_bytes >= 4 * BUDGET
    for root in (big, tiny):
        streammerge.merge(str(root / "base"), [str(root / "lora")], str(root / "out"), device="cpu", max_memory="64MB")

    def peak(root) -> int:
        return peak_rss_of("verify", str(root / "out"), "--base", str(root / "base"), "--adapter", str(root / "lora"),
                           "--max-memory", str(BUDGET), "--device", "cpu", "--quiet")

    runtime, used = peak(tiny), peak(big)
    print(f"model {big_bytes / 1e6:.0f} MB, budget {BUDGET / 1e6:.0f} MB, runtime {runtime / 1e6:.0f} MB, "
          f"verify peak {used / 1e6:.0f} MB, over runtime {(used - runtime) / 1e6:.0f} MB")
    assert used <= runtime + BUDGET, (used - runtime) / 1e6


def test_delta_below_rounding_is_reported_not_failed(bf16, tmp_path):
    """An adapter whose delta is far below a bf16 ulp merges to the base bits; verify passes and says
    that such tensors cannot tell applied from missing, instead of claiming more than it knows."""
    base, case, _, _, _ = bf16
    tiny = tmp_path / "tiny-adapter"
    shutil.copytree(case.adapter_path, tiny)
    sd = load_file(tiny / "adapter_model.safetensors")
    save_file({k: v * 1e-5 if ".lora_B." in k else v for k, v in sd.items()}, tiny / "adapter_model.safetensors")
    streammerge.merge(str(base), [str(tiny)], str(tmp_path / "out"), device="cpu")
    report = verify(tmp_path / "out", base, [tiny])
    assert report.ok, report.table_lines()
    merged = [r for r in report.tensors if r.op == "merge"]
    assert merged and not any(r.resolvable for r in merged)
    assert any("below the output dtype's rounding" in n for n in report.notes)


def test_missing_and_unreadable_shards(two_adapters, tmp_path):
    """A sharded folder with one shard deleted and another with a broken header: each shard is named,
    and so is every tensor that went with it."""
    base, _, _, adapters, out = two_adapters
    bad = copy_folder(out, tmp_path / "bad", keep_record=True)
    gone, broken = shard_files(bad)[1], shard_files(bad)[2]
    lost = set(safetensors_header(gone)) | set(safetensors_header(broken))
    lost.discard("__metadata__")
    gone.unlink()
    with open(broken, "r+b") as fh:
        fh.seek(9)
        fh.write(b"X")  # first byte of the JSON header after '{'
    report = verify(bad, base, adapters, max_shard_size="40KB")
    kinds = faults_of(report)
    assert ("shard missing", gone.name) in kinds and ("unreadable", broken.name) in kinds
    assert ("checksum mismatch", broken.name) in kinds
    assert {s for k, s in kinds if k == "missing tensor"} == lost
    assert all(("is missing" in f.message or "is unreadable" in f.message) for f in report.faults if f.kind == "missing tensor")
    assert report.checks["merge"]["failed"] == report.checks["copy"]["failed"] == 0


def test_dora_is_recomputed_not_refused(make_base, make_adapter, tmp_path):
    """DoRA rescales rows, so the s·B·A probe does not apply: its tensors are recomputed element by
    element (tests/test_verify_variants.py covers every variant and its faults)."""
    base = make_base("llama")
    case = make_adapter(base, use_dora=True, r=4, lora_alpha=8)
    out = tmp_path / "out"
    streammerge.merge(base, [case.adapter_path], out)
    report = streammerge.verify(out, base, [case.adapter_path])
    assert report.ok and report.checks["recompute"]["checked"] == len(case.targets) > 0
    assert any("recomputed" in line for line in report.table_lines())
