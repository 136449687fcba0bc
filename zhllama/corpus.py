"""Reading corpora: the one place that turns CORPUS arguments into documents.

A CORPUS argument is a file, a directory (every corpus file below it) or a glob. Supported:
``.txt`` (one document per line, or blank-line separated paragraphs with ``doc_sep="blank"``),
``.jsonl`` / ``.json`` (the ``text_field`` of each record; ``.json`` may be an array or JSON
lines), ``.parquet`` (the ``text_field`` column). Any of them may end in ``.gz``.

Documents are streamed, never loaded whole (except a ``.json`` array, which JSON requires).
Lines that are not valid UTF-8 are counted and skipped, or raise with ``strict=True``; every
error names the file and, where there is one, the line.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

from zhllama.errors import ZhllamaError

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
DOC_SEPARATORS = ("line", "blank")


@dataclass
class CorpusReport:
    """What reading a corpus found; filled in while documents are streamed."""

    files: list[str] = field(default_factory=list)
    documents: int = 0
    characters: int = 0
    skipped_non_utf8: int = 0
    skipped_empty: int = 0

    def as_dict(self) -> dict:
        return {
            "files": list(self.files),
            "documents": self.documents,
            "characters": self.characters,
            "skipped_non_utf8_lines": self.skipped_non_utf8,
            "skipped_empty_documents": self.skipped_empty,
        }


def corpus_kind(path: Path) -> str | None:
    """'text', 'json' or 'parquet' for a corpus file name (``.gz`` allowed), else None."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("json", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def find_corpus_files(specs: Sequence[str | Path]) -> list[Path]:
    """Expand CORPUS arguments (files, directories, globs) into a sorted, de-duplicated list.

    A file named explicitly is taken whatever its suffix is (read as text unless it looks like
    JSON or parquet); directories and globs contribute only files with a corpus suffix.
    """
    if not specs:
        raise ZhllamaError("no corpus given: pass at least one file, directory or glob")
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and corpus_kind(p))
            if not files:
                raise ZhllamaError(
                    f"{path}: directory holds no corpus files "
                    f"(looked for {', '.join(CORPUS_SUFFIXES)}, optionally .gz)"
                )
            found.extend(files)
        elif any(ch in str(spec) for ch in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not files:
                raise ZhllamaError(f"{spec}: glob matches no files")
            found.extend(files)
        elif path.exists():
            raise ZhllamaError(f"{path}: not a regular file or directory")
        else:
            raise ZhllamaError(f"{path}: no such file or directory")
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p.resolve(), None)
    return list(unique)


def open_binary(path: Path) -> IO[bytes]:
    """Open a file for reading bytes, decompressing ``.gz`` transparently."""
    try:
        if path.name.lower().endswith(".gz"):
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as e:
        raise ZhllamaError(f"{path}: cannot open: {e.strerror or e}") from e


def _decoded_lines(path: Path, strict: bool, report: CorpusReport) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline) for each line; bad UTF-8 is skipped or raised."""
    with open_binary(path) as fh:
        lineno = 0
        try:
            for raw in fh:
                lineno += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    if strict:
                        raise ZhllamaError(
                            f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); "
                            "fix the file or drop --strict to skip such lines"
                        ) from e
                    report.skipped_non_utf8 += 1
                    continue
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # byte-order mark
                yield lineno, line.rstrip("\r\n")
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ZhllamaError(f"{path}: corrupt or truncated gzip data after line {lineno}: {e}") from e
        except OSError as e:
            raise ZhllamaError(f"{path}: read failed after line {lineno}: {e}") from e


def _text_documents(path: Path, doc_sep: str, strict: bool, report: CorpusReport) -> Iterator[str]:
    if doc_sep == "line":
        for _, line in _decoded_lines(path, strict, report):
            yield line
        return
    paragraph: list[str] = []
    for _, line in _decoded_lines(path, strict, report):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _record_text(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ZhllamaError(f"{where}: expected a JSON object with field '{text_field}', got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(sorted(record)[:8]) or "none"
        raise ZhllamaError(f"{where}: record has no field '{text_field}' (fields: {keys}); set --text-field")
    value = record[text_field]
    if not isinstance(value, str):
        raise ZhllamaError(f"{where}: field '{text_field}' is {type(value).__name__}, not a string")
    return value


def _array_records(text: str, path: Path) -> Iterator[tuple[str, object]]:
    """The records of a JSON array, parsed one by one so that an error can say which record."""
    decoder = json.JSONDecoder()
    end = len(text)

    def fail(where: str, message: str, at: int) -> ZhllamaError:
        line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        return ZhllamaError(f"{path}:{line}: malformed JSON {where}: {message} (column {column})")

    def skip_space(at: int) -> int:
        while at < end and text[at] in " \t\r\n":
            at += 1
        return at

    pos = skip_space(1)  # text starts with "["
    number = 0
    if pos < end and text[pos] == "]":
        pos = skip_space(pos + 1)
        if pos != end:
            raise fail("after the closing ]", "extra data", pos)
        return
    while True:
        if pos >= end:
            raise fail(f"in record {number + 1}", "the array is not closed (truncated file?)", end)
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(f"in record {number + 1}", e.msg, e.pos) from e
        number += 1
        yield f"{path} record {number}", record
        pos = skip_space(pos)
        if pos < end and text[pos] == ",":
            pos = skip_space(pos + 1)
        elif pos < end and text[pos] == "]":
            pos = skip_space(pos + 1)
            if pos != end:
                raise fail("after the closing ]", "extra data", pos)
            return
        elif pos >= end:
            raise fail(f"after record {number}", "the array is not closed (truncated file?)", end)
        else:
            raise fail(f"after record {number}", "expected ',' or ']'", pos)


def read_json_records(path: Path, *, strict: bool = True, report: CorpusReport | None = None) -> Iterator[tuple[str, object]]:
    """Records of a JSON array or JSON-lines file as (location, record); malformed JSON raises.

    The location is ``file:line`` for JSON lines and ``file record N`` for an array, so later
    errors about a record can say where it is.
    """
    report = report if report is not None else CorpusReport()
    with open_binary(path) as fh:
        try:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            raw = head + fh.read() if head.startswith(b"[") else b""
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ZhllamaError(f"{path}: corrupt or truncated gzip data: {e}") from e
        except OSError as e:
            raise ZhllamaError(f"{path}: read failed: {e.strerror or e}") from e
    if head.startswith(b"["):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ZhllamaError(f"{path}: not valid UTF-8 at byte {e.start}") from e
        yield from _array_records(text, path)
        return
    for lineno, line in _decoded_lines(path, strict, report):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZhllamaError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
        yield f"{path}:{lineno}", record


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        source = open_binary(path) if path.name.lower().endswith(".gz") else str(path)
        table = pq.ParquetFile(source)
    except Exception as e:  # pyarrow raises its own error types for bad files
        raise ZhllamaError(f"{path}: not a readable parquet file: {e}") from e
    if text_field not in table.schema_arrow.names:
        raise ZhllamaError(
            f"{path}: no column '{text_field}' (columns: {', '.join(table.schema_arrow.names)}); set --text-field"
        )
    for batch in table.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def iter_documents(
    specs: Sequence[str | Path],
    *,
    text_field: str = "text",
    doc_sep: str = "line",
    strict: bool = False,
    report: CorpusReport | None = None,
) -> Iterator[str]:
    """Stream the non-empty documents of every corpus file, in file order.

    ``report`` (if given) is filled in as documents are produced. Raises :class:`ZhllamaError`
    for missing, unreadable or malformed input, and for a corpus with no documents at all.
    """
    if doc_sep not in DOC_SEPARATORS:
        raise ZhllamaError(f"--doc-sep must be one of {', '.join(DOC_SEPARATORS)}, got '{doc_sep}'")
    report = report if report is not None else CorpusReport()
    files = find_corpus_files(specs)
    for path in files:
        report.files.append(str(path))
        kind = corpus_kind(path) or "text"
        if kind == "text":
            documents: Iterable[str] = _text_documents(path, doc_sep, strict, report)
        elif kind == "json":
            documents = (
                _record_text(record, text_field, where)
                for where, record in read_json_records(path, strict=strict, report=report)
            )
        else:
            documents = _parquet_documents(path, text_field)
        for doc in documents:
            if not doc.strip():
                report.skipped_empty += 1
                continue
            report.documents += 1
            report.characters += len(doc)
            yield doc
    if report.documents == 0:
        names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise ZhllamaError(f"{names}: corpus has no non-empty documents")


def read_documents(specs: Sequence[str | Path], **kwargs) -> list[str]:
    """All documents of a corpus in memory (for small corpora and tests)."""
    return list(iter_documents(specs, **kwargs))


def named_corpus(spec: str, flag: str) -> tuple[str | None, str]:
    """``NAME=CORPUS`` as ``(NAME, CORPUS)``; a bare ``CORPUS`` as ``(None, CORPUS)``.

    A part before the first ``=`` that holds a path separator belongs to a path, and so does
    the ``=`` of a path that exists (``./a=b.txt`` works either way). Raises
    :class:`ZhllamaError`, naming ``flag``, for an empty name, a name with other characters than
    letters, digits, ``_``, ``.`` and ``-``, or nothing after the ``=``.
    """
    head, sep, corpus = spec.partition("=")
    if not sep or "/" in head or os.sep in head or Path(spec).exists():
        return None, spec
    if not head:
        raise ZhllamaError(f"{flag} {spec!r}: empty name before '='; write NAME=CORPUS, e.g. zh=held_out.txt")
    if not re.fullmatch(r"[\w.-]+", head):
        raise ZhllamaError(f"{flag} {spec!r}: name {head!r} may hold only letters, digits, '_', '.' and '-'")
    if not corpus:
        raise ZhllamaError(f"{flag} {spec!r}: no corpus after '='; write NAME=CORPUS")
    return head, corpus
