"""``merge --verify``: the merged checkpoint must compute what the base + adapter chain computes.

Both sides run layer by layer (:mod:`zhllama.layerwise`), in fp32, so memory is one decoder
layer and a few activations whatever the model's size, never two whole models:

- the merged checkpoint as written;
- the chain: the *base* checkpoint, each decoder layer wrapped after loading with every
  adapter's LoRA modules by peft itself (``inject_adapter_in_model`` with the adapter's own
  config, unmerged, all adapters active), so the layer computes W·x + Σ s·B·A·x through
  peft's layer classes rather than merge's arithmetic; the embedding and LM head get the
  adapters' row replacements, whole-matrix replacements and embedding LoRAs in chain order.

The only difference left is the rounding of the merged weights to the merged dtype.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from zhllama.errors import ZhllamaError
from zhllama.layerwise import Batch, LayerwiseModel
from zhllama.merge.checkpoint import EMBEDDING, OUTPUT_EMBEDDING
from zhllama.merge.adapters import PREFIX, Adapter

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


def _vocab_matrices(base: LayerwiseModel, adapters: list[Adapter]) -> dict[str, torch.Tensor]:
    """The chain's embedding and LM head: each adapter's whole-matrix replacement, then its
    embedding LoRA, then its new rows (peft's load order), adapter after adapter."""
    names = [EMBEDDING] if base.tied else [EMBEDDING, OUTPUT_EMBEDDING]
    matrices = {name: base.checkpoint.read([name])[name].float() for name in names}
    for adapter in adapters:
        for kind in ("replace", "lora", "rows"):
            for edit in (e for e in adapter.edits if e.kind == kind and e.target in matrices):
                matrix = matrices[edit.target]
                if kind == "replace":
                    matrices[edit.target] = edit.value.float().clone()
                elif kind == "lora":  # an embedding's LoRA stores (B @ A) transposed; the head's does not
                    delta = edit.lora_b.float() @ edit.lora_a.float()
                    matrix += edit.scaling * (delta.T if edit.transpose else delta)
                else:
                    matrix[torch.tensor(edit.indices)] = edit.value.float()
    return matrices


def _layer_keys(adapter_tensors: dict[str, torch.Tensor], index: int) -> list[str]:
    prefix = f"{PREFIX}model.layers.{index}."
    return [k for k in adapter_tensors if k.startswith(prefix)]


def _peft_wrapper(adapters: list[Adapter]):
    """``edit_layer`` for the chain: decoder layer ``index`` with every adapter's LoRA injected by peft."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    configs, tensors = [], []
    for adapter in adapters:
        if adapter.config.get("peft_type") != "LORA":
            continue  # trainable tokens touch only the embedding and head
        config = LoraConfig.from_pretrained(str(adapter.directory))
        # the rows and whole matrices are the vocabulary matrices' business (see _vocab_matrices)
        config.trainable_token_indices, config.modules_to_save = None, None
        configs.append(config)
        weights = adapter.directory / "adapter_model.safetensors"
        tensors.append(load_file(str(weights)) if weights.is_file() else torch.load(str(adapter.directory / "adapter_model.bin"), weights_only=True))

    def wrap(layer: torch.nn.Module, index: int) -> torch.nn.Module:
        # a shell with the real module path, so peft's target matching sees "model.layers.N.self_attn.q_proj"
        shell = torch.nn.Module()
        shell.model = torch.nn.Module()
        shell.model.layers = torch.nn.ModuleDict({str(index): layer})
        names = []
        for k, (config, adapter_tensors) in enumerate(zip(configs, tensors)):
            keys = [key for key in _layer_keys(adapter_tensors, index) if ".lora_" in key]
            if not keys:
                continue
            name = f"chain{k}"
            with warnings.catch_warnings():  # a rank_pattern key names a module of another layer: expected here
                warnings.simplefilter("ignore", RuntimeWarning)
                inject_adapter_in_model(config, shell, adapter_name=name)
            used = set()
            for module_name, module in shell.named_modules():
                if isinstance(module, LoraLayer) and name in module.lora_A:
                    for part in ("lora_A", "lora_B"):
                        key = f"{PREFIX}{module_name}.{part}.weight"
                        getattr(module, part)[name].weight.data.copy_(adapter_tensors[key])
                        used.add(key)
            if set(keys) - used:
                raise ZhllamaError(f"--verify: peft did not place {sorted(set(keys) - used)[0]} of {adapters[k].directory}; report this")
            names.append(name)
        for module in shell.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter(names, inference_mode=True)
        return shell.model.layers[str(index)].eval()

    return wrap


def verify_merged(
    merged_dir: Path, model_dir: Path, adapters: list[Adapter], dtype: str, tokenizer_dir: Path, *, device: str = "cpu"
) -> tuple[float, float]:
    """Max |logit difference| between the merged model and the peft chain; raises above the tolerance."""
    chain = LayerwiseModel(model_dir, device=device, edit_layer=_peft_wrapper(adapters))
    chain.overrides = _vocab_matrices(chain, adapters)
    rows = chain.overrides[EMBEDDING].shape[0]
    ids = sample_ids(tokenizer_dir, adapters, rows)
    batch = [Batch(torch.tensor([ids]))]
    reference = chain.logits(batch, progress="verify: the adapter chain")[0][0].cpu()
    merged = LayerwiseModel(merged_dir, device=device).logits(batch, progress="verify: the merged model")[0][0].cpu()
    diff = (merged - reference).abs().max().item()
    tolerance = RELATIVE_TOLERANCE[dtype] * max(1.0, reference.abs().max().item())
    print(f"verify: max |logit diff| {diff:.3g} over {len(ids)} tokens (tolerance {tolerance:.3g} for {dtype})", file=sys.stderr)
    if not diff <= tolerance:
        raise ZhllamaError(
            f"--verify: merged model's logits differ from the adapter chain's by {diff:.3g} (> {tolerance:.3g} allowed for "
            f"{dtype}); the merge is wrong for this chain, please report it with the adapters' adapter_config.json"
        )
    return diff, tolerance
