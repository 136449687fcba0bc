"""``zhllama eval``: bits per character and per byte on named corpora, and multiple-choice
benchmarks (CMMLU, C-Eval, MMLU) read from their own files, for any model chain."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zhllama.args import ChainArgs, CorpusArgs
from zhllama.chain import check_block_size
from zhllama.errors import ZhllamaError
from zhllama.evaluate.benchmarks import KINDS, load_benchmark
from zhllama.evaluate.multiple_choice import BenchmarkResult, run_benchmark
from zhllama.evaluate.perplexity import named_corpora, read_texts, score_texts
from zhllama.options import at_least, option
from zhllama.outdir import atomic_output_file
from zhllama.provenance import describe_input, library_versions


@dataclass(kw_only=True)
class MeasureArgs(CorpusArgs):
    """What to measure on a model: corpora and a benchmark (``eval``, and ``report --eval``)."""

    data: list[str] = option(
        default_factory=list, help="corpora to score, each NAME=CORPUS (e.g. zh=held_out.txt) or a bare CORPUS named as written"
    )
    benchmark: str | None = option(None, choices=KINDS, help="multiple-choice benchmark whose files --benchmark-dir holds")
    benchmark_dir: Path | None = option(None, help="directory in the benchmark's own layout (see docs/eval.md)")
    shots: int = option(5, help="few-shot examples: the first K rows of each subject's dev file")
    subjects: list[str] = option(default_factory=list, help="score only these subjects (a,b or repeated)")
    limit: int | None = option(None, help="score only the first N questions of each subject")
    with_template: str | None = option(None, help="wrap each question in this chat template (for SFT'd models)")
    block_size: int = option(512, help="tokens per corpus scoring window (at most the model's context)")
    max_length: int | None = option(None, help="longest benchmark input in tokens; longer prompts drop shots (default: the model's context)")
    batch_size: int = option(8, help="sequences per forward pass")
    harness: bool = option(False, help="benchmark log-likelihoods computed by lm-evaluation-harness (pip install lm-eval==0.4.13), same prompts")
    max_documents: int | None = option(None, help="score only the first N documents of each corpus")
    device: str = option("auto", help="device for the forward passes: auto (cuda when available), cpu, cuda, cuda:1, ...")

    def problems(self) -> list[str]:
        found = named_corpora(self.data)[1]
        if self.benchmark and self.benchmark_dir is None:
            found.append(f"--benchmark {self.benchmark} needs --benchmark-dir DIR (the benchmark's files)")
        if self.benchmark_dir is not None and not self.benchmark:
            found.append(f"--benchmark-dir needs --benchmark ({'|'.join(KINDS)})")
        if self.harness and not self.benchmark:
            found.append("--harness scores benchmark questions; add --benchmark KIND --benchmark-dir DIR")
        if self.with_template is not None:
            from zhllama.sft.templates import TEMPLATES

            if self.with_template not in TEMPLATES:
                found.append(f"--with-template: unknown template {self.with_template!r}; known: {', '.join(TEMPLATES)}")
        self.subjects = [s for item in self.subjects for s in str(item).split(",") if s]
        at_least(found, "--shots", self.shots, 0)
        at_least(found, "--limit", self.limit, 1)
        at_least(found, "--block-size", self.block_size, 2)
        at_least(found, "--max-length", self.max_length, 2)
        at_least(found, "--batch-size", self.batch_size, 1)
        at_least(found, "--max-documents", self.max_documents, 1)
        return found

    @property
    def measures_anything(self) -> bool:
        return bool(self.data or self.benchmark)


@dataclass(kw_only=True)
class EvalOptions(ChainArgs, MeasureArgs):
    json: Path | None = option(None, help="also write every figure to this JSON file")
    predictions: Path | None = option(None, help="write one JSON line per benchmark question (answer, prediction, log-probabilities)")

    def problems(self) -> list[str]:
        found = [] if self.measures_anything else ["give --data NAME=CORPUS and/or --benchmark KIND --benchmark-dir DIR"]
        if self.predictions is not None and not self.benchmark:
            found.append("--predictions needs --benchmark")
        return found


@dataclass
class EvalResult:
    chain: dict
    block_size: int
    corpora: dict[str, dict]  # name -> figures of :func:`score_texts` plus "corpus"
    benchmark: BenchmarkResult | None = None

    def as_dict(self) -> dict:
        return {
            "chain": self.chain,
            "block_size": self.block_size,
            "corpora": self.corpora,
            "benchmark": self.benchmark.as_dict() if self.benchmark else None,
        }

    def summary(self) -> str:
        parts = []
        if self.corpora:
            width = max(len(name) for name in [*self.corpora, "corpus"])
            lines = [f"{'corpus'.ljust(width)}  {'documents':>9}  {'tokens':>10}  {'tokens/char':>11}  {'perplexity':>10}  {'bits/char':>9}  {'bits/byte':>9}"]
            for name, f in self.corpora.items():
                lines.append(
                    f"{name.ljust(width)}  {f['documents']:>9}  {f['tokens']:>10}  {f['tokens_per_character']:>11.4f}  "
                    f"{f['perplexity']:>10.3f}  {f['bits_per_character']:>9.4f}  {f['bits_per_byte']:>9.4f}"
                )
            parts.append("\n".join(lines))
        if self.benchmark:
            parts.append(self.benchmark.table())
        return "\n\n".join(parts)


def model_context(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_subjects(options: MeasureArgs) -> list:
    """The benchmark's subjects, every file read and checked (before any weights are loaded)."""
    if not options.benchmark:
        return []
    return load_benchmark(options.benchmark, options.benchmark_dir, subjects=options.subjects, shots=options.shots, limit=options.limit)


def measure(chain, options: MeasureArgs, subjects: list) -> EvalResult:
    """Every figure ``options`` asks for, on an already loaded chain (:class:`ModelChain`) and
    the benchmark's ``subjects`` (:func:`load_subjects`)."""
    context = model_context(chain.model)
    for flag, value in (("--block-size", options.block_size if options.data else None), ("--max-length", options.max_length)):
        if context is not None and value is not None and value > context:
            raise ZhllamaError(f"{flag} {value} exceeds the model's context of {context} tokens ({chain.model_dir}); lower it")
    try:
        chain.model.to(pick_device(options.device))
    except (RuntimeError, AssertionError) as e:
        raise ZhllamaError(f"--device {options.device}: cannot use it ({' '.join(str(e).split())[:200]})") from e
    corpora = {}
    for name, spec in named_corpora(options.data)[0].items():
        texts = read_texts(spec, **options.corpus_kwargs(), max_documents=options.max_documents)
        figures = score_texts(chain.model, chain.tokenizer, texts, block_size=options.block_size, batch_size=options.batch_size)
        corpora[name] = {"corpus": spec, **figures}
    benchmark = None
    if options.benchmark:
        from zhllama.sft.templates import get_template

        benchmark = run_benchmark(
            chain.model,
            chain.tokenizer,
            subjects,
            kind=options.benchmark,
            shots=options.shots,
            max_length=options.max_length or context or 2048,
            batch_size=options.batch_size,
            template=get_template(options.with_template) if options.with_template else None,
            harness=options.harness,
        )
    return EvalResult(chain.describe(), options.block_size, corpora, benchmark)


def evaluate_chain(options: EvalOptions) -> EvalResult:
    """Bits per character and per byte of a model chain on named corpora, and its accuracy on a
    multiple-choice benchmark; optionally written as JSON and per-question JSON lines."""
    for path in (options.json, options.predictions):
        if path is not None and Path(path).is_dir():
            raise ZhllamaError(f"{path}: is a directory; give a file name")
    if options.data:
        check_block_size(options.model, options.block_size)
    subjects = load_subjects(options)
    result = measure(options.load(), options, subjects)
    if options.json is not None:
        # the scores mean nothing without the text they were measured on and the code that measured
        from zhllama.corpus import find_corpus_files

        inputs = {name: [describe_input(p) for p in find_corpus_files([spec])] for name, spec in named_corpora(options.data)[0].items()}
        record = {**result.as_dict(), "inputs": inputs, "versions": library_versions()}
        with atomic_output_file(options.json) as tmp:
            tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if options.predictions is not None and result.benchmark is not None:
        with atomic_output_file(options.predictions) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                for p in result.benchmark.predictions:
                    line = {"subject": p.subject, "index": p.index, "answer": p.answer, "prediction": p.prediction, "logprobs": p.logprobs}
                    fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return result
