"""K-quant oracle: streammerge's Q4_K / Q5_K / Q6_K encoders against llama.cpp's own quantizer.

    python bench/kquant_oracle.py --llama-quantize PATH/TO/llama-quantize [--out DIR] [--golden FILE]

A small llama model (hidden 256, so every row is whole super-blocks) is merged with a LoRA adapter
to an F32 GGUF by streammerge. The first rows of one tensor are then overwritten with the inputs
that exercise the quantizers' corners (tests/kquant_rows.py: all zeros, one constant, a single
outlier, tiny and subnormal values, one sign only, ties on the rounding grid, 2^k magnitudes, wide
ranges, zero sub-blocks). Then
`llama-quantize --pure` (every weight the named type, no mix rules, no imatrix) writes one file per
type, and each of its quantized tensors must equal, byte for byte, our codec's encoding of the
same float32 rows. Then two 8-layer models (rows of whole super-blocks, and rows that fall back to
32-value blocks, tied embeddings) are written by streammerge straight from base + adapter with each
mix (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k) and by llama-quantize from our F32 file of the same merge:
the two files must be byte-identical. With --golden the sha256 of llama.cpp's bytes for the corner
rows and llama.cpp's type, tensor order and key order of every mix file are written for
tests/test_kquants.py, which then needs no llama.cpp.

llama.cpp version: the one vendored by llama-cpp-python 0.3.36 (commit 0c1e5709), built with cmake
defaults on x86-64 (no -march, so no FMA contraction in ggml-base).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TYPES = {"Q4_K": 15, "Q5_K": 17, "Q6_K": 18}  # llama_ftype values llama-quantize takes by number
MIXES = {"q4_k_m": 15, "q4_k_s": 14, "q5_k_m": 17, "q5_k_s": 16, "q6_k": 18}
SHAPES = {  # hidden / intermediate: whole super-blocks, and rows that fall back to 32-value blocks
    "h256": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2),
    "h96": dict(hidden_size=96, intermediate_size=288, num_attention_heads=3, num_key_value_heads=1),
}
GOLDEN_TENSOR = "blk.0.ffn_down.weight"  # rows of 512: its first rows become tests/kquant_rows.py's


def describe_difference(gguf, mine: Path, theirs: Path) -> None:
    a, b = gguf.GGUFReader(str(mine)), gguf.GGUFReader(str(theirs))
    if list(a.fields) != list(b.fields):
        print("  keys differ:", [k for k in a.fields if k not in b.fields], [k for k in b.fields if k not in a.fields],
              "order same" if sorted(a.fields) == sorted(b.fields) else "")
    ta = {t.name: t for t in a.tensors}
    if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        print("  tensor order differs")
    for t in b.tensors:
        m = ta.get(t.name)
        if m is None or m.tensor_type != t.tensor_type:
            print(f"  {t.name}: ours {m.tensor_type.name if m else None}, llama.cpp {t.tensor_type.name}")
        elif np.array(m.data).tobytes() != np.array(t.data).tobytes():
            print(f"  {t.name} ({t.tensor_type.name}): data differs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--golden", default=None, help="write the inputs' recipe and llama.cpp's digests here")
    args = ap.parse_args()

    import gguf
    import streammerge
    from models import build_adapter, build_base
    from kquant_rows import WIDTH, golden_rows
    from streammerge.formats import codecs

    work = Path(args.out or tempfile.mkdtemp(prefix="kquant-oracle-"))
    base = build_base(work / "base", "llama", dtype=torch.bfloat16, tokenizer="bpe-llama3", hidden_size=256,
                      intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=512, tie_word_embeddings=False)
    adapter = build_adapter(base, work / "adapter", seed=3).adapter_path
    f32 = work / "f32"
    streammerge.merge(str(base), [str(adapter)], str(f32), method="gguf", gguf_type="f32", device="cpu", overwrite=True)
    (src,) = sorted(f32.glob("*.gguf"))

    golden = golden_rows()
    reader = gguf.GGUFReader(str(src), "r+")
    (target,) = [t for t in reader.tensors if t.name == GOLDEN_TENSOR]
    assert int(target.shape[0]) == WIDTH, target.shape
    target.data.reshape(-1, WIDTH)[: len(golden)] = golden
    reader.data.flush()
    del reader

    inputs = {t.name: np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
              for t in gguf.GGUFReader(str(src)).tensors if len(t.shape) == 2}
    report = {"machine": platform.processor() or platform.machine(), "types": {}}
    digests = {}
    failures = 0
    for name, ftype in TYPES.items():
        dst = work / f"pure-{name}.gguf"
        subprocess.run([args.llama_quantize, "--pure", str(src), str(dst), str(ftype)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        codec = codecs.get(name)
        rows = {"tensors": 0, "equal": 0}
        for t in gguf.GGUFReader(str(dst)).tensors:
            if t.tensor_type.name != name:
                continue
            want = np.array(t.data, dtype=np.uint8).tobytes()
            x = torch.from_numpy(inputs[t.name])
            got = bytes(codec.encode(x))
            rows["tensors"] += 1
            rows["equal"] += int(got == want)
            if t.name == GOLDEN_TENSOR:
                digests[name] = hashlib.sha256(want[: len(golden) * codec.row_bytes(WIDTH)]).hexdigest()
            if got != want:
                failures += 1
                a = np.frombuffer(got, dtype=np.uint8).reshape(x.shape[0], -1)
                b = np.frombuffer(want, dtype=np.uint8).reshape(x.shape[0], -1)
                bad = np.nonzero((a != b).any(axis=1))[0]
                print(f"{name} {t.name}: {len(bad)} of {x.shape[0]} rows differ (first: row {bad[0]})")
        report["types"][name] = rows
        print(f"{name}: {rows['equal']} of {rows['tensors']} tensors byte-identical to llama-quantize")
    report["files"] = {}
    mixes: dict = {}
    for label, dims in SHAPES.items():
        mbase = build_base(work / f"base-{label}", "llama", dtype=torch.bfloat16, tokenizer="bpe-llama3",
                           num_hidden_layers=8, vocab_size=512, tie_word_embeddings=(label == "h96"), seed=5, **dims)
        madapter = build_adapter(mbase, work / f"adapter-{label}", seed=4).adapter_path
        mf32 = work / f"f32-{label}"
        streammerge.merge(str(mbase), [str(madapter)], str(mf32), method="gguf", gguf_type="f32", device="cpu", overwrite=True)
        (msrc,) = sorted(mf32.glob("*.gguf"))
        for mix, ftype in MIXES.items():
            theirs = work / f"{label}-{mix}-llama.gguf"
            subprocess.run([args.llama_quantize, str(msrc), str(theirs), str(ftype)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            mine_dir = work / f"{label}-{mix}"
            streammerge.merge(str(mbase), [str(madapter)], str(mine_dir), method="gguf", gguf_type=mix, device="cpu",
                              overwrite=True)
            (mine,) = sorted(mine_dir.glob("*.gguf"))
            reader = gguf.GGUFReader(str(theirs))
            mixes.setdefault(label, {})[mix] = {
                "keys": [k for k in reader.fields if not k.startswith("GGUF.")],
                "tensors": [[t.name, t.tensor_type.name] for t in reader.tensors],
            }
            del reader
            same = mine.read_bytes() == theirs.read_bytes()
            report["files"][f"{label} {mix}"] = same
            if not same:
                failures += 1
                describe_difference(gguf, mine, theirs)
            print(f"{label} {mix}: {'byte-identical' if same else 'DIFFERENT'} to llama-quantize of our F32 file")
    if args.golden and not failures:
        record = {"source": "llama-quantize --pure, llama.cpp 0c1e5709 (vendored by llama-cpp-python 0.3.36), x86-64 "
                            "cmake defaults", "rows": "tests/kquant_rows.py golden_rows(11)", "sha256": digests,
                  "models": {label: {**dims, "num_hidden_layers": 8, "tie_word_embeddings": label == "h96"}
                             for label, dims in SHAPES.items()},
                  "mixes": mixes}
        Path(args.golden).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
