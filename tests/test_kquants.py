"""GGUF K-quant codecs (Q4_K, Q5_K, Q6_K): bytes equal to llama.cpp's reference quantizer.

The golden digests were produced by `llama-quantize --pure` itself from the rows of
tests/kquant_rows.py (bench/kquant_oracle.py, which also compares whole model tensors); the rows
walk the quantizers' corners, so one changed comparison, order of a sum or rounding shows here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kquant_rows import WIDTH, golden_rows
from streammerge.formats import codecs
from streammerge.formats.codecs import kquants

GOLDEN = json.loads((Path(__file__).parent / "golden" / "kquants.json").read_text())
TYPES = ("Q4_K", "Q5_K", "Q6_K")


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_llama_quantize(name):
    rows = torch.from_numpy(golden_rows())
    got = bytes(codecs.get(name).encode(rows))
    assert len(got) == rows.shape[0] * codecs.get(name).row_bytes(WIDTH)
    assert hashlib.sha256(got).hexdigest() == GOLDEN["sha256"][name]


@pytest.mark.parametrize("name", TYPES)
def test_rows_encode_alone(name, monkeypatch):
    """Each row is its own super-blocks: any split into pieces or chunks gives the same bytes."""
    rows = torch.from_numpy(golden_rows())
    codec = codecs.get(name)
    whole = bytes(codec.encode(rows))
    monkeypatch.setattr(kquants, "PIECE_ELEMENTS", 3 * WIDTH)  # pieces of 3 rows, on several threads
    pieces = b"".join(bytes(codec.encode(rows[i : i + 5])) for i in range(0, rows.shape[0], 5))
    assert pieces == whole
    out = memoryview(bytearray(len(whole) + 7))
    assert bytes(codec.encode(rows, out)) == whole


@pytest.mark.parametrize("name", TYPES)
def test_decode_is_the_gguf_packages_and_within_tolerance(name):
    import gguf

    rows = torch.from_numpy(np.random.RandomState(3).standard_normal((8, WIDTH)).astype(np.float32) * 0.02)
    codec = codecs.get(name)
    raw = torch.frombuffer(bytearray(codec.encode(rows)), dtype=torch.uint8).reshape(8, -1)
    decoded = codec.decode(raw, WIDTH)
    reference = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[name]).reshape(8, WIDTH)
    assert torch.equal(decoded, torch.from_numpy(np.asarray(reference, dtype=np.float32)))
    assert bool(((decoded - rows).abs() <= codec.tolerance(rows, None)).all())
    worse = rows.clone()
    worse[2, 100] += 20 * codec.tolerance(rows, None)[2, 100]  # a value far off is out of bound
    assert not bool(((decoded - worse).abs() <= codec.tolerance(worse, None)).all())


def test_widths_that_are_not_whole_super_blocks_are_refused():
    assert codecs.get("Q4_K").check_width("w", 384) is not None
    assert codecs.get("Q6_K").check_width("w", 512) is None


# ------------------------------------------------------------------ whole files: llama-quantize's mixes

MIXES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k")


@pytest.fixture(scope="module")
def mix_case(make_base, make_adapter):
    """The models bench/kquant_oracle.py gave llama-quantize (8 layers; rows of whole super-blocks, and
    rows that fall back to 32-value blocks with tied embeddings)."""
    made = {}

    def get(label: str):
        if label not in made:
            dims = dict(GOLDEN["models"][label])
            base = make_base("llama", dtype=torch.bfloat16, tokenizer="bpe-llama3", vocab_size=512, seed=5, **dims)
            made[label] = (base, make_adapter(base, seed=4).adapter_path)
        return made[label]

    return get


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("label", ("h256", "h96"))
def test_mix_types_and_order_are_llama_quantizes(mix_case, label, mix):
    """Each tensor's ggml type and the tensor order, from the plan alone, as llama-quantize wrote them."""
    from streammerge.options import MergeOptions
    from streammerge.run.gguf_merge import plan_gguf

    base, adapter = mix_case(label)
    *_, gplan = plan_gguf(str(base), [str(adapter)], MergeOptions.create(method="gguf", gguf_type=mix))
    got = [[t.name, t.ggml_type] for t in gplan.tensors]
    assert got == GOLDEN["mixes"][label][mix]["tensors"]


def test_k_quant_file_keys_verify_and_a_flipped_byte(mix_case, tmp_path):
    """A Q4_K_M merge: metadata keys in llama-quantize's order (file type and quantization version
    last), `verify` passes on it byte for byte and names a changed super-block scale of a Q4_K and a
    Q6_K tensor. (One level changed by one step is within the type's tolerance: another quantizer,
    e.g. llama-quantize with an importance matrix, picks other levels; the file checksum catches it.)"""
    import gguf

    import streammerge

    base, adapter = mix_case("h256")
    out = tmp_path / "out"
    streammerge.merge(str(base), [str(adapter)], str(out), method="gguf", gguf_type="q4_k_m", device="cpu")
    (path,) = out.glob("*-Q4_K_M.gguf")
    reader = gguf.GGUFReader(str(path))
    assert [k for k in reader.fields if not k.startswith("GGUF.")] == GOLDEN["mixes"]["h256"]["q4_k_m"]["keys"]
    assert int(reader.fields["general.file_type"].contents()) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    offsets = {t.name: (int(t.data_offset), t.tensor_type.name) for t in reader.tensors}
    del reader
    kw = dict(method="gguf", gguf_type="q4_k_m", device="cpu")
    report = streammerge.verify(str(out), str(base), [str(adapter)], **kw)
    assert report.ok, report.table_lines()
    assert all(t.margin is None for t in report.tensors)  # byte-exact
    (out / "streammerge.json").unlink()
    # a super-block's f16 scale d: its high byte (Q4_K: bytes 0-1 of 144; Q6_K: bytes 208-209 of 210)
    for name, byte in (("blk.1.ffn_up.weight", 144 + 1), ("blk.0.ffn_down.weight", 209)):
        assert offsets[name][1] == ("Q4_K" if "up" in name else "Q6_K")
        with open(path, "r+b") as fh:
            fh.seek(offsets[name][0] + byte)
            value = fh.read(1)[0]
            fh.seek(offsets[name][0] + byte)
            fh.write(bytes([value ^ 0x10]))
    report = streammerge.verify(str(out), str(base), [str(adapter)], **kw)
    assert {f.subject for f in report.faults} == {"blk.1.ffn_up.weight", "blk.0.ffn_down.weight"}, report.table_lines()
