"""Q4_K_M straight from base + adapter against llama.cpp's route, on one machine, in one run.

    python bench/bench_kquant.py --llama-cpp PATH/TO/llama.cpp [--mix q4_k_m] [--threads 2] [--identity]

The model is bench_merge.py's TinyLlama-1.1B shape (bf16, rank-16 adapter on every linear layer)
with a 512-token trained BPE vocabulary instead of 32000 (GGUF needs a real tokenizer; the
embedding is then 1 M instead of 65 M parameters). Contenders, each a child process timed with its
output fsynced (bench/measure_child.py), peak RSS its kernel high-water mark:

  sm16      streammerge merged_16bit                      (step 1 of llama.cpp's route)
  convert   llama.cpp's convert_hf_to_gguf.py --outtype bf16 on that output   (step 2)
  quantize  llama-quantize BF16.gguf MIX.gguf MIX THREADS                  (step 3, "alone")
  direct    streammerge --method gguf --gguf-type MIX     (one pass: base + adapter -> MIX)

With --identity, streammerge also writes the merge as an F32 GGUF, llama-quantize makes MIX of it,
and the two MIX files are compared byte for byte (llama-quantize of the BF16 file quantizes values
already rounded to bf16, so its bytes differ from a quantization of the float32 merge).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

import bench_merge as bm  # noqa: E402

FTYPES = {"q4_k_m": 15, "q4_k_s": 14, "q5_k_m": 17, "q5_k_s": 16, "q6_k": 18}


def inputs(work: Path, rebuild: bool) -> tuple[Path, Path]:
    spec = bm.model_spec("1b", 0)
    spec.update(vocab=512, name="1b-v512")
    d = work / "inputs" / "1b-v512"
    stamp = d / "spec.json"
    if rebuild or not stamp.exists() or json.loads(stamp.read_text()) != json.loads(json.dumps(spec, sort_keys=True)):
        bm.build_inputs(d, spec)
        from models import build_trained_tokenizer

        special = build_trained_tokenizer(d / "base", "bpe-llama3", 512)
        config = json.loads((d / "base" / "config.json").read_text())
        config.update({k: v for k, v in special.items() if k.endswith("_token_id")})
        (d / "base" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return d / "base", d / "adapter"


def measure(label: str, cmd: list[str], out: Path, runs: Path) -> dict:
    result = runs / f"{label}.json"
    bm.log(f"{label}: {' '.join(map(str, cmd))}")
    subprocess.run(["sync"], check=False)
    subprocess.run([sys.executable, str(HERE / "measure_child.py"), "--result", str(result), "--fsync-dir", str(out),
                    "--stdout", str(runs / f"{label}.out"), "--stderr", str(runs / f"{label}.err"), "--", *map(str, cmd)],
                   check=True)
    r = json.loads(result.read_text())
    if r["rc"] != 0:
        raise SystemExit(f"{label} failed (rc {r['rc']}): see {runs / (label + '.err')}")
    bm.log(f"{label}: {r['wall_s']:.1f} s, peak RSS {r['ru_maxrss_bytes'] / 1e9:.2f} GB")
    return r


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, help="a built llama.cpp tree (build/bin/llama-quantize, convert_hf_to_gguf.py)")
    ap.add_argument("--mix", default="q4_k_m", choices=sorted(FTYPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-quantize threads (default: all cores)")
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--identity", action="store_true", help="also compare with llama-quantize of our F32 file")
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--rebuild", action="store_true")
    args = ap.parse_args()

    llama = Path(args.llama_cpp)
    quantize = llama / "build" / "bin" / "llama-quantize"
    work = Path(args.work)
    base, adapter = inputs(work, args.rebuild)
    runs = work / "kquant-runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    sm = [sys.executable, "-m", "streammerge", "merge", base, adapter, "--device", "cpu", "--max-memory", args.max_memory,
          "--quiet"]
    mix, ftype = args.mix, FTYPES[args.mix]
    timings = {}
    bm.warm([base, adapter])
    timings["sm16"] = measure("sm16", sm + ["--out", runs / "sm16"], runs / "sm16", runs)
    bf16 = runs / "convert" / "model-BF16.gguf"
    bf16.parent.mkdir()
    from gguf_llama_cpp import _CONVERT  # the converter, told the pre-tokenizer name (a tiny vocabulary has no fingerprint)

    timings["convert"] = measure("convert", [sys.executable, "-c", _CONVERT, llama, "llama-bpe", runs / "sm16",
                                             "--outtype", "bf16", "--outfile", bf16], bf16.parent, runs)
    (runs / "quantize").mkdir()
    timings["quantize"] = measure("quantize", [quantize, bf16, runs / "quantize" / f"model-{mix}.gguf", ftype, args.threads],
                                  runs / "quantize", runs)
    bm.warm([base, adapter])
    timings["direct"] = measure("direct", sm + ["--out", runs / "direct", "--method", "gguf", "--gguf-type", mix],
                                runs / "direct", runs)
    route = timings["sm16"]["wall_s"] + timings["convert"]["wall_s"] + timings["quantize"]["wall_s"]
    report = {
        "machine": bm.machine_info(work), "mix": mix, "threads": args.threads, "max_memory": args.max_memory,
        "timings": {k: {"wall_s": round(v["wall_s"], 2), "peak_rss_gb": round(v["ru_maxrss_bytes"] / 1e9, 3),
                        "user_s": round(v["user_s"], 1)} for k, v in timings.items()},
        "route_s": round(route, 2),
        "direct_vs_quantize_alone": round(timings["direct"]["wall_s"] / timings["quantize"]["wall_s"], 2),
        "route_vs_direct": round(route / timings["direct"]["wall_s"], 2),
    }
    if args.identity:
        f32 = runs / "f32"
        measure("f32", sm + ["--out", f32, "--method", "gguf", "--gguf-type", "f32"], f32, runs)
        (f32_gguf,) = f32.glob("*.gguf")
        theirs = runs / f"llama-{mix}.gguf"
        subprocess.run([quantize, f32_gguf, theirs, str(ftype), str(args.threads)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (mine,) = (runs / "direct").glob("*.gguf")
        report["identity"] = {"ours": sha256(mine), "llama_quantize_of_our_f32": sha256(theirs)}
        report["identity"]["equal"] = report["identity"]["ours"] == report["identity"]["llama_quantize_of_our_f32"]
        shutil.rmtree(f32)
    stamp = time.strftime("%Y-%m-%d")
    out = Path(args.results) / f"{stamp}-kquant-{mix}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
