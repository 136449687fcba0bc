"""Corpus → packed token blocks for continued pretraining, cached as memory-mapped Arrow.

Documents are tokenised with the fast (Rust) tokenizer in batches, in ``num_proc`` processes,
each framed as ``<s> document </s>``, then concatenated and cut into ``block_size`` blocks
(the tail of each batch of documents that does not fill a block is dropped, as in
transformers' ``run_clm``). The result is cached under a key made of the corpus files' content
hashes, the tokenizer files' hashes, the block size and the reading options, so changing any
of them builds a new cache: a stale cache (Chinese-LLaMA reused blocks of the wrong size or
tokenizer) cannot happen. A cache entry is written to a temporary directory and renamed into
place, so an interrupted build leaves nothing that looks complete.

``streaming=True`` tokenises and packs on the fly instead (corpora larger than the disk);
nothing is cached and the Trainer needs ``--max-steps``.

A build also counts the characters of the documents and the tokens of the framed stream
(BOS and EOS included), so a validation loss in nats per token converts to bits per character:
``loss / ln 2 * tokens / characters``. Several corpora (``--data zh/ --data en/
--data-weights ...``) are built and cached one by one and mixed afterwards
(:mod:`zhllama.mixing`), so changing a weight never rebuilds a corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from zhllama.chain import TOKENIZER_FILES
from zhllama.corpus import find_corpus_files, iter_documents
from zhllama.errors import ZhllamaError
from zhllama.outdir import clean_stale_siblings, temporary_sibling
from zhllama.provenance import file_sha256

# bump when the block format changes, so old caches are not reused
CACHE_FORMAT = 2
MAP_BATCH = 1000


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZHLLAMA_CACHE", Path.home() / ".cache" / "zhllama")) / "blocks"


@dataclass(frozen=True)
class BlockSpec:
    """How documents become blocks: everything that, when changed, must give another cache."""

    block_size: int
    text_field: str = "text"
    doc_sep: str = "line"
    bos_id: int | None = None
    eos_id: int | None = None


@dataclass
class BlocksInfo:
    """What one build (or cache hit) produced."""

    key: str
    path: str | None
    cache_hit: bool
    documents: int
    blocks: int
    tokens_in_blocks: int
    characters: int  # of the documents
    tokens: int  # of the framed documents (BOS + text + EOS), before cutting into blocks

    @property
    def tokens_per_character(self) -> float:
        return self.tokens / max(self.characters, 1)


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            digest.update(f"{name}:{file_sha256(path)}".encode())
    return digest.hexdigest()


def cache_key(files: Sequence[Path], tokenizer_dir: str | Path, spec: BlockSpec) -> str:
    """Content hash of the corpus files + tokenizer hash + block spec."""
    material = {
        "format": CACHE_FORMAT,
        "files": [file_sha256(path) for path in files],
        "tokenizer": tokenizer_hash(tokenizer_dir),
        "spec": asdict(spec),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _document_records(specs: list[str], text_field: str, doc_sep: str, key: str = ""):
    """Generator for ``datasets``: ``key`` only makes its fingerprint depend on the content."""
    for doc in iter_documents(specs, text_field=text_field, doc_sep=doc_sep):
        yield {"text": doc}


def _tokenize(batch: dict, tokenizer, bos_id: int | None, eos_id: int | None) -> dict:
    head = [bos_id] if bos_id is not None else []
    tail = [eos_id] if eos_id is not None else []
    encoded = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"input_ids": [head + ids + tail for ids in encoded], "characters": [len(text) for text in batch["text"]]}


def _pack(batch: dict, block_size: int) -> dict:
    stream = [token for ids in batch["input_ids"] for token in ids]
    usable = len(stream) // block_size * block_size
    return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}


def collate_blocks(features: list[dict]) -> dict:
    """Stack equal-length blocks; the labels are the inputs (the model shifts them)."""
    import torch

    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _unwrap_generation_error(e: Exception) -> None:
    """datasets wraps errors raised while reading the corpus; surface ours as they are."""
    cause = e
    while cause is not None:
        if isinstance(cause, ZhllamaError):
            raise cause from None
        cause = cause.__cause__ or cause.__context__


def _column_sum(dataset, column: str) -> int:
    """Sum of an int column, or of the lengths of a list column, without reading it into Python."""
    import pyarrow.compute as pc

    values = dataset.data.column(column)
    if hasattr(values.type, "value_type"):
        values = pc.list_value_length(values)
    return int(pc.sum(values).as_py() or 0)


def _spec_for(tokenizer, block_size: int, text_field: str, doc_sep: str) -> BlockSpec:
    return BlockSpec(block_size, text_field, doc_sep, tokenizer.bos_token_id, tokenizer.eos_token_id)


def build_blocks(
    specs: Sequence[str | Path],
    tokenizer,
    tokenizer_dir: str | Path,
    *,
    block_size: int,
    text_field: str = "text",
    doc_sep: str = "line",
    num_proc: int = 1,
    cache_dir: str | Path | None = None,
):
    """Packed blocks of ``specs`` as a memory-mapped ``datasets.Dataset`` (column ``input_ids``),
    built once per (content, tokenizer, block spec) and then loaded from the cache.

    Returns ``(dataset, BlocksInfo)``. Raises :class:`ZhllamaError` when the corpus has no text
    or fewer tokens than one block.
    """
    from datasets import Dataset, load_from_disk
    from datasets.exceptions import DatasetGenerationError

    specs = [str(s) for s in specs]
    files = find_corpus_files(specs)
    spec = _spec_for(tokenizer, block_size, text_field, doc_sep)
    key = cache_key(files, tokenizer_dir, spec)
    cache_root = (Path(cache_dir) if cache_dir else default_cache_dir()).expanduser().resolve()
    final = cache_root / key
    if (final / "zhllama_blocks.json").is_file():
        info = BlocksInfo(**{**json.loads((final / "zhllama_blocks.json").read_text()), "cache_hit": True})
        return load_from_disk(str(final / "blocks")), info

    clean_stale_siblings(final)  # what a killed build left behind
    work = temporary_sibling(final)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        try:
            texts = Dataset.from_generator(
                _document_records,
                gen_kwargs={"specs": specs, "text_field": text_field, "doc_sep": doc_sep, "key": key},
                cache_dir=str(work / "hf"),
            )
        except DatasetGenerationError as e:
            _unwrap_generation_error(e)
            raise
        tokenized = texts.map(
            _tokenize,
            batched=True,
            batch_size=MAP_BATCH,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["text"],
            fn_kwargs={"tokenizer": tokenizer, "bos_id": spec.bos_id, "eos_id": spec.eos_id},
            cache_file_name=str(work / "tokenized.arrow"),
            new_fingerprint=f"{key}-tokenized",
            desc="tokenising",
        )
        blocks = tokenized.map(
            _pack,
            batched=True,
            batch_size=MAP_BATCH,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["characters"],
            fn_kwargs={"block_size": block_size},
            cache_file_name=str(work / "packed.arrow"),
            new_fingerprint=f"{key}-packed",
            desc=f"packing into blocks of {block_size}",
        )
        tokens, characters = _column_sum(tokenized, "input_ids"), _column_sum(tokenized, "characters")
        if len(blocks) == 0:
            raise ZhllamaError(
                f"corpus {', '.join(specs)} gives {tokens} tokens, fewer than one block of {block_size}; "
                "add text or lower --block-size"
            )
        blocks.save_to_disk(str(work / "blocks"))
        info = BlocksInfo(key, str(final), False, len(texts), len(blocks), len(blocks) * block_size, characters, tokens)
        del texts, tokenized, blocks
        shutil.rmtree(work / "hf", ignore_errors=True)
        for name in ("tokenized.arrow", "packed.arrow"):
            (work / name).unlink(missing_ok=True)
        (work / "zhllama_blocks.json").write_text(json.dumps({k: v for k, v in asdict(info).items() if k != "cache_hit"}))
        try:
            work.rename(final)
        except OSError:
            if not (final / "zhllama_blocks.json").is_file():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_from_disk(str(final / "blocks")), info


def stream_blocks(
    specs: Sequence[str | Path],
    tokenizer,
    *,
    block_size: int,
    text_field: str = "text",
    doc_sep: str = "line",
):
    """Packed blocks produced on the fly (``datasets.IterableDataset``): no cache, no length."""
    from datasets import IterableDataset

    specs = [str(s) for s in specs]
    find_corpus_files(specs)  # fail now, not at the first training step, on a bad path
    spec = _spec_for(tokenizer, block_size, text_field, doc_sep)
    documents = IterableDataset.from_generator(
        _document_records, gen_kwargs={"specs": specs, "text_field": text_field, "doc_sep": doc_sep}
    )
    tokenized = documents.map(
        _tokenize,
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer, "bos_id": spec.bos_id, "eos_id": spec.eos_id},
    )
    return tokenized.map(_pack, batched=True, batch_size=MAP_BATCH, remove_columns=["characters"], fn_kwargs={"block_size": block_size})
