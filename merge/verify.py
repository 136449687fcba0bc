"""``merge --verify``: the merged checkpoint must compute what the base + adapter chain computes.

The reference is the chain as every other command loads it (:func:`zhllama.chain.apply_adapter`,
i.e. peft's ``PeftModel.from_pretrained`` + ``merge_and_unload``, in fp32); the merged model is
loaded with transformers and run in fp32 too, so the only difference left is the rounding of
the weights to the merged dtype. Both models are loaded whole here (one after the other): this
check costs the memory that the merge itself avoids.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from zhllama.errors import ZhllamaError
from zhllama.merge.adapters import Adapter

SAMPLE_TEXT = "从前有一座山，山里有一座庙。Once upon a time, there was a little girl named Lily. 1234"
# Allowed max |logit difference| relative to the largest reference logit: fp32 leaves only
# summation-order noise; half precisions round each weight by about 2^-11 (fp16) or 2^-8 (bf16).
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
MAX_EXTRA_ROWS = 64


def sample_ids(tokenizer_dir: Path, adapters: list[Adapter], rows: int) -> list[int]:
    """Token ids of a short bilingual text plus rows the adapters changed (so row edits are exercised)."""
    if (tokenizer_dir / "tokenizer.model").is_file():
        import sentencepiece as spm

        ids = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model")).encode(SAMPLE_TEXT)
    else:
        from zhllama.chain import load_tokenizer

        ids = load_tokenizer(tokenizer_dir)(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    changed = sorted({i for a in adapters for i in a.changed_rows})
    step = max(1, len(changed) // MAX_EXTRA_ROWS)
    return [1 % rows] + [i for i in ids if i < rows] + changed[::step][:MAX_EXTRA_ROWS]


def _logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def verify_merged(merged_dir: Path, model_dir: Path, adapters: list[Adapter], dtype: str, tokenizer_dir: Path) -> tuple[float, float]:
    """Max |logit difference| between the merged model and the peft chain; raises above the tolerance."""
    from transformers import AutoModelForCausalLM

    from zhllama.chain import apply_adapter

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = sample_ids(tokenizer_dir, adapters, rows)
    for adapter in adapters:
        model = apply_adapter(model, adapter.directory)
    reference = _logits(model, ids)
    del model
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    diff = (_logits(merged, ids) - reference).abs().max().item()
    tolerance = RELATIVE_TOLERANCE[dtype] * max(1.0, reference.abs().max().item())
    print(f"verify: max |logit diff| {diff:.3g} over {len(ids)} tokens (tolerance {tolerance:.3g} for {dtype})", file=sys.stderr)
    if not diff <= tolerance:
        raise ZhllamaError(
            f"--verify: merged model's logits differ from the adapter chain's by {diff:.3g} (> {tolerance:.3g} allowed for "
            f"{dtype}); the merge is wrong for this chain, please report it with the adapters' adapter_config.json"
        )
    return diff, tolerance
