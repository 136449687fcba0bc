"""Multiple-choice benchmarks read from their own published file layouts.

===========  ==========================  ============================  =================================
kind         few-shot rows               scored rows                   columns
===========  ==========================  ============================  =================================
``cmmlu``    ``dev/SUBJECT.csv``         ``test/SUBJECT.csv``          header ``,Question,A,B,C,D,Answer``
``ceval``    ``dev/SUBJECT_dev.csv``     ``val/SUBJECT_val.csv``       header ``id,question,A,B,C,D,answer[,explanation]``
``mmlu``     ``dev/SUBJECT_dev.csv``     ``test/SUBJECT_test.csv``     no header: question,A,B,C,D,answer
===========  ==========================  ============================  =================================

C-Eval's ``test/`` split has no answers (its leaderboard keeps them), so ``val`` is scored, as
Chinese-LLaMA-Alpaca-2's scripts do. Cells are used exactly as written in the file (no
stripping, no number parsing), so the prompt holds the file's characters.

Subject names (the prompt header's) and categories come from ``subjects.json`` in the
benchmark directory when there is one (``{subject: {"name_zh": ..., "categories": [...]}}``),
else from the built-in tables of :mod:`zhllama.evaluate.subjects`. MMLU's header spells the
subject from its file name.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import ZhllamaError
from zhllama.evaluate.subjects import BUILT_IN

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Layout:
    """Where a benchmark keeps its files and which columns hold what."""

    kind: str
    dev: str  # path of the few-shot file, relative to the benchmark directory, with {subject}
    scored: str
    columns: tuple[str, ...] | None  # question, A, B, C, D, answer as named in the header; None: headerless

    def expected(self) -> str:
        header = f"header {','.join(self.columns)}" if self.columns else "no header row: question,A,B,C,D,answer"
        return f"{self.dev} and {self.scored} ({header})".replace("{subject}", "SUBJECT")


LAYOUTS = {
    "cmmlu": Layout("cmmlu", "dev/{subject}.csv", "test/{subject}.csv", ("Question", "A", "B", "C", "D", "Answer")),
    "ceval": Layout("ceval", "dev/{subject}_dev.csv", "val/{subject}_val.csv", ("question", "A", "B", "C", "D", "answer")),
    "mmlu": Layout("mmlu", "dev/{subject}_dev.csv", "test/{subject}_test.csv", None),
}
KINDS = tuple(LAYOUTS)


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str
    where: str  # FILE:LINE, for messages


@dataclass(frozen=True)
class Subject:
    key: str  # the file name's subject
    name: str  # as the prompt header spells it
    categories: tuple[str, ...]
    dev: list[Question]
    scored: list[Question]


def read_questions(path: Path, layout: Layout) -> list[Question]:
    """The rows of one benchmark CSV; a missing column or an answer outside A-D names the line."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            columns = list(range(6))
            if layout.columns is not None:
                header = next(reader, [])
                missing = [c for c in layout.columns if c not in header]
                if missing:
                    raise ZhllamaError(
                        f"{path}:1: missing column(s) {', '.join(missing)}; the header has {','.join(header) or 'nothing'}, "
                        f"a {layout.kind} file needs {','.join(layout.columns)}"
                    )
                columns = [header.index(c) for c in layout.columns]
            questions = []
            while True:
                line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    break
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) <= max(columns):
                    raise ZhllamaError(f"{path}:{line}: {len(row)} field(s), expected question, A, B, C, D and answer")
                question, a, b, c, d, answer = (row[i] for i in columns)
                if answer.strip() not in LETTERS:
                    raise ZhllamaError(f"{path}:{line}: answer {answer!r} is not one of A, B, C, D")
                questions.append(Question(question, (a, b, c, d), answer.strip(), f"{path}:{line}"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ZhllamaError(f"{path}: cannot read benchmark file: {e}") from e
    return questions


def subject_table(kind: str, directory: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{subject: (name, categories)}`` from ``DIR/subjects.json``, else the built-in table."""
    path = directory / "subjects.json"
    if not path.is_file():
        return BUILT_IN.get(kind, {})
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {key: (entry.get("name_zh", key), tuple(entry.get("categories", ()))) for key, entry in data.items()}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise ZhllamaError(f"{path}: unreadable subjects table ({e}); expected {{subject: {{name_zh, categories}}}}") from e


def mmlu_subject_name(key: str) -> str:
    # MMLU's evaluate.py joins the words of the file name each with a leading space, and its
    # header puts one more space before it: "about  abstract algebra." (two spaces) is the published prompt
    return "".join(" " + word for word in key.split("_"))


def scored_subjects(directory: Path, layout: Layout) -> list[str]:
    prefix, suffix = layout.scored.split("{subject}")
    name_prefix = prefix.rsplit("/", 1)[-1]
    found = sorted(p.name[len(name_prefix) : len(p.name) - len(suffix)] for p in directory.glob(prefix + "*" + suffix))
    if not found:
        raise ZhllamaError(f"{directory}: not a {layout.kind} benchmark directory; expected {layout.expected()}")
    return found


def load_benchmark(kind: str, directory: Path, *, subjects: list[str], shots: int, limit: int | None) -> list[Subject]:
    """The subjects of a benchmark directory (all, or those named), with their few-shot rows
    (the first ``shots`` of the dev file) and their scored rows (the first ``limit``)."""
    layout = LAYOUTS[kind]
    directory = Path(directory)
    if not directory.is_dir():
        raise ZhllamaError(f"--benchmark-dir {directory}: no such directory; expected {layout.expected()}")
    available = scored_subjects(directory, layout)
    unknown = [s for s in subjects if s not in available]
    if unknown:
        raise ZhllamaError(f"--subjects: {', '.join(unknown)} not in {directory} (has: {', '.join(available)})")
    table = subject_table(kind, directory)
    loaded = []
    for key in subjects or available:
        if kind == "mmlu":
            name, categories = mmlu_subject_name(key), table.get(key, ("", ()))[1]
        elif key in table:
            name, categories = table[key]
        else:
            where = directory / "subjects.json" if (directory / "subjects.json").is_file() else f"the built-in {kind} table"
            raise ZhllamaError(f"subject {key!r} of {directory} is not in {where}; add it to {directory / 'subjects.json'}")
        dev: list[Question] = []
        if shots:
            dev_file = directory / layout.dev.format(subject=key)
            if not dev_file.is_file():
                raise ZhllamaError(f"{dev_file}: missing; a {kind} directory holds {layout.expected()} (or pass --shots 0)")
            dev = read_questions(dev_file, layout)
            if shots > len(dev):
                raise ZhllamaError(f"--shots {shots}, but {dev_file} has only {len(dev)} row(s); lower --shots")
        scored = read_questions(directory / layout.scored.format(subject=key), layout)
        loaded.append(Subject(key, name, categories, dev[:shots], scored[:limit] if limit else scored))
    return loaded
