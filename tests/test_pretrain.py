"""zhllama pretrain: extend → stage 1 → stage 2 → eval on tiny LLaMAs (and stories260K), the
trainable parameters of each stage, exact resume, bad input, two processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pretrain_fixtures import TRAIN_FLAGS, count_training_steps, make_merged_tokenizer, manifest, run, write_corpora
from zhllama.chain import load_chain, model_fingerprint
from zhllama.pretrain import EvalOptions, evaluate_chain

HIDDEN = 64
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory, base_tokenizer_dir, chinese_corpus, tiny_model_dir, tiny_tied_model_dir) -> Path:
    """A merged tokenizer, the two tiny models extended with it, and Chinese corpora."""
    work = tmp_path_factory.mktemp("pretrain")
    merged = make_merged_tokenizer(work, base_tokenizer_dir, chinese_corpus)
    # these bases are random: their probabilities are noise, which --head-init logprob would
    # carry into the new head rows (docs/pretrain.md); the stages are what is tested here
    for name, model in (("extended", tiny_model_dir), ("extended_tied", tiny_tied_model_dir)):
        run(["extend", "--model", model, "--tokenizer", merged, "--out", work / name, "--head-init", "mean"])
    write_corpora(work)
    return work


def stage_argv(work: Path, stage: int, out: Path, *extra, model="extended", steps=16, lr="1e-2", held_out=True) -> list:
    validation = ["--validation-data", work / "held_out.txt"] if held_out else ["--validation-split", "0.05"]
    return [
        "pretrain", "--stage", stage, "--model", work / model, "--data", work / "train.txt",
        *validation, "--out", out, "--block-size", "32",
        "--cache-dir", work / "cache", "--max-steps", steps, "--learning-rate", lr, "--warmup-steps", "0",
        *TRAIN_FLAGS, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stages(work) -> tuple[Path, Path]:
    run(stage_argv(work, 1, work / "s1"))
    run(stage_argv(work, 2, work / "s2", "--adapter", work / "s1", lr="5e-3"))
    return work / "s1", work / "s2"


def bits_per_char(work: Path, adapters: list[Path], model="extended") -> float:
    options = EvalOptions(model=work / model, adapter=adapters, data=[str(work / "held_out.txt")], block_size=64)
    return evaluate_chain(options).corpora[str(work / "held_out.txt")]["bits_per_character"]


def test_stage1_trains_and_saves_only_the_new_rows(work, stages):
    s1, _ = stages
    figures = manifest(work / "extended")["figures"]
    base, new_rows = figures["base_vocab_size"], figures["new_rows"]
    stage1 = manifest(s1)
    assert stage1["figures"]["trainable_params"] == new_rows * HIDDEN * 2
    assert stage1["chain"]["model_fingerprint"] == model_fingerprint(work / "extended")
    with safe_open(str(s1 / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert sorted(shapes.values()) == [(new_rows, HIDDEN)] * 2  # the rows, no base matrix
    assert stage1["figures"]["adapter_bytes"] < new_rows * HIDDEN * 4 * 2 + 4096

    extended = load_file(work / "extended" / "model.safetensors")
    trained = load_chain(work / "extended", [s1]).model.state_dict()
    for name, before in extended.items():
        after = trained[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[:base], before[:base]), name
            assert not torch.equal(after[base : base + new_rows], before[base : base + new_rows]), name
            assert torch.equal(after[base + new_rows :], before[base + new_rows :]), name  # padding untouched
        else:
            assert torch.equal(after, before), name
    assert (s1 / "metrics.jsonl").is_file() and (s1 / "loss.png").stat().st_size > 1000
    assert (s1 / "tokenizer.json").is_file()
    assert not (work / "s1.checkpoints").exists()


def test_loss_falls_in_each_stage(work, stages):
    s1, s2 = stages
    before, after_1, after_2 = bits_per_char(work, []), bits_per_char(work, [s1]), bits_per_char(work, [s1, s2])
    assert after_1 < before - 0.05
    assert after_2 < after_1 - 0.02
    stage2 = manifest(s2)
    assert stage2["figures"]["eval_loss"] < manifest(s1)["figures"]["eval_loss"]
    lora = stage2["figures"]["trainable_params"] - 2 * manifest(work / "extended")["figures"]["new_rows"] * HIDDEN
    assert lora > 0  # LoRA weights on top of the rows
    assert stage2["chain"]["adapters"] == [str(s1.resolve())]


def test_tied_stage1_counts_the_shared_rows_once_with_gradient_checkpointing(work, tmp_path):
    out = tmp_path / "s1_tied"
    run(stage_argv(work, 1, out, "--gradient-checkpointing", "true", model="extended_tied", steps=4))
    figures = manifest(out)["figures"]
    assert figures["trainable_params"] == manifest(work / "extended_tied")["figures"]["new_rows"] * HIDDEN
    assert math.isfinite(figures["last_loss"]) and figures["eval_loss"] < figures["eval_loss_before"]  # it trained
    assert manifest(out)["training_arguments"]["gradient_checkpointing"] is True
    chain = load_chain(work / "extended_tied", [out])
    assert chain.model.lm_head.weight is chain.model.model.embed_tokens.weight


def test_train_embeddings_all_trains_full_matrices(work, tmp_path):
    out = tmp_path / "s1_all"
    run(stage_argv(work, 1, out, "--train-embeddings", "all", steps=2, held_out=False))
    rows = manifest(work / "extended")["figures"]["embedding_rows"]
    written = manifest(out)
    assert written["figures"]["trainable_params"] == rows * HIDDEN * 2
    held_out = written["data"]["validation"]["held_out_blocks"]
    assert held_out == round(written["data"]["train"]["blocks"] * 0.05) and "eval_loss" in written["figures"]
    cache_entry = Path(written["data"]["train"]["path"])
    assert sorted(p.name for p in cache_entry.iterdir()) == ["blocks", "zhllama_blocks.json"]  # split left it as written


def test_resume_from_a_mid_run_checkpoint_matches_an_uninterrupted_run(work, stages, tmp_path, monkeypatch):
    flags = ["--adapter", work / "s1", "--save-steps", "4", "--lora-dropout", "0.1"]
    run(stage_argv(work, 2, tmp_path / "whole", *flags, steps=10))

    from zhllama.training import AdapterTrainer

    original = AdapterTrainer.training_step

    def crash_at_step_7(self, *args, **kwargs):
        if self.state.global_step == 6:
            raise KeyboardInterrupt  # as if the machine went down after checkpoint-4
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdapterTrainer, "training_step", crash_at_step_7)
    run(stage_argv(work, 2, tmp_path / "resumed", *flags, steps=10), expect=130)
    assert not (tmp_path / "resumed").exists()
    checkpoints = tmp_path / "resumed.checkpoints"
    assert (checkpoints / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not list(checkpoints.glob("checkpoint-4/model*.safetensors"))  # adapter-only checkpoints
    monkeypatch.setattr(AdapterTrainer, "training_step", original)
    steps = count_training_steps(monkeypatch)
    run(stage_argv(work, 2, tmp_path / "resumed", *flags, "--resume-from-checkpoint", "last", steps=10))
    assert steps == [5, 6, 7, 8, 9, 10]  # continued after checkpoint-4

    whole, resumed = manifest(tmp_path / "whole")["figures"], manifest(tmp_path / "resumed")["figures"]
    assert resumed["global_step"] == whole["global_step"] == 10
    assert resumed["last_loss"] == pytest.approx(whole["last_loss"], rel=1e-5)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    a, b = load_file(tmp_path / "whole" / "adapter_model.safetensors"), load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert not checkpoints.exists()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("zhllama: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err  # (progress bars may precede it)
    return errors[0]


def test_bad_input_fails_with_one_line_and_no_output(work, tmp_path, stages, tiny_model_dir, capsys):
    out = tmp_path / "out"
    run(stage_argv(work, 1, out, "--block-size", "4096"), expect=1)
    assert "exceeds the model's context" in one_line_error(capsys)
    run(stage_argv(work, 2, out, "--lora-target", "q_proj", "qkv_proj"), expect=1)
    assert "unknown --lora-target qkv_proj" in one_line_error(capsys)
    run(stage_argv(work, 2, out, "--adapter", stages[0], model="extended_tied"), expect=1)
    assert "fingerprint" in one_line_error(capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    argv = stage_argv(work, 1, out)
    argv[argv.index(work / "train.txt")] = empty
    run(argv, expect=1)
    assert "empty.txt" in one_line_error(capsys)
    run([*stage_argv(work, 1, out, "--model", tiny_model_dir)], expect=1)  # never extended: no new rows
    assert "nothing to train" in one_line_error(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.slow
def test_two_processes_match_one_at_equal_global_batch(work, tmp_path):
    """``accelerate launch`` with the recipes' DDP config, two gloo processes on CPU, each with
    half the batch, trains the same adapter as one process with the whole batch. (On CPU the
    config's ``--multi_gpu`` launcher is what starts several processes; ``--use-cpu`` makes the
    Trainer use gloo. ``accelerate launch --cpu`` would start only one.)"""
    steps = 4
    one, two = tmp_path / "one", tmp_path / "ddp"
    flags = ["--logging-steps", "1", "--save-steps", "1000"]
    run(stage_argv(work, 1, one, *flags, "--per-device-train-batch-size", "8", steps=steps))
    argv = [str(a) for a in stage_argv(work, 1, two, *flags, "--per-device-train-batch-size", "4", steps=steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes" / "accelerate" / "ddp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip
    result = subprocess.run([*launcher, "-m", "zhllama", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    figures = manifest(two)["figures"]
    assert figures["global_step"] == steps
    assert figures["trainable_params"] == manifest(work / "extended")["figures"]["new_rows"] * HIDDEN * 2
    logged = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)}
    seen = {run: max(e.get("num_input_tokens_seen", 0) for e in entries) for run, entries in logged.items()}
    assert seen[one] == seen[two] == steps * 8 * 32  # both processes fed half of each global batch
    losses = {run: [e["loss"] for e in entries if "loss" in e] for run, entries in logged.items()}
    assert len(losses[one]) == steps and losses[two] == pytest.approx(losses[one], rel=1e-4)
    assert losses[one][-1] < losses[one][0]
    rows_one, rows_two = (load_file(str(run / "adapter_model.safetensors")) for run in (one, two))
    assert rows_one.keys() == rows_two.keys()
    assert all(torch.allclose(rows_one[k], rows_two[k], atol=1e-5) for k in rows_one)
    assert not list(tmp_path.glob(".ddp*")) and not (tmp_path / "ddp.checkpoints").exists()


@pytest.mark.real_assets
def test_stories260k_extend_stage1_stage2_eval(tmp_path, assets, chinese_corpus):
    base = assets / "models" / "stories260K"
    merged = make_merged_tokenizer(tmp_path, base, chinese_corpus)
    run(["extend", "--model", base, "--tokenizer", merged, "--out", tmp_path / "extended"])
    write_corpora(tmp_path)
    run(stage_argv(tmp_path, 1, tmp_path / "s1", steps=12))
    run(stage_argv(tmp_path, 2, tmp_path / "s2", "--adapter", tmp_path / "s1", steps=12, lr="5e-3"))
    figures = manifest(tmp_path / "extended")["figures"]
    assert manifest(tmp_path / "s1")["figures"]["trainable_params"] == figures["new_rows"] * 64  # tied: once
    before = bits_per_char(tmp_path, [])
    after_1 = bits_per_char(tmp_path, [tmp_path / "s1"])
    after_2 = bits_per_char(tmp_path, [tmp_path / "s1", tmp_path / "s2"])
    assert after_1 < before and after_2 < after_1
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(work, tmp_path, capsys):
    out = tmp_path / "diverged"
    argv = stage_argv(work, 1, out, "--learning-rate", "1e30", "--max-grad-norm", "0", "--save-steps", "1", steps=6)
    run(argv, expect=1)
    error = one_line_error(capsys)
    assert "training loss became" in error and "at step" in error and "checkpoint-" in error
    assert not out.exists()
    assert (tmp_path / "diverged.checkpoints").is_dir()  # kept for --resume-from-checkpoint
