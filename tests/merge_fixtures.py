"""Helpers for the merge and GGUF tests: peft adapters made directly (not through zhllama's
training commands), with weights perturbed as if trained, chained the way zhllama chains them."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from zhllama.chain import apply_adapter, model_fingerprint
from zhllama.outdir import copy_files
from zhllama.provenance import write_manifest

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(model_dir: Path, prior: list[Path], config, out: Path, *, seed: int, template: str | None = None) -> Path:
    """A peft adapter trained (randomly perturbed) on ``model_dir`` + ``prior``, saved like zhllama saves one."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for adapter in prior:
        model = apply_adapter(model, adapter)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for _, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    shutil.rmtree(out, ignore_errors=True)
    peft_model.save_pretrained(str(out))
    copy_files(["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"], model_dir, out)
    write_manifest(
        out,
        command="sft" if template else "pretrain",
        options={"template": template} if template else {},
        chain={"model_fingerprint": model_fingerprint(model_dir)},
    )
    return out


def chain_adapters(model_dir: Path, work: Path, *, tied: bool, new_rows: list[int]) -> list[Path]:
    """Stage 1 (token rows), stage 2 (LoRA on every projection + rows), SFT (rsLoRA with per-module patterns)."""
    from peft import LoraConfig, TrainableTokensConfig

    rows = {"embed_tokens": new_rows} if tied else {"embed_tokens": new_rows, "lm_head": new_rows}
    stage1 = make_adapter(model_dir, [], TrainableTokensConfig(target_modules=list(rows), token_indices=new_rows), work / "stage1", seed=1)
    stage2 = make_adapter(
        model_dir, [stage1], LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, trainable_token_indices=rows), work / "stage2", seed=2
    )
    sft = make_adapter(
        model_dir,
        [stage1, stage2],
        LoraConfig(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=ALL_LINEAR,
            rank_pattern={"layers.1.self_attn.q_proj": 2},
            alpha_pattern={"down_proj": 4},
        ),
        work / "sft",
        seed=3,
        template="alpaca",
    )
    return [stage1, stage2, sft]


def logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def load_merged(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)


def chain_model(model_dir: Path, adapters: list[Path]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for adapter in adapters:
        model = apply_adapter(model, adapter)
    return model
