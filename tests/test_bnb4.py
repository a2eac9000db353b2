"""streammerge.formats.codecs.bnb4 against bitsandbytes itself: chunked == whole tensor, bit for bit."""

from __future__ import annotations

import json
import random

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from streammerge.formats.codecs import bnb4 as B  # noqa: E402
from streammerge.formats.codecs import bnb4_quantize as BQ  # noqa: E402

SHAPES = [
    (256, 64),  # element count a multiple of every blocksize, rows aligned to blocks
    (200, 48),  # multiple of 64 and 128, not 256; blocks straddle rows
    (333, 20),  # not a multiple of any blocksize: partial last block
    (301, 7),  # odd element count (last byte half used), odd row length
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _weight(shape, dtype_name: str, seed: int) -> torch.Tensor:
    """float32 weight whose values are exact in dtype_name, with zero rows and an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[3:5] = 0.0  # all-zero blocks (absmax 0)
    w[-1, -1] = 3.0  # outlier in the last (possibly partial) block
    w.view(-1)[17] = -1e-4  # tiny negative: FP4's negative-zero code
    return w.to(DTYPES[dtype_name]).float()


def _row_chunks(n_rows: int, align: int, pieces: int, seed: int) -> list[tuple[int, int]]:
    """Up to `pieces` row ranges with random boundaries at multiples of `align`."""
    cands = list(range(align, n_rows, align))
    cuts = sorted(random.Random(seed).sample(cands, min(pieces - 1, len(cands))))
    bounds = [0, *cuts, n_rows]
    return list(zip(bounds[:-1], bounds[1:]))


def _ref_dequant_flat(packed, absmax_f32, quant_type, blocksize, shape, dtype) -> torch.Tensor:
    """bitsandbytes' own pure-torch reference kernel (eager), flattened to float32."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = F.get_4bit_type(quant_type, device="cpu")
    return fn(packed.reshape(-1), absmax_f32, code, blocksize, shape, dtype).float().reshape(-1)


def _cpu_native_is_flat(shape, blocksize) -> bool:
    """Shapes for which bnb 0.50's CPU dequantize_4bit honours the flat block layout (see module doc)."""
    return shape[-1] % blocksize == 0  # (odd rows take bnb's torch.compile'd fallback: correct but slow to compile)


def _state_dict(name: str, packed: torch.Tensor, qs) -> dict[str, torch.Tensor]:
    return {name: packed, **{f"{name}.{k}": v for k, v in qs.as_dict(packed=True).items()}}


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert tuple(got[k].shape) == tuple(want[k].shape), k
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


CASES = [
    (qt, dq, bs, shape)
    for qt in ("nf4", "fp4")
    for dq in (False, True)
    for bs in (64, 128, 256)
    for shape in SHAPES
]


@pytest.mark.parametrize("quant_type,double_quant,blocksize,shape", CASES)
def test_stream_quantize_and_dequantize_match_whole_tensor(quant_type, double_quant, blocksize, shape):
    i = CASES.index((quant_type, double_quant, blocksize, shape))
    dtype_name = list(DTYPES)[i % 3]
    w = _weight(shape, dtype_name, seed=i)
    packed, qs = F.quantize_4bit(
        w.to(DTYPES[dtype_name]), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((w.numel() + 1) // 2, 1)
    want_stats = qs.as_dict(packed=True)
    name = "model.layers.0.mlp.up_proj.weight"
    sd = _state_dict(name, packed, qs)

    fmt = B.parse_bnb4(name, sd)
    assert (fmt.quant_type, fmt.blocksize, fmt.shape, fmt.dtype, fmt.nested) == (
        quant_type, blocksize, shape, dtype_name, double_quant)
    assert B.Bnb4Format.from_json(json.loads(json.dumps(fmt.to_json()))) == fmt
    assert BQ.quant_state_json(fmt) == bytes(sd[f"{name}.quant_state.bitsandbytes__{quant_type}"].numpy())

    # decode_absmax == what dequantize_4bit computes internally
    absmax = B.decode_absmax(fmt, qs.absmax, sd.get(f"{name}.nested_absmax"), sd.get(f"{name}.nested_quant_map"))
    if double_quant:
        want_absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
        want_absmax += qs.offset
    else:
        want_absmax = qs.absmax
    assert absmax.dtype == torch.float32 and torch.equal(absmax, want_absmax)

    ref = _ref_dequant_flat(packed, want_absmax, quant_type, blocksize, shape, DTYPES[dtype_name])
    if _cpu_native_is_flat(shape, blocksize):
        public = F.dequantize_4bit(packed, qs).float().reshape(-1)
        assert torch.equal(public, ref)  # our oracle agrees with the public function where it is sound
    true_f32 = _ref_dequant_flat(packed, want_absmax, quant_type, blocksize, shape, torch.float32)
    code = B.codebook(quant_type)
    flat_bytes = packed.reshape(-1)
    align = B.row_alignment(fmt.n_cols, blocksize)
    for pieces in (1, 3, 17):
        chunks = _row_chunks(shape[0], align, pieces, seed=i * 31 + pieces)
        if pieces == 17 and shape[0] // align >= 17:
            assert len(chunks) == 17
        # dequantize_range over chunks == dequantize_4bit on the whole tensor
        outs, outs_f32 = [], []
        for r0, r1 in chunks:
            cr = B.chunk_ranges(fmt, r0, r1)
            pb, am = flat_bytes[cr.byte_start:cr.byte_end], absmax[cr.block_start:cr.block_end]
            outs.append(B.dequantize_range(fmt, pb, am, code, cr.n_elements))
            outs_f32.append(B.dequantize_range(fmt, pb, am, code, cr.n_elements, dtype=torch.float32))
        got = torch.cat(outs)
        assert got.dtype == torch.float32 and torch.equal(got, ref)
        assert torch.equal(torch.cat(outs_f32), true_f32)

        # element ranges cut at block (not row) boundaries dequantize the same way
        cuts = sorted(random.Random(pieces).sample(range(blocksize, w.numel(), blocksize), min(pieces - 1, fmt.n_blocks - 1)))
        bounds = [0, *cuts, w.numel()]
        by_elem = [
            B.dequantize_range(fmt, flat_bytes[e0 // 2:(e1 + 1) // 2], absmax[e0 // blocksize:-(-e1 // blocksize)], code, e1 - e0)
            for e0, e1 in zip(bounds[:-1], bounds[1:])
        ]
        assert torch.equal(torch.cat(by_elem), ref)

        # streamed quantization == quantize_4bit on the whole tensor
        q = BQ.Bnb4Quantizer(shape, quant_type, blocksize, double_quant, dtype_name)
        assert q.row_alignment == align
        parts = [q.add(w[r0:r1]) for r0, r1 in chunks]
        assert all(p.dtype == torch.uint8 for p in parts)
        assert torch.equal(torch.cat(parts), packed.reshape(-1))
        stats = q.finish()
        _assert_same_tensors(stats, want_stats)
        assert q.format(stats) == fmt

    specs = BQ.bnb4_output_specs(name, shape, quant_type, blocksize, double_quant, dtype_name)
    assert [s.name for s in specs] == list(sd)
    for s in specs:
        t = sd[s.name]
        assert s.dtype == str(t.dtype).removeprefix("torch."), s.name
        if s.exact:
            assert s.shape == tuple(t.shape), s.name
        else:
            assert s.name.endswith(f"bitsandbytes__{quant_type}") and double_quant
            assert t.dim() == 1 and t.shape[0] <= s.shape[0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_padded_quant_state_json_loads_in_bitsandbytes(quant_type):
    shape = (64, 64)
    w = _weight(shape, "float32", seed=5)
    specs = BQ.bnb4_output_specs("w", shape, quant_type, 64, True, "float32")
    json_spec = specs[-1]
    assert not json_spec.exact
    q = BQ.Bnb4Quantizer(shape, quant_type, 64, True, "float32")
    packed = q.add(w)
    exact = q.finish()
    q2 = BQ.Bnb4Quantizer(shape, quant_type, 64, True, "float32")
    q2.add(w)
    padded = q2.finish(json_pad_to=json_spec.shape[0])
    key = f"quant_state.bitsandbytes__{quant_type}"
    assert padded[key].numel() == json_spec.shape[0] > exact[key].numel()
    ref_packed, ref_qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    loaded = F.QuantState.from_dict({k: v.clone() for k, v in padded.items()}, device=torch.device("cpu"))
    assert loaded == ref_qs and loaded.offset.item() == ref_qs.offset.item()
    assert torch.equal(F.dequantize_4bit(packed.view(-1, 1), loaded), F.dequantize_4bit(ref_packed, ref_qs))
    with pytest.raises(ValueError, match="json_pad_to"):
        q3 = BQ.Bnb4Quantizer(shape, quant_type, 64, True, "float32")
        q3.add(w)
        q3.finish(json_pad_to=10)


def test_parse_accepts_meta_tensors_for_header_only_planning():
    w = _weight((96, 64), "bfloat16", seed=1)
    packed, qs = F.quantize_4bit(w.bfloat16(), blocksize=64, compress_statistics=True, quant_type="nf4")
    sd = _state_dict("m.weight", packed, qs)
    meta = {k: (v if "quant_state" in k else torch.empty(v.shape, dtype=v.dtype, device="meta")) for k, v in sd.items()}
    assert B.parse_bnb4("m.weight", meta) == B.parse_bnb4("m.weight", sd)
    assert B.bnb4_weight_names(list(sd) + ["other.weight"]) == ["m.weight"]


def _json_edit(sd, name, key_qt, **changes):
    key = f"{name}.quant_state.bitsandbytes__{key_qt}"
    d = json.loads(bytes(sd[key].numpy()))
    d.update(changes)
    for k, v in list(d.items()):
        if v is None:
            del d[k]
    out = dict(sd)
    out[key] = torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)
    return out


@pytest.fixture(scope="module")
def sd_nested():
    w = _weight((64, 96), "bfloat16", seed=2)
    packed, qs = F.quantize_4bit(w.bfloat16(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return _state_dict("m.weight", packed, qs)


@pytest.mark.parametrize(
    "edit,match",
    [
        (dict(shape=[64, 97]), "packed weight holds"),
        (dict(shape=[32, 96]), "packed weight holds"),
        (dict(blocksize=128), r"absmax: expected uint8 \[48\]"),
        (dict(blocksize=48), "blocksize must be one of"),
        (dict(quant_type="fp4"), "does not match the key suffix"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(nested_offset=None), "lacks nested_blocksize"),
        (dict(nested_blocksize=64), r"nested_absmax: expected float32 \[2\]"),
        (dict(shape="64x96"), "list of ints"),
        (dict(extra=1), "unknown quant-state JSON key"),
    ],
)
def test_parse_rejects_lying_json(sd_nested, edit, match):
    assert B.parse_bnb4("m.weight", sd_nested).nested  # the unedited state parses
    with pytest.raises(ValueError, match=match):
        B.parse_bnb4("m.weight", _json_edit(sd_nested, "m.weight", "nf4", **edit))


def test_parse_rejects_inconsistent_tensors(sd_nested):
    name = "m.weight"
    jkey = f"{name}.quant_state.bitsandbytes__nf4"
    missing = {k: v for k, v in sd_nested.items() if k != f"{name}.nested_absmax"}
    with pytest.raises(ValueError, match="nested_absmax is missing"):
        B.parse_bnb4(name, missing)
    with pytest.raises(ValueError, match="exactly one quant-state"):
        B.parse_bnb4(name, {k: v for k, v in sd_nested.items() if k != jkey})
    both = dict(sd_nested)
    both[f"{name}.quant_state.bitsandbytes__fp4"] = sd_nested[jkey]
    with pytest.raises(ValueError, match="exactly one quant-state"):
        B.parse_bnb4(name, both)
    # JSON and key both say fp4, but the stored codebook is NF4's
    relabeled = {(k.replace("__nf4", "__fp4")): v for k, v in _json_edit(sd_nested, name, "nf4", quant_type="fp4").items()}
    with pytest.raises(ValueError, match="codebook"):
        B.parse_bnb4(name, relabeled)
    garbage = dict(sd_nested)
    garbage[jkey] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        B.parse_bnb4(name, garbage)
    truncated = dict(sd_nested)
    truncated[name] = sd_nested[name][:-1]
    with pytest.raises(ValueError, match="packed weight holds"):
        B.parse_bnb4(name, truncated)


def test_quantizer_rejects_misuse():
    w = torch.randn(10, 96)
    q = BQ.Bnb4Quantizer((10, 96), "nf4", 64, False, "float32")
    assert q.row_alignment == 2
    q.add(w[:3])  # 288 values: ends inside a block
    with pytest.raises(ValueError, match="ended inside a 64-block"):
        q.add(w[3:])
    q = BQ.Bnb4Quantizer((10, 96), "nf4", 64, False, "float32")
    q.add(w[:4])
    with pytest.raises(ValueError, match="only 384 of 960"):
        q.finish()
    with pytest.raises(ValueError, match="overruns"):
        q.add(torch.randn(8, 96))
    with pytest.raises(ValueError, match="whole number of rows"):
        q.add(torch.randn(50))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        BQ.Bnb4Quantizer((10, 96), "nf4", 100, False, "float32")
    with pytest.raises(ValueError, match="quant_type"):
        BQ.Bnb4Quantizer((10, 96), "int4", 64, False, "float32")


def test_row_alignment_is_minimal_and_chunk_ranges():
    for n_cols in (1, 7, 20, 48, 64, 96, 100, 4096, 11008, 14336):
        for bs in B.BLOCKSIZES:
            a = B.row_alignment(n_cols, bs)
            assert (a * n_cols) % bs == 0
            assert all((r * n_cols) % bs for r in range(1, a))
    fmt = B.Bnb4Format("nf4", 64, (301, 7), "bfloat16")
    assert B.row_alignment(7, 64) == 64
    cr = B.chunk_ranges(fmt, 64, 301)
    assert (cr.elem_start, cr.elem_end, cr.byte_start, cr.byte_end, cr.block_start, cr.block_end) == (
        448, 2107, 224, 1054, 7, 33)
    with pytest.raises(ValueError, match="multiples of 64 rows"):
        B.chunk_ranges(fmt, 3, 10)


def test_dequantize_range_validates_inputs():
    fmt = B.Bnb4Format("nf4", 64, (4, 64), "float32")
    code = B.codebook("nf4")
    with pytest.raises(ValueError, match="packed bytes"):
        B.dequantize_range(fmt, torch.zeros(10, dtype=torch.uint8), torch.ones(4), code, 256)
    with pytest.raises(ValueError, match="absmax entries"):
        B.dequantize_range(fmt, torch.zeros(128, dtype=torch.uint8), torch.ones(3), code, 256)


# --------------------------------------------------------------------------- real checkpoint


def _tiny_llama_bf16(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return _tiny_llama_bf16(tmp_path_factory.mktemp("llama_bf16"))


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_real_transformers_4bit_checkpoint(bf16_dir, tmp_path, quant_type, double_quant):
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        bf16_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        device_map="cpu",
    )
    model.save_pretrained(tmp_path)  # no forward pass: it would repack weights on AVX512-BF16 CPUs
    saved = load_file(tmp_path / "model.safetensors")
    orig = load_file(bf16_dir / "model.safetensors")
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(modules) == 14  # 7 linears x 2 layers; lm_head stays bf16
    assert B.bnb4_weight_names(saved) and sorted(B.bnb4_weight_names(saved)) == sorted(f"{n}.weight" for n, _ in modules)
    for mod_name, mod in modules:
        name = f"{mod_name}.weight"
        w0 = orig[name].float()
        fmt = B.parse_bnb4(name, saved)
        assert (fmt.quant_type, fmt.blocksize, fmt.shape, fmt.dtype, fmt.nested, fmt.quant_storage) == (
            quant_type, 64, tuple(w0.shape), "bfloat16", double_quant, "uint8")
        # the stored packed weight is uint8 [n/2, 1]; its companions are exactly these
        assert saved[name].dtype == torch.uint8 and tuple(saved[name].shape) == (w0.numel() // 2, 1)
        assert sorted(k for k in saved if k.startswith(name + ".")) == sorted(
            B.companion_names(name, double_quant, quant_type))
        specs = BQ.bnb4_output_specs(name, w0.shape, quant_type, 64, double_quant, "bfloat16")
        for s in specs:
            assert s.dtype == str(saved[s.name].dtype)[6:]
            assert s.shape == tuple(saved[s.name].shape) if s.exact else saved[s.name].numel() <= s.shape[0]

        # dequantize in row chunks == bitsandbytes' dequantization of the loaded model
        absmax = B.decode_absmax(
            fmt, saved[f"{name}.absmax"], saved.get(f"{name}.nested_absmax"), saved.get(f"{name}.nested_quant_map"))
        want = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        assert want.dtype == torch.bfloat16
        flat = saved[name].reshape(-1)
        code = saved[f"{name}.quant_map"]
        got = []
        for r0, r1 in _row_chunks(fmt.n_rows, B.row_alignment(fmt.n_cols, 64), 3, seed=7):
            cr = B.chunk_ranges(fmt, r0, r1)
            got.append(B.dequantize_range(
                fmt, flat[cr.byte_start:cr.byte_end], absmax[cr.block_start:cr.block_end], code, cr.n_elements))
        deq = torch.cat(got)
        assert torch.equal(deq, want.float().reshape(-1))

        # quantizing the original bf16 weight in chunks reproduces every saved byte
        q = BQ.Bnb4Quantizer(tuple(w0.shape), quant_type, 64, double_quant, "bfloat16")
        parts = [q.add(w0[r0:r1]) for r0, r1 in _row_chunks(fmt.n_rows, q.row_alignment, 3, seed=8)]
        assert torch.equal(torch.cat(parts), flat)
        stats = q.finish()
        _assert_same_tensors({f"{name}.{k}": v for k, v in stats.items()},
                             {k: saved[k] for k in B.companion_names(name, double_quant, quant_type)})

        # requantizing the dequantized weight (what merged_4bit does with a zero delta)
        q = BQ.Bnb4Quantizer(tuple(w0.shape), quant_type, 64, double_quant, "bfloat16")
        rq = q.add(deq.view(w0.shape))
        rstats = q.finish()
        if quant_type == "nf4":
            assert torch.equal(rq, flat)
        else:  # FP4 has +0 (nibble 0) and -0 (nibble 8); -0.0 requantizes to +0
            nib = lambda b: torch.stack((b >> 4, b & 15), 1).reshape(-1)  # noqa: E731
            a, b = nib(flat), nib(rq)
            diff = a != b
            assert torch.all(a[diff] == 8) and torch.all(b[diff] == 0)
            assert torch.all(deq[diff] == 0)
        if not double_quant:  # the absmax is a bf16 value, reproduced exactly
            assert torch.equal(rstats["absmax"], saved[f"{name}.absmax"])
