"""Which ggml type each tensor of a GGUF file gets: convert_hf_to_gguf.py's rules for the plain
types, llama-quantize's mixes (src/llama-quant.cpp, no importance matrix) for the K-quant types.

A K-quant file is what `llama-quantize IN.gguf OUT.gguf Q4_K_M` makes of our F32 file of the same
merge: only >= 2-D `*weight` tensors that are not norms (nor MoE router gates) are quantized; the
output projection (or the token embedding, when tied) gets Q6_K; attn_v and ffn_down get Q6_K on
the layers `use_more_bits` picks (Q4_K_M, Q5_K_M) or Q5_K on the first layers (Q4_K_S); 70B llama
and qwen2 models get Q5_K attn_v; rows that are not whole super-blocks fall back (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, then F16). Tensors are ordered as llama-quantize writes them: by layer
(non-layer tensors first), then by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
K_MIXES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k")
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """What llama-quantize's rules ask of the model besides a tensor's own name and shape."""

    n_layers: int
    tied_embeddings: bool  # no output.weight: the token embedding is also the output projection
    is_70b: bool  # llama.cpp's LLM_TYPE_70B (its attn_v is small: one more bit is cheap)


def model_shape(gguf_arch: str, config: dict, names: set[str]) -> ModelShape:
    n_layers = int(config.get("num_hidden_layers") or 0)
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads", config.get("num_attention_heads"))
    is_70b = n_layers == 80 and (gguf_arch == "qwen2" or (gguf_arch == "llama" and heads != kv_heads))
    return ModelShape(n_layers, "output.weight" not in names, is_70b)


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def plain_type(name: str, shape: tuple[int, ...], bulk: str, is_output: bool) -> str:
    """convert_hf_to_gguf.py's choice, plus llama-quantize's output rule for q4_0 (Q6_K there, which
    that route cannot write, so Q8_0)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    wanted = "Q8_0" if (bulk == "Q4_0" and is_output) else bulk
    if wanted in BLOCK and shape[-1] % BLOCK[wanted]:
        return "F16"  # a row is not whole blocks: convert_hf_to_gguf falls back to F16
    return wanted


def _use_more_bits(layer: int, n_layers: int) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def k_type(name: str, shape: tuple[int, ...], mix: str, model: ModelShape) -> str:
    """llama-quantize's type for one tensor of an F32 input under `mix` (q4_k_m, ...)."""
    if not quantizable(name, shape):
        return "F32"
    default = "Q6_K" if mix == "q6_k" else "Q4_K" if mix.startswith("q4") else "Q5_K"
    wanted = default
    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else -1
    if name == "output.weight" or (model.tied_embeddings and name == "token_embd.weight"):
        wanted = "Q8_0" if shape[-1] % BLOCK[default] else "Q6_K"
    elif name == "token_embd.weight":
        pass
    elif any(key in name for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")):
        if mix in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, model.n_layers):
            wanted = "Q6_K"
        elif mix == "q4_k_s" and layer < 4:
            wanted = "Q5_K"
        if model.is_70b and wanted == "Q4_K":
            wanted = "Q5_K"
    elif "ffn_down" in name:
        if mix in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, model.n_layers):
            wanted = "Q6_K"
        elif mix == "q4_k_s" and layer < model.n_layers // 8:
            wanted = "Q5_K"
    return fallback(wanted, shape[-1])


def fallback(wanted: str, width: int) -> str:
    """llama-quantize's type for rows of `width` that are not whole blocks of `wanted`."""
    if width % BLOCK.get(wanted, 1) == 0:
        return wanted
    smaller = K_FALLBACK.get(wanted, wanted)
    return smaller if width % BLOCK[smaller] == 0 else "F16"


def layer_order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (llama_model_loader's weight_name_comparer)."""
    match = _LAYER.match(name)
    return (int(match.group(1)) if match else -1, name)
