"""``zhllama vocab train|merge|stats``: each command's options mapped to its function.

Each entry is a :class:`zhllama.options.Command`; the command table in ``zhllama/cli.py``
looks them up by name and prints the result's ``summary()``.
"""

from zhllama.options import Command
from zhllama.vocab.merge import MergeOptions, merge_tokenizers
from zhllama.vocab.stats import StatsOptions, tokenizer_stats
from zhllama.vocab.train import TrainOptions, train_sp_model

train = Command(TrainOptions, train_sp_model)
merge = Command(MergeOptions, merge_tokenizers)
stats = Command(StatsOptions, tokenizer_stats)
