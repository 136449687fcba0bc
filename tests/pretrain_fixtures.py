"""Helpers for the extend / pretrain / eval tests: a merged tokenizer made with the real
``zhllama vocab`` commands, extended tiny models, and a CLI runner that checks the exit code."""

from __future__ import annotations

import json
from pathlib import Path

from zhllama.demo import tiny
from zhllama.cli import main

# a tiny run's TrainingArguments: CPU, quiet, deterministic
TRAIN_FLAGS = ["--use-cpu", "--disable-tqdm", "true", "--seed", "0", "--per-device-train-batch-size", "8", "--logging-steps", "2"]


def run(argv: list, expect: int = 0) -> None:
    code = main([str(a) for a in argv])
    assert code == expect, f"zhllama {' '.join(map(str, argv))} exited {code}, expected {expect}"


def make_merged_tokenizer(workdir: Path, base_tokenizer_dir: Path, corpus: Path) -> Path:
    """base tokenizer + a Chinese SentencePiece model trained on ``corpus``, merged."""
    run(["vocab", "train", corpus, "--out", workdir / "zh_sp", "--vocab-size", "2400"])
    run(["vocab", "merge", "--base", base_tokenizer_dir, "--add", workdir / "zh_sp" / "chinese_sp.model", "--out", workdir / "merged"])
    return workdir / "merged"


def manifest(directory: Path) -> dict:
    return json.loads((Path(directory) / "zhllama.json").read_text(encoding="utf-8"))


def write_corpora(directory: Path) -> tuple[Path, Path]:
    """Chinese training and held-out text (different sentences)."""
    train = tiny.write_lines(directory / "train.txt", tiny.chinese_sentences(600, seed=1))
    held_out = tiny.write_lines(directory / "held_out.txt", tiny.chinese_sentences(60, seed=2))
    return train, held_out


def count_training_steps(monkeypatch) -> list[int]:
    """The global step (1-based) of every training step the next in-process run takes."""
    from zhllama.training import AdapterTrainer

    steps: list[int] = []
    original = AdapterTrainer.training_step

    def counting(self, *args, **kwargs):
        steps.append(self.state.global_step + 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdapterTrainer, "training_step", counting)
    return steps
