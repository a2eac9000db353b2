"""Runs Hub scenarios in a fresh process (huggingface_hub reads HF_ENDPOINT etc. at import time).

Started by tests/test_hub.py with HF_ENDPOINT pointing at its FakeHub on 127.0.0.1:
    python tests/hub_worker.py SCENARIO '{"json": "args"}'
and prints one JSON line of observations.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def _tree_bytes(root: Path) -> int:
    """Bytes under `root`; a file the download renames or the eviction deletes while we walk counts as gone."""
    total = 0
    for p in root.rglob("*") if root.exists() else ():
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def low_disk_executor(args: dict) -> dict:
    """Merge a Hub base through the executor with --low-disk, sampling the cache after every tensor."""
    from streammerge.adapters.load import load_adapter
    from streammerge.run.execute import Executor
    from streammerge.hub.run import disk_estimate, input_files
    from streammerge.hub.checkpoint import open_base
    from streammerge.hub.client import HubRef, adapter_folder, cache_dir, download, resolve
    from streammerge.options import MergeOptions
    from streammerge.planning.build import build_plan

    if args.get("chunk_size"):
        # huggingface_hub resumes a dropped download from the last whole chunk it wrote (10 MB); a
        # smaller chunk lets a tiny test shard span several chunks, as a real shard spans many.
        from huggingface_hub import constants

        constants.DOWNLOAD_CHUNK_SIZE = args["chunk_size"]
    if args.get("precache"):  # an earlier download left these shards in the cache
        source = resolve(HubRef("org/base"), "base")
        for name in args["precache"]:
            download(source, name)
    checkpoint = open_base("org/base")
    adapter = load_adapter(adapter_folder("org/lora"))
    plan = build_plan(checkpoint, [adapter], MergeOptions.create(device="cpu", max_shard_size=args["max_shard_size"]))
    estimate = disk_estimate(checkpoint, plan, low_disk=True)
    storage = cache_dir() / "models--org--base"
    snapshot = checkpoint.root
    out = Path(args["out"])
    out.mkdir(parents=True)
    baseline = _tree_bytes(storage)  # config, tokenizer, index (+ pre-cached shards)
    samples = []

    def on_tensor_done(shard, tensor, digest) -> None:
        samples.append({
            "tensor": tensor.name,
            "cache_growth": _tree_bytes(storage) - baseline,
            "out": _tree_bytes(out),
            "present": sorted(p.name for p in snapshot.glob("*.safetensors")),
        })

    inputs = input_files(checkpoint, low_disk=True)
    Executor(plan, out, device=torch.device("cpu"), inputs=inputs, on_tensor_done=on_tensor_done).run()
    return {
        "samples": samples,
        "estimate": {"peak": estimate.peak, "peak_input": estimate.peak_input, "downloads": estimate.downloads},
        "shard_sizes": {Path(f.path).name: f.size for f in checkpoint.files},
        "cached_at_plan": sorted(Path(p).name for p in checkpoint.cached),
        "fetched": [Path(p).name for p in inputs.fetched],
        "evicted": [Path(p).name for p in inputs.evicted],
        "present_after": sorted(p.name for p in snapshot.glob("*.safetensors")),
        "blobs_after": _tree_bytes(storage / "blobs"),
        "baseline": baseline,
        "outputs": [s.filename for s in plan.shards],
    }


def save_merged_hub(args: dict) -> dict:
    """save_merged on a live PeftModel whose base_model_name_or_path is a Hub repo id."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    import streammerge

    model = AutoModelForCausalLM.from_pretrained(args["local_base"], dtype=torch.float32)
    torch.manual_seed(7)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = "org/base"
    before = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    result = streammerge.save_merged(peft_model, args["out"], device="cpu", low_disk=True)
    after = peft_model.state_dict()
    unchanged = all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    import copy

    oracle = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    save_file({k: v.contiguous() for k, v in oracle.items()}, str(Path(args["oracle"])))
    record = json.loads((Path(args["out"]) / "streammerge.json").read_text())
    return {"unchanged": unchanged, "base": record["base"], "shards": result.shards}


if __name__ == "__main__":
    scenario, raw = sys.argv[1], sys.argv[2]
    assert os.environ.get("HF_ENDPOINT", "").startswith("http://127.0.0.1:"), "the worker only talks to a local fake Hub"
    result = {"low_disk_executor": low_disk_executor, "save_merged_hub": save_merged_hub}[scenario](json.loads(raw))
    print(json.dumps(result))
