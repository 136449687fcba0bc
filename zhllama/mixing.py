"""Mixing training sources by weight (``--data-weights``), for ``pretrain`` and ``sft``.

Each ``--data`` value is one source; ``--data-weights`` gives one weight per source (any
non-negative numbers, normalised to probabilities). Examples are drawn with
``datasets.interleave_datasets(probabilities=..., seed=...)``: at each position a source is
picked at random by weight and its next example taken. When a source runs out,
``--stopping-strategy`` decides:

- ``first_exhausted`` (default, datasets' own default): the mix ends as soon as any source has
  been used up. No example repeats and each source's share matches its weight, but the other
  sources are only partly used when the weights and the source sizes disagree.
- ``all_exhausted``: sources that run out start again until every source has been used up at
  least once (the small ones repeat; the mix can get long when a weight is small).
- ``all_exhausted_without_replacement``: every example of every source exactly once; once a
  source is used up the remaining ones share its weight, so the shares drift from the weights.

The mixed dataset carries a ``source`` column (the index of the source each example came
from), so the realised share can be counted: exactly from the dataset itself, or, for
streaming (no length), from the batches training draws (:class:`SourceCounter`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from zhllama.args import Options
from zhllama.options import option

STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")
SOURCE_COLUMN = "source"


@dataclass(kw_only=True)
class MixArgs(Options):
    """How several ``--data`` sources are mixed (the command declares ``data`` itself)."""

    data_weights: list[float] = option(
        default_factory=list, help="one weight per --data source: draw examples from each in this proportion (default: concatenate)"
    )
    stopping_strategy: str = option(
        "first_exhausted", choices=STOPPING_STRATEGIES, help="when a weighted mix ends: when any source runs out, or when all have"
    )

    def problems(self) -> list[str]:
        found = weight_problems(self.data_weights, len(getattr(self, "data", None) or []))
        if self.stopping_strategy not in STOPPING_STRATEGIES:
            found.append(f"--stopping-strategy must be one of {', '.join(STOPPING_STRATEGIES)} (got {self.stopping_strategy!r})")
        return found


def weight_problems(weights: Sequence[float], sources: int) -> list[str]:
    """What is wrong with ``--data-weights`` for ``sources`` ``--data`` values (empty: fine)."""
    if not weights:
        return []
    found = []
    if len(weights) != sources:
        found.append(f"--data-weights needs one weight per --data source: {sources} source(s), {len(weights)} weight(s)")
    negative = [w for w in weights if w < 0]
    if negative:
        found.append(f"--data-weights must not be negative (got {', '.join(map(str, negative))})")
    elif sum(weights) <= 0:
        found.append("--data-weights are all zero; give at least one source a positive weight")
    return found


def probabilities(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [w / total for w in weights]


def mix(datasets: list, weights: Sequence[float], *, seed: int, stopping_strategy: str = "first_exhausted"):
    """``datasets`` (all ``Dataset`` or all ``IterableDataset``, same columns) interleaved by
    ``weights``, each example tagged with the index of its source in a ``source`` column."""
    from datasets import IterableDataset, interleave_datasets

    tagged = []
    for index, dataset in enumerate(datasets):
        if isinstance(dataset, IterableDataset):
            tagged.append(dataset.map(lambda batch, i=index: {SOURCE_COLUMN: [i] * len(next(iter(batch.values())))}, batched=True))
        else:
            tagged.append(dataset.add_column(SOURCE_COLUMN, [index] * len(dataset)))
    return interleave_datasets(tagged, probabilities=probabilities(weights), seed=seed, stopping_strategy=stopping_strategy)


@dataclass
class MixReport:
    """Planned weights and realised counts of each source, for ``zhllama.json``."""

    names: list[str]
    weights: list[float]
    stopping_strategy: str
    seed: int
    counts: list[int]
    counted_from: str  # "dataset" (exact) or "training batches" (streaming)
    available: list[int | None]  # examples each source had (None: streaming)

    def as_dict(self) -> dict:
        total = sum(self.counts)
        shares = {}
        for name, weight, count, available in zip(self.names, probabilities(self.weights), self.counts, self.available):
            shares[name] = {"weight": round(weight, 6), "examples": count, "share": round(count / total, 6) if total else None}
            if available is not None:
                shares[name]["available"] = available
        return {"stopping_strategy": self.stopping_strategy, "seed": self.seed, "counted_from": self.counted_from, "sources": shares}

    def summary(self) -> str:
        total = sum(self.counts) or 1
        return "mix " + ", ".join(
            f"{name} {count / total:.1%} (weight {weight:.0%})"
            for name, weight, count in zip(self.names, probabilities(self.weights), self.counts)
        )


def count_sources(mixed, sources: int) -> list[int]:
    """How many examples of each source a (map-style) mixed dataset holds."""
    counts = Counter(mixed[SOURCE_COLUMN])
    return [counts.get(i, 0) for i in range(sources)]


class SourceCounter:
    """A data collator wrapper counting the ``source`` of every example training draws (for
    streaming mixes, whose share cannot be read off a length). It counts in the process that
    collates: with ``--dataloader-num-workers`` above 0 the workers' counts are not seen."""

    def __init__(self, collator, sources: int):
        self.collator = collator
        self.counts = [0] * sources

    def __call__(self, features: list[dict]):
        for feature in features:
            if SOURCE_COLUMN in feature:  # validation batches come through here too, untagged
                self.counts[int(feature[SOURCE_COLUMN])] += 1
        return self.collator([{k: v for k, v in f.items() if k != SOURCE_COLUMN} for f in features])
