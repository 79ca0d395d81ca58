"""Tokenizer -> GGUF vocabulary, special tokens and the embedded spectrum template.

Byte-level BPE (Llama 3, Qwen3) is read from tokenizer.json; SentencePiece (Gemma 3) from
tokenizer.model, whose protobuf is parsed here so that converting needs no sentencepiece.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from spectrum_local.errors import InputError
from spectrum_local.formats import Format

from .families import Family

T = gguf.TokenType
# SpecialVocab warns about tokenizer post-processor templates it half-understands; the BOS/EOS
# behaviour it infers from them is overridden from the spectrum format below.
logging.getLogger("gguf.vocab").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Vocab:
    model: str                  # llama.cpp tokenizer model: "llama" (SentencePiece) or "gpt2"
    pre: str                    # llama.cpp pre-tokenizer name
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # SentencePiece only
    merges: list[str] | None = None  # BPE only: "a b" pairs, as llama.cpp reads them

    def token_id(self, text: str) -> int | None:
        try:
            return self.tokens.index(text)
        except ValueError:
            return None


def load_vocab(folder: Path, family: Family, n_vocab: int) -> Vocab:
    """The vocabulary padded to ``n_vocab`` entries (the embedding's row count)."""
    # parsed once here (11 MB for Qwen3, 33 MB for Gemma 3), not once per use
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if family.tokenizer == "spm":
        tokens, types, scores = _sentencepiece(folder / "tokenizer.model")
        vocab = Vocab("llama", "default", tokens, types, scores)
    else:
        if tokenizer is None:
            raise InputError(f"{folder}: no tokenizer.json")
        tokens, types, merges = _byte_level_bpe(path, tokenizer["model"])
        vocab = Vocab("gpt2", family.bpe_pre or "default", tokens, types, None, merges)
    _apply_added_tokens(vocab, folder, tokenizer)
    if len(vocab.tokens) > n_vocab:
        raise InputError(f"the tokenizer has {len(vocab.tokens)} tokens but the embedding only "
                         f"{n_vocab} rows")
    for i in range(len(vocab.tokens), n_vocab):  # rows no token uses
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(T.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    return vocab


def write_vocab(w: gguf.GGUFWriter, vocab: Vocab, folder: Path, fmt: Format) -> None:
    """Tokens, special ids, add-BOS, the spectrum chat template and ``spectrum.format``."""
    for marker in fmt.control_tokens:
        tid = vocab.token_id(marker)
        if tid is None or vocab.types[tid] != T.CONTROL:
            raise InputError(f"the tokenizer has no control token {marker!r}, which the "
                             f"{fmt.name} format needs; is --format right?")
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
        w.add_add_space_prefix(False)  # Gemma's SentencePiece adds no dummy prefix
    # The merges read above are given to SpecialVocab: its own reading converts them a
    # character at a time (about 1 s for Qwen3). It still looks for merges.txt when there are none.
    special = gguf.SpecialVocab(folder, load_merges=vocab.model == "gpt2" and not vocab.merges,
                                n_vocab=len(vocab.tokens))
    if vocab.merges:
        special.merges = vocab.merges
    special.chat_template = fmt.chat_template
    # The format, not the tokenizer files, decides BOS: the runtime's prompt must match training.
    special.add_special_token["bos"] = fmt.bos is not None
    special.add_special_token["eos"] = False
    if fmt.bos is not None:
        special.special_token_ids["bos"] = vocab.token_id(fmt.bos)
    special.add_to_gguf(w, quiet=True)
    w.add_eot_token_id(vocab.token_id(fmt.end_of_output))
    w.add_string("spectrum.format", fmt.name)


def _byte_level_bpe(path: Path, model: dict) -> tuple[list[str], list[int], list[str]]:
    if model.get("type") != "BPE":
        raise InputError(f"{path}: expected a BPE tokenizer, found {model.get('type')}")
    by_id = {i: tok for tok, i in model["vocab"].items()}
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [T.NORMAL if i in by_id else T.UNUSED for i in range(n)]
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):  # [a, b] pairs (transformers >= 4.45)
        # "a b" strings, a space inside a part spelled U+0120 as gguf.SpecialVocab does
        merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    return tokens, types, merges


def _apply_added_tokens(vocab: Vocab, folder: Path, tokenizer: dict | None) -> None:
    """Added tokens (turn markers, BOS, ...) as CONTROL if special, else USER_DEFINED."""
    added: dict[int, dict] = {}
    if tokenizer is not None:
        added.update({t["id"]: t for t in tokenizer.get("added_tokens", [])})
    if (folder / "tokenizer_config.json").is_file():
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        added.update({int(i): t for i, t in cfg.get("added_tokens_decoder", {}).items()})
    for tid, info in sorted(added.items()):
        while len(vocab.tokens) <= tid:
            vocab.tokens.append(f"[PAD{len(vocab.tokens)}]")
            vocab.types.append(T.UNUSED)
            if vocab.scores is not None:
                vocab.scores.append(-1000.0)
        text = info["content"]
        if info.get("special") or (text.startswith("<|") and text.endswith("|>")):
            vocab.types[tid] = T.CONTROL
        else:
            # llama.cpp matches user-defined tokens in raw text, so ▁ must be a real space.
            text = text.replace("\u2581", " ")
            vocab.types[tid] = T.USER_DEFINED
        vocab.tokens[tid] = text
        if vocab.scores is not None:
            vocab.scores[tid] = -1000.0


# --- SentencePiece's ModelProto, read without the sentencepiece package --------------------
# ModelProto { repeated SentencePiece pieces = 1; ... }
# SentencePiece { string piece = 1; float score = 2; Type type = 3 [default = NORMAL]; }
# The Type enum values are the same numbers as gguf.TokenType.

def _sentencepiece(path: Path) -> tuple[list[str], list[int], list[float]]:
    if not path.is_file():
        raise InputError(f"{path.parent}: no tokenizer.model (Gemma's SentencePiece model)")
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    try:
        for field, value in _fields(path.read_bytes()):
            if field != 1:
                continue
            piece = dict(_fields(value))
            tokens.append(piece.get(1, b"").decode("utf-8"))
            scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
            types.append(piece.get(3, T.NORMAL))
    except (IndexError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a SentencePiece model ({e})") from None
    if not tokens:
        raise InputError(f"{path}: no pieces; not a SentencePiece model")
    return tokens, types, scores


def _fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise KeyError(f"unsupported protobuf wire type {wire}")
        yield field, value


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
