"""``zhllama vocab train``: a Chinese SentencePiece model to merge into a LLaMA tokenizer.

Settings that matter for the merge, and why:

- identity normalisation: the base (LLaMA) does not normalise, so a piece learnt from NFKC
  text (Chinese-LLaMA has ASCII-comma pieces standing for "，") would never match raw text;
- no byte fallback: the base already has byte pieces; ours would only be duplicates;
- dummy prefix on, extra whitespace kept: as in LLaMA, so "▁中国"-style pieces mean the same
  thing in both models;
- ``--jieba``: sentences are cut into jieba words joined by an invisible delimiter that
  SentencePiece's ``pretokenization_delimiter`` splits on (and removes), so no piece crosses a
  word boundary and no fake spaces enter the pieces.

Large corpora are streamed; at most ``--max-sentences`` lines are kept by reservoir sampling
(uniform over all lines, memory bounded by the sample), so a 100 GB corpus trains in the memory
of its sample. ``--seed`` fixes both the sample and SentencePiece's own randomness: same
inputs and seed → byte-identical model.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from zhllama.corpus import CorpusReport, iter_documents
from zhllama.errors import ZhllamaError
from zhllama.args import CorpusArgs, OutputArgs
from zhllama.options import at_least, option
from zhllama.outdir import atomic_output_dir, check_output_target
from zhllama.provenance import write_manifest

MODEL_FILE = "chinese_sp.model"
VOCAB_FILE = "chinese_sp.vocab"
# U+2063 INVISIBLE SEPARATOR: never in real text we care about; SentencePiece removes it.
JIEBA_DELIMITER = "\u2063"
MODEL_TYPES = ("bpe", "unigram")


@dataclass(kw_only=True)
class TrainOptions(CorpusArgs, OutputArgs):
    """Options of ``zhllama vocab train``."""

    corpus: list[str] = option(help="corpus files, directories or globs (.txt, .jsonl/.json, .parquet, .gz)", positional=True)
    vocab_size: int = option(20000, help="number of pieces, including <unk>, <s>, </s>")
    model_type: str = option("bpe", help="SentencePiece model type", choices=MODEL_TYPES)
    character_coverage: float = option(0.9995, help="share of characters the model must cover; rarer ones are left out")
    jieba: bool = option(False, help="pre-segment with jieba so that no piece crosses a word boundary")
    max_sentences: int = option(2_000_000, help="train on at most this many lines, sampled uniformly (0 = all)")
    max_sentence_length: int = option(8192, help="longer lines are cut at sentence ends into pieces of at most this many bytes")
    threads: int = option(0, help="training threads (0 = all cores)")
    seed: int = option(0, help="random seed for sampling and training (same inputs + seed = identical model)")
    strict: bool = option(False, help="fail on lines that are not valid UTF-8 (default: count and skip them)")

    def problems(self) -> list[str]:
        problems = []
        if not self.corpus:
            problems.append("pass at least one CORPUS")
        at_least(problems, "--vocab-size", self.vocab_size, 10)
        if self.model_type not in MODEL_TYPES:
            problems.append(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got '{self.model_type}'")
        if not 0.5 <= self.character_coverage <= 1.0:
            problems.append(f"--character-coverage must be between 0.5 and 1, got {self.character_coverage}")
        at_least(problems, "--max-sentences", self.max_sentences, 0)
        at_least(problems, "--max-sentence-length", self.max_sentence_length, 256, " bytes")
        at_least(problems, "--threads", self.threads, 0)
        return problems


@dataclass
class SampleReport:
    """How many lines the corpus had and how many were kept."""

    lines_seen: int = 0
    lines_kept: int = 0


def split_long_line(line: str, max_bytes: int) -> Iterator[str]:
    """Cut a line longer than ``max_bytes`` (UTF-8) at sentence ends, else anywhere.

    SentencePiece silently skips over-long sentences; a 红楼梦 paragraph would be lost whole.
    """
    if len(line.encode("utf-8")) <= max_bytes:
        yield line
        return
    chunk: list[str] = []
    size = 0
    for ch in line:
        n = len(ch.encode("utf-8"))
        if size + n > max_bytes:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(ch)
        size += n
        if ch in "。！？!?；;" and size > max_bytes // 2:
            yield "".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "".join(chunk)


def training_sentences(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the documents, long ones cut to ``max_bytes``."""
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield from split_long_line(line, max_bytes)


def reservoir_sample(lines: Iterable[str], k: int, seed: int, report: SampleReport) -> list[str]:
    """A uniform sample of at most ``k`` lines (all when ``k`` is 0), in corpus order.

    Algorithm R: memory holds only the sample. Order is restored afterwards so that the
    training input does not depend on the sampling's random positions more than needed.
    """
    rng = random.Random(seed)
    sample: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        report.lines_seen += 1
        if k == 0 or i < k:
            sample.append((i, line))
        else:
            j = rng.randint(0, i)
            if j < k:
                sample[j] = (i, line)
    sample.sort()
    report.lines_kept = len(sample)
    return [line for _, line in sample]


def jieba_segment(lines: list[str]) -> list[str]:
    """Join each line's jieba words with :data:`JIEBA_DELIMITER`."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return [JIEBA_DELIMITER.join(w for w in jieba.cut(line, HMM=True) if w) for line in lines]


def _progress(iterable: Iterable[str], desc: str) -> Iterable[str]:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=" lines", mininterval=1.0, disable=None, leave=False)


def _translate_sentencepiece_error(error: RuntimeError, options: TrainOptions, lines: int) -> ZhllamaError:
    """Turn SentencePiece's internal messages into a line that says what to change."""
    text = " ".join(str(error).split())
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
    if too_high:
        return ZhllamaError(
            f"--vocab-size {options.vocab_size} does not fit the corpus ({lines} lines): it supports at most "
            f"{too_high.group(2)} pieces; use a smaller --vocab-size or a larger corpus"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text)
    if too_low:
        return ZhllamaError(
            f"--vocab-size {options.vocab_size} does not fit the corpus ({lines} lines): it has {too_low.group(2)} "
            f"characters to cover at --character-coverage {options.character_coverage}; raise --vocab-size "
            "above that or lower --character-coverage"
        )
    if "sentences_.empty()" in text:
        return ZhllamaError(f"corpus has no usable lines (all {lines} longer than --max-sentence-length?)")
    return ZhllamaError(f"SentencePiece training failed: {text}")


def train_sp_bytes(lines: list[str], options: TrainOptions) -> bytes:
    """Train on ``lines`` (already sampled / segmented) and return the serialised model."""
    model = io.BytesIO()
    spm.set_random_generator_seed(options.seed)
    extra = {"pretokenization_delimiter": JIEBA_DELIMITER} if options.jieba else {}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=options.model_type,
            vocab_size=options.vocab_size,
            character_coverage=options.character_coverage,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            byte_fallback=False,
            split_digits=True,
            max_sentence_length=options.max_sentence_length * 2,  # room for jieba delimiters
            input_sentence_size=0,  # we sampled already
            shuffle_input_sentence=False,
            num_threads=options.threads or os.cpu_count() or 1,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
            **extra,
        )
    except RuntimeError as e:
        raise _translate_sentencepiece_error(e, options, len(lines)) from e
    return model.getvalue()


def write_vocab_file(model_bytes: bytes, path: Path) -> int:
    """Write SentencePiece's ``.vocab`` listing (piece TAB score); return the piece count."""
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(processor.get_piece_size()):
            fh.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")
    return processor.get_piece_size()


@dataclass
class TrainResult:
    """What ``zhllama vocab train`` wrote."""

    out: Path
    pieces: int
    lines_used: int

    @property
    def model_file(self) -> Path:
        return self.out / MODEL_FILE

    def summary(self) -> str:
        return f"wrote {self.model_file}: {self.pieces:,} pieces trained on {self.lines_used:,} lines"


def train_sp_model(options: TrainOptions) -> TrainResult:
    """Train a Chinese SentencePiece model (chinese_sp.model) on a corpus.

    Identity normalisation and no byte fallback, so its pieces merge cleanly into a LLaMA
    tokenizer with `zhllama vocab merge`. Writes ``chinese_sp.model``, ``chinese_sp.vocab`` and ``zhllama.json`` (inputs with hashes,
    settings, line counts, skipped non-UTF-8 lines, time) into ``options.out``, atomically.
    """
    started = time.time()
    check_output_target(options.out, options.overwrite)  # fail before reading a big corpus
    corpus_report = CorpusReport()
    sample_report = SampleReport()
    documents = iter_documents(
        options.corpus, text_field=options.text_field, doc_sep=options.doc_sep, strict=options.strict, report=corpus_report
    )
    lines = _progress(training_sentences(documents, options.max_sentence_length), "reading corpus")
    sample = reservoir_sample(lines, options.max_sentences, options.seed, sample_report)
    if options.jieba:
        sample = jieba_segment(sample)
    model_bytes = train_sp_bytes(sample, options)
    with atomic_output_dir(options.out, overwrite=options.overwrite) as tmp:
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        pieces = write_vocab_file(model_bytes, tmp / VOCAB_FILE)
        write_manifest(
            tmp,
            command="vocab train",
            options=options,
            inputs={"corpus": corpus_report.files},
            figures={
                "pieces": pieces,
                "lines_seen": sample_report.lines_seen,
                "lines_used": sample_report.lines_kept,
                **{k: v for k, v in corpus_report.as_dict().items() if k != "files"},
                "seconds": round(time.time() - started, 2),
            },
        )
    return TrainResult(Path(options.out), pieces, sample_report.lines_kept)
