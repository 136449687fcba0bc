"""Corpus → packed blocks: BOS/EOS framing, exact packing, a cache keyed by content +
tokenizer + block size (never stale), parallel and streaming builds giving the same blocks."""

from __future__ import annotations

import pytest

from zhllama.demo import tiny
from zhllama.chain import load_tokenizer
from zhllama.errors import ZhllamaError
from zhllama.pretrain.data import build_blocks, collate_blocks, stream_blocks


@pytest.fixture(scope="module")
def tokenizer(base_tokenizer_dir):
    return load_tokenizer(base_tokenizer_dir)


@pytest.fixture
def corpus(tmp_path):
    return tiny.write_lines(tmp_path / "corpus.txt", tiny.chinese_sentences(200, seed=3) + tiny.english_sentences(200, seed=3))


def expected_stream(path, tokenizer) -> list[int]:
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids += [tokenizer.bos_token_id, *tokenizer(line, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return ids


def test_blocks_are_the_framed_documents_cut_into_block_size(tmp_path, corpus, tokenizer, base_tokenizer_dir):
    blocks, info = build_blocks([corpus], tokenizer, base_tokenizer_dir, block_size=48, cache_dir=tmp_path / "cache")
    stream = expected_stream(corpus, tokenizer)
    flat = [t for block in blocks["input_ids"] for t in block]
    assert all(len(block) == 48 for block in blocks["input_ids"])
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 48  # one batch of 400 docs: one tail dropped
    assert info.documents == 400 and info.blocks == len(blocks) and not info.cache_hit
    batch = collate_blocks([blocks[0], blocks[1]])
    assert batch["input_ids"].shape == (2, 48) and (batch["labels"] == batch["input_ids"]).all()


def test_cache_hits_only_for_the_same_content_tokenizer_and_block_size(tmp_path, corpus, tokenizer, base_tokenizer_dir):
    cache = tmp_path / "cache"
    first, info1 = build_blocks([corpus], tokenizer, base_tokenizer_dir, block_size=32, cache_dir=cache)
    again, info2 = build_blocks([corpus], tokenizer, base_tokenizer_dir, block_size=32, cache_dir=cache)
    assert info2.cache_hit and info2.key == info1.key and again["input_ids"] == first["input_ids"]
    _, other_size = build_blocks([corpus], tokenizer, base_tokenizer_dir, block_size=64, cache_dir=cache)
    assert not other_size.cache_hit and other_size.key != info1.key

    other_tok_dir = tiny.write_base_tokenizer(tmp_path / "tok2", seed=5)
    _, other_tok = build_blocks([corpus], load_tokenizer(other_tok_dir), other_tok_dir, block_size=32, cache_dir=cache)
    assert not other_tok.cache_hit and other_tok.key != info1.key

    corpus.write_text(corpus.read_text(encoding="utf-8") + "新的一行文字\n", encoding="utf-8")  # same path, new content
    _, edited = build_blocks([corpus], tokenizer, base_tokenizer_dir, block_size=32, cache_dir=cache)
    assert not edited.cache_hit and edited.key != info1.key
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_parallel_and_streaming_builds_give_the_same_blocks(tmp_path, corpus, tokenizer, base_tokenizer_dir):
    serial, _ = build_blocks([corpus], tokenizer, base_tokenizer_dir, block_size=40, cache_dir=tmp_path / "a")
    parallel, _ = build_blocks([corpus], tokenizer, base_tokenizer_dir, block_size=40, num_proc=2, cache_dir=tmp_path / "b")
    streamed = [row["input_ids"] for row in stream_blocks([corpus], tokenizer, block_size=40)]
    assert streamed == serial["input_ids"]
    # the token stream, built here: <s> text </s> per non-empty line
    stream = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if line.strip():
            stream += [tokenizer.bos_token_id, *tokenizer(line.strip(), add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert [i for block in serial["input_ids"] for i in block] == stream[: len(serial) * 40]
    # each parallel shard packs its own documents and drops its own tail: its blocks are
    # consecutive, non-overlapping windows of the stream, in order, at most a block or two fewer
    text = " ".join(map(str, stream)) + " "
    position = 0
    for block in parallel["input_ids"]:
        window = " ".join(map(str, block)) + " "
        found = text.find(window, position)
        assert found >= position and (found == 0 or text[found - 1] == " ")
        position = found + len(window)
    assert len(serial) - 2 <= len(parallel) <= len(serial)


def test_corpus_without_text_or_shorter_than_a_block(tmp_path, tokenizer, base_tokenizer_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(ZhllamaError, match="empty.txt"):
        build_blocks([empty], tokenizer, base_tokenizer_dir, block_size=32, cache_dir=tmp_path / "cache")
    short = tiny.write_lines(tmp_path / "short.txt", ["你好"])
    with pytest.raises(ZhllamaError, match="fewer than one block of 512"):
        build_blocks([short], tokenizer, base_tokenizer_dir, block_size=512, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir()]
