"""ROUGE-L similarity on Chinese and English text, for the near-duplicate filter.

ROUGE-L (Lin, 2004) scores two token sequences by their longest common subsequence (LCS):
recall = LCS / len(reference), precision = LCS / len(candidate), and the F-measure with
beta = 1, ``2 * LCS / (len(a) + len(b))``. Self-instruct compares instructions this way with the
``rouge-score`` package, whose tokenizer keeps only ``[a-z0-9]`` and so drops every Chinese
character: two different Chinese instructions would both tokenise to nothing. Here a token is
one CJK character, or one lower-cased run of other letters and digits (an English word);
punctuation and spaces are not tokens. ``unit="jieba"`` uses jieba's words instead of characters.

:class:`SimilarityIndex` holds every kept instruction and answers "is this new one too close to
any of them": a bound from shared tokens rules out most of them at once, and a bit-parallel LCS
(one big-integer step per token) scores the rest.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter

ROUGE_UNITS = ("char", "jieba")
_CJK = "\u2e80-\u2fdf\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_TOKEN = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")


def rouge_tokens(text: str, unit: str = "char") -> list[str]:
    """The tokens ROUGE-L compares: CJK characters (or jieba words) and lower-cased words."""
    if unit == "jieba":
        import jieba

        jieba.setLogLevel(60)  # its "building prefix dict" lines would interleave with the progress bar
        return [w.lower() for w in jieba.lcut(text) if _TOKEN.search(w)]
    return [t.lower() for t in _TOKEN.findall(text)]


def _match_masks(tokens: list[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << i)
    return masks


def _lcs_length(masks: dict[str, int], length: int, other: list[str]) -> int:
    """LCS length of the sequence behind ``masks`` (``length`` tokens) and ``other``.

    Bit-parallel LCS (Allison & Dix 1986; Hyyrö 2004): bit i of ``row`` is 0 where the LCS
    of the first tokens of ``other`` with the prefix ending at i grows; the zeros count the LCS.
    """
    full = (1 << length) - 1
    row = full
    for token in other:
        matches = row & masks.get(token, 0)
        row = ((row + matches) | (row - matches)) & full
    return length - row.bit_count()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    return _lcs_length(_match_masks(a), len(a), b) if a and b else 0


def rouge_l(a: str | list[str], b: str | list[str], unit: str = "char") -> float:
    """ROUGE-L F-measure (beta = 1) of two texts or token lists; 0 when either is empty."""
    a = rouge_tokens(a, unit) if isinstance(a, str) else a
    b = rouge_tokens(b, unit) if isinstance(b, str) else b
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class SimilarityIndex:
    """The instructions kept so far, and whether a new one comes too close to any of them.

    An exact LCS against every kept instruction costs one big-integer step per token per pair.
    Most pairs are ruled out first, all at once: the LCS is at most the number of tokens two
    texts share (with multiplicity), so ``2 * shared / (m + n)`` bounds the score. ``shared`` is
    summed for every kept instruction from an inverted index (token -> instructions holding it,
    and how often) with numpy; only instructions whose bound reaches the threshold get the exact LCS.
    """

    def __init__(self, unit: str = "char"):
        self.unit = unit
        self._masks: list[dict[str, int]] = []
        self._lengths = array("i")
        self._postings: dict[str, tuple[array, array]] = {}

    def __len__(self) -> int:
        return len(self._masks)

    def add(self, tokens: list[str]) -> None:
        if not tokens:
            return
        entry = len(self._masks)
        self._masks.append(_match_masks(tokens))
        self._lengths.append(len(tokens))
        for token, count in Counter(tokens).items():
            entries, counts = self._postings.setdefault(token, (array("i"), array("i")))
            entries.append(entry)
            counts.append(count)

    def reaches(self, tokens: list[str], threshold: float) -> float | None:
        """A ROUGE-L score >= ``threshold`` against some kept instruction, else None."""
        import numpy as np

        n = len(tokens)
        if not n or not self._masks:
            return None
        shared = np.zeros(len(self._masks), dtype=np.intc)
        for token, count in Counter(tokens).items():
            if token in self._postings:
                entries, counts = self._postings[token]
                # views of the arrays, not copies; each entry appears once per token, so += is exact
                shared[np.frombuffer(entries, dtype=np.intc)] += np.minimum(np.frombuffer(counts, dtype=np.intc), count)
        lengths = np.frombuffer(self._lengths, dtype=np.intc)
        for i in np.flatnonzero(2 * shared >= threshold * (lengths + n) - 1e-9):
            m = int(lengths[i])
            score = 2 * _lcs_length(self._masks[i], m, tokens) / (m + n)
            if score >= threshold:
                return score
        return None
