"""Tiny, real, deterministic checkpoints and LoRA adapters built at test time.

Everything here uses transformers + peft themselves, so the *oracle* (what a merge
must produce) is PEFT's own ``merge_and_unload`` and the merged model's logits,
never streammerge's code.

    build_base(path, arch, *, dtype=torch.float32, max_shard_size=None,
               tie_word_embeddings=None, seed=0, **config_overrides) -> Path
    build_adapter(base_path, out_path, *, seed=1, **lora_kwargs) -> AdapterCase
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARCHS = ("llama", "qwen2", "gpt2", "phi3", "mistral", "gpt_oss", "qwen3_moe", "qwen3", "gemma2", "gemma3", "deepseek_v3")

# special-token ids shared by every tiny model and its tokenizer
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# default attention/MLP module names per arch (what a "typical" adapter targets)
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_oss": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # MLA projections, the dense MLP of the first layer and the shared experts
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# MoE archs: fused 3-D expert parameters, targeted with target_parameters (PEFT ParamWrapper).
# gpt_oss stores them fused on disk ([E, in, out], is_transposed); qwen3_moe stores them per expert
# on disk (transformers fuses them to [E, out, in] at load time).
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


# --------------------------------------------------------------------------- base


def _config(arch: str, tie_word_embeddings: bool | None, overrides: dict[str, Any]):
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3MoeConfig,
        Qwen3Config,
    )

    common = dict(
        vocab_size=160,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if arch in ("gpt_oss", "qwen3_moe"):
        kw = dict(common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64)
        if arch == "gpt_oss":  # experts: gate_up [4, 32, 48], down [4, 24, 32]
            kw.update(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
            cls = GptOssConfig
        else:  # experts: gate_up [4, 48, 32] (per expert on disk: gate/up [24, 32]), down [4, 32, 24]
            kw.update(intermediate_size=64, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2)
            cls = Qwen3MoeConfig
        tie = False if tie_word_embeddings is None else tie_word_embeddings
    elif arch == "deepseek_v3":
        from transformers import DeepseekV3Config

        # MLA: q_a [32, 64], q_b [64, 32], kv_a_proj_with_mqa [32, 64], kv_b [64, 16], o [64, 32];
        # layer 0 dense MLP [128, 64]; layer 1: 4 routed experts [32, 64] / [64, 32] and a shared one
        kw = dict(common, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16,
                  qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                  max_position_embeddings=64)
        cls = DeepseekV3Config
        tie = False if tie_word_embeddings is None else tie_word_embeddings
    elif arch == "gpt2":
        kw = dict(common, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64)
        # GPT2Config has no pad_token_id default issue, keep it explicit anyway
        cls = GPT2Config
        tie = True if tie_word_embeddings is None else tie_word_embeddings
    else:
        kw = dict(
            common,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        cls = {
            "llama": LlamaConfig,
            "mistral": MistralConfig,
            "qwen2": Qwen2Config,
            "phi3": Phi3Config,
            "qwen3": Qwen3Config,
            "gemma2": Gemma2Config,
            "gemma3": Gemma3TextConfig,
        }[arch]
        if arch == "phi3":
            kw["original_max_position_embeddings"] = 64
        if arch == "qwen3":
            kw["head_dim"] = 8
        if arch in ("gemma2", "gemma3"):
            kw["head_dim"] = 16
        # qwen2: biases on q/k/v (built in) and tied embeddings by default; gemma is always tied
        default_tie = arch in ("qwen2", "gemma2", "gemma3")
        tie = default_tie if tie_word_embeddings is None else tie_word_embeddings
    kw["tie_word_embeddings"] = tie
    kw.update(overrides)
    return cls(**kw)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: every parameter random (norm scales around 1, biases != 0)."""
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1 and leaf == "weight":  # layer/rms norm scales
            p.copy_(1.0 + 0.1 * noise)
        elif leaf == "bias":
            p.copy_(0.05 * noise)
        else:
            fan_in = p.shape[-1] if p.ndim > 1 else p.shape[0]
            p.copy_(noise * (1.0 / fan_in) ** 0.5)


def build_tokenizer(path: Path, vocab_size: int):
    """An offline WordLevel tokenizer (special tokens + w4..wN) saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(len(SPECIAL_TOKENS), vocab_size):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(path))
    return fast


CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Streaming merges write every tensor once, in row chunks, without loading the model.",
    "A tokenizer splits text into pieces; byte pairs that appear together are merged first.",
    "Numbers like 2024, 3.14 and 1000000 are split into digits by some pre-tokenizers.",
    "Hello, world! How are you today? I'm fine, thanks. We'll see what they've done.",
    "Llamas and alpacas graze on the high plains; the weather there changes quickly.",
    "Quantization stores blocks of thirty-two weights with one scale per block.",
    "The merged model loads in llama.cpp, Ollama and transformers alike.",
] * 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_trained_tokenizer(path: Path, kind: str, vocab_size: int) -> dict[str, int]:
    """Train a small real tokenizer on CORPUS and save it at ``path``; returns its special-token ids.

    "bpe-llama3" / "bpe-qwen2": byte-level BPE with that family's split regex and special tokens
    (Llama 3 adds BOS through its post-processor); "spm": a SentencePiece BPE tokenizer.model with
    byte fallback and Gemma's special pieces (pad 0, eos 1, bos 2, unk 3), plus tokenizer_config.json.
    """
    if kind == "spm":
        return _build_spm_tokenizer(path, vocab_size)
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama = kind == "bpe-llama3"
    if kind not in ("bpe-llama3", "bpe-qwen2"):
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"] if llama
                else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tk = Tokenizer(models.BPE(ignore_merges=llama))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if llama else _QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS, trainer)
    tk.add_special_tokens(specials)
    ids = {t: tk.token_to_id(t) for t in specials}
    if llama:
        bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids[bos])]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=eos)
        special = dict(bos_token_id=ids[bos], eos_token_id=ids[eos], pad_token_id=ids[eos])
    else:
        eot = "<|endoftext|>"
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token=eot)
        special = dict(bos_token_id=ids[eot], eos_token_id=ids["<|im_end|>"], pad_token_id=ids[eot])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return special


def _build_spm_tokenizer(path: Path, vocab_size: int) -> dict[str, int]:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        hard_vocab_limit=False, minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    config = {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "GemmaTokenizer",
        "added_tokens_decoder": {
            str(i): {"content": c, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                     "single_word": False}
            for i, c in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])
        },
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)


def build_base(
    path,
    arch: str,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size=None,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    tokenizer: str = "wordlevel",
    **config_overrides,
) -> Path:
    """Build a tiny random ``arch`` model at ``path`` (weights, config, tokenizer, generation config).

    ``tokenizer``: "wordlevel" (default, w4..wN), or a real trained one for GGUF tests:
    "bpe-llama3" / "bpe-qwen2" (byte-level BPE with that family's split regex) or "spm" (a
    SentencePiece BPE model, Gemma style); the config's special-token ids follow the tokenizer.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if tokenizer != "wordlevel":
        config_overrides.setdefault("vocab_size", 320)
        special = build_trained_tokenizer(path, tokenizer, config_overrides["vocab_size"])
        config_overrides = {**special, **config_overrides}
    config = _config(arch, tie_word_embeddings, config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    # a distinctive generation config (so "copied" is checkable)
    model.generation_config = GenerationConfig(**special, max_new_tokens=7, do_sample=False)
    kw = {}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kw)
    if tokenizer == "wordlevel":
        build_tokenizer(path, config.vocab_size)
    assert (path / "generation_config.json").exists()
    return path


# --------------------------------------------------------------------------- adapter


@dataclass
class LoraTarget:
    """What PEFT resolved for one targeted module (the independent truth for references)."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    weight_name: str  # base tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    A: torch.Tensor  # [r, in]  float32
    B: torch.Tensor  # [out, r] float32
    scale: float
    fan_in_fan_out: bool

    def delta64(self) -> torch.Tensor:
        """scale * (B @ A) in float64, laid out like the base weight (transposed for fan_in_fan_out)."""
        d = (self.B.double() @ self.A.double()) * self.scale
        return d.T if self.fan_in_fan_out else d


@dataclass
class AdapterCase:
    base_path: Path
    adapter_path: Path
    arch: str
    lora_kwargs: dict
    merged_state_dict: dict[str, torch.Tensor]  # PEFT merge_and_unload(), float32, cloned
    base_state_dict: dict[str, torch.Tensor]  # base as loaded in float32 (before merge)
    input_ids: torch.Tensor  # [2, 12]
    ref_logits: torch.Tensor  # merged f32 model(input_ids).logits
    targets: dict[str, LoraTarget] = field(default_factory=dict)  # by weight_name
    peft_logits: torch.Tensor | None = None  # the unmerged PeftModel's logits (what the adapter computes)
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> PEFT get_delta_weight()

    @property
    def merged_weight_names(self) -> set[str]:
        return set(self.targets)


def _peft_model_prefix_strip(name: str) -> str:
    # names under PeftModel: base_model.model.<transformers name>
    for p in ("base_model.model.",):
        if name.startswith(p):
            return name[len(p) :]
    return name


def make_input_ids(vocab_size: int, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), vocab_size, (2, 12), generator=g)


@torch.no_grad()
def _perturb_extras(peft_model, seed: int) -> None:
    """Make every trained tensor that is not a LoRA factor differ from its initial value (DoRA
    magnitudes, modules_to_save copies, trainable token rows, lora_B biases): otherwise they equal
    what they were initialized from and a merge that ignored them would still look right."""
    g = torch.Generator().manual_seed(seed + 1000)
    for name, p in peft_model.named_parameters():
        if not p.requires_grad or ".lora_A." in name or (".lora_B." in name and name.endswith("weight")):
            continue
        if "lora_embedding_" in name:
            continue
        p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))


def build_adapter(base_path, out_path, *, seed: int = 1, perturb: bool = False, save_kwargs: dict | None = None,
                  save_merged: bool = False, **lora_kwargs) -> AdapterCase:
    """Random (non-zero) LoRA adapter over ``base_path`` with PEFT; returns paths + PEFT oracle.

    perturb: also randomize DoRA magnitudes, modules_to_save copies, trainable tokens and lora biases.
    save_kwargs: passed to save_pretrained (e.g. safe_serialization=False for a legacy .bin).
    save_merged: also save PEFT's merged model (transformers' on-disk layout) to ``out_path/peft-merged``."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base_path = Path(base_path)
    out_path = Path(out_path)
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    model.eval()
    arch = model.config.model_type
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    kw = dict(lora_kwargs)
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("target_modules", DEFAULT_TARGETS.get(arch, "all-linear"))
    kw.setdefault("lora_dropout", 0.0)
    kw.setdefault("task_type", "CAUSAL_LM")
    if arch == "gpt2":
        kw.setdefault("fan_in_fan_out", True)
    config = LoraConfig(init_lora_weights=False, **kw)

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.eval()
    if perturb:
        _perturb_extras(peft_model, seed)
    peft_model.save_pretrained(str(out_path), **(save_kwargs or {}))
    ids = make_input_ids(peft_model.config.vocab_size)
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits.detach().float().clone()

    targets: dict[str, LoraTarget] = {}
    deltas: dict[str, torch.Tensor] = {}
    for name, mod in peft_model.named_modules():
        if type(mod).__name__ == "ParamWrapper":
            continue
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_embedding_A", {}):
            deltas[_peft_model_prefix_strip(name) + ".weight"] = mod.get_delta_weight("default").detach().clone()
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            deltas[_peft_model_prefix_strip(name) + ".weight"] = mod.get_delta_weight("default").detach().clone()
            tname = _peft_model_prefix_strip(name)
            targets[tname + ".weight"] = LoraTarget(
                module=tname,
                weight_name=tname + ".weight",
                A=mod.lora_A["default"].weight.detach().float().clone(),
                B=mod.lora_B["default"].weight.detach().float().clone(),
                scale=float(mod.scaling["default"]),
                fan_in_fan_out=bool(getattr(mod, "fan_in_fan_out", False)),
            )
    if not targets and not config.target_parameters and not deltas and not perturb:
        raise AssertionError("PEFT targeted no module; the adapter would be empty")

    merged = peft_model.merge_and_unload()
    merged.eval()
    merged_sd = {k: v.detach().float().clone() for k, v in merged.state_dict().items()}
    if save_merged:
        merged.save_pretrained(str(out_path / "peft-merged"))
    with torch.no_grad():
        logits = merged(input_ids=ids).logits.detach().float().clone()

    return AdapterCase(
        base_path=base_path,
        adapter_path=out_path,
        arch=arch,
        lora_kwargs=kw,
        merged_state_dict=merged_sd,
        base_state_dict=base_sd,
        input_ids=ids,
        ref_logits=logits,
        targets=targets,
        peft_logits=peft_logits,
        deltas=deltas,
    )


def read_json(path) -> Any:
    with open(path) as f:
        return json.load(f)
