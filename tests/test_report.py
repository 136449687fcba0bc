"""zhllama report: one row per stage directory with the figures its zhllama.json records (the
per-corpus validation shape and today's eval_loss), --data measuring every stage's
tokenizer, --eval scoring every model stage exactly as zhllama eval does, report.png written;
bad input refused."""

from __future__ import annotations

import json
import shutil

import pytest

from merge_fixtures import ALL_LINEAR, make_adapter
from pretrain_fixtures import run
from zhllama.demo import tiny
from zhllama.chain import model_fingerprint
from zhllama.evaluate import EvalOptions, ReportOptions, evaluate_chain, report_run
from zhllama.provenance import write_manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory, tiny_model_dir):
    """A tokenizer, a model and two adapters on it: one recording per-corpus validation figures
    (the replay stages' shape), one recording today's eval_loss and a metrics.jsonl."""
    from peft import LoraConfig

    work = tmp_path_factory.mktemp("report_run")
    tokenizer = work / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tiny_model_dir / name, tokenizer / name)
    write_manifest(tokenizer, command="vocab merge", figures={"seconds": 0.5})
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    chain = {"model": str(tiny_model_dir), "model_fingerprint": model_fingerprint(tiny_model_dir), "adapters": []}
    stage1 = make_adapter(tiny_model_dir, [], config, work / "stage1", seed=1)
    validation = {
        "zh": {"loss_before": 6.5, "loss_after": 6.1, "bits_per_char_before": 9.5, "bits_per_char_after": 9.0},
        "en": {"loss_before": 4.0, "loss_after": 4.1, "bits_per_char_before": 3.0, "bits_per_char_after": 3.1},
    }
    figures = {"trainable_params": 1234, "adapter_bytes": 5678, "train_runtime_s": 2.5, "validation": validation}
    write_manifest(stage1, command="pretrain --stage 1", figures=figures, chain=chain)
    stage2 = make_adapter(tiny_model_dir, [stage1], config, work / "stage2", seed=2)
    figures = {"trainable_params": 4321, "train_runtime_s": 3.0, "eval_loss_before": 6.1, "eval_loss": 5.9}
    write_manifest(stage2, command="pretrain --stage 2", figures=figures, chain={**chain, "adapters": [str(stage1)]})
    metrics = [{"step": 0, "eval_loss": 6.1}, {"step": 5, "loss": 6.3}, {"step": 10, "loss": 6.0}, {"step": 10, "eval_loss": 5.9}]
    (stage2 / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    zh = tiny.write_lines(work / "zh.txt", tiny.chinese_sentences(15, seed=3))
    return {"tokenizer": tokenizer, "model": tiny_model_dir, "stage1": stage1, "stage2": stage2, "zh": zh}


def test_report_reads_what_each_stage_recorded(tmp_path, run_dirs):
    dirs = [run_dirs[n] for n in ("tokenizer", "model", "stage1", "stage2")]
    result = report_run(ReportOptions(dirs=dirs, png=tmp_path / "report.png"))
    tokenizer, model, stage1, stage2 = result.stages
    assert [s.kind for s in result.stages] == ["tokenizer", "model", "adapter", "adapter"]
    assert (tokenizer.command, tokenizer.seconds) == ("vocab merge", 0.5)
    assert stage1.bits_per_character == {"zh": 9.0, "en": 3.1} and stage1.validation_loss == (6.5, 6.1)
    assert (stage1.trainable_params, stage1.adapter_bytes, stage1.seconds) == (1234, 5678, 2.5)
    assert stage2.bits_per_character == {} and stage2.validation_loss == (6.1, 5.9)
    # no adapter_bytes recorded: the adapter's weight files are measured
    assert stage2.adapter_bytes == (run_dirs["stage2"] / "adapter_model.safetensors").stat().st_size
    assert stage2.losses == [(5, 6.3), (10, 6.0)] and stage2.validation_losses == {"validation": [(0, 6.1), (10, 5.9)]}
    table = result.summary()
    assert "bits/char zh" in table and "bits/char en" in table and "6.100 -> 5.900" in table and "1,234" in table
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_eval_scores_every_model_stage_as_eval_does(tmp_path, run_dirs, capsys):
    cmmlu = tmp_path / "cmmlu" / "test"
    cmmlu.mkdir(parents=True)
    (cmmlu / "anatomy.csv").write_text(",Question,A,B,C,D,Answer\n0,题目一,甲,乙,丙,丁,B\n1,题目二,甲,乙,丙,丁,C\n", encoding="utf-8")
    dirs = [run_dirs[n] for n in ("tokenizer", "model", "stage1", "stage2")]
    png, out = tmp_path / "figures" / "report.png", tmp_path / "report.json"
    run(["report", *dirs, "--eval", "--data", f"zh={run_dirs['zh']}", "--benchmark", "cmmlu", "--benchmark-dir", cmmlu.parent,
         "--shots", 0, "--block-size", 64, "--png", png, "--json", out])  # fmt: skip
    stages = json.loads(out.read_text(encoding="utf-8"))["stages"]
    assert png.is_file() and "cmmlu acc" in capsys.readouterr().out
    assert stages[0]["bits_per_character"] == {} and stages[0]["benchmark"] is None  # a tokenizer has no model
    # the extension-free tokenizer is shared by every stage here
    assert len({round(s["tokens_per_character"]["zh"], 9) for s in stages}) == 1
    for stage, adapters in zip(stages[1:], ([], [run_dirs["stage1"]], [run_dirs["stage1"], run_dirs["stage2"]])):
        direct = evaluate_chain(EvalOptions(model=run_dirs["model"], adapter=adapters, data=[f"zh={run_dirs['zh']}"], block_size=64))
        assert stage["bits_per_character"]["zh"] == pytest.approx(direct.corpora["zh"]["bits_per_character"], rel=1e-6)
        assert stage["tokens_per_character"]["zh"] == pytest.approx(direct.corpora["zh"]["tokens_per_character"])
        assert stage["benchmark"]["questions"] == 2
    # the adapters change the model: the stages' figures differ
    assert len({s["bits_per_character"]["zh"] for s in stages[1:]}) == 3


def test_report_bad_input(tmp_path, run_dirs, capsys):
    not_ours = tmp_path / "random"
    not_ours.mkdir()
    png = tmp_path / "report.png"
    cases = [
        ([not_ours], "not a zhllama output directory"),
        ([tmp_path / "missing"], "no such directory"),
        ([run_dirs["model"], "--eval"], "--eval needs something to measure"),
        ([run_dirs["model"], "--benchmark", "cmmlu", "--benchmark-dir", tmp_path], "--benchmark is run by --eval"),
        ([run_dirs["model"], "--data", "=x.txt"], "empty name before '='"),
    ]
    for argv, message in cases:
        run(["report", *argv, "--png", png], expect=1)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("zhllama: error: ") and message in last, (message, last)
        assert not png.exists()
