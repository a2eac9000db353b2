"""The base's tokenizer as GGUF metadata, the way convert_hf_to_gguf.py writes it, without transformers.

* BPE (`tokenizer.json`, read with `tokenizers`): `tokenizer.ggml.model = gpt2`, the token list padded
  to the config's vocab size with `[PAD{i}]`, token types (added special tokens are CONTROL, other
  added tokens USER_DEFINED), the merges, and `tokenizer.ggml.pre`: llama.cpp names the pre-tokenizer
  by hashing the ids the tokenizer gives for a fixed text (`get_vocab_base_pre`). A retrained or
  custom tokenizer has an unknown hash; then the name comes from its split regex, or from the model
  family, instead of refusing (the file records which).
* SentencePiece (`tokenizer.model`, read with `sentencepiece`): `tokenizer.ggml.model = llama` with
  scores and types (`_create_vocab_sentencepiece`).
* Special token ids, add-BOS/EOS flags and the chat template come from `gguf.SpecialVocab`, the
  code llama.cpp itself uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError, UnsupportedError
from .arch import Arch

# The text llama.cpp encodes to fingerprint a BPE pre-tokenizer (convert_hf_to_gguf.py, get_vocab_base_pre).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of CHKTXT)) -> tokenizer.ggml.pre, for the families whose architectures we convert
# (values from llama.cpp's convert_hf_to_gguf.py table).
KNOWN_PRE: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5 / 3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}

# Split regexes of the pre-tokenizers llama.cpp implements -> their names (for unknown fingerprints).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PRE: dict[str, str] = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2", _TEKKEN: "tekken", _GPT4O: "gpt-4o"}
FAMILY_PRE: dict[str, str] = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "default"}

# llama.cpp token types (gguf.TokenType) and SentencePiece's.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    pre_source: str  # how `pre` was found: fingerprint | split regex | model family | sentencepiece
    tokens: list[str | bytes]
    toktypes: list[int]
    scores: list[float] | None
    special: Any  # gguf.SpecialVocab
    space_prefix: bool | None = None
    n_real: int | None = None  # tokens the tokenizer really has (gemma3 trims embeddings to it)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model, "pre": self.pre, "pre_source": self.pre_source, "tokens": len(self.tokens),
            "merges": len(self.special.merges), "special_token_ids": dict(self.special.special_token_ids),
            "chat_template": self.special.chat_template is not None,
        }

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.toktypes)
        self.special.add_to_gguf(writer, quiet=True)
        if self.space_prefix is not None:
            writer.add_add_space_prefix(self.space_prefix)


@contextmanager
def _quiet_gguf_logs():
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read it as JSON ({exc})") from None


def load_vocab(arch: Arch, root: Path, config: Mapping[str, Any], gguf) -> Vocab:
    """The tokenizer of the base at `root`, in the order of files llama.cpp tries for this arch."""
    spm, bpe = root / "tokenizer.model", root / "tokenizer.json"
    if not spm.is_file() and not bpe.is_file():
        raise InputError(
            f"{root} has no tokenizer.json or tokenizer.model; a GGUF embeds the tokenizer, so copy the base "
            "model's tokenizer files into that folder (or use --method merged_16bit)"
        )
    space_prefix = arch.space_prefix
    if arch.vocab == "llama":
        tc = root / "tokenizer_config.json"
        if tc.is_file() and (value := _read_json(tc).get("add_prefix_space")) is not None:
            space_prefix = bool(value)
    with _quiet_gguf_logs():
        if spm.is_file():
            vocab = _sentencepiece_vocab(root, config, gguf)
            vocab.space_prefix = space_prefix
            return vocab
        if arch.vocab == "spm":
            raise InputError(f"{root} has no tokenizer.model; {arch.gguf_arch} GGUFs are built from the SentencePiece model")
        if arch.vocab == "llama" and _is_sentencepiece_bpe(_read_json(bpe)):
            raise UnsupportedError(
                f"{bpe} is a SentencePiece-style BPE (byte fallback) without its tokenizer.model; add the base "
                "model's tokenizer.model to that folder"
            )
        vocab = _bpe_vocab(arch, root, config, gguf)
        vocab.space_prefix = space_prefix
        return vocab


def _is_sentencepiece_bpe(tokenizer_json: Mapping[str, Any]) -> bool:
    model = tokenizer_json.get("model", {})
    decoder = tokenizer_json.get("decoder") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and decoder.get("type") == "Sequence"


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py `does_token_look_special`: added tokens some models fail to mark special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


# ------------------------------------------------------------------------------------------ BPE


def fingerprint(tokenizer) -> str:
    """llama.cpp's pre-tokenizer hash: sha256 of the printed id list of CHKTXT (special tokens added)."""
    ids = tokenizer.encode(CHKTXT).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def _pre_tokenizer_splits(node: Any) -> list[tuple[str, Any]]:
    """(type, detail) of every pre-tokenizer in a tokenizer.json `pre_tokenizer`, Sequences flattened."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [item for child in node.get("pretokenizers", []) for item in _pre_tokenizer_splits(child)]
    if node.get("type") == "Split":
        pattern = node.get("pattern") or {}
        return [("Split", pattern.get("Regex", pattern.get("String")))]
    if node.get("type") == "ByteLevel":
        return [("ByteLevel", node.get("use_regex", True))]
    return [(str(node.get("type")), None)]


def identify_pre(arch: Arch, tokenizer, tokenizer_json: Mapping[str, Any]) -> tuple[str, str]:
    """(tokenizer.ggml.pre, how it was found)."""
    known = KNOWN_PRE.get(fingerprint(tokenizer))
    if known is not None:
        return known, "fingerprint"
    parts = _pre_tokenizer_splits(tokenizer_json.get("pre_tokenizer"))
    for kind, detail in parts:
        if kind == "Split" and detail in SPLIT_PRE:
            return SPLIT_PRE[detail], "split regex"
    if [kind for kind, _ in parts] == ["ByteLevel"] and parts[0][1]:
        return "gpt-2", "split regex"  # ByteLevel's own regex is GPT-2's
    return FAMILY_PRE.get(arch.gguf_arch, "default"), "model family"


def _bpe_vocab(arch: Arch, root: Path, config: Mapping[str, Any], gguf) -> Vocab:
    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    tokenizer_json = _read_json(path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise InputError(f"{path}: the tokenizers library cannot load it ({exc})") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = int(config.get("vocab_size") or len(vocab))
    if vocab and max(vocab.values()) >= vocab_size:
        raise InputError(f"{path} has token id {max(vocab.values())} but config.json says vocab_size {vocab_size}")
    added = {t["content"]: t for t in tokenizer_json.get("added_tokens", []) if isinstance(t, dict) and "content" in t}
    tc_path = root / "tokenizer_config.json"
    if tc_path.is_file():
        for tid, entry in (_read_json(tc_path).get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and "content" in entry:
                added.setdefault(entry["content"], {**entry, "id": int(tid)})
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str | bytes] = []
    toktypes: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            toktypes.append(UNUSED)
            continue
        if token in added:
            entry = added[token]
            if not entry.get("normalized", True):  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if entry.get("special") or looks_special(token):
                toktypes.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                toktypes.append(USER_DEFINED)
        else:
            toktypes.append(NORMAL)
        tokens.append(token)
    pre, source = identify_pre(arch, tokenizer, tokenizer_json)
    special = gguf.SpecialVocab(root, load_merges=True)
    if not special.merges:
        raise InputError(f"{path} has no BPE merges; llama.cpp's BPE tokenizer needs them")
    n_real = len(tokenizer_json.get("model", {}).get("vocab", {})) + len(tokenizer_json.get("added_tokens", []))
    return Vocab("gpt2", pre, source, tokens, toktypes, None, special, n_real=n_real)


# ---------------------------------------------------------------------------------- SentencePiece


def _sentencepiece_vocab(root: Path, config: Mapping[str, Any], gguf) -> Vocab:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UnsupportedError(
            "this base has a SentencePiece tokenizer.model, which needs the 'sentencepiece' package: "
            "pip install 'streammerge[gguf]'"
        ) from None
    path = root / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError depending on the failure
        raise InputError(f"{path}: sentencepiece cannot load it ({exc})") from None
    vocab_size = int(config.get("vocab_size") or sp.vocab_size())
    tokens: list[str | bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [UNUSED] * vocab_size
    for tid in range(min(sp.vocab_size(), vocab_size)):
        kind = NORMAL
        if sp.IsUnknown(tid):
            kind = UNKNOWN
        elif sp.IsControl(tid):
            kind = CONTROL
        elif sp.IsUnused(tid):
            kind = UNUSED
        elif sp.IsByte(tid):
            kind = BYTE
        tokens[tid], scores[tid], toktypes[tid] = sp.IdToPiece(tid).encode("utf-8"), sp.GetScore(tid), kind
    added_file = root / "added_tokens.json"
    if added_file.is_file():
        for text, tid in _read_json(added_file).items():
            if 0 <= int(tid) < vocab_size:
                tokens[tid], scores[tid], toktypes[tid] = text.encode("utf-8"), -1000.0, USER_DEFINED
    tc_path = root / "tokenizer_config.json"
    if tc_path.is_file():
        for tid, entry in (_read_json(tc_path).get("added_tokens_decoder") or {}).items():
            tid = int(tid)
            if not isinstance(entry, dict) or "content" not in entry or tid >= vocab_size:
                continue
            text: str = entry["content"]
            if entry.get("special") or looks_special(text):
                toktypes[tid] = CONTROL
            else:
                text = text.replace("\u2581", " ")
                toktypes[tid] = USER_DEFINED
            scores[tid] = -1000.0
            tokens[tid] = text.encode("utf-8")
    special = gguf.SpecialVocab(root, n_vocab=len(tokens))
    return Vocab("llama", "default", "sentencepiece", tokens, toktypes, scores, special, n_real=len(tokens))
