"""The reference path streammerge is compared with: load everything, merge with PEFT, save.

    python bench/peft_merge.py BASE ADAPTER OUT [--timings T.json]

AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter); merge_and_unload(); save_pretrained(out)
(transformers' default max_shard_size). Stage timings go to --timings as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("adapter")
    ap.add_argument("out")
    ap.add_argument("--timings", default=None)
    a = ap.parse_args()

    t = {}
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    t["import_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.bfloat16)
    t["load_base_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    model = PeftModel.from_pretrained(model, a.adapter)
    t["load_adapter_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    model = model.merge_and_unload()
    t["merge_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    model.save_pretrained(a.out)
    t["save_s"] = time.perf_counter() - t1
    t["total_in_process_s"] = time.perf_counter() - t0

    if a.timings:
        with open(a.timings, "w") as f:
            json.dump(t, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
