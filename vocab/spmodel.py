"""Reading SentencePiece models and classifying their pieces.

A SentencePiece model is a protobuf (``ModelProto``): an ordered list of pieces (text, score,
type) plus the trainer and normaliser settings. The id of a piece is its position. Everything
in ``zhllama.vocab`` that inspects or edits a tokenizer goes through the helpers here, so the
rules ("what counts as CJK", "what SentencePiece's BPE may produce") live in one place.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from zhllama.errors import ZhllamaError

ModelProto = sp_pb2.ModelProto
Piece = sp_pb2.ModelProto.SentencePiece
SPACE = "\u2581"  # ▁, SentencePiece's visible space

# ModelProto.SentencePiece.Type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE, UNUSED = 1, 2, 3, 4, 6, 5
# TrainerSpec.ModelType values
UNIGRAM, BPE = 1, 2
TOKENIZER_MODEL = "tokenizer.model"


def resolve_sp_model_path(path_or_dir: str | Path, *, role: str = "tokenizer") -> Path:
    """The SentencePiece model file named by a path: the file itself, or DIR/tokenizer.model.

    A directory without ``tokenizer.model`` (e.g. a Llama-3 checkpoint that ships only
    ``tokenizer.json``) is rejected with a line that says what is supported.
    """
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        candidate = path / TOKENIZER_MODEL
        if candidate.is_file():
            return candidate
        found = ", ".join(sorted(p.name for p in path.iterdir() if p.name.startswith("tokenizer")))
        what = f" (it has {found})" if found else ""
        raise ZhllamaError(
            f"{path}: no {TOKENIZER_MODEL} in this {role} directory{what}; only SentencePiece BPE "
            "tokenizers (LLaMA / Llama-2 style tokenizer.model) are supported"
        )
    if not path.exists():
        raise ZhllamaError(f"{path}: no such {role} file or directory")
    if not path.is_file():
        raise ZhllamaError(f"{path}: not a regular file")
    return path


def load_sp_proto(path_or_dir: str | Path, *, role: str = "tokenizer") -> ModelProto:
    """Parse a SentencePiece model (file or directory holding ``tokenizer.model``)."""
    path = resolve_sp_model_path(path_or_dir, role=role)
    proto = ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError (and others) for non-model bytes
        raise ZhllamaError(f"{path}: not a SentencePiece model ({type(e).__name__}); pass a tokenizer.model file") from e
    if not proto.pieces:
        raise ZhllamaError(f"{path}: not a SentencePiece model (no pieces); pass a tokenizer.model file")
    return proto


def load_sp_model(path_or_dir: str | Path) -> spm.SentencePieceProcessor:
    """A ``SentencePieceProcessor`` for a model file or a directory holding ``tokenizer.model``."""
    path = resolve_sp_model_path(path_or_dir)
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(path.read_bytes())
    except (RuntimeError, OSError) as e:
        raise ZhllamaError(f"{path}: not a loadable SentencePiece model: {' '.join(str(e).split())}") from e
    return processor


def processor_from_proto(proto: ModelProto) -> spm.SentencePieceProcessor:
    """A ``SentencePieceProcessor`` for an in-memory (e.g. just merged) model."""
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return processor


def require_bpe_model(proto: ModelProto, where: str | Path) -> None:
    """Refuse anything but a SentencePiece BPE model with byte pieces where it says it has them."""
    if proto.trainer_spec.model_type != BPE:
        kind = {UNIGRAM: "unigram"}.get(proto.trainer_spec.model_type, f"type {proto.trainer_spec.model_type}")
        raise ZhllamaError(
            f"{where}: a SentencePiece {kind} model; only SentencePiece BPE tokenizers "
            "(LLaMA / Llama-2 style tokenizer.model) are supported here"
        )
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ZhllamaError(f"{where}: treat_whitespace_as_suffix models are not supported (LLaMA-style models prefix ▁)")


def is_cjk_char(ch: str) -> bool:
    """Han ideographs (all CJK blocks), CJK symbols and punctuation, and full-width forms."""
    cp = ord(ch)
    return (
        0x3000 <= cp <= 0x303F  # CJK symbols and punctuation: 。、「」〈〉…
        or 0x3400 <= cp <= 0x4DBF  # extension A
        or 0x4E00 <= cp <= 0x9FFF  # unified ideographs
        or 0xF900 <= cp <= 0xFAFF  # compatibility ideographs
        or 0xFE30 <= cp <= 0xFE4F  # CJK compatibility forms (vertical punctuation)
        or 0xFF00 <= cp <= 0xFFEF  # half-width and full-width forms: ，！？（）ＡＢ１２
        or 0x20000 <= cp <= 0x3134F  # extensions B..G
        or 0x2E80 <= cp <= 0x2FDF  # radicals
    )


def is_han_char(ch: str) -> bool:
    """A Han ideograph (what "tokens per Han character" counts)."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0xF900 <= cp <= 0xFAFF
        or 0x20000 <= cp <= 0x3134F
    )


# Punctuation Chinese text borrows from the General Punctuation block: “”‘’…—·. Allowed in an
# added piece only next to a real CJK character, so the piece still needs CJK text to match.
CJK_COMPANION_PUNCTUATION = frozenset("\u201c\u201d\u2018\u2019\u2026\u2014\u00b7")


def is_cjk_piece(piece: str) -> bool:
    """A piece that can only match text containing a CJK character.

    Made of CJK characters (and the punctuation Chinese uses with them, e.g. ``。”``), with at
    least one CJK character and at most one leading ▁. Adding only such pieces keeps text
    without CJK characters encoding exactly as before.
    """
    body = piece[1:] if piece.startswith(SPACE) else piece
    return (
        any(is_cjk_char(ch) for ch in body)
        and all(is_cjk_char(ch) or ch in CJK_COMPANION_PUNCTUATION for ch in body)
    )


def piece_text(piece: str) -> str:
    """The raw text a piece stands for (▁ back to a space)."""
    return piece.replace(SPACE, " ")


def bpe_symbol_pieces(proto: ModelProto) -> dict[str, int]:
    """Pieces SentencePiece's BPE can build by merging: NORMAL, USER_DEFINED and UNUSED.

    Control, unknown and byte pieces live in a separate table in SentencePiece and are never
    the result of a merge, so the literal text ``<s>`` or ``<0x41>`` is just characters.
    """
    return {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (NORMAL, USER_DEFINED, UNUSED)}


def has_byte_pieces(proto: ModelProto) -> bool:
    names = {p.piece for p in proto.pieces if p.type == BYTE}
    return len(names) == 256


def is_printable_piece(piece: str) -> bool:
    """False for pieces holding control/format characters we should not add blindly."""
    return all(unicodedata.category(ch)[0] != "C" for ch in piece)
