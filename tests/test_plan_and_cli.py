"""Planning rules (sharding, JSON round trip, budget) and the command line's contract."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import streammerge
from streammerge.errors import OptionError
from streammerge.formats.safetensors import TensorSpec
from streammerge.options import AdapterSpec, parse_size
from streammerge.planning.types import MergePlan
from streammerge.planning.build import split_into_shards


@pytest.fixture(scope="module")
def small_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("plancase")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    peft_model.save_pretrained(root / "lora")
    return root


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "streammerge", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("limit", [1, 100, 1000, 5000, 10**9])
def test_split_rule_matches_huggingface_hub(limit):
    sizes = [300, 4000, 20, 20, 999, 1, 6000, 50, 50, 50]
    specs = [TensorSpec(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]
    ours = [[s.name for s in shard] for shard in split_into_shards(specs, limit)]
    state = {s.name: torch.zeros(s.shape, dtype=torch.uint8) for s in specs}
    split = split_torch_state_dict_into_shards(state, max_shard_size=limit)
    theirs = [sorted(names) for names in split.filename_to_tensors.values()]
    assert sorted(map(sorted, ours)) == sorted(theirs)


def test_parse_size():
    assert parse_size("5GB", "x") == 5 * 10**9
    assert parse_size("2GiB", "x") == 2 * 2**30
    assert parse_size("1.5MB", "x") == 1_500_000
    assert parse_size(1234, "x") == 1234
    for bad in ("5XB", "GB", "-1GB", "0MB", ""):
        with pytest.raises(OptionError):
            parse_size(bad, "--max-shard-size")


def test_adapter_weight_syntax():
    assert AdapterSpec.parse("a/b@0.5") == AdapterSpec("a/b", 0.5)
    assert AdapterSpec.parse("org/name@main") == AdapterSpec("org/name@main", 1.0)
    assert AdapterSpec.parse("./x") == AdapterSpec("./x", 1.0)


def test_plan_json_round_trip_and_coverage(small_case):
    plan = streammerge.plan(small_case / "base", [small_case / "lora"], max_shard_size="200KB")
    again = MergePlan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    counts = plan.counts()
    assert counts["merge"] == 4 and counts["merge"] + counts["copy"] == len(plan.tensors)
    assert len(plan.shards) > 1
    for shard in plan.shards:
        offsets = [(t.start, t.end) for t in shard.tensors]
        assert offsets[0][0] == shard.header_size
        assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
        assert offsets[-1][1] == shard.size


def test_cli_plan_prints_summary_and_json(small_case):
    res = run("plan", small_case / "base", small_case / "lora")
    assert res.returncode == 0, res.stderr
    assert "4 merged" in res.stdout and "shard" in res.stdout and "disk:" in res.stdout
    res = run("plan", small_case / "base", small_case / "lora", "--json")
    data = json.loads(res.stdout)
    assert data["total_size"] > 0 and data["shards"][0]["filename"] == "model.safetensors"


def test_help_is_instant_and_does_not_import_torch():
    code = "import sys; from streammerge.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'peft' in sys.modules)"
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip().endswith("False False")
    assert time.perf_counter() - start < 5
    assert "merge" in res.stdout and "plan" in res.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["merge", "{base}", "{lora}", "--out", "{out}", "--max-shard-size", "5XB"], "cannot read size"),
        (["merge", "{base}", "{lora}", "--out", "{out}", "--method", "bogus"], "invalid choice"),
        (["merge", "{base}", "{lora}", "--out", "{out}", "--dtype", "int4"], "--dtype"),
        (["merge", "{base}", "{tmp}/nope", "--out", "{out}"], "adapter not found"),
        (["merge", "{tmp}/nope", "{lora}", "--out", "{out}"], "base checkpoint not found"),
        (["merge", "{base}", "{lora}", "--out", "{out}", "--max-memory", "1KB"], "too small"),
        (["merge", "{base}", "{lora}", "--out", "{base}/config.json"], "is a file"),
        (["merge", "{base}", "{lora}"], "--out"),
    ],
)
def test_bad_input_is_one_error_line(small_case, tmp_path, args, message):
    fmt = {"base": small_case / "base", "lora": small_case / "lora", "out": tmp_path / "out", "tmp": tmp_path}
    res = run(*[a.format(**fmt) for a in args])
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert message in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_existing_output_needs_overwrite(small_case, tmp_path):
    out = tmp_path / "out"
    assert run("merge", small_case / "base", small_case / "lora", "--out", out, "--quiet").returncode == 0
    res = run("merge", small_case / "base", small_case / "lora", "--out", out)  # the same merge: nothing to do
    assert res.returncode == 0 and "already complete" in res.stdout, res.stderr
    res = run("merge", small_case / "base", small_case / "lora", "--out", out, "--quiet", "--dtype", "bfloat16")
    assert res.returncode != 0 and "--overwrite" in res.stderr and "--dtype" in res.stderr
    res = run("merge", small_case / "base", small_case / "lora", "--out", out, "--quiet", "--dtype", "bfloat16", "--overwrite")
    assert res.returncode == 0, res.stderr
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    res = run("merge", small_case / "base", small_case / "lora", "--out", stranger, "--overwrite")
    assert res.returncode != 0 and (stranger / "notes.txt").exists()
