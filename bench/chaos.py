"""Chaos test: SIGKILL `streammerge merge` at random instants, re-run it, demand byte-identical output.

    python bench/chaos.py                 # 12 trials on a ~250 MB bf16 Llama-shaped model
    python bench/chaos.py --trials 20 --seed 1 --hidden 1024 --layers 8

Inputs are built once under bench/work/chaos/ (git-ignored): a base written directly as safetensors
(transformers' Llama key names, no model instantiated) and a rank-16 PEFT LoRA on every projection.
A reference merge runs uninterrupted. Each trial then starts the same command into a fresh folder
and kills it once or twice at a random instant of the merge (uniform over the reference's writing
time, plus a margin past its end), freezing the process first (SIGSTOP) to record exactly what the
kill left; a last, uninterrupted run must finish the job. A trial passes when the final folder is
byte-identical to the reference, file for file, and every interrupted folder was "not a model":
no index, and every shard under its final name complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
RECORD = "streammerge.json"


def build_inputs(work: Path, hidden: int, layers: int, vocab: int, tokenizer: bool = False) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    spec = {"hidden": hidden, "layers": layers, "vocab": vocab, "recipe": 1, "tokenizer": tokenizer}
    base, lora = work / "base", work / "lora"
    if (work / "spec.json").exists() and json.loads((work / "spec.json").read_text()) == spec:
        return base, lora
    shutil.rmtree(work, ignore_errors=True)
    base.mkdir(parents=True)
    lora.mkdir(parents=True)
    heads, kv = max(1, hidden // 64), max(1, hidden // 128)
    inter = int(hidden * 2.75) // 16 * 16
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(base)
    if tokenizer:  # --method gguf writes the vocabulary: a small real byte-level BPE tokenizer
        sys.path.insert(0, str(ROOT / "tests"))
        from models import build_trained_tokenizer

        build_trained_tokenizer(base, "bpe-llama3", vocab)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    kv_dim = kv * (hidden // heads)
    modules = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_dim, hidden), "self_attn.v_proj": (kv_dim, hidden),
               "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
               "mlp.down_proj": (hidden, inter)}
    for i in range(layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
        for m, shape in modules.items():
            shapes[f"model.layers.{i}.{m}.weight"] = shape
    shard, shard_bytes, n, weight_map = {}, 0, 0, {}
    names = sorted(shapes)

    def flush():
        nonlocal shard, shard_bytes, n
        n += 1
        fname = f"model-{n:05d}.safetensors"
        save_file(shard, str(base / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        shard, shard_bytes = {}, 0

    for name in names:
        shape = shapes[name]
        t = (torch.randn(shape, generator=g) * 0.02 if len(shape) > 1 else 1 + 0.1 * torch.randn(shape, generator=g))
        shard[name] = t.to(torch.bfloat16)
        shard_bytes += t.numel() * 2
        if shard_bytes > 100_000_000:
            flush()
    if shard:
        flush()
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    (base / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    r = 16
    LoraConfig(r=r, lora_alpha=32, target_modules=[m.split(".")[1] for m in modules], task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(lora))
    factors = {}
    for i in range(layers):
        for m, (out_f, in_f) in modules.items():
            key = f"base_model.model.model.layers.{i}.{m}"
            factors[f"{key}.lora_A.weight"] = (torch.rand((r, in_f), generator=g) * 2 - 1) / in_f ** 0.5
            factors[f"{key}.lora_B.weight"] = torch.randn((out_f, r), generator=g) * 0.02
    save_file(factors, str(lora / "adapter_model.safetensors"))
    (work / "spec.json").write_text(json.dumps(spec))
    return base, lora


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            out[str(p.relative_to(folder))] = h.hexdigest()
    return out


def journal_tensors(out: Path) -> int:
    try:
        lines = (out / ".streammerge" / "journal.jsonl").read_bytes().split(b"\n")[:-1]
    except OSError:
        return 0
    return sum(1 for line in lines if b'"t":"tensor"' in line)


def command(base: Path, lora: Path, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "streammerge", "merge", str(base), str(lora), "--out", str(out), "--quiet",
            "--max-shard-size", args.max_shard_size, "--max-memory", args.max_memory, "--device", "cpu",
            "--method", args.method] + (["--gguf-type", args.gguf_type] if args.method == "gguf" else [])


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return e


def timed_reference(cmd: list[str], out: Path) -> tuple[float, float]:
    """Run uninterrupted; return (seconds from start until its state folder appears, seconds until
    the merge is complete and the state folder gone)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    t_journal = t_end = None
    while proc.poll() is None:
        state = (out / ".streammerge").exists()
        if t_journal is None and writing(out, proc.pid):
            t_journal = time.monotonic()
        if t_journal is not None and t_end is None and not state:  # done (the process may still be exiting)
            t_end = time.monotonic()
        time.sleep(0.002)
    t_end = t_end or time.monotonic()
    if proc.returncode != 0:
        sys.exit(f"reference merge failed: {proc.stderr.read()}")
    t_journal = t_journal or t0
    return t_journal - t0, t_end - t_journal


def writing(out: Path, pid: int) -> bool:
    """The merge `pid` has taken the folder and begins writing (it notes its pid once its state is ready)."""
    try:
        return int((out / ".streammerge" / "lock").read_text().split()[0]) == pid
    except (OSError, ValueError, IndexError):
        return False


def kill_at(cmd: list[str], out: Path, delay: float, ref: dict[str, str], total: int) -> dict:
    """Start the merge, wait until it begins writing, then `delay` seconds; freeze, look, kill."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not writing(out, proc.pid):
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        proc.communicate()
        return {"phase": "after it ended", "ok": proc.returncode == 0, "tensors": total}
    os.kill(proc.pid, signal.SIGSTOP)
    names = set(os.listdir(out))
    tensors = journal_tensors(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    # the interrupted folder: an index only on a complete model; final-named shards complete
    ok = True
    now = digests(out)
    for name in names:
        if name.endswith((".safetensors", ".gguf")) and now.get(name) != ref.get(name):
            ok = False
    if INDEX in names and any(now.get(k) != v for k, v in ref.items()):
        ok = False
    if ".streammerge" not in names and RECORD not in names:
        phase = "before the journal"
    elif ".streammerge" not in names:
        phase = "after completion (exiting)"
    elif INDEX in names:
        phase = "after the index"
    elif RECORD in names:
        phase = "while committing"
    else:
        phase = "mid-run"
    return {"phase": phase, "ok": ok, "tensors": tensors}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--time-limit", type=float, default=280, help="start no new trial after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--max-shard-size", default="40MB")
    p.add_argument("--method", default="merged_16bit",
                   help="merged_16bit, merged_4bit (double quant: layouts resolved at run time) or gguf (split GGUF files)")
    p.add_argument("--gguf-type", default="q8_0", help="with --method gguf (default q8_0)")
    p.add_argument("--max-memory", default="64MB")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "chaos")
    args = p.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()

    base, lora = build_inputs(args.work / "inputs", args.hidden, args.layers, args.vocab, tokenizer=args.method == "gguf")
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    ref_out = args.work / "reference"
    shutil.rmtree(ref_out, ignore_errors=True)
    startup, writing = timed_reference(command(base, lora, ref_out, args), ref_out)
    ref = digests(ref_out)
    total = len(json.loads((ref_out / INDEX).read_text())["weight_map"])
    shards = sum(1 for n in ref if n.endswith((".safetensors", ".gguf")))
    print(f"model: {size / 1e6:.0f} MB bf16, {total} tensors -> {shards} output shards; reference merge: "
          f"{startup:.1f} s to start, {writing:.1f} s writing")

    passed, phases = 0, {}
    trials = 0
    for trial in range(1, args.trials + 1):
        if time.monotonic() - started > args.time_limit:
            print(f"time limit reached after {trials} trials")
            break
        trials += 1
        out = args.work / "trial"
        shutil.rmtree(out, ignore_errors=True)
        cmd = command(base, lora, out, args)
        kills, ok = [], True
        for _ in range(rng.choice((1, 1, 2))):
            k = kill_at(cmd, out, rng.uniform(0, writing * 1.05), ref, total)
            kills.append(k)
            phases[k["phase"]] = phases.get(k["phase"], 0) + 1
            ok &= k["ok"]
        res = subprocess.run([c for c in cmd if c != "--quiet"], env=env(), capture_output=True, text=True)
        identical = res.returncode == 0 and digests(out) == ref
        said = next((l for l in res.stdout.splitlines() if l.startswith(("resumed:", "already complete"))), "started over")
        ok &= identical
        passed += ok
        desc = ", ".join(f"killed {k['phase']}" + (f" ({k['tensors']}/{total} tensors journaled)" if k["phase"] == "mid-run" else "")
                         for k in kills)
        said = said.split(" (")[0].split(";")[0]
        print(f"trial {trial:2d}: {desc} -> re-run ({said}) {'byte-identical' if identical else 'DIFFERENT: ' + res.stderr.strip()}"
              f"{'' if ok else ' (invariant broken at a kill)'}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(f"{passed}/{trials} resumed byte-identical "
          f"(kills: {', '.join(f'{n} {ph}' for ph, n in sorted(phases.items()))}; {time.monotonic() - started:.0f} s)")
    return 0 if passed == trials else 1


if __name__ == "__main__":
    sys.exit(main())
