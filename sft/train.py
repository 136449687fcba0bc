"""``zhllama sft``: instruction-tune a model chain with LoRA in one prompt format.

The flow reads top to bottom: check options → read and normalise the instruction records →
load the model chain → tokenise with the template (labels on responses only) → LoRA (plus the
new embedding rows, as in pretraining stage 2) → ``transformers.Trainer`` → save the adapter,
the tokenizer with the template as its ``chat_template``, ``zhllama.json`` (which records the
template, so ``chat`` and ``merge`` use it), ``metrics.jsonl`` and ``loss.png``.

Packing (``--packing``): short samples share rows of ``--max-seq-length`` tokens, with position
ids restarting at every sample and no attention mask. LLaMA's sdpa and eager attention in
transformers (flash attention too, untested here) read the restarts as sample boundaries (a
block-diagonal causal mask, see ``find_packed_sequence_indices``), but only when no KV cache is
built, so training runs with ``use_cache=False``; ``tests/test_sft.py`` checks packed logits
equal unpacked ones. Rows rather than transformers' ``DataCollatorWithFlattening`` (the whole
batch as one row): without a variable-length attention kernel one long row costs attention over
the batch's total length squared; on CPU that trained 2.5x slower than padding (ruozhiba,
batch 8, 256 tokens).
"""

from __future__ import annotations

import sys

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.accel import AccelArgs, choose_acceleration, read_model_config
from zhllama.args import ChainArgs, LoraArgs, OutputArgs
from zhllama.errors import ZhllamaError
from zhllama.mixing import SOURCE_COLUMN, MixArgs, MixReport, count_sources, mix
from zhllama.options import at_least, option
from zhllama.outdir import check_output_target
from zhllama.provenance import write_manifest
from zhllama.sft.data import DataReport, pack_samples, read_conversations, tokenize_conversations
from zhllama.sft.templates import TEMPLATES, Template, chat_template, get_template
from zhllama.training import (
    EMBEDDING_CHOICES,
    TRAINING_DEFAULTS,
    build_peft_model,
    build_training_arguments,
    checkpoint_dir_for,
    train,
    training_output_dir,
)


@dataclass(kw_only=True)
class SFTOptions(ChainArgs, LoraArgs, OutputArgs, MixArgs, AccelArgs):
    data: list[Path] = option(
        help="instruction data: Alpaca, ShareGPT or OpenAI-style records, .json or .jsonl; with --data-weights each file is one source"
    )
    template: str = option(help=f"prompt template: {', '.join(TEMPLATES)}")
    max_seq_length: int = option(512, help="longest sample in tokens; longer ones lose later turns, then response tail")
    validation_split: float = option(0.0, help="fraction of the conversations held out for the eval loss (of each source, when weighted)")
    packing: bool = option(False, help="pack short samples into rows of --max-seq-length (no attention across samples)")
    train_embeddings: str = option(
        "new", help="embedding / LM-head rows that train: new (rows added by extend), all or none", choices=EMBEDDING_CHOICES
    )

    def problems(self) -> list[str]:
        found = []
        if self.template not in TEMPLATES:
            found.append(f"unknown template '{self.template}'; known templates: {', '.join(TEMPLATES)}")
        at_least(found, "--max-seq-length", self.max_seq_length, 8)
        if not 0 <= self.validation_split < 1:
            found.append(f"--validation-split must be in [0, 1), got {self.validation_split}")
        found += [f"--data {p}: no such file" for p in self.data if not Path(p).is_file()]
        return found


@dataclass
class SFTData:
    """Tokenised training (and validation) samples and the report of how they were made."""

    train: list[dict]
    validation: list[dict] = field(default_factory=list)
    report: DataReport = field(default_factory=DataReport)
    mix: MixReport | None = None


def _hold_out(conversations: list, validation_split: float, seed: int) -> tuple[list, list]:
    """(training, held-out) conversations: a seeded share, at least one of each."""
    if validation_split <= 0:
        return conversations, []
    if len(conversations) < 2:
        raise ZhllamaError(f"--validation-split needs at least 2 conversations; the data has {len(conversations)}")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    count = min(len(conversations) - 1, max(1, round(validation_split * len(conversations))))
    chosen = set(order[:count])
    return [c for i, c in enumerate(conversations) if i not in chosen], [c for i, c in enumerate(conversations) if i in chosen]


def build_sft_data(
    paths,
    template: Template,
    tokenizer,
    *,
    max_seq_length: int,
    validation_split: float = 0.0,
    seed: int = 0,
    weights=(),
    stopping_strategy: str = "first_exhausted",
) -> SFTData:
    """Read, normalise, split (by conversation, seeded) and tokenise instruction data.

    With ``weights`` (one per path) each file is a source: its conversations are split and
    tokenised on their own and the training samples mixed by weight (:mod:`zhllama.mixing`);
    the held-out samples of every source are kept together, unweighted."""
    if not tokenizer.eos_token:
        raise ZhllamaError("the chain's tokenizer has no EOS token; every response must end with one")
    report = DataReport()
    groups = [[path] for path in paths] if weights else [list(paths)]
    per_source, validation, conversations, turns = [], [], 0, 0
    for group in groups:
        read = read_conversations(group, report)
        conversations, turns = conversations + report.conversations, turns + report.turns
        kept, held_out = _hold_out(read, validation_split, seed)
        samples = tokenize_conversations(kept, template, tokenizer, max_seq_length, report)
        if weights and not samples:
            raise ZhllamaError(f"--data {group[0]}: no training sample fits --max-seq-length {max_seq_length}; raise it")
        per_source.append(samples)
        validation += tokenize_conversations(held_out, template, tokenizer, max_seq_length, report) if held_out else []
    report.conversations, report.turns = conversations, turns
    train_samples, mix_report = per_source[0], None
    if weights:
        from datasets import Dataset

        names = [str(path) for path in paths]
        mixed = mix([Dataset.from_list(samples) for samples in per_source], weights, seed=seed, stopping_strategy=stopping_strategy)
        counts = count_sources(mixed, len(per_source))
        mix_report = MixReport(names, list(weights), stopping_strategy, seed, counts, "dataset", [len(s) for s in per_source])
        train_samples = mixed.remove_columns(SOURCE_COLUMN).to_list()
    report.samples = len(train_samples) + len(validation)
    if not train_samples:
        raise ZhllamaError(
            f"no training sample fits --max-seq-length {max_seq_length} ({report.dropped_too_long} too long); raise it"
        )
    return SFTData(train_samples, validation, report, mix_report)


@dataclass
class PackedRowCollator:
    """Batches packed rows (see :func:`zhllama.sft.data.pack_samples`) without an attention mask.

    Shorter rows are padded with one more "sample" whose positions restart at 0, so padding
    forms its own block of the mask; its labels are -100.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = longest - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(row["labels"]) + [-100] * pad)
            batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
        return {key: torch.tensor(value) for key, value in batch.items()}


def data_collator(tokenizer, packing: bool):
    """Packed rows, or samples padded to the longest of the batch with labels padded with -100."""
    from transformers import DataCollatorForSeq2Seq

    if packing:
        return PackedRowCollator(tokenizer.eos_token_id)
    if tokenizer.pad_token is None:
        # padding positions are masked out of attention and loss, so any id will do; the
        # tokenizer files we save are copied from the chain, so this does not leak into them
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def add_chat_template(directory: Path, template: Template) -> None:
    """Write ``template`` as the chat template of the tokenizer saved in ``directory``: into
    ``tokenizer_config.json`` (read by transformers 4.x and vLLM) and ``chat_template.jinja``
    (what transformers 5 saves; it wins when both exist, so both must agree)."""
    jinja = chat_template(template)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    config["chat_template"] = jinja
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (directory / "chat_template.jinja").write_text(jinja, encoding="utf-8")


def sft_training_defaults(options: SFTOptions) -> dict:
    """TRAINING_DEFAULTS, but padded batches count only their real tokens in tokens/s."""
    return {**TRAINING_DEFAULTS, "include_num_input_tokens_seen": True if options.packing else "non_padding"}


@dataclass
class SFTResult:
    """What ``sft`` wrote and measured (the figures are those of ``zhllama.json``)."""

    out: Path
    template: str
    figures: dict
    report: DataReport
    max_seq_length: int
    packed_rows: int | None = None  # rows the training samples were packed into (--packing)
    mix: MixReport | None = None

    def summary(self) -> str:
        r, f = self.report, self.figures
        lines = [
            f"sft data: {r.records} records, {r.conversations} conversations, {f['train_samples']} training and "
            f"{f['validation_samples']} validation samples, {r.label_tokens} of {r.tokens} tokens are response tokens"
        ]
        if r.skipped:
            lines.append(f"skipped records: {r.skipped_summary()}")
        if r.turns_dropped_to_fit or r.responses_cut_to_fit or r.dropped_too_long:
            lines.append(
                f"--max-seq-length {self.max_seq_length}: {r.turns_dropped_to_fit} samples lost later turns, "
                f"{r.responses_cut_to_fit} had their response cut, {r.dropped_too_long} were dropped"
            )
        if self.packed_rows is not None:
            lines.append(f"--packing: {f['train_samples']} training samples in {self.packed_rows} rows of up to {self.max_seq_length} tokens")
        if self.mix is not None:
            lines.append(self.mix.summary())
        loss = f"loss {f.get('first_loss', float('nan')):.4f} -> {f.get('last_loss', float('nan')):.4f}"
        return "\n".join(lines + [f"{loss}; wrote {self.out} (template {self.template})"])


def sft_chain(options: SFTOptions, training=None) -> SFTResult:
    """Instruction-tune ``--model`` (+ ``--adapter`` chain) on ``--data`` in ``--template``'s format.

    Writes ``--out``: the LoRA adapter (plus trained embedding rows), the tokenizer with the
    template as its chat template, ``zhllama.json``, ``metrics.jsonl`` and ``loss.png``.
    ``training``: the TrainingArguments values chosen (a dict, a ``TrainingArguments`` or None),
    on top of :func:`sft_training_defaults`.
    """
    check_output_target(options.out, options.overwrite)  # before the model loads
    # precision, attention kernel, checkpointing, 4-bit (zhllama/accel.py)
    acceleration = choose_acceleration(
        read_model_config(options.model),
        training,
        attention=options.attention,
        load_in_4bit=options.load_in_4bit,
        packed_rows=options.packing,
    )
    training_args = build_training_arguments(options.out, training, acceleration.defaults(sft_training_defaults(options)))
    template = get_template(options.template)
    chain = options.load(dtype=acceleration.load_dtype(options.dtype))
    chain.model = acceleration.prepare(chain.model)
    if training_args.process_index == 0:
        print(acceleration.line, file=sys.stderr, flush=True)
    data = build_sft_data(
        options.data,
        template,
        chain.tokenizer,
        max_seq_length=options.max_seq_length,
        validation_split=options.validation_split,
        seed=training_args.seed,
        weights=options.data_weights,
        stopping_strategy=options.stopping_strategy,
    )

    from datasets import Dataset

    train_rows, validation_rows, packed_rows = data.train, data.validation, None
    if options.packing:
        train_rows = pack_samples(data.train, options.max_seq_length)
        validation_rows = pack_samples(data.validation, options.max_seq_length)
        packed_rows = len(train_rows)
    chain.model.config.use_cache = False  # a KV cache would hide packed-sample boundaries from attention
    model = build_peft_model(
        chain.model,
        new_token_ids=chain.new_token_ids,
        lora=options.lora(),
        train_embeddings=options.train_embeddings,
        seed=training_args.seed,
    )
    with training_output_dir(options.out, overwrite=options.overwrite, training_args=training_args) as out_dir:
        figures = train(
            model,
            chain.tokenizer,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(validation_rows) if validation_rows else None,
            eval_name="held_out",
            data_collator=data_collator(chain.tokenizer, options.packing),
            training_args=training_args,
            out_dir=out_dir,
            checkpoint_dir=checkpoint_dir_for(options.out),
            tokenizer_dir=chain.tokenizer_dir,
        )
        add_chat_template(out_dir, template)
        figures.update(data=data.report.as_dict(), train_samples=len(data.train), validation_samples=len(data.validation))
        if data.mix is not None:
            figures["mix"] = data.mix.as_dict()
        write_manifest(
            out_dir,
            command="sft",
            options=options,
            inputs={"data": [str(p) for p in options.data]},
            figures=figures,
            template=template.name,
            chain=chain.describe(),
            acceleration=acceleration.describe(),
        )
    return SFTResult(options.out, template.name, figures, data.report, options.max_seq_length, packed_rows, data.mix)
