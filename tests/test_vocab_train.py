"""``zhllama vocab train``: settings, reproducibility, jieba boundaries, sampling, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from zhllama.demo import tiny
from zhllama.errors import ZhllamaError
from zhllama.vocab import TrainOptions, load_sp_proto, train_sp_model
from zhllama.vocab.train import SampleReport, reservoir_sample, split_long_line


def _train(corpus, out: Path, **kwargs) -> Path:
    options = TrainOptions(corpus=[str(c) for c in corpus], out=out, **{"vocab_size": 1500, "threads": 2, **kwargs})
    return train_sp_model(options).out


@pytest.fixture(scope="module")
def zh_corpus(tmp_path_factory) -> Path:
    return tiny.write_lines(tmp_path_factory.mktemp("zh") / "zh.txt", tiny.chinese_sentences(1500, seed=11, top_words=700))


def test_writes_model_vocab_and_manifest(zh_corpus, tmp_path):
    out = _train([zh_corpus], tmp_path / "sp")
    assert sorted(p.name for p in out.iterdir()) == ["chinese_sp.model", "chinese_sp.vocab", "zhllama.json"]
    proto = load_sp_proto(out / "chinese_sp.model")
    assert len(proto.pieces) == 1500 and proto.trainer_spec.model_type == 2  # BPE
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.precompiled_charsmap
    assert not proto.trainer_spec.byte_fallback and proto.normalizer_spec.add_dummy_prefix
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    assert len((out / "chinese_sp.vocab").read_text(encoding="utf-8").splitlines()) == 1500
    manifest = json.loads((out / "zhllama.json").read_text())
    assert manifest["command"] == "vocab train" and manifest["figures"]["lines_used"] == 1500
    assert len(manifest["inputs"]["corpus"][0]["sha256"]) == 64


def test_same_seed_same_bytes(zh_corpus, tmp_path):
    a = _train([zh_corpus], tmp_path / "a", max_sentences=800, seed=5)
    b = _train([zh_corpus], tmp_path / "b", max_sentences=800, seed=5)
    assert (a / "chinese_sp.model").read_bytes() == (b / "chinese_sp.model").read_bytes()


def test_unigram(zh_corpus, tmp_path):
    out = _train([zh_corpus], tmp_path / "u", model_type="unigram", vocab_size=1200)
    assert load_sp_proto(out / "chinese_sp.model").trainer_spec.model_type == 1


def test_jieba_pieces_stay_inside_words(zh_corpus, tmp_path):
    import jieba

    out = _train([zh_corpus], tmp_path / "j", jieba=True)
    words = {w for line in zh_corpus.read_text(encoding="utf-8").splitlines() for w in jieba.cut(line)}
    pieces = [p.piece.lstrip("\u2581") for p in load_sp_proto(out / "chinese_sp.model").pieces if p.type == 1]
    crossing = [p for p in pieces if len(p) > 1 and not any(p in w for w in words)]
    assert not crossing, crossing[:10]
    plain = _train([zh_corpus], tmp_path / "p")
    plain_pieces = [p.piece.lstrip("\u2581") for p in load_sp_proto(plain / "chinese_sp.model").pieces if p.type == 1]
    assert any(len(p) > 1 and not any(p in w for w in words) for p in plain_pieces)  # the test can fail


def test_reservoir_sample_is_uniform_and_bounded():
    counts = [0] * 100
    for seed in range(400):
        report = SampleReport()
        sample = reservoir_sample((str(i) for i in range(100)), 10, seed, report)
        assert len(sample) == 10 and report.lines_seen == 100
        assert [int(s) for s in sample] == sorted(int(s) for s in sample)  # corpus order kept
        for s in sample:
            counts[int(s)] += 1
    assert min(counts) > 15 and max(counts) < 70  # expectation 40 each
    assert reservoir_sample(iter(["a", "b"]), 0, 0, SampleReport()) == ["a", "b"]


def test_long_lines_are_cut_not_lost():
    line = "天" * 5000 + "。" + "地" * 10
    chunks = list(split_long_line(line, 3000))
    assert "".join(chunks) == line and all(len(c.encode()) <= 3000 for c in chunks)


def test_reads_jsonl_gz(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for s in tiny.chinese_sentences(800, seed=3, top_words=500):
            fh.write(json.dumps({"content": s}, ensure_ascii=False) + "\n")
    out = _train([path], tmp_path / "g", text_field="content", vocab_size=1200)
    assert (out / "chinese_sp.model").is_file()


def test_vocab_size_the_corpus_cannot_fill(zh_corpus, tmp_path):
    with pytest.raises(ZhllamaError, match="--vocab-size 200000 does not fit the corpus.*at most") as e:
        _train([zh_corpus], tmp_path / "big", vocab_size=200000)
    assert "\n" not in str(e.value) and not (tmp_path / "big").exists()
    with pytest.raises(ZhllamaError, match="--vocab-size 100 does not fit.*characters to cover"):
        _train([zh_corpus], tmp_path / "small", vocab_size=100)


def test_non_utf8_counted_or_strict(zh_corpus, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(zh_corpus.read_bytes() + b"\xff\xfe broken\n")
    out = _train([bad], tmp_path / "ok")
    assert json.loads((out / "zhllama.json").read_text())["figures"]["skipped_non_utf8_lines"] == 1
    with pytest.raises(ZhllamaError, match=r"bad.txt:1501: not valid UTF-8"):
        _train([bad], tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_option_problems_reported_together():
    with pytest.raises(ZhllamaError, match="--vocab-size.*; --character-coverage"):
        TrainOptions(corpus=["x"], out=Path("o"), vocab_size=3, character_coverage=2.0)
