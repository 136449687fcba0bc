"""Helpers for the vocab tests: tiny SentencePiece models trained in code, and fuzz text.

Nothing here touches the real assets; every model trains in a second or two on text made
from jieba's dictionary and a list of English words (``zhllama.demo.tiny``).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import sentencepiece as spm

from zhllama.demo import tiny

LLAMA_STYLE = tiny.LLAMA_STYLE_TRAINER_SPEC


def training_lines(seed: int = 0, english: int = 1500, chinese: int = 300) -> list[str]:
    """English sentences (with some indentation and space runs) plus a share of Chinese."""
    rng = random.Random(seed)
    lines = tiny.english_sentences(english, seed=seed) + tiny.chinese_sentences(chinese, seed=seed + 1, top_words=800)
    lines += [" " * rng.randint(1, 8) + line for line in tiny.english_sentences(200, seed=seed + 2)]
    lines += ["def f(x):", "    return x  # comment", "\tindented\twith\ttabs", "a  b   c    d"] * 20
    return lines


def train_sp(lines: list[str] | None = None, *, vocab_size: int = 1200, **overrides) -> bytes:
    """A small SentencePiece model; LLaMA-style unless ``overrides`` say otherwise."""
    settings = {**LLAMA_STYLE, **overrides}
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines or training_lines()),
        model_writer=model,
        vocab_size=vocab_size,
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=2,
        **settings,
    )
    return model.getvalue()


def write_model(path: Path, model: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    return path


# Pools for fuzz text: the hard cases for SentencePiece/HF parity.
_WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", " \n ", "\t\t", "        ", "\r\n"]
_ODD = list("½€™©éüñßøЖжλπ🦙😀👍🏽✅🚀⁉️\u200d\u00a0\u2581") + ["😶\u200d🌫️", "e\u0301", "ﬁ", "Å"]
_FULL_WIDTH = list("，。！？；：（）《》【】「」、…—“”‘’ＡＢＣａｂｃ０１２３４５％＆＠")
_ASCII_PUNCT = list(".,!?;:'\"()[]{}<>-_=+*/\\|@#$%^&~`")


def fuzz_texts(count: int, seed: int = 0) -> list[str]:
    """Random texts mixing English, Chinese, digits, whitespace runs, emoji and odd characters."""
    rng = random.Random(seed)
    words, _ = tiny.jieba_words()
    chinese = list(words[:3000])
    pools = [
        lambda: rng.choice(tiny.ENGLISH_WORDS),
        lambda: rng.choice(tiny.ENGLISH_WORDS).capitalize(),
        lambda: rng.choice(chinese),
        lambda: "".join(rng.choice(chinese) for _ in range(rng.randint(1, 4))),
        lambda: str(rng.randint(0, 10**rng.randint(1, 12))),
        lambda: rng.choice(_WHITESPACE),
        lambda: rng.choice(_ODD),
        lambda: rng.choice(_FULL_WIDTH),
        lambda: rng.choice(_ASCII_PUNCT),
        lambda: chr(rng.randint(0x4E00, 0x9FFF)),  # any Han, mostly unknown to small models
        lambda: chr(rng.choice([rng.randint(0x80, 0x2FFF), rng.randint(0xAC00, 0xD7A3), rng.randint(0x1F300, 0x1FAFF)])),
    ]
    texts = ["", " ", "  ", "\n", "\t", " leading", "trailing ", "  both  ", "a\n\nb", "    indented"]
    while len(texts) < count:
        parts = [rng.choice(pools)() for _ in range(rng.randint(1, 14))]
        sep = rng.choice(["", " ", " ", ""])
        texts.append(sep.join(parts))
    return texts[:count]
