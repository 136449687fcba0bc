"""``zhllama report DIR...``: one table across a run's stages, and ``report.png``.

Each directory is read for what it is: an adapter (``adapter_config.json``; its model is the
chain recorded in its ``zhllama.json`` plus itself), a model (``config.json``: a base, an
extended or a merged checkpoint) or a tokenizer (``vocab merge``). The figures come from its
``zhllama.json`` and ``metrics.jsonl``: trainable parameters, adapter bytes, wall time, the
validation loss before and after training, and bits per character per validation corpus when
the stage recorded them (``figures["validation"][NAME]``). With ``--data`` every stage's
tokenizer is measured (tokens per character, no model needed); with ``--eval`` every stage
that is a model is also scored (``zhllama eval``: bits per character per corpus, the benchmark).

``report.png``: bits per character of each corpus across the stages, and the loss curves of
the training stages end to end.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zhllama.chain import DTYPES
from zhllama.errors import ZhllamaError
from zhllama.evaluate.perplexity import named_corpora, read_texts
from zhllama.evaluate.run import MeasureArgs, load_subjects, measure
from zhllama.options import option
from zhllama.outdir import atomic_output_file
from zhllama.provenance import read_manifest


@dataclass(kw_only=True)
class ReportOptions(MeasureArgs):
    dirs: list[Path] = option(positional=True, help="the run's output directories in pipeline order (tokenizer, extended, stage1, stage2, sft, merged)")
    eval: bool = option(False, help="run eval (--data, --benchmark) on every stage that is a model")
    png: Path = option(Path("report.png"), help="where to write the figure")
    json: Path | None = option(None, help="also write the table as JSON")
    dtype: str = option("float32", choices=DTYPES, help="dtype the stages' weights are loaded in for --eval")

    def problems(self) -> list[str]:
        found = []
        if self.eval and not self.measures_anything:
            found.append("--eval needs something to measure: --data NAME=CORPUS and/or --benchmark KIND --benchmark-dir DIR")
        if not self.eval and self.benchmark:
            found.append("--benchmark is run by --eval; add --eval")
        return found


@dataclass
class Stage:
    """One directory of the run and the figures found for it."""

    name: str
    directory: str
    kind: str  # adapter, model or tokenizer
    command: str
    tokens_per_character: dict[str, float] = field(default_factory=dict)
    bits_per_character: dict[str, float] = field(default_factory=dict)
    bits_per_byte: dict[str, float] = field(default_factory=dict)
    validation_loss: tuple[float | None, float | None] = (None, None)
    benchmark: dict | None = None  # {"micro": .., "macro": ..}
    trainable_params: int | None = None
    adapter_bytes: int | None = None
    seconds: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # training loss by step
    # validation loss by step, per validation set ("validation", or the names of --validation-data)
    validation_losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class ReportResult:
    stages: list[Stage]
    corpora: list[str]
    benchmark: str | None
    png: Path

    def as_dict(self) -> dict:
        return {"corpora": self.corpora, "benchmark": self.benchmark, "png": str(self.png), "stages": [asdict(s) for s in self.stages]}

    def summary(self) -> str:
        columns = [("stage", lambda s: s.name), ("command", lambda s: s.command)]
        for name in self.corpora:
            columns += [(f"tok/char {name}", lambda s, n=name: _num(s.tokens_per_character.get(n), ".3f"))]
        for name in self.corpora or sorted({n for s in self.stages for n in s.bits_per_character}):
            columns += [(f"bits/char {name}", lambda s, n=name: _num(s.bits_per_character.get(n), ".3f"))]
        columns += [
            ("val loss", lambda s: "-" if s.validation_loss[1] is None else f"{_num(s.validation_loss[0], '.3f')} -> {s.validation_loss[1]:.3f}")
        ]
        if self.benchmark:
            columns += [(f"{self.benchmark} acc", lambda s: "-" if s.benchmark is None else f"{s.benchmark['macro']:.4f}")]
        columns += [
            ("trainable", lambda s: _num(s.trainable_params, ",d")),
            ("adapter", lambda s: "-" if s.adapter_bytes is None else _size(s.adapter_bytes)),
            ("seconds", lambda s: _num(s.seconds, ".1f")),
        ]
        cells = [[title for title, _ in columns]] + [[cell(s) for _, cell in columns] for s in self.stages]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
        lines.insert(1, "-" * len(lines[0]))
        note = f"{self.benchmark} acc: macro accuracy (mean over subjects)" if self.benchmark else ""
        return "\n".join(lines + ([note] if note else []) + [f"figure: {self.png}"])


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def read_stage(directory: Path, name: str) -> tuple[Stage, Path | None, list[Path], Path]:
    """The stage's recorded figures, the chain that makes its model (model, adapters; model
    None for a tokenizer) and its tokenizer directory."""
    from zhllama.chain import tokenizer_dir_of
    from zhllama.training import read_metrics

    if not directory.is_dir():
        raise ZhllamaError(f"{directory}: no such directory; give the run's output directories")
    manifest = read_manifest(directory) or {}
    figures = manifest.get("figures", {})
    if (directory / "adapter_config.json").is_file():
        chain = manifest.get("chain") or {}
        if "model" not in chain:
            raise ZhllamaError(f"{directory}: adapter without a zhllama.json chain; cannot tell which model it applies to")
        kind, model, adapters = "adapter", Path(chain["model"]), [*map(Path, chain.get("adapters", [])), directory]
    elif (directory / "config.json").is_file():
        kind, model, adapters = "model", directory, []
    elif (directory / "tokenizer.json").is_file():
        kind, model, adapters = "tokenizer", None, []
    else:
        raise ZhllamaError(f"{directory}: not a zhllama output directory (no adapter_config.json, config.json or tokenizer.json)")
    stage = Stage(name, str(directory), kind, manifest.get("command", kind))
    stage.trainable_params = figures.get("trainable_params")
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    stage.adapter_bytes = figures.get("adapter_bytes", weights if kind == "adapter" else None)
    stage.seconds = figures.get("train_runtime_s", figures.get("seconds"))
    validation = figures.get("validation")
    if isinstance(validation, dict):  # per named validation corpus (pretrain/sft --validation-data NAME=CORPUS)
        stage.bits_per_character = {n: v["bits_per_char_after"] for n, v in validation.items() if v.get("bits_per_char_after") is not None}
        first = next(iter(validation.values()), {})
        stage.validation_loss = (first.get("loss_before"), first.get("loss_after"))
    elif "eval_loss" in figures:
        stage.validation_loss = (figures.get("eval_loss_before"), figures["eval_loss"])
    entries = read_metrics(directory / "metrics.jsonl")
    stage.losses = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    for entry in entries:
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("_loss") or key == "eval_loss":
                name = key[len("eval_") : -len("_loss")] or "validation"
                stage.validation_losses.setdefault(name, []).append((entry["step"], value))
    return stage, model, adapters, directory if model is None else tokenizer_dir_of(model, adapters)


def tokens_per_character(tokenizer_dir: Path, texts: dict[str, list[str]]) -> dict[str, float]:
    from zhllama.chain import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    found = {}
    for name, docs in texts.items():
        tokens = sum(len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])
        found[name] = tokens / max(sum(map(len, docs)), 1)
    return found


def report_run(options: ReportOptions) -> ReportResult:
    """One table of figures per stage of a run, read from each directory's ``zhllama.json``
    (and measured with ``--data`` / ``--eval``), and ``report.png``."""
    from zhllama.chain import load_chain

    names = [d.name for d in options.dirs]
    names = names if len(set(names)) == len(names) else [str(d) for d in options.dirs]
    read = [read_stage(Path(d), n) for d, n in zip(options.dirs, names)]
    corpora = named_corpora(options.data)[0]
    texts = {n: read_texts(spec, **options.corpus_kwargs(), max_documents=options.max_documents) for n, spec in corpora.items()}
    subjects = load_subjects(options) if options.eval else []  # a bad benchmark fails before any model loads
    stages = []
    for stage, model, adapters, tokenizer_dir in read:
        if texts:
            stage.tokens_per_character = tokens_per_character(tokenizer_dir, texts)
        if options.eval and model is not None:
            chain = load_chain(model, adapters, dtype=options.dtype)
            result = measure(chain, options, subjects)
            stage.bits_per_character = {n: f["bits_per_character"] for n, f in result.corpora.items()}
            stage.bits_per_byte = {n: f["bits_per_byte"] for n, f in result.corpora.items()}
            if result.benchmark is not None:
                overall = result.benchmark.overall
                stage.benchmark = {"micro": overall.micro, "macro": overall.macro, "questions": overall.questions}
        stages.append(stage)
    report = ReportResult(stages, list(corpora), options.benchmark if options.eval else None, Path(options.png))
    with atomic_output_file(options.png) as tmp:
        plot_report(report, tmp)
    if options.json is not None:
        with atomic_output_file(options.json) as tmp:
            tmp.write_text(json.dumps(report.as_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report


def plot_report(report: ReportResult, path: Path) -> None:
    """Left: bits per character of each corpus across the stages; right: the loss curves of
    the training stages one after another on one step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bits_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    positions = range(len(report.stages))
    corpora = report.corpora or sorted({n for s in report.stages for n in s.bits_per_character})
    for name in corpora:
        points = [(i, s.bits_per_character[name]) for i, s in zip(positions, report.stages) if name in s.bits_per_character]
        if points:
            bits_ax.plot(*zip(*points), "o-", label=name)
    bits_ax.set_xticks(list(positions), [s.name for s in report.stages], rotation=20)
    bits_ax.set_ylabel("bits per character")
    bits_ax.set_title("bits per character by stage" if corpora else "bits per character: run with --eval --data NAME=CORPUS")
    if corpora:
        bits_ax.legend()
    bits_ax.grid(alpha=0.3)
    offset = 0
    for stage in report.stages:
        if not stage.losses:
            continue
        (line,) = loss_ax.plot([offset + step for step, _ in stage.losses], [loss for _, loss in stage.losses], label=f"{stage.name} train")
        for marker, (name, points) in zip("osd^v", stage.validation_losses.items()):
            steps, losses = zip(*points)
            loss_ax.plot([offset + s for s in steps], losses, marker + "--", color=line.get_color(), label=f"{stage.name} {name}")
        offset += max(step for points in [stage.losses, *stage.validation_losses.values()] for step, _ in points)
        loss_ax.axvline(offset, color="grey", alpha=0.3)
    loss_ax.set_xlabel("step (stages one after another)")
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.set_title("loss curves")
    if offset:
        loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
