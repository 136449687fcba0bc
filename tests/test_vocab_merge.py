"""``zhllama vocab merge``: the invariants of the merge, on self-made tokenizers.

The base is the session's tiny LLaMA-style tokenizer (``base_tokenizer_dir`` in conftest); the
Chinese model is trained here in a couple of seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vocab_fixtures import fuzz_texts, train_sp, write_model
from zhllama.demo import tiny
from zhllama.errors import ZhllamaError
from zhllama.chain import load_tokenizer
from zhllama.vocab import MergeOptions, TrainOptions, load_sp_model, load_sp_proto, merge_tokenizers, train_sp_model
from zhllama.vocab.merge import isolated_encodings
from zhllama.vocab.spmodel import NORMAL, is_cjk_piece


@pytest.fixture(scope="module")
def zh_model(tmp_path_factory, chinese_corpus) -> Path:
    out = tmp_path_factory.mktemp("zh_sp") / "sp"
    train_sp_model(TrainOptions(corpus=[str(chinese_corpus)], out=out, vocab_size=4000, threads=2))
    return out / "chinese_sp.model"


@pytest.fixture(scope="module")
def merged(tmp_path_factory, base_tokenizer_dir, zh_model) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("merged") / "tok"
    report = merge_tokenizers(MergeOptions(base=base_tokenizer_dir, add=[zh_model], out=out))
    return report.out, report


def test_base_pieces_and_specs_byte_identical(merged, base_tokenizer_dir):
    out, report = merged
    base, new = load_sp_proto(base_tokenizer_dir), load_sp_proto(out)
    assert report.base_pieces_changed == 0 and report.added > 500
    assert [p.SerializeToString() for p in new.pieces[: len(base.pieces)]] == [p.SerializeToString() for p in base.pieces]
    assert new.trainer_spec.SerializeToString() == base.trainer_spec.SerializeToString()
    assert new.normalizer_spec.SerializeToString() == base.normalizer_spec.SerializeToString()
    assert len(new.pieces) == report.merged_pieces == len(base.pieces) + report.added


def test_added_pieces_are_cjk_unique_and_rank_below_base(merged, base_tokenizer_dir):
    out, _ = merged
    base, new = load_sp_proto(base_tokenizer_dir), load_sp_proto(out)
    added = new.pieces[len(base.pieces) :]
    names = [p.piece for p in new.pieces]
    assert len(set(names)) == len(names)
    assert all(p.type == NORMAL and is_cjk_piece(p.piece) for p in added)
    scores = [p.score for p in added]
    assert max(scores) < min(p.score for p in base.pieces)
    assert all(a > b for a, b in zip(scores, scores[1:]))  # distinct, in the added model's order


def test_added_pieces_follow_the_added_models_order(merged, base_tokenizer_dir, zh_model):
    out, _ = merged
    base = {p.piece for p in load_sp_proto(base_tokenizer_dir).pieces}
    zh_order = {p.piece: i for i, p in enumerate(load_sp_proto(zh_model).pieces)}
    added = [p.piece for p in load_sp_proto(out).pieces[len(base) :] if p.piece in zh_order]
    positions = [zh_order[p] for p in added if len(p) > 1]  # single characters may move up
    assert positions == sorted(positions)


def test_every_added_piece_is_reachable(merged, base_tokenizer_dir):
    out, report = merged
    proto = load_sp_proto(out)
    added = [p.piece for p in proto.pieces[len(load_sp_proto(base_tokenizer_dir).pieces) :]]
    assert isolated_encodings(proto, added) == [[p] for p in added]
    # and in running text, through the dummy prefix: each piece comes out of its own text
    sp = load_sp_model(out)
    produced = {piece for ids in sp.encode(tiny.chinese_sentences(500, seed=99), out_type=str) for piece in ids}
    assert len(produced & set(added)) > len(added) // 4
    manifest = json.loads((out / "zhllama.json").read_text())
    for key in ("added", "duplicates_skipped", "non_cjk_skipped", "intermediates_added", "unreachable_dropped"):
        assert manifest["figures"][key] == getattr(report, key)


def test_text_without_cjk_encodes_as_base(merged, base_tokenizer_dir):
    out, _ = merged
    base, new = load_sp_model(base_tokenizer_dir), load_sp_model(out)
    texts = [t for t in fuzz_texts(3000, seed=5) if not any(is_cjk_piece(ch) for ch in t)]
    texts += tiny.english_sentences(500, seed=4)
    assert len(texts) > 800 and new.encode(texts) == base.encode(texts)


def test_chinese_gets_shorter_and_hf_agrees(merged, base_tokenizer_dir):
    out, _ = merged
    base, sp, hf = load_sp_model(base_tokenizer_dir), load_sp_model(out), load_tokenizer(out)
    zh = tiny.chinese_sentences(300, seed=42)
    assert sum(map(len, sp.encode(zh))) < 0.6 * sum(map(len, base.encode(zh)))
    texts = fuzz_texts(2500, seed=6) + zh
    assert hf(texts, verbose=False)["input_ids"] == [[1, *ids] for ids in sp.encode(texts)]
    assert hf.pad_token is None and len(hf) == len(load_sp_proto(out).pieces)


def test_words_and_all_pieces(tmp_path, base_tokenizer_dir, zh_model):
    words = tmp_path / "words.txt"
    words.write_text("人工智能\n深度学习模型\nhello world\n\n", encoding="utf-8")
    report = merge_tokenizers(MergeOptions(base=base_tokenizer_dir, add=[zh_model], words=[words], out=tmp_path / "w"))
    out = report.out
    pieces = {p.piece for p in load_sp_proto(out).pieces}
    assert {"人工智能", "深度学习模型"} <= pieces and "hello\u2581world" not in pieces
    assert isolated_encodings(load_sp_proto(out), ["人工智能"]) == [["人工智能"]]
    everything = merge_tokenizers(MergeOptions(base=base_tokenizer_dir, add=[zh_model], out=tmp_path / "all", all_pieces=True))
    assert everything.non_cjk_skipped == 0 and report.non_cjk_skipped >= 1


def test_missing_intermediates_are_added(tmp_path, base_tokenizer_dir):
    # a unigram model holds long pieces whose halves are not pieces; BPE needs them
    lines = tiny.chinese_sentences(1500, seed=8, top_words=300)
    unigram = write_model(tmp_path / "u.model", train_sp(lines, vocab_size=1500, model_type="unigram", byte_fallback=False))
    report = merge_tokenizers(MergeOptions(base=base_tokenizer_dir, add=[unigram], out=tmp_path / "m"))
    out = report.out
    assert report.intermediates_added > 0
    proto = load_sp_proto(out)
    added = [p.piece for p in proto.pieces[report.base_pieces :]]
    assert isolated_encodings(proto, added) == [[p] for p in added]


def test_rejects_bases_that_are_not_sentencepiece_bpe(tmp_path, zh_model):
    hf_only = tmp_path / "llama3"
    hf_only.mkdir()
    (hf_only / "tokenizer.json").write_text("{}")
    with pytest.raises(ZhllamaError, match="no tokenizer.model.*only SentencePiece BPE tokenizers"):
        merge_tokenizers(MergeOptions(base=hf_only, add=[zh_model], out=tmp_path / "o"))
    with pytest.raises(ZhllamaError, match="unigram model; only SentencePiece BPE"):
        unigram = write_model(tmp_path / "u.model", train_sp(model_type="unigram", byte_fallback=False))
        merge_tokenizers(MergeOptions(base=unigram, add=[zh_model], out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()
