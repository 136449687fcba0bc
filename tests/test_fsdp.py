"""Stage 2's model (LoRA + trainable token rows) sharded with PyTorch FSDP2 on 2 CPU processes
(gloo) trains exactly like 1 process at the same global batch.

Why not ``accelerate launch --config_file recipes/accelerate/fsdp.yaml`` here: accelerate (1.15)
turns FSDP on only for GPU-like devices; on CPU it starts the processes and silently runs DDP
(``AcceleratorState`` leaves ``MULTI_CPU`` out of the FSDP switch), which tests/test_pretrain.py's
DDP test already covers. So this test shards the way that config does (``fully_shard`` on every
``LlamaDecoderLayer``, then the root, FSDP version 2) with ``torch.distributed.run``, on the model
the stage builds (``load_chain`` + ``build_peft_model``) and blocks packed as the stage packs them.
bench/gpu_check.sh runs the accelerate FSDP path itself on a GPU.

Run as a script it is the worker: ``python -m torch.distributed.run --nproc_per_node 2 tests/test_fsdp.py MODEL CORPUS OUT.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STEPS, GLOBAL_BATCH, BLOCK = 4, 8, 32


def train_steps(model_dir: str, corpus: str, *, world: int = 1, rank: int = 0) -> dict:
    """Stage-2 training steps on this process's share of each global batch: losses and final rows."""
    import torch

    from zhllama.args import ALL_LINEAR, LoraSettings
    from zhllama.chain import load_chain
    from zhllama.pretrain.packing import pack_documents
    from zhllama.training import TRAINING_DEFAULTS, build_peft_model

    torch.manual_seed(0)
    chain = load_chain(model_dir)
    lines = Path(corpus).read_text(encoding="utf-8").splitlines()[:200]
    docs = [[chain.tokenizer.bos_token_id, *ids, chain.tokenizer.eos_token_id] for ids in chain.tokenizer(lines, add_special_tokens=False)["input_ids"]]
    blocks = torch.tensor(pack_documents({"input_ids": docs}, BLOCK)["input_ids"][: STEPS * GLOBAL_BATCH])
    model = build_peft_model(
        chain.model, new_token_ids=chain.new_token_ids, lora=LoraSettings(r=8, alpha=16, dropout=0.0, target=[ALL_LINEAR]), seed=0
    )
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:  # fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
            fully_shard(layer)
        fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=5e-3, betas=(TRAINING_DEFAULTS["adam_beta1"], TRAINING_DEFAULTS["adam_beta2"]), weight_decay=0.1
    )
    share = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        batch = blocks[step * GLOBAL_BATCH + rank * share : step * GLOBAL_BATCH + (rank + 1) * share]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()  # FSDP2 averages the gradients over the processes
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    rows = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            rows[name.replace("_fsdp_wrapped_module.", "")] = full.detach().flatten()[:64].tolist()
    local = sum(int((p.to_local() if hasattr(p, "to_local") else p).numel()) for p in trainable)
    return {"losses": losses, "rows": rows, "trainable": sum(int(p.numel()) for p in trainable), "held": local}


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_one(tmp_path, merged_tokenizer_dir, tiny_model_dir, chinese_corpus):

    from pretrain_fixtures import run

    extended = tmp_path / "extended"
    run(["extend", "--model", tiny_model_dir, "--tokenizer", merged_tokenizer_dir, "--out", extended, "--head-init", "mean"])
    one = train_steps(str(extended), str(chinese_corpus))

    out = tmp_path / "fsdp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    from test_pretrain import free_port

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    result = subprocess.run(
        [*launcher, __file__, str(extended), str(chinese_corpus), str(out)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())

    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]  # it trained
    assert two["trainable"] == one["trainable"] == one["held"]
    assert two["held"] <= 0.6 * one["trainable"]  # sharded: each process held about half of it
    assert two["rows"].keys() == one["rows"].keys() and any("trainable_tokens" in k for k in one["rows"])
    for name in one["rows"]:
        assert two["rows"][name] == pytest.approx(one["rows"][name], rel=1e-4, abs=1e-6), name


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    figures = train_steps(sys.argv[1], sys.argv[2], world=dist.get_world_size(), rank=dist.get_rank())
    if dist.get_rank() == 0:
        Path(sys.argv[3]).write_text(json.dumps(figures))
    dist.destroy_process_group()
