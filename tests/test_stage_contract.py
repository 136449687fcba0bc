"""The stage contract: option groups, one parser (flags, --config in both spellings, flags over
the file), one TrainingArguments builder for the CLI and the Python API, the runner's early
--out check, and models whose directory holds only tokenizer.model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pretrain_fixtures import TRAIN_FLAGS, make_merged_tokenizer, manifest, run, write_corpora
from zhllama.args import ChainArgs, LoraArgs, OutputArgs
from zhllama.cli import load_command, main
from zhllama.errors import ZhllamaError
from zhllama.options import parse_command
from zhllama.training import TRAINING_DEFAULTS, build_training_arguments

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pretrain_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--stage", "2", "--model", "m", "--data", "a.txt", "--out", str(tmp_path / "out"), *extra]


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("spelling", ["separate", "equals"])
def test_config_file_in_both_spellings_with_flags_winning(tmp_path, spelling):
    config = _config(
        tmp_path,
        "lora-r: 4\nlora_alpha: 12\nlearning_rate: 1e-4\nwarmup_steps: 5\n"
        "lr_scheduler_kwargs:\n  min_lr: 1.0e-5\n",
    )
    flag = ["--config", str(config)] if spelling == "separate" else [f"--config={config}"]
    command = load_command("pretrain")
    options, training = parse_command("zhllama pretrain", command, _pretrain_argv(tmp_path, *flag, "--lora-r", "6", "--warmup-steps", "7"))
    assert options.lora_r == 6  # the flag wins over the file
    assert options.lora_alpha == 12  # the file wins over the default
    assert training["learning_rate"] == pytest.approx(1e-4)  # YAML's string "1e-4" read as the flag would be
    assert training["warmup_steps"] == 7
    assert training["lr_scheduler_kwargs"] == {"min_lr": 1e-5}  # a mapping stays a mapping
    args = build_training_arguments(options.out, training)
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert args.adam_beta2 == TRAINING_DEFAULTS["adam_beta2"]  # the stage default under the user's values


def test_config_supplies_required_options_and_rejects_unknown_keys(tmp_path):
    command = load_command("pretrain")
    config = _config(tmp_path, f"stage: 1\nmodel: m\ndata: [a.txt, b.txt]\nout: {tmp_path / 'o'}\n")
    options, _ = parse_command("zhllama pretrain", command, ["--config", str(config)])
    assert options.stage == 1 and options.data == ["a.txt", "b.txt"] and options.model == Path("m")
    bad = _config(tmp_path, "lora_rank: 4\n")
    with pytest.raises(ZhllamaError, match="unknown option.*lora_rank"):
        parse_command("zhllama pretrain", command, _pretrain_argv(tmp_path, "--config", str(bad)))


def test_repeated_list_flags_accumulate(tmp_path):
    options, _ = parse_command(
        "zhllama pretrain", load_command("pretrain"), _pretrain_argv(tmp_path, "--adapter", "a", "--adapter", "b")
    )
    assert options.adapter == [Path("a"), Path("b")]


def test_option_groups_coerce_paths_and_validate_once():
    from zhllama.merge import MergeOptions

    options = MergeOptions(model="m", adapter=["a"], out="o", gguf="m.gguf")
    assert options.gguf == Path("m.gguf") and options.adapter == [Path("a")] and options.out == Path("o")

    from dataclasses import dataclass

    @dataclass(kw_only=True)
    class Stage(ChainArgs, LoraArgs, OutputArgs):
        pass

    with pytest.raises(ZhllamaError) as error:
        Stage(model="m", out="o", lora_r=0, dtype="int3")
    message = str(error.value)
    assert "--lora-r must be at least 1" in message and "--dtype must be one of" in message


def test_python_training_arguments_get_the_stage_defaults(tmp_path):
    from transformers import TrainingArguments

    built = build_training_arguments(tmp_path / "out", TrainingArguments(output_dir="ignored", learning_rate=3e-3))
    assert built.learning_rate == pytest.approx(3e-3)
    assert built.adam_beta2 == TRAINING_DEFAULTS["adam_beta2"] and built.weight_decay == TRAINING_DEFAULTS["weight_decay"]
    assert built.output_dir.endswith("out.checkpoints")


@pytest.fixture(scope="module")
def extended(tmp_path_factory, base_tokenizer_dir, chinese_corpus, tiny_model_dir) -> Path:
    work = tmp_path_factory.mktemp("contract")
    merged = make_merged_tokenizer(work, base_tokenizer_dir, chinese_corpus)
    run(["extend", "--model", tiny_model_dir, "--tokenizer", merged, "--out", work / "extended", "--head-init", "mean"])
    write_corpora(work)
    return work


def _comparable(training_arguments: dict, out: Path) -> dict:
    """TrainingArguments as recorded, less the entries that name the output directory."""
    return {k: v for k, v in training_arguments.items() if out.name not in json.dumps(v)}


def test_cli_and_python_api_record_the_same_training_arguments(extended, tmp_path):
    from zhllama.pretrain import PretrainOptions, pretrain_chain

    flags = ["--max-steps", "2", "--learning-rate", "5e-3", "--warmup-steps", "0", *TRAIN_FLAGS]
    common = ["--stage", "1", "--model", extended / "extended", "--data", extended / "train.txt",
              "--block-size", "32", "--validation-split", "0", "--cache-dir", extended / "cache"]  # fmt: skip
    run(["pretrain", *common, "--out", tmp_path / "cli", *flags])
    options = PretrainOptions(
        stage=1, model=extended / "extended", data=[str(extended / "train.txt")], out=tmp_path / "api",
        block_size=32, validation_split=0, cache_dir=extended / "cache",
    )  # fmt: skip
    _, given = parse_command("zhllama pretrain", load_command("pretrain"), [*map(str, common), "--out", "x", *flags])
    pretrain_chain(options, given)
    cli, api = manifest(tmp_path / "cli")["training_arguments"], manifest(tmp_path / "api")["training_arguments"]
    assert _comparable(cli, tmp_path / "cli") == _comparable(api, tmp_path / "api")
    assert set(cli) - set(_comparable(cli, tmp_path / "cli")) <= {"output_dir", "logging_dir"}  # only where it writes differs
    assert cli["adam_beta2"] == TRAINING_DEFAULTS["adam_beta2"] and cli["learning_rate"] == pytest.approx(5e-3)


def test_sft_refuses_an_existing_out_before_loading_the_model(extended, tmp_path, monkeypatch, capsys):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"instruction": "你好", "output": "你好。"}], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "adapter_config.json").write_text("{}", encoding="utf-8")
    code = main(["sft", "--model", str(extended / "extended"), "--data", str(data), "--template", "alpaca", "--out", str(tmp_path / "done")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "done" in err and "--overwrite" in err


@pytest.mark.slow
def test_eval_of_a_directory_with_only_tokenizer_model_equals_the_exact_tokenizer_json(extended, tmp_path, capsys):
    source = extended / "extended"
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in source.iterdir():
        if path.name not in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "zhllama.json"):
            shutil.copy(path, bare / path.name)
    (bare / "zhllama.json").write_text((source / "zhllama.json").read_text(encoding="utf-8"), encoding="utf-8")
    held_out = extended / "held_out.txt"
    run(["eval", "--model", source, "--data", held_out, "--block-size", "32", "--json", tmp_path / "exact.json"])
    capsys.readouterr()
    run(["eval", "--model", bare, "--data", held_out, "--block-size", "32", "--json", tmp_path / "bare.json"])
    err = capsys.readouterr().err
    assert err.count("no tokenizer.json; using the exact tokenizer built from its tokenizer.model") == 1
    assert sorted(p.name for p in bare.iterdir()) == sorted(p.name for p in source.iterdir() if p.name not in
                                                            ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))  # fmt: skip
    exact = json.loads((tmp_path / "exact.json").read_text(encoding="utf-8"))
    built = json.loads((tmp_path / "bare.json").read_text(encoding="utf-8"))
    assert _scores(exact)[0]["bits_per_character"] > 0 and _scores(exact) == _scores(built)


def _scores(report: dict) -> list:
    """The figures of an eval report per corpus (whatever the corpus is called there)."""
    corpora = report["corpora"]
    entries = corpora.values() if isinstance(corpora, dict) else corpora
    keep = ("documents", "tokens", "characters", "bytes", "loss", "perplexity", "bits_per_character", "bits_per_byte")
    return [{k: v for k, v in entry.items() if k in keep} for entry in entries]
