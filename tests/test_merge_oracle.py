"""Oracle tests: streammerge's output against PEFT's own merge (merge_and_unload) and logits.

The references come from transformers + peft (tests/models.py), never from streammerge.

Numerics (why the tolerances look the way they do):
  * Semantics (every feature test): each merged tensor is W + sum(w*s*B@A) up to float32 rounding
    error, |ours - exact| <= 4 eps32 (|W| + |s||B||A|) + 1 ulp(out) |exact|, and untouched tensors
    are bit-identical.  Any wrong scale/rank/alpha/module/transpose misses this by orders of magnitude.
  * DESIGN contract (test_merge_f32_rounded_once, test_merge_lowp_single_rounding):
    W' = cast(out, f32(W) + s*(f32(B) @ f32(A))): the float32 formula, as torch evaluates it on the
    whole tensor (the arithmetic PEFT's merge_and_unload does on a float32 model), rounded once to
    the output dtype -- not PEFT's bf16 path, which rounds the delta to bf16 before adding it.
    Required: >= 99.99 % bit-identical, the rest within 1 ulp.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import (
    bitwise_fraction,
    load_safetensors_dir,
    max_ulp_diff,
    run_cli,
    safetensors_header,
    shard_files,
    tensor_order,
)

EPS32 = 2.0**-23
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


# --------------------------------------------------------------------------- merge helpers


def _streammerge():
    try:
        import streammerge

        streammerge.merge  # noqa: B018  (lazy attribute: fails while api.py is missing)
    except Exception as exc:  # pragma: no cover - only while the package is being written
        pytest.fail(f"streammerge.merge is not importable: {exc!r}")
    return streammerge


def do_merge(base, adapters, out, **kw) -> Path:
    sm = _streammerge()
    kw.setdefault("device", "cpu")
    sm.merge(str(base), [str(a) for a in adapters], str(out), **kw)
    return Path(out)


@pytest.fixture(scope="session")
def merged(tmp_path_factory):
    """merged(base, adapters, **merge_kwargs) -> output folder (cached per arguments)."""
    cache: dict[str, Path] = {}

    def _merged(base, adapters, **kw) -> Path:
        key = repr((str(base), [str(a) for a in adapters], sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("out") / "merged"
            cache[key] = do_merge(base, adapters, out, **kw)
        return cache[key]

    return _merged


# --------------------------------------------------------------------------- reference checks


def base_file_tensors(case) -> dict[str, torch.Tensor]:
    return load_safetensors_dir(case.base_path)


def reference64(W: torch.Tensor, terms) -> torch.Tensor:
    """float64 W + sum(weight * scale * B@A) (transposed for fan_in_fan_out), exact to ~1e-16."""
    ref = W.double().clone()
    for weight, target in terms:
        ref += weight * target.delta64()
    return ref


def reference32(W: torch.Tensor, terms) -> torch.Tensor:
    """The contract's formula in float32, whole tensor: f32(W) + sum(w * s * (f32(B) @ f32(A)))."""
    ref = W.float().clone()
    for weight, t in terms:
        d = (t.B.float() @ t.A.float()) * (weight * t.scale)
        ref += d.T if t.fan_in_fan_out else d
    return ref


def abs_bound64(W: torch.Tensor, terms) -> torch.Tensor:
    """|W| + sum |weight*scale| * |B| @ |A|: the magnitude PEFT's f32 rounding errors scale with."""
    out = W.double().abs()
    for weight, t in terms:
        d = (t.B.double().abs() @ t.A.double().abs()) * abs(weight * t.scale)
        out += d.T if t.fan_in_fan_out else d
    return out


def check_structure(ours: dict, base: dict, out_dtype: torch.dtype | None = None):
    """Same names (nothing missing, nothing extra), shapes, and dtypes (floats cast to out_dtype)."""
    missing = sorted(set(base) - set(ours))
    extra = sorted(set(ours) - set(base))
    assert not missing, f"tensors missing from output: {missing[:5]}"
    assert not extra, f"unexpected tensors in output: {extra[:5]}"
    for name, t in base.items():
        o = ours[name]
        assert tuple(o.shape) == tuple(t.shape), f"{name}: shape {tuple(o.shape)} != base {tuple(t.shape)}"
        want = out_dtype if (out_dtype is not None and t.dtype.is_floating_point) else t.dtype
        assert o.dtype == want, f"{name}: dtype {o.dtype}, expected {want}"


def check_untouched(ours: dict, base: dict, merged_names: set[str], out_dtype: torch.dtype | None = None):
    """Tensors no LoRA targets: bit-identical to the base (or to the base cast to out_dtype)."""
    for name, t in base.items():
        if name in merged_names:
            continue
        want = t if out_dtype is None or not t.dtype.is_floating_point else t.to(out_dtype)
        frac = bitwise_fraction(ours[name], want)
        assert frac == 1.0, f"{name}: untouched tensor is not bit-identical to the base ({frac * 100:.2f}% equal)"


def case_terms(case, weight: float = 1.0) -> dict:
    return {n: [(weight, t)] for n, t in case.targets.items()}


def check_merged_values(ours: dict, base: dict, terms_by_name: dict, out_dtype: torch.dtype = torch.float32):
    """Semantics, whatever the rounding scheme: every merged tensor is W + sum(w*s*B@A) (transposed
    for fan_in_fan_out) up to float32 rounding error and one rounding to out_dtype:
        |ours - exact| <= 4 eps32 (|W| + sum|w s| |B||A|) + ulp_rel(out_dtype) |exact|.
    A wrong scale/rank/alpha, a missing, doubled or untransposed delta, or the wrong module misses
    this by orders of magnitude (checked: the delta itself is far above the bound)."""
    assert terms_by_name, "fixture error: adapter targets nothing"
    for name, terms in terms_by_name.items():
        W = base[name]
        o = ours[name]
        assert o.dtype == out_dtype, f"{name}: dtype {o.dtype}, expected {out_dtype}"
        exact = reference64(W, terms)
        bound = 4 * EPS32 * abs_bound64(W, terms) + REL_ULP[out_dtype] * exact.abs()
        delta = (exact - W.double()).abs()
        assert bool((delta > bound).float().mean() > 0.5), f"fixture error: delta for {name} is below rounding"
        err = (o.double() - exact).abs()
        ratio = err / bound
        if bool((ratio > 1).any()):
            i = int(ratio.argmax())
            pytest.fail(
                f"{name}: not W + s*(B@A): at flat index {i} ours={o.reshape(-1)[i].item()!r}, "
                f"expected {exact.reshape(-1)[i].item()!r} (W={W.reshape(-1)[i].item()!r}); "
                f"{int((ratio > 1).sum())} of {o.numel()} elements off, worst {float(ratio.max()):.3g}x the bound"
            )


def check_vs_peft_f32(ours: dict, case, base: dict):
    """f32 output vs PEFT merge_and_unload within PEFT's own f32 forward-error bound."""
    for name, target in case.targets.items():
        peft = case.merged_state_dict[name]
        err = (ours[name].double() - peft.double()).abs()
        bound = 4 * EPS32 * abs_bound64(base[name], [(1.0, target)])
        ratio = float((err / bound).max())
        assert ratio <= 1.0, (
            f"{name}: differs from PEFT merge_and_unload beyond f32 rounding error: "
            f"max |ours-peft| = {float(err.max()):.3e}, {ratio:.1f}x the bound"
        )


def check_single_rounding_f32(ours: dict, base: dict, terms_by_name: dict):
    """DESIGN contract for float32 output: the float32 formula, >= 99.99 % bitwise, rest <= 1 ulp."""
    worst = {}
    for name, terms in terms_by_name.items():
        ref = reference32(base[name], terms)
        u, f = max_ulp_diff(ours[name], ref), bitwise_fraction(ours[name], ref)
        if u > 1 or f < 0.9999:
            worst[name] = (u, f)
    assert not worst, (
        "not the float32 formula: "
        + ", ".join(f"{n}: {u} ulp, {f * 100:.3f}% bitwise" for n, (u, f) in list(worst.items())[:4])
        + f" ({len(worst)} tensors)"
    )


def assert_lowp_close(ours: torch.Tensor, ref: torch.Tensor, what: str, min_frac: float = 0.9999):
    frac = bitwise_fraction(ours, ref)
    ulp = max_ulp_diff(ours, ref)
    assert frac >= min_frac and ulp <= 1, (
        f"{what}: {frac * 100:.4f}% bitwise equal (need >= {min_frac * 100:.2f}%), max {ulp} ulp (allowed 1)"
    )


# PEFT's f32 merge (two roundings) itself disagrees with the exact single-rounding value after the
# bf16 cast in 1e-5 .. 1.2e-4 of the elements (measured over 12 seeds/archs of these models, with
# no streammerge involved), so 99.99 % against PEFT-cast would be seed luck; 99.97 % is not.
PEFT_CAST_MIN_FRAC = 0.9997
REL_ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


def check_merged_lowp(ours: dict, case, base: dict, out_dtype: torch.dtype):
    """bf16/f16 output vs (a) the float32 formula rounded once: >= 99.99 % bitwise, rest
    1 ulp; (b) PEFT's f32 merge cast: >= 99.97 % bitwise, and where they differ by more than 1 ulp
    the element must be one where PEFT's own f32 rounding error (near-cancellation of W and delta)
    explains it: |ours - peft_f32| <= 4 eps32 (|W| + |s||B||A|) + 1 ulp(ours)."""
    cat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    names = sorted(case.targets)
    o = cat([ours[n] for n in names])
    assert o.dtype == out_dtype
    ref = cat([reference32(base[n], [(1.0, case.targets[n])]).to(out_dtype) for n in names])
    peft32 = cat([case.merged_state_dict[n] for n in names])
    peft = peft32.to(out_dtype)
    bound = cat([abs_bound64(base[n], [(1.0, case.targets[n])]) for n in names])
    basecast = cat([base[n].to(out_dtype) for n in names])
    assert bitwise_fraction(ref, basecast) < 0.5, "fixture error: the delta vanishes in low precision"
    assert o.numel() >= 20000, "fixture error: too few merged elements for a 99.99 % criterion"
    assert_lowp_close(o, ref, "vs single-rounding reference")

    frac = bitwise_fraction(o, peft)
    assert frac >= PEFT_CAST_MIN_FRAC, (
        f"vs PEFT f32 merge cast: only {frac * 100:.4f}% bitwise equal (need >= {PEFT_CAST_MIN_FRAC * 100:.2f}%)"
    )
    far = (o.float() != peft.float()) & (
        (o.double() - peft.double()).abs() > REL_ULP[out_dtype] * torch.maximum(o.double().abs(), peft.double().abs())
    )
    if far.any():
        err = (o.double() - peft32.double()).abs()[far]
        allowed = (4 * EPS32 * bound + REL_ULP[out_dtype] * o.double().abs())[far]
        assert bool((err <= allowed).all()), (
            f"vs PEFT f32 merge cast: {int(far.sum())} element(s) > 1 ulp apart beyond PEFT's f32 error: "
            f"ours {o[far][:3].tolist()}, peft {peft32[far][:3].tolist()}"
        )


def assert_same_shard_bytes(out_a: Path, out_b: Path):
    fa, fb = shard_files(out_a), shard_files(out_b)
    assert [f.name for f in fa] == [f.name for f in fb]
    for a, b in zip(fa, fb):
        ba, bb = a.read_bytes(), b.read_bytes()
        if ba != bb:
            ta, tb = load_safetensors_dir(out_a), load_safetensors_dir(out_b)
            diff = [k for k in ta if k not in tb or not torch.equal(ta[k].view(-1).view(torch.uint8), tb[k].view(-1).view(torch.uint8))]
            pytest.fail(f"{a.name}: bytes differ ({len(ba)} vs {len(bb)} bytes); tensors that differ: {diff[:5]}")


# --------------------------------------------------------------------------- 1. f32 vs PEFT


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merge_f32_matches_peft(arch, request, merged):
    """Names/shapes/dtypes exactly the base's; untouched tensors bit-identical; merged tensors are
    W + s*B@A and agree with PEFT's merge_and_unload up to PEFT's own f32 rounding error."""
    case = request.getfixturevalue(f"{arch}_case")
    out = merged(case.base_path, [case.adapter_path])
    ours = load_safetensors_dir(out)
    base = base_file_tensors(case)
    check_structure(ours, base)
    check_untouched(ours, base, case.merged_weight_names)
    check_merged_values(ours, base, case_terms(case))
    check_vs_peft_f32(ours, case, base)
    if arch == "gpt2":  # Conv1D: the delta must be transposed into the [in, out] weight
        t = case.targets["transformer.h.0.attn.c_attn.weight"]
        assert t.fan_in_fan_out and tuple(base[t.weight_name].shape) == (32, 96)
    if arch == "qwen2":  # tied embeddings: no lm_head in the base, none in the output
        assert "lm_head.weight" not in ours


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merge_f32_rounded_once(arch, request, merged):
    """DESIGN numerics: f32 output is the float32 formula (>= 99.99 % bitwise, rest within 1 ulp)."""
    case = request.getfixturevalue(f"{arch}_case")
    out = merged(case.base_path, [case.adapter_path])
    check_single_rounding_f32(load_safetensors_dir(out), base_file_tensors(case), case_terms(case))


# --------------------------------------------------------------------------- 1b. bf16 single rounding

LLAMA64 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
GPT2_64 = dict(n_embd=64, n_inner=128)


@pytest.mark.parametrize("arch,over,base_dtype,out_dtype", [
    ("llama", LLAMA64, torch.bfloat16, None),
    ("gpt2", GPT2_64, torch.bfloat16, None),
    ("llama", LLAMA64, torch.float32, "bfloat16"),
    ("llama", LLAMA64, torch.float32, "float16"),
], ids=["llama-bf16", "gpt2-bf16", "llama-f32-to-bf16", "llama-f32-to-f16"])
def test_merge_lowp_single_rounding(arch, over, base_dtype, out_dtype, make_base, make_adapter, merged):
    """16-bit output vs cast(f32 formula) (>= 99.99 % bitwise, rest 1 ulp) and vs PEFT's f32
    merge cast (>= 99.97 % bitwise; larger gaps only where PEFT's own f32 error explains them)."""
    base_path = make_base(arch, dtype=base_dtype, **over)
    case = make_adapter(base_path, r=8, lora_alpha=16)
    kw = {"dtype": out_dtype} if out_dtype else {}
    out = merged(base_path, [case.adapter_path], **kw)
    want = TORCH_DTYPES[out_dtype] if out_dtype else base_dtype
    ours = load_safetensors_dir(out)
    base = base_file_tensors(case)
    assert all(t.dtype == base_dtype for t in base.values())
    check_structure(ours, base, want)
    check_untouched(ours, base, case.merged_weight_names, want)
    check_merged_values(ours, base, case_terms(case), want)
    check_merged_lowp(ours, case, base, want)


# --------------------------------------------------------------------------- 2. logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_logits_match_peft_merged_model(arch, request, merged):
    from transformers import AutoModelForCausalLM

    case = request.getfixturevalue(f"{arch}_case")
    out = merged(case.base_path, [case.adapter_path])
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    base_model = AutoModelForCausalLM.from_pretrained(str(case.base_path), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=case.input_ids).logits.float()
        base_logits = base_model(input_ids=case.input_ids).logits.float()
    assert (base_logits - case.ref_logits).abs().max() > 1e-3, "fixture error: adapter does not change logits"
    torch.testing.assert_close(logits, case.ref_logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- 3. shard bytes


def _resave_equal(out: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    files = shard_files(out)
    assert files
    for f in files:
        tensors = load_file(str(f))
        again = tmp_path / f.name
        save_file(tensors, str(again), metadata={"format": "pt"})
        a, b = f.read_bytes(), again.read_bytes()
        if a != b:
            ha, hb = safetensors_header(f), safetensors_header(again)
            pytest.fail(
                f"{f.name} is not byte-identical to save_file's output "
                f"(sizes {len(a)} vs {len(b)}; header keys {list(ha)[:4]} vs {list(hb)[:4]})"
            )


@pytest.mark.parametrize("variant", ["llama-f32", "gpt2-f32", "llama-to-bf16", "llama-multishard"])
def test_shards_bytes_equal_save_file(variant, llama_case, gpt2_case, merged, tmp_path):
    case = gpt2_case if variant.startswith("gpt2") else llama_case
    kw = {}
    if variant == "llama-to-bf16":
        kw["dtype"] = "bfloat16"
    if variant == "llama-multishard":
        kw["max_shard_size"] = "20KB"
    out = merged(case.base_path, [case.adapter_path], **kw)
    if variant == "llama-multishard":
        assert len(shard_files(out)) > 1
    _resave_equal(out, tmp_path)


# --------------------------------------------------------------------------- 4. chunk invariance


@pytest.mark.parametrize("arch,over,rows_name", [
    ("llama", dict(intermediate_size=51), "model.layers.0.mlp.gate_proj.weight"),  # [51, 32]
    ("gpt2", dict(n_inner=51), "transformer.h.0.mlp.c_proj.weight"),  # Conv1D [51, 32]: transposed delta
])
def test_chunk_invariance(arch, over, rows_name, make_base, make_adapter, merged):
    base_path = make_base(arch, **over)
    case = make_adapter(base_path)
    assert rows_name in case.targets
    rows = case.base_state_dict[rows_name].shape[0]
    assert rows == 51
    # None -> 1 piece, 17 rows -> 3 pieces, 3 rows -> 17 pieces (for the 51-row tensors)
    assert math.ceil(rows / 17) == 3 and math.ceil(rows / 3) == 17
    outs = {n: merged(base_path, [case.adapter_path], max_chunk_rows=n) for n in (None, 17, 3)}
    # the whole-tensor result is right (so byte equality below is not equality of wrong outputs)
    ours = load_safetensors_dir(outs[None])
    base = base_file_tensors(case)
    check_untouched(ours, base, case.merged_weight_names)
    check_merged_values(ours, base, case_terms(case))
    assert_same_shard_bytes(outs[None], outs[17])
    assert_same_shard_bytes(outs[None], outs[3])


def test_chunk_invariance_bf16(make_base, make_adapter, merged):
    base_path = make_base("llama", dtype=torch.bfloat16, intermediate_size=51)
    case = make_adapter(base_path)
    outs = {n: merged(base_path, [case.adapter_path], max_chunk_rows=n) for n in (None, 17, 3, 1)}
    for n in (17, 3, 1):
        assert_same_shard_bytes(outs[None], outs[n])


# --------------------------------------------------------------------------- 5. LoRA options


LORA_VARIANTS = {
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "rank_alpha_pattern": dict(
        r=4,
        lora_alpha=8,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 32, "layers.0.self_attn.o_proj": 3},
    ),
    "regex_targets": dict(target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"),
    "layers_to_transform": dict(
        target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"
    ),
    "exclude_modules": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        exclude_modules=r".*layers\.0\.self_attn\.(k|o)_proj",
    ),
    "exclude_modules_list": dict(
        target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=["up_proj"]
    ),
    "alpha_not_r": dict(r=3, lora_alpha=5),
}

EXPECTED_TARGETS = {  # sanity of the fixture: what PEFT must have targeted
    "regex_targets": {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"},
    "layers_to_transform": {
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    },
}


@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_config_variants(variant, make_base, make_adapter, merged):
    base_path = make_base("llama")
    case = make_adapter(base_path, **LORA_VARIANTS[variant])
    if variant in EXPECTED_TARGETS:
        assert set(case.targets) == EXPECTED_TARGETS[variant]
    if variant == "rslora":
        assert all(abs(t.scale - 16 / math.sqrt(8)) < 1e-12 for t in case.targets.values())
    if variant == "rank_alpha_pattern":
        scales = {n: (t.A.shape[0], t.scale) for n, t in case.targets.items()}
        assert scales["model.layers.0.self_attn.q_proj.weight"] == (2, 4.0)  # alpha 8 / r 2
        assert scales["model.layers.1.mlp.down_proj.weight"] == (6, 8 / 6)
        assert scales["model.layers.0.self_attn.v_proj.weight"] == (4, 8.0)  # alpha 32 / r 4
        assert scales["model.layers.0.self_attn.o_proj.weight"] == (4, 0.75)
        assert scales["model.layers.1.self_attn.o_proj.weight"] == (4, 2.0)
    if variant.startswith("exclude"):
        assert not any(".layers.0.self_attn.k_proj" in n or ".layers.0.self_attn.o_proj" in n or "up_proj" in n
                       for n in case.targets)
        assert len(case.targets) >= 4
    out = merged(base_path, [case.adapter_path])
    ours = load_safetensors_dir(out)
    base = base_file_tensors(case)
    check_structure(ours, base)
    check_untouched(ours, base, case.merged_weight_names)
    check_merged_values(ours, base, case_terms(case))


def test_sharded_base(make_base, make_adapter, merged):
    base_path = make_base("llama", max_shard_size="20KB")
    assert (base_path / "model.safetensors.index.json").exists()
    assert len(shard_files(base_path)) >= 3
    case = make_adapter(base_path)
    out = merged(base_path, [case.adapter_path])
    ours = load_safetensors_dir(out)
    base = base_file_tensors(case)
    check_structure(ours, base)
    check_untouched(ours, base, case.merged_weight_names)
    check_merged_values(ours, base, case_terms(case))
    # everything fits in one 5GB output shard
    assert (out / "model.safetensors").exists()
    assert not list(out.glob("model-*-of-*.safetensors"))


def _expected_split(base_path: Path, out_dtype: torch.dtype | None, max_shard_size):
    """transformers' rule: split_torch_state_dict_into_shards over tensors in the base's order."""
    from huggingface_hub import split_torch_state_dict_into_shards

    base = load_safetensors_dir(base_path)
    sd = OrderedDict()
    for name in tensor_order(base_path):
        t = base[name]
        dt = out_dtype if (out_dtype is not None and t.dtype.is_floating_point) else t.dtype
        sd[name] = torch.empty(t.shape, dtype=dt)  # distinct storages, output sizes
    return split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size)


@pytest.mark.parametrize("base_shards,dtype,max_shard_size", [
    (None, None, "20KB"),  # embed_tokens/lm_head (20480 B) exceed the limit: own shards
    (None, "bfloat16", "7KB"),  # grouping must use the *output* sizes
    ("20KB", None, "30KB"),  # sharded base: base order = its shards in order, tensors by offset
])
def test_output_shards_follow_transformers_rule(base_shards, dtype, max_shard_size, make_base, make_adapter, merged):
    base_path = make_base("llama", **({"max_shard_size": base_shards} if base_shards else {}))
    case = make_adapter(base_path)
    kw = {"max_shard_size": max_shard_size}
    if dtype:
        kw["dtype"] = dtype
    out = merged(base_path, [case.adapter_path], **kw)
    split = _expected_split(base_path, TORCH_DTYPES.get(dtype), max_shard_size)
    assert split.is_sharded and len(split.filename_to_tensors) >= 3, "fixture error: expected several shards"

    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(split.filename_to_tensors), f"shard files {files} != {sorted(split.filename_to_tensors)}"
    assert not (out / "model.safetensors").exists()
    for name in files:
        m = SHARD_RE.match(name)
        assert m and int(m.group(2)) == len(files)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert weight_map == split.tensor_to_filename
    # weight_map agrees with where the tensors really are, and total_size with their bytes
    total = 0
    seen = set()
    for fname in files:
        h = safetensors_header(out / fname)
        h.pop("__metadata__", None)
        for tname, info in h.items():
            assert weight_map.get(tname) == fname, f"{tname} is in {fname}, index says {weight_map.get(tname)}"
            total += info["data_offsets"][1] - info["data_offsets"][0]
            seen.add(tname)
        assert set(h) == set(split.filename_to_tensors[fname])
    assert seen == set(weight_map)
    assert index["metadata"]["total_size"] == total == split.metadata["total_size"]
    # and the content is still right
    ours = load_safetensors_dir(out)
    base = base_file_tensors(case)
    want = TORCH_DTYPES.get(dtype, torch.float32)
    check_structure(ours, base, want)
    check_untouched(ours, base, case.merged_weight_names, want)
    check_merged_values(ours, base, case_terms(case), want)


# --------------------------------------------------------------------------- 6. config, files, record


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


INPUT_SECTIONS = {"base", "adapters", "adapter", "inputs", "sources", "input"}


def _find_shard_digests(record) -> dict[str, set[str]]:
    """(output file name -> sha256) associations in streammerge.json, outside its input sections.

    Accepts {"filename"/"name"/"file": NAME, "sha256": HEX}-style entries and {NAME: HEX} maps."""
    found: dict[str, set[str]] = {}
    hexre = re.compile(r"^(sha256:)?[0-9a-f]{64}$")

    def norm(h):
        return h.split(":", 1)[1] if h.startswith("sha256:") else h

    def walk(node):
        if isinstance(node, dict):
            names = [v for v in node.values() if isinstance(v, str) and v.endswith(".safetensors")]
            hexes = [v for v in node.values() if isinstance(v, str) and hexre.match(v)]
            for n in names:
                for h in hexes:
                    found.setdefault(Path(n).name, set()).add(norm(h))
            for k, v in node.items():
                if isinstance(k, str) and k.lower() in INPUT_SECTIONS:
                    continue
                if isinstance(k, str) and k.endswith(".safetensors"):
                    vals = [v] if isinstance(v, str) else list(v.values()) if isinstance(v, dict) else []
                    for vv in vals:
                        if isinstance(vv, str) and hexre.match(vv):
                            found.setdefault(Path(k).name, set()).add(norm(vv))
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(record)
    return found


@pytest.fixture(scope="session")
def llama64_f32_case(make_base, make_adapter):
    base = make_base("llama", hidden_size=64, intermediate_size=128)
    return make_adapter(base, r=8, lora_alpha=16)


def test_dtype_change_updates_config_and_copies_files(llama64_f32_case, merged):
    case = llama64_f32_case
    out = merged(case.base_path, [case.adapter_path], dtype="bfloat16")
    base_cfg = json.loads((case.base_path / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert base_cfg.get("dtype") == "float32"
    assert cfg.get("dtype") == "bfloat16", f"config.json dtype = {cfg.get('dtype')!r}"
    if "torch_dtype" in cfg:
        assert cfg["torch_dtype"] == "bfloat16"
    for k, v in base_cfg.items():
        if k not in ("dtype", "torch_dtype", "transformers_version", "quantization_config"):
            assert cfg.get(k) == v, f"config.json key {k!r} changed: {v!r} -> {cfg.get(k)!r}"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).exists(), f"{name} not copied"
        assert (out / name).read_bytes() == (case.base_path / name).read_bytes(), f"{name} differs from the base's"
    ours = load_safetensors_dir(out)
    base = base_file_tensors(case)
    check_structure(ours, base, torch.bfloat16)
    check_untouched(ours, base, case.merged_weight_names, torch.bfloat16)
    check_merged_values(ours, base, case_terms(case), torch.bfloat16)
    # and the folder loads as a bf16 model
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(str(out)).dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("w5 w6")["input_ids"] == [5, 6]


def test_config_dtype_unchanged_without_dtype(llama_case, merged):
    out = merged(llama_case.base_path, [llama_case.adapter_path])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype") == "float32"
    assert (out / "generation_config.json").read_bytes() == (llama_case.base_path / "generation_config.json").read_bytes()


@pytest.mark.parametrize("max_shard_size", ["5GB", "20KB"])
def test_streammerge_json_records_shard_sha256(max_shard_size, llama_case, merged):
    out = merged(llama_case.base_path, [llama_case.adapter_path], max_shard_size=max_shard_size)
    record_path = out / "streammerge.json"
    assert record_path.exists()
    record = json.loads(record_path.read_text())
    digests = _find_shard_digests(record)
    files = shard_files(out)
    assert len(files) == (1 if max_shard_size == "5GB" else len(list(out.glob("model-*.safetensors"))))
    for f in files:
        assert f.name in digests, f"streammerge.json has no sha256 for {f.name} (found: {sorted(digests)})"
        assert digests[f.name] == {_sha256(f)}, f"{f.name}: recorded {digests[f.name]} != actual {_sha256(f)}"
    assert set(digests) == {f.name for f in files}, f"digests recorded for files not written: {set(digests)}"


# --------------------------------------------------------------------------- 7. plan + CLI


def test_plan_api_json(llama_case):
    sm = _streammerge()
    plan = sm.plan(str(llama_case.base_path), [str(llama_case.adapter_path)], device="cpu")
    data = json.loads(plan.to_json())
    text = json.dumps(data)
    for name in llama_case.targets:
        assert name in text
    # planning reads headers only and writes nothing
    assert not (llama_case.base_path / "streammerge.json").exists()


def test_cli_merge_matches_api(llama_case, merged, tmp_path):
    api_out = merged(llama_case.base_path, [llama_case.adapter_path])
    out = tmp_path / "cli-out"
    res = run_cli("merge", llama_case.base_path, llama_case.adapter_path, "--out", out, "--quiet", "--device", "cpu")
    assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr
    assert_same_shard_bytes(api_out, out)
    for name in ("config.json", "tokenizer.json", "generation_config.json", "streammerge.json"):
        assert (out / name).exists()


def test_cli_weighted_adapters(llama_case, make_adapter, tmp_path):
    case2 = make_adapter(llama_case.base_path, seed=7, target_modules=["q_proj", "down_proj"], r=2, lora_alpha=2)
    out = tmp_path / "weighted"
    res = run_cli(
        "merge", llama_case.base_path, f"{llama_case.adapter_path}@0.5", case2.adapter_path,
        "--out", out, "--dtype", "float32", "--max-shard-size", "5GB", "--max-memory", "1GB", "--quiet",
        "--device", "cpu",
    )
    assert res.returncode == 0, f"exit {res.returncode}\nstderr: {res.stderr[-2000:]}"
    ours = load_safetensors_dir(out)
    base = base_file_tensors(llama_case)
    check_structure(ours, base)
    names = set(llama_case.targets) | set(case2.targets)
    assert set(case2.targets) - set(llama_case.targets) == set() and len(case2.targets) == 4
    check_untouched(ours, base, names)
    terms = {}
    for name in names:
        terms[name] = []
        if name in llama_case.targets:
            terms[name].append((0.5, llama_case.targets[name]))
        if name in case2.targets:
            terms[name].append((1.0, case2.targets[name]))
    check_merged_values(ours, base, terms)


def test_cli_plan_json(llama_case):
    res = run_cli("plan", llama_case.base_path, llama_case.adapter_path, "--json")
    assert res.returncode == 0, f"exit {res.returncode}\nstderr: {res.stderr[-2000:]}"
    data = json.loads(res.stdout)
    text = json.dumps(data)
    for name in llama_case.targets:
        assert name in text


@pytest.mark.parametrize("what", ["missing-adapter", "missing-base"])
def test_cli_bad_input_one_line_error(what, llama_case, tmp_path):
    base, adapter = llama_case.base_path, llama_case.adapter_path
    if what == "missing-adapter":
        adapter = tmp_path / "no-such-adapter"
    else:
        base = tmp_path / "no-such-base"
    out = tmp_path / "out"
    res = run_cli("merge", base, adapter, "--out", out, "--quiet")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), f"stderr was: {res.stderr!r}"
    assert not list(out.glob("*.safetensors")) if out.exists() else True
