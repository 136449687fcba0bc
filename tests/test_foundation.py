"""The shared pieces: corpus reading, atomic output directories, option parsing, the CLI."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from zhllama import cli
from zhllama.corpus import CorpusReport, read_documents
from zhllama.errors import ZhllamaError
from zhllama.options import Command, check, option, parse_command
from zhllama.outdir import atomic_output_dir
from zhllama.provenance import read_manifest, write_manifest


def test_reads_every_corpus_format(tmp_path):
    (tmp_path / "a.txt").write_text("一行\n\n二行\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "三"}) + "\n" + json.dumps({"text": "四"}) + "\n", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "五"}]), encoding="utf-8")
    with gzip.open(tmp_path / "d.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("六\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["七", "八"]}), tmp_path / "e.parquet")
    report = CorpusReport()
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "d.txt.gz", tmp_path / "e.parquet"], report=report)
    assert docs == ["一行", "二行", "三", "四", "六", "七", "八"]
    assert report.skipped_empty == 1 and report.documents == 7
    assert read_documents([tmp_path / "c.json"], text_field="body") == ["五"]
    assert len(read_documents([str(tmp_path / "*.txt*")])) == 3


def test_blank_line_documents(tmp_path):
    (tmp_path / "a.txt").write_text("第一段\n续\n\n\n第二段\n", encoding="utf-8")
    assert read_documents([tmp_path / "a.txt"], doc_sep="blank") == ["第一段\n续", "第二段"]


def test_non_utf8_lines_are_counted_or_fatal(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("好\n".encode() + b"\xff\xfe\n" + "的\n".encode())
    report = CorpusReport()
    assert read_documents([path], report=report) == ["好", "的"]
    assert report.skipped_non_utf8 == 1
    with pytest.raises(ZhllamaError, match=r"bad.txt:2: not valid UTF-8"):
        read_documents([path], strict=True)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "no such file"),
        ("empty.txt", b"\n\n", "no non-empty documents"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', r"broken.jsonl:2: malformed JSON"),
        ("field.jsonl", b'{"content": "a"}\n', "no field 'text'"),
        ("trunc.txt.gz", gzip.compress("很多字\n".encode() * 1000)[:60], "corrupt or truncated gzip"),
    ],
)
def test_corpus_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ZhllamaError, match=message) as info:
        read_documents([path])
    assert name in str(info.value)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        write_manifest(tmp, command="test", options={"a": 1}, inputs={"self": __file__}, figures={"n": 2})
    manifest = read_manifest(out)
    assert manifest["figures"] == {"n": 2} and len(manifest["inputs"]["self"]["sha256"]) == 64
    with pytest.raises(ZhllamaError, match="--overwrite"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


@dataclasses.dataclass
class _Options:
    corpus: list[Path] = option(help="corpora", positional=True)
    out: Path = option(help="output")
    size: int = option(10, help="a size")
    adapter: list[Path] = option(help="adapters", default_factory=list)
    jieba: bool = option(False, help="segment")

    def __post_init__(self):
        check([f"--size must be positive, got {self.size}"] if self.size <= 0 else [])


def _parse(argv):
    options, _ = parse_command("test", Command(_Options, lambda options: None), argv)
    return options


def test_options_map_to_flags():
    opts = _parse(["a.txt", "b.txt", "--out", "o", "--size", "3", "--adapter", "x", "--adapter", "y", "--jieba"])
    assert opts == _Options([Path("a.txt"), Path("b.txt")], Path("o"), 3, [Path("x"), Path("y")], True)
    assert _parse(["a", "--out", "o"]).adapter == []
    assert _parse(["a", "--out", "o", "--no-jieba"]).jieba is False
    with pytest.raises(ZhllamaError, match="--size must be positive"):
        _parse(["a", "--out", "o", "--size", "0"])
    with pytest.raises(ZhllamaError, match="unrecognized arguments: --bogus"):
        _parse(["a", "--out", "o", "--bogus"])


def test_cli_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "vocab merge" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'frobnicate'" in err
    assert cli.main(["vocab"]) == 1
    assert "needs a sub-command" in capsys.readouterr().err
