"""Chinese vocabulary for LLaMA-style tokenizers: train, merge, measure, write HF files.

The public API (the CLI in ``zhllama.vocab.cli`` is a thin layer over it):

- :func:`train_sp_model` (``zhllama vocab train``): a Chinese SentencePiece model;
- :func:`merge_tokenizers` / :func:`merge_sp_models` (``zhllama vocab merge``): append CJK
  pieces to a base tokenizer without moving an id;
- :func:`tokenizer_stats` (``zhllama vocab stats``): tokens per character, HF/SP parity;
- :func:`save_hf_tokenizer`: tokenizer.json & co. that encode exactly like a SentencePiece
  BPE model under ``AutoTokenizer``; :func:`load_sp_model`, :func:`load_hf_tokenizer`.
"""

from zhllama.vocab.hf import build_hf_tokenizer, save_hf_tokenizer
from zhllama.vocab.merge import MergeOptions, MergeReport, merge_sp_models, merge_tokenizers
from zhllama.vocab.spmodel import is_cjk_piece, is_han_char, load_sp_model, load_sp_proto
from zhllama.vocab.stats import StatsOptions, TokenizerStats, format_table, measure, tokenizer_stats
from zhllama.vocab.train import TrainOptions, train_sp_model

__all__ = [
    "MergeOptions",
    "MergeReport",
    "StatsOptions",
    "TokenizerStats",
    "TrainOptions",
    "build_hf_tokenizer",
    "format_table",
    "is_cjk_piece",
    "is_han_char",
    "load_sp_model",
    "load_sp_proto",
    "measure",
    "merge_sp_models",
    "merge_tokenizers",
    "save_hf_tokenizer",
    "tokenizer_stats",
    "train_sp_model",
]
