"""Kill anywhere: a real ``zhllama`` process is SIGKILLed at a chosen point, then the same
command is run again.

Each kill point is hit deterministically: the process wraps one function (``run_killed`` in
robust_fixtures.py) and sends itself SIGKILL when it is reached, so no cleanup code runs, as
with ``kill -9`` or the OOM killer. After the kill nothing may look finished (no output
directory, no cache entry, no checkpoint taken for complete), and re-running the same command
must either start clean and produce what an uninterrupted run produces, or — training with
``--resume-from-checkpoint last`` — continue from the last complete checkpoint and reach the
same losses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_fixtures import count_training_steps
from robust_fixtures import TRAIN_FLAGS, build_chain, cli, dir_bytes, leftovers, manifest, ok, run_killed

from zhllama.outdir import clean_stale_siblings, temporary_sibling


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir):
    return build_chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir)


def siblings(out: Path, kind: str = "tmp") -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}-*"))


def assert_killed_cleanly(out: Path) -> None:
    """The kill left a temporary sibling (it really was mid-write) and no ``out``."""
    assert not out.exists(), f"{out} exists after the run was killed"
    assert siblings(out), f"no temporary sibling of {out}: the kill point was not inside the write"


def test_kill_vocab_train_then_rerun(tmp_path, chinese_corpus, zh_sp_dir):
    """Killed after chinese_sp.model was written, before the .vocab listing and zhllama.json."""
    out = tmp_path / "sp"
    argv = ["vocab", "train", chinese_corpus, "--out", out, "--vocab-size", "3000"]  # as the zh_sp_dir fixture
    run_killed("zhllama.vocab.train:write_vocab_file", "before", 1, argv)
    assert_killed_cleanly(out)
    ok(argv)
    assert leftovers(out) == [out]
    assert dir_bytes(out) == dir_bytes(zh_sp_dir)  # the same files as a run never interrupted


def test_kill_vocab_merge_then_rerun(tmp_path, base_tokenizer_dir, zh_sp_dir, merged_tokenizer_dir):
    """Killed between tokenizer.model and the HF tokenizer files."""
    out = tmp_path / "merged"
    argv = ["vocab", "merge", "--base", base_tokenizer_dir, "--add", zh_sp_dir / "chinese_sp.model", "--out", out]
    run_killed("zhllama.vocab.merge:save_hf_tokenizer", "before", 1, argv)
    assert_killed_cleanly(out)
    assert (siblings(out)[0] / "tokenizer.model").is_file() and not (siblings(out)[0] / "tokenizer.json").exists()
    ok(argv)
    assert leftovers(out) == [out]
    assert dir_bytes(out) == dir_bytes(merged_tokenizer_dir)


def test_kill_during_overwrite_swap_keeps_previous_results(tmp_path, chinese_corpus):
    """Killed between the two renames of --overwrite: the previous results come back; nothing is lost."""
    out = tmp_path / "sp"
    argv = ["vocab", "train", chinese_corpus, "--out", out, "--vocab-size", "2000"]
    ok(argv)
    previous = dir_bytes(out, skip=())
    # the first rename of the run is OUT -> .OUT.old-HOST-PID; die right after it
    run_killed("pathlib:Path.rename", "after", 1, [*argv, "--vocab-size", "2500", "--overwrite"])
    assert not out.exists() and siblings(out, "old") and siblings(out, "tmp")
    code, _ = cli(argv)  # without --overwrite: the previous results are back and protected
    assert code == 1 and dir_bytes(out, skip=()) == previous
    assert leftovers(out) == [out]
    ok([*argv, "--vocab-size", "2500", "--overwrite"])
    assert manifest(out)["options"]["vocab_size"] == 2500 and leftovers(out) == [out]


def test_kill_extend_then_rerun(tmp_path, chain, tiny_model_dir, merged_tokenizer_dir):
    """Killed after the weights were saved, before the tokenizer and zhllama.json."""
    out = tmp_path / "extended"
    argv = ["extend", "--model", tiny_model_dir, "--tokenizer", merged_tokenizer_dir, "--out", out]  # as chain.extended
    run_killed("zhllama.pretrain.extend:copy_files", "before", 1, argv)
    assert_killed_cleanly(out)
    assert (siblings(out)[0] / "model.safetensors").is_file()
    ok(argv)
    assert leftovers(out) == [out]
    assert dir_bytes(out) == dir_bytes(chain.extended)


def test_kill_merge_mid_shard_then_rerun(tmp_path, chain):
    """Killed after three tensors of the first shard were written."""
    out = tmp_path / "merged_model"
    argv = ["merge", "--model", chain.extended, "--adapter", chain.stage1, "--out", out, "--max-shard-size", "200KB"]
    run_killed("zhllama.merge.checkpoint:ShardWriter.write", "after", 3, argv)
    assert_killed_cleanly(out)
    ok(argv)
    assert leftovers(out) == [out]
    reference = tmp_path / "reference"
    ok([*argv[:-4], "--out", reference, "--max-shard-size", "200KB"])
    assert dir_bytes(out) == dir_bytes(reference)


def pretrain_argv(chain, out: Path, cache: Path) -> list:
    return [
        "pretrain", "--stage", "1", "--model", chain.extended, "--data", chain.corpus, "--out", out, "--block-size", "32",
        "--validation-split", "0", "--cache-dir", cache, "--max-steps", "6", *TRAIN_FLAGS,
    ]  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


@pytest.fixture(scope="module")
def uninterrupted(chain, tmp_path_factory) -> Path:
    """Six steps of stage 1 with checkpoints every two steps, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted") / "stage1"
    ok(pretrain_argv(chain, out, out.parent / "cache"))
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    return out


def test_kill_while_building_block_cache_then_rerun(tmp_path, chain, uninterrupted):
    """Killed after the blocks were saved into the cache's temporary directory, before its rename."""
    cache, out = tmp_path / "cache", tmp_path / "stage1"
    argv = pretrain_argv(chain, out, cache)
    run_killed("datasets.arrow_dataset:Dataset.save_to_disk", "after", 1, argv)
    assert not out.exists()
    entries = [p for p in cache.iterdir()]
    assert entries and all(p.name.startswith(".") for p in entries), f"a cache entry looks complete: {entries}"
    ok(argv)
    assert losses(out) == losses(uninterrupted)
    left = sorted(p.name for p in cache.iterdir() if p.name.startswith("."))
    assert left == [], f"stale cache temporaries were not removed: {left}"


def test_kill_mid_step_then_resume_reaches_same_losses(tmp_path, chain, uninterrupted, monkeypatch):
    """Killed as step 5 starts (checkpoints at 2 and 4 complete): resuming from the last
    checkpoint ends with the uninterrupted run's losses and weights; re-running without
    --resume-from-checkpoint starts clean and also matches."""
    out, cache = tmp_path / "stage1", uninterrupted.parent / "cache"
    argv = pretrain_argv(chain, out, cache)
    run_killed("zhllama.training:AdapterTrainer.training_step", "before", 5, argv)
    checkpoints = out.with_name(out.name + ".checkpoints")
    assert not out.exists() and sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # the same command without --resume-from-checkpoint, next to a copy of the dead run's checkpoints
    fresh = tmp_path / "fresh"
    shutil.copytree(checkpoints, fresh.with_name("fresh.checkpoints"))
    ok(pretrain_argv(chain, fresh, cache))
    assert losses(fresh) == losses(uninterrupted)

    steps = count_training_steps(monkeypatch)
    ok([*argv, "--resume-from-checkpoint", "last"])
    assert steps == [5, 6]  # it resumed: only the steps after checkpoint-4 were trained
    assert leftovers(out) == [out] and not checkpoints.exists()
    expected, resumed = losses(uninterrupted), losses(out)  # the log holds the killed run's steps too
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)
    assert manifest(out)["figures"]["global_step"] == 6
    assert_same_adapter(out, uninterrupted)


def test_kill_mid_checkpoint_write_then_resume_skips_it(tmp_path, chain, uninterrupted, monkeypatch, capsys):
    """Killed while checkpoint-4 was being written (adapter saved, optimizer and trainer state
    not): ``--resume-from-checkpoint last`` must not take it for complete; it resumes from
    checkpoint-2 and reaches the uninterrupted run's losses."""
    out, cache = tmp_path / "stage1", uninterrupted.parent / "cache"
    argv = pretrain_argv(chain, out, cache)
    run_killed("transformers.trainer:Trainer._save_optimizer_and_scheduler", "before", 2, argv)
    checkpoints = out.with_name(out.name + ".checkpoints")
    half = checkpoints / "checkpoint-4"
    assert half.is_dir() and not (half / "trainer_state.json").exists(), "the kill was not inside checkpoint-4's write"
    steps = count_training_steps(monkeypatch)
    code, err = cli([*argv, "--resume-from-checkpoint", "last"], capsys)
    assert code == 0, err[-2000:]
    assert steps == [3, 4, 5, 6]  # resumed from checkpoint-2, the last complete one
    resumed, expected = losses(out), losses(uninterrupted)
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_ctrl_c_keeps_checkpoints_and_resume_survives_a_torn_log_line(tmp_path, chain, uninterrupted, monkeypatch, capsys):
    """Ctrl-C at step 5: exit 130, no output, checkpoints kept. A kill in the middle of appending
    to the running metrics log leaves a torn last line; resuming must not trip over it."""
    from zhllama.training import AdapterTrainer

    out, cache = tmp_path / "stage1", uninterrupted.parent / "cache"
    argv = pretrain_argv(chain, out, cache)
    original = AdapterTrainer.training_step

    def interrupted(self, *args, **kwargs):
        if self.state.global_step + 1 == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdapterTrainer, "training_step", interrupted)
    code, err = cli(argv, capsys)
    assert code == 130 and err.rstrip().splitlines()[-1] == "zhllama: interrupted" and "Traceback" not in err
    checkpoints = out.with_name(out.name + ".checkpoints")
    assert leftovers(out) == [] and (checkpoints / "checkpoint-4" / "trainer_state.json").is_file()
    monkeypatch.setattr(AdapterTrainer, "training_step", original)

    with open(checkpoints / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 5, "loss": 7.6')  # the torn line a kill mid-append leaves
    steps = count_training_steps(monkeypatch)
    code, err = cli([*argv, "--resume-from-checkpoint", "last"], capsys)
    assert code == 0, err[-2000:]
    assert steps == [5, 6]  # resumed from checkpoint-4, not started again
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-5)


def test_same_command_with_resume_last_also_starts_a_first_run(tmp_path, chain, uninterrupted):
    """A recipe for preemptible machines passes --resume-from-checkpoint last every time; the
    first run, with no checkpoint yet, must simply start."""
    out = tmp_path / "stage1"
    ok([*pretrain_argv(chain, out, uninterrupted.parent / "cache"), "--resume-from-checkpoint", "last"])
    assert losses(out) == losses(uninterrupted)


def assert_same_adapter(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    for name in left:
        assert (left[name] - right[name]).abs().max().item() < 1e-6, name


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_siblings_of_dead_processes_are_cleaned_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead = dead_pid()
    host_tmp = temporary_sibling(out).name.rsplit("-", 1)[0]  # .out.tmp-HOST
    stale = tmp_path / f"{host_tmp}-{dead}"
    legacy = tmp_path / f".out.tmp-{dead}"  # the PID-only name of earlier versions
    live = tmp_path / f"{host_tmp}-{1}"  # PID 1 is alive
    other_host = tmp_path / f".out.tmp-some-other-node-{dead}"
    for d in (stale, legacy, live, other_host):
        d.mkdir()
        (d / "half.bin").write_bytes(b"x")
    old = tmp_path / f"{host_tmp.replace('.tmp-', '.old-')}-{dead}"
    old.mkdir()
    (old / "result.txt").write_text("previous results")
    touched = clean_stale_siblings(out)
    assert set(touched) == {stale, legacy, old}
    assert not stale.exists() and not legacy.exists() and live.exists() and other_host.exists()
    assert (out / "result.txt").read_text() == "previous results"  # the interrupted swap is undone
