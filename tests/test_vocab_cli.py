"""The vocab commands through ``zhllama.cli.main``: the happy path and every bad input.

Bad input must end with exit status 1, one line on stderr, no traceback, and no output
directory (or temporary sibling) left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zhllama.demo import tiny
from zhllama.cli import main


@pytest.fixture(scope="module")
def small_zh(tmp_path_factory) -> Path:
    return tiny.write_lines(tmp_path_factory.mktemp("c") / "zh.txt", tiny.chinese_sentences(1200, seed=2, top_words=600))


def _fails(capsys, argv: list[str], match: str, where: Path) -> None:
    before = sorted(p.name for p in where.iterdir())
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("zhllama: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    assert sorted(p.name for p in where.iterdir()) == before  # nothing half-written


def test_train_merge_stats_end_to_end(capsys, tmp_path, small_zh, base_tokenizer_dir):
    assert main(["vocab", "train", str(small_zh), "--out", str(tmp_path / "sp"), "--vocab-size", "1200", "--threads", "2"]) == 0
    model = tmp_path / "sp" / "chinese_sp.model"
    assert model.is_file()
    argv = ["vocab", "merge", "--base", str(base_tokenizer_dir), "--add", str(model), "--out", str(tmp_path / "tok")]
    assert main(argv) == 0
    assert "pieces" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "zhllama.json"
    ]
    en = tiny.write_lines(tmp_path / "en.txt", tiny.english_sentences(200, seed=1))
    argv = ["vocab", "stats", "--tokenizer", str(base_tokenizer_dir), "--tokenizer", str(tmp_path / "tok"),
            str(small_zh), str(en), "--json", str(tmp_path / "stats.json")]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "tok/char" in table and "HF≠SP" in table
    rows = json.loads((tmp_path / "stats.json").read_text())
    assert len(rows) == 4 and all(r["hf_disagreeing_lines"] == 0 for r in rows)
    zh_base, zh_merged = rows[0], rows[1]
    assert zh_merged["tokens_per_char"] < zh_base["tokens_per_char"]
    en_base, en_merged = rows[2], rows[3]
    assert en_merged["tokens"] == en_base["tokens"] and en_merged["tokens_per_han_char"] is None


def test_train_bad_input(capsys, tmp_path, small_zh):
    out = ["--out", str(tmp_path / "o"), "--vocab-size", "1200"]
    _fails(capsys, ["vocab", "train", str(tmp_path / "missing.txt"), *out], "missing.txt: no such file", tmp_path)
    (tmp_path / "nothing").mkdir()
    _fails(capsys, ["vocab", "train", str(tmp_path / "nothing"), *out], "holds no corpus files", tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _fails(capsys, ["vocab", "train", str(empty), *out], "corpus has no non-empty documents", tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n".encode() + b"\xc3\x28\n")
    _fails(capsys, ["vocab", "train", str(bad), *out, "--strict"], "bad.txt:2: not valid UTF-8", tmp_path)
    _fails(capsys, ["vocab", "train", str(small_zh), "--out", str(tmp_path / "o"), "--vocab-size", "90000"],
           "does not fit the corpus", tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    _fails(capsys, ["vocab", "train", str(small_zh), "--out", str(taken)], "pass --overwrite", taken)
    assert (taken / "keep.txt").read_text() == "mine"


def test_merge_bad_input(capsys, tmp_path, base_tokenizer_dir):
    llama3 = tmp_path / "llama3"
    llama3.mkdir()
    (llama3 / "tokenizer.json").write_text("{}")
    (llama3 / "tokenizer_config.json").write_text("{}")
    model = base_tokenizer_dir / "tokenizer.model"
    _fails(capsys, ["vocab", "merge", "--base", str(llama3), "--add", str(model), "--out", str(tmp_path / "o")],
           "only SentencePiece BPE tokenizers", tmp_path)
    _fails(capsys, ["vocab", "merge", "--base", str(base_tokenizer_dir), "--add", str(tmp_path / "no.model"),
                    "--out", str(tmp_path / "o")], "no.model: no such", tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00garbage\xff" * 10)
    _fails(capsys, ["vocab", "merge", "--base", str(base_tokenizer_dir), "--add", str(junk), "--out", str(tmp_path / "o")],
           "not a SentencePiece model", tmp_path)


def test_stats_bad_input(capsys, tmp_path, small_zh):
    _fails(capsys, ["vocab", "stats", "--tokenizer", str(tmp_path / "none"), str(small_zh)], "none: no such", tmp_path)
