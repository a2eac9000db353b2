"""`streammerge demo`: build a small Llama-shaped model and LoRA adapter, merge them, check the result.

Everything happens in a temporary folder with no network: the base and adapter are made with
transformers + peft, merged by streaming, checked against PEFT's own `merge_and_unload`, and
finally checked by `streammerge verify` (what a user runs on a folder without a PEFT reference).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(keep: str | None = None) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from .api import merge, verify
    from .options import format_size

    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="streammerge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    base_dir, adapter_dir, out_dir = work / "base", work / "adapter", work / "merged"
    try:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=2048, max_position_embeddings=256, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(base_dir, max_shard_size="2MB")
        base_f32 = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        lora = LoraConfig(
            r=16, lora_alpha=32, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        peft_model = get_peft_model(base_f32, lora)
        peft_model.save_pretrained(adapter_dir)
        reference = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
        n_params = sum(v.numel() for v in reference.values())
        _say(f"built a {n_params / 1e6:.1f}M-parameter Llama-shaped bf16 base ({len(list(base_dir.glob('*.safetensors')))} shards) "
             f"and a rank-16 LoRA adapter in {work} ({time.perf_counter() - t0:.1f} s)")

        result = merge(base_dir, [str(adapter_dir)], out_dir, overwrite=True, max_memory="64MB", max_shard_size="4MB")
        counts = result.plan.counts()
        _say(f"merged with a 64 MB budget: {counts.get('merge', 0)} tensors merged, {counts.get('copy', 0)} copied, "
             f"{len(result.shards)} output shards, {format_size(result.plan.total_size)} in {result.seconds:.2f} s, "
             f"peak RSS {format_size(result.peak_rss_bytes)}")

        ours: dict[str, torch.Tensor] = {}
        for shard in sorted(out_dir.glob("*.safetensors")):
            ours.update(load_file(shard))
        equal = total = 0
        for name, ref in reference.items():
            expected = ref.to(torch.bfloat16)  # PEFT's float32 merge, rounded once to bf16
            equal += int((ours[name] == expected).sum())
            total += ref.numel()
        _say(f"check 1: {equal / total:.6%} of {total} weights are bit-identical to PEFT's float32 merge_and_unload "
             "rounded once to bf16")

        ids = torch.arange(0, 64).reshape(1, -1)
        with torch.no_grad():
            peft_merged = LlamaForCausalLM(config)
            peft_merged.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in reference.items()}, strict=False)
            expected_logits = peft_merged.eval()(ids).logits
            loaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
            logits = loaded(ids).logits
        diff = (logits - expected_logits).abs().max().item()
        _say(f"check 2: transformers loads the merged folder; max |logit difference| vs PEFT = {diff:.2e}")
        report = verify(out_dir, base_dir, [str(adapter_dir)], max_memory="64MB", max_shard_size="4MB")
        _say("check 3: streammerge verify " + f"{out_dir} --base {base_dir} --adapter {adapter_dir} --max-memory 64MB --max-shard-size 4MB")
        for line in report.table_lines()[len(report.adapters) + 3:]:
            _say("  " + line)
        ok = equal / total >= 0.9999 and diff < 1e-3 and report.ok
        _say("demo " + ("passed" if ok else "FAILED") + (f"; files kept in {work}" if keep else ""))
        return 0 if ok else 1
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
