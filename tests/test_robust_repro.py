"""Reproducible: the same inputs and --seed give byte-identical tokenizer files, an identical
extended model and identical training losses on CPU — and a different seed gives a different
result where randomness is involved, so the tests would notice a seed that is ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from robust_fixtures import TRAIN_FLAGS, build_chain, dir_bytes, ok

from zhllama.demo import tiny


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir):
    return build_chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir)


def losses(out: Path) -> list[float]:
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in entries if "loss" in e]


def test_vocab_train_is_byte_identical_for_a_seed(tmp_path, chinese_corpus):
    # --max-sentences below the corpus size: the seed drives the sample as well as SentencePiece
    argv = ["vocab", "train", chinese_corpus, "--vocab-size", "2000", "--max-sentences", "2000", "--jieba", "--threads", "2"]
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        ok([*argv, "--out", tmp_path / name, "--seed", seed])
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    assert dir_bytes(tmp_path / "a") != dir_bytes(tmp_path / "c")


def test_vocab_merge_is_byte_identical(tmp_path, base_tokenizer_dir, zh_sp_dir, merged_tokenizer_dir):
    ok(["vocab", "merge", "--base", base_tokenizer_dir, "--add", zh_sp_dir / "chinese_sp.model", "--out", tmp_path / "again"])
    assert dir_bytes(tmp_path / "again") == dir_bytes(merged_tokenizer_dir)


@pytest.mark.parametrize("init", ["subword-mean", "random"])
def test_extend_is_identical_for_a_seed(init, tmp_path, tiny_model_dir, merged_tokenizer_dir):
    argv = ["extend", "--model", tiny_model_dir, "--tokenizer", merged_tokenizer_dir, "--init", init]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ok([*argv, "--out", tmp_path / name, "--seed", seed])
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")
    seed_matters = dir_bytes(tmp_path / "a") != dir_bytes(tmp_path / "c")
    assert seed_matters == (init == "random")  # subword-mean has no randomness at all


def pretrain(chain, out: Path, stage: int, seed: int, *extra) -> list[float]:
    ok([
        "pretrain", "--stage", stage, "--model", chain.extended, "--data", chain.corpus, "--out", out, "--block-size", "32",
        "--validation-split", "0", "--cache-dir", out.parent / "cache", "--max-steps", "4", *TRAIN_FLAGS, "--seed", seed, *extra,
    ])  # fmt: skip
    return losses(out)


def test_pretrain_losses_are_identical_for_a_seed(chain, tmp_path):
    first = pretrain(chain, tmp_path / "s1a", 1, 0)
    assert pretrain(chain, tmp_path / "s1b", 1, 0) == first
    # stage 2: LoRA's random initialisation must follow the seed too
    second = pretrain(chain, tmp_path / "s2a", 2, 0, "--adapter", chain.stage1)
    assert pretrain(chain, tmp_path / "s2b", 2, 0, "--adapter", chain.stage1) == second
    assert pretrain(chain, tmp_path / "s2c", 2, 1, "--adapter", chain.stage1) != second


def test_sft_losses_are_identical_for_a_seed(chain, tmp_path):
    data = tiny.write_json(tmp_path / "sft.json", tiny.instruction_records(16))

    def sft(name: str, seed: int) -> list[float]:
        ok([
            "sft", "--model", chain.extended, "--data", data, "--template", "alpaca", "--out", tmp_path / name,
            "--max-steps", "3", "--max-seq-length", "256", *TRAIN_FLAGS, "--seed", seed,
        ])  # fmt: skip
        return losses(tmp_path / name)

    first = sft("a", 0)
    assert len(first) == 3 and sft("b", 0) == first
    assert sft("c", 1) != first  # LoRA's initialisation and the data order follow --seed
