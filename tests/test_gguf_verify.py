"""`streammerge verify --method gguf`: passes on our GGUF outputs, fails naming the tensor and the
fault on broken ones, and every check it adds is shown able to fail.

Broken files are made three ways, none through the verifier's code: by breaking one of the writer's
rules while it writes (monkeypatching its permutation, an architecture rule or its encoder, then
restoring it before verifying), by merging with a wrong adapter weight (@0: the delta is missing,
@2: doubled), and by editing bytes of a copy (a tensor's data, a metadata value, a split file removed).
Value faults are checked with streammerge.json removed too, so the value check (not the file
checksum) is what catches them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch

import streammerge
from conftest import run_cli
from streammerge.errors import OptionError, PlanError
from streammerge.formats.gguf import arch as gguf_arch
from streammerge.run import encoded as gguf_execute

BASES = {  # arch -> base kwargs (tiny models built at test time, as tests/test_gguf.py builds them)
    "llama": dict(tokenizer="bpe-llama3", tie_word_embeddings=False),
    "qwen3": dict(tokenizer="bpe-qwen2", head_dim=128),
    "qwen2": dict(tokenizer="bpe-qwen2"),
    "gemma3": dict(tokenizer="spm"),
}
TAGS = {"bf16": "BF16", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


@dataclasses.dataclass
class Case:
    base: Path
    adapter: Path


@pytest.fixture(scope="module")
def case(make_base, make_adapter):
    made: dict[str, Case] = {}

    def get(arch: str) -> Case:
        if arch not in made:
            base = make_base(arch, dtype=torch.bfloat16, **BASES[arch])
            made[arch] = Case(base, make_adapter(base).adapter_path)
        return made[arch]

    return get


def merge(c: Case, out: Path, gguf_type: str, weight: float | None = None, **kw) -> Path:
    adapter = str(c.adapter) + (f"@{weight}" if weight is not None else "")
    streammerge.merge(str(c.base), [adapter], str(out), method="gguf", gguf_type=gguf_type, device="cpu", **kw)
    return out


def verify(c: Case, out: Path, gguf_type: str, **kw):
    kw.setdefault("device", "cpu")
    return streammerge.verify(str(out), str(c.base), [str(c.adapter)], method="gguf", gguf_type=gguf_type, **kw)


def faults_of(report) -> set[tuple[str, str]]:
    return {(f.kind, f.subject) for f in report.faults}


def without_record(out: Path) -> Path:
    (out / "streammerge.json").unlink()
    return out


def tensor_info(path: Path, name: str):
    reader = gguf.GGUFReader(str(path))
    return next(t for t in reader.tensors if t.name == name)


def flip_byte(path: Path, name: str, byte: int) -> None:
    """XOR one byte of tensor `name`'s data (raw file edit)."""
    offset = int(tensor_info(path, name).data_offset) + byte
    with open(path, "r+b") as fh:
        fh.seek(offset)
        value = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([value ^ 0x40]))


def gguf_file(out: Path) -> Path:
    (path,) = sorted(out.glob("*.gguf"))
    return path


# ------------------------------------------------------------------------------- passes


@pytest.mark.parametrize(("arch", "gguf_type"), [("llama", "bf16"), ("llama", "q8_0"), ("llama", "q4_0"),
                                                 ("qwen3", "q8_0"), ("qwen2", "f16"), ("gemma3", "bf16"), ("gemma3", "q4_0")])
def test_passes_on_our_gguf_outputs(case, arch, gguf_type, tmp_path):
    c = case(arch)
    out = merge(c, tmp_path / "out", gguf_type)
    report = verify(c, out, gguf_type, max_memory="16MB")
    assert report.ok, report.table_lines()
    n = len(gguf.GGUFReader(str(gguf_file(out))).tensors)
    assert report.checks["structure"] == {"checked": n, "failed": 0}
    assert report.checks["merge"]["checked"] > 0 and report.checks["copy"]["checked"] > 0
    assert report.checks["merge"]["checked"] + report.checks["copy"]["checked"] == n
    assert report.checks["checksum"] == {"checked": 1, "failed": 0} and report.checks["record"]["failed"] == 0
    assert report.checks["metadata"]["checked"] > 10
    assert all(t.margin is None for t in report.tensors)  # byte-exact: no tolerance was needed
    assert not report.notes, report.notes
    lines = report.table_lines()
    assert any("metadata keys" in line for line in lines) and lines[-1].startswith("verify passed")


def test_split_files_pass_and_a_missing_split_is_named(case, tmp_path):
    c = case("llama")
    out = merge(c, tmp_path / "out", "bf16", max_shard_size="30KB")
    files = sorted(out.glob("*.gguf"))
    assert len(files) >= 3
    report = verify(c, out, "bf16", max_shard_size="30KB")
    assert report.ok, report.table_lines()
    assert report.checks["files"] == {"checked": len(files), "failed": 0}
    assert report.checks["checksum"] == {"checked": len(files), "failed": 0}

    lost = {t.name for t in gguf.GGUFReader(str(files[-1])).tensors}
    files[-1].unlink()
    report = verify(c, out, "bf16", max_shard_size="30KB")
    got = faults_of(report)
    assert ("file missing", files[-1].name) in got
    assert {name for kind, name in got if kind == "missing tensor"} == lost
    assert report.checks["files"]["failed"] == 1


def test_chunked_verify_within_a_small_budget(case, tmp_path):
    """One row (one head for q/k) per chunk gives the same verdict; a budget below one chunk is refused."""
    c = case("llama")
    out = merge(c, tmp_path / "out", "q8_0")
    report = verify(c, out, "q8_0", max_chunk_rows=1, max_memory="12MB")
    assert report.ok, report.table_lines()
    with pytest.raises(PlanError, match="--max-memory .* is too small"):
        verify(c, out, "q8_0", max_memory="1MB")


def test_written_by_another_tool_passes_within_tolerance(case, monkeypatch, tmp_path):
    """A Q8_0 quantized from the bf16-rounded merge (as llama-quantize of a BF16 GGUF would be) is not
    byte-identical, but within the quantization step: it passes, with a note."""
    c = case("llama")
    encode = gguf_execute.encode
    monkeypatch.setattr(gguf_execute, "encode", lambda rows, t, g: encode(rows.to(torch.bfloat16).float(), t, g))
    out = without_record(merge(c, tmp_path / "out", "q8_0"))
    monkeypatch.undo()
    report = verify(c, out, "q8_0")
    assert report.ok, report.table_lines()
    assert any("not byte-identical" in n for n in report.notes)
    assert any(t.margin is not None for t in report.tensors if t.op == "merge")


# ------------------------------------------------------------------------------- faults


def test_missing_qk_permutation_is_named(case, monkeypatch, tmp_path):
    c = case("llama")
    monkeypatch.setattr(gguf_execute, "permute_rows", lambda rows, heads: rows)
    out = merge(c, tmp_path / "out", "q8_0")
    monkeypatch.undo()
    report = verify(c, out, "q8_0")
    got = faults_of(report)
    for layer in (0, 1):
        assert ("not permuted", f"blk.{layer}.attn_q.weight") in got
        assert ("not permuted", f"blk.{layer}.attn_k.weight") in got
    assert len(got) == 4, report.table_lines()  # the record holds this very file: checksums pass
    assert any(line.startswith("FAIL blk.0.attn_q.weight: not permuted") for line in report.table_lines())


def test_wrong_head_count_in_the_permutation_is_named(case, monkeypatch, tmp_path):
    c = case("llama")
    permute = gguf_execute.permute_rows
    monkeypatch.setattr(gguf_execute, "permute_rows", lambda rows, heads: permute(rows, 2 * heads))
    out = merge(c, tmp_path / "out", "bf16")
    monkeypatch.undo()
    report = verify(c, out, "bf16")
    kinds = {f.subject: f for f in report.faults}
    assert kinds["blk.0.attn_k.weight"].kind == "permutation wrong"
    assert "4 heads" in kinds["blk.0.attn_k.weight"].message  # k has 2 KV heads; written with 4
    assert kinds["blk.0.attn_q.weight"].kind == "permutation wrong"
    assert "8 heads" in kinds["blk.0.attn_q.weight"].message


def test_missing_gemma_norm_shift_is_named(case, monkeypatch, tmp_path):
    c = case("gemma3")
    monkeypatch.setitem(gguf_arch.ARCHS, "gemma3_text", dataclasses.replace(gguf_arch.ARCHS["gemma3_text"], norm_shift=0.0))
    out = merge(c, tmp_path / "out", "bf16")
    monkeypatch.undo()
    report = verify(c, out, "bf16")
    got = faults_of(report)
    norms = {t.name for t in gguf.GGUFReader(str(gguf_file(out))).tensors if t.name.endswith("norm.weight")}
    assert {("norm +1 missing", n) for n in norms} == got


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize(("weight", "kind"), [(0.0, "delta missing"), (2.0, "scale off")])
def test_missing_or_doubled_delta_is_named(case, gguf_type, weight, kind, tmp_path):
    c = case("llama")
    out = without_record(merge(c, tmp_path / "out", gguf_type, weight=weight))
    report = verify(c, out, gguf_type)
    merged = [t.name for t in report.tensors if t.op == "merge"]
    assert len(merged) == 14
    named = {f.subject: f for f in report.faults}
    # every merged tensor whose delta is resolvable at this type is named with the fault
    resolvable = [t.name for t in report.tensors if t.op == "merge" and t.resolvable]
    assert len(resolvable) == 14, report.table_lines()  # these adapters are large enough even for Q4_0
    for name in resolvable:
        assert named[name].kind == kind, (name, named[name].message)
        if kind == "scale off":
            assert "scale off by 2.0×" in named[name].message
    assert set(named) <= set(merged)


def test_a_flipped_byte_is_named(case, tmp_path):
    c = case("llama")
    src = merge(c, tmp_path / "src", "q8_0")
    for keep_record in (True, False):
        out = tmp_path / f"out-{keep_record}"
        shutil.copytree(src, out)
        if not keep_record:
            without_record(out)
        path = gguf_file(out)
        flip_byte(path, "blk.1.ffn_down.weight", 5)  # merged, Q8_0: a quant of row 0, block 0
        flip_byte(path, "token_embd.weight", 34 * 2 + 9)  # unmerged Q8_0
        flip_byte(path, "blk.0.attn_norm.weight", 4 * 3 + 1)  # unmerged F32: element 3
        report = verify(c, out, "q8_0")
        by = {f.subject: f for f in report.faults}
        assert by["blk.1.ffn_down.weight"].kind == "values differ"
        assert "row 0" in by["blk.1.ffn_down.weight"].message
        assert by["token_embd.weight"].kind == "values differ"
        assert by["blk.0.attn_norm.weight"].kind == "bytes differ"
        assert (path.name in by and by[path.name].kind == "checksum mismatch") == keep_record
        assert len(by) == 3 + keep_record, report.table_lines()


def test_a_missing_tensor_is_named(case, monkeypatch, tmp_path):
    """A file without output.weight (the writer told to drop lm_head as if tied)."""
    c = case("llama")
    monkeypatch.setitem(gguf_arch.ARCHS, "llama", dataclasses.replace(gguf_arch.ARCHS["llama"], skip=("lm_head.weight",)))
    out = without_record(merge(c, tmp_path / "out", "bf16"))
    monkeypatch.undo()
    report = verify(c, out, "bf16")
    assert ("missing tensor", "output.weight") in faults_of(report)
    assert report.checks["structure"]["failed"] == 1


def test_a_changed_metadata_value_is_named(case, tmp_path):
    c = case("llama")
    out = without_record(merge(c, tmp_path / "out", "bf16"))
    reader = gguf.GGUFReader(str(gguf_file(out)), "r+")
    reader.fields["llama.context_length"].parts[-1][0] = 4096
    reader.fields["general.name"].parts[-1][:] = ord("x")  # cosmetic: a note, not a fault
    reader.data.flush()
    del reader
    report = verify(c, out, "bf16")
    assert faults_of(report) == {("metadata differs", "llama.context_length")}
    assert "4096" in report.faults[0].message and "64" in report.faults[0].message
    assert any("general.name" in n for n in report.notes)


def test_record_and_options_mismatches(case, tmp_path):
    c = case("llama")
    out = merge(c, tmp_path / "out", "q8_0", weight=2.0)
    report = verify(c, out, "q8_0")
    assert any(f.kind == "record mismatch" and "weight" in f.message for f in report.faults)
    # verifying another --gguf-type: the planned file is missing, and the message says what OUT holds
    report = verify(c, out, "bf16")
    fault = next(f for f in report.faults if f.kind == "file missing")
    assert "-Q8_0.gguf" in fault.message
    # the merge line without --method gguf: a one-line error with the options to add
    with pytest.raises(OptionError, match=r"--method gguf --gguf-type q8_0"):
        streammerge.verify(str(out), str(c.base), [str(c.adapter)], device="cpu")


def test_cli_verify_gguf(case, tmp_path):
    c = case("llama")
    out = merge(c, tmp_path / "out", "q4_0")
    args = ("verify", out, "--base", c.base, "--adapter", c.adapter, "--method", "gguf", "--gguf-type", "q4_0", "--device", "cpu")
    res = run_cli(*args, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] and data["checks"]["merge"]["failed"] == 0
    flip_byte(gguf_file(out), "blk.0.ffn_up.weight", 0)  # the block scale of row 0, block 0
    res = run_cli(*args)
    assert res.returncode == 1
    assert "FAIL blk.0.ffn_up.weight: values differ" in res.stdout
    assert "recorded when it was written" in res.stdout  # the sha256 check names the file too


def test_verifier_permutation_is_llama_cpps_and_invertible():
    """verify's own q/k permutation (index math) agrees with the writer's (reshape) and with
    llama.cpp's definition written out in tests/test_gguf.py; unpermute inverts it."""
    from test_gguf import permuted

    from streammerge.verification.gguf import permute_rows, unpermute_rows

    x = torch.randn(48, 5)
    for heads in (1, 2, 3, 6):
        assert torch.equal(permute_rows(x, heads), gguf_execute.permute_rows(x, heads))
        assert torch.equal(permute_rows(x, heads), permuted(x, heads))
        assert torch.equal(unpermute_rows(permute_rows(x, heads), heads), x)


# ------------------------------------------------------------------ bitsandbytes bases (issue 10)


@pytest.mark.parametrize(("kind", "gguf_type"), [("nf4", "q8_0"), ("nf4", "bf16"), ("int8", "bf16")])
def test_passes_on_gguf_from_a_bitsandbytes_base_and_names_a_flipped_byte(case, kind, gguf_type, tmp_path):
    """verify decodes the base's 4-bit/8-bit rows as the writer does (bitsandbytes' dequantization),
    in chunks on whole block rows; a changed byte of a dequantized, merged tensor is still named."""
    from test_gguf import save_quantized

    c = case("llama")
    q = Case(save_quantized(c.base, kind, tmp_path / f"llama-{kind}"), c.adapter)
    out = merge(q, tmp_path / "out", gguf_type)
    report = verify(q, out, gguf_type, max_chunk_rows=3)
    assert report.ok, report.table_lines()
    n = len(gguf.GGUFReader(str(gguf_file(out))).tensors)
    assert report.checks["merge"]["checked"] + report.checks["copy"]["checked"] == n
    assert all(t.margin is None for t in report.tensors)  # byte-exact
    without_record(out)
    flip_byte(gguf_file(out), "blk.1.ffn_down.weight", 5)  # a quantized base weight, merged
    report = verify(q, out, gguf_type)
    assert {f.subject for f in report.faults} == {"blk.1.ffn_down.weight"}, report.table_lines()
    assert report.faults[0].kind == "values differ"
