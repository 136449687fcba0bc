"""``zhllama eval`` moved to :mod:`zhllama.evaluate`; these names stay importable from here."""

from zhllama.evaluate.perplexity import score_texts, scoring_windows
from zhllama.evaluate.run import EvalOptions, evaluate_chain

__all__ = ["EvalOptions", "evaluate_chain", "score_texts", "scoring_windows"]
