"""NaN/Inf guard: when the training loss stops being finite, training stops at once with one
line naming the step and the last good checkpoint, writes no output, and keeps the checkpoints
so the run can resume from before the damage."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from robust_fixtures import TRAIN_FLAGS, build_chain, cli, error_line, leftovers


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir):
    return build_chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir)


def pretrain_argv(chain, out: Path, *extra) -> list:
    return [
        "pretrain", "--stage", "1", "--model", chain.extended, "--data", chain.corpus, "--out", out, "--block-size", "32",
        "--validation-split", "0", "--cache-dir", out.parent / "cache", "--max-steps", "8", *TRAIN_FLAGS, *extra,
    ]  # fmt: skip


def test_absurd_learning_rate_stops_training_with_the_step(chain, tmp_path, capsys):
    """A learning rate of 1e38 blows the trained rows up after the first update."""
    out = tmp_path / "stage1"
    code, err = cli(pretrain_argv(chain, out, "--learning-rate", "1e38", "--warmup-steps", "0"), capsys)
    line = error_line(code, err)
    found = re.search(r"training loss became (\S+) at step (\d+)", line)
    assert found, line
    # the first update (step 1) blows the rows up: step 2's loss is no longer finite, and training stops there
    assert not math.isfinite(float(found.group(1))) and int(found.group(2)) <= 2
    assert "checkpoint" in line  # says where to resume from (or that there is nothing to resume)
    assert leftovers(out) == []


def test_nan_after_a_checkpoint_names_it_and_keeps_it(chain, tmp_path, capsys, monkeypatch):
    """The loss of step 5 turns NaN (a poisoned batch): the error names step 5 and checkpoint-4,
    which is still there, complete, to resume from."""
    import torch

    from zhllama.training import AdapterTrainer

    original = AdapterTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if self.state.global_step + 1 == 5:
            loss = loss * torch.tensor(float("nan")) if not isinstance(loss, tuple) else loss
        return loss

    monkeypatch.setattr(AdapterTrainer, "compute_loss", poisoned)
    out = tmp_path / "stage1"
    code, err = cli(pretrain_argv(chain, out), capsys)
    line = error_line(code, err)
    checkpoint = out.with_name("stage1.checkpoints") / "checkpoint-4"
    assert "nan at step 5" in line and str(checkpoint) in line, line
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    assert leftovers(out) == []
