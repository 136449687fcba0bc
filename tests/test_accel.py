"""zhllama.accel: what precision, attention kernel and checkpointing a run gets, and 4-bit loading."""

from __future__ import annotations

import pytest
import torch

from zhllama.accel import (
    CHECKPOINTING_ABOVE,
    Device,
    choose_acceleration,
    estimate_parameters,
    quantize_4bit,
)
from zhllama.demo.tiny import tiny_llama_config
from zhllama.errors import ZhllamaError

# Llama-2-7B's shape (config.json as published), and 13B's
LLAMA2_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
}  # fmt: skip
H200 = Device("cuda", "NVIDIA H200", bf16=True)
V100 = Device("cuda", "Tesla V100", bf16=False)
CPU = Device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_estimate_matches_a_real_model(tied):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(500, tied=tied)  # grouped-query attention: 4 heads, 2 KV heads
    model = LlamaForCausalLM(config)
    assert estimate_parameters(config) == sum(p.numel() for p in model.parameters())
    assert estimate_parameters(config.to_dict()) == estimate_parameters(config)
    assert abs(estimate_parameters(LLAMA2_7B) - 6_738_415_616) == 0  # Llama-2-7B's published count


def test_a_7b_model_on_a_bf16_gpu_gets_bf16_sdpa_and_checkpointing(monkeypatch):
    monkeypatch.setattr("zhllama.accel.flash_attention_installed", lambda: False)
    chosen = choose_acceleration(LLAMA2_7B, {}, device=H200)
    assert (chosen.precision, chosen.attention, chosen.gradient_checkpointing) == ("bf16", "sdpa", True)
    assert chosen.training_values == {
        "bf16": True, "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }  # fmt: skip
    assert chosen.defaults({"learning_rate": 1e-4, "bf16": False})["bf16"] is True
    line = chosen.line
    assert line.startswith("acceleration: cuda (NVIDIA H200), 6.74B parameters: bf16") and "\n" not in line
    assert "attention sdpa (auto: flash_attn not installed)" in line and "gradient checkpointing on" in line


def test_flash_attention_when_installed_on_a_gpu_in_half_precision(monkeypatch):
    monkeypatch.setattr("zhllama.accel.flash_attention_installed", lambda: True)
    assert choose_acceleration(LLAMA2_7B, {}, device=H200).attention == "flash_attention_2"
    assert choose_acceleration(LLAMA2_7B, {"bf16": False}, device=H200).attention == "sdpa"  # fp32: no flash
    assert choose_acceleration(LLAMA2_7B, {}, device=V100).precision == "fp32"  # no bf16 on a V100
    assert choose_acceleration(LLAMA2_7B, {"fp16": True}, device=V100).attention == "flash_attention_2"
    packed = choose_acceleration(LLAMA2_7B, {}, packed_rows=True, device=H200)  # sft --packing: rows of several samples
    assert packed.attention == "sdpa" and "packed rows need SDPA's mask" in packed.line
    with pytest.raises(ZhllamaError, match="use --attention sdpa with --packing"):
        choose_acceleration(LLAMA2_7B, {}, attention="flash_attention_2", packed_rows=True, device=H200)


def test_the_users_flags_win():
    chosen = choose_acceleration(LLAMA2_7B, {"bf16": False, "gradient_checkpointing": False}, device=H200)
    assert (chosen.precision, chosen.gradient_checkpointing, chosen.training_values) == ("fp32", False, {})
    assert "fp32 (as asked)" in chosen.line and "gradient checkpointing off (as asked)" in chosen.line
    small = tiny_llama_config(500)
    assert choose_acceleration(small, {"gradient_checkpointing": True}, device=CPU).gradient_checkpointing
    assert choose_acceleration(small, {"fp16": True}, device=H200).precision == "fp16"


def test_a_small_model_on_cpu_stays_fp32_sdpa_without_checkpointing():
    chosen = choose_acceleration(tiny_llama_config(500), None, device=CPU)
    assert (chosen.precision, chosen.attention, chosen.gradient_checkpointing, chosen.training_values) == ("fp32", "sdpa", False, {})
    assert estimate_parameters(tiny_llama_config(500)) < CHECKPOINTING_ABOVE
    assert chosen.line.startswith("acceleration: cpu, 0.00B parameters: fp32 (auto: no bf16 on cpu)")
    # a built TrainingArguments counts by what differs from transformers' defaults
    from transformers import TrainingArguments

    assert choose_acceleration(LLAMA2_7B, TrainingArguments(output_dir="x", use_cpu=True)).device.type == "cpu"


def test_impossible_choices_are_refused_with_what_to_do(monkeypatch):
    with pytest.raises(ZhllamaError, match="--load-in-4bit needs a CUDA GPU.*drop --load-in-4bit"):
        choose_acceleration(LLAMA2_7B, {}, load_in_4bit=True, device=CPU)
    monkeypatch.setattr("zhllama.accel.bitsandbytes_installed", lambda: True)
    assert choose_acceleration(LLAMA2_7B, {}, load_in_4bit=True, device=H200).load_dtype("float32") == "bfloat16"
    monkeypatch.setattr("zhllama.accel.bitsandbytes_installed", lambda: False)
    with pytest.raises(ZhllamaError, match="pip install bitsandbytes"):
        choose_acceleration(LLAMA2_7B, {}, load_in_4bit=True, device=H200)
    monkeypatch.setattr("zhllama.accel.flash_attention_installed", lambda: False)
    with pytest.raises(ZhllamaError, match="flash-attn package"):
        choose_acceleration(LLAMA2_7B, {}, attention="flash_attention_2", device=H200)
    assert choose_acceleration(LLAMA2_7B, {}, attention="eager", device=H200).attention == "eager"


def test_prepare_sets_the_attention_kernel_and_turns_the_kv_cache_off():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(500))
    choose_acceleration(tiny_llama_config(500), {}, attention="eager", device=CPU).prepare(model)
    assert model.config._attn_implementation == "eager" and model.config.use_cache is False


def test_4bit_quantises_the_frozen_linears_and_keeps_trainable_rows_full_precision():
    """bitsandbytes' NF4 layers also run on CPU (slowly), which lets this test check the code
    path the CLI only takes on a GPU: what is quantised, what stays float32, and that LoRA and
    the token rows get gradients through the quantised layers."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (the qlora extra: pip install -e '.[qlora]')")
    from transformers import LlamaForCausalLM

    from zhllama.args import LoraSettings
    from zhllama.training import build_peft_model

    torch.manual_seed(0)
    config = tiny_llama_config(500, hidden_size=64)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    quantize_4bit(model, device="cpu")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantised = {n for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantised == {n for n in linears if n != "lm_head"} and len(quantised) == 2 * 7
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    with torch.no_grad():
        after = model(input_ids=ids).logits.float()
    # NF4 keeps 4 bits a weight: the logits move but keep their direction
    assert not torch.equal(after, before)
    assert torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.98

    peft_model = build_peft_model(
        model, new_token_ids=range(450, 500), lora=LoraSettings(r=4, alpha=8, dropout=0.0, target=["q_proj", "v_proj"])
    )
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any("trainable_tokens" in n for n in trained)
    assert all(p.dtype == torch.float32 and p.grad is not None for p in trained.values())
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if p.dtype == torch.uint8)
