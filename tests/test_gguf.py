"""--method gguf: the GGUF that streammerge writes, checked against independent oracles.

Oracles (none of them streammerge's code):
  * transformers' own GGUF loader (`from_pretrained(OUT, gguf_file=...)`), which undoes llama.cpp's
    q/k permutation and Gemma's norm shift itself: its weights must equal our merged_16bit weights
    (bf16: exactly; q8_0/q4_0: exactly the gguf package's quantize -> dequantize of the float32
    merge) and its logits must equal those of the merged_16bit model with those weights;
  * the gguf package: `GGUFReader` reads every file (split ones too) and every stored tensor's bytes
    equal `gguf.quants.quantize` of the merged float32 tensor transformed per llama.cpp's rules
    (written out independently below);
  * the tokenizer transformers rebuilds from the GGUF encodes text as the base's own tokenizer does.
Then each architecture rule is broken on purpose and the transformers-side checks must catch it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import streammerge
from conftest import load_safetensors_dir, run_cli
from streammerge.errors import UnsupportedError
from streammerge.formats.gguf import arch as gguf_arch
from streammerge.formats.gguf import vocab as gguf_vocab

CASES = {  # arch -> (tokenizer kind, config overrides)
    "llama": ("bpe-llama3", {"tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}),
    "qwen2": ("bpe-qwen2", {}),  # tied embeddings, q/k/v biases
    "qwen3": ("bpe-qwen2", {"head_dim": 128}),  # q/k norms; transformers' GGUF config assumes head_dim 128
    "gemma3": ("spm", {}),  # SentencePiece, norms stored +1, tied
    "mistral": ("bpe-llama3", {"tie_word_embeddings": False}),  # llama's rules under another name
    "gemma2": ("spm", {}),  # its own metadata keys, lm_head never stored
}
MAIN = ["llama", "qwen2", "qwen3", "gemma3"]
QUANTIZED = [(arch, t) for t in ("q8_0", "q4_0") for arch in MAIN] + [("llama", "f16"), ("gemma3", "f16")]
TEXTS = ["Hello, world! The quick brown fox 2024.", "Llamas graze; quantization stores 32 weights per block.", "zebra über 😀"]
TYPES = {"bf16": "BF16", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


# --------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Case:
    arch: str
    base: Path
    adapter: Path
    config: dict
    ref_f32: dict  # our merged_16bit --dtype float32: the merge before any cast
    ref_bf16: dict  # our merged_16bit --dtype bfloat16
    merged_dir: Path  # the float32 merged_16bit folder (reference model for logits)
    input_ids: torch.Tensor


@pytest.fixture(scope="module")
def cases(make_base, make_adapter, tmp_path_factory) -> dict[str, Case]:
    out = {}
    for arch, (tokenizer, overrides) in CASES.items():
        base = make_base(arch, dtype=torch.bfloat16, tokenizer=tokenizer, **overrides)  # bf16, as most bases
        adapter = make_adapter(base)
        root = tmp_path_factory.mktemp(f"ref-{arch}")
        refs = {}
        for dtype in ("float32", "bfloat16"):
            streammerge.merge(str(base), [str(adapter.adapter_path)], str(root / dtype), dtype=dtype, device="cpu")
            refs[dtype] = load_safetensors_dir(root / dtype)
        config = json.loads((base / "config.json").read_text())
        out[arch] = Case(arch, base, adapter.adapter_path, config, refs["float32"], refs["bfloat16"], root / "float32",
                         adapter.input_ids)
    return out


def gguf_merge(case: Case, out: Path, gguf_type: str, **kw) -> list[Path]:
    result = streammerge.merge(str(case.base), [str(case.adapter)], str(out), method="gguf", gguf_type=gguf_type,
                               device="cpu", **kw)
    return [out / f["filename"] for f in result.shards]


# ------------------------------------------------------------- llama.cpp's rules, written out here


def permuted(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE row order: row h*d + 2j + i of the result is row h*d + i*d/2 + j of w."""
    d = w.shape[0] // heads
    index = [h * d + i * (d // 2) + j for h in range(heads) for j in range(d // 2) for i in range(2)]
    return w[torch.tensor(index)]


def expected_stored(case: Case, hf_name: str, gguf_type: str, tensor_names: set[str]) -> tuple[str, np.ndarray]:
    """(ggml type, float32 values as llama.cpp stores them) for one checkpoint tensor."""
    w = case.ref_f32[hf_name].float()
    c = case.config
    if case.arch in ("llama", "mistral") and re.search(r"\.(q|k)_proj\.(weight|bias)$", hf_name):
        heads = c["num_attention_heads"] if ".q_proj." in hf_name else c["num_key_value_heads"]
        w = permuted(w, heads)
    if case.arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
        w = w + 1.0
    if w.ndim == 1:
        return "F32", w.numpy()
    wanted = TYPES[gguf_type]
    gname = "output.weight" if hf_name == "lm_head.weight" else "token_embd.weight" if "embed_tokens" in hf_name else ""
    if gguf_type == "q4_0" and (gname == "output.weight" or (gname == "token_embd.weight" and "output.weight" not in tensor_names)):
        wanted = "Q8_0"
    return wanted, w.numpy()


def gguf_name_map(case: Case):
    arch_name = {"mistral": "llama"}.get(case.arch, case.arch)
    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    return gguf.get_tensor_name_map(model_arch, case.config["num_hidden_layers"])


def read_tensors(files: list[Path]) -> dict[str, gguf.gguf_reader.ReaderTensor]:
    out = {}
    for f in files:
        for t in gguf.GGUFReader(str(f)).tensors:
            assert t.name not in out, f"{t.name} stored twice"
            out[t.name] = t
    return out


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


# -------------------------------------------------------------------------------- the checks


def check_stored_bytes(case: Case, files: list[Path], gguf_type: str) -> None:
    """Every tensor's bytes = gguf.quants.quantize of the merged float32 tensor, transformed."""
    stored = read_tensors(files)
    names = gguf_name_map(case)
    expected_names = set()
    for hf_name in case.ref_f32:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        expected_names.add(gname)
    assert set(stored) == expected_names
    for hf_name in case.ref_f32:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        qtype, values = expected_stored(case, hf_name, gguf_type, set(stored))
        t = stored[gname]
        assert t.tensor_type.name == qtype, (gname, t.tensor_type.name, qtype)
        assert [int(d) for d in t.shape] == list(reversed(values.shape)), gname
        want = gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])
        assert np.asarray(t.data).tobytes() == np.ascontiguousarray(want).tobytes(), f"{gname} bytes differ"


def roundtrip_reference(case: Case, gguf_type: str, tensor_names: set[str]) -> dict[str, torch.Tensor]:
    """The weights a GGUF of this type must load as: the float32 merge, stored and read back."""
    out = {}
    for hf_name, w in case.ref_f32.items():
        qtype, _ = expected_stored(case, hf_name, gguf_type, tensor_names)
        if qtype == "F32":
            out[hf_name] = w.float()
        elif gguf_type == "bf16":
            out[hf_name] = case.ref_bf16[hf_name].float()  # our merged_16bit bf16 output, as written
        else:  # rows are independent, so quantizing before or after the row permutation is the same
            q = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType[qtype])
            out[hf_name] = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype]).copy())
    return out


def check_with_transformers(case: Case, files: list[Path], gguf_type: str) -> None:
    """transformers' GGUF loader: weights equal our merged_16bit weights; logits equal."""
    assert len(files) == 1
    model = AutoModelForCausalLM.from_pretrained(str(files[0].parent), gguf_file=files[0].name, dtype=torch.float32)
    model.eval()
    names = {t.name for t in gguf.GGUFReader(str(files[0])).tensors}
    expected = roundtrip_reference(case, gguf_type, names)
    state = model.state_dict()
    for name, want in expected.items():
        got = state[name]  # gemma norms: stored w + 1, transformers subtracts 1 (exact for bf16 values)
        assert torch.equal(got, want), f"{name}: max diff {(got - want).abs().max().item():.3g}"
    tied = "output.weight" not in names
    assert bool(model.config.tie_word_embeddings) == tied == ("lm_head.weight" not in case.ref_f32)
    reference = AutoModelForCausalLM.from_pretrained(str(case.merged_dir), dtype=torch.float32)
    reference.load_state_dict(expected, strict=False)
    reference.eval()
    with torch.no_grad():
        ours = model(input_ids=case.input_ids).logits
        ref = reference(input_ids=case.input_ids).logits
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max().item()


def check_tokenizer(case: Case, gguf_file: Path, tmp_path: Path) -> None:
    """The tokenizer rebuilt from the GGUF alone encodes like the base's own tokenizer."""
    solo = tmp_path / "solo"
    solo.mkdir()
    shutil.copy(gguf_file, solo / gguf_file.name)
    rebuilt = AutoTokenizer.from_pretrained(str(solo), gguf_file=gguf_file.name)
    if (case.base / "tokenizer.model").exists():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(case.base / "tokenizer.model"))
        encode = sp.encode
    else:
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(case.base / "tokenizer.json"))
        encode = lambda text: tk.encode(text, add_special_tokens=False).ids  # noqa: E731
    for text in TEXTS:
        assert rebuilt.encode(text, add_special_tokens=False) == encode(text), text
    reader = gguf.GGUFReader(str(gguf_file))
    assert field(reader, "tokenizer.ggml.bos_token_id") == case.config["bos_token_id"]
    assert field(reader, "tokenizer.ggml.eos_token_id") == case.config["eos_token_id"]
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")


def check_metadata(case: Case, gguf_file: Path, gguf_type: str) -> None:
    reader = gguf.GGUFReader(str(gguf_file))
    c = case.config
    a = field(reader, "general.architecture")
    assert a == {"mistral": "llama"}.get(case.arch, case.arch)
    for key, value in (
        ("context_length", c["max_position_embeddings"]), ("embedding_length", c["hidden_size"]),
        ("block_count", c["num_hidden_layers"]), ("feed_forward_length", c["intermediate_size"]),
        ("attention.head_count", c["num_attention_heads"]), ("attention.head_count_kv", c["num_key_value_heads"]),
    ):
        assert field(reader, f"{a}.{key}") == value, key
    assert field(reader, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(c["rms_norm_eps"], rel=1e-6)
    theta = (c.get("rope_parameters") or {}).get("full_attention", c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta"))
    if a == "gemma2":  # llama.cpp writes no RoPE base for Gemma 2; its loader's default must be the model's
        assert field(reader, f"{a}.rope.freq_base") is None and theta == 10000.0
    else:
        assert field(reader, f"{a}.rope.freq_base") == pytest.approx(theta, rel=1e-6)
    file_type = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]
    assert field(reader, "general.file_type") == int(file_type)


# -------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("arch", list(CASES))
def test_gguf_bf16_loads_in_transformers_with_merged_weights(cases, arch, tmp_path):
    case = cases[arch]
    files = gguf_merge(case, tmp_path / "out", "bf16")
    assert [f.name for f in files] == [f"{case.base.name}-BF16.gguf"]
    check_stored_bytes(case, files, "bf16")
    check_with_transformers(case, files, "bf16")
    check_metadata(case, files[0], "bf16")
    check_tokenizer(case, files[0], tmp_path)
    # the base's config and tokenizer files are copied beside the GGUF, and nothing 16-bit is written
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "config.json" in names and "streammerge.json" in names
    assert {"tokenizer.json", "tokenizer.model"} & names
    assert not [n for n in names if n.endswith((".safetensors", ".partial"))]


@pytest.mark.parametrize(("arch", "gguf_type"), QUANTIZED)
def test_gguf_quantized_equals_gguf_quantization_of_merge(cases, arch, gguf_type, tmp_path):
    case = cases[arch]
    files = gguf_merge(case, tmp_path / "out", gguf_type)
    assert files[0].name == f"{case.base.name}-{TYPES[gguf_type]}.gguf"
    check_stored_bytes(case, files, gguf_type)
    check_with_transformers(case, files, gguf_type)
    check_metadata(case, files[0], gguf_type)


def test_row_chunking_does_not_change_a_byte(cases, tmp_path):
    """One row (one head for q/k) per chunk writes the same file as whole tensors."""
    case = cases["llama"]
    whole = gguf_merge(case, tmp_path / "whole", "q8_0")[0]
    chunked = gguf_merge(case, tmp_path / "chunked", "q8_0", max_chunk_rows=1)[0]
    assert hashlib.sha256(whole.read_bytes()).digest() == hashlib.sha256(chunked.read_bytes()).digest()


def test_split_files_named_and_keyed_as_llama_cpp(cases, tmp_path):
    case = cases["llama"]
    whole = gguf_merge(case, tmp_path / "whole", "bf16")
    files = gguf_merge(case, tmp_path / "split", "bf16", max_shard_size="30KB")
    n = len(files)
    assert n >= 3
    assert [f.name for f in files] == [f"{case.base.name}-BF16-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    total = 0
    for i, f in enumerate(files):
        reader = gguf.GGUFReader(str(f))
        assert field(reader, "split.no") == i and field(reader, "split.count") == n
        total = field(reader, "split.tensors.count")
        assert sum(t.n_bytes for t in reader.tensors) <= 30_000 or len(reader.tensors) == 1
        if i:
            assert field(reader, "tokenizer.ggml.tokens") is None  # metadata lives in the first file only
    split_tensors, whole_tensors = read_tensors(files), read_tensors(whole)
    assert total == len(whole_tensors) == len(split_tensors)
    for name, t in whole_tensors.items():
        assert np.asarray(split_tensors[name].data).tobytes() == np.asarray(t.data).tobytes(), name
    check_stored_bytes(case, files, "bf16")


# ------------------------------------------------------------------- broken rules are caught


def _break(monkeypatch, model_type: str, **changes) -> None:
    monkeypatch.setitem(gguf_arch.ARCHS, model_type, dataclasses.replace(gguf_arch.ARCHS[model_type], **changes))


@pytest.mark.parametrize(
    ("arch", "model_type", "broken"),
    [
        ("llama", "llama", {"permute_qk": False}),  # no q/k row permutation
        ("gemma3", "gemma3_text", {"norm_shift": 0.0}),  # Gemma norms not stored as w + 1
        ("llama", "llama", {"skip": ("lm_head.weight",)}),  # untied lm_head dropped as if tied
    ],
    ids=["no-qk-permutation", "no-gemma-norm-shift", "output-dropped"],
)
def test_breaking_an_arch_rule_is_caught(cases, arch, model_type, broken, monkeypatch, tmp_path):
    case = cases[arch]
    _break(monkeypatch, model_type, **broken)
    files = gguf_merge(case, tmp_path / "out", "bf16")
    with pytest.raises(AssertionError):
        check_with_transformers(case, files, "bf16")


def test_breaking_a_metadata_rule_is_caught(cases, monkeypatch, tmp_path):
    """Without the RoPE base key a reader falls back to its default (10000, not this model's 50000)."""
    from streammerge.planning import gguf as gguf_plan

    def without_rope_base(*args):
        keys = gguf_arch.metadata(*args)
        keys.pop("add_rope_freq_base")
        return keys

    monkeypatch.setattr(gguf_plan, "metadata", without_rope_base)
    case = cases["llama"]
    files = gguf_merge(case, tmp_path / "out", "bf16")
    with pytest.raises(AssertionError):
        check_with_transformers(case, files, "bf16")


def test_llama3_rope_freqs_match_transformers(make_base, make_adapter, tmp_path):
    """Llama 3.x rope scaling: rope_freqs = plain RoPE frequencies / transformers' llama3 frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, dim = 500000.0, 32
    rope = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    base = make_base("llama", tokenizer="bpe-llama3", hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                     max_position_embeddings=512, rope_parameters=rope)
    adapter = make_adapter(base)
    case = Case("llama", base, adapter.adapter_path, {}, {}, {}, base, adapter.input_ids)
    files = gguf_merge(case, tmp_path / "out", "bf16")
    stored = {t.name: t for t in gguf.GGUFReader(str(files[0])).tensors}
    assert stored["rope_freqs.weight"].tensor_type.name == "F32"
    factors = torch.from_numpy(np.asarray(stored["rope_freqs.weight"].data).copy())
    inv_plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig.from_pretrained(str(base)), "cpu")
    want = inv_plain / inv_llama3.float()
    assert len({round(float(x), 3) for x in want}) >= 3  # all three regimes (1, factor, smoothed) present
    assert torch.allclose(factors, want, rtol=1e-5), (factors, want)


# -------------------------------------------------------------------------- tokenizer identity


def test_pre_tokenizer_fingerprint_is_llama_cpp_hash(cases, monkeypatch, tmp_path):
    """Our fingerprint is llama.cpp's: sha256 of the ids transformers' AutoTokenizer gives for its
    check text. A known hash names the pre-tokenizer; an unknown one falls back to the split regex."""
    from tokenizers import Tokenizer

    case = cases["llama"]
    tok = AutoTokenizer.from_pretrained(str(case.base))
    llama_cpp_hash = hashlib.sha256(str(tok.encode(gguf_vocab.CHKTXT)).encode()).hexdigest()
    assert gguf_vocab.fingerprint(Tokenizer.from_file(str(case.base / "tokenizer.json"))) == llama_cpp_hash
    result = streammerge.plan(str(case.base), [str(case.adapter)], method="gguf")
    assert (result.vocab["pre"], result.vocab["pre_source"]) == ("llama-bpe", "split regex")
    monkeypatch.setitem(gguf_vocab.KNOWN_PRE, llama_cpp_hash, "smaug-bpe")
    result = streammerge.plan(str(case.base), [str(case.adapter)], method="gguf")
    assert (result.vocab["pre"], result.vocab["pre_source"]) == ("smaug-bpe", "fingerprint")


def test_pre_tokenizer_fallbacks():
    """An unknown fingerprint: the name comes from the split regex (the regexes transformers maps
    llama.cpp's names to), else from ByteLevel's own regex (gpt-2), else from the model family."""
    from types import SimpleNamespace

    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    unknown = SimpleNamespace(encode=lambda text: SimpleNamespace(ids=[len(text), 7]))

    def split(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}

    for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o"):
        got = gguf_vocab.identify_pre(gguf_arch.ARCHS["llama"], unknown, split(GGUF_PRE_TOKENIZER_SPLITS[name]))
        assert got == (name, "split regex")
    byte_level = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
    assert gguf_vocab.identify_pre(gguf_arch.ARCHS["llama"], unknown, byte_level) == ("gpt-2", "split regex")
    assert gguf_vocab.identify_pre(gguf_arch.ARCHS["qwen3"], unknown, split(r"\w+|\s+")) == ("qwen2", "model family")
    assert gguf_vocab.identify_pre(gguf_arch.ARCHS["llama"], unknown, {}) == ("llama-bpe", "model family")


def test_unsupported_architecture_refused_before_work(make_base, make_adapter, tmp_path):
    base = make_base("gpt2")
    adapter = make_adapter(base)
    out = tmp_path / "out"
    res = run_cli("merge", base, adapter.adapter_path, "--out", out, "--method", "gguf")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "'gpt2'" in line
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"):
        assert name in line
    assert not out.exists()


def test_k_quants_we_do_not_write_are_refused_with_the_llama_cpp_step(cases, tmp_path):
    """Q4_K_M & co. are written (tests/test_kquants.py); Q3_K_M and the i-quants name llama-quantize."""
    case = cases["llama"]
    res = run_cli("merge", case.base, case.adapter, "--out", tmp_path / "out", "--method", "gguf", "--gguf-type", "Q3_K_M")
    assert res.returncode == 2 and "llama-quantize" in res.stderr and "Q3_K_M" in res.stderr and "q4_k_m" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_missing_tokenizer_is_a_clear_error(cases, tmp_path):
    from streammerge.errors import InputError

    case = cases["llama"]
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(case.base / name, base / name)
    with pytest.raises(InputError, match="no tokenizer.json or tokenizer.model"):
        streammerge.merge(str(base), [str(case.adapter)], str(tmp_path / "out"), method="gguf", device="cpu")
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_is_a_clear_error(cases, monkeypatch, tmp_path):
    case = cases["llama"]
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: `import gguf` raises ImportError
    with pytest.raises(UnsupportedError, match=r"pip install 'streammerge\[gguf\]'"):
        streammerge.merge(str(case.base), [str(case.adapter)], str(tmp_path / "out"), method="gguf", device="cpu")
    assert not (tmp_path / "out").exists()


def test_plan_shows_gguf_tensor_names_and_types(cases, capsys):
    from streammerge.cli import main

    case = cases["llama"]
    assert main(["plan", str(case.base), str(case.adapter), "--method", "gguf", "--gguf-type", "q4_0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.search(r"blk\.0\.attn_q\.weight\s+Q4_0 .*q/k rows permuted", line) for line in lines)
    assert any(re.search(r"output\.weight\s+Q8_0", line) for line in lines)
    assert any(re.search(r"blk\.0\.attn_norm\.weight\s+F32", line) for line in lines)
    assert main(["plan", str(case.base), str(case.adapter), "--method", "gguf", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    types = {t["name"]: t["type"] for f in data["gguf"]["files"] for t in f["tensors"]}
    assert types["blk.1.ffn_down.weight"] == "BF16" and types["output_norm.weight"] == "F32"
    assert data["gguf"]["files"][0]["filename"] == f"{case.base.name}-BF16.gguf"


def test_dtype_does_not_apply_to_gguf(cases, tmp_path):
    case = cases["llama"]
    res = run_cli("merge", case.base, case.adapter, "--out", tmp_path / "o", "--method", "gguf", "--dtype", "float16")
    assert res.returncode == 2 and "--gguf-type" in res.stderr


# ------------------------------------------------------------------------- memory and disk

_MEASURE = """
import json, resource, subprocess, sys
res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": res.returncode, "stderr": res.stderr[-2000:],
                  "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""
BUDGET = 24 * 10**6


def _peak_rss(*args) -> int:
    import subprocess

    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "streammerge", *map(str, args)]
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert report["rc"] == 0, report["stderr"]
    return report["peak"]


def _memory_case(root: Path, *, vocab: int, hidden: int, intermediate: int, layers: int, shard: str) -> tuple[Path, Path]:
    """A random f32 llama with a real tokenizer and a rank-16 LoRA, saved directly (no PEFT oracle:
    this test measures memory and disk, the oracles above check the values)."""
    import models
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    (root / "base").mkdir(parents=True)
    special = models.build_trained_tokenizer(root / "base", "bpe-llama3", vocab)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False, **special)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base", max_shard_size=shard)
    lora = LoraConfig(r=16, lora_alpha=16, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, lora).save_pretrained(root / "lora")
    return root / "base", root / "lora"


def test_peak_rss_within_budget_and_disk_is_the_gguf_alone(tmp_path):
    """A model several times the budget: peak RSS <= runtime + budget; the folder holds the GGUF
    (exactly the planned size) plus the small copied files, and no 16-bit copy was ever written.

    The runtime is the same merge of a small model (a fifth of the budget), whose tensors are still
    large enough for torch to start its thread pool: a one-time cost of every real merge."""
    big, big_lora = _memory_case(tmp_path / "big", vocab=16000, hidden=512, intermediate=1536, layers=6, shard="60MB")
    small, small_lora = _memory_case(tmp_path / "small", vocab=320, hidden=256, intermediate=512, layers=2, shard="5GB")
    big_bytes = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    assert big_bytes >= 4 * BUDGET
    assert sum(p.stat().st_size for p in small.glob("*.safetensors")) <= BUDGET / 3
    args = ("--method", "gguf", "--gguf-type", "q8_0", "--max-memory", BUDGET, "--device", "cpu", "--quiet")
    runtime = _peak_rss("merge", small, small_lora, "--out", tmp_path / "small-out", *args)
    peak = _peak_rss("merge", big, big_lora, "--out", tmp_path / "out", *args)
    print(f"model {big_bytes / 1e6:.0f} MB, budget {BUDGET / 1e6:.0f} MB, runtime {runtime / 1e6:.0f} MB, "
          f"peak {peak / 1e6:.0f} MB, over runtime {(peak - runtime) / 1e6:.1f} MB")
    assert peak <= runtime + BUDGET
    out = tmp_path / "out"
    record = json.loads((out / "streammerge.json").read_text())
    ggufs = sorted(out.glob("*.gguf"))
    assert [g.name for g in ggufs] == [f["filename"] for f in record["files"]] == ["base-Q8_0.gguf"]
    assert ggufs[0].stat().st_size == record["files"][0]["size"]
    assert hashlib.sha256(ggufs[0].read_bytes()).hexdigest() == record["files"][0]["sha256"]
    others = [p for p in out.iterdir() if p.suffix != ".gguf"]
    assert sum(p.stat().st_size for p in others) < 2_000_000  # config, tokenizer, record: no weights
    assert not [p for p in out.iterdir() if p.name.endswith((".safetensors", ".partial"))]
    reader = gguf.GGUFReader(str(ggufs[0]))
    assert len(reader.tensors) == 3 + 6 * 9  # embeddings, output, output norm + 9 per layer, all readable


@pytest.mark.parametrize("variant", ["dora", "lora_bias", "trainable_tokens", "modules_to_save"])
def test_gguf_applies_lora_variants_like_merged_16bit(make_base, make_adapter, variant, tmp_path):
    """DoRA row scaling, LoRA biases, trainable token rows and saved modules reach the GGUF exactly as
    merged_16bit computes them (a writer that merged only B·A would fail here)."""
    arch = "qwen2" if variant == "lora_bias" else "llama"  # qwen2's q/k/v projections have biases
    tokenizer, overrides = CASES[arch]
    base = make_base(arch, dtype=torch.bfloat16, tokenizer=tokenizer, **overrides)
    kw = {
        "dora": dict(use_dora=True),
        "lora_bias": dict(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
        "trainable_tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 17, 40]),
        "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    }[variant]
    adapter = make_adapter(base, perturb=True, **kw)
    ref_dir = tmp_path / "ref"
    streammerge.merge(str(base), [str(adapter.adapter_path)], str(ref_dir), dtype="float32", device="cpu")
    case = Case(arch, base, adapter.adapter_path, json.loads((base / "config.json").read_text()),
                load_safetensors_dir(ref_dir), {}, ref_dir, adapter.input_ids)
    files = gguf_merge(case, tmp_path / "gguf", "bf16")
    check_stored_bytes(case, files, "bf16")


def test_gguf_refuses_column_norm_dora_before_writing(make_base, make_adapter, tmp_path):
    from streammerge.errors import UnsupportedError

    tokenizer, overrides = CASES["llama"]
    base = make_base("llama", dtype=torch.bfloat16, tokenizer=tokenizer, **overrides)
    adapter = make_adapter(base, target_modules=["embed_tokens", "q_proj"], use_dora=True, perturb=True)
    with pytest.raises(UnsupportedError, match="DoRA.*merged_16bit"):
        streammerge.merge(str(base), [str(adapter.adapter_path)], str(tmp_path / "out"), method="gguf", device="cpu")
    assert not list(tmp_path.rglob("*.gguf*"))


# ------------------------------------------------------------ bitsandbytes bases (issue 10)

BNB = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
BNB_CASES = [("llama", "nf4", "bf16"), ("llama", "nf4", "q8_0"), ("qwen2", "nf4", "bf16"), ("gemma3", "nf4", "bf16"),
             ("llama", "fp4", "q4_0"), ("llama", "int8", "bf16")]


def save_quantized(base: Path, kind: str, out: Path, **save_kw) -> Path:
    """`base` as transformers saves it quantized by bitsandbytes (tests/test_4bit.py's recipe: loaded
    with a BitsAndBytesConfig on the CPU, saved with no forward pass), tokenizer files (and chat
    template) copied."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from transformers import BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=BitsAndBytesConfig(**BNB[kind]),
                                                 device_map="cpu")
    model.save_pretrained(str(out), **save_kw)
    for f in base.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def bnb_case(make_base, make_adapter, tmp_path_factory):
    """bnb_case(arch, kind) -> (Case of the quantized base, Case of its bf16 base), cached. The
    reference is our merged_16bit --dtype float32 from the quantized base: bitsandbytes' dequantized
    weights + the delta, unrounded (held to bitsandbytes and PEFT by tests/test_4bit.py)."""
    made: dict[tuple[str, str], tuple[Case, Case]] = {}

    def get(arch: str, kind: str) -> tuple[Case, Case]:
        if (arch, kind) not in made:
            tokenizer, overrides = CASES[arch]
            base = make_base(arch, dtype=torch.bfloat16, tokenizer=tokenizer, **overrides)
            adapter = make_adapter(base)
            qbase = save_quantized(base, kind, tmp_path_factory.mktemp("bnb") / f"{arch}-{kind}")
            ref = tmp_path_factory.mktemp("bnb-ref") / "f32"
            streammerge.merge(str(qbase), [str(adapter.adapter_path)], str(ref), dtype="float32", device="cpu")
            config = json.loads((qbase / "config.json").read_text())
            assert "quantization_config" in config, "fixture error: the base is not quantized"
            quantized = Case(arch, qbase, adapter.adapter_path, config, load_safetensors_dir(ref), {}, ref, adapter.input_ids)
            plain = Case(arch, base, adapter.adapter_path, json.loads((base / "config.json").read_text()), {}, {}, base,
                         adapter.input_ids)
            made[(arch, kind)] = (quantized, plain)
        return made[(arch, kind)]

    return get


@pytest.mark.parametrize(("arch", "kind", "gguf_type"), BNB_CASES)
def test_gguf_from_bitsandbytes_base_equals_merge_of_dequantized(bnb_case, arch, kind, gguf_type, tmp_path):
    """The GGUF of a 4-bit/8-bit base holds, tensor for tensor, the gguf package's encoding of our
    merged_16bit float32 merge of that base, transformed by llama.cpp's rules; its statistics tensors
    are not in it, and its header (metadata, tensor names, types, shapes) is the bf16 base's."""
    case, plain = bnb_case(arch, kind)
    files = gguf_merge(case, tmp_path / "chunked", gguf_type, max_chunk_rows=3)  # 2-row 4-bit block groups, heads
    assert [f.name for f in files] == [f"{case.base.name}-{TYPES[gguf_type]}.gguf"]
    check_stored_bytes(case, files, gguf_type)
    whole = gguf_merge(case, tmp_path / "whole", gguf_type)
    assert whole[0].read_bytes() == files[0].read_bytes(), "row chunking changed the file"

    ours = gguf.GGUFReader(str(files[0]))
    ref = gguf.GGUFReader(str(gguf_merge(plain, tmp_path / "plain", gguf_type)[0]))
    # the same tensors (in the quantized checkpoint's order, as llama.cpp follows the checkpoint's)
    assert sorted((t.name, t.tensor_type.name, [int(d) for d in t.shape]) for t in ours.tensors) == \
        sorted((t.name, t.tensor_type.name, [int(d) for d in t.shape]) for t in ref.tensors)
    assert not [t.name for t in ours.tensors if re.search(r"absmax|quant_map|quant_state|SCB|weight_format", t.name)]
    keys = [k for k in ref.fields if not k.startswith("GGUF.") and k != "general.name"]
    assert [k for k in ours.fields if not k.startswith("GGUF.") and k != "general.name"] == keys
    for key in keys:
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    config = json.loads((tmp_path / "chunked" / "config.json").read_text())
    assert "quantization_config" not in config


def test_gguf_plan_of_a_bitsandbytes_base_aligns_chunks_and_counts_statistics(bnb_case):
    """Chunks start on whole 4-bit block rows (and whole heads), the plan names the dequantized
    weights, and a budget below one chunk is refused before anything is written."""
    from streammerge.errors import PlanError
    from streammerge.run.gguf_merge import plan_gguf
    from streammerge.planning.gguf import row_unit
    from streammerge.options import MergeOptions
    from streammerge.planning import streaming as qs

    case, _ = bnb_case("llama", "nf4")
    opts = MergeOptions.create(method="gguf", device="cpu", max_chunk_rows=3)
    gplan = plan_gguf(str(case.base), [str(case.adapter)], opts)[3]
    quantized = [t for t in gplan.tensors if t.source is not None and t.source.quant_in is not None]
    assert len(quantized) == 14 and all(t.source.quant_in.codec == "bnb4" for t in quantized)
    assert any(qs.row_alignment(t.source) > 1 for t in quantized), "fixture error: every row holds whole blocks"
    for t in quantized:
        unit = row_unit(t)
        assert unit % qs.row_alignment(t.source) == 0 and (not t.permute_heads or unit % (t.rows // t.permute_heads) == 0)
        assert t.chunk_rows % unit == 0 or t.chunk_rows == t.rows, (t.name, t.chunk_rows, unit)
        assert "dequantized (bnb4)" in t.describe()
    with pytest.raises(PlanError, match="--max-memory .* is too small"):
        plan_gguf(str(case.base), [str(case.adapter)], MergeOptions.create(method="gguf", device="cpu", max_memory="2KB"))


def test_peak_rss_within_budget_from_a_4bit_base(tmp_path):
    """A 4-bit base several times the budget -> GGUF q8_0 (packed reads, decoded statistics, the
    dequantization's temporaries, encoded bytes) stays within runtime + --max-memory; the runtime
    is the same merge of a small 4-bit model."""
    big, big_lora = _memory_case(tmp_path / "big", vocab=16000, hidden=512, intermediate=1536, layers=6, shard="60MB")
    small, small_lora = _memory_case(tmp_path / "small", vocab=320, hidden=256, intermediate=512, layers=2, shard="5GB")
    big_q, small_q = save_quantized(big, "nf4", tmp_path / "big" / "q4"), save_quantized(small, "nf4", tmp_path / "small" / "q4")
    big_bytes = sum(p.stat().st_size for p in big_q.glob("*.safetensors"))
    assert big_bytes >= 2 * BUDGET
    args = ("--method", "gguf", "--gguf-type", "q8_0", "--max-memory", BUDGET, "--device", "cpu", "--quiet")
    runtime = _peak_rss("merge", small_q, small_lora, "--out", tmp_path / "small-out", *args)
    peak = _peak_rss("merge", big_q, big_lora, "--out", tmp_path / "out", *args)
    print(f"4-bit model {big_bytes / 1e6:.0f} MB, budget {BUDGET / 1e6:.0f} MB, runtime {runtime / 1e6:.0f} MB, "
          f"peak {peak / 1e6:.0f} MB, over runtime {(peak - runtime) / 1e6:.1f} MB")
    assert peak <= runtime + BUDGET
    reader = gguf.GGUFReader(str(tmp_path / "out" / "q4-Q8_0.gguf"))
    assert len(reader.tensors) == 3 + 6 * 9 and not [t for t in reader.tensors if "absmax" in t.name]


def test_low_disk_inputs_release_every_4bit_shard_after_its_last_read(bnb_case, tmp_path):
    """The GGUF executor with InputFiles (what a Hub base's Prefetcher is) on a sharded 4-bit base:
    the reader acquires each shard before reading and releases it after the last read of its
    weights *and* statistics (read with the first chunk), so a released shard is never read again
    (here it is hidden on release) and every shard is released before the end; same bytes."""
    import os
    import threading

    from streammerge.run.gguf_merge import plan_gguf
    from streammerge.run.execute import run_plan
    from streammerge.options import MergeOptions

    case, plain = bnb_case("llama", "nf4")
    base = save_quantized(plain.base, "nf4", tmp_path / "llama-nf4", max_shard_size="12KB")
    shards = sorted(str(p) for p in base.glob("model-*.safetensors"))
    assert len(shards) >= 3

    class HidingInputs:
        def __init__(self):
            self.held: set[str] = set()
            self.most = 0
            self.released: list[str] = []
            self.lock = threading.Lock()

        def begin(self, files):
            assert set(files) == set(shards)

        def acquire(self, path, cancelled):
            assert os.path.exists(path), f"{path} acquired after its release"
            with self.lock:
                self.held.add(path)
                self.most = max(self.most, len(self.held))

        def release(self, path):
            with self.lock:
                self.held.discard(path)
                self.released.append(path)
            os.rename(path, path + ".gone")  # as --low-disk deletes it: any later read fails

        def end(self):
            for p in self.released:
                os.rename(p + ".gone", p)

    opts = MergeOptions.create(method="gguf", gguf_type="q8_0", device="cpu", max_chunk_rows=3)
    gplan = plan_gguf(str(base), [str(case.adapter)], opts)[3]
    inputs = HidingInputs()
    (tmp_path / "out").mkdir()
    results, _ = run_plan(gplan, tmp_path / "out", device=torch.device("cpu"), inputs=inputs)
    assert sorted(inputs.released) == shards and inputs.most <= 2
    want = gguf_merge(Case("llama", base, case.adapter, {}, {}, {}, base, None), tmp_path / "ref", "q8_0")[0]
    assert (tmp_path / "out" / results[0].filename).read_bytes() == want.read_bytes()
