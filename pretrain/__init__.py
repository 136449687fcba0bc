"""Model surgery and continued pretraining: ``zhllama extend``, ``zhllama pretrain``, ``zhllama eval``.

The API, callable from a notebook:

- :func:`extend_model` (:class:`ExtendOptions` -> :class:`ExtendResult`): resize a model to a
  merged tokenizer, new rows initialised from the base pieces they split into and, given
  ``--init-corpus``, trained on it with everything else frozen (pretrain/init.py, pretrain/stage0.py).
- :func:`build_blocks` / :func:`stream_blocks`: corpus → packed token blocks (cached Arrow).
- :func:`pretrain_chain` (:class:`PretrainOptions`, ``TrainingArguments``) -> :class:`PretrainResult`: stage 1 or 2.
- :func:`evaluate_chain` (:class:`EvalOptions`) and :func:`score_texts`: perplexity and bits per character.
"""

from zhllama.pretrain.data import build_blocks, collate_blocks, stream_blocks
from zhllama.pretrain.evaluate import EvalOptions, evaluate_chain, score_texts
from zhllama.pretrain.extend import ExtendOptions, ExtendResult, extend_model
from zhllama.pretrain.train import PretrainOptions, PretrainResult, pretrain_chain

__all__ = [
    "ExtendOptions",
    "ExtendResult",
    "extend_model",
    "build_blocks",
    "stream_blocks",
    "collate_blocks",
    "PretrainOptions",
    "PretrainResult",
    "pretrain_chain",
    "EvalOptions",
    "evaluate_chain",
    "score_texts",
]
