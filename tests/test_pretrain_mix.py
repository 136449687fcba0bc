"""English replay: ``pretrain --data zh --data en --data-weights``, mixed by weight (seeded,
each corpus cached on its own, streaming too), and named ``--validation-data`` sets scored
separately with bits per character, in metrics.jsonl and zhllama.json; bad input."""

from __future__ import annotations

import json
import math

import pytest

from pretrain_fixtures import TRAIN_FLAGS, manifest, run
from zhllama.demo import tiny
from zhllama.mixing import count_sources, mix

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    work = tmp_path_factory.mktemp("mix")
    return {
        "work": work,
        "zh": tiny.write_lines(work / "zh.txt", tiny.chinese_sentences(500, seed=1)),
        "en": tiny.write_lines(work / "en.txt", tiny.english_sentences(500, seed=1)),
        "zh_held": tiny.write_lines(work / "zh_held.txt", tiny.chinese_sentences(40, seed=2)),
        "en_held": tiny.write_lines(work / "en_held.txt", tiny.english_sentences(40, seed=2)),
    }


def mix_argv(corpora, model, out, *extra, weights=("0.8", "0.2"), steps=4) -> list:
    """Stage 2 (LoRA only: the tiny base has no new rows) on zh + en by weight."""
    return [
        "pretrain", "--stage", 2, "--model", model, "--data", corpora["zh"], "--data", corpora["en"],
        "--data-weights", *weights, "--train-embeddings", "none", "--lora-r", 4,
        "--validation-data", f"zh={corpora['zh_held']}", "--validation-data", f"en={corpora['en_held']}",
        "--out", out, "--block-size", 32, "--cache-dir", corpora["work"] / "cache",
        "--max-steps", steps, "--learning-rate", "5e-3", "--warmup-steps", 0, *TRAIN_FLAGS, *extra,
    ]  # fmt: skip


def test_mix_realises_the_weights_and_is_seeded():
    from datasets import Dataset

    zh = Dataset.from_dict({"input_ids": [[i] for i in range(3000)]})
    en = Dataset.from_dict({"input_ids": [[-i] for i in range(3000)]})
    mixed = mix([zh, en], [0.8, 0.2], seed=7)
    counts = count_sources(mixed, 2)
    assert counts[0] == 3000  # first_exhausted: the mix ends when zh, drawn 80% of the time, runs out
    assert counts[0] / sum(counts) == pytest.approx(0.8, abs=0.02)
    assert mix([zh, en], [4, 1], seed=7)["input_ids"] == mixed["input_ids"]  # weights are proportions; same seed, same mix
    assert mix([zh, en], [0.8, 0.2], seed=8)["input_ids"] != mixed["input_ids"]
    refilled = count_sources(mix([zh, en], [0.8, 0.2], seed=7, stopping_strategy="all_exhausted"), 2)
    assert refilled[1] >= 3000 and refilled[0] / sum(refilled) == pytest.approx(0.8, abs=0.02)  # zh repeats until en is used up


def test_weighted_corpora_are_cached_one_by_one_and_named_sets_scored_separately(corpora, tiny_model_dir, tmp_path):
    out = tmp_path / "mixed"
    run(mix_argv(corpora, tiny_model_dir, out))
    written = manifest(out)
    train_info = written["data"]["train"]
    assert set(train_info) == {str(corpora["zh"]), str(corpora["en"])}
    assert len({entry["key"] for entry in train_info.values()}) == 2 and not any(e["cache_hit"] for e in train_info.values())

    mixed = written["figures"]["mix"]
    shares = {name: source["share"] for name, source in mixed["sources"].items()}
    assert shares[str(corpora["zh"])] == pytest.approx(0.8, abs=0.1) and sum(shares.values()) == pytest.approx(1)
    assert mixed["stopping_strategy"] == "first_exhausted" and mixed["counted_from"] == "dataset"

    validation = written["figures"]["validation"]
    keys = {"loss_before", "loss_after", "bits_per_char_before", "bits_per_char_after"}
    assert set(validation) == {"zh", "en"} and all(set(v) == keys for v in validation.values())
    for name in ("zh", "en"):
        info = written["data"]["validation"][name]
        per_char = info["tokens"] / info["characters"]
        v = validation[name]
        assert v["bits_per_char_after"] == pytest.approx(v["loss_after"] / math.log(2) * per_char)
    # the English held-out text is far cheaper per character under this tokenizer than Chinese
    assert validation["en"]["bits_per_char_after"] < validation["zh"]["bits_per_char_after"]

    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("zh", "en"):
        scored = [e for e in entries if f"eval_{name}_loss" in e]
        assert [e["step"] for e in scored] == [0, 4]  # before training and at the end
        assert all(f"eval_{name}_bits_per_char" in e for e in scored)
    assert (out / "loss.png").stat().st_size > 1000

    again = tmp_path / "again"
    run(mix_argv(corpora, tiny_model_dir, again, weights=("0.5", "0.5"), steps=2))
    assert all(e["cache_hit"] for e in manifest(again)["data"]["train"].values())  # a new weight builds nothing
    shares = {n: s["share"] for n, s in manifest(again)["figures"]["mix"]["sources"].items()}
    assert shares[str(corpora["zh"])] == pytest.approx(0.5, abs=0.1)


def test_streaming_mix_counts_the_blocks_it_trained_on(corpora, tiny_model_dir, tmp_path):
    out = tmp_path / "streamed"
    run(mix_argv(corpora, tiny_model_dir, out, "--streaming", weights=("3", "1"), steps=8))
    mixed = manifest(out)["figures"]["mix"]
    assert mixed["counted_from"] == "training batches"
    counts = {n: s["examples"] for n, s in mixed["sources"].items()}
    assert sum(counts.values()) >= 8 * 8  # every block of 8 steps x 8 (plus what the loader read ahead)
    assert counts[str(corpora["zh"])] / sum(counts.values()) == pytest.approx(0.75, abs=0.15)
    assert set(manifest(out)["figures"]["validation"]) == {"zh", "en"}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("zhllama: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weights": ("1",)}, "one weight per --data source: 2 source(s), 1 weight(s)"),
        ({"weights": ("0.5", "-0.1")}, "must not be negative"),
        ({"weights": ("0", "0")}, "all zero"),
        ({"validation": "=held.txt"}, "empty name before '='"),
    ],
)
def test_bad_weights_or_names_fail_with_one_line_and_no_output(corpora, tiny_model_dir, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    argv = mix_argv(corpora, tiny_model_dir, out, weights=change.get("weights", ("0.8", "0.2")))
    if "validation" in change:
        argv[argv.index(f"en={corpora['en_held']}")] = change["validation"]
    run(argv, expect=1)
    assert message in one_line_error(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
