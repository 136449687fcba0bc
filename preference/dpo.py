"""``zhllama dpo``: direct preference optimisation of a model chain with LoRA, through trl.

The flow reads top to bottom: check options → read every pair → load the chain → tokenise the
pairs with the SFT template (only the last answer is a completion) → the pairs' log-probability
figures before training → trl's ``DPOTrainer`` given the merged chain and a LoRA config, so the
policy is chain + new LoRA and the reference is the same model with the adapter disabled (no
second copy of the weights) → the figures after → save the adapter, the tokenizer with the
template as its chat template, ``zhllama.json``, ``metrics.jsonl`` and ``loss.png``.

Trainable token rows are off in this stage: trl scores answers with a fused LM head that
multiplies by ``lm_head.weight`` directly (and refuses a peft-wrapped LM head), so peft's
trainable-token rows of a tied or untied head would not reach the loss; and a few thousand
pairs are no data to learn new-token embeddings from, which pretraining already did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zhllama.args import ChainArgs, LoraArgs, OutputArgs
from zhllama.options import option
from zhllama.outdir import check_output_target
from zhllama.preference.data import PairDataArgs, read_pair_files, set_pad_token, tokenize_pair_files, write_pair_manifest
from zhllama.preference.scoring import PairFigures, answer_logps
from zhllama.sft.templates import get_template
from zhllama.training import (
    TRAINING_DEFAULTS,
    AdapterTrainer,
    build_training_arguments,
    checkpoint_dir_for,
    peft_config,
    train,
    training_output_dir,
)

# the loss types trl 1.16's DPOTrainer implements (tests/test_dpo.py checks this list against it)
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
DPO_PLOT_KEYS = ("rewards/margins", "rewards/accuracies")
# DPO takes smaller steps than SFT: LLaMA-Factory's LoRA DPO example uses 5e-6
DPO_TRAINING_DEFAULTS = {**TRAINING_DEFAULTS, "learning_rate": 5e-6}


@dataclass(kw_only=True)
class DPOOptions(ChainArgs, LoraArgs, PairDataArgs, OutputArgs):
    beta: float = option(0.1, help="strength of the pull towards the reference (IPO: its tau)")
    loss_type: str = option("sigmoid", choices=LOSS_TYPES, help="preference loss, as trl names it (sigmoid = the DPO paper's)")
    label_smoothing: float = option(0.0, help="share of preference labels assumed flipped (robust, exo_pair losses)")

    def problems(self) -> list[str]:
        found = []
        if self.loss_type not in LOSS_TYPES:
            found.append(f"unknown --loss-type '{self.loss_type}'; choose one of {', '.join(LOSS_TYPES)}")
        if not self.beta > 0:
            found.append(f"--beta must be positive (got {self.beta})")
        if not 0 <= self.label_smoothing < 0.5:
            found.append(f"--label-smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        return found


@dataclass
class DPOResult:
    """What ``zhllama dpo`` wrote and measured (the figures are also in ``zhllama.json``)."""

    out: Path
    figures: dict
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"wrote {self.out}: DPO adapter ({self.figures['train_pairs']} training pairs, {self.figures['global_step']} steps)"]
        for split in self.after:
            reward = PairFigures(**self.after[split]["reward"])
            logp_before, logp_after = (PairFigures(**f[split]["logp"]) for f in (self.before, self.after))
            lines.append(f"  {split}: implicit reward {reward.line()}; log-prob preference {logp_before.line()} -> {logp_after.line()}")
        return "\n".join(lines)


def _pair_logps(model, rows, pad_id, batch_size) -> dict:
    return {split: answer_logps(model, split_rows, pad_id=pad_id, batch_size=batch_size) for split, split_rows in rows.items()}


def dpo(options: DPOOptions, training=None) -> DPOResult:
    """Preference-tune ``--model`` (+ ``--adapter`` chain, SFT last) on ``--data`` pairs with DPO.

    Writes ``--out``: a LoRA adapter, the tokenizer with the template as chat template,
    ``zhllama.json`` (figures before and after on the training and ``--validation-data`` pairs),
    ``metrics.jsonl`` (trl's rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies per logging step) and ``loss.png``. ``training``: the TrainingArguments
    values chosen (a dict, a ``TrainingArguments`` or None), on top of :data:`DPO_TRAINING_DEFAULTS`.
    """
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from zhllama.sft.train import add_chat_template

    check_output_target(options.out, options.overwrite)
    pairs, held_out, report = read_pair_files(options)
    chain = options.load()
    data = tokenize_pair_files(options, pairs, held_out, report, chain)
    pad_id = set_pad_token(chain.tokenizer)
    config = build_training_arguments(
        options.out, training, DPO_TRAINING_DEFAULTS, config_class=DPOConfig, beta=options.beta, loss_type=[options.loss_type], label_smoothing=options.label_smoothing,
        max_length=None,  # the rows are already cut to --max-length, prompt first
    )  # fmt: skip
    rows = {"train": data.train, **({"validation": data.validation} if data.validation else {})}
    batch = config.per_device_eval_batch_size
    reference = _pair_logps(chain.model, rows, pad_id, batch)  # the chain before DPO is the reference
    lora = peft_config(chain.model, new_token_ids=[], lora=options.lora(), train_embeddings="none")
    with training_output_dir(options.out, overwrite=options.overwrite, training_args=config) as out_dir:
        figures = train(
            chain.model,
            chain.tokenizer,
            train_dataset=Dataset.from_list(data.train),
            eval_dataset=Dataset.from_list(data.validation) if data.validation else None,
            data_collator=DataCollatorForPreference(pad_token_id=pad_id),
            training_args=config,
            out_dir=out_dir,
            checkpoint_dir=checkpoint_dir_for(options.out),
            tokenizer_dir=chain.tokenizer_dir,
            trainer_class=dpo_trainer_class(),
            trainer_kwargs={"peft_config": lora},
            plot_keys=DPO_PLOT_KEYS,
        )
        # trl injected the LoRA layers into chain.model in place: its forward is now the policy's
        policy = _pair_logps(chain.model, rows, pad_id, batch)
        before = {split: {"logp": PairFigures.of(*reference[split]).as_dict()} for split in rows}
        after = {
            split: {
                "reward": PairFigures.of(*(options.beta * (p - r) for p, r in zip(policy[split], reference[split]))).as_dict(),
                "logp": PairFigures.of(*policy[split]).as_dict(),
            }
            for split in rows
        }
        add_chat_template(out_dir, get_template(options.template))
        write_pair_manifest(out_dir, "dpo", options, figures, report, data, chain, before=before, after=after)
    return DPOResult(Path(options.out), figures, before, after)


def dpo_trainer_class():
    from trl import DPOTrainer

    class PreferenceDPOTrainer(AdapterTrainer, DPOTrainer):
        """trl's DPOTrainer with zhllama's adapter-only checkpoints and non-finite-loss guard."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenised with the SFT template and cut prompt-first

    return PreferenceDPOTrainer

