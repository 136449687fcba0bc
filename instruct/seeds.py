"""Seed tasks: the examples every generation prompt starts from.

Two formats are read, per record (a file may mix them), from a JSON array or JSON lines:

* self-instruct / Stanford Alpaca ``seed_tasks.jsonl``: ``{id, name, instruction, instances:
  [{input, output}, ...], is_classification}``; the first instance is the example shown, as
  Alpaca does;
* plain Alpaca records ``{instruction, input, output}``.

Seeds are the user's own file, so anything unusable in it is an error naming the file and
line (or record), not a skip. :data:`BUNDLED_SEEDS` is the Chinese seed set shipped with
zhllama (36 tasks: writing, classification, extraction, math, translation, classical Chinese).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zhllama.corpus import read_json_records
from zhllama.errors import ZhllamaError

BUNDLED_SEEDS = Path(__file__).with_name("seed_tasks_zh.jsonl")


@dataclass(frozen=True)
class Task:
    """One instruction-following example (a seed, or a generated one)."""

    instruction: str
    input: str
    output: str

    def as_record(self) -> dict:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


def _text(record: dict, key: str, where: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise ZhllamaError(f"{where}: seed task field '{key}' is {got}, expected a string")
    return value


def seed_task(record: object, where: str) -> Task:
    """One seed record (either format) as a :class:`Task`; raises naming ``where``."""
    if not isinstance(record, dict):
        raise ZhllamaError(f"{where}: a seed task must be a JSON object, got {type(record).__name__}")
    instruction = _text(record, "instruction", where, required=True)
    if not instruction.strip():
        raise ZhllamaError(f"{where}: seed task has an empty 'instruction'")
    if "instances" in record:
        instances = record["instances"]
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise ZhllamaError(f"{where}: seed task 'instances' must be a non-empty list of {{input, output}} objects")
        record = instances[0]
    output = _text(record, "output", where, required=True)
    if not output.strip():
        raise ZhllamaError(f"{where}: seed task has an empty 'output'")
    return Task(instruction.strip(), _text(record, "input", where, required=False).strip(), output.strip())


def read_seed_tasks(path: str | Path | None) -> list[Task]:
    """The seed tasks of ``path`` (None: the bundled Chinese set)."""
    path = BUNDLED_SEEDS if path is None else Path(path)
    if not path.is_file():
        raise ZhllamaError(f"{path}: no such seed-task file (give --seed-tasks a seed_tasks.jsonl or Alpaca JSON file)")
    tasks = [seed_task(record, where) for where, record in read_json_records(path)]
    if not tasks:
        raise ZhllamaError(f"{path}: no seed tasks in the file")
    return tasks
