"""``merge --verify``: the merged checkpoint must compute what the base + adapter chain computes.

Both sides run layer by layer (:mod:`zhllama.layerwise`), in fp32, so memory is one decoder
layer and a few activations whatever the model's size, never two whole models; they run while
the merge streams the base (:class:`Verifier`), so neither checkpoint is read from the disk again:

- the merged checkpoint as written;
- the chain: the *base* checkpoint, each decoder layer wrapped after loading with every
  adapter's LoRA modules by peft itself (``inject_adapter_in_model`` with the adapter's own
  config, unmerged, all adapters active), so the layer computes W·x + Σ s·B·A·x through
  peft's layer classes rather than merge's arithmetic; the embedding and LM head get the
  adapters' row replacements, whole-matrix replacements and embedding LoRAs in chain order.

The only difference left is the rounding of the merged weights to the merged dtype.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

from zhllama.errors import ZhllamaError
from zhllama.layerwise import Batch, LayerwiseModel, Pass
from zhllama.merge.checkpoint import EMBEDDING, FINAL_NORM, OUTPUT_EMBEDDING, ByteRange, TensorInfo, read_range
from zhllama.merge.adapters import PREFIX, Adapter

SAMPLE_TEXT = "从前有一座山，山里有一座庙。Once upon a time, there was a little girl named Lily. 1234"
# Allowed max |logit difference| relative to the largest reference logit: fp32 leaves only
# summation-order noise; half precisions round each weight by about 2^-11 (fp16) or 2^-8 (bf16).
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
MAX_EXTRA_ROWS = 64
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _layer_weight(name: str) -> tuple[int, str] | None:
    """(layer index, name within the layer) of a decoder layer's weight; None for anything else
    (including the ``rotary_emb.inv_freq`` buffer old checkpoints store)."""
    match = _LAYER.fullmatch(name)
    if match is None or name.endswith("rotary_emb.inv_freq"):
        return None
    return int(match.group(1)), match.group(2)


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


def _vocab_matrix(base: LayerwiseModel, adapters: list[Adapter], name: str) -> dict[str, torch.Tensor]:
    """The chain's embedding or LM head (``name``): each adapter's whole-matrix replacement, then
    its embedding LoRA, then its new rows (peft's load order), adapter after adapter."""
    matrices = {name: base.checkpoint.read([name])[name].float()}
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
        # the rows and whole matrices are the vocabulary matrices' business (see _vocab_matrix)
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


class Verifier:
    """Both passes, run while ``zhllama merge`` writes the merged checkpoint, so neither checkpoint is
    read again: the merge hands over each tensor it merged (:meth:`add`) with the base tensor it
    read (in fp32 where merge made that copy anyway) and where it wrote the result. Once decoder
    layer N is complete (and N-1 has run) the chain's layer N is built from the base tensors; the
    merged layer N, once N+1 is in too (so the merge's background writer has put N on the file),
    from the bytes read back from the merged shard at the offsets of its header (the file as
    written, from the page cache); each runs on its own hidden states. :meth:`finish` reads the
    merged final norm and head the same way, checks the written headers and config.json, and
    compares the logits."""

    def __init__(self, merged_dir: Path, model_dir: Path, adapters: list[Adapter], dtype: str, tokenizer_dir: Path, *, device: str = "cpu"):
        self.merged_dir, self.dtype = merged_dir, dtype
        self.adapters = adapters
        self.chain = LayerwiseModel(model_dir, device=device, edit_layer=_peft_wrapper(adapters))
        # the embedding is needed only to start the pass, the head only at the end: neither is held meanwhile
        embedding = _vocab_matrix(self.chain, adapters, EMBEDDING)[EMBEDDING]
        self.ids = sample_ids(tokenizer_dir, adapters, embedding.shape[0])
        self.batch = [Batch(torch.tensor([self.ids]))]
        self.chain_pass = Pass(self.chain, self.batch, embedding)
        del embedding
        self.merged = LayerwiseModel(merged_dir, device=device, weights=False)  # merge writes config.json first
        self.embedding = None  # where the merged embedding was written
        self.merged_pass = None  # from the merged embedding, once on the file
        self.layer_names = {}  # layer index -> its tensor names (without the prefix)
        for index, part in filter(None, map(_layer_weight, self.chain.checkpoint.tensors)):
            self.layer_names.setdefault(index, set()).add(part)
        self.base: dict[int, dict[str, torch.Tensor]] = {}
        # layer index -> name within the layer -> (where it was written, as what, wait until on the file)
        self.written: dict[int, dict[str, tuple[ByteRange, TensorInfo, Callable[[], None]]]] = {}
        self.next_chain = self.next_layer = 0  # the next decoder layer of each side to run

    @staticmethod
    def keeps(name: str) -> bool:
        """Whether :meth:`add` keeps tensor ``name``'s base values (a decoder layer's weights) until its layer runs."""
        return _layer_weight(name) is not None

    def add(self, name: str, base_tensor: torch.Tensor, written: ByteRange, info: TensorInfo, on_file: Callable[[], None] = lambda: None) -> None:
        """Tensor ``name`` merged: ``base_tensor`` as read from the base, written to ``written`` as
        ``info``; ``on_file()`` returns once those bytes are on the file (the merge writes in the background)."""
        layer = _layer_weight(name)
        if layer is not None:
            index, part = layer
            self.base.setdefault(index, {})[part] = base_tensor
            self.written.setdefault(index, {})[part] = (written, info, on_file)
        elif name == EMBEDDING:
            self.embedding = (written, info, on_file)
        self._run_ready_layers(lag=1)

    def done_with(self, path: Path) -> bool:
        """Whether the merged pass has read back every tensor it needs from the file ``path`` (all
        but the final norm and head, which :meth:`finish` reads)."""
        pending = [where for layer in self.written.values() for where, _, _ in layer.values()]
        if self.merged_pass is None and self.embedding is not None:
            pending.append(self.embedding[0])
        return all(where.path != path for where in pending)

    def _complete(self, index: int) -> bool:
        names = self.layer_names[index]
        return set(self.base.get(index, {})) == names and set(self.written.get(index, {})) == names

    def _run_ready_layers(self, lag: int) -> None:
        """Run the layers whose tensors are all in, in order: the chain's at once (its fp32 weights
        are freed after), the merged one from the file ``lag`` layers later, so its bytes are read
        back once the merge's background writer has written them, while it writes the next ones."""
        while self.next_chain in self.layer_names and self._complete(self.next_chain):
            self.chain_pass.step(self.chain.build_layer(self.next_chain, self.base.pop(self.next_chain)))
            self.next_chain += 1
        while self.embedding is not None and self.next_layer < self.next_chain:
            index = self.next_layer
            if lag and index + 1 in self.layer_names and index + 1 >= self.next_chain:
                return
            if self.merged_pass is None:
                range_, info, on_file = self.embedding
                on_file()
                self.merged_pass = Pass(self.merged, self.batch, read_range(range_, info))
            written = self.written.pop(index)
            for _, _, on_file in written.values():
                on_file()
            self.merged_pass.step(self.merged.build_layer(index, {part: read_range(r, info) for part, (r, info, _) in written.items()}))
            self.next_layer += 1

    def finish(self) -> tuple[float, float]:
        """Max |logit difference| between the merged model as written and the peft chain; raises above the tolerance."""
        self._run_ready_layers(lag=0)
        if self.merged_pass is None or self.next_layer != self.chain.config.num_hidden_layers:
            raise RuntimeError(f"internal error: --verify ran {self.next_layer} decoder layers of {self.chain.config.num_hidden_layers}")
        written = LayerwiseModel(self.merged_dir, device=self.merged.device)  # the headers and config.json as written
        if written.checkpoint.tensors.keys() != {n for n in self.chain.checkpoint.tensors if not (written.tied and n == OUTPUT_EMBEDDING)}:
            raise ZhllamaError(f"--verify: {self.merged_dir} does not hold the base's tensors; the merge is wrong, please report it")
        self.chain.overrides = _vocab_matrix(self.chain, self.adapters, EMBEDDING if self.chain.tied else OUTPUT_EMBEDDING)
        reference = self._logits(self.chain_pass, self.chain)
        merged = self._logits(self.merged_pass, written)
        diff = (merged - reference).abs().max().item()
        tolerance = RELATIVE_TOLERANCE[self.dtype] * max(1.0, reference.abs().max().item())
        print(f"verify: max |logit diff| {diff:.3g} over {len(self.ids)} tokens (tolerance {tolerance:.3g} for {self.dtype})", file=sys.stderr)
        if not diff <= tolerance:
            raise ZhllamaError(
                f"--verify: merged model's logits differ from the adapter chain's by {diff:.3g} (> {tolerance:.3g} allowed for "
                f"{self.dtype}); the merge is wrong for this chain, please report it with the adapters' adapter_config.json"
            )
        return diff, tolerance

    @staticmethod
    def _logits(run, model: LayerwiseModel) -> torch.Tensor:
        with torch.no_grad():
            states = run.normed(model.tensor(FINAL_NORM))
            head = model.tensor(EMBEDDING if model.tied else OUTPUT_EMBEDDING)
            return (states[0] @ head.T).float()[0].cpu()
