"""A peft adapter read as a list of edits to named base tensors.

zhllama's adapters are ordinary peft adapters (``adapter_config.json`` +
``adapter_model.safetensors``). Rather than building the model to let peft merge them, merge
reads the adapter tensors and applies them to the base tensors as they stream past. The key
names are those peft 0.21 saves (``base_model.model.`` + module path +):

- ``.lora_A.weight`` / ``.lora_B.weight``: a LoRA on a linear layer, W += s · B @ A
  (transposed when ``fan_in_fan_out``), s = alpha / r, or alpha / sqrt(r) with rsLoRA, with
  per-module ``rank_pattern`` / ``alpha_pattern``;
- ``.lora_embedding_A`` / ``.lora_embedding_B``: a LoRA on an embedding, W += s · (B @ A)ᵀ;
- ``.trainable_tokens_delta`` (``TrainableTokensConfig``) or ``.token_adapter.trainable_tokens_delta``
  (``LoraConfig(trainable_token_indices=...)``): the full new values of the listed rows
  (peft's "delta" replaces the rows, it is not added);
- ``.weight`` of a module in ``modules_to_save``, or of an embedding peft saved whole
  (``save_embedding_layers``, as ``.base_layer.weight`` when it also carries a LoRA): the
  whole new matrix, applied before the adapter's LoRA deltas.

With tied embeddings peft may save the same rows under both ``embed_tokens`` and ``lm_head``;
both name the one shared matrix here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zhllama.errors import ZhllamaError

PREFIX = "base_model.model."
SUPPORTED_TYPES = ("LORA", "TRAINABLE_TOKENS")


@dataclass
class Edit:
    """One change an adapter makes to one base tensor."""

    adapter: Path
    key: str  # the adapter tensor's name, for messages
    target: str  # the base tensor it changes
    kind: str  # "replace" | "lora" | "rows"
    value: torch.Tensor | None = None  # replace: the new matrix; rows: the new rows
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0
    transpose: bool = False  # fan_in_fan_out linear layers and embeddings store W transposed to B @ A
    indices: list[int] = field(default_factory=list)

    def result_shape(self) -> tuple[int, ...] | None:
        """The shape of base tensor this edit needs (None for rows, checked separately)."""
        if self.kind == "replace":
            return tuple(self.value.shape)
        if self.kind == "lora":
            out, inp = self.lora_b.shape[0], self.lora_a.shape[1]
            return (inp, out) if self.transpose else (out, inp)
        return None

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A LoRA's update of the base matrix as ``(left, right, scaling)``, in fp32: W += scaling · left @ right."""
        lora_a, lora_b = self.lora_a.to(torch.float32), self.lora_b.to(torch.float32)
        return (lora_a.T, lora_b.T, self.scaling) if self.transpose else (lora_b, lora_a, self.scaling)

    def apply(self, weight: torch.Tensor, *, in_place: bool = True) -> torch.Tensor:
        """Apply to an fp32 ``weight`` and return the result: ``weight`` itself, changed in place
        where possible, or (``in_place=False``) a new tensor, ``weight`` left as it was; the values
        are the same either way."""
        if self.kind == "replace":
            return self.value.to(torch.float32).clone()
        if self.kind == "lora":
            # in place (W += s·B@A without a temporary delta matrix): W is the largest thing in memory
            left, right, _ = self.lora_factors()
            if in_place:
                return weight.addmm_(left, right, alpha=self.scaling)
            return torch.addmm(weight, left, right, alpha=self.scaling)
        if not in_place:
            weight = weight.clone()
        weight[torch.tensor(self.indices)] = self.value.to(torch.float32)
        return weight


@dataclass
class Adapter:
    directory: Path
    config: dict
    edits: list[Edit]

    @property
    def changed_rows(self) -> list[int]:
        return sorted({i for e in self.edits if e.kind == "rows" for i in e.indices})


def _pattern_value(patterns: dict, module: str, default):
    """The value of ``rank_pattern`` / ``alpha_pattern`` for ``module``, found by peft's own rule."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(patterns.keys(), module)
    return patterns.get(key, default)


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_file = directory / "adapter_model.safetensors"
    bin_file = directory / "adapter_model.bin"
    from safetensors import SafetensorError

    try:
        if safetensors_file.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_file))
        if bin_file.is_file():
            return torch.load(str(bin_file), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise ZhllamaError(f"adapter {directory}: cannot read its weights: {' '.join(str(e).split())[:200]}") from e
    raise ZhllamaError(f"adapter {directory}: no adapter_model.safetensors (or .bin); was it saved completely?")


def _token_indices(config: dict, module: str, directory: Path) -> list[int]:
    if config.get("peft_type") == "TRAINABLE_TOKENS":
        return list(config.get("token_indices") or [])
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):  # a plain list means the input embedding
        return spec
    if isinstance(spec, dict):
        for name, indices in spec.items():
            if re.match(rf"(.*\.)?{re.escape(name)}$", module):
                return list(indices)
    raise ZhllamaError(f"adapter {directory}: trainable token rows for {module} but adapter_config.json lists no indices for it")


def _check_config(config: dict, directory: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        raise ZhllamaError(f"adapter {directory}: peft type {peft_type} is not supported by merge (only {', '.join(SUPPORTED_TYPES)})")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("layer_replication", "layer replication")):
        if config.get(flag):
            raise ZhllamaError(f"adapter {directory}: {what} ({flag}) is not supported by merge; merge it with peft's merge_and_unload")


def read_adapter(directory: Path) -> Adapter:
    """Read an adapter directory into edits (before any base weight is touched)."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ZhllamaError(f"adapter {directory}: unreadable adapter_config.json ({e})") from e
    _check_config(config, directory)
    tensors = {k.removeprefix(PREFIX): v for k, v in _load_tensors(directory).items()}
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ZhllamaError(f"adapter {directory}: tensor {key} holds NaN or inf values; the training run diverged")
    edits = []
    for key, tensor in tensors.items():
        module, kind = _classify(key)
        if kind is None:
            raise ZhllamaError(
                f"adapter {directory}: tensor {key} {tuple(tensor.shape)} is not a LoRA, trainable-token or "
                "modules_to_save weight merge knows; was it saved by another peft method?"
            )
        if kind == "lora_B":
            key_a = key.replace("lora_embedding_B", "lora_embedding_A").replace(".lora_B.", ".lora_A.")
            if key_a not in tensors:
                raise ZhllamaError(f"adapter {directory}: {key} has no matching {key_a}; the adapter file is incomplete")
            continue  # read together with its lora_A
        if kind == "lora_A":
            edits.append(_lora_edit(directory, config, tensors, key, module))
        elif kind == "rows":
            indices = _token_indices(config, module, directory)
            edits.append(Edit(directory, key, module + ".weight", "rows", value=tensor, indices=indices))
        else:
            edits.append(Edit(directory, key, module + ".weight", "replace", value=tensor))
    return Adapter(directory, config, edits)


def _classify(key: str) -> tuple[str, str | None]:
    for suffix, kind in (
        (".lora_A.weight", "lora_A"),
        (".lora_B.weight", "lora_B"),
        (".lora_embedding_A", "lora_A"),
        (".lora_embedding_B", "lora_B"),
        (".token_adapter.trainable_tokens_delta", "rows"),
        (".trainable_tokens_delta", "rows"),
    ):
        if key.endswith(suffix):
            # peft nests wrappers when a module is targeted twice (``lm_head.base_layer.…``)
            return key[: -len(suffix)].removesuffix(".base_layer"), kind
    # a whole matrix: a module in modules_to_save, or an embedding peft saved because it was
    # targeted or resized (save_embedding_layers); peft loads these over the base weights
    if key.endswith(".weight"):
        return key.removesuffix(".weight").removesuffix(".base_layer"), "replace"
    return key, None


def _lora_edit(directory: Path, config: dict, tensors: dict, key_a: str, module: str) -> Edit:
    embedding = key_a.endswith(".lora_embedding_A")
    key_b = key_a.replace("lora_embedding_A", "lora_embedding_B") if embedding else key_a.replace(".lora_A.", ".lora_B.")
    if key_b not in tensors:
        raise ZhllamaError(f"adapter {directory}: {key_a} has no matching {key_b}; the adapter file is incomplete")
    lora_a, lora_b = tensors[key_a], tensors[key_b]
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if lora_a.shape[0] != r or lora_b.shape[1] != r:
        raise ZhllamaError(
            f"adapter {directory}: {key_a} {tuple(lora_a.shape)} and {key_b} {tuple(lora_b.shape)} do not have the rank "
            f"r={r} that adapter_config.json gives for {module}; the config does not belong to these weights"
        )
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    transpose = embedding or bool(config.get("fan_in_fan_out"))
    return Edit(directory, key_a, module + ".weight", "lora", lora_a=lora_a, lora_b=lora_b, scaling=scaling, transpose=transpose)


def _shape_cause(target: str, adapter_shape: tuple, base_shape: tuple) -> str:
    vocab_matrix = target.endswith(("embed_tokens.weight", "lm_head.weight"))
    if vocab_matrix and len(adapter_shape) == 2 and adapter_shape[1] == base_shape[1] and adapter_shape[0] != base_shape[0]:
        return (
            f"vocab {base_shape[0]} vs {adapter_shape[0]}: the adapter was made for another (extended) model; "
            "pass the model it was trained on (see the adapter's zhllama.json)"
        )
    return "the adapter was made for a model of another size or architecture; pass the model it was trained on"


def fit_to_base(adapter: Adapter, shapes: dict[str, tuple[int, ...]], aliases: dict[str, str], model_dir: Path) -> None:
    """Point every edit at a base tensor and check it fits, raising a one-line error if not.

    ``aliases`` maps names that share another tensor's storage (a tied ``lm_head.weight``) to
    that tensor. Runs before any output is written.
    """
    kept: dict[tuple[str, str], Edit] = {}
    for edit in adapter.edits:
        edit.target = aliases.get(edit.target, edit.target)
        where = f"adapter {adapter.directory}: {edit.key}"
        if edit.target not in shapes:
            raise ZhllamaError(
                f"{where} targets {edit.target}, which {model_dir} does not have; the adapter was made for another "
                "architecture; pass the model it was trained on"
            )
        base_shape = shapes[edit.target]
        if edit.kind == "rows":
            _check_rows(edit, where, base_shape, model_dir)
        elif edit.result_shape() != base_shape:
            shape = edit.result_shape()
            shown = tuple(edit.value.shape) if edit.kind == "replace" else f"{tuple(edit.lora_b.shape)}@{tuple(edit.lora_a.shape)}→{shape}"
            raise ZhllamaError(f"{where} {shown} does not fit {edit.target} {base_shape} of {model_dir}: {_shape_cause(edit.target, shape, base_shape)}")
        if edit.kind in ("rows", "replace"):
            twin = kept.get((edit.target, edit.kind))
            if twin is not None:
                # tied embeddings: peft saves the one shared matrix under both names
                if twin.indices == edit.indices and torch.equal(twin.value, edit.value):
                    continue
                raise ZhllamaError(
                    f"{where} and {twin.key} both set {edit.target} (tied input and output embeddings) to different "
                    "values; the merged model cannot stay tied. For a tied model train embed_tokens only (as zhllama pretrain does)"
                )
            kept[(edit.target, edit.kind)] = edit
    adapter.edits = [e for e in adapter.edits if e.kind == "lora" or kept.get((e.target, e.kind)) is e]


def _check_rows(edit: Edit, where: str, base_shape: tuple, model_dir: Path) -> None:
    rows, width = base_shape[0], base_shape[-1]
    if edit.value.ndim != 2 or edit.value.shape[0] != len(edit.indices):
        raise ZhllamaError(
            f"{where} has shape {tuple(edit.value.shape)} but adapter_config.json lists {len(edit.indices)} token indices; "
            "the config does not belong to these weights"
        )
    if edit.value.shape[1] != width:
        raise ZhllamaError(
            f"{where} rows {tuple(edit.value.shape)} do not fit {edit.target} {base_shape} of {model_dir}: hidden size "
            f"{width} vs {edit.value.shape[1]}; the adapter was made for a model of another size"
        )
    highest = max(edit.indices, default=-1)
    if highest >= rows or min(edit.indices, default=0) < 0:
        raise ZhllamaError(
            f"{where} sets token row {highest} but {edit.target} of {model_dir} has {rows} rows (vocab {rows} vs at least "
            f"{highest + 1}): the adapter was made for another (extended) model; pass the model it was trained on"
        )
