"""``zhllama vocab train|merge|stats``: flags → the functions in this package, nothing else.

Each entry is a :class:`zhllama.options.Command` (options dataclass + function); the command
table in ``zhllama/cli.py`` looks them up by name. The functions below only call the API and
print a short summary; the API functions themselves print nothing.
"""

from __future__ import annotations

from zhllama.options import Command
from zhllama.vocab.merge import MergeOptions, merge_tokenizers
from zhllama.vocab.stats import StatsOptions, format_table, tokenizer_stats
from zhllama.vocab.train import MODEL_FILE, TrainOptions, train_sp_model


def run_train(options: TrainOptions) -> None:
    """Train a Chinese SentencePiece model (chinese_sp.model) on a corpus.

    Identity normalisation and no byte fallback, so its pieces merge cleanly into a LLaMA
    tokenizer with `zhllama vocab merge`.
    """
    out = train_sp_model(options)
    print(f"wrote {out / MODEL_FILE}")


def run_merge(options: MergeOptions) -> None:
    """Merge Chinese SentencePiece pieces into a base LLaMA tokenizer, keeping every base id.

    Writes tokenizer.model plus an HF tokenizer (tokenizer.json, ...) that encodes exactly
    like it; counts go to zhllama.json.
    """
    out, report = merge_tokenizers(options)
    print(
        f"wrote {out}: {report.base_pieces:,} + {report.added:,} = {report.merged_pieces:,} pieces "
        f"({report.intermediates_added} intermediates, {report.duplicates_skipped} duplicates and "
        f"{report.non_cjk_skipped} non-CJK pieces skipped, {report.unreachable_dropped} unreachable dropped)"
    )


def run_stats(options: StatsOptions) -> None:
    """Compare tokenizers on corpora: tokens per character, byte fallback, HF/SentencePiece parity."""
    results = tokenizer_stats(options)
    print(format_table(results))
    if options.json is not None:
        print(f"wrote {options.json}")


train = Command(TrainOptions, run_train)
merge = Command(MergeOptions, run_merge)
stats = Command(StatsOptions, run_stats)
