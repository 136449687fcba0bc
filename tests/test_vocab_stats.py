"""``tokenizer_stats``: the figures are the issue's definitions, computed per corpus argument."""

from __future__ import annotations

import json

import pytest

from zhllama.demo import tiny
from zhllama.errors import ZhllamaError
from zhllama.vocab import StatsOptions, format_table, load_sp_model, tokenizer_stats


def test_figures_follow_their_definitions(tmp_path, base_tokenizer_dir):
    lines = tiny.chinese_sentences(50, seed=1) + ["emoji 🦙🦙 and 12345", "  indented   text"]
    corpus = tiny.write_lines(tmp_path / "c.txt", lines)
    (result,) = tokenizer_stats(StatsOptions(corpus=[str(corpus)], tokenizer=[base_tokenizer_dir], json=tmp_path / "s.json")).results
    sp = load_sp_model(base_tokenizer_dir)
    ids = sp.encode(lines)
    tokens = sum(map(len, ids))
    assert result.lines == len(lines) and result.tokens == tokens
    assert result.tokens_per_char == pytest.approx(tokens / sum(map(len, lines)))
    han = sum("\u4e00" <= ch <= "\u9fff" for line in lines for ch in line)
    assert result.tokens_per_han_char == pytest.approx(tokens / han)
    byte_tokens = sum(sp.is_byte(i) for x in ids for i in x)
    assert byte_tokens > 0 and result.byte_fallback_share == pytest.approx(byte_tokens / tokens)
    assert result.unk_share == 0 and result.hf_disagreeing_lines == 0
    assert json.loads((tmp_path / "s.json").read_text())[0]["tokens"] == tokens
    assert "tok/Han" in format_table([result])


def test_no_hf_column_without_tokenizer_json(tmp_path, base_tokenizer_dir):
    corpus = tiny.write_lines(tmp_path / "c.txt", ["hello world"])
    model = base_tokenizer_dir / "tokenizer.model"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.model").write_bytes(model.read_bytes())
    (result,) = tokenizer_stats(StatsOptions(corpus=[str(corpus)], tokenizer=[tmp_path / "bare"])).results
    assert result.hf_disagreeing_lines is None and "no HF" in format_table([result])


def test_options_checked():
    with pytest.raises(ZhllamaError, match="--max-lines"):
        StatsOptions(corpus=["x"], tokenizer=["t"], max_lines=-1)
