"""Writing an extended checkpoint shard by shard: the vocabulary matrices grow, nothing else changes.

``zhllama extend`` only adds rows to the embedding and the LM head. Loading the model whole to
save it again costs its size in memory (a ``.bin`` checkpoint is unpickled whole) and writes one
file as large as the model. Instead :func:`write_extended` streams the base checkpoint one
tensor at a time: ``model.embed_tokens.weight`` and ``lm_head.weight`` are written as the base
rows followed by the given new rows, every other tensor is copied bit for bit, and the output
keeps the base's sharding (or takes ``max_shard_size``). From safetensors shards the base bytes
(the vocabulary matrices' base rows too) are copied as byte ranges of the files, inside the
kernel, so only the new rows are ever encoded; ``.bin`` shards are read one at a time through a
memory map and written as safetensors.

:func:`load_vocab_model` gives extend's initialisation what it needs without the decoder
weights in memory: a real ``LlamaForCausalLM`` whose embedding, final norm and head are loaded,
and whose decoder layers are read from the shards one at a time whenever the model runs
(:class:`StreamedLayers`), so ``model.model(...)`` still computes the base model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import torch

from zhllama.errors import ZhllamaError
from zhllama.layerwise import LayerwiseModel
from zhllama.merge.checkpoint import (
    EMBEDDING,
    ByteRange,
    FINAL_NORM,
    OUTPUT_EMBEDDING,
    Checkpoint,
    PlannedShard,
    ShardWriter,
    TensorInfo,
    parse_size,
    plan_shards,
    read_once,
    read_config,
    tied_embeddings,
    write_config,
    write_index,
)

VOCAB_MATRICES = (EMBEDDING, OUTPUT_EMBEDDING)


def _base_sharding(wanted: list[TensorInfo], base: Checkpoint) -> list[PlannedShard]:
    """One output shard per base shard, holding the same tensors in the same order."""
    groups: dict[Path, list[TensorInfo]] = {}
    for info in wanted:
        groups.setdefault(base.shard_of[info.name], []).append(info)
    if len(groups) == 1:
        return [PlannedShard("model.safetensors", tuple(*groups.values()))]
    n = len(groups)
    return [PlannedShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups.values())]


def write_extended(
    model_dir: Path, out_dir: Path, new_rows: dict[str, torch.Tensor], *, max_shard_size: str | None = None
) -> list[str]:
    """Write the base checkpoint of ``model_dir`` to ``out_dir`` with rows appended to the vocabulary matrices.

    ``new_rows`` maps ``model.embed_tokens.weight`` (and ``lm_head.weight`` unless the embeddings
    are tied, in which case a stored ``lm_head.weight`` is dropped as transformers does) to the
    rows to append, in the base tensor's dtype. Writes the shards, the index and config.json
    (vocab_size = the new row count); returns the shard file names."""
    from tqdm import tqdm

    base = Checkpoint(model_dir)
    base.check_shapes(read_config(model_dir))
    for name, rows in new_rows.items():
        info = base.tensors.get(name)
        if info is None or rows.ndim != 2 or rows.shape[1] != info.shape[1]:
            raise ZhllamaError(f"{model_dir}: cannot append rows {tuple(rows.shape)} to {name} {info.shape if info else '(absent)'}")
    wanted = []
    for info in base.tensors.values():
        if info.name in new_rows:
            info = TensorInfo(info.name, (info.shape[0] + new_rows[info.name].shape[0], *info.shape[1:]), info.dtype)
        elif info.name in VOCAB_MATRICES:
            continue  # a tied lm_head stored beside the embedding: the embedding is the head
        wanted.append(info)
    shards = _base_sharding(wanted, base) if max_shard_size is None else plan_shards(wanted, parse_size(max_shard_size))
    shard_of = {t.name: i for i, s in enumerate(shards) for t in s.tensors}
    writers: dict[int, ShardWriter] = {}
    with tqdm(total=len(wanted), desc="writing the extended checkpoint", unit="tensor", file=sys.stderr) as progress:
        for name, source in _sources(base):
            if name not in shard_of:
                continue
            parts = [source]
            if name in new_rows:  # the base rows as they are, then the new rows
                parts.append(new_rows[name].to(base.tensors[name].dtype).contiguous())
            index = shard_of[name]
            if index not in writers:
                writers[index] = ShardWriter(out_dir / shards[index].filename, shards[index], digest=False)
            writers[index].write_parts(name, parts)
            del source, parts
            if not writers[index].expected:
                writers.pop(index).close()
            progress.update()
    write_index(out_dir, shards)
    rows = base.tensors[EMBEDDING].shape[0] + new_rows[EMBEDDING].shape[0]
    write_config(model_dir, out_dir, str(base.tensors[EMBEDDING].dtype).removeprefix("torch."), rows)
    return [s.filename for s in shards]


def _sources(base: Checkpoint) -> Iterator[tuple[str, "torch.Tensor | ByteRange"]]:
    """Each base tensor in shard order: a safetensors tensor as the byte range it occupies (copied
    file to file, never decoded), a ``.bin`` one as a view of the shard's memory map (written once
    from the map, no in-memory copy). The shards are read once (:func:`read_once`): the disk reads
    ahead while the copy writes what came before, and each shard leaves the page cache after."""
    for shard in read_once(base.shards):
        if shard.suffix == ".safetensors":
            yield from base.byte_ranges(shard).items()
        else:
            yield from base.iter_shard(shard, copy=False)


def new_rows_of(model, old_rows: int) -> dict[str, torch.Tensor]:
    """The rows a resized model added to its embedding (and untied head), for :func:`write_extended`."""
    rows = {EMBEDDING: model.get_input_embeddings().weight[old_rows:].detach()}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        rows[OUTPUT_EMBEDDING] = head.weight[old_rows:].detach()
    return rows


class StreamedLayers:
    """Stands in for ``LlamaModel.layers``: each decoder layer is loaded from the shards when the
    forward pass reaches it (on the device of the hidden states' embedding) and freed after."""

    def __init__(self, model, layers: LayerwiseModel):
        self.model, self.layers = model, layers

    def __len__(self) -> int:
        return self.layers.config.num_hidden_layers

    def __getitem__(self, which: slice) -> Iterator[torch.nn.Module]:
        return self._stream(range(len(self))[which])

    def __iter__(self) -> Iterator[torch.nn.Module]:
        return self._stream(range(len(self)))

    def _stream(self, indices: range) -> Iterator[torch.nn.Module]:
        for index in indices:
            self.layers.device = self.model.get_input_embeddings().weight.device
            yield self.layers.layer(index)


def load_vocab_model(model_dir: Path):
    """A ``LlamaForCausalLM`` of ``model_dir`` with only the embedding, final norm and head in memory
    (in the checkpoint's dtype); its decoder layers stream from the shards (:class:`StreamedLayers`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    base = Checkpoint(model_dir)
    config_dict = read_config(model_dir)
    if config_dict.get("model_type") != "llama":
        raise ZhllamaError(f"{model_dir}: a '{config_dict.get('model_type')}' model; extend handles LLaMA-architecture checkpoints")
    if EMBEDDING not in base.tensors:
        raise ZhllamaError(f"{model_dir}: no {EMBEDDING}; extend handles LLaMA-architecture checkpoints")
    dtype = base.tensors[EMBEDDING].dtype
    config = AutoConfig.from_pretrained(str(model_dir))
    config.vocab_size = base.tensors[EMBEDDING].shape[0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    del model.model.layers
    model.to_empty(device="cpu")
    model.model.layers = StreamedLayers(model, LayerwiseModel(model_dir, dtype=dtype))
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)  # its inverse frequencies were left on the meta device
    tied = tied_embeddings(base, read_config(model_dir))
    names = [EMBEDDING, FINAL_NORM] + ([] if tied else [OUTPUT_EMBEDDING])
    weights = base.read(names)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(weights[EMBEDDING])
        model.model.norm.weight.copy_(weights[FINAL_NORM])
        if tied:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        else:
            model.get_output_embeddings().weight.copy_(weights[OUTPUT_EMBEDDING])
    return model.eval()
