"""The ``zhllama`` command: a table from sub-command to the stage function that does it.

The table below is the only list of sub-commands. Each entry names the stage module holding
a :class:`zhllama.options.Command` (options dataclass + function); stage modules are imported
only when their command runs, so ``zhllama --help`` stays fast. User errors
(:class:`ZhllamaError`, bad flags, and operating-system errors such as a full disk or a
read-only directory) end as one line on stderr and exit status 1; Ctrl-C exits 130.
The table of every such error is ``docs/errors.md``.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Sequence

from zhllama import __version__
from zhllama.errors import ZhllamaError
from zhllama.outdir import os_error_reason

# name -> (module, attribute, one-line summary)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "vocab train": ("zhllama.vocab.cli", "train", "train a Chinese SentencePiece model on a corpus"),
    "vocab merge": ("zhllama.vocab.cli", "merge", "merge SentencePiece models into a base LLaMA tokenizer"),
    "vocab stats": ("zhllama.vocab.cli", "stats", "compare tokenizers on corpora (tokens per character, parity)"),
    "extend": ("zhllama.pretrain.cli", "extend", "resize a model's embeddings to a merged tokenizer and initialise new rows"),
    "pretrain": ("zhllama.pretrain.cli", "pretrain", "continue pretraining: stage 1 (new rows) or stage 2 (LoRA + rows)"),
    "eval": ("zhllama.evaluate.cli", "evaluate", "bits per character/byte on named corpora; CMMLU, C-Eval, MMLU from local files"),
    "instruct": ("zhllama.instruct.cli", "instruct", "generate instruction data from seed tasks (self-instruct / Alpaca)"),
    "sft": ("zhllama.sft.cli", "sft", "instruction-tune a model chain with LoRA"),
    "chat": ("zhllama.sft.cli", "chat", "chat with (or complete text from) a model chain"),
    "dpo": ("zhllama.preference.cli", "dpo", "preference-tune a model chain with DPO (LoRA; reference = the chain without it)"),
    "rm": ("zhllama.preference.cli", "rm", "train a reward model (score head + LoRA) on preference pairs"),
    "rm score": ("zhllama.preference.cli", "rm_score", "write the reward of each response in a data file (JSONL)"),
    "merge": ("zhllama.merge.cli", "merge", "bake an adapter chain into one checkpoint, shard by shard"),
    "export gguf": ("zhllama.merge.cli", "export_gguf", "export a merged LLaMA checkpoint to GGUF for llama.cpp"),
    "report": ("zhllama.evaluate.cli", "report", "one table (and report.png) across a run's stages, from their zhllama.json"),
    "demo": ("zhllama.demo.run", "demo", "run the whole pipeline on a built-in tiny default"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: zhllama COMMAND [options]   (zhllama {__version__})",
        "",
        "Teach a LLaMA-family model Chinese, step by step.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "Run 'zhllama COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _split_command(argv: Sequence[str]) -> tuple[str, list[str]]:
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, list(argv[words:])
    group = [n for n in COMMANDS if n.startswith(argv[0] + " ")]
    if group:
        raise ZhllamaError(f"'zhllama {argv[0]}' needs a sub-command: {', '.join(n.split()[1] for n in group)}")
    raise ZhllamaError(f"unknown command '{argv[0]}'; run 'zhllama --help' for the list")


def load_command(name: str):
    """The :class:`zhllama.options.Command` registered for sub-command ``name``."""
    module, attribute, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), attribute)


def is_main_process() -> bool:
    """False in every process but the first of an ``accelerate launch`` / torchrun run."""
    return int(os.environ.get("RANK", "0")) == 0


def run_command(name: str, argv: list[str]) -> object:
    """Parse ``argv`` for the sub-command ``name``, call its function and print its summary.

    This is the one runner every command goes through: it refuses an existing ``--out``
    before any model is loaded or data read (commands with :class:`zhllama.args.OutputArgs`),
    calls the stage function (which writes its output directory atomically with its
    ``zhllama.json``) and prints ``result.summary()`` on the main process only.
    """
    from zhllama.args import OutputArgs
    from zhllama.options import parse_command
    from zhllama.outdir import check_output_target

    command = load_command(name)
    options, training = parse_command(f"zhllama {name}", command, argv)
    if isinstance(options, OutputArgs) and is_main_process():
        check_output_target(options.out, options.overwrite)
    result = command.run(options, training) if command.training else command.run(options)
    summary = getattr(result, "summary", None)
    if callable(summary) and is_main_process():
        print(summary(), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"zhllama {__version__}")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # before torch is imported (it reads this once): torch's CPU tensors of 2 MiB and more get
    # transparent huge pages, so the steps that stream multi-GB checkpoints through fresh tensors
    # do not pay a page fault every 4 KiB
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        name, rest = _split_command(argv)
        run_command(name, rest)
    except ZhllamaError as e:
        print(f"zhllama: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        # a full disk, a read-only or permission-denied directory (also when a library reports
        # it in its own exception type): one line; outputs are temporary siblings that
        # atomic_output_dir has already removed. Anything else is a bug: keep the traceback.
        reason = os_error_reason(e)
        if reason is None:
            raise
        paths = [str(p) for p in (getattr(e, "filename", None), getattr(e, "filename2", None)) if p is not None]
        print(f"zhllama: error: {' -> '.join(paths) + ': ' if paths else ''}{reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("zhllama: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
