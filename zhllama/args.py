"""The option groups every stage is composed of, declared once.

A stage's options are one dataclass that inherits the groups it needs, then adds its own
fields::

    @dataclass(kw_only=True)
    class SFTOptions(ChainArgs, LoraArgs, OutputArgs):
        data: list[Path] = option(help="instruction data ...")
        template: str = option(help="prompt template ...")

        def problems(self) -> list[str]:          # only this class's own fields
            return [...]

:class:`Options` (the root of every group) does what each options class would otherwise do
again: it coerces every ``Path`` field (also in lists and ``Path | None``) from strings, then
calls the ``problems()`` of every class in the hierarchy, root first, and raises all of them
together as one :class:`ZhllamaError`. A class's ``problems()`` checks only the fields it
declares, so a group's checks are written once and run for every stage that has the group.

Groups: :class:`ChainArgs` (the model + adapter chain, with the one :meth:`ChainArgs.load`),
:class:`CorpusArgs` (how corpora are read), :class:`LoraArgs` (LoRA settings, one default
each) and :class:`OutputArgs` (the output directory). Each field's default is stated here
once; a stage that needs another default overrides the field and says why next to it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from zhllama.chain import DTYPES
from zhllama.corpus import DOC_SEPARATORS
from zhllama.options import at_least, check, option

# peft's name for every linear layer but the output layer: on LLaMA the attention and MLP
# projections q, k, v, o, gate, up and down
ALL_LINEAR = "all-linear"


def _path_kind(tp: typing.Any) -> str | None:
    """'path', 'paths' (a list of paths) or None, for a field's type hint."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = members[0] if len(members) == 1 else tp
    if tp is Path:
        return "path"
    if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp)[:1] == (Path,):
        return "paths"
    return None


class Options:
    """Root of every options dataclass: path coercion and validation, once for all stages."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), _path_kind(hints.get(f.name))
            if kind == "path" and value is not None and not isinstance(value, Path):
                setattr(self, f.name, Path(value))
            elif kind == "paths" and value is not None:
                setattr(self, f.name, [Path(v) for v in ([value] if isinstance(value, (str, Path)) else value)])
        problems: list[str] = []
        for cls in reversed(type(self).__mro__):
            own = cls.__dict__.get("problems")
            if own is not None:
                problems += own(self)
        check(problems)


@dataclass(kw_only=True)
class ChainArgs(Options):
    """A model: a base directory plus an ordered chain of adapters."""

    model: Path = option(help="model directory (a base, an extended or a merged checkpoint)")
    adapter: list[Path] = option(default_factory=list, help="adapter directories to apply first, in order (repeat the flag)")
    dtype: str = option("float32", choices=DTYPES, help="dtype the weights are loaded in (training: --bf16/--fp16 for mixed precision)")
    allow_base_mismatch: bool = option(False, help="apply adapters even if they were trained on another base")

    def problems(self) -> list[str]:
        return [] if self.dtype in DTYPES else [f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})"]

    def load(self, dtype: str | None = None):
        """The loaded chain (:class:`zhllama.chain.ModelChain`): weights with every adapter
        applied, in ``--dtype`` unless ``dtype`` says otherwise (e.g. the training precision)."""
        from zhllama.chain import load_chain

        return load_chain(self.model, self.adapter, dtype=dtype or self.dtype, allow_base_mismatch=self.allow_base_mismatch)


@dataclass(kw_only=True)
class CorpusArgs(Options):
    """How the documents of a corpus are found inside its files."""

    text_field: str = option("text", help="field holding the text in .jsonl/.json/.parquet corpora")
    doc_sep: str = option("line", choices=DOC_SEPARATORS, help="documents in .txt files: one per line, or blank-line separated")

    def problems(self) -> list[str]:
        return [] if self.doc_sep in DOC_SEPARATORS else [f"--doc-sep must be one of {', '.join(DOC_SEPARATORS)} (got {self.doc_sep!r})"]

    def corpus_kwargs(self) -> dict:
        return {"text_field": self.text_field, "doc_sep": self.doc_sep}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters as :func:`zhllama.training.build_peft_model` takes them."""

    r: int
    alpha: int
    dropout: float
    target: typing.Sequence[str]


@dataclass(kw_only=True)
class LoraArgs(Options):
    """LoRA on the chain's linear projections (every stage that trains LoRA)."""

    lora_r: int = option(8, help="LoRA rank")
    # alpha = 2r: the scale Chinese-LLaMA-Alpaca and most LoRA recipes use
    lora_alpha: int = option(16, help="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = option(0.05, help="LoRA dropout")
    lora_target: list[str] = option(
        default_factory=lambda: [ALL_LINEAR], help="module names LoRA wraps, or all-linear: every linear layer but the LM head"
    )

    def problems(self) -> list[str]:
        found: list[str] = []
        at_least(found, "--lora-r", self.lora_r, 1)
        if self.lora_alpha <= 0:
            found.append(f"--lora-alpha must be positive (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            found.append(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if not self.lora_target:
            found.append("--lora-target needs at least one module name")
        return found

    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target=list(self.lora_target))


@dataclass(kw_only=True)
class OutputArgs(Options):
    """The directory a command writes (atomically; ``--overwrite`` replaces it)."""

    out: Path = option(help="output directory")
    overwrite: bool = option(False, help="replace an existing output directory")
