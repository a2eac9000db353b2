"""llama.cpp's conversion rules, per architecture, as convert_hf_to_gguf.py applies them.

What a GGUF reader (llama.cpp, Ollama, transformers) expects differs from the Hugging Face layout in
a few deliberate ways; each is reproduced here, and each has a test that breaks it and is caught:

* names: `model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight` (the `gguf` package's
  `TensorNameMap`, the table llama.cpp itself uses);
* llama/mistral: the rows of q_proj and k_proj (weights and biases) are permuted per head from
  HF's rotate-half layout back to Meta's interleaved RoPE layout (`LlamaModel.permute`);
* gemma2/gemma3: norm weights are stored as `w + 1` (Gemma's RMSNorm multiplies by `1 + w`);
  gemma2 drops `lm_head`; gemma3 drops the embedding rows beyond the tokenizer's vocabulary;
* tied embeddings: no `output.weight` unless the checkpoint has an `lm_head.weight`;
* llama 3.x: a `rope_freqs` tensor when `rope_scaling` is of type llama3;
* 1-D tensors, norms and biases stay F32; 2-D weights take the requested type, falling back to F16
  where a row is not a whole number of quantization blocks (as convert_hf_to_gguf does);
* the metadata keys (context/embedding/feed-forward length, block and head counts, RoPE base and
  scaling, norm epsilon, key/value length, vocabulary size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import InputError, UnsupportedError


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face `model_type` becomes a GGUF."""

    model_type: str
    gguf_arch: str  # general.architecture (gguf.MODEL_ARCH_NAMES value)
    permute_qk: bool = False  # llama/mistral: Meta's interleaved RoPE row order for q/k
    norm_shift: float = 0.0  # gemma: norms stored as w + 1
    skip: tuple[str, ...] = ()  # checkpoint tensors llama.cpp does not write
    vocab: str = "gpt2_or_spm"  # which tokenizer files are read, in which order (vocab.py)
    trim_embeddings: bool = False  # gemma3: embedding rows past the tokenizer's vocabulary are dropped
    space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix, when the arch fixes it


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "llama", permute_qk=True, vocab="llama"),
    "mistral": Arch("mistral", "llama", permute_qk=True, vocab="llama"),
    "qwen2": Arch("qwen2", "qwen2"),
    "qwen3": Arch("qwen3", "qwen3"),
    "gemma2": Arch("gemma2", "gemma2", norm_shift=1.0, skip=("lm_head.weight",), vocab="spm", space_prefix=False),
    "gemma3_text": Arch("gemma3_text", "gemma3", norm_shift=1.0, vocab="gemma3", trim_embeddings=True, space_prefix=False),
}

# Tensors every converter ignores (buffers that some old checkpoints saved).
_IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def supported_list() -> str:
    return ", ".join(sorted({a.model_type.removesuffix("_text") for a in ARCHS.values()}))


def arch_of(config: Mapping[str, Any] | None) -> Arch:
    """The rules for this config, or a clear refusal naming the supported architectures."""
    if not config:
        raise InputError("--method gguf needs the base's config.json to know its architecture; it is missing")
    model_type = config.get("model_type")
    if model_type == "gemma3" and "text_config" in config:
        raise UnsupportedError(
            "this is a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration); --method gguf supports "
            "the text-only Gemma3ForCausalLM. Supported architectures: " + supported_list()
        )
    arch = ARCHS.get(model_type) or ARCHS.get(f"{model_type}_text")
    if arch is None:
        raise UnsupportedError(
            f"--method gguf does not support architecture {model_type!r} "
            f"({', '.join(config.get('architectures') or []) or 'no architectures listed'}); "
            f"supported: {supported_list()}. Use --method merged_16bit and llama.cpp's convert_hf_to_gguf.py"
        )
    return arch


# ------------------------------------------------------------------------------- hyperparameters


def _find(h: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((h[k] for k in keys if k in h and h[k] is not None), None)


def rope_parameters(h: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either config generation (`rope_parameters`, or `rope_theta` + `rope_scaling`)."""
    rp = dict(h.get("rope_parameters") or h.get("rope_scaling") or {})
    theta = _find(h, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"))
    local = _find(h, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"))
    if "full_attention" not in rp and "sliding_attention" not in rp:
        if local is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rp and theta is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
    return rp


def head_dim(h: Mapping[str, Any]) -> int:
    return h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]


def metadata(arch: Arch, h: Mapping[str, Any], file_type: int, gguf) -> dict[str, Any]:
    """GGUFWriter method name -> value, in the order llama.cpp adds them (later keys win)."""
    rp = rope_parameters(h)
    full = rp.get("full_attention", rp)
    out: dict[str, Any] = {}
    if arch.gguf_arch == "gemma2":  # Gemma2Model.set_gguf_parameters does not use the generic keys
        out.update(
            add_context_length=h["max_position_embeddings"], add_embedding_length=h["hidden_size"],
            add_block_count=h["num_hidden_layers"], add_feed_forward_length=h["intermediate_size"],
            add_head_count=h["num_attention_heads"],
            add_head_count_kv=h.get("num_key_value_heads", h["num_attention_heads"]),
            add_layer_norm_rms_eps=h["rms_norm_eps"], add_key_length=h["head_dim"], add_value_length=h["head_dim"],
            add_file_type=file_type, add_attn_logit_softcapping=h["attn_logit_softcapping"],
            add_final_logit_softcapping=h["final_logit_softcapping"], add_sliding_window=h["sliding_window"],
        )
        return out
    out["add_block_count"] = h["num_hidden_layers"]
    for method, keys in (
        ("add_context_length", ("max_position_embeddings", "n_ctx", "n_positions")),
        ("add_embedding_length", ("hidden_size", "n_embd")),
        ("add_feed_forward_length", ("intermediate_size", "n_inner")),
        ("add_head_count", ("num_attention_heads", "n_head")),
        ("add_head_count_kv", ("num_key_value_heads", "n_kv_heads")),
    ):
        if (value := _find(h, keys)) is not None:
            out[method] = value
    if (rope_type := full.get("rope_type")) is not None:
        factor = full.get("factor")
        if rope_type == "linear" and factor is not None:
            out["add_rope_scaling_type"] = gguf.RopeScalingType.LINEAR
            out["add_rope_scaling_factor"] = factor
        elif rope_type == "yarn" and factor is not None:
            out["add_rope_scaling_type"] = gguf.RopeScalingType.YARN
            out["add_rope_scaling_factor"] = factor
            out["add_rope_scaling_orig_ctx_len"] = full["original_max_position_embeddings"]
            for method, keys in (
                ("add_rope_scaling_yarn_ext_factor", ("extrapolation_factor",)),
                ("add_rope_scaling_yarn_attn_factor", ("attention_factor", "attn_factor")),
                ("add_rope_scaling_yarn_beta_fast", ("beta_fast",)),
                ("add_rope_scaling_yarn_beta_slow", ("beta_slow",)),
            ):
                if (value := _find(full, keys)) is not None:
                    out[method] = value
        elif rope_type in ("su", "longrope"):
            out["add_rope_scaling_type"] = gguf.RopeScalingType.LONGROPE
        elif rope_type.lower() not in ("default", "llama3", "dynamic"):
            raise UnsupportedError(f"RoPE scaling type {rope_type!r} has no GGUF equivalent that streammerge writes")
    if (theta := full.get("rope_theta")) is not None:
        out["add_rope_freq_base"] = theta
    if (local := rp.get("sliding_attention", {}).get("rope_theta")) is not None:
        out["add_rope_freq_base_swa"] = local
    if (eps := _find(h, ("rms_norm_eps", "norm_eps"))) is not None:
        out["add_layer_norm_rms_eps"] = eps
    if (dim := h.get("head_dim")) is not None:
        out["add_key_length"] = dim
        out["add_value_length"] = dim
    out["add_file_type"] = file_type

    if arch.gguf_arch == "llama":  # LlamaModel.set_gguf_parameters
        out["add_vocab_size"] = h["vocab_size"]
        out["add_rope_dimension_count"] = head_dim(h)
    elif arch.gguf_arch == "gemma3":  # Gemma3Model.set_gguf_parameters: its defaults, then its own keys
        out["add_context_length"] = h.get("max_position_embeddings", 131072)
        out["add_head_count"] = h.get("num_attention_heads", 8)
        out["add_layer_norm_rms_eps"] = h.get("rms_norm_eps", 1e-6)
        out["add_key_length"] = h.get("head_dim", 256)
        out["add_value_length"] = h.get("head_dim", 256)
        out["add_rope_freq_base"] = full.get("rope_theta", 1_000_000.0)
        if h.get("attn_logit_softcapping") is not None:
            raise UnsupportedError("gemma3 with attn_logit_softcapping is not a checkpoint llama.cpp converts")
        if h.get("final_logit_softcapping"):
            out["add_final_logit_softcapping"] = h["final_logit_softcapping"]
        if h.get("sliding_window_pattern") != 1:
            out["add_sliding_window"] = h["sliding_window"]
        out["add_head_count_kv"] = h.get("num_key_value_heads", 4)
    return out


def rope_freqs(arch: Arch, h: Mapping[str, Any]) -> list[float] | None:
    """The `rope_freqs` tensor llama.cpp expects for Llama 3.x RoPE scaling, or None when not needed.

    Llama 3.1 scaling keeps the frequencies of wavelengths shorter than `context / high_freq_factor`,
    divides those of wavelengths longer than `context / low_freq_factor` by `factor`, and in between
    blends linearly from one to the other; the tensor holds each original frequency over its scaled
    one. Defaults are llama.cpp's, for configs that leave a field out."""
    if arch.gguf_arch != "llama":
        return None
    params = rope_parameters(h)
    params = params.get("full_attention", params)
    if str(params.get("rope_type", "")).lower() != "llama3":
        return None
    import torch

    dim = head_dim(h)
    theta = params.get("rope_theta", 10000.0)
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    context = params.get("original_max_position_embeddings", h.get("original_max_position_embeddings", 8192))
    wavelengths = 2 * math.pi / (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)))
    # where each wavelength sits between the band edges: 0 at context / low, 1 at context / high
    position = (context / wavelengths - low) / (high - low)
    ratio = 1 / ((1 - position) / factor + position)
    ratio = torch.where(wavelengths > context / low, torch.full_like(ratio, float(factor)), ratio)
    ratio = torch.where(wavelengths < context / high, torch.ones_like(ratio), ratio)
    return ratio.tolist()


# ----------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class TensorRule:
    """What happens to one checkpoint tensor on its way into the GGUF."""

    gguf_name: str
    permute_heads: int = 0  # > 0: rows permuted per head (q/k of llama/mistral), this many heads
    shift: float = 0.0  # added in float32 (gemma norms: +1)
    rows: int | None = None  # only the first `rows` rows are written (gemma3 embeddings)


def tensor_rule(
    arch: Arch, h: Mapping[str, Any], name: str, shape: tuple[int, ...], name_map, n_vocab: int | None
) -> TensorRule | None:
    """The rule for checkpoint tensor `name`, or None when llama.cpp does not write it."""
    if name.endswith(_IGNORED_SUFFIXES) or name in arch.skip:
        return None
    gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise UnsupportedError(
            f"tensor {name!r} has no GGUF name for architecture {arch.gguf_arch}; llama.cpp would not convert "
            "this checkpoint either. Use --method merged_16bit"
        )
    heads = 0
    if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        n_head = h["num_attention_heads"]
        n_kv = h.get("num_key_value_heads", n_head)
        heads = n_kv if name.endswith(("k_proj.weight", "k_proj.bias")) and n_kv != n_head else n_head
        if shape[0] % (2 * heads):
            raise InputError(f"{name}: {shape[0]} rows cannot be split into {heads} heads of even size")
    shift = arch.norm_shift if name.endswith("norm.weight") else 0.0
    rows = None
    if arch.trim_embeddings and "embed_tokens.weight" in name and n_vocab is not None and n_vocab < shape[0]:
        rows = n_vocab
    return TensorRule(gguf_name, heads, shift, rows)
