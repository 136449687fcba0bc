"""Options fields, the command-line parser made from them, and the :class:`Command` record.

Every command's options are a dataclass (composed of the groups in :mod:`zhllama.args`) whose
fields carry their help text (``option(default, help=...)``), so ``--help`` and the Python API
cannot drift apart. :class:`StageParser` (``transformers.HfArgumentParser`` with a few additions)
turns them into flags: field ``foo_bar`` becomes ``--foo-bar``; ``bool`` fields become
``--foo-bar/--no-foo-bar``; list fields accept several values and may be repeated
(``--adapter A --adapter B``); fields made with ``positional=True`` are positional.
:func:`parse_command` adds ``TrainingArguments`` and ``--config FILE.yaml`` for training commands.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from transformers import HfArgumentParser

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


def _has_positional_list(cls: type) -> bool:
    hints = typing.get_type_hints(cls)
    return any(
        f.metadata.get("positional") and typing.get_origin(_unwrap_optional(hints[f.name])) in (list, tuple)
        for f in dataclasses.fields(cls)
    )


class StageParser(HfArgumentParser):
    """``transformers.HfArgumentParser`` over a stage's options (and, for training stages,
    ``TrainingArguments``), with the few things zhllama's command line needs on top:

    - fields made with ``option(positional=True)`` are positional (``zhllama vocab train CORPUS...``);
    - list options may be repeated and accumulate (``--adapter A --adapter B``); in a command with
      positional corpora each flag takes one value, so it cannot swallow the corpora after it;
    - every ``bool`` option has a ``--no-`` form, whatever its default;
    - a bad command line is one :class:`ZhllamaError` line instead of usage text and exit 2.

    TrainingArguments fields are parsed by HfArgumentParser itself.
    """

    def __init__(self, dataclass_types: Sequence[type], **kwargs):
        import argparse

        # set before the fields are added (HfArgumentParser adds them in its __init__)
        self._one_value_lists = any(_has_positional_list(cls) for cls in dataclass_types)
        kwargs.setdefault("formatter_class", argparse.HelpFormatter)
        super().__init__(dataclass_types, **kwargs)

    def error(self, message: str):
        raise ZhllamaError(f"{self.prog}: {message} (see '{self.prog} --help')")

    def _parse_dataclass_field(self, parser, field: dataclasses.Field) -> None:  # type: ignore[override]
        if "positional" not in field.metadata:  # not one of ours: a TrainingArguments field
            return HfArgumentParser._parse_dataclass_field(parser, field)
        import argparse

        meta = field.metadata
        tp = _unwrap_optional(field.type)
        is_list = typing.get_origin(tp) in (list, tuple)
        elem = typing.get_args(tp)[0] if is_list else tp
        convert = elem if elem in (Path, int, float, str) else str
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING else field.default_factory())
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if not required and default not in (None, [], ()) and tp is not bool:
            kwargs["help"] += f" (default: {default})"
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta["positional"]:
            parser.add_argument(field.name, nargs="+" if is_list else None, type=convert, **kwargs)
            return
        names = [flag_name(field.name)]
        if "_" in field.name:
            names.append("--" + field.name)  # HfArgumentParser's spelling, as in TrainingArguments
        if tp is bool:
            parser.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=default, **kwargs)
        elif is_list:
            action = "append" if self._one_value_lists else "extend"
            nargs = None if self._one_value_lists else "+"
            parser.add_argument(*names, dest=field.name, action=action, nargs=nargs, type=convert, default=None, required=required, **kwargs)
        else:
            parser.add_argument(*names, dest=field.name, type=convert, default=default, required=required, **kwargs)


def read_config(path: str) -> dict:
    """A ``--config`` YAML file as a mapping of field names (``lora-r`` and ``lora_r`` alike) to values."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            config = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ZhllamaError(f"{path}: cannot read config: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ZhllamaError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from e
    if not isinstance(config, dict):
        raise ZhllamaError(f"{path}: config must be a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in config.items()}


def parse_command(prog: str, command: "Command", argv: Sequence[str]) -> tuple[Any, dict | None]:
    """Parse a sub-command's argv into its options and, for a training command, the
    ``TrainingArguments`` values the user gave (flags and ``--config``), as a dict.

    ``--config FILE`` and ``--config=FILE`` both work. Values from the file become the parser's
    defaults, so a flag on the command line wins over the file; options the file sets are no
    longer required on the command line. Values keep their YAML types (a mapping stays a dict).
    """
    import argparse

    types_ = [command.options]
    if command.training:
        from transformers import TrainingArguments

        types_.append(TrainingArguments)
    doc = (command.run.__doc__ or "").strip()
    parser = StageParser(
        types_,
        prog=prog,
        description=doc.split("\n\n")[0] or None,
        epilog=(
            "Also accepts every transformers.TrainingArguments flag (e.g. --learning-rate, "
            "--num-train-epochs, --per-device-train-batch-size) and --config FILE.yaml (flags win)."
            if command.training
            else None
        ),
    )
    ours = {f.name for f in dataclasses.fields(command.options) if f.init}
    training_fields = set()
    if command.training:
        parser.add_argument("--config", help="YAML file of options (ours and TrainingArguments); flags win over it")
        training_fields = {f.name for f in dataclasses.fields(types_[1]) if f.init}
        # only the values the user gave: the stage adds its own defaults under them
        for action in parser._actions:
            if action.dest in training_fields:
                action.default = argparse.SUPPRESS
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        known, _ = pre.parse_known_args(list(argv))
        config = read_config(known.config) if known.config else {}
        unknown = sorted(set(config) - ours - training_fields - {"config"})
        if unknown:
            raise ZhllamaError(f"{known.config}: unknown option(s) {', '.join(unknown)}")
        actions = {a.dest: a for a in parser._actions}
        for name, value in config.items():
            if name in ours:
                actions[name].required = False
                if actions[name].nargs == "+":
                    actions[name].nargs = "*"
        parser.set_defaults(**{k: v for k, v in config.items() if k in ours})
        training_from_file = {k: _convert(actions[k], v) for k, v in config.items() if k in training_fields}
    namespace = parser.parse_args(list(argv))
    values = vars(namespace)
    options = command.options(**{k: v for k, v in values.items() if k in ours and v is not None})
    if not command.training:
        return options, None
    given = {**training_from_file, **{k: v for k, v in values.items() if k in training_fields}}
    return options, given


def _convert(action, value: Any) -> Any:
    """A YAML scalar through the flag's own type (YAML reads 1e-4 as a string)."""
    if isinstance(value, str) and callable(getattr(action, "type", None)):
        try:
            return action.type(value)
        except (TypeError, ValueError):
            return value
    return value


@dataclasses.dataclass(frozen=True)
class Command:
    """One sub-command: its options dataclass and the function that does the work.

    ``run(options)`` is called with the parsed options and returns the command's result; the
    CLI prints ``result.summary()`` (on the main process only). When ``training`` is set the
    command also accepts every ``transformers.TrainingArguments`` flag and ``--config FILE.yaml``,
    and is called as ``run(options, training)`` with the TrainingArguments values the user gave
    (a dict); the stage adds its own defaults under them through
    :func:`zhllama.training.build_training_arguments`, exactly as for a Python caller.
    """

    options: type
    run: Callable[..., Any]
    training: bool = False
