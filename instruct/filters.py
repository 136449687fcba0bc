"""Which generated tasks are kept: the filters of self-instruct / Alpaca, for Chinese too.

A task is dropped, for the first reason that applies, when its instruction is too short or too
long (in ROUGE tokens: characters of Chinese, words of English), asks for something a text
model cannot do (images, audio, video, files), has an empty output, repeats a kept or seed
task exactly (same instruction and input), or has a ROUGE-L similarity of at least the
threshold to any kept or seed instruction. Every kept task joins the pool the next ones are
compared against, so near-duplicates within one reply are caught too.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from .rouge import SimilarityIndex, rouge_tokens
from .seeds import Task

TOO_SHORT = "instruction too short"
TOO_LONG = "instruction too long"
NOT_TEXT = "asks for images, audio, video or files"
EMPTY_OUTPUT = "empty output"
EXACT_DUPLICATE = "exact duplicate"
SIMILAR = "similar to a kept or seed instruction (ROUGE-L)"
MALFORMED = "malformed record"
UNPARSEABLE = "unparseable reply"
REASONS = (UNPARSEABLE, MALFORMED, TOO_SHORT, TOO_LONG, NOT_TEXT, EMPTY_OUTPUT, EXACT_DUPLICATE, SIMILAR)

# What a text-only model cannot produce or read. English as Alpaca's list of such words;
# Chinese written for zhllama (no bare 画 or 图: 画蛇添足, 图书馆 are fine).
_NOT_TEXT_EN = re.compile(
    r"\b(images?|pictures?|photos?|graphs?|plots?|draw|drawing|maps?|diagrams?|flowcharts?|videos?|audio|music|files?|"
    r"attachments?|upload|go to)\b",
    re.I,
)
_NOT_TEXT_ZH = re.compile(
    r"图片|图像|照片|相片|插图|示意图|流程图|思维导图|画一|画出|画个|绘制|视频|音频|录音|音乐|歌曲|乐曲|文件|附件|上传|下载|链接|网址|地图"
)


def _key(text: str) -> str:
    return " ".join(text.split())


@dataclass
class TaskFilter:
    """The pool of kept and seed tasks, and the check a new task must pass to join it."""

    threshold: float = 0.7
    min_length: int = 3
    max_length: int = 150
    unit: str = "char"
    _index: SimilarityIndex = field(init=False)
    _exact: set[tuple[str, str]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._index = SimilarityIndex(self.unit)

    def add(self, task: Task) -> None:
        """Put a task in the pool without checking it (seeds, and tasks kept by an earlier run)."""
        self._exact.add((_key(task.instruction), _key(task.input)))
        self._index.add(rouge_tokens(task.instruction, self.unit))

    def reason_to_drop(self, task: Task) -> str | None:
        """Why ``task`` is dropped, or None if it is kept (and then added to the pool)."""
        tokens = rouge_tokens(task.instruction, self.unit)
        if len(tokens) < self.min_length:
            return TOO_SHORT
        if len(tokens) > self.max_length:
            return TOO_LONG
        if _NOT_TEXT_EN.search(task.instruction) or _NOT_TEXT_ZH.search(task.instruction):
            return NOT_TEXT
        if not task.output.strip():
            return EMPTY_OUTPUT
        if (_key(task.instruction), _key(task.input)) in self._exact:
            return EXACT_DUPLICATE
        if self._index.reaches(tokens, self.threshold) is not None:
            return SIMILAR
        self._exact.add((_key(task.instruction), _key(task.input)))
        self._index.add(tokens)
        return None


def counts_line(counts: Counter) -> str:
    """Drop counts in the fixed order of :data:`REASONS`, e.g. ``"3 exact duplicate, 1 empty output"``."""
    return ", ".join(f"{counts[r]} {r}" for r in REASONS if counts.get(r)) or "none"
