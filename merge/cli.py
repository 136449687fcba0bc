"""Command-line entries of the merge stage; the work is done by :mod:`zhllama.merge.merge`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zhllama.merge.gguf_export import OUTTYPES
from zhllama.merge.merge import MergeOptions, merge_chain
from zhllama.args import Options
from zhllama.options import Command, option


@dataclass(kw_only=True)
class ExportGgufOptions(Options):
    """Options of ``zhllama export gguf`` (``--out`` is a file, not an output directory)."""

    model: Path = option(help="merged LLaMA checkpoint directory (with tokenizer.model)")
    out: Path = option(help="GGUF file to write")
    outtype: str = option("auto", choices=tuple(OUTTYPES), help="type of the weight matrices (auto: the checkpoint's dtype; q*: llama.cpp's block quantisation)")
    overwrite: bool = option(False, help="replace --out if it exists")

    def problems(self) -> list[str]:
        problems = []
        if self.outtype not in OUTTYPES:
            problems.append(f"--outtype must be one of {', '.join(OUTTYPES)} (got {self.outtype!r})")
        if self.out.suffix != ".gguf":
            problems.append(f"--out: '{self.out}' should end in .gguf")
        if self.out.exists() and not self.overwrite:
            problems.append(f"--out: {self.out} exists; pass --overwrite to replace it")
        return problems


@dataclass
class ExportGgufResult:
    out: Path
    outtype: str
    bytes: int
    seconds: float

    def summary(self) -> str:
        return f"wrote {self.out} ({self.bytes / 2**30:.2f} GiB, {self.outtype}) in {self.seconds:.0f} s"


def run_export_gguf(options: ExportGgufOptions) -> ExportGgufResult:
    """Export a merged LLaMA checkpoint to a GGUF file for llama.cpp (SentencePiece vocabulary)."""
    import time

    from zhllama.chain import check_model_dir
    from zhllama.merge.gguf_export import export_gguf
    from zhllama.outdir import atomic_output_file

    started = time.time()
    model_dir = check_model_dir(options.model)
    with atomic_output_file(options.out) as tmp:
        export_gguf(model_dir, tmp, name=model_dir.name, outtype=options.outtype)
    return ExportGgufResult(options.out, options.outtype, options.out.stat().st_size, time.time() - started)


merge = Command(MergeOptions, merge_chain)
export_gguf = Command(ExportGgufOptions, run_export_gguf)
