"""Options dataclasses and the argparse parsers made from them.

Every command's options are a dataclass whose fields carry their help text
(``option(default, help=...)``), so ``--help`` and the Python API cannot drift apart. Field
``foo_bar`` becomes ``--foo-bar``; ``bool`` fields become ``--foo-bar/--no-foo-bar``; list
fields accept several values and may be repeated (``--adapter A --adapter B``); fields made
with ``positional=True`` are positional. Validation lives in the dataclass's
``__post_init__``, which collects every problem and raises them together via :func:`check`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable

from zhllama.errors import ZhllamaError


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    positional: bool = False,
    choices: typing.Sequence[Any] | None = None,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that is also a command-line option."""
    metadata = {"help": help, "positional": positional, "choices": choices, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(problems: list[str]) -> None:
    """Raise one :class:`ZhllamaError` listing every problem found while validating options."""
    if problems:
        raise ZhllamaError("; ".join(problems))


def at_least(problems: list[str], flag: str, value: int | float | None, minimum: int | float, unit: str = "") -> None:
    """Add the one way zhllama words a number below its minimum (``None``: not given, fine)."""
    if value is not None and value < minimum:
        problems.append(f"{flag} must be at least {minimum}{unit}, got {value}")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of the options dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    takes_positional_list = any(
        f.metadata.get("positional") and typing.get_origin(_unwrap_optional(hints[f.name])) in (list, tuple)
        for f in dataclasses.fields(cls)
    )
    for f in dataclasses.fields(cls):
        if not f.init or "help" not in f.metadata:
            continue
        tp = _unwrap_optional(hints[f.name])
        is_list = typing.get_origin(tp) in (list, tuple)
        elem = typing.get_args(tp)[0] if is_list else tp
        convert = Path if elem is Path else elem if elem in (int, float, str) else str
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = f.metadata["help"]
        if not required and default not in (None, [], ()) and tp is not bool:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"help": help_text}
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+" if is_list else None, type=convert, **kwargs)
            continue
        names = [flag_name(f.name)]
        if tp is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif is_list and takes_positional_list:
            # one value per flag (--tokenizer A --tokenizer B CORPUS...): a greedy "+" would eat
            # the positional arguments that follow
            parser.add_argument(*names, dest=f.name, action="append", type=convert, default=None, required=required, **kwargs)
        elif is_list:
            parser.add_argument(
                *names, dest=f.name, action="extend", nargs="+", type=convert, default=None, required=required, **kwargs
            )
        else:
            parser.add_argument(*names, dest=f.name, type=convert, default=default, required=required, **kwargs)


def options_from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """Build the options dataclass from parsed arguments (its ``__post_init__`` validates)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.init and hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            if value is None and f.default_factory is not dataclasses.MISSING:
                continue  # an unused list flag keeps its default
            values[f.name] = value
    return cls(**values)


def yaml_to_argv(config: dict, known: set[str]) -> tuple[list[str], list[str]]:
    """Split a ``--config`` YAML mapping into argv tokens for our options and the rest.

    Keys may be written ``lora_r`` or ``lora-r``. Config tokens are placed before the
    command-line tokens, so flags given on the command line win.
    """
    ours: list[str] = []
    rest: list[str] = []
    for key, value in config.items():
        name = str(key).replace("-", "_")
        tokens = ours if name in known else rest
        flag = flag_name(name) if name in known else "--" + name
        if isinstance(value, bool) and name in known:
            tokens.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            if value:
                tokens.extend([flag, *map(str, value)])
        elif value is not None:
            tokens.extend([flag, str(value)])
    return ours, rest


@dataclasses.dataclass(frozen=True)
class Command:
    """One sub-command: its options dataclass and the function that does the work.

    ``run(options)`` is called with the parsed options; when ``training`` is set the command
    also accepts every ``transformers.TrainingArguments`` flag and ``--config FILE.yaml``, and
    is called as ``run(options, training_args)``. ``training_defaults`` are TrainingArguments
    values of ours (e.g. LLaMA's AdamW betas) that the user's flags override.
    """

    options: type
    run: Callable[..., Any]
    training: bool = False
    training_defaults: dict = dataclasses.field(default_factory=dict)
