"""Training plumbing shared by ``zhllama pretrain``, ``sft``, ``dpo`` and ``rm``: which parameters
train, how a run is logged and guarded, and what is saved.

A training command reads top to bottom::

    chain = load_chain(options.model, options.adapter)                    # zhllama.chain
    model = build_peft_model(chain.model, new_token_ids=chain.new_token_ids,
                             lora=LoraSettings(r=8, alpha=16, dropout=0.05),
                             train_embeddings="new", seed=training_args.seed)
    with training_output_dir(options.out, overwrite=options.overwrite, training_args=training_args) as out_dir:
        figures = train(model, chain.tokenizer, train_dataset=..., eval_dataset=...,
                        data_collator=..., training_args=training_args,
                        out_dir=out_dir, checkpoint_dir=checkpoint_dir_for(options.out),
                        tokenizer_dir=chain.tokenizer_dir)
        write_manifest(out_dir, command=..., options=options, figures=figures, chain=chain.describe())

The API:

- :class:`LoraSettings` (r, alpha, dropout, target) and :data:`ALL_LINEAR` (peft's ``all-linear``: LLaMA's attention and
  MLP projections, the default target).
- :func:`build_peft_model` wraps a model with peft for one stage. ``lora=None`` gives stage 1:
  only embedding rows train (peft ``TrainableTokensConfig``). With ``lora`` it is stage 2 / SFT:
  LoRA on the target projections plus the embedding rows (``LoraConfig(trainable_token_indices=...)``).
  ``train_embeddings`` says which rows of the input embeddings and LM head train: ``"new"`` (the
  rows ``zhllama extend`` added), ``"all"`` (every row: Chinese-LLaMA's full matrices) or
  ``"none"``. Both cases use peft trainable tokens, so a TIED matrix is one set of trainable
  rows shared by the input embeddings and the LM head (trained once, counted once), and the
  adapter holds only those rows.
- :func:`peft_config` is the config :func:`build_peft_model` applies, for trainers that wrap the
  model themselves (trl's ``DPOTrainer`` given ``peft_config`` computes its reference with the
  adapter disabled).
- :func:`train` runs ``transformers.Trainer`` (or a subclass of :class:`AdapterTrainer` that also
  derives from a trl trainer: ``trainer_class``; resume from ``training_args.resume_from_checkpoint``,
  a checkpoint path or ``"last"``), evaluates, saves the adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``, never the base weights) and the tokenizer into ``out_dir``, writes
  ``metrics.jsonl`` and ``loss.png`` there, and returns the figures for ``zhllama.json``.
- Checkpoints go to :func:`checkpoint_dir_for` ``(OUT)`` = ``OUT.checkpoints/``, a sibling of the
  output directory, because the output is written to a temporary directory that vanishes when
  a run fails: checkpoints must outlive a crash so ``--resume-from-checkpoint
  OUT.checkpoints/checkpoint-N`` (or ``last``) can continue. They are adapter-only (plus optimizer,
  scheduler and RNG state) and are removed once the run has succeeded.
- :func:`training_output_dir` is ``atomic_output_dir`` for the main process; under ``accelerate
  launch`` the other processes get a scratch directory.
- :data:`TRAINING_DEFAULTS`: LLaMA's AdamW and schedule settings; :func:`build_training_arguments`
  builds a stage's ``TrainingArguments`` from them and the user's values, for the CLI and Python alike.
- A non-finite loss stops training at once with a :class:`ZhllamaError` naming the step and the
  last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager

from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from zhllama.args import ALL_LINEAR, LoraSettings
from zhllama.chain import TOKENIZER_FILES, embeddings_tied
from zhllama.errors import ZhllamaError

from zhllama.outdir import atomic_output_dir, copy_files

# LLaMA's pretraining optimiser settings (Touvron et al. 2023) and quiet, resumable defaults.
# Users override any of them with the TrainingArguments flags.
TRAINING_DEFAULTS = {
    "learning_rate": 2e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "weight_decay": 0.1,
    "max_grad_norm": 1.0,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float below 1 is a fraction of the total steps
    "logging_steps": 10,
    "logging_first_step": True,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 3,
    "report_to": "none",
    # our own guard stops on a non-finite loss; Trainer's filter would hide it from the logs
    "logging_nan_inf_filter": False,
    # packed pretraining blocks have no padding; SFT (attention_mask) may pass "non_padding"
    "include_num_input_tokens_seen": True,  # "all" (the CLI parser takes it as a boolean)
    # datasets handed to train() hold exactly the model's inputs
    "remove_unused_columns": False,
}

TrainEmbeddings = Literal["new", "all", "none"]
EMBEDDING_CHOICES = ("new", "all", "none")


def explicit_training_values(training_args) -> dict:
    """The fields of a ``TrainingArguments`` that differ from transformers' own defaults.

    A Python caller who builds ``TrainingArguments(learning_rate=1e-4, ...)`` meant those
    values, not transformers' defaults for everything else; a value set equal to
    transformers' default cannot be told apart (pass a dict to be exact).
    """
    import dataclasses

    from transformers import TrainingArguments

    pristine = TrainingArguments(output_dir=training_args.output_dir)
    return {
        f.name: getattr(training_args, f.name)
        for f in dataclasses.fields(TrainingArguments)
        if f.init and f.name != "output_dir" and getattr(training_args, f.name) != getattr(pristine, f.name)
    }


def build_training_arguments(out: str | Path, given=None, defaults: dict | None = None, *, config_class=None, **stage_settings):
    """The one place a stage's ``TrainingArguments`` is built: the stage's defaults
    (:data:`TRAINING_DEFAULTS` unless ``defaults`` says otherwise), then the user's values.

    ``given`` is what the user chose: a dict of TrainingArguments fields (the CLI passes the
    flags and ``--config`` entries it saw), a ``TrainingArguments`` (its non-default fields are
    taken) or None. Checkpoints always go to :func:`checkpoint_dir_for` ``(out)``.
    ``config_class`` is a TrainingArguments subclass (trl's ``DPOConfig``) to build instead,
    with its own ``stage_settings`` (e.g. ``beta``).
    """
    import dataclasses

    from transformers import TrainingArguments

    if isinstance(given, TrainingArguments):
        given = explicit_training_values(given)
    values = {**(TRAINING_DEFAULTS if defaults is None else defaults), **(given or {})}
    values["output_dir"] = str(checkpoint_dir_for(out))
    try:
        args = TrainingArguments(**values)
        if config_class is None or config_class is TrainingArguments:
            return args
        # trl's configs change TrainingArguments' defaults (bf16 on, gradient checkpointing on,
        # a tiny learning rate): every inherited field keeps ours and the user's value
        inherited = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        return config_class(**inherited, **stage_settings)
    except (TypeError, ValueError) as e:
        raise ZhllamaError(f"bad training arguments: {' '.join(str(e).split())[:300]}") from e


def checkpoint_dir_for(out: str | Path) -> Path:
    """Where the Trainer checkpoints of a run writing ``out`` live: ``OUT.checkpoints``."""
    out = Path(out).expanduser().resolve()
    return out.with_name(out.name + ".checkpoints")


def embedding_module_names(model) -> list[str]:
    """The names (as peft targets) of the input embedding and, when untied, the LM head."""
    wanted = [model.get_input_embeddings()]
    if not embeddings_tied(model) and model.get_output_embeddings() is not None:
        wanted.append(model.get_output_embeddings())
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(module)].split(".")[-1] for module in wanted]


def linear_module_names(model) -> set[str]:
    """Short names of the linear layers LoRA can wrap (the LM head excluded)."""
    head = model.get_output_embeddings()
    return {
        name.split(".")[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    }


def peft_config(
    model,
    *,
    new_token_ids: Sequence[int],
    lora: LoraSettings | None,
    train_embeddings: TrainEmbeddings = "new",
    task_type: str = "CAUSAL_LM",
):
    """The peft config under which exactly the parameters of one training stage train.

    ``lora=None``: only embedding rows (stage 1). Otherwise LoRA on ``lora.target`` plus the
    embedding rows chosen by ``train_embeddings`` (stage 2, SFT, DPO). Raises
    :class:`ZhllamaError` when nothing would train or a LoRA target does not exist in the model.
    """
    from peft import LoraConfig, TrainableTokensConfig

    if train_embeddings not in EMBEDDING_CHOICES:
        raise ZhllamaError(f"--train-embeddings must be one of {', '.join(EMBEDDING_CHOICES)} (got {train_embeddings!r})")
    rows = model.get_input_embeddings().weight.shape[0]
    if train_embeddings == "new":
        token_ids = sorted(set(int(i) for i in new_token_ids))
        if token_ids and not 0 <= token_ids[0] <= token_ids[-1] < rows:
            raise ZhllamaError(f"new token ids {token_ids[0]}..{token_ids[-1]} fall outside the {rows} embedding rows")
    elif train_embeddings == "all":
        token_ids = list(range(rows))
    else:
        token_ids = []
    embeddings = embedding_module_names(model)

    if lora is None:
        if not token_ids:
            raise ZhllamaError(
                "nothing to train: the model has no new rows (was it made by 'zhllama extend'?); "
                "pass --train-embeddings all, or use stage 2 (LoRA)"
            )
        return TrainableTokensConfig(target_modules=embeddings, token_indices=token_ids)
    available = linear_module_names(model)
    target = ALL_LINEAR if list(lora.target) == [ALL_LINEAR] else list(lora.target)
    unknown = [] if target == ALL_LINEAR else sorted(set(target) - available)
    if unknown:
        raise ZhllamaError(
            f"unknown --lora-target {', '.join(unknown)}; this model's linear layers are {', '.join(sorted(available))}"
        )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        trainable_token_indices={name: token_ids for name in embeddings} if token_ids else None,
        task_type=task_type,
    )


def build_peft_model(
    model,
    *,
    new_token_ids: Sequence[int],
    lora: LoraSettings | None,
    train_embeddings: TrainEmbeddings = "new",
    seed: int | None = None,
):
    """Wrap ``model`` with peft under :func:`peft_config` (same arguments).

    Pass ``seed`` (e.g. ``training_args.seed``) so LoRA's random initialisation, which happens
    here and not in the Trainer, is reproducible.
    """
    from peft import get_peft_model

    config = peft_config(model, new_token_ids=new_token_ids, lora=lora, train_embeddings=train_embeddings)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    return get_peft_model(model, config)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; a tied matrix counts once."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def save_adapter(model, directory: str | Path, state_dict: dict | None = None) -> None:
    """Save only what trained: the peft adapter, never the (possibly resized) base embeddings.

    peft's default (``save_embedding_layers="auto"``) copies the whole embedding matrix and LM
    head into the adapter when it thinks the vocabulary changed; our base directory already has
    the resized matrices, so the adapter needs only its rows and LoRA weights.
    """
    model.save_pretrained(str(directory), state_dict=state_dict, save_embedding_layers=False)


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold the adapter only and that stops on a non-finite loss."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            complete = complete_checkpoints(Path(self.args.output_dir))
            last = complete[-1] if complete else None
            advice = f"last good checkpoint: {last} (resume from it with" if last else "no checkpoint saved yet (retry with"
            raise ZhllamaError(
                f"training loss became {loss.item()} at step {self.state.global_step + 1}; {advice} "
                "a lower --learning-rate, or check the data and --fp16/--bf16)"
            )
        return loss


def eval_loss_key(name: str | None) -> str:
    """The Trainer's metric for a validation set: ``eval_loss`` (one unnamed set) or ``eval_NAME_loss``."""
    return "eval_loss" if name is None else f"eval_{name}_loss"


def bits_key(loss_key: str) -> str:
    """``eval_zh_loss`` -> ``eval_zh_bits_per_char``."""
    return loss_key.removesuffix("_loss") + "_bits_per_char"


def bits_per_char(loss: float, tokens_per_character: float) -> float:
    """A loss in nats per token as bits per character."""
    return loss / math.log(2) * tokens_per_character


class MetricsLogger(TrainerCallback):
    """A TrainerCallback that appends every log (loss, learning rate, tokens/s) to metrics.jsonl.

    ``tokens_per_character`` maps a validation loss key (``eval_loss``, ``eval_zh_loss``) to its
    set's tokens per character; each logged validation loss then gets its bits per character
    beside it (``eval_zh_bits_per_char``). It writes into the checkpoint directory while
    training, so the log of a crashed run survives with its checkpoints; :func:`finish_metrics`
    copies the de-duplicated log next to the adapter and draws ``loss.png``.
    """

    def __init__(self, path: Path, tokens_per_character: dict[str, float] | None = None):
        self.path = path
        self.tokens_per_character = tokens_per_character or {}
        self._last: tuple[float, int] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        for key, per_char in self.tokens_per_character.items():
            if key in entry:
                entry[bits_key(key)] = bits_per_char(entry[key], per_char)
        now, tokens = time.perf_counter(), getattr(state, "num_input_tokens_seen", 0)
        if self._last is not None and "loss" in logs and now > self._last[0]:
            entry["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
        if "loss" in logs:
            self._last = (now, tokens)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.is_file():
            logged = self.path.read_bytes()
            if logged and not logged.endswith(b"\n"):  # a kill tore the last line: resume after the last whole one
                self.path.write_bytes(logged[: logged.rfind(b"\n") + 1])
        self._last = (time.perf_counter(), getattr(state, "num_input_tokens_seen", 0))


def eval_loss_keys(entry: dict) -> list[str]:
    """The validation losses an entry holds (``eval_loss``, ``eval_zh_loss``, ...)."""
    return [k for k in entry if k.startswith("eval_") and k.endswith("_loss")]


def read_metrics(path: Path) -> list[dict]:
    """The logged entries, keeping the latest entry for each (step, kind) (a resumed run re-logs
    steps); each validation set's entries are a kind of their own."""
    if not path.is_file():
        return []
    latest: dict[tuple[int, str], dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        evals = eval_loss_keys(entry)
        kind = ",".join(evals) if evals else "train" if "loss" in entry else "summary"
        latest[(entry["step"], kind)] = entry
    return [latest[key] for key in sorted(latest)]


def plot_loss(entries: list[dict], path: Path, extra_keys: Sequence[str] = ()) -> None:
    """Training loss and every validation set's loss; beside it their bits per character when
    those were logged; below, ``extra_keys`` (logged metrics such as DPO's ``rewards/margins``,
    with their ``eval_`` twins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    loss_keys = sorted({k for e in entries for k in eval_loss_keys(e)})
    with_bits = any(bits_key(k) in e for e in entries for k in loss_keys)
    columns, rows = 2 if with_bits else 1, 2 if extra_keys else 1
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    loss_ax = axes[0][0]
    if train:
        loss_ax.plot(*zip(*train), label="train loss")
    for key in loss_keys:
        label = "validation" if key == "eval_loss" else key.removeprefix("eval_").removesuffix("_loss")
        points = [(e["step"], e[key]) for e in entries if key in e]
        loss_ax.plot(*zip(*points), "o-", label=f"{label} loss")
        bits = [(e["step"], e[bits_key(key)]) for e in entries if bits_key(key) in e]
        if with_bits and bits:
            axes[0][1].plot(*zip(*bits), "o-", label=label)
    loss_ax.set_ylabel("loss" if extra_keys else "loss (nats per token)")  # a preference loss is no per-token figure
    panels = [(loss_ax, "loss")] + ([(axes[0][1], "bits per character")] if with_bits else [])
    for ax, _ in panels:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    if with_bits:
        axes[0][1].set_ylabel("validation bits per character")
    if extra_keys:
        extra = axes[1][0]
        for key in extra_keys:
            for name, style in ((key, "-"), ("eval_" + key, "o--")):
                points = [(e["step"], e[name]) for e in entries if name in e]
                if points:
                    extra.plot(*zip(*points), style, label=name)
        extra.set_xlabel("step")
        extra.legend(fontsize="small")
        extra.grid(alpha=0.3)
        if with_bits:
            axes[1][1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish_metrics(source: Path, out_dir: Path, extra_keys: Sequence[str] = ()) -> list[dict]:
    entries = read_metrics(source)
    with open(out_dir / "metrics.jsonl", "w", encoding="utf-8") as fh:
        for entry in entries:
            fh.write(json.dumps(entry) + "\n")
    plot_loss(entries, out_dir / "loss.png", extra_keys)
    return entries


def validation_figures(entries: list[dict], final: dict, loss_keys: dict[str, str], tokens_per_character: dict) -> dict:
    """``{NAME: {loss_before, loss_after, bits_per_char_before, bits_per_char_after}}`` of each
    validation set (``loss_keys``: set name -> its metric): before = the step-0 evaluation
    (None after a resume that did not log it), after = the final one. Bits per character are
    None where the set's characters were not counted (``tokens_per_character`` lacks it)."""
    found = {}
    for name, key in loss_keys.items():
        before = next((e[key] for e in entries if e["step"] == 0 and key in e), None)
        after, per_char = final.get(key), tokens_per_character.get(name)
        found[name] = {
            "loss_before": before,
            "loss_after": after,
            "bits_per_char_before": bits_per_char(before, per_char) if before is not None and per_char else None,
            "bits_per_char_after": bits_per_char(after, per_char) if after is not None and per_char else None,
        }
    return found


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` directories whose ``trainer_state.json`` parses, oldest first.

    A run killed while writing a checkpoint leaves one without (or with a torn) trainer state;
    Trainer's own ``get_last_checkpoint`` would pick it and fail on resume.
    """
    found = []
    for path in checkpoint_dir.glob("checkpoint-*") if checkpoint_dir.is_dir() else []:
        step = path.name.removeprefix("checkpoint-")
        if not (step.isdigit() and path.is_dir()):
            continue
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append((int(step), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | bool | None, checkpoint_dir: Path) -> str | None:
    """``--resume-from-checkpoint`` as a checkpoint path: a path, or ``last`` / ``true`` for the newest
    complete one. With ``last`` and no complete checkpoint the run starts from scratch, so one
    command line serves for the first run and every restart."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume is True or str(resume).lower() in ("last", "true"):
        complete = complete_checkpoints(checkpoint_dir)
        if not complete:
            print(f"no complete checkpoint in {checkpoint_dir}; starting from scratch", flush=True)
            return None
        return str(complete[-1])
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise ZhllamaError(f"--resume-from-checkpoint {resume}: not a Trainer checkpoint (no trainer_state.json)")
    return str(path)


@contextmanager
def training_output_dir(out: str | Path, *, overwrite: bool, training_args) -> Iterator[Path]:
    """:func:`zhllama.outdir.atomic_output_dir` for the main process of a (possibly distributed) run.

    Under ``accelerate launch`` every process runs the command; only the main one writes ``out``,
    the others get a scratch directory that is thrown away.
    """
    if training_args.process_index == 0:
        with atomic_output_dir(out, overwrite=overwrite) as directory:
            yield directory
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zhllama-rank") as directory:
            yield Path(directory)


def train(
    model,
    tokenizer,
    *,
    train_dataset,
    eval_dataset=None,
    eval_name: str = "validation",
    tokens_per_character: dict[str, float] | None = None,
    data_collator=None,
    training_args,
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    trainer_class: type | None = None,
    trainer_kwargs: dict | None = None,
    plot_keys: Sequence[str] = (),
) -> dict:
    """Train a peft-wrapped ``model`` with ``transformers.Trainer`` and save the adapter to ``out_dir``.

    ``trainer_class`` (default :class:`AdapterTrainer`) may be a subclass of it that also
    derives from another Trainer (trl's ``DPOTrainer``); ``trainer_kwargs`` go to its
    constructor (e.g. ``peft_config``, when that trainer wraps the model itself), and
    ``plot_keys`` are logged metrics drawn under the loss in ``loss.png``.

    ``out_dir`` is the (temporary) output directory; ``checkpoint_dir`` (see
    :func:`checkpoint_dir_for`) receives the Trainer checkpoints and the running metrics log
    and is removed after success. The tokenizer files of ``tokenizer_dir`` (the chain's) are
    copied verbatim next to the adapter; without it the tokenizer is re-saved.

    ``eval_dataset`` is one validation set (logged as ``eval_loss``, recorded as ``eval_name``)
    or ``{name: dataset}`` (each scored separately, logged as ``eval_NAME_loss``); each set is
    scored before training and at every evaluation. ``tokens_per_character`` ({set name: value})
    adds bits per character to the log and the figures.

    Returns the figures for the manifest: first/last training loss, ``validation`` (per set:
    loss and bits per character before and after), ``eval_loss``/``eval_loss_before``/
    ``eval_perplexity`` of the first set, trainable and total parameters, adapter bytes, tokens/s.
    """
    out_dir, checkpoint_dir = Path(out_dir), Path(checkpoint_dir)
    resume = resolve_resume(training_args.resume_from_checkpoint, checkpoint_dir)
    if training_args.gradient_checkpointing:
        # with frozen embeddings nothing before the first checkpointed layer needs a gradient,
        # and re-entrant checkpointing would then drop the gradients of the layers themselves
        model.enable_input_require_grads()
    if eval_dataset is not None and resume is None:
        training_args.eval_on_start = True  # the validation loss before training: figures and loss.png
    metrics_path = checkpoint_dir / "metrics.jsonl"
    if resume is None and training_args.process_index == 0 and metrics_path.exists():
        metrics_path.unlink()  # a fresh run does not continue an old log
    if isinstance(eval_dataset, dict):
        loss_keys = {name: eval_loss_key(name) for name in eval_dataset}
    else:
        loss_keys = {eval_name: eval_loss_key(None)} if eval_dataset is not None else {}
    per_char = {name: value for name, value in (tokens_per_character or {}).items() if name in loss_keys}

    trainer = (trainer_class or AdapterTrainer)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        # equal-length blocks need no padding (Trainer would otherwise pad with the tokenizer)
        data_collator=data_collator or default_data_collator,
        processing_class=tokenizer,
        callbacks=[MetricsLogger(metrics_path, {loss_keys[name]: value for name, value in per_char.items()})],
        **(trainer_kwargs or {}),
    )
    model = trainer.model  # the peft model, also when the trainer wrapped it
    trainable, total = parameter_counts(model)
    result = trainer.train(resume_from_checkpoint=resume)
    figures: dict = {
        "trainable_params": trainable,
        "total_params": total,
        "global_step": trainer.state.global_step,
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
    }
    final = trainer.evaluate() if eval_dataset is not None else {}
    if loss_keys:
        first = final[next(iter(loss_keys.values()))]
        figures["eval_loss"] = first
        figures["eval_perplexity"] = math.exp(min(first, 700))
    if not training_args.should_save:
        return figures
    save_adapter(model, out_dir)
    if tokenizer_dir is not None:
        copy_files(TOKENIZER_FILES, tokenizer_dir, out_dir)
    else:
        tokenizer.save_pretrained(str(out_dir))
    entries = finish_metrics(metrics_path, out_dir, plot_keys)
    if loss_keys:
        figures["validation"] = validation_figures(entries, final, loss_keys, per_char)
        before = next(iter(figures["validation"].values()))["loss_before"]
        if before is not None:
            figures["eval_loss_before"] = before
    losses = [e["loss"] for e in entries if "loss" in e]
    if losses:
        figures["first_loss"], figures["last_loss"] = losses[0], losses[-1]
    speeds = [e["tokens_per_second"] for e in entries if "tokens_per_second" in e]
    if speeds:
        figures["tokens_per_second"] = round(sum(speeds) / len(speeds), 1)
    figures["adapter_bytes"] = (out_dir / "adapter_model.safetensors").stat().st_size
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return figures
