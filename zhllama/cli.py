"""The ``zhllama`` command: a table from sub-command to the stage function that does it.

The table below is the only list of sub-commands. Each entry names the stage module holding
a :class:`zhllama.options.Command` (options dataclass + function); stage modules are imported
only when their command runs, so ``zhllama --help`` stays fast. User errors
(:class:`ZhllamaError`, bad flags, and operating-system errors such as a full disk or a
read-only directory) end as one line on stderr and exit status 1; Ctrl-C exits 130.
The table of every such error is ``docs/errors.md``.
"""

from __future__ import annotations

import argparse
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
    "eval": ("zhllama.pretrain.cli", "evaluate", "perplexity and bits per character of a model chain on corpora"),
    "sft": ("zhllama.sft.cli", "sft", "instruction-tune a model chain with LoRA"),
    "chat": ("zhllama.sft.cli", "chat", "chat with (or complete text from) a model chain"),
    "dpo": ("zhllama.preference.cli", "dpo", "preference-tune a model chain with DPO (LoRA; reference = the chain without it)"),
    "rm": ("zhllama.preference.cli", "rm", "train a reward model (score head + LoRA) on preference pairs"),
    "rm score": ("zhllama.preference.cli", "rm_score", "write the reward of each response in a data file (JSONL)"),
    "merge": ("zhllama.merge.cli", "merge", "bake an adapter chain into one checkpoint, shard by shard"),
    "export gguf": ("zhllama.merge.cli", "export_gguf", "export a merged LLaMA checkpoint to GGUF for llama.cpp"),
    "demo": ("zhllama.demo", "demo", "run the whole pipeline on a built-in tiny default"),
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


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one :class:`ZhllamaError` line, like every
    other user error, instead of printing the whole usage and exiting 2."""

    def error(self, message: str):
        raise ZhllamaError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser(name: str, command) -> argparse.ArgumentParser:
    from zhllama.options import add_options

    doc = (command.run.__doc__ or COMMANDS[name][2]).strip()
    parser = _Parser(
        prog=f"zhllama {name}",
        description=doc.split("\n\n")[0],
        epilog=(
            "Also accepts every transformers.TrainingArguments flag (e.g. --learning-rate, "
            "--num-train-epochs, --per-device-train-batch-size) and --config FILE.yaml."
            if command.training
            else None
        ),
    )
    add_options(parser, command.options)
    if command.training:
        parser.add_argument("--config", help="YAML file of options (ours and TrainingArguments); flags win")
    return parser


def _training_arguments(command, leftover: list[str], config_rest: list[str], output_dir: str):
    from transformers import HfArgumentParser, TrainingArguments

    defaults: list[str] = []
    for key, value in command.training_defaults.items():
        defaults += [f"--{key}", str(value)]
    tokens = ["--output_dir", output_dir, *defaults, *config_rest, *leftover]
    parser = HfArgumentParser(TrainingArguments)
    try:
        (training_args,) = parser.parse_args_into_dataclasses(tokens, look_for_args_file=False)
    except SystemExit as e:
        raise ZhllamaError(f"bad training flag among: {' '.join(leftover + config_rest)}") from e
    except ValueError as e:
        raise ZhllamaError(f"bad training arguments: {e}") from e
    return training_args


def run_command(name: str, argv: list[str]) -> object:
    """Parse ``argv`` for the sub-command ``name`` and call its function."""
    import dataclasses

    from zhllama.options import options_from_namespace, yaml_to_argv

    module, attribute, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module), attribute)
    parser = build_parser(name, command)
    config_ours: list[str] = []
    config_rest: list[str] = []
    if command.training and "--config" in argv:
        import yaml

        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ZhllamaError("--config needs a FILE.yaml")
        path = argv[i + 1]
        try:
            with open(path, encoding="utf-8") as fh:
                config = yaml.safe_load(fh) or {}
        except OSError as e:
            raise ZhllamaError(f"{path}: cannot read config: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ZhllamaError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from e
        if not isinstance(config, dict):
            raise ZhllamaError(f"{path}: config must be a mapping of option names to values")
        known = {f.name for f in dataclasses.fields(command.options)}
        config_ours, config_rest = yaml_to_argv(config, known)
        argv = argv[:i] + argv[i + 2 :]
    if command.training:
        namespace, leftover = parser.parse_known_args(config_ours + argv)
    else:
        namespace, leftover = parser.parse_args(argv), []
    options = options_from_namespace(command.options, namespace)
    if command.training:
        out = getattr(options, "out", None) or "zhllama-output"
        training_args = _training_arguments(command, leftover, config_rest, str(out))
        return command.run(options, training_args)
    return command.run(options)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"zhllama {__version__}")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        name, rest = _split_command(argv)
        result = run_command(name, rest)
        if hasattr(result, "summary") and os.environ.get("RANK", "0") == "0":
            print(result.summary())
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
