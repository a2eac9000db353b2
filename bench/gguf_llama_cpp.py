"""llama.cpp check of `--method gguf`: load each GGUF with llama.cpp itself and compare its logits
with transformers' on the same weights. Not part of CI (llama-cpp-python builds from source).

    pip install llama-cpp-python          # ~5+ minutes to build on 2 cores
    python bench/gguf_llama_cpp.py [--out DIR] [--archs llama,qwen2,qwen3,gemma3] [--types bf16,q8_0,q4_0]
                                   [--llama-cpp PATH/TO/llama.cpp]   # also compare with its converter

For every architecture: a small random model (bf16, real trained tokenizer) and a LoRA adapter are
built, merged to GGUF by streammerge, then
  * llama.cpp (llama_cpp.Llama) evaluates a prompt and returns logits for every position;
  * transformers evaluates the same ids with the model it loads from the same GGUF (`gguf_file=`),
    and with the merged_16bit model (float32 merge, the reference the GGUF was made from);
  * the tokenizer llama.cpp reads from the GGUF tokenizes the prompt as the base's tokenizer does.
Prints max |difference| relative to the logits' spread, and top-1 agreement.

With --llama-cpp (a llama.cpp source tree, e.g. llama-cpp-python's vendor/llama.cpp), llama.cpp's own
convert_hf_to_gguf.py is also run on the merged_16bit bf16 checkpoint (the two-step path this
replaces) and its GGUF is compared with ours tensor by tensor and key by key. The tiny tokenizers
are not in its fingerprint table, so its pre-tokenizer lookup is given the name streammerge chose.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CONFIGS = {  # arch -> (tokenizer kind, config overrides): big enough that llama.cpp's kernels do real work
    "llama": ("bpe-llama3", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                 num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=256)),
    "qwen2": ("bpe-qwen2", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=4, max_position_embeddings=256)),
    "qwen3": ("bpe-qwen2", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=128, max_position_embeddings=256)),
    # llama.cpp scales gemma3 queries by 1/sqrt(head_dim), i.e. assumes query_pre_attn_scalar == head_dim (256)
    "gemma3": ("spm", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=256, max_position_embeddings=256)),
}
PROMPT = "The quick brown fox jumps over the lazy dog. Quantization stores blocks of thirty-two weights."


def _compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    spread = float(np.std(b))
    return {
        "max_abs": float(np.max(np.abs(a - b))),
        "max_rel_to_std": float(np.max(np.abs(a - b)) / spread),
        "top1_agree": float(np.mean(np.argmax(a, -1) == np.argmax(b, -1))),
    }


_CONVERT = """
import sys
tree, pre = sys.argv.pop(1), sys.argv.pop(1)
sys.path.insert(0, tree); sys.path.insert(1, tree + "/gguf-py")
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
import convert_hf_to_gguf as convert
convert.main()
"""


def converter_parity(arch: str, work: Path, llama_cpp_tree: Path) -> dict:
    """Our bf16 GGUF against llama.cpp's convert_hf_to_gguf.py run on our merged_16bit bf16 output."""
    import subprocess

    import gguf

    import streammerge

    merged = work / f"{arch}-merged-bf16"
    streammerge.merge(str(work / f"{arch}-base"), [str(work / f"{arch}-lora")], str(merged), dtype="bfloat16",
                      device="cpu", overwrite=True)
    ours_path = work / f"{arch}-bf16" / f"{arch}-base-BF16.gguf"
    ours = gguf.GGUFReader(str(ours_path))
    pre = bytes(ours.get_field("tokenizer.ggml.pre").parts[-1]).decode()
    ref_path = work / f"{arch}-llama-cpp-convert.gguf"
    subprocess.run([sys.executable, "-c", _CONVERT, str(llama_cpp_tree), pre, str(merged), "--outtype", "bf16",
                    "--outfile", str(ref_path)], check=True, capture_output=True)
    ref = gguf.GGUFReader(str(ref_path))
    ta, tb = {t.name: t for t in ours.tensors}, {t.name: t for t in ref.tensors}
    differing = [n for n in tb if n not in ta or ta[n].tensor_type != tb[n].tensor_type
                 or np.asarray(ta[n].data).tobytes() != np.asarray(tb[n].data).tobytes()]
    keys = [k for k in sorted(set(ours.fields) | set(ref.fields)) if not k.startswith("GGUF.")]
    kv_diff = [k for k in keys if (ours.get_field(k) is None) != (ref.get_field(k) is None)
               or (ours.get_field(k) is not None and ours.get_field(k).contents() != ref.get_field(k).contents())]
    return {"arch": arch, "tensors": len(tb), "same_tensor_names": set(ta) == set(tb),
            "tensors_differing": differing, "metadata_keys": len(keys), "metadata_differing": kv_diff}


def run(arch: str, gguf_type: str, work: Path) -> dict:
    import llama_cpp
    import models
    from transformers import AutoModelForCausalLM

    import streammerge

    kind, overrides = CONFIGS[arch]
    base = work / f"{arch}-base"
    if not base.exists():
        models.build_base(base, arch, dtype=torch.bfloat16, tokenizer=kind, **overrides)
        models.build_adapter(base, work / f"{arch}-lora", r=8)
        streammerge.merge(str(base), [str(work / f"{arch}-lora")], str(work / f"{arch}-merged"), dtype="float32",
                          device="cpu")
    out = work / f"{arch}-{gguf_type}"
    result = streammerge.merge(str(base), [str(work / f"{arch}-lora")], str(out), method="gguf", gguf_type=gguf_type,
                               device="cpu", overwrite=True)
    path = out / result.shards[0]["filename"]

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    if (base / "tokenizer.model").exists():
        import sentencepiece

        reference_ids = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model")).encode(PROMPT)
    else:
        from tokenizers import Tokenizer

        reference_ids = Tokenizer.from_file(str(base / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids
    llm.reset()
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)], dtype=np.float32)

    tensor_ids = torch.tensor([ids])
    with torch.no_grad():
        from_gguf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32)
        hf_gguf = from_gguf(input_ids=tensor_ids).logits[0].float().numpy()
        merged = AutoModelForCausalLM.from_pretrained(str(work / f"{arch}-merged"), dtype=torch.float32)
        hf_merged = merged(input_ids=tensor_ids).logits[0].float().numpy()
    return {
        "arch": arch, "type": gguf_type, "file": path.name, "tokens": len(ids),
        "tokenizer_matches": ids == reference_ids,
        "llama.cpp vs transformers(same GGUF)": _compare(cpp, hf_gguf),
        "llama.cpp vs merged_16bit f32": _compare(cpp, hf_merged),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--archs", default="llama,qwen2,qwen3,gemma3")
    parser.add_argument("--types", default="bf16,q8_0,q4_0")
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp source tree: also compare with its converter")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for arch in args.archs.split(","):
            for gguf_type in args.types.split(","):
                print(json.dumps(run(arch, gguf_type, work)), flush=True)
            if args.llama_cpp and "bf16" in args.types.split(","):
                print(json.dumps(converter_parity(arch, work, Path(args.llama_cpp))), flush=True)


if __name__ == "__main__":
    main()
