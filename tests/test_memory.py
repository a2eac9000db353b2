"""Bounded memory: merging a model several times larger than --max-memory stays at runtime + budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

BUDGET = 24 * 10**6

_MEASURE = """
import json, resource, subprocess, sys
res = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": res.returncode, "stderr": res.stderr[-2000:],
                  "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def peak_rss_of(*args: str) -> int:
    """Peak RSS of one `python -m streammerge ...` child, measured by a fresh parent."""
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "streammerge", *args]
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert report["rc"] == 0, report["stderr"]
    return report["peak"]


def _make_case(root, hidden, intermediate, layers, vocab, shard):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(root / "base", max_shard_size=shard)
    lora = LoraConfig(r=16, lora_alpha=16, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, lora).save_pretrained(root / "lora")
    return root, sum(p.stat().st_size for p in (root / "base").glob("*.safetensors"))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    big = _make_case(tmp_path_factory.mktemp("big"), 512, 1536, 6, 16000, "60MB")
    # big enough that torch takes its parallel paths (a one-time cost of a few MB), far below the budget
    tiny = _make_case(tmp_path_factory.mktemp("tiny"), 128, 256, 1, 512, "5GB")
    return big, tiny


def _merge_peak(root, out) -> int:
    return peak_rss_of("merge", str(root / "base"), str(root / "lora"), "--out", str(out),
                       "--max-memory", str(BUDGET), "--device", "cpu", "--quiet")


def test_peak_rss_is_runtime_plus_budget(cases, tmp_path):
    """The runtime is what the same merge costs on a model of about 1 MB."""
    (big, big_bytes), (tiny, _) = cases
    assert big_bytes >= 4 * BUDGET
    runtime = _merge_peak(tiny, tmp_path / "tiny-out")
    merged = _merge_peak(big, tmp_path / "out")
    print(f"model {big_bytes / 1e6:.0f} MB, budget {BUDGET / 1e6:.0f} MB, runtime {runtime / 1e6:.0f} MB, "
          f"merge peak {merged / 1e6:.0f} MB, over runtime {(merged - runtime) / 1e6:.0f} MB")
    assert merged <= runtime + BUDGET, (merged - runtime) / 1e6
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "streammerge.json").exists()
