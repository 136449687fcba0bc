"""The shell recipes and the multi-GPU configs.

Fast checks: every recipe parses, opens with its header and takes its settings from the
environment; every accelerate config is accepted by accelerate's own launcher code. The slow
test runs ``recipes/run_all.sh`` end to end with tiny settings, through the real ``zhllama``
command, exactly as a user would (minus the model size).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zhllama.provenance import read_manifest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
STEPS = sorted(RECIPES.glob("0[1-6]_*.sh"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def test_six_steps_and_run_all():
    assert [p.name[:2] for p in STEPS] == ["01", "02", "03", "04", "05", "06"]
    assert STEPS[-1].name == "06_merge.sh"
    assert (RECIPES / "run_all.sh").is_file()


@pytest.mark.parametrize("script", [*STEPS, RECIPES / "run_all.sh", RECIPES / "config.sh"], ids=lambda p: p.name)
def test_recipe_parses_and_has_a_header(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    header = script.read_text(encoding="utf-8").split("\nset -euo pipefail", 1)[0]
    if script.name != "config.sh":
        for section in ("What it does:", "Prerequisites:", "Variables:"):
            assert section in header, f"{script.name}: header lacks '{section}'"


@pytest.mark.parametrize("script", STEPS, ids=lambda p: p.name)
def test_every_setting_can_come_from_the_environment(script):
    """Settings are `: "${NAME=default}"` lines, so the environment overrides them."""
    text = script.read_text(encoding="utf-8")
    settings = re.findall(r'^: "\$\{(\w+)=', text, flags=re.M)
    assert settings or script.name == "03_extend.sh"
    assigned = re.findall(r"^(\w+)=", text, flags=re.M)
    assert not set(assigned) & set(settings), f"{script.name} overwrites a setting unconditionally"


def test_zhllama_commands_are_the_cli_contract():
    from zhllama.cli import COMMANDS

    used = set()
    for script in STEPS:
        for match in re.finditer(r"\$(?:ZHLLAMA|LAUNCH) (\w+(?: (?:train|merge|stats))?)", script.read_text(encoding="utf-8")):
            used.add(match.group(1))
    assert used == {"vocab train", "vocab merge", "vocab stats", "extend", "pretrain", "sft", "merge", "chat"}
    assert used <= set(COMMANDS)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_accepted_by_accelerate(config):
    """accelerate parses the file and prepares the launch environment it would run with."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "zhllama", "pretrain"])
    args, _, _ = _validate_launch_command(args)
    assert args.mixed_precision == "bf16" and args.num_processes == 8
    if "deepspeed" in config.name:
        assert args.use_deepspeed and args.zero_stage == int(config.name[-6])
        return
    env = prepare_multi_gpu_env(args)
    if config.name == "fsdp.yaml":
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"


def test_accelerate_configs_cover_the_three_strategies():
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"deepspeed-zero2.yaml", "deepspeed-zero3.yaml", "fsdp.yaml"}


# --------------------------------------------------------------------------- end to end


def tiny_settings(work: Path, model: Path, corpus: Path, sft_data: Path) -> dict[str, str]:
    """Environment that turns the LLaMA-7B recipes into a seconds-long run on a tiny model."""
    return {
        "ZHLLAMA": f"{sys.executable} -m zhllama",
        "BASE_MODEL": str(model),
        "CORPUS": str(corpus),
        "SFT_DATA": str(sft_data),
        "WORK": str(work),
        "PRECISION": "",
        "GRADIENT_CHECKPOINTING": "",
        "VOCAB_SIZE": "2500",
        "BLOCK_SIZE": "32",
        "BATCH_SIZE": "4",
        "GRAD_ACCUM": "1",
        "MAX_STEPS": "3",
        "LORA_R": "4",
        "LORA_ALPHA": "8",
        "SFT_LORA_R": "4",
        "SFT_LORA_ALPHA": "8",
        "SFT_BATCH_SIZE": "4",
        "SFT_GRAD_ACCUM": "1",
        "SFT_MAX_STEPS": "3",
        "MAX_SEQ_LENGTH": "160",
        "DTYPE": "float32",
        "MAX_NEW_TOKENS": "8",
        "TRAIN_EXTRA": "--save-strategy no --report-to none",
    }


@pytest.mark.slow
def test_run_all_with_tiny_settings(tmp_path, tiny_model_dir, chinese_corpus):
    from zhllama.demo import tiny

    sft_data = tiny.write_json(tmp_path / "sft.json", tiny.instruction_records(64, seed=3))
    work = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.update(tiny_settings(work, tiny_model_dir, chinese_corpus, sft_data))
    result = subprocess.run(
        ["bash", str(RECIPES / "run_all.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for step in ("01_vocab_train.sh", "02_vocab_merge.sh", "03_extend.sh", "04_pretrain.sh", "05_sft.sh", "06_merge.sh"):
        assert f"=== {step} done" in result.stderr
    expected = {
        "chinese_sp": "vocab train",
        "tokenizer": "vocab merge",
        "extended": "extend",
        "stage1": "pretrain --stage 1",
        "stage2": "pretrain --stage 2",
        "sft": "sft",
        "merged": "merge",
    }
    for directory, command in expected.items():
        assert read_manifest(work / directory)["command"] == command, directory
    assert read_manifest(work / "stage2")["options"]["lora_r"] == 4  # the environment reached the command
    stats = json.loads((work / "vocab_stats.json").read_text(encoding="utf-8"))
    assert len(stats) == 2
    assert any(p.suffix == ".safetensors" for p in (work / "merged").iterdir())

    # FROM=N resumes: only step 6 runs again (with OVERWRITE, as re-running needs it)
    env.update(FROM="6", OVERWRITE="--overwrite")
    again = subprocess.run(["bash", str(RECIPES / "run_all.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "=== 06_merge.sh done" in again.stderr and "01_vocab_train.sh" not in again.stderr
