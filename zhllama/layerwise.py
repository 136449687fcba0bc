"""A LLaMA forward pass streamed one decoder layer at a time from the checkpoint's shards.

Loading a 7B model whole costs its size in memory (twice, for ``merge --verify``'s two models);
a pass over many sequences does not need that. :class:`LayerwiseModel` embeds every sequence,
then loads decoder layer 0 from the shards, pushes every sequence's hidden states through it,
frees it, loads layer 1, and so on; the final norm last. Memory is one layer (in the compute
dtype) plus the hidden states of all sequences, whatever the model's size; with ``device="cuda"``
each layer is moved to the GPU in turn, so a model larger than the GPU can still be run.

The layers are transformers' own ``LlamaDecoderLayer`` with its rotary embedding and causal mask,
so the result is the model's own forward (up to summation order). ``edit_layer`` lets a caller
change a layer after loading (``merge --verify`` wraps its projections in peft's LoRA layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from zhllama.errors import ZhllamaError

from zhllama.merge.checkpoint import EMBEDDING, FINAL_NORM, OUTPUT_EMBEDDING


@dataclass
class Batch:
    """Right-padded token ids (batch x length) and their attention mask (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None


def batches_of(sequences: Sequence[Sequence[int]], tokens_per_batch: int = 2048) -> list[Batch]:
    """Right-padded batches of about ``tokens_per_batch`` tokens, sequences kept in order."""
    batches, group = [], []

    def flush():
        length = max(len(s) for s in group)
        ids = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for row, sequence in enumerate(group):
            ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
            mask[row, : len(sequence)] = 1
        batches.append(Batch(ids, mask))

    for sequence in sequences:
        if group and (len(group) + 1) * max(len(sequence), *(len(s) for s in group)) > tokens_per_batch:
            flush()
            group = []
        group.append(sequence)
    if group:
        flush()
    return batches


@dataclass
class LayerwiseModel:
    """A LLaMA checkpoint directory, run layer by layer (see the module doc)."""

    model_dir: Path
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    edit_layer: Callable[[torch.nn.Module, int], torch.nn.Module] | None = None
    # name -> tensor: used instead of the checkpoint's (verify's reference embedding and head)
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)
    # False: config.json alone, no shards yet (a caller that feeds the layers itself, see Pass)
    weights: bool = True

    def __post_init__(self) -> None:
        import json

        from transformers import AutoConfig

        from zhllama.merge.checkpoint import Checkpoint

        self.model_dir = Path(self.model_dir)
        config_dict = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        if config_dict.get("model_type") != "llama":
            raise ZhllamaError(f"{self.model_dir}: a '{config_dict.get('model_type')}' model; the layer-by-layer pass runs LLaMA models")
        self.config = AutoConfig.from_pretrained(str(self.model_dir))
        self.config._attn_implementation = "sdpa"
        if not self.weights:
            return
        self.checkpoint = Checkpoint(self.model_dir)
        self.checkpoint.check_shapes(config_dict)
        self.tied = EMBEDDING in self.checkpoint.tensors and OUTPUT_EMBEDDING not in self.checkpoint.tensors

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.overrides:
            return self.overrides[name].to(self.device, self.dtype)
        return self.checkpoint.read([name])[name].to(self.device, self.dtype)

    def layer(self, index: int) -> torch.nn.Module:
        """Decoder layer ``index`` with its weights from the shards, in ``dtype`` on ``device``."""
        prefix = f"model.layers.{index}."
        names = [n for n in self.checkpoint.tensors if n.startswith(prefix) and not n.endswith("rotary_emb.inv_freq")]
        return self.build_layer(index, {n.removeprefix(prefix): t for n, t in self.checkpoint.read(names).items()})

    def build_layer(self, index: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Decoder layer ``index`` from its tensors (names without the ``model.layers.N.`` prefix)."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        state = {n: t.to(self.dtype) for n, t in state.items()}
        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.config, index)
        missing = sorted(set(layer.state_dict()) - set(state))
        if missing:
            raise ZhllamaError(f"{self.model_dir}: layer {index} has no model.layers.{index}.{missing[0]}; the checkpoint is incomplete")
        layer.load_state_dict(state, assign=True, strict=True)
        layer = layer.to(self.device).eval()
        return self.edit_layer(layer, index) if self.edit_layer else layer

    def hidden_states(self, batches: Sequence[Batch], *, progress: str | None = None) -> list[torch.Tensor]:
        """The final (normed) hidden states of every batch, as ``model.model(...).last_hidden_state``."""
        with torch.no_grad():
            run = Pass(self, batches, self.tensor(EMBEDDING))
            layers = range(self.config.num_hidden_layers)
            if progress:
                import sys

                from tqdm import tqdm

                layers = tqdm(layers, desc=progress, unit="layer", file=sys.stderr)
            for index in layers:
                run.step(self.layer(index))
            return run.normed(self.tensor(FINAL_NORM))

    def logits(self, batches: Sequence[Batch], *, progress: str | None = None) -> list[torch.Tensor]:
        """Logits of every position of every batch (fp32)."""
        states = self.hidden_states(batches, progress=progress)
        head = self.tensor(EMBEDDING if self.tied else OUTPUT_EMBEDDING)
        return [(h @ head.T).float() for h in states]


class Pass:
    """One forward pass over ``batches`` that the caller feeds decoder layer after decoder layer
    (:meth:`LayerwiseModel.hidden_states` from the shards; ``merge --verify`` with the layers it is
    merging, so the checkpoint is not read again)."""

    def __init__(self, model: LayerwiseModel, batches: Sequence[Batch], embedding: torch.Tensor):
        from transformers.masking_utils import create_causal_mask
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.model, self.layers_done = model, 0
        device, config = model.device, model.config
        with torch.no_grad():
            embedding = embedding.to(device, model.dtype)
            self.states = [torch.nn.functional.embedding(b.input_ids.to(device), embedding) for b in batches]
            del embedding
            rotary = LlamaRotaryEmbedding(config).to(device)
            self.positions = [torch.arange(h.shape[1], device=device).unsqueeze(0) for h in self.states]
            self.rope = [rotary(h, p) for h, p in zip(self.states, self.positions)]
            self.masks = [
                create_causal_mask(
                    config=config, inputs_embeds=h, past_key_values=None, position_ids=p,
                    attention_mask=None if b.attention_mask is None else b.attention_mask.to(device),
                )
                for h, p, b in zip(self.states, self.positions, batches)
            ]

    def step(self, layer: torch.nn.Module) -> None:
        """Push every batch's hidden states through ``layer`` (the next decoder layer)."""
        with torch.no_grad():
            for i in range(len(self.states)):
                self.states[i] = layer(self.states[i], attention_mask=self.masks[i], position_embeddings=self.rope[i], position_ids=self.positions[i])
        self.layers_done += 1

    def normed(self, norm_weight: torch.Tensor) -> list[torch.Tensor]:
        """The final hidden states, through the final RMS norm (with ``norm_weight``)."""
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        config = self.model.config
        if self.layers_done != config.num_hidden_layers:
            raise RuntimeError(f"internal error: {self.layers_done} of {config.num_hidden_layers} decoder layers run")
        with torch.no_grad():
            norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(self.model.device, self.model.dtype)
            norm.weight.copy_(norm_weight.to(self.model.device, self.model.dtype))
            return [norm(h) for h in self.states]


def base_model_pass(model_dir: str | Path, batches: Sequence[Batch], *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``model.model(input_ids, attention_mask).last_hidden_state`` for every batch, streamed layer by layer.

    For passes over many sequences with a model too large to load (extend's ``--head-init``):
    all batches go through each layer before the next is loaded, so the checkpoint is read once."""
    return LayerwiseModel(Path(model_dir), device=device, dtype=dtype).hidden_states(batches, progress="base model, layer by layer")
