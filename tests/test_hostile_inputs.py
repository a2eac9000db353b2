"""Hostile and broken inputs, through the real command line: one `error:` line naming the file or
tensor and the fix, a non-zero exit, no traceback, and nothing in OUT that looks finished.

Every broken input is built here, at test time, from a tiny real checkpoint + PEFT adapter
(tests/models.py). Each listed case runs `python -m streammerge` in a subprocess. Base-file cases
fail before torch or peft is imported, so they cost little; a run that gets as far as the adapter
pays ~5 s of imports, so further variants of a case already proven in a subprocess call the CLI's
`main()` in this process instead (`run_main`): same code, same one-line contract.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.adapters.legacy import read_legacy_bin
from streammerge.errors import AdapterError, ExecutionError, InputError, PlanError
from streammerge.formats.checkpoint import INDEX_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
FINISHED = {"model.safetensors", INDEX_FILE, "streammerge.json"}
Q_PROJ = "model.layers.0.self_attn.q_proj"
LORA_A = f"base_model.model.{Q_PROJ}.lora_A.weight"
LORA_B = f"base_model.model.{Q_PROJ}.lora_B.weight"


# ------------------------------------------------------------------------------------ helpers


def cli(*args, env: dict | None = None, prefix: tuple = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m streammerge ARGS` with this checkout first on the path (optionally wrapped by `prefix`)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [*prefix, sys.executable, "-m", "streammerge", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(REPO_ROOT),
    )


def assert_nothing_finished(out: Path) -> None:
    """No index, no record, no shard that is not `.partial`: nothing a loader would take for a model."""
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    assert not names & FINISHED, names
    assert not [n for n in names if n.endswith(".safetensors")], names


def assert_refused(res: subprocess.CompletedProcess, *needles, out: Path | None = None) -> str:
    assert res.returncode != 0, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    if out is not None:
        assert_nothing_finished(out)
    return lines[0]


def merge(base: Path, lora: Path, out: Path, *extra, **kw) -> subprocess.CompletedProcess:
    return cli("merge", base, lora, "--out", out, "--quiet", *extra, **kw)


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI's `main()` in this process (torch and peft already loaded); an escaping exception fails the test."""
    from streammerge.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def read_st(path: Path) -> tuple[dict, bytes, bytes]:
    """(header dict, raw header bytes, data) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8:8 + n], raw[8 + n:]


def write_st(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def edit_tensors(path: Path, edit) -> None:
    """Rewrite a small safetensors file after `edit(tensors)` changed its tensors in place."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def case(make_base, make_adapter):
    """A tiny float32 llama (single file) and a PEFT adapter on every linear layer."""
    return make_adapter(make_base("llama"))


@pytest.fixture(scope="module")
def sharded(make_base):
    base = make_base("llama", max_shard_size="40KB")
    assert (base / INDEX_FILE).exists() and len(json.loads((base / INDEX_FILE).read_text())["weight_map"]) > 3
    return base


@pytest.fixture
def base(case, tmp_path) -> Path:
    return Path(shutil.copytree(case.base_path, tmp_path / "base"))


@pytest.fixture
def lora(case, tmp_path) -> Path:
    return Path(shutil.copytree(case.adapter_path, tmp_path / "lora"))


# ---------------------------------------------------------------------- safetensors headers


def _length_over_100mb(path):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 200_000_000) + raw[8:])
    return ["exceeds 100 MB", "re-download"]


def _length_past_end(path):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return ["runs past the end", "truncated", "re-download"]


def _invalid_json(path):
    _, text, data = read_st(path)
    write_st(path, b'{"lm_head.weight": nope'.ljust(len(text)), data)
    return ["header JSON is invalid", "re-download"]


def _invalid_utf8(path):
    _, text, data = read_st(path)
    write_st(path, text.replace(b'"lm_head.weight"', b'"\xffm_head.weight"'), data)
    return ["not UTF-8"]


def _duplicate_name(path):
    header, text, data = read_st(path)
    first = by_offset(header)[0]
    dup = json.dumps({first: header[first]}).encode()[1:-1] + b","
    write_st(path, b"{" + dup + text[1:], data)
    return ["duplicate key", first]


def _unknown_dtype(path):
    header, _, data = read_st(path)
    name = by_offset(header)[2]
    header[name]["dtype"] = "F99"
    write_st(path, header, data)
    return [name, "unsupported dtype 'F99'"]


def _shape_vs_span(path):
    header, _, data = read_st(path)
    name = by_offset(header)[3]
    header[name]["shape"][0] += 1
    write_st(path, header, data)
    return [name, "but its span is"]


def _overlap(path):
    header, _, data = read_st(path)
    name = by_offset(header)[1]
    header[name]["data_offsets"] = [o - 4 for o in header[name]["data_offsets"]]
    write_st(path, header, data)
    return [name, "overlaps the previous one"]


def _gap(path):
    header, _, data = read_st(path)
    names = by_offset(header)
    del header[names[3]]
    write_st(path, header, data)
    return [names[4], "leaves a gap before it"]


def _out_of_order(path):
    header, _, data = read_st(path)
    name = by_offset(header)[2]
    header[name]["data_offsets"].reverse()
    write_st(path, header, data)
    return [name, "out of order"]


def _past_end(path):
    header, _, data = read_st(path)
    name = by_offset(header)[-1]
    header[name]["data_offsets"] = [o + 64 for o in header[name]["data_offsets"]]
    write_st(path, header, data)
    return [name, "past the end of the data"]


def _negative_dim(path):
    header, _, data = read_st(path)
    name = by_offset(header)[0]
    header[name]["shape"][0] = -header[name]["shape"][0]
    write_st(path, header, data)
    return [name, "bad dimension -160"]


def _overflowing_dims(path):
    header, _, data = read_st(path)
    names = by_offset(header)
    header[names[0]]["shape"] = [2**40, 2**40, 0]  # zero bytes, yet 2^80-element rows: no reader can index it
    write_st(path, header, data)
    return [names[0], "overflows 64 bits"]


def _dims_beyond_file(path):
    header, _, data = read_st(path)
    name = by_offset(header)[0]
    header[name]["shape"] = [10**6, 10**6]
    write_st(path, header, data)
    return [name, "more than the whole"]


def _metadata_not_str(path):
    header, _, data = read_st(path)
    header["__metadata__"] = {"format": 1}
    write_st(path, header, data)
    return ["__metadata__ must map strings to strings"]


def _truncated_data(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    header, _, _ = read_st(path)
    return [by_offset(header)[-1], "the file is truncated"]


def _truncated_to_nothing(path):
    path.write_bytes(path.read_bytes()[:5])
    return ["only 5 bytes", "re-download"]


HEADER_CASES = {f.__name__.lstrip("_"): f for f in (
    _length_over_100mb, _length_past_end, _invalid_json, _invalid_utf8, _duplicate_name, _unknown_dtype,
    _shape_vs_span, _overlap, _gap, _out_of_order, _past_end, _negative_dim, _overflowing_dims,
    _dims_beyond_file, _metadata_not_str, _truncated_data, _truncated_to_nothing,
)}


@pytest.mark.parametrize("breakage", sorted(HEADER_CASES))
def test_broken_base_header(base, lora, tmp_path, breakage):
    path = base / "model.safetensors"
    needles = HEADER_CASES[breakage](path)
    out = tmp_path / "out"
    assert_refused(merge(base, lora, out), path, *needles, out=out)
    assert not out.exists()  # refused before OUT was touched


def test_broken_header_in_one_shard_names_that_shard(sharded, case, tmp_path):
    base = Path(shutil.copytree(sharded, tmp_path / "base"))
    shard = sorted(base.glob("model-*.safetensors"))[1]
    needles = _unknown_dtype(shard)
    assert_refused(cli("plan", base, case.adapter_path), shard, *needles)


def test_broken_adapter_header_names_the_adapter_file(base, lora, tmp_path):
    path = lora / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    out = tmp_path / "out"
    assert_refused(merge(base, lora, out), path, "truncated", out=out)


def test_truncated_after_planning_is_caught_where_data_is_read(base, case, tmp_path, monkeypatch):
    """A file that shrinks between planning and reading: an InputError from pread, no finished shard."""
    import streammerge.api as api

    original = api.check_output_path

    def truncate_then_prepare(out, **kw):
        shard = base / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-4096])
        return original(out, **kw)

    monkeypatch.setattr(api, "check_output_path", truncate_then_prepare)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="unexpected end of file.*truncated"):
        streammerge.merge(base, case.adapter_path, out, device="cpu")
    assert_nothing_finished(out)


# -------------------------------------------------------------------------------- index files


def _shards(base: Path) -> list[Path]:
    return sorted(base.glob("model-*.safetensors"))


def _index(base: Path) -> dict:
    return json.loads((base / INDEX_FILE).read_text())


def _save_index(base: Path, index: dict) -> None:
    (base / INDEX_FILE).write_text(json.dumps(index))


def _first_tensor_of(shard: Path) -> str:
    return by_offset(read_st(shard)[0])[0]


def _idx_dotdot(base, outside):
    shard = _shards(base)[1]
    shutil.copy(shard, outside / shard.name)
    index = _index(base)
    for name, f in index["weight_map"].items():
        if f == shard.name:
            index["weight_map"][name] = f"../{outside.name}/{shard.name}"
    _save_index(base, index)
    return ["points outside", "refusing"]


def _idx_absolute(base, outside):
    shard = _shards(base)[1]
    shutil.copy(shard, outside / shard.name)
    index = _index(base)
    for name, f in index["weight_map"].items():
        if f == shard.name:
            index["weight_map"][name] = str(outside / shard.name)
    _save_index(base, index)
    return ["points outside", "refusing"]


def _idx_symlink_outside(base, outside):
    shard = _shards(base)[1]
    shutil.move(shard, outside / shard.name)
    os.symlink(outside / shard.name, shard)
    return [shard.name, "is a link to", "outside", "refusing"]


def _idx_relative_symlink_outside(base, outside):
    shard = _shards(base)[0]
    shutil.move(shard, outside / shard.name)
    os.symlink(f"../{outside.name}/{shard.name}", shard)
    return [shard.name, "is a link to", "outside"]


def _idx_missing_shard(base, outside):
    shard = _shards(base)[-1]
    shard.unlink()
    return [f"lists {shard.name} but it is missing", "download the complete checkpoint"]


def _idx_tensor_in_two_shards(base, outside):
    first, second = _shards(base)[:2]
    name = _first_tensor_of(first)
    edit_tensors(second, lambda t: t.update({name: load_file(str(first))[name]}))
    return [name, "stored in both", first.name, second.name]


def _idx_tensor_not_in_map(base, outside):
    shard = _shards(base)[1]
    name = _first_tensor_of(shard)
    index = _index(base)
    del index["weight_map"][name]
    _save_index(base, index)
    return [shard.name, name, "does not list", "re-download"]


def _idx_listed_but_absent(base, outside):
    index = _index(base)
    index["weight_map"]["model.ghost.weight"] = _shards(base)[0].name
    _save_index(base, index)
    return ["not found in their shards", "model.ghost.weight"]


def _idx_invalid_json(base, outside):
    (base / INDEX_FILE).write_text('{"weight_map": {"a": "b",}}')
    return [INDEX_FILE, "invalid index file"]


def _idx_duplicate_entry(base, outside):
    text = (base / INDEX_FILE).read_text()
    name = next(iter(_index(base)["weight_map"]))
    (base / INDEX_FILE).write_text(text.replace('"weight_map": {', f'"weight_map": {{"{name}": "x.safetensors", ', 1))
    return [INDEX_FILE, "duplicate key", name]


def _idx_config_links_outside(base, outside):
    (outside / "secret.json").write_text('{"token": "hunter2"}')
    (base / "config.json").unlink()
    os.symlink(outside / "secret.json", base / "config.json")
    return ["config.json", "is a link to", "outside"]


def _idx_tokenizer_links_outside(base, outside):
    """A non-weight file that would be copied to OUT: a link to outside would exfiltrate it."""
    (outside / "id_rsa").write_text("PRIVATE KEY")
    os.symlink(outside / "id_rsa", base / "tokenizer.model")
    return ["tokenizer.model", "is a link to", "outside"]


INDEX_CASES = {f.__name__.removeprefix("_idx_"): f for f in (
    _idx_dotdot, _idx_absolute, _idx_symlink_outside, _idx_relative_symlink_outside, _idx_missing_shard,
    _idx_tensor_in_two_shards, _idx_tensor_not_in_map, _idx_listed_but_absent, _idx_invalid_json,
    _idx_duplicate_entry, _idx_config_links_outside, _idx_tokenizer_links_outside,
)}


@pytest.mark.parametrize("breakage", sorted(INDEX_CASES))
def test_broken_index(sharded, case, tmp_path, breakage):
    base = Path(shutil.copytree(sharded, tmp_path / "base"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    needles = INDEX_CASES[breakage](base, outside)
    out = tmp_path / "out"
    assert_refused(merge(base, case.adapter_path, out), *needles, out=out)
    assert not out.exists()


def _hf_cache(src: Path, cache: Path, repo: str, rev: str = "0123456789abcdef") -> Path:
    """`src` laid out as huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    import hashlib

    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / rev
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo_dir / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snap / f.name)
    return snap


def test_hugging_face_cache_layout_keeps_working(sharded, case, tmp_path):
    """Snapshot files are links into the repo's blob store: allowed, and the result is the same."""
    cache = tmp_path / "hub"
    base_snap = _hf_cache(sharded, cache, "org/base")
    lora_snap = _hf_cache(case.adapter_path, cache, "org/lora")
    assert all(p.is_symlink() for p in base_snap.iterdir())
    out = tmp_path / "out"
    res = merge(base_snap, lora_snap, out)
    assert res.returncode == 0, res.stderr
    streammerge.merge(sharded, case.adapter_path, tmp_path / "ref", device="cpu")
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (sharded / "tokenizer.json").read_bytes()


def test_hugging_face_cache_link_out_of_the_repo_is_refused(sharded, case, tmp_path):
    cache = tmp_path / "hub"
    snap = _hf_cache(sharded, cache, "org/base")
    victim = _shards(snap)[0]
    (tmp_path / "secret.safetensors").write_bytes(Path(os.path.realpath(victim)).read_bytes())
    victim.unlink()
    os.symlink("../../blobs/../../../secret.safetensors", victim)
    out = tmp_path / "out"
    assert_refused(merge(snap, case.adapter_path, out), victim.name, "is a link to", "outside", out=out)


# -------------------------------------------------------------------------------------- adapters


def _ad_config_missing(lora):
    (lora / "adapter_config.json").unlink()
    return ["adapter_config.json not found", lora]


def _ad_config_invalid(lora):
    (lora / "adapter_config.json").write_text('{"r": 4,,}')
    return [lora / "adapter_config.json", "invalid adapter_config.json"]


def _ad_config_not_object(lora):
    (lora / "adapter_config.json").write_text("[4]")
    return [lora / "adapter_config.json", "must be a JSON object"]


def _ad_peft_type(lora):
    edit_json(lora / "adapter_config.json", peft_type="PREFIX_TUNING")
    return [lora, "peft_type PREFIX_TUNING is not supported", "only LORA"]


def _ad_unsupported_option(lora):
    edit_json(lora / "adapter_config.json", layer_replication=[[0, 1], [0, 1]])
    return [lora, "layer_replication", "not supported"]


def _ad_option_peft_rejects(lora):
    edit_json(lora / "adapter_config.json", layers_pattern="layers")
    return [lora / "adapter_config.json", "PEFT cannot read this LoRA config", "layers_to_transform"]


def _ad_rank_not_positive(lora):
    edit_json(lora / "adapter_config.json", r=0)
    return [lora / "adapter_config.json", "r=0 must be a positive integer"]


def _ad_alpha_not_a_number(lora):
    edit_json(lora / "adapter_config.json", lora_alpha="eight")
    return [lora / "adapter_config.json", "lora_alpha='eight' must be a finite number"]


def _ad_no_targets(lora):
    edit_json(lora / "adapter_config.json", target_modules=[])
    return [lora / "adapter_config.json", "targets nothing"]


def _ad_shape_mismatch(lora):
    edit_tensors(lora / "adapter_model.safetensors", lambda t: t.update({LORA_A: t[LORA_A][:, :31].contiguous()}))
    return [Q_PROJ, "31", "is this adapter for another model"]


def _ad_target_matches_nothing(lora):
    edit_json(lora / "adapter_config.json", target_modules=["no_such_module"])
    return [lora, "does not target", "fix target_modules"]


def _ad_module_not_in_base(lora):
    def rename(t):
        for key in [k for k in t if Q_PROJ in k]:
            t[key.replace("layers.0.", "layers.7.")] = t.pop(key)
    edit_tensors(lora / "adapter_model.safetensors", rename)
    return ["model.layers.7.self_attn.q_proj", "has no weight in the base checkpoint", "another model"]


def _ad_rank_a_vs_b(lora):
    edit_tensors(lora / "adapter_model.safetensors", lambda t: t.update({LORA_B: t[LORA_B][:, :3].contiguous()}))
    return [Q_PROJ, "lora_A has rank 4 but lora_B has rank 3"]


def _ad_rank_vs_config(lora):
    edit_json(lora / "adapter_config.json", r=8)
    return ["model.layers.0.mlp.down_proj", "rank 4", "says r=8"]


def _ad_nan(lora):
    def poison(t):
        t[LORA_B][5, 1] = float("nan")
    edit_tensors(lora / "adapter_model.safetensors", poison)
    return [lora / "adapter_model.safetensors", LORA_B, "NaN/Inf", "--allow-nonfinite"]


def _ad_inf(lora):
    def poison(t):
        t[LORA_A][0, 0] = float("-inf")
    edit_tensors(lora / "adapter_model.safetensors", poison)
    return [LORA_A, "1 NaN/Inf", "--allow-nonfinite"]


def _ad_weights_missing(lora):
    (lora / "adapter_model.safetensors").unlink()
    return [lora, "adapter_model.safetensors not found"]


def _ad_weights_link_outside(lora):
    target = lora.parent / "stolen.safetensors"
    shutil.move(lora / "adapter_model.safetensors", target)
    os.symlink(target, lora / "adapter_model.safetensors")
    return ["adapter_model.safetensors", "is a link to", "outside"]


ADAPTER_CASES = {f.__name__.removeprefix("_ad_"): f for f in (
    _ad_config_missing, _ad_config_invalid, _ad_config_not_object, _ad_peft_type, _ad_unsupported_option,
    _ad_option_peft_rejects, _ad_rank_not_positive, _ad_alpha_not_a_number, _ad_no_targets, _ad_shape_mismatch, _ad_target_matches_nothing, _ad_module_not_in_base,
    _ad_rank_a_vs_b, _ad_rank_vs_config, _ad_nan, _ad_inf, _ad_weights_missing, _ad_weights_link_outside,
)}


# one subprocess run per case the issue lists; the other variants go through main() in-process
IN_PROCESS = {"config_not_object", "rank_not_positive", "alpha_not_a_number", "no_targets", "module_not_in_base",
              "inf", "weights_missing"}


@pytest.mark.parametrize("breakage", sorted(ADAPTER_CASES))
def test_broken_adapter(case, lora, tmp_path, capsys, breakage):
    needles = ADAPTER_CASES[breakage](lora)
    out = tmp_path / "out"
    args = ("merge", case.base_path, lora, "--out", out, "--quiet")
    res = run_main(capsys, *args) if breakage in IN_PROCESS else cli(*args)
    assert_refused(res, *needles, out=out)
    assert not out.exists()


def test_nonfinite_adapter_is_merged_when_allowed(case, lora, tmp_path, capsys):
    _ad_nan(lora)
    out = tmp_path / "out"
    res = run_main(capsys, "merge", case.base_path, lora, "--out", out, "--quiet", "--allow-nonfinite")
    assert res.returncode == 0, res.stderr
    merged = load_file(str(out / "model.safetensors"))[f"{Q_PROJ}.weight"]
    assert torch.isnan(merged[5]).all() and torch.isfinite(merged[:5]).all()  # B row 5 poisons output row 5


def test_adapter_values_are_checked_in_bounded_blocks(lora):
    from streammerge.adapters.load import check_finite, load_adapter

    def poison_last(t):
        t[LORA_B][-1, -1] = float("nan")
    edit_tensors(lora / "adapter_model.safetensors", poison_last)
    adapter = load_adapter(lora)
    for block_bytes in (1, 4, 100, 1 << 20):  # the NaN sits in the last block, whatever the block size
        with pytest.raises(AdapterError, match=re.escape(f"{LORA_B}' holds 1 NaN/Inf")):
            check_finite(adapter, block_bytes=block_bytes)


# ----------------------------------------------------------------------- adapter_model.bin pickles


class _Payload:
    """Unpickling this calls os.mkdir(marker): the stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_payload(path: Path, marker: Path, *, legacy_format: bool) -> None:
    state = {LORA_A: torch.zeros(4, 32), "evil": _Payload(marker)}
    if legacy_format:
        import pickle

        with open(path, "wb") as fh:
            pickle.dump(state, fh)
    else:
        torch.save(state, path)


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "raw-pickle"])
def test_pickle_payload_is_never_executed(case, tmp_path, capsys, legacy_format):
    marker = tmp_path / "pwned"
    payload = tmp_path / "control.bin"
    _write_payload(payload, marker, legacy_format=legacy_format)
    try:  # control: an unrestricted load does run the payload
        torch.load(payload, weights_only=False)
    except RuntimeError:  # a raw pickle is "Invalid magic number" for torch -- after it was unpickled
        pass
    assert marker.exists()
    marker.rmdir()

    lora = Path(shutil.copytree(case.adapter_path, tmp_path / "lora"))
    (lora / "adapter_model.safetensors").unlink()
    shutil.copy(payload, lora / "adapter_model.bin")
    out = tmp_path / "out"
    if legacy_format:
        res = run_main(capsys, "merge", case.base_path, lora, "--out", out, "--quiet")
    else:  # even with torch's opt-out switch set: an explicit weights_only=True cannot be overridden
        res = merge(case.base_path, lora, out, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert_refused(res, lora / "adapter_model.bin", "refused by torch.load(weights_only=True)", out=out)
    assert not marker.exists()
    with pytest.raises(AdapterError, match="weights_only=True"):
        read_legacy_bin(lora / "adapter_model.bin")
    assert not marker.exists()


def test_read_legacy_bin_accepts_tensors_and_refuses_everything_else(tmp_path):
    good = {LORA_A: torch.randn(4, 32), LORA_B: torch.randn(32, 4).to(torch.bfloat16)}
    torch.save(good, tmp_path / "good.bin")
    got = read_legacy_bin(tmp_path / "good.bin")
    assert got.keys() == good.keys() and all(torch.equal(got[k], good[k]) for k in good)

    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    torch.save({"a": torch.zeros(2), "b": {"nested": torch.zeros(1)}}, tmp_path / "nested.bin")
    (tmp_path / "garbage.bin").write_bytes(b"\x80\x04not a pickle at all")
    (tmp_path / "empty.bin").write_bytes(b"")
    for name, match in [("list", "found list"), ("nested", "found dict"), ("garbage", "weights_only=True"),
                        ("empty", "weights_only=True"), ("missing", "weights_only=True")]:
        with pytest.raises(AdapterError, match=match) as info:
            read_legacy_bin(tmp_path / f"{name}.bin")
        assert f"{name}.bin" in str(info.value)


def test_benign_bin_only_adapter_merges_like_its_safetensors(case, tmp_path, capsys):
    lora = Path(shutil.copytree(case.adapter_path, tmp_path / "lora"))
    torch.save(load_file(str(lora / "adapter_model.safetensors")), lora / "adapter_model.bin")
    (lora / "adapter_model.safetensors").unlink()
    res = run_main(capsys, "merge", case.base_path, lora, "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 0, res.stderr
    ref = run_main(capsys, "merge", case.base_path, case.adapter_path, "--out", tmp_path / "ref", "--quiet")
    assert ref.returncode == 0, ref.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------ merged result


def _poison_base(base: Path, name: str, index: tuple[int, ...], value: float) -> None:
    def poison(t):
        t[name][index] = value
    edit_tensors(base / "model.safetensors", poison)


def test_nonfinite_merge_result_is_refused_unless_allowed(case, base, tmp_path):
    weight = f"{Q_PROJ}.weight"
    _poison_base(base, weight, (3, 5), float("inf"))
    out = tmp_path / "out"
    assert_refused(merge(base, case.adapter_path, out), weight, "NaN/Inf at row 3, column 5",
                   "base weight itself holds inf", "--allow-nonfinite", out=out)

    res = merge(base, case.adapter_path, out, "--allow-nonfinite", "--overwrite")
    assert res.returncode == 0, res.stderr
    merged = load_file(str(out / "model.safetensors"))[weight]
    assert merged[3, 5] == float("inf")
    ref = case.merged_state_dict[weight].clone()  # PEFT's merge of the unpoisoned base
    mask = torch.ones_like(ref, dtype=torch.bool)
    mask[3, 5] = False
    assert torch.equal(merged[mask], ref[mask])


def test_cast_overflow_is_refused_mid_run_leaving_only_partial(case, base, tmp_path):
    """--dtype float16 turns 1e6 into inf: refused naming the tensor, after earlier tensors were written."""
    _poison_base(base, "model.layers.0.input_layernorm.weight", (7,), 1e6)
    out = tmp_path / "out"
    line = assert_refused(merge(base, case.adapter_path, out, "--dtype", "float16"),
                          "model.layers.0.input_layernorm.weight", "casting 1e+06 to F16 overflows", out=out)
    assert "row 7" in line
    assert (out / "model.safetensors.partial").exists()  # failed mid-run: the shard was never renamed


def test_merge_overflowing_a_narrow_dtype_is_refused(case, base, tmp_path):
    _poison_base(base, f"{Q_PROJ}.weight", (1, 2), 70000.0)  # finite in float32, beyond float16's 65504
    with pytest.raises(ExecutionError, match=rf"{Q_PROJ}.weight.*row 1, column 2.*base \+ delta is inf in F16"):
        streammerge.merge(base, case.adapter_path, tmp_path / "out", dtype="float16", device="cpu")
    assert_nothing_finished(tmp_path / "out")


def test_first_nonfinite_scans_in_blocks_and_respects_the_mask():
    from streammerge.ops import first_nonfinite

    t = torch.zeros(1000, 7)
    assert first_nonfinite(t, block=64) is None
    t[900, 3] = float("nan")
    t[950, 0] = float("inf")
    assert first_nonfinite(t, block=64) == 900 * 7 + 3
    base = torch.zeros(1000, 7)
    base[900, 3] = float("nan")  # already non-finite in the input: not "produced"
    assert first_nonfinite(t, where_finite=base, block=64) == 950 * 7
    assert first_nonfinite(torch.zeros(3, dtype=torch.int32)) is None


# --------------------------------------------------------------------------------------- output


def test_out_is_a_file(case, tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("my notes")
    assert_refused(merge(case.base_path, case.adapter_path, out), out, "is a file", "give a folder path")
    assert out.read_text() == "my notes"


def _read_only_bind(folder: Path) -> tuple:
    """A command prefix running the CLI where `folder` is a read-only bind mount (root ignores modes)."""
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
    return ("unshare", "-rm", "sh", "-c", script, "sh", str(folder))


def _can_read_only_bind(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None:
        return False
    res = subprocess.run([*_read_only_bind(probe), "sh", "-c", "! touch \"$0/x\" 2>/dev/null", str(probe)],
                         capture_output=True)
    return res.returncode == 0


@pytest.mark.parametrize("how", ["read-only-folder", "parent-is-a-file", "sysfs"])
def test_out_not_writable(case, tmp_path, capsys, how):
    """As root, permission bits do not stop writes. Unwritable places that hold for root too: a
    read-only bind mount (private mount namespace via unshare; chmod when not root), a path whose
    parent is a file, and a folder under /sys (EPERM)."""
    prefix: tuple = ()
    if how == "read-only-folder":
        out = tmp_path / "ro"
        out.mkdir()
        if os.geteuid() != 0:
            out.chmod(0o555)
        elif _can_read_only_bind(tmp_path):
            prefix = _read_only_bind(out)
        else:
            pytest.skip("running as root without mount namespaces: no way to make a folder read-only")
        needles = [out, "not writable"]
    elif how == "parent-is-a-file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"
        needles = [out, "cannot create --out", "Not a directory"]
    else:
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no sysfs here")
        out = Path("/sys/streammerge-out")
        needles = [out, "cannot create --out"]
    if how == "sysfs":
        res = run_main(capsys, "merge", case.base_path, case.adapter_path, "--out", out, "--quiet")
    else:
        res = merge(case.base_path, case.adapter_path, out, prefix=prefix)
    assert_refused(res, *needles)
    if how == "read-only-folder":
        assert list(out.iterdir()) == []


def test_out_holding_another_model_needs_overwrite(case, sharded, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(sharded, out)  # a different model already lives here
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_refused(merge(case.base_path, case.adapter_path, out), out, "already holds files", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("years of work")
    res = run_main(capsys, "merge", case.base_path, case.adapter_path, "--out", stranger, "--quiet", "--overwrite")
    assert_refused(res, "not a model", "refusing")
    assert (stranger / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--method", "bogus"], ["invalid choice: 'bogus'", "merged_16bit"]),
        (["--max-shard-size", "5XB"], ["--max-shard-size", "'5XB'", "e.g. 5GB"]),
        (["--max-memory", "lots"], ["--max-memory", "'lots'", "e.g. 5GB"]),
        (["--max-memory=-1GB"], ["--max-memory", "'-1GB'"]),
        (["--max-shard-size", "0MB"], ["--max-shard-size must be positive"]),
        (["--dtype", "int4"], ["--dtype 'int4' is not supported", "bfloat16"]),
        (["--device", "tpu"], ["--device 'tpu' is not valid", "cpu"]),
    ],
)
def test_bad_options(case, tmp_path, args, needles):
    out = tmp_path / "out"
    assert_refused(merge(case.base_path, case.adapter_path, out, *args), *needles)
    assert not out.exists()


def test_budget_too_small_names_a_minimum_that_works(case, tmp_path):
    out = tmp_path / "out"
    line = assert_refused(merge(case.base_path, case.adapter_path, out, "--max-memory", "1KB"),
                          "--max-memory 1.00 KB is too small", "use at least --max-memory")
    assert not out.exists()
    minimum = int(re.search(r"use at least --max-memory (\d+)MB", line).group(1))
    widest = re.search(r"widest tensor \((\S+)\)", line).group(1)
    assert widest in case.base_state_dict
    res = merge(case.base_path, case.adapter_path, out, "--max-memory", f"{minimum}MB")
    assert res.returncode == 0, res.stderr
    merged = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(merged[k], v) for k, v in case.merged_state_dict.items())
    with pytest.raises(PlanError, match="too small"):  # and it is the minimum, to the MB
        streammerge.plan(case.base_path, case.adapter_path, max_memory=f"{minimum - 1}MB")


def test_unexpected_library_error_is_one_line_and_debug_shows_it(case, tmp_path):
    """An OSError nobody anticipated (a name too long for the file system) stays one line."""
    out = tmp_path / ("x" * 300)
    line = assert_refused(merge(case.base_path, case.adapter_path, out), "unexpected OSError", "File name too long",
                          "re-run with --debug")
    assert len(line) < 500


@pytest.mark.parametrize("exc,needles,code", [
    ("ValueError('bad value\\nfrom deep inside')", ["unexpected ValueError: bad value from deep inside", "--debug"], 1),
    ("json.JSONDecodeError('Expecting value', 'x', 0)", ["unexpected JSONDecodeError", "--debug"], 1),
    ("KeyboardInterrupt()", ["interrupted"], 130),
    ("streammerge.errors.OutputError('disk on fire; use another disk')", ["disk on fire; use another disk"], 2),
])
def test_cli_boundary_wraps_every_exception(case, exc, needles, code):
    """Whatever escapes the pipeline becomes one line; --debug re-raises it with its traceback."""
    script = (
        "import json, sys, streammerge.api, streammerge.errors\n"
        f"def boom(*a, **k): raise {exc}\n"
        "streammerge.api._prepare = boom\n"
        "from streammerge.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    args = ["plan", str(case.base_path), str(case.adapter_path)]
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == code
    assert_refused(res, *needles)
    res = subprocess.run([sys.executable, "-c", script, *args, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.mark.parametrize("command", ["plan", "merge", "demo"])
def test_every_subcommand_has_debug(command):
    res = cli(command, "--help")
    assert res.returncode == 0 and "--debug" in res.stdout
