"""Packed pretraining blocks without attention across documents (``--no-cross-document-attention``).

A block of ``zhllama.pretrain.data`` is a slice of the stream ``<s> doc </s> <s> doc </s> ...``,
so by default a token attends to the end of the previous document, as in transformers'
``run_clm`` and Chinese-LLaMA. :class:`DocumentBlockCollator` keeps the blocks as they are (no
padding, no wasted tokens) but gives each document its own positions: ``position_ids`` restart
at 0 where a document starts, and no attention mask is passed. transformers' LLaMA attention
reads those restarts as document boundaries: SDPA and eager build a block-diagonal causal mask
(``find_packed_sequence_indices``), flash-attention 2 runs its variable-length kernel, but only
on a batch of one row (``_is_packed_sequence``), so for it the collator concatenates the batch
into one row (as ``DataCollatorWithFlattening`` does); for SDPA it keeps the rows, since one
long row would cost attention over the whole batch's length squared. The first token of each
document is not a target of the one before (label -100), so every document's tokens are scored
exactly as if the document stood alone (``tests/test_packing.py`` checks the logits).

Where documents start inside a block: from the ``document_starts`` column when the blocks carry
one (:func:`pack_documents` computes it while packing: exact), else from the framing tokens (a
``<s>`` begins a document, a ``</s>`` ends one), which is exact unless a document's text itself
contains the literal special-token text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from zhllama.args import Options
from zhllama.errors import ZhllamaError
from zhllama.options import option

STARTS_COLUMN = "document_starts"


@dataclass(kw_only=True)
class PackingArgs(Options):
    """Whether tokens of a packed pretraining block attend to the documents before theirs."""

    cross_document_attention: bool = option(
        True,
        help="let tokens attend across document boundaries inside a block (--no-cross-document-attention: "
        "positions restart at each document and attention stays inside it)",
    )


def pack_documents(batch: dict, block_size: int) -> dict:
    """Concatenate a batch of tokenised documents and cut the stream into ``block_size`` blocks
    (the tail that does not fill a block is dropped), recording where each document starts
    inside each block (offset 0 always counts: a block starts a document or a fragment of one)."""
    stream: list[int] = []
    boundaries: list[int] = []
    for ids in batch["input_ids"]:
        boundaries.append(len(stream))
        stream.extend(ids)
    usable = len(stream) // block_size * block_size
    blocks, starts = [], []
    boundary = iter(boundaries + [usable])
    next_start = next(boundary)
    for offset in range(0, usable, block_size):
        inside = [0]
        while next_start < offset + block_size:
            if next_start > offset:
                inside.append(next_start - offset)
            next_start = next(boundary, usable + block_size)
        blocks.append(stream[offset : offset + block_size])
        starts.append(inside)
    return {"input_ids": blocks, STARTS_COLUMN: starts}


def document_starts_from_framing(ids: Sequence[int], bos_id: int | None, eos_id: int | None) -> list[int]:
    """Offsets where a document starts in a block framed ``<s> doc </s>``: 0, every ``<s>``, and
    every token after a ``</s>``."""
    if bos_id is None and eos_id is None:
        raise ZhllamaError(
            "--no-cross-document-attention needs document boundaries: the tokenizer has neither a BOS nor an EOS token "
            "and the blocks carry no document_starts column"
        )
    starts = {0}
    for i, token in enumerate(ids):
        if token == bos_id:
            starts.add(i)
        if token == eos_id and i + 1 < len(ids):
            starts.add(i + 1)
    return sorted(starts)


def positions_from_starts(length: int, starts: Sequence[int]) -> list[int]:
    """Position ids 0, 1, ... restarting at every start offset."""
    positions, current = [], 0
    start_set = set(starts)
    for i in range(length):
        if i in start_set:
            current = 0
        positions.append(current)
        current += 1
    return positions


@dataclass
class DocumentBlockCollator:
    """Batches equal-length blocks with ``position_ids`` restarting at each document and the first
    token of each document masked from the labels; ``flatten=True`` (for flash-attention 2) puts
    the whole batch in one row."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    flatten: bool = False

    def starts_of(self, feature: dict) -> list[int]:
        if feature.get(STARTS_COLUMN) is not None:
            return sorted(set([0, *(int(s) for s in feature[STARTS_COLUMN])]))
        return document_starts_from_framing(feature["input_ids"], self.bos_token_id, self.eos_token_id)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        input_ids, positions, labels = [], [], []
        for feature in features:
            ids = [int(t) for t in feature["input_ids"]]
            starts = self.starts_of(feature)
            input_ids.append(ids)
            positions.append(positions_from_starts(len(ids), starts))
            # a document's first token is not predicted from the document before it
            labels.append([-100 if i in starts else t for i, t in enumerate(ids)])
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
        if self.flatten:
            batch = {key: [sum(rows, [])] for key, rows in batch.items()}
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def block_collator(tokenizer, *, cross_document_attention: bool, attention: str = "sdpa"):
    """The collator for pretraining blocks: plain stacking (attention across documents) or
    :class:`DocumentBlockCollator` (flattened for flash-attention 2)."""
    if cross_document_attention:
        from zhllama.pretrain.data import collate_blocks

        return collate_blocks
    return DocumentBlockCollator(tokenizer.bos_token_id, tokenizer.eos_token_id, flatten=attention == "flash_attention_2")
