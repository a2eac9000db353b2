"""Quantized bases that lie: the codecs' ValueErrors reach the user as one InputError naming file and weight.

The quant state is built by bitsandbytes itself (`quantize_4bit`) and then falsified: a JSON shape or
blocksize that disagrees with the packed data, an absmax of the wrong length, a broken 8-bit SCB.
`quant.parse_checked` is the wrapper the 4-bit/8-bit base integration calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from streammerge.errors import InputError  # noqa: E402
from streammerge.formats.codecs.checked import parse_checked  # noqa: E402
from streammerge.formats.codecs.bnb4 import parse_bnb4  # noqa: E402
from streammerge.formats.codecs.int8 import parse_int8  # noqa: E402

NAME = "model.layers.3.mlp.down_proj.weight"
FILE = Path("/models/llama-4bit/model-00002-of-00004.safetensors")
QS = f"{NAME}.quant_state.bitsandbytes__nf4"


def _bnb4_state(nested: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(64, 96, generator=g) * 0.05).bfloat16()
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    return {NAME: packed, **{f"{NAME}.{k}": v for k, v in qs.as_dict(packed=True).items()}}


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "double-quant"])
def state(request) -> dict[str, torch.Tensor]:
    return _bnb4_state(request.param)


def _with_json(sd: dict, **changes) -> dict:
    d = json.loads(bytes(sd[QS].numpy()))
    d.update(changes)
    out = dict(sd)
    out[QS] = torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)
    return out


def _assert_input_error(sd: dict, parser=parse_bnb4, match: str = "") -> str:
    with pytest.raises(InputError) as info:
        parse_checked(parser, FILE, NAME, sd)
    message = str(info.value)
    assert str(FILE) in message and repr(NAME) in message and "re-download or re-quantize" in message
    assert "\n" not in message and match in message, message
    return message


def test_consistent_state_parses_through_the_wrapper(state):
    fmt = parse_checked(parse_bnb4, FILE, NAME, state)
    assert fmt == parse_bnb4(NAME, state) and fmt.shape == (64, 96) and fmt.blocksize == 64


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(shape=[64, 97]), "packed weight holds"),  # lies about shape: more values than packed
        (dict(shape=[96, 64]), ""),  # same count, transposed: caught by nothing but the base's own shape
        (dict(blocksize=128), "absmax"),  # lies about blocksize: absmax length no longer fits
        (dict(blocksize=100), "blocksize must be one of"),
        (dict(shape=[0, 96]), "positive sizes"),
        (dict(shape="64x96"), "list of ints"),
    ],
)
def test_lying_quant_state_json(state, changes, match):
    edited = _with_json(state, **changes)
    if changes == dict(shape=[96, 64]):  # a pure transpose keeps every count consistent: it parses...
        assert parse_checked(parse_bnb4, FILE, NAME, edited).shape == (96, 64)
        return  # ...only a check against the shape the model expects (the planner, with the adapter) can refuse it
    _assert_input_error(edited, match=match)


def test_absmax_of_the_wrong_length(state):
    short = dict(state)
    short[f"{NAME}.absmax"] = state[f"{NAME}.absmax"][:-1].clone()
    _assert_input_error(short, match="absmax: expected")
    long = dict(state)
    long[f"{NAME}.absmax"] = torch.cat([state[f"{NAME}.absmax"], state[f"{NAME}.absmax"][:1]])
    _assert_input_error(long, match="absmax: expected")


def test_missing_or_garbage_quant_state(state):
    _assert_input_error({k: v for k, v in state.items() if k != f"{NAME}.absmax"}, match="absmax is missing")
    garbage = dict(state)
    garbage[QS] = torch.tensor(list(b"\xff{"), dtype=torch.uint8)
    _assert_input_error(garbage, match="not valid UTF-8 JSON")


def test_int8_scb_of_the_wrong_length():
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    prefix = NAME[: -len("weight")]
    good = {NAME: w, f"{prefix}SCB": torch.rand(8) + 0.1, f"{prefix}weight_format": torch.tensor(0, dtype=torch.uint8)}
    assert parse_checked(parse_int8, FILE, NAME, good).shape == (8, 16)
    _assert_input_error({**good, f"{prefix}SCB": torch.rand(7)}, parser=parse_int8, match="SCB: expected float32 [8]")
    _assert_input_error({**good, f"{prefix}weight_format": torch.tensor(1, dtype=torch.uint8)}, parser=parse_int8,
                        match="only 'row' weights")


JSON_VALUES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from(
    ["nf4", "fp4", "bfloat16", "float32", "int8", "", "64"]) | st.lists(st.integers(-3, 2**40), max_size=3)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(edits=st.dictionaries(
    st.sampled_from(["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_offset", "nested_dtype", "x"]),
    JSON_VALUES | st.just("<drop>"), min_size=1, max_size=3), nested=st.booleans())
def test_any_quant_state_json_is_a_parse_or_an_input_error(edits, nested):
    sd = _bnb4_states[nested]
    d = json.loads(bytes(sd[QS].numpy()))
    for k, v in edits.items():
        if v == "<drop>":
            d.pop(k, None)
        else:
            d[k] = v
    edited = dict(sd)
    edited[QS] = torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)
    try:
        fmt = parse_checked(parse_bnb4, FILE, NAME, edited)
    except InputError as exc:
        assert str(FILE) in str(exc) and NAME in str(exc)
        return
    # accepted: then every count it implies agrees with the tensors actually stored
    assert fmt.packed_nbytes == edited[NAME].numel() * edited[NAME].element_size()
    assert edited[f"{NAME}.absmax"].numel() == fmt.n_blocks


_bnb4_states = {False: _bnb4_state(False), True: _bnb4_state(True)}
