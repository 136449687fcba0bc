"""recipes/accelerate/deepspeed-*.yaml as DeepSpeed will see them: accelerate turns the YAML into
a DeepSpeed config, transformers fills its "auto" values from zhllama's TrainingArguments, and
DeepSpeed's own config parser reads the result (``deepspeed`` is a test extra; it installs on CPU
without building its kernels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow  # importing deepspeed alone is slow
@pytest.mark.parametrize("name, stage", [("deepspeed-zero2.yaml", 2), ("deepspeed-zero3.yaml", 3)])
def test_recipe_configs_parse_with_deepspeed(name, stage, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed not installed (make install adds it: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8)")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import LlamaForCausalLM
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from zhllama.demo.tiny import tiny_llama_config
    from zhllama.training import build_training_arguments

    recipe = yaml.safe_load((REPO / "recipes" / "accelerate" / name).read_text(encoding="utf-8"))
    assert recipe["distributed_type"] == "DEEPSPEED"
    plugin = DeepSpeedPlugin(**recipe["deepspeed_config"])
    plugin.set_mixed_precision(recipe["mixed_precision"])  # as AcceleratorState does under accelerate launch
    training_args = build_training_arguments(
        tmp_path / "out", {"use_cpu": True, "bf16": recipe["mixed_precision"] == "bf16", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}
    )
    filled = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
    filled.trainer_config_process(training_args)
    filled.trainer_config_finalize(training_args, LlamaForCausalLM(tiny_llama_config(300)), num_training_steps=10)
    assert '"auto"' not in json.dumps(filled.config)  # every value decided before DeepSpeed sees it

    parsed = DeepSpeedConfig(filled.config)  # DeepSpeed's own parser and sanity checks (world size 1 here)
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.train_micro_batch_size_per_gpu == 2 and parsed.gradient_accumulation_steps == 4
    assert parsed.train_batch_size == 2 * 4
    assert parsed.gradient_clipping == training_args.max_grad_norm == 1.0  # zhllama's default reaches DeepSpeed
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save  # the adapter is gathered on save
