"""``zhllama rm`` (score head + LoRA on the chain, trl's RewardTrainer) and ``zhllama rm score``."""

from __future__ import annotations

import json

import pytest
import torch
from preference_fixtures import preference_records

from zhllama.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAINING = ["--per-device-train-batch-size", "8", "--save-strategy", "no", "--disable-tqdm", "true", "--seed", "0", "--overwrite"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from zhllama.demo import tiny

    directory = tmp_path_factory.mktemp("rm_pairs")
    return tiny.write_json(directory / "train.json", preference_records(32)), tiny.write_json(directory / "heldout.json", preference_records(8, seed=1))


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_model_dir, pairs):
    out = tmp_path_factory.mktemp("rm") / "adapter"
    argv = ["rm", "--model", str(tiny_model_dir), "--data", str(pairs[0]), "--validation-data", str(pairs[1]), "--template", "alpaca",
            "--out", str(out), "--max-steps", "12", "--learning-rate", "5e-3", "--logging-steps", "3", *TRAINING]  # fmt: skip
    torch.set_num_threads(1)
    assert main(argv) == 0
    return out


def test_rm_writes_a_sequence_classification_adapter(rm_dir):
    from safetensors import safe_open

    config = json.loads((rm_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    with safe_open(str(rm_dir / "adapter_model.safetensors"), "pt") as fh:
        assert any(name.endswith("score.weight") for name in fh.keys())
    entries = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all({"accuracy", "margin"} <= e.keys() for e in entries if "loss" in e)
    figures = json.loads((rm_dir / "zhllama.json").read_text(encoding="utf-8"))["figures"]
    before, after = figures["before"]["train"]["reward"], figures["after"]["train"]["reward"]
    assert abs(before["margin"]) < 0.1 and after["margin"] > 1.0 and after["accuracy"] > 0.9, (before, after)


def test_rm_score_writes_the_rewards_the_summary_measured(rm_dir, tiny_model_dir, pairs, tmp_path):
    from zhllama.demo import tiny

    scores = tmp_path / "scores.jsonl"
    assert main(["rm", "score", "--model", str(tiny_model_dir), "--adapter", str(rm_dir), "--data", str(pairs[1]), "--out", str(scores)]) == 0
    lines = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines()]
    assert [line["source"] for line in lines] == [f"{pairs[1]} record {i}" for i in range(1, 9)]
    margins = torch.tensor([line["chosen_reward"] - line["rejected_reward"] for line in lines])
    held_out = json.loads((rm_dir / "zhllama.json").read_text(encoding="utf-8"))["figures"]["after"]["validation"]["reward"]
    assert margins.mean().item() == pytest.approx(held_out["margin"], abs=1e-4)
    assert (margins > 0).float().mean().item() == pytest.approx(held_out["accuracy"])

    # instruction records (as sft reads them) get one reward each
    instructions = tiny.write_json(tmp_path / "sft.json", tiny.instruction_records(5))
    assert main(["rm", "score", "--model", str(tiny_model_dir), "--adapter", str(rm_dir), "--data", str(instructions), "--out", str(scores), "--overwrite"]) == 0
    assert [set(json.loads(line)) for line in scores.read_text(encoding="utf-8").splitlines()] == [{"source", "reward"}] * 5


def test_rm_score_refuses_an_adapter_that_is_not_a_reward_model(rm_dir, tiny_model_dir, pairs, tmp_path, capsys):
    import shutil

    fake = tmp_path / "not_rm"
    shutil.copytree(rm_dir, fake)
    recorded = json.loads((fake / "zhllama.json").read_text(encoding="utf-8"))
    (fake / "zhllama.json").write_text(json.dumps({**recorded, "command": "sft"}), encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    assert main(["rm", "score", "--model", str(tiny_model_dir), "--adapter", str(fake), "--data", str(pairs[1]), "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert "not a reward model" in error and len(error.splitlines()) == 1 and not out.exists()
