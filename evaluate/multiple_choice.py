"""Scoring a benchmark's questions: one prompt per question, one log-likelihood per letter,
the highest is the prediction (lm-evaluation-harness's ``multiple_choice`` output type).

Accuracy is reported per subject, per category and overall, two ways: micro (correct answers
over all questions) and macro (the mean of the subjects' accuracies, CMMLU's and C-Eval's
headline figure).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from zhllama.evaluate.benchmarks import LETTERS, Subject
from zhllama.evaluate.prompts import STYLES, build_prompt, format_shot
from zhllama.evaluate.scoring import encode_pair, harness_loglikelihoods, loglikelihoods


@dataclass
class Prediction:
    """One scored question, as a line of ``--predictions``."""

    subject: str
    index: int  # 0-based row of the scored file
    answer: str
    prediction: str
    logprobs: dict[str, float]
    shots: int


@dataclass
class SubjectScore:
    subject: str
    name: str
    categories: list[str]
    questions: int = 0
    correct: int = 0
    shots_dropped: int = 0  # questions whose prompt lost shots to fit the context
    truncated: int = 0  # questions that did not fit even without shots (kept their last tokens)

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else 0.0


@dataclass
class Group:
    """Accuracy of a set of subjects (a category, or all)."""

    name: str
    subjects: int
    questions: int
    micro: float
    macro: float
    shots_dropped: int


@dataclass
class BenchmarkResult:
    kind: str
    shots: int
    template: str | None
    subjects: list[SubjectScore]
    predictions: list[Prediction] = field(default_factory=list)
    scorer: str = "zhllama"  # or lm-evaluation-harness (--harness)

    def group(self, name: str, members: list[SubjectScore]) -> Group:
        questions = sum(s.questions for s in members)
        return Group(
            name,
            len(members),
            questions,
            sum(s.correct for s in members) / questions if questions else 0.0,
            sum(s.accuracy for s in members) / len(members) if members else 0.0,
            sum(s.shots_dropped for s in members),
        )

    def categories(self) -> list[Group]:
        names = sorted({c for s in self.subjects for c in s.categories})
        return [self.group(c, [s for s in self.subjects if c in s.categories]) for c in names]

    @property
    def overall(self) -> Group:
        return self.group("overall", self.subjects)

    def as_dict(self) -> dict:
        return {
            "benchmark": self.kind,
            "shots": self.shots,
            "template": self.template,
            "scorer": self.scorer,
            "overall": asdict(self.overall),
            "categories": {g.name: asdict(g) for g in self.categories()},
            "subjects": {s.subject: {**asdict(s), "accuracy": s.accuracy} for s in self.subjects},
        }

    def table(self) -> str:
        title = f"{self.kind} ({self.shots}-shot{', template ' + self.template if self.template else ''})"
        width = max([len(title), *(len(s.subject) for s in self.subjects)]) + 2
        lines = [f"{title.ljust(width)}{'subjects':>9}{'questions':>10}{'micro acc':>10}{'macro acc':>10}{'fewer shots':>12}"]
        rows = [Group(s.subject, 1, s.questions, s.accuracy, s.accuracy, s.shots_dropped) for s in self.subjects]
        for group in [*rows, None, *self.categories(), self.overall]:
            if group is None:
                lines.append("-" * len(lines[0]))
                continue
            lines.append(
                f"{group.name.ljust(width)}{group.subjects:>9}{group.questions:>10}{group.micro:>10.4f}"
                f"{group.macro:>10.4f}{group.shots_dropped:>12}"
            )
        return "\n".join(lines)


def run_benchmark(
    model,
    tokenizer,
    subjects: list[Subject],
    *,
    kind: str,
    shots: int,
    max_length: int,
    batch_size: int,
    template=None,
    harness: bool = False,
) -> BenchmarkResult:
    """Predict every scored question of ``subjects`` and count the correct ones; ``harness``
    has lm-evaluation-harness compute the log-likelihoods of the same prompts."""
    style = STYLES[kind]

    def token_count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def fits(context: str, continuations: dict[str, str]) -> bool:
        # <s>, the context and the longest continuation: what the model is given
        return 1 + max(token_count(context + c) for c in continuations.values()) <= max_length

    scores, requests, asked = [], [], []
    for subject in subjects:
        score = SubjectScore(subject.key, subject.name, list(subject.categories))
        shot_texts = [format_shot(style, q) for q in subject.dev[:shots]]
        shot_tokens = [token_count(t) for t in shot_texts]
        for index, question in enumerate(subject.scored):
            prompt = build_prompt(style, subject.name, question, shot_texts, shot_tokens, fits=fits, template=template)
            score.shots_dropped += prompt.shots < len(shot_texts)
            score.truncated += prompt.shots == 0 and not fits(prompt.context, prompt.continuations)
            requests += [(prompt.context, prompt.continuations[letter]) for letter in LETTERS]
            asked.append((score, index, question, prompt.shots))
        scores.append(score)
    if harness:
        values = harness_loglikelihoods(model, tokenizer, requests, max_length=max_length, batch_size=batch_size)
    else:
        encoded = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
        values = loglikelihoods(model, encoded, max_length=max_length, batch_size=batch_size, desc=kind)
    predictions = []
    for number, (score, index, question, kept) in enumerate(asked):
        logprobs = dict(zip(LETTERS, values[4 * number : 4 * number + 4]))
        predicted = max(LETTERS, key=lambda letter: logprobs[letter])  # ties: the first letter, as argmax
        score.questions += 1
        score.correct += predicted == question.answer
        predictions.append(Prediction(score.subject, index, question.answer, predicted, logprobs, kept))
    return BenchmarkResult(kind, shots, getattr(template, "name", None), scores, predictions, "lm-evaluation-harness" if harness else "zhllama")
