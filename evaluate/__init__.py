"""Measuring a model chain: bits per character and per byte on named corpora, multiple-choice
benchmarks (CMMLU, C-Eval, MMLU) from their own files, and one report across a run's stages.

- :func:`evaluate_chain` (:class:`EvalOptions`) -> :class:`EvalResult`: ``zhllama eval``.
- :func:`report_run` (:class:`ReportOptions`) -> :class:`ReportResult`: ``zhllama report``.
- :func:`score_texts`, :func:`run_benchmark`, :func:`load_benchmark`: the pieces, for notebooks.
"""

from zhllama.evaluate.benchmarks import load_benchmark
from zhllama.evaluate.multiple_choice import BenchmarkResult, run_benchmark
from zhllama.evaluate.perplexity import score_texts
from zhllama.evaluate.report import ReportOptions, ReportResult, report_run
from zhllama.evaluate.run import EvalOptions, EvalResult, evaluate_chain

__all__ = [
    "BenchmarkResult",
    "EvalOptions",
    "EvalResult",
    "ReportOptions",
    "ReportResult",
    "evaluate_chain",
    "load_benchmark",
    "report_run",
    "run_benchmark",
    "score_texts",
]
