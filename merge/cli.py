"""Command-line entries of the merge stage; the work is done by :mod:`zhllama.merge.merge`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zhllama.merge.merge import MergeOptions, merge_chain
from zhllama.options import Command, check, option


@dataclass
class ExportGgufOptions:
    """Options of ``zhllama export gguf``."""

    model: Path = option(help="merged LLaMA checkpoint directory (with tokenizer.model)")
    out: Path = option(help="GGUF file to write")
    overwrite: bool = option(False, help="replace --out if it exists")

    def __post_init__(self) -> None:
        problems = []
        if self.out.suffix != ".gguf":
            problems.append(f"--out: '{self.out}' should end in .gguf")
        if self.out.exists() and not self.overwrite:
            problems.append(f"--out: {self.out} exists; pass --overwrite to replace it")
        check(problems)


def run_export_gguf(options: ExportGgufOptions) -> Path:
    """Export a merged LLaMA checkpoint to a GGUF file for llama.cpp (SentencePiece vocabulary)."""
    from zhllama.chain import check_model_dir
    from zhllama.merge.gguf_export import export_gguf
    from zhllama.outdir import atomic_output_file

    model_dir = check_model_dir(options.model)
    with atomic_output_file(options.out) as tmp:
        export_gguf(model_dir, tmp, name=model_dir.name)
    return options.out


merge = Command(MergeOptions, merge_chain)
export_gguf = Command(ExportGgufOptions, run_export_gguf)
