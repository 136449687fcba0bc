"""End to end: ``zhllama dpo`` on a tiny chain (stage 1 + stage 2 + SFT adapters) with small
Chinese pairs: the adapter it writes, trl's per-step metrics, the implicit reward margin
measured here with peft (outside trl), the merged chain, and the losses' starting values."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_fixtures import chain_adapters, chain_model, load_merged, logits
from preference_fixtures import preference_records

from zhllama.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAINING = ["--per-device-train-batch-size", "8", "--save-strategy", "no", "--disable-tqdm", "true", "--seed", "0", "--overwrite"]
BETA = 0.1


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from zhllama.demo import tiny

    directory = tmp_path_factory.mktemp("pairs")
    return tiny.write_json(directory / "train.json", preference_records(32)), tiny.write_json(directory / "heldout.json", preference_records(8, seed=1))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir):
    torch.set_num_threads(1)
    return tiny_model_dir, chain_adapters(tiny_model_dir, tmp_path_factory.mktemp("chain"), tied=False, new_rows=[990, 995, 999])


def adapter_flags(adapters) -> list[str]:
    return [flag for adapter in adapters for flag in ("--adapter", str(adapter))]


@pytest.fixture(scope="module")
def dpo_dir(tmp_path_factory, chain, pairs):
    model_dir, adapters = chain
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    argv = ["dpo", "--model", str(model_dir), *adapter_flags(adapters), "--data", str(pairs[0]), "--validation-data", str(pairs[1]),
            "--template", "alpaca", "--out", str(out), "--beta", str(BETA), "--max-steps", "8", "--learning-rate", "1e-2",
            "--logging-steps", "2", "--eval-strategy", "steps", "--eval-steps", "4", *TRAINING]  # fmt: skip
    torch.set_num_threads(1)
    assert main(argv) == 0
    return out


def manifest(directory):
    return json.loads((directory / "zhllama.json").read_text(encoding="utf-8"))


def test_dpo_writes_an_adapter_of_the_chain(dpo_dir, chain):
    from zhllama.sft.templates import chat_template, get_template

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "zhllama.json", "metrics.jsonl", "loss.png"):
        assert (dpo_dir / name).is_file(), name
    recorded = manifest(dpo_dir)
    assert recorded["command"] == "dpo" and recorded["template"] == "alpaca"
    assert recorded["chain"]["adapters"] == [str(a.resolve()) for a in chain[1]]
    assert (dpo_dir / "chat_template.jinja").read_text(encoding="utf-8") == chat_template(get_template("alpaca"))
    config = json.loads((dpo_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and not config.get("trainable_token_indices")  # rows stay frozen in DPO
    figures = recorded["figures"]
    assert figures["train_pairs"] == 32 and figures["validation_pairs"] == 8 and figures["global_step"] == 8
    assert figures["first_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0


def test_metrics_carry_trl_rewards_every_logging_step(dpo_dir):
    entries = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [e for e in entries if "loss" in e]
    evals = [e for e in entries if "eval_loss" in e]
    assert [e["step"] for e in train] == [1, 2, 4, 6, 8]
    assert [e["step"] for e in evals] == [0, 4, 8]
    for entry in train:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= entry.keys()
        assert entry["rewards/margins"] == pytest.approx(entry["rewards/chosen"] - entry["rewards/rejected"], abs=1e-5)
    for entry in evals:
        assert {"eval_rewards/margins", "eval_rewards/accuracies"} <= entry.keys()
    assert evals[0]["eval_rewards/margins"] == 0.0  # before training the policy is the reference


def implicit_margins(chain, dpo_dir, pairs_file) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * (log-ratio chosen - log-ratio rejected) per pair, with peft, one pair at a time."""
    from peft import PeftModel

    from zhllama.chain import load_chain
    from zhllama.preference.data import read_pairs, tokenize_pair
    from zhllama.sft.templates import get_template

    loaded = load_chain(chain[0], chain[1])
    policy = PeftModel.from_pretrained(loaded.model, str(dpo_dir)).eval()

    def answer_logp(prompt, answer):
        ids = torch.tensor([prompt + answer])
        logps = torch.log_softmax(policy(ids).logits[0, :-1].float(), dim=-1)
        return sum(logps[len(prompt) - 1 + i, token].item() for i, token in enumerate(answer))

    margins, logp_margins = [], []
    with torch.no_grad():
        for pair in read_pairs([pairs_file]):
            row = tokenize_pair(pair, get_template("alpaca"), loaded.tokenizer)
            p = [answer_logp(row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids")]
            with policy.disable_adapter():
                r = [answer_logp(row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids")]
            margins.append(BETA * ((p[0] - r[0]) - (p[1] - r[1])))
            logp_margins.append(p[0] - p[1])
    return torch.tensor(margins), torch.tensor(logp_margins)


def test_implicit_reward_margin_rises_on_the_training_pairs(dpo_dir, chain, pairs):
    margins, logp_margins = implicit_margins(chain, dpo_dir, pairs[0])
    # before DPO every margin is 0 (policy == reference); after it the chosen answers gained
    assert margins.mean() > 0.01 and (margins > 0).float().mean() > 0.6, margins
    after = manifest(dpo_dir)["figures"]["after"]["train"]
    assert after["reward"]["margin"] == pytest.approx(margins.mean().item(), abs=1e-3)
    assert after["reward"]["accuracy"] == pytest.approx((margins > 0).float().mean().item())
    assert after["logp"]["margin"] == pytest.approx(logp_margins.mean().item(), abs=1e-3)


def test_merged_chain_with_the_dpo_adapter_gives_the_peft_chain_logits(dpo_dir, chain, tmp_path):
    model_dir, adapters = chain
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), *adapter_flags([*adapters, dpo_dir]), "--out", str(out)]) == 0
    ids = [1, 5, 990, 17, 995, 300, 999, 42, 2]
    expected = logits(chain_model(model_dir, [*adapters, dpo_dir]), ids)
    assert torch.allclose(logits(load_merged(out), ids), expected, atol=1e-5)
    assert not torch.allclose(logits(chain_model(model_dir, adapters), ids), expected, atol=1e-4)  # DPO changed something
    assert manifest(out)["template"] == "alpaca"


@pytest.mark.parametrize("loss_type, first_loss", [("ipo", (1 / (2 * BETA)) ** 2), ("hinge", 1.0)])
def test_other_losses_start_at_their_published_value(loss_type, first_loss, tiny_model_dir, pairs, tmp_path):
    """IPO: (log-ratio difference - 1/(2 beta))^2; hinge: relu(1 - beta * difference); the difference is 0 at step 0."""
    out = tmp_path / loss_type
    argv = ["dpo", "--model", str(tiny_model_dir), "--data", str(pairs[1]), "--template", "ziya", "--out", str(out),
            "--loss-type", loss_type, "--beta", str(BETA), "--max-steps", "1", "--logging-steps", "1", *TRAINING]  # fmt: skip
    assert main(argv) == 0
    assert manifest(out)["figures"]["first_loss"] == pytest.approx(first_loss, rel=1e-5)


def test_loss_types_are_those_of_the_pinned_trl():
    import dataclasses
    import re

    from trl import DPOConfig

    from zhllama.preference.dpo import LOSS_TYPES

    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    assert set(LOSS_TYPES) == set(re.findall(r"`'(\w+)'`", help_text.split("If multiple")[0]))


# --------------------------------------------------------------------------- recipe 07

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_run_all_runs_07_only_when_pref_data_is_set(tmp_path):
    """run_all.sh's loop, on stand-in step scripts that only say their name."""
    shutil.copy(RECIPES / "run_all.sh", tmp_path / "run_all.sh")
    for number in range(1, 8):
        (tmp_path / f"0{number}_step.sh").write_text(f"echo ran-0{number}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PREF_DATA", "FROM")}
    without = subprocess.run(["bash", str(tmp_path / "run_all.sh")], env=env, capture_output=True, text=True, check=True)
    assert without.stdout.split() == [f"ran-0{n}" for n in range(1, 7)]
    with_pairs = subprocess.run(["bash", str(tmp_path / "run_all.sh")], env={**env, "PREF_DATA": "pairs.json", "FROM": "6"},
                                capture_output=True, text=True, check=True)  # fmt: skip
    assert with_pairs.stdout.split() == ["ran-06", "ran-07"]


def test_recipe_07_has_its_header_and_takes_settings_from_the_environment():
    text = (RECIPES / "07_dpo.sh").read_text(encoding="utf-8")
    subprocess.run(["bash", "-n", str(RECIPES / "07_dpo.sh")], check=True)
    header = text.split("\nset -euo pipefail", 1)[0]
    assert all(section in header for section in ("What it does:", "Prerequisites:", "Variables:"))
    settings = re.findall(r'^: "\$\{(\w+)=', text, flags=re.M)
    assert {"PREF_DATA", "DPO_BETA", "DPO_LOSS", "DPO_LR"} <= set(settings)
    assert not set(re.findall(r"^(\w+)=", text, flags=re.M)) & set(settings)


@pytest.mark.slow
def test_recipe_07_on_the_tiny_chain(chain, pairs, tmp_path):
    model_dir, adapters = chain
    work = tmp_path / "run"
    work.mkdir()
    for name, target in zip(("extended", "stage1", "stage2", "sft"), (model_dir, *adapters)):
        (work / name).symlink_to(target)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ZHLLAMA": f"{sys.executable} -m zhllama", "WORK": str(work),
           "PREF_DATA": str(pairs[1]), "TEMPLATE": "alpaca", "PRECISION": "", "DPO_MAX_STEPS": "2", "DPO_BATCH_SIZE": "4",
           "DPO_GRAD_ACCUM": "1", "DPO_LORA_R": "4", "DPO_LORA_ALPHA": "8", "DPO_MAX_LENGTH": "160", "DPO_MAX_PROMPT_LENGTH": "80",
           "DTYPE": "float32", "TRAIN_EXTRA": "--save-strategy no --report-to none"}  # fmt: skip
    result = subprocess.run(["bash", str(RECIPES / "07_dpo.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert manifest(work / "dpo")["command"] == "dpo" and manifest(work / "dpo")["options"]["lora_r"] == 4
    assert manifest(work / "merged_dpo")["command"] == "merge"
