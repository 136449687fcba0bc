"""``zhllama vocab stats``: how well tokenizers compress corpora, and whether HF agrees with SP.

Counted per line (documents split at newlines, empty lines skipped), SentencePiece without BOS:
``tokens per character = sum(len(sp.encode(line))) / sum(len(line))``. The HF tokenizer is
compared only when a ``tokenizer.json`` sits next to the model; a line "disagrees" when
``AutoTokenizer`` (no special tokens) gives different ids than SentencePiece.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from zhllama.corpus import iter_documents
from zhllama.args import CorpusArgs
from zhllama.options import at_least, option
from zhllama.outdir import atomic_output_file
from zhllama.vocab.spmodel import is_han_char, load_sp_model, resolve_sp_model_path
from zhllama.vocab.train import SampleReport, reservoir_sample

BATCH = 2000


@dataclass(kw_only=True)
class StatsOptions(CorpusArgs):
    """Options of ``zhllama vocab stats``."""

    corpus: list[str] = option(help="corpora to measure on (each argument is reported separately)", positional=True)
    tokenizer: list[Path] = option(help="tokenizer.model file or tokenizer directory (repeatable)")
    json: Path | None = option(None, help="also write the figures to this JSON file")
    max_lines: int = option(0, help="measure on at most this many lines per corpus, sampled uniformly (0 = all)")
    hf: bool = option(True, help="compare with the HF tokenizer when a tokenizer.json is next to the model")
    strict: bool = option(False, help="fail on lines that are not valid UTF-8 (default: count and skip them)")

    def problems(self) -> list[str]:
        problems = []
        if not self.tokenizer:
            problems.append("pass at least one --tokenizer")
        if not self.corpus:
            problems.append("pass at least one CORPUS")
        at_least(problems, "--max-lines", self.max_lines, 0)
        return problems


@dataclass
class TokenizerStats:
    """The figures for one tokenizer on one corpus."""

    tokenizer: str
    corpus: str
    pieces: int
    lines: int
    characters: int
    han_characters: int
    tokens: int
    tokens_per_char: float
    tokens_per_han_char: float | None
    chars_per_token: float
    byte_fallback_share: float
    unk_share: float
    hf_disagreeing_lines: int | None  # None: no HF tokenizer next to the model
    hf_disagreement_share: float | None


def corpus_lines(spec: str, *, text_field: str = "text", doc_sep: str = "line", strict: bool = False, max_lines: int = 0) -> list[str]:
    """The non-empty lines of one corpus argument (a uniform sample of ``max_lines`` if set)."""
    lines = (
        line
        for doc in iter_documents([spec], text_field=text_field, doc_sep=doc_sep, strict=strict)
        for line in doc.split("\n")
        if line
    )
    return reservoir_sample(lines, max_lines, 0, SampleReport())


def hf_tokenizer_beside(path: str | Path):
    """The HF tokenizer in the model's directory, or None when there is no tokenizer.json."""
    from zhllama.chain import load_tokenizer

    directory = resolve_sp_model_path(path).parent
    if not (directory / "tokenizer.json").is_file():
        return None
    return load_tokenizer(directory)


def hf_disagreements(hf_tokenizer, lines: list[str], sp_ids: list[list[int]]) -> int:
    """Lines where the HF tokenizer's ids (no special tokens) differ from SentencePiece's."""
    count = 0
    for start in range(0, len(lines), BATCH):
        batch = lines[start : start + BATCH]
        hf_ids = hf_tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        count += sum(a != b for a, b in zip(hf_ids, sp_ids[start : start + BATCH]))
    return count


def measure(tokenizer_path: str | Path, corpus_name: str, lines: list[str], *, hf_tokenizer=None) -> TokenizerStats:
    """Figures for one tokenizer on already-read lines."""
    sp = load_sp_model(tokenizer_path)
    ids = sp.encode(lines)
    tokens = sum(len(x) for x in ids)
    chars = sum(len(line) for line in lines)
    han = sum(is_han_char(ch) for line in lines for ch in line)
    byte_ids = {i for i in range(sp.get_piece_size()) if sp.is_byte(i)}
    unk = sp.unk_id()
    byte_tokens = sum(1 for x in ids for i in x if i in byte_ids) if byte_ids else 0
    unk_tokens = sum(x.count(unk) for x in ids)
    disagreeing = hf_disagreements(hf_tokenizer, lines, ids) if hf_tokenizer is not None else None
    return TokenizerStats(
        tokenizer=str(tokenizer_path),
        corpus=corpus_name,
        pieces=sp.get_piece_size(),
        lines=len(lines),
        characters=chars,
        han_characters=han,
        tokens=tokens,
        tokens_per_char=tokens / max(chars, 1),
        tokens_per_han_char=tokens / han if han else None,
        chars_per_token=chars / max(tokens, 1),
        byte_fallback_share=byte_tokens / max(tokens, 1),
        unk_share=unk_tokens / max(tokens, 1),
        hf_disagreeing_lines=disagreeing,
        hf_disagreement_share=disagreeing / max(len(lines), 1) if disagreeing is not None else None,
    )


@dataclass
class StatsResult:
    """One :class:`TokenizerStats` per tokenizer × corpus, and the JSON file written (if any)."""

    results: list[TokenizerStats]
    json: Path | None = None

    def summary(self) -> str:
        return format_table(self.results) + (f"\nwrote {self.json}" if self.json is not None else "")


def tokenizer_stats(options: StatsOptions) -> StatsResult:
    """Compare tokenizers on corpora: tokens per character, byte fallback, HF/SentencePiece parity.

    Writes ``options.json`` when set.
    """
    for path in options.tokenizer:
        resolve_sp_model_path(path)  # fail on a bad tokenizer before reading corpora
    hf = {str(p): hf_tokenizer_beside(p) if options.hf else None for p in options.tokenizer}
    results = []
    for spec in options.corpus:
        lines = corpus_lines(
            spec, text_field=options.text_field, doc_sep=options.doc_sep, strict=options.strict, max_lines=options.max_lines
        )
        for path in options.tokenizer:
            results.append(measure(path, str(spec), lines, hf_tokenizer=hf[str(path)]))
    if options.json is not None:
        write_stats_json(results, options.json)
    return StatsResult(results, options.json)


def write_stats_json(results: Sequence[TokenizerStats], path: str | Path) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps([asdict(r) for r in results], ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _short(path: str, width: int = 40) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def format_table(results: Sequence[TokenizerStats]) -> str:
    """A fixed-width table, one row per tokenizer × corpus."""
    header = ("tokenizer", "corpus", "pieces", "lines", "tok/char", "tok/Han", "char/tok", "bytes", "unk", "HF≠SP lines")
    rows = [header]
    for r in results:
        rows.append(
            (
                _short(r.tokenizer),
                _short(r.corpus, 32),
                f"{r.pieces:,}",
                f"{r.lines:,}",
                f"{r.tokens_per_char:.4f}",
                f"{r.tokens_per_han_char:.4f}" if r.tokens_per_han_char is not None else "-",
                f"{r.chars_per_token:.3f}",
                f"{r.byte_fallback_share:.2%}",
                f"{r.unk_share:.2%}",
                f"{r.hf_disagreeing_lines:,}" if r.hf_disagreeing_lines is not None else "no HF",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
