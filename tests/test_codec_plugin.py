"""A codec registered from this module goes through plan, merge and verify, with no change anywhere
else: the proof that a new stored format is one module.

ROWQ8 (a test format, not a real one) stores each row of a linear weight as a float32 scale
(absmax / 127) followed by the row's int8 codes; its `--method merged_rowq8` stores every `*proj.weight`
that way and casts the rest as merged_16bit does.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import streammerge
from streammerge.formats import codecs
from streammerge.formats.codecs.base import Codec, copy_into


class RowQ8(Codec):
    name = "ROWQ8"
    method = "merged_rowq8"
    description = "int8 rows, each after its float32 scale (a test format)"

    def row_bytes(self, width: int) -> int:
        return 4 + width

    def encodes(self, name: str, shape: tuple[int, ...]) -> bool:
        return name.endswith("proj.weight")

    @staticmethod
    def _scale(rows: torch.Tensor) -> torch.Tensor:
        return rows.abs().amax(dim=1, keepdim=True) / 127

    def encode(self, rows: torch.Tensor, out: memoryview | None = None) -> memoryview:
        scale = self._scale(rows)
        codes = torch.where(scale > 0, rows / scale, torch.zeros_like(rows)).round().clamp(-127, 127).to(torch.int8)
        packed = torch.cat([scale.contiguous().view(torch.uint8), codes.view(torch.uint8)], dim=1)
        return copy_into(memoryview(packed.contiguous().numpy()).cast("B"), out)

    def decode(self, raw: torch.Tensor, width: int) -> torch.Tensor:
        raw = raw.contiguous().reshape(-1, 4 + width)
        scale = raw[:, :4].contiguous().view(torch.float32)
        return raw[:, 4:].contiguous().view(torch.int8).float() * scale

    def tolerance(self, expected: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        tol = 0.5 * self._scale(expected) * (1 + 2**-20) + 2**-8 * expected.abs()
        if delta is not None:
            tol = tol + 2**-8 * delta.abs()
        return tol.expand_as(expected) + 1e-30

    def quantization_config(self, encoded: list[str], others: list[str]) -> dict:
        return {"quant_method": "rowq8", "modules": sorted(n[: -len(".weight")] for n in encoded)}


@pytest.fixture
def rowq8():
    codec = codecs.register(RowQ8())
    yield codec
    codecs.unregister(codec.name)


def test_registered_codec_plans_and_merges(rowq8, llama_case, tmp_path):
    base, adapter = llama_case.base_path, llama_case.adapter_path
    plan = streammerge.plan(base, [adapter], method="merged_rowq8")
    encoded = [t for t in plan.tensors if t.encoding == "ROWQ8"]
    assert encoded and all(t.name.endswith("proj.weight") for t in encoded)
    for t in encoded:
        assert t.dtype == "U8" and t.shape == (t.logical_shape[0], 4 + t.logical_shape[1])
    assert all(t.encoding is None for t in plan.tensors if not t.name.endswith("proj.weight"))

    out = streammerge.merge(base, [adapter], tmp_path / "out", method="merged_rowq8", device="cpu").out
    reference = streammerge.merge(base, [adapter], tmp_path / "f32", dtype="float32", device="cpu").out
    ours = load_file(str(out / "model.safetensors"))
    merged = load_file(str(reference / "model.safetensors"))  # merged_16bit in float32: the merge, unrounded
    for t in encoded:
        expected = merged[t.name].reshape(t.logical_shape[0], -1)
        want = bytes(rowq8.encode(expected))
        assert ours[t.name].numpy().tobytes() == want, t.name  # the codec's bytes of the float32 merge
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "rowq8"


def test_registered_codec_verifies(rowq8, llama_case, tmp_path):
    base, adapter = llama_case.base_path, llama_case.adapter_path
    out = streammerge.merge(base, [adapter], tmp_path / "out", method="merged_rowq8", device="cpu").out
    encoded = [t for t in streammerge.plan(base, [adapter], method="merged_rowq8").tensors if t.encoding == "ROWQ8"]
    report = streammerge.verify(out, base, [adapter], method="merged_rowq8", device="cpu")
    assert report.ok, report.table_lines()

    # one int8 code changed by 40 steps in one q_proj row: verify names the tensor
    victim = next(t for t in encoded if "q_proj" in t.name)
    data = bytearray((out / "model.safetensors").read_bytes())
    at = victim.start + 7 * victim.shape[1] + 4 + 3
    data[at] = (data[at] + 40) % 256
    (out / "model.safetensors").write_bytes(bytes(data))
    (out / "streammerge.json").unlink()
    report = streammerge.verify(out, base, [adapter], method="merged_rowq8", device="cpu")
    assert not report.ok
    assert any(f.subject == victim.name for f in report.faults), report.table_lines()


def test_a_method_no_codec_writes_is_refused():
    from streammerge.errors import OptionError

    with pytest.raises(OptionError, match="--method 'merged_nothing' is not known"):
        streammerge.plan(".", ["."], method="merged_nothing")
