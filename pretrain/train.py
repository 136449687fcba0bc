"""``zhllama pretrain``: continued pretraining of a model chain in two stages.

Stage 1 trains only the embedding and LM-head rows ``zhllama extend`` added (everything else
frozen), so the new Chinese pieces catch up with the model before anything else moves; the
adapter holds just those rows. Stage 2 adds LoRA on every attention and MLP projection and
keeps training the rows; given the stage-1 adapter as ``--adapter`` it starts from it (the
chain loader merges it into the weights first). ``--train-embeddings all`` trains the whole
matrices instead, as Chinese-LLaMA did.

Several corpora mix by weight (``--data zh/ --data en/ --data-weights 0.8 0.2``, English
replay against forgetting; :mod:`zhllama.mixing`), and named validation sets
(``--validation-data zh=FILE --validation-data en=FILE``) are each scored before training
and at every evaluation, as loss and bits per character.

The flow: load chain → build blocks → wrap with peft → Trainer → save adapter + manifest.
"""

from __future__ import annotations

import sys

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zhllama.accel import AccelArgs, choose_acceleration, read_model_config
from zhllama.args import ChainArgs, CorpusArgs, LoraArgs, OutputArgs
from zhllama.chain import check_block_size
from zhllama.corpus import named_corpus
from zhllama.errors import ZhllamaError
from zhllama.mixing import SOURCE_COLUMN, MixArgs, MixReport, SourceCounter, count_sources, mix
from zhllama.options import at_least, option
from zhllama.outdir import check_output_target
from zhllama.provenance import write_manifest
from zhllama.pretrain.data import build_blocks, collate_blocks, stream_blocks
from zhllama.pretrain.packing import PackingArgs, block_collator
from zhllama.training import (
    EMBEDDING_CHOICES,
    TRAINING_DEFAULTS,
    build_peft_model,
    build_training_arguments,
    checkpoint_dir_for,
    train,
    training_output_dir,
)

# the name of the validation set made of bare --validation-data corpora or of --validation-split
UNNAMED_VALIDATION = "validation"


@dataclass(kw_only=True)
class PretrainOptions(ChainArgs, CorpusArgs, LoraArgs, OutputArgs, MixArgs, AccelArgs, PackingArgs):
    stage: int = option(help="1: train the new embedding/LM-head rows only; 2: LoRA plus those rows", choices=(1, 2))
    data: list[str] = option(help="training corpora (files, directories or globs); with --data-weights each is one source")
    validation_data: list[str] = option(
        default_factory=list,
        help="held-out corpora, NAME=CORPUS to score each separately (repeat: zh=a.txt en=b.txt); bare ones form one set",
    )
    validation_split: float = option(0.01, help="fraction of blocks held out for validation when --validation-data is not given (0: none)")
    block_size: int = option(512, help="tokens per training block (at most the model's context)")
    num_proc: int = option(1, help="processes for tokenising the corpus")
    cache_dir: Path | None = option(None, help="cache of tokenised blocks (default: $ZHLLAMA_CACHE/blocks or ~/.cache/zhllama/blocks)")
    streaming: bool = option(False, help="tokenise on the fly without caching (corpora larger than disk; needs --max-steps)")
    train_embeddings: str = option(
        "new", choices=EMBEDDING_CHOICES, help="embedding/LM-head rows that train: the new ones, all (full matrices) or none"
    )

    def problems(self) -> list[str]:
        found = []
        if self.stage not in (1, 2):
            found.append(f"--stage must be 1 or 2 (got {self.stage})")
        if not self.data:
            found.append("--data needs at least one corpus")
        at_least(found, "--block-size", self.block_size, 2)
        at_least(found, "--num-proc", self.num_proc, 1)
        if not 0 <= self.validation_split < 1:
            found.append(f"--validation-split must be in [0, 1) (got {self.validation_split})")
        if self.streaming and self.validation_split and not self.validation_data:
            found.append("--streaming cannot hold out a --validation-split; pass --validation-data or --validation-split 0")
        if self.train_embeddings not in EMBEDDING_CHOICES:
            found.append(f"--train-embeddings must be one of {', '.join(EMBEDDING_CHOICES)}")
        if self.stage == 1 and self.train_embeddings == "none":
            found.append("--stage 1 --train-embeddings none would train nothing; use new or all")
        try:
            validation_sets(self.validation_data)
        except ZhllamaError as e:
            found.append(str(e))
        return found


def validation_sets(specs: list[str]) -> dict[str, list[str]]:
    """``--validation-data`` values as {set name: corpora}: each NAME=CORPUS is its own set
    (repeating a name adds corpora to it), the bare corpora together form one set."""
    sets: dict[str, list[str]] = {}
    for text in specs:
        name, corpus = named_corpus(text, "--validation-data")
        sets.setdefault(name or UNNAMED_VALIDATION, []).append(corpus)
    return sets


@dataclass
class PretrainData:
    """Training and validation blocks and what building them found."""

    train: object
    validation: object = None  # None, one dataset (logged as eval_loss) or {name: dataset}
    tokens_per_character: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    mix: MixReport | None = None
    counter: SourceCounter | None = None  # streaming mixes: counts what training draws

    def collator(self, blocks_collator):
        """``blocks_collator``, wrapped to count sources when a streaming mix needs it."""
        if self.counter is None:
            return blocks_collator
        self.counter.collator = blocks_collator
        return self.counter


def mixed_tokens_per_character(blocks, per_source: list[float]) -> float:
    """Tokens per character of blocks drawn from several sources: every block has the same
    number of tokens, so its characters are block size / that source's tokens per character."""
    counts = count_sources(blocks, len(per_source))
    return sum(counts) / sum(n / t for n, t in zip(counts, per_source) if n)


def _training_blocks(options: PretrainOptions, chain, training_args, read: dict, cached: dict) -> PretrainData:
    """The training blocks: one corpus of every --data, or one per --data mixed by weight."""
    sources = [[spec] for spec in options.data] if options.data_weights else [list(options.data)]
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    if options.streaming:
        streams = [stream_blocks(specs, chain.tokenizer, **read) for specs in sources]
        if not options.data_weights:
            return PretrainData(streams[0], info={"train": {"streaming": True}})
        mixed = mix(streams, options.data_weights, seed=seed, stopping_strategy=options.stopping_strategy)
        counter = SourceCounter(collate_blocks, len(sources))
        report = MixReport(options.data, options.data_weights, options.stopping_strategy, seed, counter.counts, "training batches", [None] * len(sources))
        return PretrainData(mixed, info={"train": {"streaming": True}}, mix=report, counter=counter)
    built = [build_blocks(specs, chain.tokenizer, chain.tokenizer_dir, **cached) for specs in sources]
    if not options.data_weights:
        blocks, info = built[0]
        return PretrainData(blocks, tokens_per_character={UNNAMED_VALIDATION: info.tokens_per_character}, info={"train": info})
    mixed = mix([blocks for blocks, _ in built], options.data_weights, seed=seed, stopping_strategy=options.stopping_strategy)
    available = [info.blocks for _, info in built]
    report = MixReport(options.data, options.data_weights, options.stopping_strategy, seed, [], "dataset", available)
    per_source = [info.tokens_per_character for _, info in built]
    return PretrainData(
        mixed,
        tokens_per_character={UNNAMED_VALIDATION: mixed_tokens_per_character(mixed, per_source)},
        info={"train": {spec: info for spec, (_, info) in zip(options.data, built)}},
        mix=report,
    )


def load_data(options: PretrainOptions, chain, training_args) -> PretrainData:
    """Training and validation blocks; the main process builds the cache, the others load it."""
    read = {"block_size": options.block_size, **options.corpus_kwargs()}
    cached = {**read, "num_proc": options.num_proc, "cache_dir": options.cache_dir}
    with training_args.main_process_first(desc="building token blocks"):
        data = _training_blocks(options, chain, training_args, read, cached)
        if options.validation_data:
            sets = validation_sets(options.validation_data)
            built = {name: build_blocks(specs, chain.tokenizer, chain.tokenizer_dir, **cached) for name, specs in sets.items()}
            data.tokens_per_character = {name: info.tokens_per_character for name, (_, info) in built.items()}
            data.info["validation"] = {name: info for name, (_, info) in built.items()}
            if list(built) == [UNNAMED_VALIDATION]:
                data.validation = built[UNNAMED_VALIDATION][0]  # logged as eval_loss, as without names
            else:
                data.validation = {name: blocks for name, (blocks, _) in built.items()}
        elif options.validation_split and not options.streaming:
            data.train, data.validation = _hold_out(data.train, options, training_args.seed)
            data.info["validation"] = {"held_out_blocks": len(data.validation)}
        else:
            data.tokens_per_character = {}
    if data.mix is not None and not options.streaming:
        data.mix.counts = count_sources(data.train, len(options.data))
        data.train = data.train.select_columns(["input_ids"])
        if data.validation is not None and not isinstance(data.validation, dict) and SOURCE_COLUMN in data.validation.column_names:
            data.validation = data.validation.select_columns(["input_ids"])
    return data


def _hold_out(blocks, options: PretrainOptions, seed: int):
    held_out = max(1, round(len(blocks) * options.validation_split))
    if held_out >= len(blocks):
        raise ZhllamaError(
            f"corpus has {len(blocks)} block(s) of {options.block_size} tokens, too few to hold out "
            "--validation-split; add text, lower --block-size, or pass --validation-split 0"
        )
    # a random subset of blocks, as an in-memory index: the cache entry stays as written
    order = np.random.default_rng(seed).permutation(len(blocks))
    validation = blocks.select(np.sort(order[:held_out]), keep_in_memory=True)
    return blocks.select(np.sort(order[held_out:]), keep_in_memory=True), validation


@dataclass
class PretrainResult:
    """What one pretraining stage wrote and measured (the figures are those of ``zhllama.json``)."""

    out: Path
    stage: int
    figures: dict
    mix: MixReport | None = None

    def summary(self) -> str:
        f = self.figures
        text = f"stage {self.stage}: loss {f.get('first_loss', float('nan')):.4f} -> {f.get('last_loss', float('nan')):.4f}"
        for name, v in f.get("validation", {}).items():
            text += f", {name} validation loss {v['loss_before']:.4f} -> {v['loss_after']:.4f}" if v.get("loss_before") is not None else ""
            if v.get("bits_per_char_after") is not None and v.get("bits_per_char_before") is not None:
                text += f" ({v['bits_per_char_before']:.3f} -> {v['bits_per_char_after']:.3f} bits/char)"
        text += f", {f['trainable_params']:,} trainable parameters, adapter {f['adapter_bytes']:,} bytes -> {self.out}"
        return text + (f"\n{self.mix.summary()}" if self.mix is not None else "")


def pretrain_chain(options: PretrainOptions, training=None) -> PretrainResult:
    """Continue pretraining a model chain on corpora for one stage; write the adapter, its
    tokenizer, metrics.jsonl, loss.png and zhllama.json to --out.

    ``training``: the TrainingArguments values chosen (a dict, a ``TrainingArguments`` or None),
    on top of :data:`zhllama.training.TRAINING_DEFAULTS`."""
    check_output_target(options.out, options.overwrite)
    check_block_size(options.model, options.block_size)
    # precision, attention kernel, checkpointing, 4-bit (zhllama/accel.py)
    acceleration = choose_acceleration(
        read_model_config(options.model), training, attention=options.attention, load_in_4bit=options.load_in_4bit
    )
    training_args = build_training_arguments(options.out, training, acceleration.defaults(TRAINING_DEFAULTS))
    if options.streaming and training_args.max_steps <= 0:
        raise ZhllamaError("--streaming has no length to count epochs from; pass --max-steps N")
    chain = options.load(dtype=acceleration.load_dtype(options.dtype))
    chain.model = acceleration.prepare(chain.model)
    if training_args.process_index == 0:
        print(acceleration.line, file=sys.stderr, flush=True)

    data = load_data(options, chain, training_args)
    model = build_peft_model(
        chain.model,
        new_token_ids=chain.new_token_ids,
        lora=options.lora() if options.stage == 2 else None,
        train_embeddings=options.train_embeddings,
        seed=training_args.seed,
    )
    with training_output_dir(options.out, overwrite=options.overwrite, training_args=training_args) as out_dir:
        figures = train(
            model,
            chain.tokenizer,
            train_dataset=data.train,
            eval_dataset=data.validation,
            eval_name=UNNAMED_VALIDATION,
            tokens_per_character=data.tokens_per_character,
            data_collator=data.collator(
                block_collator(chain.tokenizer, cross_document_attention=options.cross_document_attention, attention=acceleration.attention)
            ),
            training_args=training_args,
            out_dir=out_dir,
            checkpoint_dir=checkpoint_dir_for(options.out),
            tokenizer_dir=chain.tokenizer_dir,
        )
        figures.update(stage=options.stage, new_rows=len(chain.new_token_ids), block_size=options.block_size)
        if data.mix is not None:
            figures["mix"] = data.mix.as_dict()
        write_manifest(
            out_dir,
            command=f"pretrain --stage {options.stage}",
            options=options,
            inputs={"data": options.data, "validation_data": options.validation_data},
            figures=figures,
            chain=chain.describe(),
            data=data.info,
            acceleration=acceleration.describe(),
            training_arguments=training_args.to_dict(),
        )
    return PretrainResult(options.out, options.stage, figures, data.mix)
