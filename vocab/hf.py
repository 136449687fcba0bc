"""Writing a Hugging Face tokenizer that encodes exactly like a SentencePiece BPE model.

Why we build ``tokenizer.json`` ourselves: loading a directory that holds only
``tokenizer.model``, transformers 5.x converts it on the fly and gets LLaMA-style models wrong
(no dummy prefix; merges in an order SentencePiece does not use). We translate the protobuf
directly into a ``tokenizers`` pipeline that mirrors SentencePiece's own steps:

1. normalise: (precompiled charsmap, if any) → (collapse/strip spaces if
   ``remove_extra_whitespaces``) → prepend ``▁`` (``add_dummy_prefix``; not on empty text) →
   spaces to ``▁`` (``escape_whitespaces``). Nothing splits the text into words: SentencePiece
   BPE merges across the whole normalised string, so the HF model sees one "word" too.
2. BPE: SentencePiece repeatedly merges the adjacent pair whose concatenation is a piece with
   the highest score (ties: leftmost). ``tokenizers`` merges by rank in a list, so the list holds
   every split ``(left, right)`` of every mergeable piece whose halves are pieces, ranked by
   the merged piece's score (best first). Pieces with equal scores are ranked by id (see
   :func:`hf_merges` for the one group where that matters, LLaMA's whitespace runs).
3. characters that are not pieces fall back to ``<0xXX>`` byte pieces (``byte_fallback``) or to
   ``<unk>`` (consecutive unknowns fused, as SentencePiece does).
4. BOS is added by the post-processor (``add_bos_token=True``, ``add_eos_token=False``), as
   LLaMA's tokenizer does; decoding undoes ``▁``, byte pieces and the dummy prefix.

Known differences, both outside LLaMA-style use:
- control pieces (``<s>``, ``</s>``, ``<unk>``) are special tokens: HF matches their literal text
  in input, SentencePiece does not. Chat templates rely on it; pass
  ``split_special_tokens=True`` when encoding to treat such text literally;
- user-defined pieces are matched, but the text after one gets a dummy ``▁`` (see
  :func:`build_hf_tokenizer`); LLaMA's tokenizer and our merges have no user-defined pieces;
- without byte fallback, HF decodes ``<unk>`` as nothing (skipped) or ``<unk>``, SentencePiece
  as `` ⁇ ``; encoding agrees.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from zhllama.errors import ZhllamaError
from zhllama.vocab.spmodel import (
    CONTROL,
    SPACE,
    TOKENIZER_MODEL,
    UNKNOWN,
    USER_DEFINED,
    ModelProto,
    bpe_symbol_pieces,
    has_byte_pieces,
    load_sp_proto,
    require_bpe_model,
)

# The class AutoTokenizer instantiates. It must load tokenizer.json as written: transformers 5's
# LlamaTokenizer has its own __init__ that rebuilds the normaliser/pre-tokenizer from vocab and
# merges, while PreTrainedTokenizerFast (= TokenizersBackend) takes the file verbatim. The name
# also resolves in transformers 4.x, vLLM and TGI.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
DEFAULT_MODEL_MAX_LENGTH = 4096


def hf_merges(proto: ModelProto) -> list[tuple[str, str]]:
    """Every merge SentencePiece's BPE can perform, in the order it prefers them.

    For each mergeable piece (NORMAL / USER_DEFINED / UNUSED), every way of cutting it into two
    mergeable pieces is a merge. Order: higher score of the merged piece first; equal scores by
    the merged piece's id, then by a shorter left half. Among equal scores SentencePiece picks
    the leftmost pair, which a rank list cannot express in general; in LLaMA the only tie is
    its 16 whitespace-run pieces (all -1e9), whose merges only ever compete with each other,
    and the parity tests (llama.cpp vectors, runs of 1..n spaces) pin that this order matches.
    """
    symbols = bpe_symbol_pieces(proto)
    user_defined = {p.piece for p in proto.pieces if p.type == USER_DEFINED}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, piece_id in symbols.items():
        if len(piece) < 2 or piece in user_defined:
            continue  # user-defined pieces are matched whole before BPE, never merged
        score = proto.pieces[piece_id].score
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in symbols and right in symbols and left not in user_defined and right not in user_defined:
                ranked.append((-score, piece_id, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def unbuildable_pieces(proto: ModelProto) -> list[str]:
    """Multi-character mergeable pieces with no split into two mergeable pieces.

    SentencePiece itself can still produce some of them (its BPE starts from characters even
    when a character is not a piece), but the HF tokenizer cannot, so a merge must not add any.
    """
    symbols = bpe_symbol_pieces(proto)
    user_defined = {p.piece for p in proto.pieces if p.type == USER_DEFINED}
    missing = []
    for piece in symbols:
        if len(piece) < 2 or piece in user_defined:
            continue
        if not any(piece[:cut] in symbols and piece[cut:] in symbols for cut in range(1, len(piece))):
            missing.append(piece)
    return missing


def _normalizer(proto: ModelProto) -> normalizers.Normalizer | None:
    spec = proto.normalizer_spec
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # As SentencePiece's normaliser: leading spaces dropped, runs of spaces collapsed (spaces
        # only, not tabs), then trailing ▁ dropped after escaping, so a literal ▁ at the end goes too
        steps.append(normalizers.Replace(Regex("\\A +"), ""))
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
        steps.append(normalizers.Replace(Regex("[ \u2581]+\\z"), ""))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))  # tokenizers skips this on empty text, like SP
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps) if steps else None


def _decoder(proto: ModelProto) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.remove_extra_whitespaces:
        steps.append(decoders.Strip(" ", 1 << 30, 0))  # SentencePiece drops every leading space then
    elif proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # after Fuse: one leading space of the whole text
    return decoders.Sequence(steps)


def special_piece(proto: ModelProto, piece_id: int) -> str | None:
    """The text of a special piece by id, or None when the model has no such piece (id -1)."""
    if 0 <= piece_id < len(proto.pieces):
        return proto.pieces[piece_id].piece
    return None


def build_hf_tokenizer(proto: ModelProto) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` equivalent of a SentencePiece BPE model (see module doc)."""
    require_bpe_model(proto, "SentencePiece model")
    spec = proto.trainer_spec
    unk = special_piece(proto, spec.unk_id)
    if unk is None:
        raise ZhllamaError("SentencePiece model has no unknown piece (unk_id); cannot build an HF tokenizer")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    model = BPE(
        vocab=vocab,
        merges=hf_merges(proto),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=bool(spec.byte_fallback) and has_byte_pieces(proto),
        dropout=None,
    )
    tokenizer = Tokenizer(model)
    norm = _normalizer(proto)
    if norm is not None:
        tokenizer.normalizer = norm
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = _decoder(proto)

    added = []
    for i, p in enumerate(proto.pieces):
        if p.type in (CONTROL, UNKNOWN):
            added.append(AddedToken(p.piece, special=True, normalized=False))
        elif p.type == USER_DEFINED:
            # Known gap: SentencePiece matches user-defined pieces inside the normalised text.
            # tokenizers would normalise the piece itself first (prepending the dummy ▁), so we
            # match raw text instead; the text right after such a piece then gets a dummy ▁
            # that SentencePiece does not add. LLaMA-style models and our merges have none.
            added.append(AddedToken(p.piece, special=False, normalized=False))
    tokenizer.add_tokens(added)

    bos = special_piece(proto, spec.bos_id)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, spec.bos_id)],
        )
    return tokenizer


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def hf_tokenizer_config(proto: ModelProto, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> tuple[dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json) contents for a SentencePiece model."""
    spec = proto.trainer_spec
    specials = {
        "bos_token": special_piece(proto, spec.bos_id),
        "eos_token": special_piece(proto, spec.eos_id),
        "unk_token": special_piece(proto, spec.unk_id),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    decoder = {
        str(i): {**_token_entry(p.piece), "special": p.type != USER_DEFINED}
        for i, p in enumerate(proto.pieces)
        if p.type in (CONTROL, UNKNOWN, USER_DEFINED)
    }
    config = {
        "tokenizer_class": TOKENIZER_CLASS,
        "add_bos_token": "bos_token" in specials,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        **specials,
        "pad_token": None,  # never a pad token: pad with attention masks (see docs/vocab.md)
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "padding_side": "right",
    }
    return config, {k: _token_entry(v) for k, v in specials.items()}


def save_hf_tokenizer(
    sp_model_path: str | Path,
    out_dir: str | Path,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` for a
    SentencePiece BPE model into ``out_dir``, and copy the model there as ``tokenizer.model``.

    ``AutoTokenizer.from_pretrained(out_dir)`` then encodes like ``sp.encode(text)`` with BOS in
    front, on any text without literal control-token strings (``<s>``, ``</s>``), and decodes back.
    Works for any LLaMA-style model (byte fallback, split digits, identity normaliser, dummy
    prefix) and for merged vocabularies. Raises :class:`ZhllamaError` for unigram models.
    """
    source = Path(sp_model_path)
    proto = load_sp_proto(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / TOKENIZER_MODEL
    if source.is_file() and (not target.exists() or not target.samefile(source)):
        shutil.copyfile(source, target)
    build_hf_tokenizer(proto).save(str(out / "tokenizer.json"))
    config, special_map = hf_tokenizer_config(proto, model_max_length=model_max_length)
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        with open(out / name, "w", encoding="utf-8") as fh:
            json.dump(content, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
