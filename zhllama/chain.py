"""A model is a base directory plus an ordered chain of adapters.

:func:`load_chain` is the one loader every model-consuming command uses (pretrain, sft, eval,
chat, merge --verify). It loads the base checkpoint, checks that each adapter was made for it,
applies the adapters in order (merging each into the weights in memory, so the next stage
trains on top of the result) and returns the model with the tokenizer of the last link that
has one. :func:`check_tokenizer_fits` and :func:`model_fingerprint` are the checks later
stages use to refuse inputs that do not belong together.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from zhllama.errors import ZhllamaError
from zhllama.provenance import read_manifest

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ZhllamaError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def model_fingerprint(model_dir: str | Path) -> str:
    """A cheap identity for a checkpoint: config plus the size, head and tail of each weight file.

    Hashing every byte of a 13 GB model would take minutes at every stage; the safetensors
    header (names, shapes, offsets) and a sample of the data tell two checkpoints apart in
    practice.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def check_model_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ZhllamaError(f"{model_dir}: model directory does not exist")
    if not (model_dir / "config.json").is_file():
        raise ZhllamaError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in model_dir.iterdir()):
        raise ZhllamaError(f"{model_dir}: no weight files (*.safetensors or *.bin)")
    return model_dir


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ZhllamaError(f"{adapter_dir}: adapter directory does not exist")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ZhllamaError(f"{adapter_dir}: no adapter_config.json; expected a peft adapter written by zhllama pretrain/sft")
    return adapter_dir


def tokenizer_dir_of(model_dir: Path, adapters: Sequence[Path]) -> Path:
    """The tokenizer of a chain: that of the last adapter holding one, else the base's."""
    for directory in [*reversed(adapters), model_dir]:
        if (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file():
            return directory
    raise ZhllamaError(f"{model_dir}: no tokenizer (tokenizer.json or tokenizer.model) in the model or its adapters")


def load_tokenizer(directory: str | Path):
    """The Hugging Face tokenizer of a model, adapter or tokenizer directory.

    A directory with ``tokenizer.json`` loads it. One that holds only ``tokenizer.model``
    (original LLaMA conversions, many mirrors) gets the exact HF tokenizer built from it in a
    temporary directory (transformers' own conversion encodes differently), said once on
    stderr; the user's directory is never written to.
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        if not (directory / "tokenizer.model").is_file():
            raise ZhllamaError(f"{directory}: no tokenizer (tokenizer.json or tokenizer.model)")
        return _tokenizer_from_sp_model(directory)
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # tokenizers raises its own Exception subclass on a corrupt tokenizer.json
        raise ZhllamaError(f"{directory}: cannot load tokenizer: {' '.join(str(e).split())[:300]}") from e


def _tokenizer_from_sp_model(directory: Path):
    import sys
    import tempfile

    from transformers import AutoTokenizer

    from zhllama.vocab.hf import save_hf_tokenizer

    if str(directory.resolve()) not in _ANNOUNCED:
        _ANNOUNCED.add(str(directory.resolve()))
        print(f"zhllama: {directory} has no tokenizer.json; using the exact tokenizer built from its tokenizer.model", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="zhllama-tokenizer-") as scratch:
        save_hf_tokenizer(directory / "tokenizer.model", scratch)
        if (directory / "chat_template.jinja").is_file():
            (Path(scratch) / "chat_template.jinja").write_bytes((directory / "chat_template.jinja").read_bytes())
        return AutoTokenizer.from_pretrained(scratch)


_ANNOUNCED: set[str] = set()


def embedding_rows(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def check_block_size(model_dir: str | Path, block_size: int) -> None:
    """Refuse sequences longer than the model's context, before any weights are loaded."""
    config_path = check_model_dir(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ZhllamaError(f"{config_path}: unreadable model config: {e}") from e
    context = config.get("max_position_embeddings")
    if context is not None and block_size > context:
        raise ZhllamaError(f"--block-size {block_size} exceeds the model's context of {context} tokens ({config_path}); lower it")


def embeddings_tied(model) -> bool:
    """Whether the LM head shares its weight matrix with the input embeddings."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def check_tokenizer_fits(
    tokens: int, rows: int, *, tokenizer: Path | str, model: Path | str,
    fix: str = "run 'zhllama extend' to resize the model for this tokenizer",
) -> None:  # fmt: skip
    """Refuse a tokenizer of ``tokens`` ids when the model has fewer embedding ``rows``: the one
    check (and wording) for a loaded chain, a checkpoint being merged and a GGUF export."""
    if tokens > rows:
        raise ZhllamaError(f"tokenizer {tokenizer} has {tokens} tokens but model {model} has {rows} embedding rows; {fix}")


@dataclass
class ModelChain:
    """A loaded model chain: weights with every adapter applied, and its tokenizer."""

    model: object
    tokenizer: object
    model_dir: Path
    adapters: list[Path] = field(default_factory=list)
    tokenizer_dir: Path | None = None
    fingerprint: str = ""

    @property
    def base_vocab_size(self) -> int | None:
        """Rows the model had before ``zhllama extend`` (None when it was not extended by us)."""
        manifest = read_manifest(self.model_dir)
        return manifest.base_vocab_size if manifest else None

    @property
    def new_token_ids(self) -> list[int]:
        """Ids ``zhllama extend`` added (base vocabulary .. tokenizer size; padding rows excluded)."""
        base = self.base_vocab_size
        return list(range(base, len(self.tokenizer))) if base is not None else []

    def describe(self) -> dict:
        return {
            "model": str(self.model_dir.resolve()),
            "model_fingerprint": self.fingerprint,
            "adapters": [str(a.resolve()) for a in self.adapters],
        }


def check_adapter_base(adapter_dir: Path, fingerprint: str, model_dir: Path, allow_mismatch: bool) -> None:
    """An adapter records the fingerprint of the base it was trained on; refuse another base."""
    manifest = read_manifest(adapter_dir)
    recorded = manifest.model_fingerprint if manifest else None
    if recorded and recorded != fingerprint and not allow_mismatch:
        raise ZhllamaError(
            f"adapter {adapter_dir} was trained on a base with fingerprint {recorded}, but {model_dir} has "
            f"{fingerprint}; pass the model it was made for (see its zhllama.json), or --allow-base-mismatch"
        )


def load_chain(
    model_dir: str | Path,
    adapters: Sequence[str | Path] = (),
    *,
    dtype: str = "float32",
    allow_base_mismatch: bool = False,
) -> ModelChain:
    """Load a base model and apply an ordered chain of peft adapters, merging each in memory.

    Every check happens before the weights are loaded where it can: the directories exist,
    each adapter was trained on this base (fingerprint in its ``zhllama.json``), and the
    tokenizer fits the embedding matrix.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    model_dir = check_model_dir(model_dir)
    adapter_dirs = [check_adapter_dir(a) for a in adapters]
    fingerprint = model_fingerprint(model_dir)
    for adapter_dir in adapter_dirs:
        check_adapter_base(adapter_dir, fingerprint, model_dir, allow_base_mismatch)
    tokenizer_dir = tokenizer_dir_of(model_dir, adapter_dirs)
    tokenizer = load_tokenizer(tokenizer_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(dtype))
    except (OSError, ValueError, SafetensorError) as e:
        raise ZhllamaError(f"{model_dir}: cannot load model: {' '.join(str(e).split())[:300]}") from e
    check_tokenizer_fits(len(tokenizer), embedding_rows(model), tokenizer=tokenizer_dir, model=model_dir)
    for adapter_dir in adapter_dirs:
        model = apply_adapter(model, adapter_dir)
    return ModelChain(model, tokenizer, model_dir, adapter_dirs, tokenizer_dir, fingerprint)


def apply_adapter(model, adapter_dir: Path):
    """Apply one peft adapter and merge it into the weights (the next link builds on it)."""
    from peft import PeftModel
    from safetensors import SafetensorError

    config_path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZhllamaError(f"{config_path}: unreadable adapter config: {e}") from e
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as e:
        raise ZhllamaError(
            f"adapter {adapter_dir} ({config.get('peft_type', '?')}) does not fit the model: {' '.join(str(e).split())[:300]}"
        ) from e
    return peft_model.merge_and_unload()
