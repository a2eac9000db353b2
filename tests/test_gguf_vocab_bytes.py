"""The GGUF token table, checked against the tokenizer libraries themselves and the stated rules.

The oracle is `sentencepiece` / `tokenizers` reading the same files, plus the rules llama.cpp's
converter applies to added tokens (special or control-looking -> CONTROL, otherwise USER_DEFINED
with '\u2581' as a space, score -1000; ids the tokenizer lacks -> "[PAD{i}]", UNUSED, score -10000).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

import models
from streammerge.errors import InputError
from streammerge.formats.gguf import arch as gguf_arch
from streammerge.formats.gguf import vocab as gguf_vocab

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(t) for t in (
    gguf.TokenType.NORMAL, gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
    gguf.TokenType.UNUSED, gguf.TokenType.BYTE))


def _write(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def test_sentencepiece_table_layers(tmp_path):
    import sentencepiece

    models.build_trained_tokenizer(tmp_path, "spm", 320)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    n_sp, size = sp.vocab_size(), sp.vocab_size() + 10
    _write(tmp_path / "added_tokens.json", {"<from_json>": 5, "<json_pad>": n_sp + 1, "<past_end>": size + 3})
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"].update({
        "5": {"content": "<from_config>", "special": False},  # overrides added_tokens.json at the same id
        "6": {"content": "\u2581two\u2581words", "special": False},
        "7": {"content": "<|looks_control|>", "special": False},
        str(n_sp + 2): {"content": "<config_pad>", "special": True},
        str(size): {"content": "<too_far>", "special": True},
    })
    _write(tmp_path / "tokenizer_config.json", tc)

    v = gguf_vocab.load_vocab(gguf_arch.ARCHS["gemma3_text"], tmp_path, {"vocab_size": size}, gguf)
    assert (v.model, v.pre, len(v.tokens), len(v.scores), len(v.toktypes), v.n_real) == ("llama", "default", size, size, size, size)
    assert all(type(s) is float for s in v.scores) and all(type(t) is bytes for t in v.tokens)

    overridden = {0, 1, 2, 3, 5, 6, 7}  # the special pieces re-listed in tokenizer_config.json, and ours
    for i in set(range(n_sp)) - overridden:
        kind = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                else BYTE if sp.IsByte(i) else NORMAL)
        assert (v.tokens[i], v.scores[i], v.toktypes[i]) == (sp.IdToPiece(i).encode(), sp.GetScore(i), kind), i
    assert v.toktypes[sp.PieceToId("<start_of_turn>")] == NORMAL  # user-defined pieces are written NORMAL
    assert BYTE in v.toktypes
    for i in range(4):
        assert (v.toktypes[i], v.scores[i]) == (CONTROL, -1000.0)
    assert (v.tokens[5], v.scores[5], v.toktypes[5]) == (b"<from_config>", -1000.0, USER_DEFINED)
    assert (v.tokens[6], v.toktypes[6]) == (b" two words", USER_DEFINED)
    assert (v.tokens[7], v.toktypes[7]) == (b"<|looks_control|>", CONTROL)
    assert (v.tokens[n_sp + 1], v.scores[n_sp + 1], v.toktypes[n_sp + 1]) == (b"<json_pad>", -1000.0, USER_DEFINED)
    assert (v.tokens[n_sp + 2], v.toktypes[n_sp + 2]) == (b"<config_pad>", CONTROL)
    for i in set(range(n_sp, size)) - {n_sp + 1, n_sp + 2}:
        assert (v.tokens[i], v.scores[i], v.toktypes[i]) == (f"[PAD{i}]".encode(), -10000.0, UNUSED)

    # a config smaller than the model cuts the table (and everything added past it)
    small = gguf_vocab.load_vocab(gguf_arch.ARCHS["gemma3_text"], tmp_path, {"vocab_size": 6}, gguf)
    assert len(small.tokens) == 6 and small.tokens[5] == b"<from_config>"


def test_bpe_table_types_added_tokens(tmp_path):
    from tokenizers import AddedToken, Tokenizer

    models.build_trained_tokenizer(tmp_path, "bpe-qwen2", 320)
    tk = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tk.add_tokens([AddedToken("plain_added", special=False), AddedToken("<unused9>", special=False),
                   AddedToken("\u2581mark", special=False)])
    tk.save(str(tmp_path / "tokenizer.json"))
    vocab = tk.get_vocab(with_added_tokens=True)
    size = len(vocab) + 5

    v = gguf_vocab.load_vocab(gguf_arch.ARCHS["qwen2"], tmp_path, {"vocab_size": size}, gguf)
    assert (v.model, v.scores, len(v.tokens), len(v.toktypes)) == ("gpt2", None, size, size)
    added = {t: vocab[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "plain_added", "<unused9>", "\u2581mark")}
    for text, i in vocab.items():
        if text not in added:
            assert (v.tokens[i], v.toktypes[i]) == (text, NORMAL)
    for text in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unused9>"):
        assert (v.tokens[added[text]], v.toktypes[added[text]]) == (text, CONTROL)
    assert (v.tokens[added["plain_added"]], v.toktypes[added["plain_added"]]) == ("plain_added", USER_DEFINED)
    assert (v.tokens[added["\u2581mark"]], v.toktypes[added["\u2581mark"]]) == (" mark", USER_DEFINED)
    for i in range(len(vocab), size):
        assert (v.tokens[i], v.toktypes[i]) == (f"[PAD{i}]", UNUSED)
    assert v.n_real == len(vocab)

    with pytest.raises(InputError, match="config.json says vocab_size"):
        gguf_vocab.load_vocab(gguf_arch.ARCHS["qwen2"], tmp_path, {"vocab_size": len(vocab) - 1}, gguf)
