"""The base's tokenizer as GGUF metadata, as llama.cpp's converter would write it, without transformers.

The vocabulary is built as a table, one row (text, score, token type) per embedding row, stacked from
layers that each come from one source: padding, the tokenizer's own pieces, then added tokens.

* BPE (`tokenizer.json`, read with `tokenizers`): `tokenizer.ggml.model = gpt2`, no scores; added
  tokens are CONTROL when special (or named like control tokens), otherwise USER_DEFINED; the merges;
  and `tokenizer.ggml.pre`, which llama.cpp identifies by hashing the ids the tokenizer gives for a
  fixed text. A retrained or custom tokenizer has an unknown hash; then the name comes from its split
  regex, or from the model family, instead of refusing (the file records which).
* SentencePiece (`tokenizer.model`, read with `sentencepiece`): `tokenizer.ggml.model = llama`, with
  the model's scores and piece types, overlaid by added_tokens.json and tokenizer_config.json.
* Special token ids, add-BOS/EOS flags and the chat template come from `gguf.SpecialVocab`, the
  code llama.cpp itself uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InputError, UnsupportedError
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


# Added tokens llama.cpp types CONTROL even when the tokenizer does not mark them special (some
# models, e.g. deepseek-coder and gemma, leave them unmarked): these names, and these brackets.
_CONTROL_NAMES = frozenset({"<pad>", "<mask>", "<2mass>", "[@BOS@]"})
_CONTROL_BRACKETS = (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))  # \uff5c: fullwidth vertical bar


def looks_special(token: str) -> bool:
    """Whether llama.cpp's converter treats an unmarked added token as a control token."""
    return token in _CONTROL_NAMES or any(token.startswith(a) and token.endswith(b) for a, b in _CONTROL_BRACKETS)


# ------------------------------------------------------------------------------------ token table
#
# Whatever the tokenizer, the GGUF vocabulary is one table with a row per embedding row: (text,
# score, token type). It is assembled from layers, each a plain {id: row} mapping, later layers
# winning: every id starts as padding, then the tokenizer's own pieces, then the added tokens its
# files list. Keeping precedence in one place (`_stack`) is what makes the layers independent:
# each is computed from its own file without looking at what the others put where.

Row = tuple[str | bytes, float | None, int]  # text, score (None for BPE), token type

ADDED_SCORE = -1000.0  # SentencePiece score of added tokens, as llama.cpp writes them
PAD_SCORE = -10000.0  # ... and of ids the tokenizer has no piece for


def _table_size(config: Mapping[str, Any], tokenizer_size: int) -> int:
    """Rows in the table: the config's vocab size (the embedding has that many rows, and llama.cpp
    requires one token per row); the tokenizer's own size when the config does not say."""
    return int(config.get("vocab_size") or tokenizer_size)


def _stack(size: int, pad: Callable[[int], Row], *layers: Mapping[int, Row]) -> list[Row]:
    """Row i from the last layer that has id i, `pad(i)` when none has; ids outside the table are
    dropped (added tokens past the embedding cannot be written)."""
    rows = [pad(i) for i in range(size)]
    for layer in layers:
        for tid, row in layer.items():
            if 0 <= tid < size:
                rows[tid] = row
    return rows


def _columns(rows: list[Row]) -> tuple[list[str | bytes], list[Any], list[int]]:
    """The table as GGUF stores it: token list, scores, token types."""
    if not rows:
        return [], [], []
    texts, scores, kinds = zip(*rows)
    return list(texts), list(scores), list(kinds)


def _added_kind(text: str, marked_special: Any) -> tuple[str, int]:
    """(text, type) of an added token. Marked special, or named like a control token (see
    `looks_special`): CONTROL, text as is. Otherwise USER_DEFINED, and llama.cpp matches those on the
    raw input, so a SentencePiece word-boundary mark in the text is written as the space it stands for."""
    if marked_special or looks_special(text):
        return text, CONTROL
    return text.replace("\u2581", " "), USER_DEFINED


def _config_added_tokens(root: Path) -> dict[int, dict[str, Any]]:
    """tokenizer_config.json's `added_tokens_decoder` as {id: entry}, for the entries that give their text."""
    path = root / "tokenizer_config.json"
    if not path.is_file():
        return {}
    listed = _read_json(path).get("added_tokens_decoder") or {}
    return {int(tid): entry for tid, entry in listed.items() if isinstance(entry, dict) and "content" in entry}


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


def _load_tokenizer_json(path: Path):
    """(the parsed tokenizer.json, the `tokenizers` Tokenizer built from it)."""
    from tokenizers import Tokenizer

    tokenizer_json = _read_json(path)
    try:
        return tokenizer_json, Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type
        raise InputError(f"{path}: the tokenizers library cannot load it ({exc})") from None


def _bpe_added_flags(root: Path, tokenizer_json: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The added tokens' flags (`special`, `normalized`) by text. tokenizer.json's own list comes
    first; tokenizer_config.json (written by older transformers) fills in tokens it does not list."""
    flags = {t["content"]: t for t in tokenizer_json.get("added_tokens", []) if isinstance(t, dict) and "content" in t}
    for entry in _config_added_tokens(root).values():
        flags.setdefault(entry["content"], entry)
    return flags


def _bpe_rows(tokenizer, vocab: Mapping[str, int], flags: Mapping[str, Mapping[str, Any]]) -> dict[int, Row]:
    """A row for every id in `vocab`. Plain vocabulary is NORMAL; an added token is typed by
    `_added_kind`, a non-normalized one first put through encode/decode, since llama.cpp's tokenizer
    normalizes added tokens too and must find the text it will see."""

    def row(text: str) -> Row:
        entry = flags.get(text)
        if entry is None:
            return text, None, NORMAL
        if not entry.get("normalized", True):
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            text = tokenizer.decode(ids, skip_special_tokens=False)
        text, kind = _added_kind(text, entry.get("special"))
        return text, None, kind

    return {tid: row(text) for text, tid in vocab.items()}


def _bpe_vocab(arch: Arch, root: Path, config: Mapping[str, Any], gguf) -> Vocab:
    """`gpt2` vocabulary: the tokenizer's ids typed from its added-token flags, ids it lacks `[PAD{i}]`
    and UNUSED, no scores; the merges come from gguf.SpecialVocab."""
    path = root / "tokenizer.json"
    tokenizer_json, tokenizer = _load_tokenizer_json(path)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = _table_size(config, len(vocab))
    if vocab and max(vocab.values()) >= size:
        raise InputError(f"{path} has token id {max(vocab.values())} but config.json says vocab_size {size}")
    known = _bpe_rows(tokenizer, vocab, _bpe_added_flags(root, tokenizer_json))
    tokens, _, toktypes = _columns(_stack(size, lambda i: (f"[PAD{i}]", None, UNUSED), known))
    pre, source = identify_pre(arch, tokenizer, tokenizer_json)
    special = gguf.SpecialVocab(root, load_merges=True)
    if not special.merges:
        raise InputError(f"{path} has no BPE merges; llama.cpp's BPE tokenizer needs them")
    n_real = len(tokenizer_json.get("model", {}).get("vocab", {})) + len(tokenizer_json.get("added_tokens", []))
    return Vocab("gpt2", pre, source, tokens, toktypes, None, special, n_real=n_real)


# ---------------------------------------------------------------------------------- SentencePiece

# SentencePiece's piece-type tests, most specific first: the first that holds gives the GGUF type.
# Nothing maps USER_DEFINED pieces: llama.cpp's converter writes them NORMAL, and so do we.
_PIECE_TESTS = (("IsUnknown", UNKNOWN), ("IsControl", CONTROL), ("IsUnused", UNUSED), ("IsByte", BYTE))


def _load_sentencepiece(path: Path):
    """The SentencePieceProcessor for `path`; the package is an optional extra, so its absence is explained."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UnsupportedError(
            "this base has a SentencePiece tokenizer.model, which needs the 'sentencepiece' package: "
            "pip install 'streammerge[gguf]'"
        ) from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError depending on the failure
        raise InputError(f"{path}: sentencepiece cannot load it ({exc})") from None
    return sp


def _piece_rows(sp, size: int) -> dict[int, Row]:
    """The model's own pieces that fit the table, read with sentencepiece's batched calls (one per
    property over all ids): UTF-8 text, the model's score, and the type `_PIECE_TESTS` gives."""
    ids = list(range(min(sp.vocab_size(), size)))
    verdicts = zip(*(getattr(sp, test)(ids) for test, _ in _PIECE_TESTS))  # per id: one flag per test
    kinds = [next((kind for (_, kind), hit in zip(_PIECE_TESTS, hits) if hit), NORMAL) for hits in verdicts]
    return {
        tid: (piece.encode("utf-8"), score, kind)
        for tid, piece, score, kind in zip(ids, sp.IdToPiece(ids), sp.GetScore(ids), kinds)
    }


def _added_json_rows(root: Path) -> dict[int, Row]:
    """added_tokens.json ({text: id}, from older transformers): USER_DEFINED tokens, text as written."""
    path = root / "added_tokens.json"
    if not path.is_file():
        return {}
    return {int(tid): (text.encode("utf-8"), ADDED_SCORE, USER_DEFINED) for text, tid in _read_json(path).items()}


def _added_config_rows(root: Path) -> dict[int, Row]:
    """tokenizer_config.json's added tokens, typed by `_added_kind`: they override both the model's
    piece and added_tokens.json at their id (Gemma's chat tokens, user-defined pieces in the model,
    are marked special only there)."""
    rows = {}
    for tid, entry in _config_added_tokens(root).items():
        text, kind = _added_kind(entry["content"], entry.get("special"))
        rows[tid] = (text.encode("utf-8"), ADDED_SCORE, kind)
    return rows


def _sentencepiece_vocab(root: Path, config: Mapping[str, Any], gguf) -> Vocab:
    """`llama` vocabulary: the model's pieces with scores and types, overlaid by the added tokens of
    added_tokens.json then tokenizer_config.json; ids past the model are `[PAD{i}]` (bytes), UNUSED."""
    sp = _load_sentencepiece(root / "tokenizer.model")
    size = _table_size(config, sp.vocab_size())
    layers = _piece_rows(sp, size), _added_json_rows(root), _added_config_rows(root)  # later ones win
    tokens, scores, toktypes = _columns(_stack(size, lambda i: (f"[PAD{i}]".encode(), PAD_SCORE, UNUSED), *layers))
    special = gguf.SpecialVocab(root, n_vocab=len(tokens))
    return Vocab("llama", "default", "sentencepiece", tokens, toktypes, scores, special, n_real=len(tokens))
