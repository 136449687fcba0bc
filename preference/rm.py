"""``zhllama rm`` and ``zhllama rm score``: a reward model on the chain, and the rewards it gives.

``rm`` puts a one-output score head on the chain's backbone (a sequence-classification model
that shares the chain's weights rather than copying them), trains LoRA plus that head with
trl's ``RewardTrainer`` (the Bradley–Terry loss ``-log sigmoid(r_chosen - r_rejected)``) on
pairs rendered by the SFT template, and saves a standard peft adapter (task ``SEQ_CLS``, the
head in ``modules_to_save``), so ``AutoModelForSequenceClassification`` + ``PeftModel`` load it
on the merged chain. The reward is read at the last token of prompt + answer + EOS.

``rm score`` loads the chain with the reward adapter last and writes one JSON line per record
of a data file: ``reward`` for an instruction record (any format ``zhllama sft`` reads: its
last response is scored), ``chosen_reward`` and ``rejected_reward`` for a preference pair.
That is enough to rank or filter samples, as Llama 2-Chat's rejection sampling did.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zhllama.args import ChainArgs, LoraArgs, OutputArgs
from zhllama.chain import check_adapter_base, check_adapter_dir, load_chain
from zhllama.corpus import read_json_records
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, option
from zhllama.outdir import atomic_output_file, check_output_target
from zhllama.provenance import read_manifest
from zhllama.preference.data import (
    PairDataArgs,
    PreferenceReport,
    check_template_tokens,
    fit_pair,
    pair_from_record,
    read_pair_files,
    set_pad_token,
    split_last_answer,
    tokenize_pair,
    tokenize_pair_files,
    write_pair_manifest,
)
from zhllama.preference.scoring import PairFigures, rm_figures, sequence_rewards
from zhllama.sft.data import SkipRecord, conversation_from_record, special_texts
from zhllama.sft.templates import TEMPLATES, get_template
from zhllama.training import (
    TRAINING_DEFAULTS,
    AdapterTrainer,
    build_training_arguments,
    checkpoint_dir_for,
    peft_config,
    train,
    training_output_dir,
)

RM_PLOT_KEYS = ("margin", "accuracy")
# LoRA reward models train at SFT-like rates (the head starts from random)
RM_TRAINING_DEFAULTS = {**TRAINING_DEFAULTS, "learning_rate": 1e-4}


def reward_model(causal_lm, pad_token_id: int, seed: int = 0):
    """A one-label sequence-classification model sharing ``causal_lm``'s backbone, with a new head."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, pad_token_id, None
    with torch.device("meta"):  # the backbone is taken from the chain, not allocated again
        model = AutoModelForSequenceClassification.from_config(config)
    setattr(model, model.base_model_prefix, getattr(causal_lm, causal_lm.base_model_prefix))
    torch.manual_seed(seed)
    model.score = torch.nn.Linear(config.hidden_size, 1, bias=False, dtype=causal_lm.dtype)
    torch.nn.init.normal_(model.score.weight, std=getattr(config, "initializer_range", 0.02))
    return model


def _rm_rows(rows: list[dict]) -> list[dict]:
    return [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in rows]


@dataclass(kw_only=True)
class RMOptions(ChainArgs, LoraArgs, PairDataArgs, OutputArgs):
    center_rewards: float | None = option(None, help="weight of a penalty on (r_chosen + r_rejected)^2 that keeps rewards near 0")


@dataclass
class RMResult:
    out: Path
    figures: dict

    def summary(self) -> str:
        lines = [f"wrote {self.out}: reward model ({self.figures['train_pairs']} training pairs, {self.figures['global_step']} steps)"]
        for split, after in self.figures["after"].items():
            before = PairFigures(**self.figures["before"][split]["reward"])
            lines.append(f"  {split}: reward {before.line()} -> {PairFigures(**after['reward']).line()}")
        return "\n".join(lines)


def rm(options: RMOptions, training=None) -> RMResult:
    """Train a reward model (score head + LoRA) on ``--model`` (+ ``--adapter`` chain) with ``--data`` pairs.

    Writes ``--out``: the adapter (LoRA + head), the tokenizer, ``zhllama.json`` (reward margin
    and pair accuracy before and after, on training and ``--validation-data`` pairs),
    ``metrics.jsonl`` (trl's accuracy and margin per logging step) and ``loss.png``.
    """
    from datasets import Dataset
    from trl import RewardConfig
    from trl.trainer.reward_trainer import DataCollatorForPreference

    check_output_target(options.out, options.overwrite)
    pairs, held_out, report = read_pair_files(options)
    chain = options.load()
    data = tokenize_pair_files(options, pairs, held_out, report, chain)
    pad_id = set_pad_token(chain.tokenizer)
    config = build_training_arguments(
        options.out, training, RM_TRAINING_DEFAULTS, config_class=RewardConfig, max_length=None, center_rewards_coefficient=options.center_rewards
    )
    model = reward_model(chain.model, pad_id, seed=config.seed)
    rows = {"train": _rm_rows(data.train), **({"validation": _rm_rows(data.validation)} if data.validation else {})}
    batch = config.per_device_eval_batch_size
    before = {split: rm_figures(model, split_rows, pad_id=pad_id, batch_size=batch) for split, split_rows in rows.items()}
    lora = peft_config(model, new_token_ids=[], lora=options.lora(), train_embeddings="none", task_type="SEQ_CLS")
    with training_output_dir(options.out, overwrite=options.overwrite, training_args=config) as out_dir:
        figures = train(
            model,
            chain.tokenizer,
            train_dataset=Dataset.from_list(rows["train"]),
            eval_dataset=Dataset.from_list(rows["validation"]) if data.validation else None,
            data_collator=DataCollatorForPreference(pad_token_id=pad_id),
            training_args=config,
            out_dir=out_dir,
            checkpoint_dir=checkpoint_dir_for(options.out),
            tokenizer_dir=chain.tokenizer_dir,
            trainer_class=reward_trainer_class(),
            trainer_kwargs={"peft_config": lora},
            plot_keys=RM_PLOT_KEYS,
        )
        # peft wrapped the layers and the head of ``model`` in place: it is the trained reward model now
        after = {split: rm_figures(model, split_rows, pad_id=pad_id, batch_size=batch) for split, split_rows in rows.items()}
        write_pair_manifest(out_dir, "rm", options, figures, report, data, chain, before=before, after=after)
    return RMResult(Path(options.out), figures)


def reward_trainer_class():
    from trl import RewardTrainer

    class PreferenceRewardTrainer(AdapterTrainer, RewardTrainer):
        """trl's RewardTrainer with zhllama's adapter-only checkpoints and non-finite-loss guard."""

    return PreferenceRewardTrainer


# --------------------------------------------------------------------------- rm score


@dataclass(kw_only=True)
class RMScoreOptions(ChainArgs):
    data: list[Path] = option(help="records to score: instruction data (any sft format) or preference pairs, .json/.jsonl")
    out: Path = option(help="JSONL file to write, one line per scored record")
    template: str | None = option(None, help="prompt template (default: the one the reward model recorded)")
    max_length: int = option(512, help="longest prompt + answer in tokens; longer ones are truncated prompt-first")
    max_prompt_length: int = option(256, help="tokens a truncated prompt keeps (its end, after BOS)")
    batch_size: int = option(8, help="sequences scored per forward pass")
    overwrite: bool = option(False, help="replace an existing output file")

    def problems(self) -> list[str]:
        found: list[str] = []
        if not self.adapter:
            found.append("--adapter: pass the chain's adapters with the reward model (from 'zhllama rm') last")
        if self.template is not None and self.template not in TEMPLATES:
            found.append(f"unknown template '{self.template}'; known templates: {', '.join(TEMPLATES)}")
        at_least(found, "--max-length", self.max_length, 8)
        if not 1 <= self.max_prompt_length < self.max_length:
            found.append(f"--max-prompt-length ({self.max_prompt_length}) must be between 1 and --max-length ({self.max_length})")
        at_least(found, "--batch-size", self.batch_size, 1)
        found += [f"--data {p}: no such file" for p in self.data if not p.is_file()]
        return found


@dataclass
class RMScoreResult:
    out: Path
    scored: int
    report: PreferenceReport = field(default_factory=PreferenceReport)

    def summary(self) -> str:
        skipped = f"; skipped {self.report.skipped_summary()}" if self.report.skipped else ""
        return f"wrote {self.out}: rewards of {self.scored} records{skipped}"


def _reward_adapter(options: RMScoreOptions) -> tuple[Path, dict]:
    rm_dir = check_adapter_dir(options.adapter[-1])
    manifest = read_manifest(rm_dir) or {}
    if manifest.get("command") != "rm":
        raise ZhllamaError(f"{rm_dir}: not a reward model (its zhllama.json was not written by 'zhllama rm'); pass it as the last --adapter")
    trained_on = manifest.get("chain", {}).get("adapters", [])
    given = [str(Path(a).resolve()) for a in options.adapter[:-1]]
    if trained_on != given and not options.allow_base_mismatch:
        raise ZhllamaError(
            f"reward model {rm_dir} was trained on the chain {trained_on or '(no adapters)'} but --adapter gives {given or '(none)'}; "
            "pass the same adapters before it, or --allow-base-mismatch"
        )
    return rm_dir, manifest


def _score_rows(record: object, where: str, template, tokenizer, options, report) -> tuple[list[dict], list[str]]:
    """Token rows to score for one record and the JSON keys their rewards go under."""
    if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
        row = tokenize_pair(pair_from_record(record, where), template, tokenizer)
        keys = ["chosen_reward", "rejected_reward"]
    else:
        conversation = conversation_from_record(record, where)
        prompt, answer = split_last_answer(conversation, template, tokenizer)
        row, keys = {"prompt_ids": prompt, "chosen_ids": answer, "rejected_ids": answer}, ["reward"]
    row = fit_pair(row, max_length=options.max_length, max_prompt_length=options.max_prompt_length, bos_id=tokenizer.bos_token_id, report=report)
    sequences = [row["prompt_ids"] + row["chosen_ids"], row["prompt_ids"] + row["rejected_ids"]]
    return sequences[: len(keys)], keys


def rm_score(options: RMScoreOptions) -> RMScoreResult:
    """Write the reward of every record of ``--data`` under the reward model (the last ``--adapter``)."""
    from peft import PeftModel

    rm_dir, manifest = _reward_adapter(options)
    template = get_template(options.template or manifest.get("template") or "")
    if options.out.exists() and not options.overwrite:
        raise ZhllamaError(f"{options.out}: output file exists; pass --overwrite to replace it")
    chain = load_chain(options.model, options.adapter[:-1], dtype=options.dtype, allow_base_mismatch=options.allow_base_mismatch)
    check_adapter_base(rm_dir, chain.fingerprint, chain.model_dir, options.allow_base_mismatch)
    check_template_tokens(chain.tokenizer, chain.tokenizer_dir)
    pad_id = set_pad_token(chain.tokenizer)
    model = PeftModel.from_pretrained(reward_model(chain.model, pad_id), str(rm_dir))
    report = PreferenceReport()
    specials = special_texts(chain.tokenizer)
    scored: list[tuple[str, list[str]]] = []
    sequences: list[list[int]] = []
    for path in options.data:
        report.files.append(str(path))
        for where, record in read_json_records(path):
            report.records += 1
            if any(s in json.dumps(record, ensure_ascii=False) for s in specials):
                report.skip("text contains a special token (" + "/".join(specials) + ")", where)
                continue
            try:
                record_sequences, keys = _score_rows(record, where, template, chain.tokenizer, options, report)
            except SkipRecord as e:
                report.skip(e.reason, where)
                continue
            scored.append((where, keys))
            sequences += record_sequences
    rewards = iter(sequence_rewards(model, sequences, pad_id=pad_id, batch_size=options.batch_size).tolist()) if sequences else iter(())
    with atomic_output_file(options.out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for where, keys in scored:
            fh.write(json.dumps({"source": where, **{key: round(next(rewards), 6) for key in keys}}, ensure_ascii=False) + "\n")
    return RMScoreResult(options.out, len(scored), report)
